"""The admin protocol between ``upterm`` and the daemon: framing and typed messages.

Sans-I/O. A frame is a 4-byte big-endian length then one msgpack map. Requests carry an
``id`` and get exactly one reply (``ok`` or ``error``); streams (an attached terminal) are
frames tagged with a ``stream`` number. Every decoded value is checked against the schema
below: wrong types, missing fields and values out of range are :class:`RemoteProtocolError`,
unknown fields are ignored, unknown message types are reported with their type so the
caller can answer "unknown type". See ``docs/admin-protocol.md``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from upterm.errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION: Final = 1
#: Largest frame either side accepts. Bigger frames mean a broken or hostile peer: close.
MAX_FRAME_BYTES: Final = 1 << 20
#: Terminal data is sent in chunks no larger than this.
MAX_DATA_CHUNK_BYTES: Final = 64 * 1024
MAX_STRING_CHARS: Final = 64 * 1024
MAX_LIST_ITEMS: Final = 4096
MAX_TERMINAL_DIM: Final = 10_000
MAX_ID: Final = 2**53
#: How the shared PTY's size follows the attached terminals.
SIZE_POLICIES: Final = ("smallest", "host", "largest")
#: What a joiner may do: watch, or watch and type.
ROLES: Final = ("typist", "viewer", "moderator")
#: What a moderated session does when it has fewer moderators than it needs.
MODERATOR_LEAVE: Final = ("pause", "end")
#: Where a joiner's ``ssh -L`` may lead ("" : nowhere).
FORWARDING_MODES: Final = ("", "loopback", "any")
#: ``wait`` can block at most this long (a week).
MAX_WAIT_S: Final = 7 * 24 * 3600
#: Session names: safe in file names, shell prompts and ssh config Host lines.
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEADER = struct.Struct(">I")


# --- Framing -------------------------------------------------------------------------------


def encode_frame(message: dict[str, Any]) -> bytes:
    """Pack one message into a frame; raises :class:`LocalProtocolError` if too large."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise LocalProtocolError(f"admin frame of {len(body)} bytes exceeds the limit")
    return _HEADER.pack(len(body)) + body


@dataclass(frozen=True)
class BadFrame:
    """A frame whose length was fine but whose body was not a msgpack map."""

    reason: str


class FrameTooLarge(RemoteProtocolError):
    """The peer announced a frame over :data:`MAX_FRAME_BYTES`; the stream cannot resync."""


class FrameDecoder:
    """Turns a byte stream into messages; feed it any split of the stream."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> Iterator[dict[str, Any] | BadFrame]:
        """Add bytes; yield each complete message (or :class:`BadFrame`) in order."""
        self._buf += data
        while len(self._buf) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self._max:
                raise FrameTooLarge(f"admin frame of {length} bytes exceeds the limit")
            end = _HEADER.size + length
            if len(self._buf) < end:
                return
            body = bytes(self._buf[_HEADER.size : end])
            del self._buf[:end]
            yield _unpack_body(body)

    @property
    def pending(self) -> int:
        """Bytes buffered but not yet part of a complete frame."""
        return len(self._buf)


def _unpack_body(body: bytes) -> dict[str, Any] | BadFrame:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        return BadFrame(f"undecodable frame: {type(exc).__name__}")
    if not isinstance(obj, dict):
        return BadFrame("frame is not a map")
    return obj


# --- Field validation ---------------------------------------------------------------------


def _field(
    obj: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True
) -> Any:
    if name not in obj or obj[name] is None:
        if required:
            raise RemoteProtocolError(f"missing field {name!r}")
        return None
    value = obj[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise RemoteProtocolError(f"field {name!r} must be an integer")
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RemoteProtocolError(f"field {name!r} must be {names}")
    if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
        raise RemoteProtocolError(f"field {name!r} is too long")
    if isinstance(value, list | dict) and len(value) > MAX_LIST_ITEMS:
        raise RemoteProtocolError(f"field {name!r} has too many items")
    return value


def _int(obj: dict[str, Any], name: str, lo: int, hi: int, required: bool = True) -> int | None:
    value = _field(obj, name, int, required)
    if value is not None and not lo <= value <= hi:
        raise RemoteProtocolError(f"field {name!r} out of range {lo}..{hi}")
    return value  # type: ignore[no-any-return]


def _str(obj: dict[str, Any], name: str, required: bool = True) -> str | None:
    return _field(obj, name, str, required)  # type: ignore[no-any-return]


def _str_list(obj: dict[str, Any], name: str) -> tuple[str, ...]:
    value = _field(obj, name, list, required=False) or []
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_STRING_CHARS:
            raise RemoteProtocolError(f"field {name!r} must be a list of strings")
    return tuple(value)


def _str_map(obj: dict[str, Any], name: str) -> dict[str, str]:
    value = _field(obj, name, dict, required=False) or {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise RemoteProtocolError(f"field {name!r} must map strings to strings")
        if len(k) > MAX_STRING_CHARS or len(v) > MAX_STRING_CHARS:
            raise RemoteProtocolError(f"field {name!r} has an oversized entry")
    return dict(value)


def _name(obj: dict[str, Any]) -> str | None:
    name = _str(obj, "name", required=False)
    if name is not None and not NAME_RE.fullmatch(name):
        raise RemoteProtocolError(
            "field 'name' must be 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def _choice(obj: dict[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = _str(obj, name, required=False)
    if value is None:
        return default
    if value not in choices:
        raise RemoteProtocolError(f"field {name!r} must be one of {', '.join(choices)}")
    return value


def _pty_size(obj: dict[str, Any]) -> tuple[int, int] | None:
    value = _field(obj, "pty_size", list, required=False)
    if value is None:
        return None
    if (
        len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not all(1 <= v <= MAX_TERMINAL_DIM for v in value)
    ):
        raise RemoteProtocolError("field 'pty_size' must be [cols, rows] within 1..10000")
    return int(value[0]), int(value[1])


def _identities(obj: dict[str, Any]) -> tuple[tuple[str, str | None], ...]:
    value = _field(obj, "identities", list, required=False) or []
    out: list[tuple[str, str | None]] = []
    for item in value:
        if not isinstance(item, dict):
            raise RemoteProtocolError("field 'identities' must be a list of maps")
        path = _str(item, "path")
        assert path is not None
        out.append((path, _str(item, "passphrase", required=False)))
    return tuple(out)


def _approve_timeout(obj: dict[str, Any]) -> float:
    value = _field(obj, "approve_timeout_s", (int, float), required=False)
    if value is None:
        return 60.0
    if isinstance(value, bool) or not 1 <= value <= 3600:
        raise RemoteProtocolError("field 'approve_timeout_s' out of range 1..3600")
    return float(value)


def _source_roles(obj: dict[str, Any]) -> dict[str, str]:
    roles = _str_map(obj, "source_roles")
    for role in roles.values():
        if role not in ROLES:
            raise RemoteProtocolError(f"field 'source_roles' values must be one of {ROLES}")
    return roles


def _keepalive(obj: dict[str, Any]) -> float:
    value = _field(obj, "keepalive_s", (int, float), required=False)
    if value is None:
        return 50.0
    if isinstance(value, bool) or not 1 <= value <= 3600:
        raise RemoteProtocolError("field 'keepalive_s' out of range 1..3600")
    return float(value)


def _dims(obj: dict[str, Any]) -> tuple[int, int]:
    cols = _int(obj, "cols", 1, MAX_TERMINAL_DIM)
    rows = _int(obj, "rows", 1, MAX_TERMINAL_DIM)
    assert cols is not None and rows is not None
    return cols, rows


# --- Requests (client → daemon) -------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Version handshake; the reply carries the daemon's protocol version."""

    id: int
    version: int


@dataclass(frozen=True)
class CreateSession:
    """Start a command on a PTY and share it through a relay."""

    id: int
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    term: str
    cols: int
    rows: int
    server: str | None
    authorized_keys: tuple[str, ...]
    accept: bool
    known_hosts: str | None
    name: str | None = None
    keepalive_s: float = 50.0
    read_only: bool = False
    force_command: tuple[str, ...] = ()
    size_policy: str = "smallest"
    pty_size: tuple[int, int] | None = None
    quiet: bool = False
    hide_client_ip: bool = False
    identities: tuple[tuple[str, str | None], ...] = ()
    accept_new_host_key: bool = True
    confirmed_host_key: str | None = None
    e2e_only: bool = False
    record: str | None = None
    record_input: bool = False
    #: End the session (or refuse to start it) when the recording cannot be written.
    record_required: bool = False
    approve: bool = False
    approve_timeout_s: float = 60.0
    default_role: str = "typist"
    source_roles: dict[str, str] = field(default_factory=dict)
    #: Input (and output) only while this many moderators are connected (0: unmoderated).
    moderators: int = 0
    on_moderator_leave: str = "pause"
    #: For a ws:// or wss:// relay: the HTTP proxy (``--proxy``) and CA file (``--ca-file``).
    ws_proxy: str | None = None
    ca_file: str | None = None
    #: File transfer offered (``--no-sftp``: not); without asking (``--accept-transfers``).
    sftp: bool = True
    accept_transfers: bool = False
    #: ``ssh -L``: "" (refused), "loopback" or "any"; without asking (``--accept-forwards``).
    allow_forwarding: str = ""
    accept_forwards: bool = False
    #: Browsers may join through the relay's web page (``--web``), for this many seconds.
    web: bool = False
    web_ttl_s: int = 0


#: The longest a web link lives (7 days, as every duration the CLI reads).
MAX_WEB_TTL_S = 7 * 86400


@dataclass(frozen=True)
class Accept:
    """Let joiners in (after the host confirmed the start-up prompt)."""

    id: int
    session: str


@dataclass(frozen=True)
class ListSessions:
    """List every session of the daemon."""

    id: int


@dataclass(frozen=True)
class Info:
    """Describe one session (on a session socket, ``session`` may be omitted)."""

    id: int
    session: str | None


@dataclass(frozen=True)
class Attach:
    """Attach a terminal: the reply opens a stream of output and an exit frame."""

    id: int
    session: str | None
    cols: int
    rows: int
    #: The host's own terminal: if it goes away without detaching, the session ends.
    primary: bool = False
    #: Someone can answer questions there (its input is a terminal: ~y, ~a, ~n).
    answers: bool = True


@dataclass(frozen=True)
class Stop:
    """End a session: the command gets SIGHUP."""

    id: int
    session: str | None


@dataclass(frozen=True)
class Wait:
    """Reply once the last joiner has left, the session ended, or ``timeout_s`` passed."""

    id: int
    session: str | None
    timeout_s: float | None


@dataclass(frozen=True)
class ClientAction:
    """The host acts on one joiner: ``approve``, ``deny``, ``kick`` or ``role``.

    ``client`` may be omitted for approve/deny: the oldest waiting joiner.
    """

    id: int
    action: str
    session: str | None
    client: str | None
    role: str | None = None
    #: For approve: also every later request of the same kind from this joiner.
    everything: bool = False


@dataclass(frozen=True)
class CreateInvite:
    """A join line that works ``uses`` times for ``expires_s`` seconds, maybe one identity."""

    id: int
    session: str | None
    keys: tuple[str, ...]
    label: str
    expires_s: float
    uses: int


@dataclass(frozen=True)
class WebLinkAction:
    """The session's web link (``--web``): ``new`` replaces it, ``revoke`` ends it; either
    way, browsers that joined with the old one are removed."""

    id: int
    session: str | None
    op: str


@dataclass(frozen=True)
class RevokeInvite:
    """Make an invite's join line stop working."""

    id: int
    session: str | None
    code: str


@dataclass(frozen=True)
class Detach:
    """Leave an attached stream on purpose: the session goes on."""

    stream: int


@dataclass(frozen=True)
class Input:
    """Keystrokes from an attached terminal."""

    stream: int
    data: bytes


@dataclass(frozen=True)
class Resize:
    """The attached terminal changed size."""

    stream: int
    cols: int
    rows: int


Request = (
    Hello
    | CreateSession
    | Accept
    | ListSessions
    | Info
    | Attach
    | Stop
    | Wait
    | ClientAction
    | CreateInvite
    | RevokeInvite
    | WebLinkAction
    | Detach
    | Input
    | Resize
)


@dataclass(frozen=True)
class UnknownType:
    """A well-formed message of a type this version does not know."""

    id: int | None
    type: str


def _req_id(obj: dict[str, Any]) -> int:
    value = _int(obj, "id", 0, MAX_ID)
    assert value is not None
    return value


def request_id_of(obj: dict[str, Any]) -> int | None:
    """The ``id`` of a raw message if it has a usable one (to address an error reply)."""
    value = obj.get("id")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
        return value
    return None


def parse_request(obj: dict[str, Any]) -> Request | UnknownType:
    """Validate a decoded message from a client; raises :class:`RemoteProtocolError`."""
    kind = _str(obj, "type")
    if kind == "hello":
        version = _int(obj, "version", 0, 2**31)
        assert version is not None
        return Hello(_req_id(obj), version)
    if kind == "create":
        cols, rows = _dims(obj)
        argv = _str_list(obj, "argv")
        if not argv:
            raise RemoteProtocolError("field 'argv' must name a command")
        return CreateSession(
            id=_req_id(obj),
            argv=argv,
            env=_str_map(obj, "env"),
            cwd=_str(obj, "cwd") or "/",
            term=_str(obj, "term", required=False) or "xterm-256color",
            cols=cols,
            rows=rows,
            server=_str(obj, "server", required=False),
            authorized_keys=_str_list(obj, "authorized_keys"),
            accept=bool(_field(obj, "accept", bool, required=False)),
            known_hosts=_str(obj, "known_hosts", required=False),
            name=_name(obj),
            keepalive_s=_keepalive(obj),
            read_only=bool(_field(obj, "read_only", bool, required=False)),
            force_command=_str_list(obj, "force_command"),
            size_policy=_choice(obj, "size_policy", SIZE_POLICIES, "smallest"),
            pty_size=_pty_size(obj),
            quiet=bool(_field(obj, "quiet", bool, required=False)),
            hide_client_ip=bool(_field(obj, "hide_client_ip", bool, required=False)),
            identities=_identities(obj),
            accept_new_host_key=_field(obj, "accept_new_host_key", bool, required=False)
            is not False,
            confirmed_host_key=_str(obj, "confirmed_host_key", required=False),
            e2e_only=bool(_field(obj, "e2e_only", bool, required=False)),
            record=_str(obj, "record", required=False),
            record_input=bool(_field(obj, "record_input", bool, required=False)),
            record_required=bool(_field(obj, "record_required", bool, required=False)),
            approve=bool(_field(obj, "approve", bool, required=False)),
            approve_timeout_s=_approve_timeout(obj),
            default_role=_choice(obj, "default_role", ROLES, "typist"),
            source_roles=_source_roles(obj),
            moderators=_int(obj, "moderators", 0, 100, required=False) or 0,
            on_moderator_leave=_choice(obj, "on_moderator_leave", MODERATOR_LEAVE, "pause"),
            ws_proxy=_str(obj, "ws_proxy", required=False),
            ca_file=_str(obj, "ca_file", required=False),
            sftp=_field(obj, "sftp", bool, required=False) is not False,
            accept_transfers=bool(_field(obj, "accept_transfers", bool, required=False)),
            allow_forwarding=_choice(obj, "allow_forwarding", FORWARDING_MODES, ""),
            accept_forwards=bool(_field(obj, "accept_forwards", bool, required=False)),
            web=bool(_field(obj, "web", bool, required=False)),
            web_ttl_s=_int(obj, "web_ttl_s", 0, MAX_WEB_TTL_S, required=False) or 0,
        )
    if kind == "accept":
        return Accept(_req_id(obj), _str(obj, "session") or "")
    if kind == "list":
        return ListSessions(_req_id(obj))
    if kind == "info":
        return Info(_req_id(obj), _str(obj, "session", required=False))
    if kind == "attach":
        cols, rows = _dims(obj)
        return Attach(
            _req_id(obj),
            _str(obj, "session", required=False),
            cols,
            rows,
            primary=bool(_field(obj, "primary", bool, required=False)),
            answers=_field(obj, "answers", bool, required=False) is not False,
        )
    if kind == "stop":
        return Stop(_req_id(obj), _str(obj, "session", required=False))
    if kind == "wait":
        timeout = _field(obj, "timeout_s", (int, float), required=False)
        if isinstance(timeout, bool) or (timeout is not None and not 0 < timeout <= MAX_WAIT_S):
            raise RemoteProtocolError(f"field 'timeout_s' out of range 0..{MAX_WAIT_S}")
        return Wait(_req_id(obj), _str(obj, "session", required=False), timeout)
    if kind in ("approve", "deny", "kick", "role"):
        client = _str(obj, "client", required=kind in ("kick", "role"))
        role = _choice(obj, "role", ROLES, "typist") if kind == "role" else None
        if kind == "role" and obj.get("role") is None:
            raise RemoteProtocolError("missing field 'role'")
        return ClientAction(
            _req_id(obj),
            kind,
            _str(obj, "session", required=False),
            client,
            role,
            everything=kind == "approve" and bool(_field(obj, "everything", bool, required=False)),
        )
    if kind == "invite":
        expires = _field(obj, "expires_s", (int, float), required=False)
        if expires is None:
            expires = 3600
        if isinstance(expires, bool) or not 1 <= expires <= MAX_WAIT_S:
            raise RemoteProtocolError(f"field 'expires_s' out of range 1..{MAX_WAIT_S}")
        uses = _int(obj, "uses", 1, 1000, required=False) or 1
        return CreateInvite(
            _req_id(obj),
            _str(obj, "session", required=False),
            _str_list(obj, "keys"),
            _str(obj, "label", required=False) or "",
            float(expires),
            uses,
        )
    if kind == "web":
        op = _choice(obj, "op", ("new", "revoke"), "new")
        return WebLinkAction(_req_id(obj), _str(obj, "session", required=False), op)
    if kind == "revoke":
        code = _str(obj, "code") or ""
        return RevokeInvite(_req_id(obj), _str(obj, "session", required=False), code)
    if kind == "detach":
        stream = _int(obj, "stream", 0, MAX_ID)
        assert stream is not None
        return Detach(stream)
    if kind == "input":
        stream = _int(obj, "stream", 0, MAX_ID)
        data = _field(obj, "data", bytes)
        if len(data) > MAX_DATA_CHUNK_BYTES:
            raise RemoteProtocolError("input chunk too large")
        assert stream is not None
        return Input(stream, data)
    if kind == "resize":
        stream = _int(obj, "stream", 0, MAX_ID)
        cols, rows = _dims(obj)
        assert stream is not None
        return Resize(stream, cols, rows)
    assert kind is not None
    return UnknownType(request_id_of(obj), kind[:64])


# --- Replies and stream frames (daemon → client) -----------------------------------------


def ok(req_id: int, **fields: Any) -> dict[str, Any]:
    """A success reply to request ``req_id``."""
    return {"type": "ok", "id": req_id, **fields}


def error(
    req_id: int | None, code: str, message: str, details: dict[str, str] | None = None
) -> dict[str, Any]:
    """An error reply; ``req_id`` is None when the request had no usable id."""
    reply: dict[str, Any] = {"type": "error", "id": req_id, "code": code, "message": message}
    if details:
        reply["details"] = details
    return reply


def output(stream: int, data: bytes) -> dict[str, Any]:
    """Terminal output for an attached client."""
    return {"type": "output", "stream": stream, "data": data}


def waiting(stream: int, count: int) -> dict[str, Any]:
    """How many joiners wait for the host's approval (sent when it changes): while none do,
    the client passes ``~y`` and ``~n`` to the program as typed."""
    return {"type": "waiting", "stream": stream, "count": count}


def exited(stream: int, status: int) -> dict[str, Any]:
    """The session's command ended with ``status``; the stream is over."""
    return {"type": "exit", "stream": stream, "status": status}


def chunks(data: bytes, size: int = MAX_DATA_CHUNK_BYTES) -> Iterator[bytes]:
    """Split terminal data into chunks that fit a frame."""
    for start in range(0, len(data), size):
        yield data[start : start + size]
