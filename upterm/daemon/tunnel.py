"""The host's outer SSH connection to the relay: connect, register, forward.

Speaks the current upstream protocol: the host banner, ``upterm-create-session@upterm.dev``
with one per-session key and a proof signed over this connection's session id (so the relay
derives a stable session id), then ``streamlocal-forward@openssh.com`` for that id. A relay
that predates proofs answers with a random id; that works too (legacy fallback), only
without a stable id. Every forwarded channel becomes an inner SSH server connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import random
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncssh

from upterm import sshcompat, wire
from upterm.daemon.direct import DirectChannel
from upterm.daemon.knownhosts import RelayTrust
from upterm.daemon.sshd import GuestPolicy, InnerServer
from upterm.errors import (
    ConfigError,
    HostKeyChanged,
    HostKeyUnknown,
    RelayPermissionDenied,
    RelayUnreachable,
    RemoteProtocolError,
    UptermError,
)
from upterm.keys import EXTRA_KEY_TYPES, Ed25519Key, KeyPair
from upterm.text import printable
from upterm.wsclient import HTTPProxy, WebSocketTunnel, WebSocketURL

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15
#: The name an end-to-end joiner connects to through the relay (the relay splices it).
E2E_HOST_NAME = "upterm"
RECONNECT_BASE_DELAY_S = 1.0
RECONNECT_MAX_DELAY_S = 30.0
RECONNECT_MIN_DELAY_S = 0.1
#: A connection that stayed up this long resets the backoff.
RECONNECT_RESET_AFTER_S = 60.0
#: Upstream's keepalive period ("nlb is 350 sec & heroku router is 55 sec").
KEEPALIVE_INTERVAL_S = 50
KEEPALIVE_COUNT_MAX = 3
#: Relay host key algorithms we accept, in order (upstream's list plus ECDSA).
PLAIN_HOST_KEY_ALGORITHMS = ("ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256", "ecdsa-sha2-nistp256")
HOST_KEY_ALGORITHMS = (
    "ssh-ed25519-cert-v01@openssh.com",
    "rsa-sha2-512-cert-v01@openssh.com",
    "rsa-sha2-256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    *PLAIN_HOST_KEY_ALGORITHMS,
)


_WS_PORTS = {"ws": 80, "wss": 443}


@dataclass(frozen=True)
class RelayURL:
    """A relay address: ``ssh://host:port``, or ``ws://`` / ``wss://`` (SSH over WebSocket,
    for networks that let only HTTP(S) out)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> RelayURL:
        """Parse ``--server``; raises :class:`ConfigError` naming what is wrong."""
        parts = urlsplit(text if "://" in text else "ssh://" + text)
        if parts.scheme not in ("ssh", "ws", "wss"):
            raise ConfigError(
                f"unsupported relay URL scheme in {text!r}; use ssh://HOST:PORT or wss://HOST"
            )
        try:
            port = parts.port or _WS_PORTS.get(parts.scheme)
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ConfigError(f"relay URL {text!r} needs a host and a port, e.g. ssh://HOST:22")
        return cls(parts.scheme, parts.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if _WS_PORTS.get(self.scheme) == self.port:
            return f"{self.scheme}://{host}"
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def websocket(self) -> bool:
        """Whether SSH runs over a WebSocket to this relay."""
        return self.scheme != "ssh"

    def websocket_url(self, user: str, password: str = "") -> WebSocketURL:
        """The WebSocket address with credentials (Basic auth, as upstream sends them)."""
        return WebSocketURL(self.scheme == "wss", self.host, self.port, "/", user, password)

    def join_command(self, token: str) -> str:
        """The line a joiner types."""
        if self.websocket:
            proxy = shlex.quote(f"upterm proxy {self}".replace("://", f"://{token}@", 1))
            return f"ssh -o ProxyCommand={proxy} {token}@{self.host}"
        port = "" if self.port == 22 else f" -p {self.port}"
        return f"ssh {token}@{self.host}{port}"

    def transfer_commands(self, token: str) -> tuple[str, str]:
        """``scp`` and ``sftp`` lines that work as typed: the token's ``:`` would end the
        host name in ``TOKEN@HOST:PATH``, so the user goes in ``-o User=``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.websocket:
            proxy = shlex.quote(f"upterm proxy {self}".replace("://", f"://{token}@", 1))
            opts = f"-o ProxyCommand={proxy} -o User={token}"
        else:
            opts = ("" if self.port == 22 else f"-P {self.port} ") + f"-o User={token}"
        return f"scp {opts} FILE {host}:", f"sftp {opts} {host}"

    def e2e_join_command(self, token: str, host_key_line: str) -> str:
        """The end-to-end join: the relay as a jump host, the host's key pinned inline.

        Over WebSocket the jump is an ``ssh -W`` whose own ProxyCommand is ``upterm proxy``
        (``-J`` cannot carry a ProxyCommand for its jump host).
        """
        pin = shlex.quote(f"/bin/echo {E2E_HOST_NAME} {host_key_line}")
        target = f"{token}@{E2E_HOST_NAME}"
        if self.websocket:
            jump = self.jump_command(token)
            return f'ssh -o ProxyCommand="{jump}" -o KnownHostsCommand={pin} {target}'
        jump = f"{token}@{self.host}" + ("" if self.port == 22 else f":{self.port}")
        return f"ssh -J {jump} -o KnownHostsCommand={pin} {target}"

    def jump_command(self, token: str) -> str:
        """For a WebSocket relay: the ProxyCommand that carries an end-to-end join, an
        ``ssh -W`` to the relay through ``upterm proxy`` (tokens and hosts need no quoting
        inside double quotes: base64url, ``:`` and ``@``)."""
        proxy = f"upterm proxy {self}".replace("://", f"://{token}@", 1)
        return f"ssh -o ProxyCommand='{proxy}' -W %h:%p {token}@{self.host}"


class _RelayClient(asyncssh.SSHClient):
    def __init__(self, trust: RelayTrust) -> None:
        self.trust = trust
        self.changed: HostKeyChanged | None = None

    def validate_host_ca_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # A host certificate: trusted if its CA is an @cert-authority key for this relay
        # (or the pinned authority on a redial). That CA is then the relay's authority: the
        # only signer of guest certificates this host accepts.
        blob = bytes(key.public_data)
        if blob in self.trust.ca_keys():
            self.trust.accepted = blob
            self.trust.accepted_as_authority = True
            return True
        return False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        try:
            return self.trust.check(bytes(key.public_data))
        except HostKeyChanged as exc:
            self.changed = exc
            return False


class _StreamForwardTunnel:
    """asyncssh ``tunnel=`` for ``listen``: a streamlocal forward named by the session id."""

    def __init__(self, conn: asyncssh.SSHClientConnection, session_id: str) -> None:
        self._conn = conn
        self._sid = session_id

    async def create_server(
        self, session_factory: Callable[[str, int], Any], _host: str, _port: int
    ) -> Any:
        return await self._conn.create_unix_server(lambda: session_factory("", 0), self._sid)


@dataclass
class Registered:
    """What the relay told us about our session."""

    session_id: str
    node_addr: str
    token: str
    reconnect_supported: bool
    relay_version: str | None
    #: The relay carries end-to-end joins (``ssh -J``): this project's uptermd does,
    #: upstream's does not (it refuses the jump), so its join card has no such line.
    e2e_supported: bool = True


def backoff_delay_s(attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0.1 s, min(30 s, 1 s * 2**attempt)]."""
    bound = min(RECONNECT_MAX_DELAY_S, RECONNECT_BASE_DELAY_S * 2 ** min(attempt, 16))
    return rng.uniform(RECONNECT_MIN_DELAY_S, max(bound, RECONNECT_MIN_DELAY_S))


class Tunnel:
    """The outer connection to a relay carrying one session, redialled when it drops.

    After the first connection the relay's key is pinned exactly (no prompt, no
    known_hosts), and every redial registers the same key and secret with the next
    generation, so a relay that supports proofs gives back the same session id and the join
    line stays valid. Joiners of the lost connection must join again.
    """

    def __init__(
        self,
        url: RelayURL,
        trust: RelayTrust,
        session_key: Ed25519Key,
        secret: bytes,
        on_state: Callable[[str], None],
        keepalive_s: float = KEEPALIVE_INTERVAL_S,
        identities: Sequence[asyncssh.SSHKey] = (),
        agent_path: str | None = None,
        ws_proxy: HTTPProxy | None = None,
        ca_file: str | None = None,
    ) -> None:
        sshcompat.skip_unlogged_packet_formatting()
        sshcompat.reuse_gcm_contexts()
        self.url = url
        #: The HTTP proxy a WebSocket relay is reached through (None: direct).
        self.ws_proxy = ws_proxy
        #: CAs a wss:// relay's certificate is checked against (None: the system store).
        self.ca_file = ca_file
        self.trust = trust
        self._key = session_key
        self._ssh_key = asyncssh.import_private_key(session_key.private_openssh())
        #: The session's ECDSA and RSA keys, for joiners limited to those host key types.
        self._extra_keys: list[KeyPair] = []
        self._extra_ssh_keys: list[asyncssh.SSHKey] = []
        self._secret = secret
        self._generation = 0
        self._on_state = on_state
        self._keepalive_s = keepalive_s
        # The keys this host logs in to the relay with. Without any (no -i, no default key
        # file, no agent), an ephemeral key: our relay and upstream's accept any host key.
        self._identities = list(identities)
        if not self._identities and not agent_path:
            self._identities = [asyncssh.generate_private_key("ssh-ed25519")]
        self._agent_path = agent_path
        self._conn: asyncssh.SSHClientConnection | None = None
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._authorized: list[wire.PublicKey] = []
        self._invites: tuple[str, ...] = ()
        #: The web link declared to the relay (``--web``), declared again after each redial.
        self._web: tuple[wire.WebCredential, int, str] | None = None
        #: The relay's page for it (its base URL), once the relay took it.
        self.web_base = ""
        self._policy: GuestPolicy | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._rng = random.Random()  # noqa: S311 - jitter, not secrets
        self.registered: Registered | None = None
        self.state = "connecting"
        self.reconnects = 0

    @property
    def session_key(self) -> wire.PublicKey:
        """The session's public key: the inner server's host key, which joiners pin."""
        return self._key.public

    @property
    def host_keys(self) -> list[wire.PublicKey]:
        """Every host key the inner server presents: the session key first."""
        return [self.session_key, *(k.public for k in self._extra_keys)]

    @property
    def relay_key_blob(self) -> bytes:
        """The relay key accepted on connect: the only signer of guest certificates we trust."""
        assert self.trust.accepted is not None
        return self.trust.accepted

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._on_state(state)

    async def connect(self, authorized: list[wire.PublicKey]) -> Registered:
        """Connect for the first time and register the session; return its identity."""
        self._authorized = authorized
        # RSA key generation takes a fifth of a second: done while the relay answers.
        extras = asyncio.ensure_future(
            asyncio.to_thread(lambda: [KeyPair.generate(kind) for kind in EXTRA_KEY_TYPES])
        )
        conn = await self._dial(self.trust, redial=False)
        try:
            self.registered = await self._register(conn)
            self._extra_keys = await extras
            self._extra_ssh_keys = [
                asyncssh.import_private_key(k.private_pkcs8()) for k in self._extra_keys
            ]
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return self.registered

    async def _dial(self, trust: RelayTrust, redial: bool) -> asyncssh.SSHClientConnection:
        client = _RelayClient(trust)
        # As OpenSSH: ask for a host certificate only when an @cert-authority line (or a
        # pinned authority) could vouch for it; otherwise plain keys only.
        algorithms = HOST_KEY_ALGORITHMS if trust.ca_keys() else PLAIN_HOST_KEY_ALGORITHMS
        # On a redial the session key goes first, so an unattended reconnect need not reach
        # an agent that may have gone with the terminal that started the session.
        keys = [self._ssh_key, *self._identities] if redial else self._identities
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    self.url.host,
                    self.url.port,
                    client_factory=lambda: client,
                    client_version=wire.HOST_CLIENT_VERSION[len("SSH-2.0-") :],
                    username=getpass.getuser(),
                    client_keys=keys,
                    known_hosts=([], [], []),
                    server_host_key_algs=algorithms,
                    encryption_algs=sshcompat.PREFERRED_CIPHERS,
                    agent_path=self._agent_path,
                    config=None,
                    preferred_auth="publickey",
                    keepalive_interval=self._keepalive_s,
                    keepalive_count_max=KEEPALIVE_COUNT_MAX,
                    encoding=None,
                    tunnel=(
                        WebSocketTunnel(
                            self.url.websocket_url(getpass.getuser()),
                            wire.HOST_CLIENT_VERSION,
                            self.ws_proxy,
                            self.ca_file,
                        )
                        if self.url.websocket
                        else ()
                    ),
                ),
                CONNECT_TIMEOUT_S,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            if client.changed is not None:
                raise client.changed from exc
            if trust.unknown is not None:
                key = wire.PublicKey(trust.unknown)
                raise HostKeyUnknown(
                    f"the relay's host key for {trust.name} is not known; confirm it in a "
                    "terminal, pass --skip-host-key-check to accept it on first use, or add "
                    f"it to {trust.known_hosts}",
                    name=trust.name,
                    addr=self.url.host,
                    key=key.authorized_key_line().decode().strip(),
                    fingerprint=key.fingerprint,
                    type=key.algorithm.removeprefix("ssh-").upper(),
                ) from exc
            raise HostKeyChanged(
                f"the relay at {self.url} presented a host key that is not trusted"
            ) from exc
        except asyncssh.PermissionDenied as exc:
            raise RelayPermissionDenied(
                f"{self.url}: Permission denied (publickey); the relay refused this host"
            ) from exc
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            # A relay's disconnect text is its own: shown without control characters.
            reason = printable(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
            raise RelayUnreachable(
                f"cannot reach the relay at {self.url}: {reason}; check --server and that "
                "uptermd is running there"
            ) from exc
        sshcompat.skip_ignore_padding(conn)  # a packet and a write less per packet sent
        sshcompat.coarse_keepalive(conn)  # no timer re-armed per packet received
        return conn

    async def _register(self, conn: asyncssh.SSHClientConnection) -> Registered:
        self._generation += 1
        payload = wire.proof_payload(sshcompat.session_id(conn), self._secret, self._generation)
        req = wire.CreateSessionRequest(
            host_user=getpass.getuser(),
            host_public_keys=(self._key.public.authorized_key_line(),),
            client_authorized_keys=tuple(k.authorized_key_line() for k in self._authorized),
            session_secret=self._secret,
            generation=self._generation,
            host_key_proof=wire.sign_proof(self._key.private, payload),
        )
        derived = wire.derive_session_id(self._key.public.blob, self._secret)
        create = asyncio.ensure_future(
            sshcompat.global_request(conn, wire.CREATE_SESSION_REQUEST, req.encode())
        )
        # Right behind it, in the same round trip (requests are answered in order): an empty
        # invite list for the id the session will have. Only our relay knows the request,
        # and only our relay carries end-to-end joins.
        probe = asyncio.ensure_future(
            sshcompat.global_request(conn, wire.INVITES_REQUEST, wire.encode_invites(derived, ()))
        )
        try:
            reply = await create
        except asyncssh.Error as exc:
            probe.cancel()
            raise RelayUnreachable(f"the relay at {self.url} closed the connection") from exc
        try:
            e2e = (await probe).ok
        except asyncssh.Error:
            e2e = False
        if not reply.ok:
            text = printable(reply.payload.decode("utf-8", "replace").strip()) or "no reason given"
            raise RelayPermissionDenied(f"the relay at {self.url} refused the session: {text}")
        try:
            resp = wire.CreateSessionResponse.decode(reply.payload)
            # The id names a socket file and the token is printed: a relay's word is checked
            # before either is used (a hostile relay must not pick paths or escape codes).
            token = resp.ssh_user or wire.encode_token(resp.session_id, resp.node_addr)
            decoded = wire.decode_token(token)
            if decoded.session_id != resp.session_id or decoded.invite is not None:
                raise RemoteProtocolError("its token does not name the session")
            if not resp.node_addr.isprintable():
                raise RemoteProtocolError("its node address is not printable")
        except RemoteProtocolError as exc:
            raise RelayUnreachable(f"the relay at {self.url} answered nonsense: {exc}") from exc
        version = wire.parse_relay_banner(conn.get_extra_info("server_version") or "")
        return Registered(
            resp.session_id, resp.node_addr, token, resp.session_id == derived, version, e2e
        )

    async def set_invites(self, codes: Sequence[str]) -> None:
        """Tell the relay which invite codes this session honours (again after each redial).

        Our uptermd lets an invite token past its key check only for a code declared here
        (as a digest); a relay that does not know the request refuses it, which changes
        nothing: such a relay routes no invite tokens anyway. Returns once the relay has
        answered (a revoked code is refused there from then on), or at once while the
        connection is down (the next redial declares them).
        """
        self._invites = tuple(codes)
        if self._conn is not None and self.registered is not None and self.connected:
            await self._declare_invites(self._conn)

    async def _declare_invites(self, conn: asyncssh.SSHClientConnection) -> None:
        assert self.registered is not None
        payload = wire.encode_invites(self.registered.session_id, self._invites)
        try:
            reply = await asyncio.wait_for(
                sshcompat.global_request(conn, wire.INVITES_REQUEST, payload), CONNECT_TIMEOUT_S
            )
        except (asyncssh.Error, TimeoutError) as exc:
            log.info("could not declare invites to %s: %s", self.url, exc)
            return
        if not reply.ok and self._invites:
            log.info("the relay at %s does not take invites: they work end to end only", self.url)

    async def set_web(
        self, credential: wire.WebCredential | None, expires: int = 0, label: str = ""
    ) -> str:
        """Declare the session's web link to the relay (None: withdraw it) and return the
        page's base URL. Raises :class:`RelayPermissionDenied` with the relay's words when
        it takes no web link (upstream's relays do not know the request), and
        :class:`RelayUnreachable` when it cannot be asked now; the link declared before
        then stays the one declared after a redial."""
        before = self._web
        self._web = (credential, expires, label) if credential is not None else None
        if self._conn is None or self.registered is None:
            return ""
        try:
            reply = await self._declare_web(self._conn)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            self._web = before
            raise RelayUnreachable(
                f"could not reach the relay at {self.url} to change the web link ({exc}); "
                "try again once it is connected"
            ) from None
        if not reply.ok:
            self._web = before
            text = printable(reply.payload.decode("utf-8", "replace")).strip()
            raise RelayPermissionDenied(
                text or f"the relay at {self.url} does not serve a web page (upterm host --web)"
            )
        return self.web_base

    async def _declare_web(self, conn: asyncssh.SSHClientConnection) -> sshcompat.GlobalReply:
        assert self.registered is not None
        cred, expires, label = self._web or (None, 0, "")
        payload = wire.WebRegistration(
            self.registered.session_id,
            cred.web_id if cred is not None else "",
            cred.digest() if cred is not None else b"",
            expires,
            label,
        ).encode()
        reply = await asyncio.wait_for(
            sshcompat.global_request(conn, wire.WEB_REQUEST, payload), CONNECT_TIMEOUT_S
        )
        if reply.ok:
            with contextlib.suppress(RemoteProtocolError, UnicodeDecodeError):
                base, _ = wire.read_ssh_string(reply.payload)
                # The relay's words end up on the host's card: printable, and short.
                self.web_base = printable(base.decode("utf-8"))[:512]
        return reply

    async def _redeclare_web(self, conn: asyncssh.SSHClientConnection) -> None:
        try:
            reply = await self._declare_web(conn)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            log.info("could not declare the web link to %s after the redial: %s", self.url, exc)
            return
        if not reply.ok:
            log.info("the relay at %s took no web link after the redial", self.url)

    async def serve(self, policy: GuestPolicy) -> None:
        """Forward the session, serve joiners, and redial whenever the connection drops."""
        assert self._conn is not None
        self._policy = policy
        await self._forward(self._conn)
        if self._invites:
            self._conn.create_task(self._declare_invites(self._conn))
        self._set_state("connected")
        self._supervisor = asyncio.ensure_future(self._supervise())

    async def _forward(self, conn: asyncssh.SSHClientConnection) -> None:
        assert self._policy is not None and self.registered is not None
        sid = self.registered.session_id
        policy = self._policy
        try:
            self._acceptor = await asyncssh.listen(
                tunnel=_StreamForwardTunnel(conn, sid),
                server_factory=lambda: InnerServer(policy),
                server_host_keys=[self._ssh_key, *self._extra_ssh_keys],
                server_version=wire.HOST_SERVER_VERSION[len("SSH-2.0-") :],
                signature_algs=sshcompat.signature_algs(),
                kex_algs=sshcompat.server_kex_algs(),  # none a stranger can make costly
                encoding=None,
                line_editor=False,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
                password_auth=False,
                kbdint_auth=False,
                gss_host=None,
                keepalive_interval=self._keepalive_s,
                # Long enough for a joiner waiting on --approve; then the joiner is dropped.
                login_timeout=policy.approve_timeout_s + 30,
            )
        except (asyncssh.Error, ValueError) as exc:
            # ValueError: asyncssh cannot parse a refusal that carries a reason text.
            raise RelayPermissionDenied(
                f"the relay at {self.url} refused to forward session {sid}"
            ) from exc
        if self.registered.e2e_supported:
            # Our relay: joiners' terminal bytes may skip the inner SSH layer (daemon.direct).
            # A relay from before that refuses the path; joiners then use the inner layer.
            try:
                await conn.create_unix_server(
                    lambda: DirectChannel(policy.direct), sid + wire.DIRECT_PATH_SUFFIX
                )
            except (asyncssh.Error, ValueError) as exc:
                log.info("the relay at %s takes no direct channels: %s", self.url, exc)

    async def _supervise(self) -> None:
        attempt = 0
        while True:
            assert self._conn is not None
            up_since = time.monotonic()
            await self._conn.wait_closed()
            if self._closing:
                return
            if self._acceptor is not None:
                self._acceptor.close()
            log.warning("lost the connection to relay %s", self.url)
            assert self.registered is not None
            if not self.registered.reconnect_supported:
                # A relay without proofs would hand out a new id: the join line could not
                # stay the same, so the session stays local (as upstream does).
                self._set_state("disconnected")
                return
            if time.monotonic() - up_since >= RECONNECT_RESET_AFTER_S:
                attempt = 0
            self._set_state("reconnecting")
            while not self._closing:
                await asyncio.sleep(backoff_delay_s(attempt, self._rng))
                attempt += 1
                if await self._redial():
                    self.reconnects += 1
                    self._set_state("connected")
                    break

    async def _redial(self) -> bool:
        assert self.registered is not None
        pinned = RelayTrust(
            name=self.trust.name,
            pinned=self.relay_key_blob,
            pinned_authority=self.trust.accepted_as_authority,
        )
        conn: asyncssh.SSHClientConnection | None = None
        try:
            conn = await self._dial(pinned, redial=True)
            reg = await self._register(conn)
            if reg.session_id != self.registered.session_id:
                raise RelayPermissionDenied(
                    f"the relay at {self.url} gave a different session id on redial"
                )
            self._conn = conn
            await self._forward(conn)
            if self._invites:
                conn.create_task(self._declare_invites(conn))
            if self._web is not None:
                conn.create_task(self._redeclare_web(conn))
        except (UptermError, asyncssh.Error, OSError) as exc:
            log.info("redial of %s failed: %s", self.url, printable(str(exc)))
            if conn is not None:
                conn.close()
            return False
        except BaseException:
            if conn is not None:  # e.g. cancelled by close(): never leave it connected
                conn.close()
            raise
        if self._closing:
            conn.close()
            return False
        log.info("reconnected to relay %s as session %s", self.url, reg.session_id)
        return True

    @property
    def connected(self) -> bool:
        """Whether the outer connection is up."""
        return self.state == "connected"

    def close(self) -> None:
        """Cancel the forward and disconnect for good."""
        self._closing = True
        self._set_state("closed")
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._acceptor is not None:
            self._acceptor.close()
        if self._conn is not None:
            self._conn.close()
