"""Upstream upterm wire formats: names, banners, protobuf payloads, proofs, tokens, certificates.

Sans-I/O: every function here takes bytes and values and returns bytes and values; time is an
argument. The facts come from the upstream protocol (see ``shared/reference/upterm-wire*.md``);
golden byte vectors in ``tests/test_wire.py`` pin each format.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import struct
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import DecodeError, Message

from upterm import sshcert
from upterm.banners import CLIENT_CLIENT_VERSION as CLIENT_CLIENT_VERSION
from upterm.banners import HOST_CLIENT_VERSION as HOST_CLIENT_VERSION
from upterm.banners import HOST_SERVER_VERSION as HOST_SERVER_VERSION
from upterm.banners import RELAY_VERSION_PREFIX as RELAY_VERSION_PREFIX
from upterm.errors import RemoteProtocolError
from upterm.proto import server_pb2

# --- Names and banners -------------------------------------------------------------------

# The banners (upterm.banners, light for upterm proxy's fast path) are names of this module.

CREATE_SESSION_REQUEST = "upterm-create-session@upterm.dev"
STREAMLOCAL_FORWARD_REQUEST = "streamlocal-forward@openssh.com"
CANCEL_STREAMLOCAL_FORWARD_REQUEST = "cancel-streamlocal-forward@openssh.com"
FORWARDED_STREAMLOCAL_CHANNEL = "forwarded-streamlocal@openssh.com"
KEEPALIVE_REQUEST = "keepalive@openssh.com"
#: Ours, beyond upstream: a host tells the relay which invite codes its session honours (as
#: digests), so the relay lets an invite token past its key check only for those.
INVITES_REQUEST = "upterm-invites@upterm.dev"
#: Most invites one session may declare to the relay.
MAX_INVITES = 256
AUTH_REQUEST_EXTENSION = "upterm-auth-request"
#: Ours: a host lets browsers join through the relay's web page (``upterm host --web``): it
#: declares a web link's id, the digest of its secret and when it expires.
WEB_REQUEST = "upterm-web@upterm.dev"
#: Ours: the guest-certificate extension carrying the web credential a browser presented,
#: so the host checks the secret itself (the relay keeps only its digest).
WEB_EXTENSION = "upterm-web@upterm.dev"
#: Ours: host → relay channel request on a web joiner's channel: its role now.
WEB_ROLE_REQUEST = "upterm-role@upterm.dev"
#: Ours: host → relay, on a web joiner's channel: why it is being removed (channel requests
#: are not held by flow control, so the page is told even when it is far behind).
WEB_REMOVED_REQUEST = "upterm-removed@upterm.dev"
#: Ours: a host that takes a joiner's terminal data directly on the tunnel forwards this
#: path (the session id followed by it) beside its session's. The relay then opens a
#: forwarded-streamlocal channel to it per joiner terminal, writes DIRECT_COOKIE_BYTES of
#: a fresh random cookie first, and names that cookie in the inner session channel's
#: DIRECT_ENV; from then on the terminal's bytes skip the inner SSH layer (which still
#: authenticates the joiner and carries every request, the exit status and the close).
DIRECT_PATH_SUFFIX = "/direct@upterm.dev"
DIRECT_ENV = "UPTERM_DIRECT_CHANNEL"
DIRECT_COOKIE_BYTES = 16
ADMIN_SOCKET_ENV = "UPTERM_ADMIN_SOCKET"
#: Named sessions export their name to the command (upstream v0.38).
SESSION_NAME_ENV = "UPTERM_SESSION_NAME"

#: Texts the relay shows guests; upstream pins them as a wire contract (``upterm join``
#: matches the "no host" prefix).
BANNER_NO_HOST_PREFIX = "upterm: no host is connected for session "
BANNER_NO_HOST_FORMAT = (
    BANNER_NO_HOST_PREFIX + "{session_id} right now. If it is reconnecting, this same ssh "
    "command will work again once it's back. Try again in a few seconds.\n"
)
BANNER_LOOKUP_FAILED = "upterm: the relay can't look up sessions right now. Try again shortly.\n"
#: Ours: an invite token whose code the host has not declared (revoked, expired or unknown).
BANNER_UNKNOWN_INVITE = (
    "upterm: this invite is not valid for session {session_id} (revoked, expired or never "
    "made); ask the host for a new join line\n"
)
#: Ours: a joiner key that the session's authorized keys do not list (said once per
#: connection, at the first such key: OpenSSH goes on to try the others it has).
BANNER_KEY_NOT_ALLOWED = (
    "upterm: session {session_id} does not let in key {fingerprint}; only keys the host "
    "authorized may join (ssh -i the key they allowed)\n"
)
#: Ours (relay and host alike): what a joiner asks for and never gets, and why.
REMOTE_FORWARDING_REFUSED = (
    "remote forwarding (ssh -R) is never offered: a joiner's listener would open a door "
    "into the host's machine"
)
AGENT_FORWARDING_REFUSED = (
    "agent forwarding (ssh -A) is never offered: others share this terminal, and so would your keys"
)
X11_FORWARDING_REFUSED = "X11 forwarding (ssh -X, -Y) is never offered in a shared terminal"
UPSTREAM_UNAVAILABLE = "upstream unavailable"
UPSTREAM_AUTH_FAILED = "ssh: unable to authenticate with the upstream"
UPSTREAM_HOST_KEY_MISMATCH = "ssh: host key mismatch"
REFUSED_PROOF = "upterm: session proof refused"
SUPERSEDED = "upterm: superseded by a newer registration"

#: Guest certificates are valid this long either side of "now" (upstream's clock-skew bound).
CERT_CLOCK_SKEW_S = 60
SESSION_SECRET_LEN = 16
SESSION_ID_LEN = 20
BASE62_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_SESSION_ID_DOMAIN = b"upterm-session-id-v1"
_PROOF_DOMAIN = b"upterm-session-v1"
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9]{1,64}")
_RELAY_BANNER_RE = re.compile(r"^SSH-2\.0-uptermd-(.+)$")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+={0,2}")
#: Longest SSH user name we even look at; anything longer is refused before decoding.
MAX_TOKEN_LEN = 512


def relay_banner(version: str) -> str:
    """Return the relay's SSH banner for ``version`` (``SSH-2.0-uptermd-<version>``)."""
    return RELAY_VERSION_PREFIX + version


def parse_relay_banner(banner: str) -> str | None:
    """Return the version inside a relay banner, or None if it is not an uptermd banner."""
    match = _RELAY_BANNER_RE.match(banner.strip())
    return match.group(1) if match else None


# --- SSH wire primitives ------------------------------------------------------------------


def ssh_string(data: bytes) -> bytes:
    """Encode ``data`` as an SSH ``string`` (uint32 big-endian length, then the bytes)."""
    return struct.pack(">I", len(data)) + data


def ssh_uint32(value: int) -> bytes:
    """Encode an SSH ``uint32`` (4 bytes big-endian)."""
    return struct.pack(">I", value)


def ssh_uint64(value: int) -> bytes:
    """Encode an SSH ``uint64`` (8 bytes big-endian)."""
    return struct.pack(">Q", value)


def read_ssh_string(data: bytes, offset: int = 0) -> tuple[bytes, int]:
    """Read one SSH ``string`` at ``offset``; return it and the offset after it."""
    if len(data) < offset + 4:
        raise RemoteProtocolError("truncated SSH string length")
    (length,) = struct.unpack_from(">I", data, offset)
    end = offset + 4 + length
    if len(data) < end:
        raise RemoteProtocolError("truncated SSH string")
    return data[offset + 4 : end], end


# --- Keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKey:
    """A public key in SSH wire form, with its algorithm name and optional comment."""

    blob: bytes
    comment: str = ""
    #: The authorized_keys options written before the key type (see upterm.keyopts).
    options: str = ""

    @property
    def algorithm(self) -> str:
        """The key's algorithm, the first SSH string of its wire blob."""
        name, _ = read_ssh_string(self.blob)
        return name.decode("ascii", "replace")

    def authorized_key_line(self) -> bytes:
        """Return ``b"<alg> <base64>\\n"``: upstream's ``MarshalAuthorizedKey`` form."""
        return self.algorithm.encode() + b" " + base64.b64encode(self.blob) + b"\n"

    @property
    def fingerprint(self) -> str:
        """OpenSSH SHA256 fingerprint (``SHA256:`` + unpadded standard base64)."""
        return fingerprint_sha256(self.blob)


def fingerprint_sha256(blob: bytes) -> str:
    """Return the OpenSSH SHA256 fingerprint of a public key wire blob."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _split_key_tokens(line: str) -> list[str]:
    """Split an authorized_keys line on blanks, keeping double-quoted option values whole."""
    tokens: list[str] = []
    cur: list[str] = []
    quoted = False
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and quoted and i + 1 < len(line):
            cur.append(line[i : i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if ch in " \t" and not quoted:
            if cur:
                tokens.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
        i += 1
    if cur:
        tokens.append("".join(cur))
    return tokens


def parse_public_key_line(line: str | bytes) -> PublicKey | None:
    """Parse one authorized_keys / ``.keys`` line; None for blank lines and comments.

    Options before the key type (``from="..."``, ``command="..."``) are kept as written in
    ``options``; :mod:`upterm.keyopts` says what they mean. Raises
    :class:`RemoteProtocolError` for a line that is not a key.
    """
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    tokens = _split_key_tokens(text)
    for idx in range(len(tokens) - 1):
        alg, b64 = tokens[idx], tokens[idx + 1]
        try:
            blob = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            continue
        try:
            inner_alg, _ = read_ssh_string(blob)
        except RemoteProtocolError:
            continue
        if inner_alg.decode("ascii", "replace") == alg:
            return PublicKey(blob, " ".join(tokens[idx + 2 :]), " ".join(tokens[:idx]))
    raise RemoteProtocolError(f"not an SSH public key line: {text[:60]!r}")


def parse_public_keys(text: str | bytes) -> list[PublicKey]:
    """Parse every key of an authorized_keys document (raises on a malformed line)."""
    raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    keys: list[PublicKey] = []
    for line in raw.splitlines():
        key = parse_public_key_line(line)
        if key is not None:
            keys.append(key)
    return keys


# --- Protobuf payloads --------------------------------------------------------------------

_M = TypeVar("_M", bound=Message)


def _decode_pb(cls: type[_M], payload: bytes, what: str) -> _M:
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, ValueError) as exc:
        raise RemoteProtocolError(f"malformed {what}: {exc}") from exc
    return msg


@dataclass(frozen=True)
class CreateSessionRequest:
    """Payload of ``upterm-create-session@upterm.dev`` (host → relay)."""

    host_user: str
    host_public_keys: tuple[bytes, ...] = ()
    client_authorized_keys: tuple[bytes, ...] = ()
    session_secret: bytes = b""
    generation: int = 0
    host_key_proof: bytes = b""

    def encode(self) -> bytes:
        """Serialise to the upstream protobuf bytes."""
        return server_pb2.CreateSessionRequest(
            hostUser=self.host_user,
            hostPublicKeys=list(self.host_public_keys),
            clientAuthorizedKeys=list(self.client_authorized_keys),
            sessionSecret=self.session_secret,
            generation=self.generation,
            hostKeyProof=self.host_key_proof,
        ).SerializeToString()

    @classmethod
    def decode(cls, payload: bytes) -> CreateSessionRequest:
        """Parse upstream protobuf bytes; raises :class:`RemoteProtocolError` if malformed."""
        m = _decode_pb(server_pb2.CreateSessionRequest, payload, "create-session request")
        return cls(
            host_user=m.hostUser,
            host_public_keys=tuple(m.hostPublicKeys),
            client_authorized_keys=tuple(m.clientAuthorizedKeys),
            session_secret=m.sessionSecret,
            generation=m.generation,
            host_key_proof=m.hostKeyProof,
        )


@dataclass(frozen=True)
class CreateSessionResponse:
    """Success payload of ``upterm-create-session@upterm.dev`` (relay → host)."""

    session_id: str
    node_addr: str
    ssh_user: str
    session_key_redial: bool = False

    def encode(self) -> bytes:
        """Serialise to the upstream protobuf bytes."""
        return server_pb2.CreateSessionResponse(
            sessionID=self.session_id,
            nodeAddr=self.node_addr,
            ssh_user=self.ssh_user,
            sessionKeyRedial=self.session_key_redial,
        ).SerializeToString()

    @classmethod
    def decode(cls, payload: bytes) -> CreateSessionResponse:
        """Parse upstream protobuf bytes; raises :class:`RemoteProtocolError` if malformed."""
        m = _decode_pb(server_pb2.CreateSessionResponse, payload, "create-session response")
        return cls(m.sessionID, m.nodeAddr, m.ssh_user, m.sessionKeyRedial)


@dataclass(frozen=True)
class AuthRequest:
    """What the relay tells the host about a guest, inside the guest certificate."""

    client_version: str
    remote_addr: str
    authorized_key: bytes
    local_addr: str = ""

    def encode(self) -> bytes:
        """Serialise to the upstream protobuf bytes."""
        return server_pb2.AuthRequest(
            client_version=self.client_version,
            remote_addr=self.remote_addr,
            authorized_key=self.authorized_key,
            local_addr=self.local_addr,
        ).SerializeToString()

    @classmethod
    def decode(cls, payload: bytes) -> AuthRequest:
        """Parse upstream protobuf bytes; raises :class:`RemoteProtocolError` if malformed."""
        m = _decode_pb(server_pb2.AuthRequest, payload, "auth request")
        return cls(m.client_version, m.remote_addr, m.authorized_key, m.local_addr)

    def public_key(self) -> PublicKey:
        """The guest's own key, parsed from its authorized_keys line."""
        key = parse_public_key_line(self.authorized_key)
        if key is None:
            raise RemoteProtocolError("auth request carries no key")
        return key


# --- Session identity: derived ids and proofs ---------------------------------------------


def new_session_secret() -> bytes:
    """A fresh 16-byte per-session secret."""
    return secrets.token_bytes(SESSION_SECRET_LEN)


def random_session_id() -> str:
    """A random 20-character ``[A-Za-z0-9]`` id, for hosts that give no proof (legacy)."""
    return "".join(secrets.choice(BASE62_ALPHABET) for _ in range(SESSION_ID_LEN))


def _base62_lsd_first(digest: bytes, length: int) -> str:
    n = int.from_bytes(digest, "big")
    out = []
    for _ in range(length):
        n, d = divmod(n, 62)
        out.append(BASE62_ALPHABET[d])
    return "".join(out)


def derive_session_id(session_key_blob: bytes, secret: bytes) -> str:
    """The session id a proven host gets: base62 of SHA-256 over the key blob and secret."""
    material = ssh_string(_SESSION_ID_DOMAIN) + ssh_string(session_key_blob) + ssh_string(secret)
    return _base62_lsd_first(hashlib.sha256(material).digest(), SESSION_ID_LEN)


def proof_payload(ssh_session_id: bytes, secret: bytes, generation: int) -> bytes:
    """Bytes the session key signs to prove it owns a registration on this connection."""
    return (
        ssh_string(_PROOF_DOMAIN)
        + ssh_string(ssh_session_id)
        + ssh_string(secret)
        + ssh_uint64(generation)
    )


def check_proof_fields(req: CreateSessionRequest) -> PublicKey:
    """Validate the shape of a proven registration; return the single session key.

    The signature itself is checked by the caller, which holds the connection's session id.
    """
    if len(req.host_public_keys) != 1:
        raise RemoteProtocolError(
            f"{REFUSED_PROOF}: a proof needs exactly one host key, got {len(req.host_public_keys)}"
        )
    if len(req.session_secret) != SESSION_SECRET_LEN:
        raise RemoteProtocolError(f"{REFUSED_PROOF}: the session secret must be 16 bytes")
    if req.generation < 1:
        raise RemoteProtocolError(f"{REFUSED_PROOF}: generation must be at least 1")
    try:
        key = parse_public_key_line(req.host_public_keys[0])
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"{REFUSED_PROOF}: {exc}") from exc
    if key is None:
        raise RemoteProtocolError(f"{REFUSED_PROOF}: the host key is empty")
    return key


# --- Tokens (the joiner's SSH user name) --------------------------------------------------


def encode_token(session_id: str, node_addr: str) -> str:
    """Embedded routing token: ``SESSIONID:base64url(node_addr)`` with ``=`` padding."""
    return session_id + ":" + base64.urlsafe_b64encode(node_addr.encode()).decode()


@dataclass(frozen=True)
class Token:
    """A decoded joiner user name: the session id and, if embedded, the owning node.

    Ours, beyond upstream: ``SESSIONID+INVITE[:node]`` carries an invite code, which only
    the host checks (upstream relays do not route such tokens).
    """

    session_id: str
    node_addr: str | None = field(default=None)
    invite: str | None = field(default=None)


def with_invite(token: str, code: str) -> str:
    """The token of an invite: the code after the session id, before the node part."""
    sid, sep, rest = token.partition(":")
    return f"{sid}+{code}{sep}{rest}"


def invite_digest(code: str) -> bytes:
    """What the relay keeps of an invite code: its SHA-256 (the code itself stays with the host)."""
    return hashlib.sha256(b"upterm-invite-v1\0" + code.encode()).digest()


# --- Web links (ours) ---------------------------------------------------------------------

#: A web credential: ``WEBID.SECRET``, base64url without padding (16 and 32 random bytes).
#: The id finds the session at the relay; neither part is the SSH token.
_WEB_CREDENTIAL_RE = re.compile(r"([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})")
#: The longest host label a web registration may carry (shown on the page's banner).
MAX_WEB_LABEL = 64


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class WebCredential:
    """What a web link carries after ``#``: which session (``web_id``) and its secret."""

    web_id: str
    secret: str

    @classmethod
    def new(cls) -> WebCredential:
        """A fresh credential (128-bit id, 256-bit secret)."""
        return cls(_b64url(secrets.token_bytes(16)), _b64url(secrets.token_bytes(32)))

    @classmethod
    def parse(cls, text: str) -> WebCredential | None:
        """The credential in ``text``, or None when it is not one (never raises)."""
        m = _WEB_CREDENTIAL_RE.fullmatch(text)
        return cls(m.group(1), m.group(2)) if m else None

    def __str__(self) -> str:
        return f"{self.web_id}.{self.secret}"

    def digest(self) -> bytes:
        """What the relay keeps: SHA-256 of the secret, bound to the id."""
        return web_digest(self.web_id, self.secret)


def web_digest(web_id: str, secret: str) -> bytes:
    """SHA-256 over a web link's id and secret (domain-separated)."""
    return hashlib.sha256(f"upterm-web-v1\0{web_id}\0{secret}".encode()).digest()


@dataclass(frozen=True)
class WebRegistration:
    """Payload of ``upterm-web@upterm.dev`` (host → relay). An empty ``web_id`` withdraws the
    session's web link (revoked); the relay answers with its page's base URL."""

    session_id: str
    web_id: str
    digest: bytes
    expires: int
    host_label: str

    def encode(self) -> bytes:
        """string sid, string web id, string digest, uint64 expires, string label."""
        return (
            ssh_string(self.session_id.encode())
            + ssh_string(self.web_id.encode())
            + ssh_string(self.digest)
            + struct.pack(">Q", self.expires)
            + ssh_string(self.host_label.encode())
        )

    @classmethod
    def decode(cls, payload: bytes) -> WebRegistration:
        """Parse and check; raises :class:`RemoteProtocolError` if malformed."""
        try:
            raw_sid, off = read_ssh_string(payload)
            raw_id, off = read_ssh_string(payload, off)
            digest, off = read_ssh_string(payload, off)
            if len(payload) < off + 8:
                raise RemoteProtocolError("web: truncated expiry")
            (expires,) = struct.unpack_from(">Q", payload, off)
            raw_label, off = read_ssh_string(payload, off + 8)
            sid, web_id = raw_sid.decode("ascii"), raw_id.decode("ascii")
            label = raw_label.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError("web: a field is not text") from exc
        if off != len(payload):
            raise RemoteProtocolError("web: trailing bytes")
        if not _SESSION_ID_RE.fullmatch(sid):
            raise RemoteProtocolError("web: malformed session id")
        if web_id and (
            not re.fullmatch(r"[A-Za-z0-9_-]{22}", web_id) or len(digest) != 32 or not expires
        ):
            raise RemoteProtocolError("web: malformed link")
        if len(label) > MAX_WEB_LABEL or not label.isprintable():
            raise RemoteProtocolError("web: bad host label")
        return cls(sid, web_id, digest, expires, label)


def encode_invites(session_id: str, codes: list[str] | tuple[str, ...]) -> bytes:
    """Payload of ``upterm-invites@upterm.dev``: string session id, uint32 n, n digests."""
    digests = [invite_digest(c) for c in codes]
    return (
        ssh_string(session_id.encode())
        + struct.pack(">I", len(digests))
        + b"".join(ssh_string(d) for d in digests)
    )


def decode_invites(payload: bytes) -> tuple[str, frozenset[bytes]]:
    """Parse an ``upterm-invites@upterm.dev`` payload; :class:`RemoteProtocolError` if bad."""
    raw_sid, off = read_ssh_string(payload)
    try:
        sid = raw_sid.decode("ascii")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("invites: session id is not ASCII") from exc
    if not _SESSION_ID_RE.fullmatch(sid):
        raise RemoteProtocolError("invites: malformed session id")
    if len(payload) < off + 4:
        raise RemoteProtocolError("invites: truncated count")
    (count,) = struct.unpack_from(">I", payload, off)
    off += 4
    if count > MAX_INVITES:
        raise RemoteProtocolError(f"invites: more than {MAX_INVITES}")
    digests: set[bytes] = set()
    for _ in range(count):
        digest, off = read_ssh_string(payload, off)
        if len(digest) != hashlib.sha256().digest_size:
            raise RemoteProtocolError("invites: a digest is not 32 bytes")
        digests.add(digest)
    if off != len(payload):
        raise RemoteProtocolError("invites: trailing bytes")
    return sid, frozenset(digests)


def decode_token(user: str) -> Token:
    """Decode ``SESSIONID[:base64url(node)]``; raises :class:`RemoteProtocolError` if bad."""
    if len(user) > MAX_TOKEN_LEN:
        raise RemoteProtocolError("SSH user name too long to be a session token")
    sid, sep, node_b64 = user.partition(":")
    sid, plus, invite = sid.partition("+")
    if not _SESSION_ID_RE.fullmatch(sid) or (plus and not _SESSION_ID_RE.fullmatch(invite)):
        raise RemoteProtocolError("SSH user name is not a session token")
    code = invite if plus else None
    if not sep:
        return Token(sid, invite=code)
    # Strict, as Go's base64.URLEncoding: URL alphabet, '=' padding, nothing else.
    if not _B64URL_RE.fullmatch(node_b64) or len(node_b64) % 4:
        raise RemoteProtocolError("session token has a malformed node address")
    try:
        node = base64.urlsafe_b64decode(node_b64.encode("ascii")).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise RemoteProtocolError("session token has a malformed node address") from exc
    if not node or not node.isprintable():
        raise RemoteProtocolError("session token has a malformed node address")
    return Token(sid, node, code)


# --- Guest certificates (relay → host) ----------------------------------------------------


def _cert_line(blob: bytes) -> bytes:
    alg, _ = read_ssh_string(blob)
    return alg + b" " + base64.b64encode(blob)


def build_guest_certificate(
    relay_key: ed25519.Ed25519PrivateKey,
    principal: str,
    key_id: bytes,
    auth: AuthRequest,
    now: int,
    web: str = "",
) -> bytes:
    """Mint the user certificate the relay presents to a host for one guest.

    As upstream: the certified key is the relay's own key, self-signed, valid ``now ± 60 s``,
    principal = the guest's token, one extension ``upterm-auth-request`` holding the protobuf
    :class:`AuthRequest` (wrapped in an inner SSH string, as Go and OpenSSH do).
    A browser's web credential (ours) rides in a second extension, ``upterm-web@upterm.dev``.
    Returns the OpenSSH one-line form.
    """
    extensions = {AUTH_REQUEST_EXTENSION.encode(): auth.encode()}
    if web:
        extensions[WEB_EXTENSION.encode()] = web.encode()
    blob = sshcert.build(
        relay_key,
        relay_key.public_key(),
        cert_type=sshcert.CERT_TYPE_USER,
        key_id=key_id,
        principals=[principal.encode()],
        valid_after=max(0, now - CERT_CLOCK_SKEW_S),
        valid_before=now + CERT_CLOCK_SKEW_S,
        extensions=extensions,
    )
    return _cert_line(blob)


@dataclass(frozen=True)
class GuestCertificate:
    """The parts of a relay-minted guest certificate the host checks."""

    signer_blob: bytes
    certified_blob: bytes
    principals: tuple[str, ...]
    key_id: bytes
    valid_after: int
    valid_before: int
    auth: AuthRequest
    #: The web credential a browser presented ("" for an SSH joiner).
    web: str = ""


def verify_guest_certificate(
    blob: bytes, trusted_signer: bytes, principal: str, now: int
) -> GuestCertificate:
    """Check a guest certificate completely and return what it says.

    Verified: that the signer is exactly ``trusted_signer`` (the relay key the host pinned;
    never a self-signed or foreign certificate), the signature, that it is a user certificate
    naming ``principal``, that ``now`` is inside its validity window, and that it carries a
    well-formed ``upterm-auth-request``. Raises :class:`RemoteProtocolError`.
    """
    cert = sshcert.parse(blob)
    if cert.signer_blob != trusted_signer:
        raise RemoteProtocolError("certificate not signed by the pinned relay key")
    if cert.cert_type != sshcert.CERT_TYPE_USER:
        raise RemoteProtocolError("not a user certificate")
    principals = tuple(p.decode("utf-8", "replace") for p in cert.principals)
    if principal not in principals:
        raise RemoteProtocolError("certificate does not name this user")
    if not cert.valid_after <= now < cert.valid_before:
        raise RemoteProtocolError("certificate is not valid now")
    ext = cert.extensions.get(AUTH_REQUEST_EXTENSION.encode())
    if ext is None:
        raise RemoteProtocolError(f"certificate has no {AUTH_REQUEST_EXTENSION} extension")
    return GuestCertificate(
        signer_blob=cert.signer_blob,
        certified_blob=cert.key_blob,
        principals=principals,
        key_id=cert.key_id,
        valid_after=cert.valid_after,
        valid_before=cert.valid_before,
        auth=AuthRequest.decode(ext),
        web=cert.extensions.get(WEB_EXTENSION.encode(), b"").decode("ascii", "replace"),
    )


def sign_proof(session_key: ed25519.Ed25519PrivateKey, payload: bytes) -> bytes:
    """SSH-encoded ed25519 signature (``string "ssh-ed25519", string sig``) of a proof payload."""
    return ssh_string(b"ssh-ed25519") + ssh_string(session_key.sign(payload))


def build_host_certificate(relay_key: ed25519.Ed25519PrivateKey, principals: list[str]) -> bytes:
    """A relay host certificate signed by the relay's own key (upstream: KeyId ``uptermd``).

    Valid forever and for ``principals``; hosts that list the relay key as an
    ``@cert-authority`` for those names accept it without a per-address known_hosts line.
    """
    blob = sshcert.build(
        relay_key,
        relay_key.public_key(),
        cert_type=sshcert.CERT_TYPE_HOST,
        key_id=b"uptermd",
        principals=[p.encode() for p in principals],
        valid_after=0,
        valid_before=2**64 - 1,
        extensions={},
    )
    return _cert_line(blob)
