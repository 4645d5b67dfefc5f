"""The one place that touches asyncssh internals.

asyncssh (checked on 2.14 … 2.24) offers no public API for four things upterm needs:
sending a global request and reading its reply payload, answering a custom global request
(with a failure *text*, as Go peers send), reading the ``upterm-auth-request`` extension of a
client certificate, and granting the permissions such a certificate does not list. Each is
done here, in a few lines each, and tested directly by ``tests/test_sshcompat.py`` so that an
asyncssh upgrade that breaks one fails loudly. Everything else in upterm uses public API only.
See ``shared/reference/asyncssh-notes.md`` for why each mechanism is shaped as it is.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncssh
from asyncssh.constants import (
    MSG_GLOBAL_REQUEST,
    MSG_IGNORE,
    MSG_KEXINIT,
    MSG_REQUEST_FAILURE,
    MSG_REQUEST_SUCCESS,
)
from asyncssh.misc import map_handler_name

log = logging.getLogger(__name__)

#: The permissions uptermd-style guest certificates do not carry but a joiner may need
#: (asyncssh refuses a PTY, or an ``ssh -L`` channel, without them). Whether a joiner may
#: forward is then the host's policy alone (``InnerServer.connection_requested``), as it is
#: for end-to-end joiners, whose plain keys carry no permissions at all.
_GUEST_PERMISSIONS = {"permit-pty": True, "permit-port-forwarding": True}


#: Cipher preference for the connections upterm makes itself (host→relay, relay→host inner
#: SSH): AES-GCM is one call into OpenSSL per packet, where asyncssh's ChaCha20-Poly1305
#: needs several; every algorithm stays available for peers that want another.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)


@dataclass(frozen=True)
class GlobalReply:
    """The answer to a global request: success with a payload, or failure with a text."""

    ok: bool
    payload: bytes = b""


def is_closed(conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> bool:
    """True once the connection is closing or closed (2.10 has no ``is_closed``)."""
    checker = getattr(conn, "is_closed", None)
    if checker is not None:
        return bool(checker())
    return getattr(conn, "_transport", None) is None


def session_id(conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> bytes:
    """The SSH session identifier: the exchange hash H of the connection's first key exchange.

    Upstream proofs sign over it, so a proof captured on one connection is useless on another.
    """
    sid = conn._session_id
    if not isinstance(sid, bytes) or not sid:
        raise RuntimeError("SSH session id not yet known (key exchange incomplete)")
    return sid


async def global_request(
    conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection,
    name: str,
    payload: bytes,
) -> GlobalReply:
    """Send a global request with ``want_reply`` and return its reply payload or failure text.

    Raises :class:`asyncssh.ConnectionLost` when the connection is gone: asyncssh reports
    that as an empty failure, which would otherwise look like a bare refusal.
    """
    pkttype, packet = await conn._make_global_request(name.encode(), payload)
    data = bytes(packet.get_remaining_payload())
    if pkttype == MSG_REQUEST_SUCCESS:
        return GlobalReply(True, data)
    if not data and is_closed(conn):
        raise asyncssh.ConnectionLost(f"connection closed during {name}")
    assert pkttype == MSG_REQUEST_FAILURE
    return GlobalReply(False, data)


def _answer(conn: Any, reply: GlobalReply) -> None:
    """Answer the global request at the head of the queue exactly once."""
    if is_closed(conn) or not conn._global_request_queue:
        return
    if reply.ok:
        # ``b''`` is falsy and would be sent as a failure by asyncssh; True means "no payload".
        conn._report_global_response(reply.payload or True)
        return
    _, _, want_reply = conn._global_request_queue.pop(0)
    if want_reply:
        conn.send_packet(MSG_REQUEST_FAILURE, reply.payload)
    if conn._global_request_queue:
        conn._service_next_global_request()


def install_global_request_handler(
    conn: asyncssh.SSHServerConnection | asyncssh.SSHClientConnection,
    name: str,
    handler: Callable[[bytes], Awaitable[GlobalReply]],
) -> None:
    """Serve global request ``name`` on this one connection with an async ``handler``.

    asyncssh answers requests one at a time in arrival order; the handler's reply is sent
    exactly once, even if the handler raises (then as a failure "internal error"), so later
    requests (keepalives, forwards) are never stalled. Call from ``connection_made``.
    """
    attr = "_process_" + map_handler_name(name) + "_global_request"

    def process(packet: Any) -> None:
        payload = bytes(packet.get_remaining_payload())

        async def run() -> None:
            reply = GlobalReply(False, b"internal error")
            try:
                reply = await handler(payload)
            except Exception:
                log.exception("handler for %s failed", name)
            finally:
                _answer(conn, reply)

        conn.create_task(run())

    setattr(conn, attr, process)


def on_client_certificate(
    conn: asyncssh.SSHServerConnection,
    check: Callable[[str, bytes], Awaitable[bytes | None]],
) -> None:
    """Have ``check(username, cert_blob)`` alone decide on OpenSSH client certificates.

    ``check`` must verify everything (signature, signer, type, principal, validity) and
    return the certified key's wire blob, or None to refuse. asyncssh's own certificate
    parser is bypassed because it refuses key IDs that are not UTF-8, and the Go relay puts
    the raw exchange hash there; it also drops the extensions ``check`` needs. On success
    the connection is granted the ``permit-*`` rights the certificate does not list
    (uptermd certificates list none, and asyncssh would refuse the PTY without them).
    """
    original = conn._validate_client_certificate

    async def validate(username: str, key_data: bytes) -> Any:
        try:
            alg, _ = _read_string(key_data)
        except ValueError:
            return None
        if not alg.endswith(b"-cert-v01@openssh.com"):
            return await original(username, key_data)
        key_blob = await check(username, bytes(key_data))
        if key_blob is None:
            return None
        conn._key_options = {}
        conn._cert_options = dict(_GUEST_PERMISSIONS)
        return asyncssh.import_public_key(
            base64.b64encode(key_blob).join(
                (alg.removesuffix(b"-cert-v01@openssh.com") + b" ", b"")
            )
        )

    conn._validate_client_certificate = validate  # type: ignore[method-assign]


def _read_string(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < 4:
        raise ValueError("short")
    n = int.from_bytes(data[:4], "big")
    if len(data) < 4 + n:
        raise ValueError("short")
    return data[4 : 4 + n], data[4 + n :]


def on_signed_public_key(
    conn: asyncssh.SSHServerConnection,
    accepted: Callable[[bytes], None],
) -> None:
    """Call ``accepted(key_blob)`` for the key whose *signed* auth request succeeded.

    asyncssh asks about each key twice (a query, then the signed request); only the signed
    one proves possession, and the client may query several keys before signing one.
    """
    original = conn.validate_public_key

    async def validate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        ok = await original(username, key_data, msg, signature)
        if ok and msg:
            accepted(bytes(key_data))
        return ok

    conn.validate_public_key = validate  # type: ignore[method-assign]


def screen_public_key(
    conn: asyncssh.SSHServerConnection,
    screen: Callable[[str, bytes], Awaitable[bool]],
) -> None:
    """Ask ``screen(username, key_blob)`` about every key or certificate a client offers,
    before asyncssh's own checks: False refuses it outright (asyncssh would otherwise read
    a certificate whose signer it does not trust as the plain key it certifies)."""
    original = conn.validate_public_key

    async def validate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        if not await screen(username, bytes(key_data)):
            return False
        return await original(username, key_data, msg, signature)

    conn.validate_public_key = validate  # type: ignore[method-assign]


#: Signature algorithms hashing with SHA-1: refused, as current OpenSSH refuses them.
SHA1_SIGNATURE_ALGS = frozenset(
    {
        b"ssh-rsa",
        b"ssh-dss",
        b"ssh-rsa-cert-v01@openssh.com",
        b"ssh-dss-cert-v01@openssh.com",
        b"x509v3-ssh-rsa",
        b"x509v3-ssh-dss",
    }
)
SHA1_REFUSED = (
    "upterm: your client signed with SHA-1 (ssh-rsa), which is refused as current OpenSSH "
    "refuses it; use an ed25519 or ECDSA key, or an RSA key with rsa-sha2-256/512 (any "
    "OpenSSH since 7.2; PuTTY since 0.75)\r\n"
)


def signature_algs() -> list[str]:
    """The signature algorithms our servers advertise (server-sig-algs): asyncssh's
    defaults without SHA-1 ones."""
    from asyncssh.public_key import get_default_public_key_algs

    return [alg.decode() for alg in get_default_public_key_algs() if alg not in SHA1_SIGNATURE_ALGS]


#: Key exchanges our servers do not offer, by prefix and by part of the name. Each costs a
#: stranger's connection many times a curve's (a whole handshake, both ends, asyncssh 2.24:
#: 4-5 ms with a curve or group14; group16 10.5 ms, group18 31.6 ms, rsa2048-sha256 52 ms;
#: group exchange lets the client pick an 8192-bit group), and anyone may ask for one
#: before logging in; or they hash with SHA-1; or they need Kerberos (gss-). Every client
#: of the last decade offers a curve.
_COSTLY_KEX_PREFIXES = ("gss-", "rsa")
_COSTLY_KEX_PARTS = ("group-exchange", "group15", "group16", "group17", "group18", "-sha1")


def server_kex_algs() -> list[str]:
    """The key exchanges our servers offer: asyncssh's defaults but the costly ones (the
    hybrid post-quantum ones, the curves and diffie-hellman-group14-sha256 stay)."""
    from asyncssh.kex import get_default_kex_algs

    names = [alg.decode() for alg in get_default_kex_algs()]
    return [
        name
        for name in names
        if not name.startswith(_COSTLY_KEX_PREFIXES)
        and not any(part in name for part in _COSTLY_KEX_PARTS)
    ]


def refuse_sha1_signatures(conn: asyncssh.SSHServerConnection) -> None:
    """Refuse a public key signed request whose signature hashes with SHA-1, saying why.

    asyncssh verifies any signature algorithm the key type allows, whatever it advertised;
    the reason goes in an authentication banner (a failed login has no other text).
    """
    original = conn.validate_public_key
    told: list[bool] = []

    async def validate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        if msg:
            try:
                alg, _ = _read_string(bytes(signature))
            except ValueError:
                return False
            if alg in SHA1_SIGNATURE_ALGS:
                if not told:
                    told.append(True)
                    with contextlib.suppress(OSError):
                        conn.send_auth_banner(SHA1_REFUSED)
                return False
        return await original(username, key_data, msg, signature)

    conn.validate_public_key = validate  # type: ignore[method-assign]


def decide_on_signed_requests(conn: asyncssh.SSHServerConnection) -> None:
    """Answer every key query yes, and judge a key only when its holder signed for it.

    A client may ask "would you accept this key?" before signing. asyncssh asks the server
    object on each query: ours would check authorization (and so tell any client, without
    proof, which keys the host accepts). Here a query is answered from the key's form
    alone; the server object is asked only about signed requests, whose signature asyncssh
    then checks.
    """
    original = conn.validate_public_key

    async def validate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        if msg:
            return await original(username, key_data, msg, signature)
        try:
            alg, _ = _read_string(bytes(key_data))
        except ValueError:
            return False
        return bool(alg)

    conn.validate_public_key = validate  # type: ignore[method-assign]


_LIMIT_ATTR = "_upterm_global_request_limit"
_PING_ATTR = "_upterm_answers_pings"
#: OpenSSH's transport-level ping (PROTOCOL 1.9), used for keystroke-timing chaff.
MSG_PING, MSG_PONG = 192, 193
#: Pings answered only with at most this much data, and while at most this much waits to
#: be sent to the peer.
PING_REPLY_MAX_BYTES = 1024
PING_REPLY_BUFFER_BYTES = 64 * 1024


def _ssh_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def answer_pings(conn: asyncssh.SSHServerConnection) -> None:
    """Advertise and answer OpenSSH's ``ping@openssh.com`` transport pings.

    OpenSSH 9.5 and later hide the timing of keystrokes behind chaff (pings sent at a steady
    rate while typing), but only to servers that advertise the extension; without it, a
    joiner's keystrokes are timed by anyone who sees the packets. The advertisement rides
    in EXT_INFO after the first key exchange.
    """
    setattr(conn, _PING_ATTR, True)
    conn._extensions_to_send[b"ping@openssh.com"] = b"0"
    conn._packet_handlers = _handlers(type(conn))


_patched_handlers: dict[type, dict[int, Any]] = {}


def _handlers(cls: type) -> dict[int, Any]:
    """The packet dispatch table our server connections use, one per connection class.

    asyncssh's table is a class attribute; a connection given this copy (an instance
    attribute shadows the class one) gets the fixes below, each a no-op unless asked for.
    """
    table = _patched_handlers.get(cls)
    if table is not None:
        return table
    table = dict(cls._packet_handlers)  # type: ignore[attr-defined]
    global_request = table[MSG_GLOBAL_REQUEST]
    kexinit = table[MSG_KEXINIT]

    def bounded(self: Any, pkttype: int, pktid: int, packet: Any) -> Any:
        bound = getattr(self, _LIMIT_ATTR, None)
        if bound is not None and len(self._global_request_queue) >= bound[0]:
            bound[1]()
            return None
        return global_request(self, pkttype, pktid, packet)

    def judging_guesses(self: Any, pkttype: int, pktid: int, packet: Any) -> Any:
        held = getattr(self, _PREFER_ATTR, None)
        if held is not None and held.waiting:
            held.answer(self, bytes(packet._packet))
        result = kexinit(self, pkttype, pktid, packet)
        if not self.is_server():
            return result

        def judge() -> None:
            self._ignore_first_kex = wrong_kex_guess(self._client_kexinit, self._server_kexinit)

        if not inspect.isawaitable(result):
            judge()
            return result

        async def judged() -> None:  # asyncssh reads no further packet until it is done
            await result
            judge()

        return judged()

    def ping(self: Any, pkttype: int, pktid: int, packet: Any) -> bool:
        if not getattr(self, _PING_ATTR, False):
            return False  # not advertised: "unimplemented", as before
        data = packet.get_string()
        packet.check_end()
        transport = self._transport
        # Replies are owed, but never at the cost of memory: a peer that pings without
        # reading the pongs, or with large data, gets none (OpenSSH's chaff is a few bytes,
        # and its client ignores pongs).
        if (
            len(data) <= PING_REPLY_MAX_BYTES
            and transport is not None
            and transport.get_write_buffer_size() <= PING_REPLY_BUFFER_BYTES
        ):
            self.send_packet(MSG_PONG, _ssh_string(data))
        return True

    def pong(self: Any, pkttype: int, pktid: int, packet: Any) -> bool:
        return bool(getattr(self, _PING_ATTR, False))

    table[MSG_GLOBAL_REQUEST] = bounded
    table[MSG_KEXINIT] = judging_guesses
    table[MSG_PING] = ping
    table[MSG_PONG] = pong
    _patched_handlers[cls] = table
    return table


#: How long a server holds its KEXINIT for the client's (see :func:`prefer_host_key`).
#: Clients send theirs right after the version line; one that waits for ours still gets
#: it, this much later.
KEXINIT_HOLD_S = 1.0
_PREFER_ATTR = "_upterm_host_key_preference"


#: The ciphers a server steers clients to when they support one (see
#: :func:`prefer_host_key`): one AEAD call into OpenSSL per packet.
AES_GCM_CIPHERS = (b"aes128-gcm@openssh.com", b"aes256-gcm@openssh.com")


def aes_in_hardware(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AES instructions (x86 ``aes``, Arm ``aes``): only then is AES-GCM
    the cheaper cipher (without them ChaCha20 is). False when it cannot tell."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


_AES_IN_HARDWARE: bool | None = None


def _steer_to_aes_gcm() -> bool:
    global _AES_IN_HARDWARE
    if _AES_IN_HARDWARE is None:
        _AES_IN_HARDWARE = aes_in_hardware()
    return _AES_IN_HARDWARE


class _HeldKexinit:
    """A server's first KEXINIT, held until the client's says which host keys it takes."""

    def __init__(self, conn: Any, preferred: tuple[bytes, ...], ciphers: tuple[bytes, ...]) -> None:
        self.preferred = preferred
        self.ciphers = ciphers
        self.waiting = False
        self._send = conn._send_kexinit
        self._timer: Any = None

    def hold(self, conn: Any) -> None:
        if conn._session_id or self._timer is not None:
            self._send()  # a later key exchange: the first one settled the list
            return
        self.waiting = True
        self._timer = asyncio.get_running_loop().call_later(KEXINIT_HOLD_S, self.give_up, conn)

    def give_up(self, conn: Any) -> None:
        if self.waiting and not is_closed(conn):
            self.waiting = False
            self._send()

    def answer(self, conn: Any, client_kexinit: bytes) -> None:
        self.waiting = False
        self._timer.cancel()
        try:
            lists = _name_lists(client_kexinit)
        except ValueError:
            lists = [b""] * 10
        offered = lists[1].split(b",")
        ours = [alg for alg in conn._server_host_key_algs if alg in self.preferred]
        if ours and any(alg in offered for alg in ours):
            # The list goes in our KEXINIT; the table (shared, so replaced) picks the key.
            conn._server_host_key_algs = ours
            conn._server_host_keys = {alg: conn._server_host_keys[alg] for alg in ours}
        # Likewise the cipher: offered alone when the client takes it both ways (OpenSSH
        # lists ChaCha20 first, which costs asyncssh twice what AES-GCM does per byte).
        both = set(lists[2].split(b",")) & set(lists[3].split(b","))
        ciphers = [alg for alg in conn._enc_algs if alg in self.ciphers and alg in both]
        if ciphers:
            conn._enc_algs = ciphers
        self._send()


#: The session's and the relay's own key: what both hops prefer.
ED25519_HOST_KEY_ALGS = (b"ssh-ed25519-cert-v01@openssh.com", b"ssh-ed25519")


def prefer_host_key(
    conn: asyncssh.SSHServerConnection,
    algorithms: tuple[bytes, ...] = ED25519_HOST_KEY_ALGS,
    ciphers: tuple[bytes, ...] | None = None,
) -> None:
    """Use a host key of ``algorithms``, and a cipher of ``ciphers``, with every client
    that supports one.

    In SSH the *client's* order picks the host key, so a server offering several keys
    cannot prefer one. Ours must: the session's ed25519 key is the one the end-to-end line
    pins and the one the relay registered (Go's client lists ECDSA first, and upstream's
    relay refuses any key it did not register). So the server's first KEXINIT waits for the
    client's (at most :data:`KEXINIT_HOLD_S`) and offers only ``algorithms`` when the client
    takes one, every key otherwise (clients limited to RSA or ECDSA). Clients send their
    KEXINIT without waiting for ours, so this adds no round trip.

    ``ciphers`` (default: :data:`AES_GCM_CIPHERS` on CPUs with AES instructions, else none)
    are steered to the same way: every byte a joiner sees is encrypted by us in Python's
    asyncssh, where AES-GCM costs about half of ChaCha20-Poly1305.
    """
    if ciphers is None:
        ciphers = AES_GCM_CIPHERS if _steer_to_aes_gcm() else ()
    held = _HeldKexinit(conn, algorithms, ciphers)
    setattr(conn, _PREFER_ATTR, held)
    conn._send_kexinit = lambda: held.hold(conn)  # type: ignore[method-assign]
    conn._packet_handlers = _handlers(type(conn))


_EMPTY_STRING = b"\0\0\0\0"
_packet_logs_checked = False


def skip_unlogged_packet_formatting() -> None:
    """Format asyncssh's per-packet log line only when packet logging is on.

    asyncssh builds a description of every packet sent and received (its name, a plural of
    its size, a copy of an incoming payload) before its logger checks the debug level,
    which is 3 only with ``asyncssh.set_debug_level(3)``. Idempotent; process-wide, as
    asyncssh's debug level is.
    """
    global _packet_logs_checked
    if _packet_logs_checked:
        return
    _packet_logs_checked = True
    from asyncssh.logging import SSHLogger
    from asyncssh.packet import SSHPacketLogger

    sent, received = SSHPacketLogger.log_sent_packet, SSHPacketLogger.log_received_packet

    def log_sent_packet(
        self: Any, pkttype: int, pktid: int | None, packet: Any, note: str = ""
    ) -> None:
        if SSHLogger._debug_level >= 3:
            sent(self, pkttype, pktid, packet, note)

    def log_received_packet(
        self: Any, pkttype: int, pktid: int | None, packet: Any, note: str = ""
    ) -> None:
        if SSHLogger._debug_level >= 3:
            received(self, pkttype, pktid, packet, note)

    SSHPacketLogger.log_sent_packet = log_sent_packet  # type: ignore[method-assign]
    SSHPacketLogger.log_received_packet = log_received_packet  # type: ignore[method-assign]


_gcm_reused = False


def reuse_gcm_contexts() -> None:
    """Make each AES-GCM direction one ``AESGCM`` object, kept for the keys' lifetime.

    asyncssh (2.24 and earlier) builds a new ``AESGCM(key)`` for every packet it encrypts or
    decrypts, which fetches the cipher from OpenSSL's provider tables each time, and rebuilds
    the nonce by slicing and re-encoding bytes: 1.5-1.9 µs an operation against 0.8 with one
    object (a keystroke crosses six in the relay; the saving per keystroke measured within
    the noise, as the crypto is a small share of it). The key of a direction never changes
    (a rekey makes new cipher objects), so the object is made once; the nonce keeps RFC
    5647's layout: a fixed 4-byte field and a 64-bit invocation counter that wraps.
    Idempotent; process-wide.
    """
    global _gcm_reused
    if _gcm_reused:
        return
    _gcm_reused = True
    from asyncssh.crypto import cipher as cipher_module
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    tag_size = cipher_module._GCM_MAC_SIZE
    mask = (1 << 64) - 1

    def init(self: Any, cipher_name: str, key: bytes, iv: bytes) -> None:
        self._cipher = cipher_module._cipher_algs[cipher_name][0]
        self._key = key
        self._iv = iv
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:], "big")

    def next_iv(self: Any) -> bytes:
        iv = self._iv
        self._counter = counter = (self._counter + 1) & mask
        self._iv = self._fixed + counter.to_bytes(8, "big")
        return iv  # type: ignore[no-any-return]

    def encrypt_and_sign(self: Any, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        sealed = self._aead.encrypt(next_iv(self), data, header)
        return header + sealed[:-tag_size], sealed[-tag_size:]

    def verify_and_decrypt(self: Any, header: bytes, data: bytes, mac: bytes) -> bytes | None:
        iv = next_iv(self)
        try:
            opened: bytes | None = self._aead.decrypt(iv, data + mac, header)
        except InvalidTag:
            opened = None
        return opened

    gcm = cipher_module.GCMCipher
    gcm.__init__ = init  # type: ignore[method-assign]
    gcm.encrypt_and_sign = encrypt_and_sign  # type: ignore[method-assign]
    gcm.verify_and_decrypt = verify_and_decrypt  # type: ignore[method-assign]


def skip_ignore_padding(conn: Any) -> None:
    """Stop the empty MSG_IGNORE asyncssh sends before every packet.

    asyncssh (2.24 and earlier) inserts one before each packet once encrypting, a defence
    for CBC ciphers, whose next IV is the last ciphertext block. No other cipher needs it
    (OpenSSH sends none), and with ours it doubles the packets, cipher calls and socket
    writes of every connection: 35 % of the CPU of a bulk transfer. Kept for CBC.
    """
    send = conn.send_packet
    server = conn.is_server()

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and args == (_EMPTY_STRING,):
            cipher = conn._enc_alg_sc if server else conn._enc_alg_cs
            if b"-cbc" not in cipher:
                return
        send(pkttype, *args, handler=handler)

    conn.send_packet = send_packet


def skip_config_reload(conn: Any) -> None:
    """Skip asyncssh's rebuild of a server connection's options at its first login request,
    when no sshd_config was loaded (ours never load one).

    asyncssh rebuilds the whole options object then, so that an sshd_config's ``Match``
    blocks can apply to the user and address, and does it in a thread-pool worker: every
    host key loaded and encoded again, per connection. Without a config file (and reverse
    DNS off) the rebuild yields what the connection has. The cost was not only the CPU: the
    worker holds the GIL while the event loop waits for it (up to the 5 ms switch interval
    each time), so a flood of logins stalled every logged-in joiner's keystrokes too.
    """
    if getattr(conn._options.config, "loaded", False) or conn._rdns_lookup:
        return

    async def reload_config() -> None:
        return None

    conn.reload_config = reload_config


def resume_parsing_later(conn: Any, defer: Callable[[Callable[[], None]], bool]) -> None:
    """Let ``defer`` decide when asyncssh parses what arrived while it handled a packet in
    a task (True: it will call the parser itself; False: parse now, as asyncssh does).

    asyncssh handles KEXINIT and login requests in tasks; input that came meanwhile is
    parsed from the task's completion callback, in one go. The relay's gate gives that
    parse the connection's turn like any other input from a stranger.
    """
    finish = getattr(conn, "_finish_recv_packet", None)
    if finish is None:
        return  # older asyncssh (2.10, Debian 12's) handles each packet where it read it

    def finish_recv_packet(*args: Any, **kwargs: Any) -> None:
        if kwargs.get("is_async") and conn._inpbuf and defer(conn._recv_data):
            kwargs["is_async"] = False  # the packet's bookkeeping now, the parse in turn
        finish(*args, **kwargs)

    conn._finish_recv_packet = finish_recv_packet


#: lazy_keepalive probes after this share of an interval of silence.
LAZY_KEEPALIVE_SLACK = 0.9


def lazy_keepalive(conn: Any) -> None:
    """Keep asyncssh's keepalive semantics without a timer per packet received.

    asyncssh cancels its keepalive timer and schedules a new one for every packet that
    arrives. Here a packet only notes the time; when the timer fires early (traffic came
    since it was set), it is set again for the rest of the interval, and only a connection
    silent for (nearly) a whole interval gets asyncssh's probe (and, after the count, is
    dropped). An idle connection is woken as before, once per interval. Used where packets
    are many (the relay's connections); the host's tunnel, idle but for the relay's probes,
    keeps asyncssh's timer, which those probes push back without a wakeup.
    """
    loop = conn._loop
    last = [loop.time()]
    probe = conn._keepalive_timer_callback

    def reset() -> None:
        if conn._auth_complete:
            last[0] = loop.time()
            if conn._keepalive_timer is None:
                conn._set_keepalive_timer()

    def fired() -> None:
        interval = conn._keepalive_interval
        quiet = loop.time() - last[0]
        # Nearly a whole interval of silence counts as one: the answer to our own last
        # probe came just after it was sent, and waiting out those few milliseconds would
        # cost an idle connection a second wakeup per probe.
        if interval and quiet < interval * LAZY_KEEPALIVE_SLACK:
            conn._keepalive_timer = loop.call_later(interval - quiet, fired)
            return
        probe()

    conn._reset_keepalive_timer = reset
    conn._keepalive_timer_callback = fired
    if conn._keepalive_timer is not None:
        # Set before this (a client connection is authenticated already): ours from now.
        conn._cancel_keepalive_timer()
        conn._set_keepalive_timer()


def coarse_keepalive(conn: Any) -> None:
    """Re-arm asyncssh's keepalive timer only when less than half an interval is left.

    asyncssh cancels its timer and schedules a new one for every packet received (two
    timer operations per keystroke on the host's tunnel). Here a packet re-arms it only once
    half of the interval has passed since it was set: a busy connection re-arms about twice
    per interval, and an idle one that its peer probes (the relay probes its hosts more
    often than half our interval) still never wakes for its own probe. Unlike
    :func:`lazy_keepalive` it adds no wakeup; the price is that a probe may go after half
    an interval of silence rather than a whole one.
    """
    loop = conn._loop

    def reset() -> None:
        if not conn._auth_complete:
            return
        timer = conn._keepalive_timer
        if timer is None or timer.when() - loop.time() < conn._keepalive_interval / 2:
            conn._cancel_keepalive_timer()
            conn._set_keepalive_timer()

    conn._reset_keepalive_timer = reset


def _name_lists(kexinit: bytes) -> list[bytes]:
    """A KEXINIT's ten name-lists (after the message type and cookie)."""
    rest = kexinit[17:]
    lists = []
    for _ in range(10):
        names, rest = _read_string(rest)
        lists.append(names)
    return lists


def _first_choices(kexinit: bytes) -> tuple[bytes, bytes, bool]:
    """A KEXINIT's first key exchange and host key algorithms, and whether a guessed
    key-exchange packet follows it."""
    rest = kexinit[17:]  # message type, cookie
    kex_algs, rest = _read_string(rest)
    host_key_algs, rest = _read_string(rest)
    for _ in range(8):
        _, rest = _read_string(rest)
    if not rest:
        raise ValueError("short")
    return kex_algs.split(b",", 1)[0], host_key_algs.split(b",", 1)[0], rest[0] != 0


def wrong_kex_guess(client_kexinit: bytes, server_kexinit: bytes) -> bool:
    """Whether the client sent a guessed key-exchange packet that must be ignored.

    RFC 4253 7.1, as OpenSSH applies it: the guess is wrong unless both sides list the same
    key exchange *and* host key algorithm first. asyncssh calls it right whenever the
    negotiated key exchange is the client's first, processes it, and then fails on the
    client's real packet ("Key exchange not in progress"): every client that guesses
    (Dropbear's dbclient) was refused.
    """
    try:
        client_kex, client_host_key, follows = _first_choices(client_kexinit)
        server_kex, server_host_key, _ = _first_choices(server_kexinit)
    except ValueError:
        return False
    return follows and (client_kex, client_host_key) != (server_kex, server_host_key)


def judge_kex_guesses(conn: Any) -> None:
    """Make a server connection ignore a client's wrongly guessed key-exchange packet."""
    conn._packet_handlers = _handlers(type(conn))


def limit_global_requests(conn: Any, limit: int, exceeded: Callable[[], None]) -> None:
    """Call ``exceeded()`` instead of queueing a global request when ``limit`` wait already.

    asyncssh answers global requests one at a time and queues the rest without bound: a peer
    that sends requests faster than a slow handler answers them grows that queue forever.
    The limit lives on the connection; the dispatch table is shared (see :func:`_handlers`).
    """
    setattr(conn, _LIMIT_ATTR, (limit, exceeded))
    conn._packet_handlers = _handlers(type(conn))


class _MergingReceiveBuffer:
    """Stands in for a channel's ``_recv_buf``: what asyncssh holds while a channel is paused.

    asyncssh keeps one list entry per received packet and takes them out with ``pop(0)``:
    a peer that sends a paused channel its whole window as one-byte packets makes the relay
    hold hundreds of thousands of entries (about 90 bytes each) and then spend quadratic
    time delivering them. Here consecutive data of one stream type is merged into one
    buffer: memory is what was sent, and every operation is O(1) per byte.
    """

    __slots__ = ("_runs",)

    def __init__(self) -> None:
        self._runs: collections.deque[list[Any]] = collections.deque()

    def append(self, item: tuple[bytes, Any]) -> None:
        data, datatype = item
        runs = self._runs
        if runs and runs[-1][1] == datatype and isinstance(data, bytes | bytearray):
            runs[-1][0] += data
        else:
            runs.append([bytearray(data) if isinstance(data, bytes) else data, datatype])

    def pop(self, index: int = -1) -> tuple[Any, Any]:
        if index != 0:
            raise IndexError("only the oldest run can be taken")
        data, datatype = self._runs.popleft()
        return (bytes(data) if isinstance(data, bytearray) else data), datatype

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __len__(self) -> int:
        return len(self._runs)


class _MergingSendBuffer:
    """Stands in for a channel's ``_send_buf``: what waits for the peer's window.

    asyncssh appends one entry per ``write()`` and removes sent ones with ``del buf[0]``: a
    peer that stops reading while its other side writes one byte at a time makes the relay
    hold an entry per byte and flush them in quadratic time. Here writes of one stream type
    are merged into the last run (a bytearray; asyncssh sends from the front of the first
    run in place, and CPython trims a bytearray's front without moving the rest).
    """

    __slots__ = ("_runs",)

    def __init__(self) -> None:
        self._runs: collections.deque[tuple[bytearray, Any]] = collections.deque()

    def append(self, item: tuple[bytearray, Any]) -> None:
        data, datatype = item
        runs = self._runs
        if runs and runs[-1][1] == datatype:
            runs[-1][0].extend(data)
        else:
            runs.append((data, datatype))

    def __getitem__(self, index: int) -> tuple[bytearray, Any]:
        if index != 0:
            raise IndexError("only the oldest run is looked at")
        return self._runs[0]

    def clear(self) -> None:
        self._runs.clear()

    def __delitem__(self, index: int) -> None:
        if index != 0:
            raise IndexError("only the oldest run can be removed")
        self._runs.popleft()

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __len__(self) -> int:
        return len(self._runs)


def on_refused_forwarding(chan: Any, note: Callable[[str], None]) -> None:
    """Call ``note("agent")`` or ``note("x11")`` when the peer asks ``chan`` for agent or
    X11 forwarding, before asyncssh refuses it (forwarding of both is off): OpenSSH shows
    nothing, or only "request failed", so we tell the joiner why ourselves.

    asyncssh looks up each channel request's handler by name on the channel; an instance
    attribute of that name is found first (as for global requests, see above)."""
    for request, what in (("auth-agent-req@openssh.com", "agent"), ("x11-req", "x11")):
        name = "_process_" + map_handler_name(request) + "_request"
        original = getattr(chan, name)

        def handler(packet: Any, _original: Any = original, _what: str = what) -> Any:
            note(_what)
            return _original(packet)

        setattr(chan, name, handler)


def on_channel_request(chan: Any, request: str, handler: Callable[[bytes], bool]) -> None:
    """Answer the channel request ``request`` on ``chan`` with ``handler(payload)`` (its
    data after the want-reply flag); asyncssh refuses requests it does not know, and finds an
    instance attribute of the handler's name first (see :func:`on_refused_forwarding`)."""
    name = "_process_" + map_handler_name(request) + "_request"

    def handle(packet: Any) -> bool:
        return handler(packet.get_remaining_payload())

    setattr(chan, name, handle)


def send_channel_request(chan: Any, request: str, payload: bytes) -> None:
    """Send the channel request ``request`` (no reply wanted) with ``payload`` on ``chan``;
    asyncssh sends only the requests it knows."""
    chan._send_request(request.encode("ascii"), payload, want_reply=False)


def set_receive_window(chan: Any, size: int) -> None:
    """Make ``chan`` grant its peer at most ``size`` bytes in flight from now on.

    asyncssh fixes a channel's window when it opens and tops it up to that size whenever
    half of it was used; a smaller one means the peer sends in smaller bursts. (A larger
    window than the one granted now is granted at the next top-up.) ``chan`` must be the
    channel itself: with asyncssh's line editor on, sessions get a wrapper instead."""
    chan._init_recv_window = size


def sftp_session(factory: Callable[[Any], asyncssh.SFTPServer]) -> Any:
    """A session that serves SFTP on its channel with ``factory``'s server: asyncssh's own
    stream session (not exported), for a channel whose other requests are ours."""
    from asyncssh.stream import SSHServerStreamSession

    return SSHServerStreamSession(None, factory, 3, False)


def merge_channel_buffers(chan: Any) -> None:
    """Give a binary (``encoding=None``) channel send and receive buffers that merge.

    What a channel holds (for a paused reader, or for a peer whose window is closed) then
    costs what was sent, not an entry per packet or per write, and O(1) per byte to take
    out. Call from the session's ``connection_made``, before any data flows.
    """
    chan = getattr(chan, "_orig_chan", chan)  # the channel under asyncssh's line editor
    if isinstance(getattr(chan, "_recv_buf", None), list) and not chan._recv_buf:
        chan._recv_buf = _MergingReceiveBuffer()
    if isinstance(getattr(chan, "_send_buf", None), list) and not chan._send_buf:
        chan._send_buf = _MergingSendBuffer()


def carry_stderr(chan: Any) -> None:
    """Let a forwarding channel (TCP, UNIX) carry stderr as extended data, both ways, as a
    session channel does; asyncssh allows it only on session channels, though the protocol
    allows extended data on any. For our own channels, whose peer is ours."""
    chan._read_datatypes = {asyncssh.EXTENDED_DATA_STDERR}
    chan._write_datatypes = {asyncssh.EXTENDED_DATA_STDERR}


def discard_unsent(chan: Any) -> int:
    """Drop what a channel holds for its peer's window (not what reached the socket), and
    let asyncssh re-evaluate its flow control (``resume_writing`` if it had paused).
    Returns the bytes dropped. For output that is about to be replaced by a whole screen:
    sending it first would only delay that screen."""
    chan = getattr(chan, "_orig_chan", chan)  # the channel under asyncssh's line editor
    buf = getattr(chan, "_send_buf", None)
    dropped = int(getattr(chan, "_send_buf_len", 0))
    if buf is None or not dropped:
        return 0
    buf.clear()
    chan._send_buf_len = 0
    chan._pause_resume_writing()
    return dropped


class PassiveListener(asyncssh.SSHListener):
    """What a relay returns from ``unix_server_requested``: binds nothing, reports closing.

    Returning True there would make asyncssh bind a real UNIX socket named after the path in
    the working directory; we only need to know when the forward is cancelled or lost.
    """

    def __init__(self, on_close: Callable[[], None]) -> None:
        self._on_close: Callable[[], None] | None = on_close

    def get_port(self) -> int:
        """No TCP port: this listener forwards a named stream."""
        return 0

    def close(self) -> None:
        """Called by asyncssh on cancel-streamlocal-forward or connection loss."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    async def wait_closed(self) -> None:
        """Nothing to wait for."""
