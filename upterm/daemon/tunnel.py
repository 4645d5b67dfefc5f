"""The host's outer SSH connection to the relay: connect, register, forward.

Speaks the current upstream protocol: the host banner, ``upterm-create-session@upterm.dev``
with one per-session key and a proof signed over this connection's session id (so the relay
derives a stable session id), then ``streamlocal-forward@openssh.com`` for that id. A relay
that predates proofs answers with a random id; that works too (legacy fallback), only
without a stable id. Every forwarded channel becomes an inner SSH server connection.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncssh

from upterm import sshcompat, wire
from upterm.daemon.knownhosts import RelayTrust
from upterm.daemon.sshd import GuestPolicy, InnerServer
from upterm.errors import (
    ConfigError,
    HostKeyChanged,
    RelayPermissionDenied,
    RelayUnreachable,
    RemoteProtocolError,
)
from upterm.keys import Ed25519Key

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15
#: Upstream's keepalive period ("nlb is 350 sec & heroku router is 55 sec").
KEEPALIVE_INTERVAL_S = 50
KEEPALIVE_COUNT_MAX = 3


@dataclass(frozen=True)
class RelayURL:
    """A relay address: ``ssh://host:port`` (ws/wss come with the WebSocket transport)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> RelayURL:
        """Parse ``--server``; raises :class:`ConfigError` naming what is wrong."""
        parts = urlsplit(text if "://" in text else "ssh://" + text)
        if parts.scheme != "ssh":
            raise ConfigError(f"unsupported relay URL scheme in {text!r}; use ssh://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ConfigError(f"relay URL {text!r} needs a host and a port, e.g. ssh://HOST:22")
        return cls(parts.scheme, parts.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def join_command(self, token: str) -> str:
        """The line a joiner types."""
        port = "" if self.port == 22 else f" -p {self.port}"
        return f"ssh {token}@{self.host}{port}"


class _RelayClient(asyncssh.SSHClient):
    def __init__(self, trust: RelayTrust) -> None:
        self.trust = trust
        self.changed: HostKeyChanged | None = None

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


class Tunnel:
    """One outer connection to a relay carrying one session."""

    def __init__(
        self,
        url: RelayURL,
        trust: RelayTrust,
        session_key: Ed25519Key,
        secret: bytes,
        on_lost: Callable[[Exception | None], None],
    ) -> None:
        self.url = url
        self.trust = trust
        self._key = session_key
        self._ssh_key = asyncssh.import_private_key(session_key.private_openssh())
        self._secret = secret
        self._generation = 0
        self._on_lost = on_lost
        self._conn: asyncssh.SSHClientConnection | None = None
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self.registered: Registered | None = None

    @property
    def relay_key_blob(self) -> bytes:
        """The relay key accepted on connect: the only signer of guest certificates we trust."""
        assert self.trust.accepted is not None
        return self.trust.accepted

    async def connect(self, authorized: list[wire.PublicKey]) -> Registered:
        """Connect, register the session and return its identity."""
        client = _RelayClient(self.trust)
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    self.url.host,
                    self.url.port,
                    client_factory=lambda: client,
                    client_version=wire.HOST_CLIENT_VERSION[len("SSH-2.0-") :],
                    username=getpass.getuser(),
                    client_keys=[self._ssh_key],
                    known_hosts=([], [], []),
                    agent_path=None,
                    config=None,
                    preferred_auth="publickey",
                    keepalive_interval=KEEPALIVE_INTERVAL_S,
                    keepalive_count_max=KEEPALIVE_COUNT_MAX,
                    encoding=None,
                ),
                CONNECT_TIMEOUT_S,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            if client.changed is not None:
                raise client.changed from exc
            raise HostKeyChanged(
                f"the relay at {self.url} presented a host key that is not trusted"
            ) from exc
        except asyncssh.PermissionDenied as exc:
            raise RelayPermissionDenied(
                f"{self.url}: Permission denied (publickey); the relay refused this host"
            ) from exc
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise RelayUnreachable(
                f"cannot reach the relay at {self.url}: {reason}; check --server and that "
                "uptermd is running there"
            ) from exc
        self._conn = conn
        conn_lost = asyncio.ensure_future(conn.wait_closed())
        conn_lost.add_done_callback(lambda _f: self._lost())
        try:
            self.registered = await self._register(conn, authorized)
        except BaseException:
            conn.close()
            raise
        return self.registered

    async def _register(
        self, conn: asyncssh.SSHClientConnection, authorized: list[wire.PublicKey]
    ) -> Registered:
        self._generation += 1
        payload = wire.proof_payload(sshcompat.session_id(conn), self._secret, self._generation)
        req = wire.CreateSessionRequest(
            host_user=getpass.getuser(),
            host_public_keys=(self._key.public.authorized_key_line(),),
            client_authorized_keys=tuple(k.authorized_key_line() for k in authorized),
            session_secret=self._secret,
            generation=self._generation,
            host_key_proof=wire.sign_proof(self._key.private, payload),
        )
        try:
            reply = await sshcompat.global_request(conn, wire.CREATE_SESSION_REQUEST, req.encode())
        except asyncssh.Error as exc:
            raise RelayUnreachable(f"the relay at {self.url} closed the connection") from exc
        if not reply.ok:
            text = reply.payload.decode("utf-8", "replace").strip() or "no reason given"
            raise RelayPermissionDenied(f"the relay at {self.url} refused the session: {text}")
        try:
            resp = wire.CreateSessionResponse.decode(reply.payload)
        except RemoteProtocolError as exc:
            raise RelayUnreachable(f"the relay at {self.url} answered nonsense: {exc}") from exc
        derived = wire.derive_session_id(self._key.public.blob, self._secret)
        token = resp.ssh_user or wire.encode_token(resp.session_id, resp.node_addr)
        version = wire.parse_relay_banner(conn.get_extra_info("server_version") or "")
        return Registered(
            resp.session_id, resp.node_addr, token, resp.session_id == derived, version
        )

    async def serve(self, policy: GuestPolicy) -> None:
        """Forward the session and serve joiners on the inner SSH server."""
        assert self._conn is not None and self.registered is not None
        sid = self.registered.session_id
        try:
            self._acceptor = await asyncssh.listen(
                tunnel=_StreamForwardTunnel(self._conn, sid),
                server_factory=lambda: InnerServer(policy),
                server_host_keys=[self._ssh_key],
                server_version=wire.HOST_SERVER_VERSION[len("SSH-2.0-") :],
                encoding=None,
                line_editor=False,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
                password_auth=False,
                kbdint_auth=False,
                gss_host=None,
                keepalive_interval=KEEPALIVE_INTERVAL_S,
            )
        except (asyncssh.Error, ValueError) as exc:
            # ValueError: asyncssh cannot parse a refusal that carries a reason text.
            raise RelayPermissionDenied(
                f"the relay at {self.url} refused to forward session {sid}"
            ) from exc

    def _lost(self) -> None:
        log.info("connection to relay %s closed", self.url)
        self._on_lost(None)

    @property
    def connected(self) -> bool:
        """Whether the outer connection is up."""
        return self._conn is not None and not sshcompat.is_closed(self._conn)

    def close(self) -> None:
        """Cancel the forward and disconnect."""
        if self._acceptor is not None:
            self._acceptor.close()
        if self._conn is not None:
            self._conn.close()
