from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class CreateSessionRequest(_message.Message):
    __slots__ = ("hostUser", "hostPublicKeys", "clientAuthorizedKeys", "sessionSecret", "generation", "hostKeyProof")
    HOSTUSER_FIELD_NUMBER: _ClassVar[int]
    HOSTPUBLICKEYS_FIELD_NUMBER: _ClassVar[int]
    CLIENTAUTHORIZEDKEYS_FIELD_NUMBER: _ClassVar[int]
    SESSIONSECRET_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    HOSTKEYPROOF_FIELD_NUMBER: _ClassVar[int]
    hostUser: str
    hostPublicKeys: _containers.RepeatedScalarFieldContainer[bytes]
    clientAuthorizedKeys: _containers.RepeatedScalarFieldContainer[bytes]
    sessionSecret: bytes
    generation: int
    hostKeyProof: bytes
    def __init__(self, hostUser: _Optional[str] = ..., hostPublicKeys: _Optional[_Iterable[bytes]] = ..., clientAuthorizedKeys: _Optional[_Iterable[bytes]] = ..., sessionSecret: _Optional[bytes] = ..., generation: _Optional[int] = ..., hostKeyProof: _Optional[bytes] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("sessionID", "nodeAddr", "ssh_user", "sessionKeyRedial")
    SESSIONID_FIELD_NUMBER: _ClassVar[int]
    NODEADDR_FIELD_NUMBER: _ClassVar[int]
    SSH_USER_FIELD_NUMBER: _ClassVar[int]
    SESSIONKEYREDIAL_FIELD_NUMBER: _ClassVar[int]
    sessionID: str
    nodeAddr: str
    ssh_user: str
    sessionKeyRedial: bool
    def __init__(self, sessionID: _Optional[str] = ..., nodeAddr: _Optional[str] = ..., ssh_user: _Optional[str] = ..., sessionKeyRedial: bool = ...) -> None: ...

class AuthRequest(_message.Message):
    __slots__ = ("client_version", "remote_addr", "authorized_key", "local_addr")
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDR_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZED_KEY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDR_FIELD_NUMBER: _ClassVar[int]
    client_version: str
    remote_addr: str
    authorized_key: bytes
    local_addr: str
    def __init__(self, client_version: _Optional[str] = ..., remote_addr: _Optional[str] = ..., authorized_key: _Optional[bytes] = ..., local_addr: _Optional[str] = ...) -> None: ...
