"""uptermd's SSH listener: hosts register sessions, joiners are routed to them.

One asyncssh server. A connection whose banner is exactly ``SSH-2.0-upterm-host-client`` is
a *host*: it may create sessions (``upterm-create-session@upterm.dev``) and forward them
(``streamlocal-forward@openssh.com``, keyed by session id). Any other connection is a
*joiner*: its SSH user name is the session token, it must present a key the host allows,
and each of its session channels is proxied, request by request, into a fresh SSH
connection to the host's inner server, opened as a ``forwarded-streamlocal@openssh.com``
channel on the host's connection and authenticated with a certificate this relay signs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncssh
from asyncssh.constants import OPEN_REQUEST_PTY_FAILED, OPEN_REQUEST_SESSION_FAILED

from upterm import sshcompat, wire
from upterm.errors import ConfigError, RemoteProtocolError
from upterm.keys import Ed25519Key, KeyPair, PrivateHostKey
from upterm.relay.cluster import LeaseHeld, RedisRegistry, RegistryUnavailable, SessionRecord
from upterm.relay.gate import GATE_INFO, Gate, GateConfig, GatedListener, PreauthTurns
from upterm.relay.guard import RelayGuard, RelayLimits
from upterm.relay.hop import HopClaim, build_hop_certificate, verify_hop_certificate
from upterm.relay.metrics import RelayMetrics
from upterm.relay.registry import Registration, SessionTable, Superseded
from upterm.relay.web import WebService
from upterm.relay.wsdoor import WebSocketListener
from upterm.text import printable

log = logging.getLogger(__name__)

#: Upstream (relay → host) connection must be up within this many seconds. It includes
#: the host's authentication, which waits for the host's answer under --approve (up to an
#: hour); a host that went away is noticed by the tunnel's keepalives long before.
UPSTREAM_TIMEOUT_S = 3700
#: Authorized keys one registration may carry (the rest of the bounds: RelayLimits).
MAX_KEYS_PER_SESSION = 1024
#: The host name a joiner asks the relay to connect to for an end-to-end join.
E2E_DESTINATION = "upterm"
#: Pause a reader when the other side has this much unsent data queued.
PROXY_HIGH_WATER_BYTES = 256 * 1024
#: Data from a host smaller than this is passed on at once; larger pieces wait for the end
#: of the event-loop pass to be merged into full packets (a keystroke must not wait).
COALESCE_MIN_BYTES = 4096
#: Largest packet we let a host send on a forwarded channel (its reverse tunnel). Each
#: packet costs a round of Python work here, and a host's inner SSH packets ride inside
#: these: at asyncssh's 32 KiB default every full inner packet needed two. Well under the
#: 256 KiB transport limit of Go's x/crypto, which upstream hosts use.
TUNNEL_MAX_PACKET_BYTES = 128 * 1024
#: Longest a joiner's end waits, after its host channel closed, for the direct channel
#: that carried its output to close (the host closes it first; see _JoinerSession), while
#: the joiner has taken everything the relay holds for it.
DIRECT_CLOSE_S = 10.0
#: Largest packet the host's inner server may send the relay on a joiner's behalf; with its
#: framing it still fits one tunnel packet.
INNER_MAX_PACKET_BYTES = 64 * 1024


def format_addr(peer: Any) -> str:
    """``host:port`` (``[v6]:port``) of a socket address tuple, or "" if unknown."""
    if not isinstance(peer, tuple) or len(peer) < 2:
        return ""
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@dataclass(frozen=True)
class RelayIdentity:
    """The relay's host keys: its ed25519 key in both forms it needs (for asyncssh and for
    signing certificates), and the ECDSA and RSA keys offered to clients without ed25519."""

    key: Ed25519Key
    ssh_key: asyncssh.SSHKey
    extra: tuple[asyncssh.SSHKey, ...] = ()

    @classmethod
    def from_key(cls, key: Ed25519Key, extra: Sequence[PrivateHostKey] = ()) -> RelayIdentity:
        """Wrap an ed25519 key and any others."""
        return cls(
            key,
            asyncssh.import_private_key(key.private_openssh()),
            tuple(asyncssh.import_private_key(KeyPair(k).private_pkcs8()) for k in extra),
        )


class _ForwardedStreamTunnel:
    """asyncssh ``tunnel=`` object: each connect opens a forwarded-streamlocal channel."""

    def __init__(self, host_conn: asyncssh.SSHServerConnection, session_id: str) -> None:
        self._conn = host_conn
        self._sid = session_id

    async def create_connection(
        self, session_factory: Callable[[], Any], _host: str, _port: int
    ) -> tuple[Any, Any]:
        return await self._conn.create_unix_connection(
            session_factory, self._sid, max_pktsize=TUNNEL_MAX_PACKET_BYTES
        )


def load_tls(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context from PEM files (the certificate file may hold the chain)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ConfigError(
            f"cannot use --tls-cert {cert} with --tls-key {key}: {reason}; check that both "
            "are PEM files, readable, and belong together"
        ) from exc
    return context


class Relay:
    """Lifecycle of one uptermd node's SSH listener."""

    #: The packet size asked for on inner channels (see INNER_MAX_PACKET_BYTES).
    inner_max_packet_bytes = INNER_MAX_PACKET_BYTES

    def __init__(
        self,
        identity: RelayIdentity,
        *,
        host: str,
        port: int,
        node_addr: str | None,
        version: str,
        hostnames: tuple[str, ...] = (),
        limits: RelayLimits | None = None,
        gate: GateConfig | None = None,
        host_keys: frozenset[bytes] | None = None,
        metrics: RelayMetrics | None = None,
        ws_addr: tuple[str, int] | None = None,
        ws_tls: tuple[str, str] | None = None,
        ws_gate: GateConfig | None = None,
        registry: RedisRegistry | None = None,
        cluster_addr: tuple[str, int] | None = None,
        cluster_advertise: str | None = None,
        web_url: str | None = None,
    ) -> None:
        sshcompat.skip_unlogged_packet_formatting()
        sshcompat.reuse_gcm_contexts()
        #: The cluster's session registry (``--routing redis``); None: this node alone.
        self.registry = registry
        #: Where the cluster listener binds: other nodes' hops arrive there, and nothing else.
        self._cluster_addr = cluster_addr
        self._cluster_advertise = cluster_advertise
        self._cluster_listener: GatedListener | None = None
        self._cluster_server: asyncssh.SSHAcceptor | None = None
        #: This node's hop key: certified by the cluster key for each hop (never stored).
        self.hop_key = Ed25519Key.generate()
        self._hop_ssh_key = asyncssh.import_private_key(self.hop_key.private_openssh())

        self.identity = identity
        #: Where the WebSocket listener binds (``--ws-addr``); None: no WebSocket.
        self._ws_addr = ws_addr
        #: ``--tls-cert``, ``--tls-key``: the WebSocket listener serves TLS itself.
        self._ws_tls = ws_tls
        #: The WebSocket listener's door (PROXY headers, X-Forwarded-For); default: the SSH
        #: listener's without PROXY headers.
        self._ws_gate = ws_gate
        self._ws_listener: WebSocketListener | None = None
        self._ws_server: asyncssh.SSHAcceptor | None = None
        self._hostnames = hostnames
        #: Sees every byte the relay carries for joiners ("relay" mode: terminal data it
        #: can read; "splice" mode: opaque end-to-end SSH). For byte accounting and tests.
        self.observer: Callable[[str, bytes], None] | None = None
        #: Called when sessions come or go (uptermd's STATUS= line).
        self.on_change: Callable[[], None] = lambda: None
        self.table = SessionTable()
        self.version = version
        self.limits = limits or RelayLimits()
        self.metrics = metrics or RelayMetrics()
        self.guard = RelayGuard(self.limits, self.metrics)
        if registry is not None:
            metrics_ = self.metrics
            registry.observe = lambda op, s: metrics_.registry_latency.labels(op=op).observe(s)
            registry.event = lambda e: metrics_.leases.labels(event=e).inc()
        self.gate_cfg = gate or GateConfig(handshake_timeout_s=self.limits.handshake_timeout_s)
        #: Keys that may register sessions (``--authorized-keys``); None: any key.
        self.host_keys = host_keys
        #: Every SSH connection now open (hosts and joiners), for draining.
        self.connections: set[RelayConnection] = set()
        self.draining = False
        self._drained = asyncio.Event()
        self._host = host
        self._port = port
        self._node_addr = node_addr
        self._listener: GatedListener | None = None
        #: Every listener's connections that are not logged in yet share one turn per pass
        #: of the event loop (see gate.PreauthTurns).
        self.preauth_turns = PreauthTurns()
        self._server: asyncssh.SSHAcceptor | None = None
        #: Background registry writes (lease releases), kept so none is collected unfinished.
        self._tasks: set[asyncio.Future[None]] = set()
        #: The web page and web links (browser joiners, on the WebSocket listener).
        self.web = WebService(self, web_url)

    @property
    def node_addr(self) -> str:
        """The address embedded in tokens; defaults to the bound SSH address."""
        if self._node_addr:
            return self._node_addr
        return f"{self._host}:{self.port}"

    @property
    def bind_host(self) -> str:
        """The address the listener binds."""
        return self._host

    @property
    def port(self) -> int:
        """The bound TCP port (useful when started on port 0)."""
        if self._listener is None or not self._listener.sockets:
            return self._port
        return self._listener.get_port()

    @property
    def ready(self) -> bool:
        """Serving, not draining, and (in a cluster) reaching the registry: the metrics
        endpoint's /ready, so a load balancer sends no one to a node that cannot register."""
        serving = self._listener is not None and self._listener.is_serving()
        registry_ok = self.registry is None or self.registry.reachable
        return serving and registry_ok and not self.draining

    @property
    def node_id(self) -> str:
        """This node's id in the cluster ("" when alone)."""
        return self.registry.node_id if self.registry is not None else ""

    @property
    def cluster_port(self) -> int:
        """The cluster listener's bound port (0 when there is none)."""
        return self._cluster_listener.get_port() if self._cluster_listener is not None else 0

    async def start(self) -> None:
        """Bind the listener."""
        host_keys: list[Any] = [self.identity.ssh_key]
        if self._hostnames:
            cert = wire.build_host_certificate(self.identity.key.private, list(self._hostnames))
            # The pair offers both the certificate and the plain key algorithm.
            host_keys = [(self.identity.ssh_key, asyncssh.import_certificate(cert))]
        host_keys += self.identity.extra
        self._listener = GatedListener(
            self._host, self._port, self.guard, self.gate_cfg, turns=self.preauth_turns
        )
        self._server = await self._listen(self._listener, host_keys)
        log.info("uptermd listening on %s:%d (node %s)", self._host, self.port, self.node_addr)
        if self._ws_addr is not None:
            # The same SSH service behind the same guard; connections start as HTTP.
            self._ws_listener = WebSocketListener(
                *self._ws_addr,
                self.guard,
                self._ws_gate or dataclasses.replace(self.gate_cfg, proxy_protocol=False),
                refuse_user=self._ws_refusal,
                web=self.web,
                turns=self.preauth_turns,
            )
            if self._ws_tls is not None:
                self._ws_listener.tls = load_tls(*self._ws_tls)
            self._ws_server = await self._listen(self._ws_listener, host_keys)
            log.info("uptermd WebSocket listener on %s:%d", self._ws_addr[0], self.ws_port)
        if self.registry is not None:
            await self._start_cluster(host_keys)

    async def _start_cluster(self, host_keys: list[Any]) -> None:
        assert self.registry is not None
        if self._cluster_addr is None:
            raise ConfigError("--routing redis needs --cluster-addr (where other nodes hop in)")
        # Only other nodes come here, each proving the cluster key: no per-source caps or
        # penalties (one node carries many joiners), but the same handshake deadline and
        # bound on unauthenticated connections.
        guard = RelayGuard(
            dataclasses.replace(
                self.limits,
                penalties=dataclasses.replace(self.limits.penalties, enabled=False),
                per_source_startups=0,
            ),
            self.metrics,
        )
        self._cluster_listener = GatedListener(
            *self._cluster_addr,
            guard,
            dataclasses.replace(self.gate_cfg, proxy_protocol=False),
            turns=self.preauth_turns,
        )
        self._cluster_server = await self._listen(self._cluster_listener, host_keys, hop=True)
        advertised = self._cluster_advertise or (
            f"{self._cluster_addr[0]}:{self._cluster_listener.get_port()}"
        )
        self.registry.member_addr = advertised
        await self.registry.start()
        log.info(
            "cluster node %s: hops in on %s:%d (advertised as %s), registry %s",
            self.registry.node_id,
            self._cluster_addr[0],
            self.cluster_port,
            advertised,
            "reachable" if self.registry.reachable else "NOT reachable yet",
        )

    def reload_tls(self) -> None:
        """Read the certificate and key again (SIGHUP): new connections get them, open
        ones keep theirs. Raises :class:`ConfigError` and keeps the old ones on failure."""
        if self._ws_tls is not None and self._ws_listener is not None:
            self._ws_listener.tls = load_tls(*self._ws_tls)

    @property
    def serves_tls(self) -> bool:
        """Whether the WebSocket listener serves TLS itself."""
        return self._ws_tls is not None

    @property
    def ws_port(self) -> int:
        """The WebSocket listener's bound port (0 when there is none)."""
        return self._ws_listener.get_port() if self._ws_listener is not None else 0

    def _ws_refusal(self, user: str, is_host: bool) -> str | None:
        """Why a WebSocket upgrade is refused before any SSH: a joiner's token must name a
        session on this node (nothing is dialled for any other)."""
        if is_host:
            return None
        try:
            token = wire.decode_token(user)
        except RemoteProtocolError:
            return "upterm: that is not a session token"
        if self.registry is not None:
            return None  # the session may live on another node: SSH authentication decides
        if self.table.get(token.session_id) is None or token.node_addr not in (
            None,
            self.node_addr,
        ):
            return wire.BANNER_NO_HOST_FORMAT.format(session_id=token.session_id).strip()
        return None

    async def _listen(
        self, listener: GatedListener, host_keys: list[Any], hop: bool = False
    ) -> asyncssh.SSHAcceptor:
        """The SSH service behind one listener (``hop``: the cluster listener's, which
        takes hop certificates only)."""
        return await asyncssh.listen(
            tunnel=listener,
            server_factory=lambda: RelayConnection(self, hop=hop),
            server_host_keys=host_keys,
            server_version=wire.relay_banner(self.version)[len("SSH-2.0-") :],
            signature_algs=sshcompat.signature_algs(),
            kex_algs=sshcompat.server_kex_algs(),  # none a stranger can make costly
            encoding=None,
            # The gate keeps the real deadline (and penalises it); this is a backstop.
            login_timeout=self.limits.handshake_timeout_s + 5,
            allow_scp=False,
            # A relay forwards bytes; asyncssh's line editor would rewrite them.
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            keepalive_interval=0,
            # Joiners authenticate by key only: no passwords, no keyboard-interactive.
            password_auth=False,
            kbdint_auth=False,
            gss_host=None,
            window=self.limits.joiner_window_bytes,
        )

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        for server in (self._server, self._ws_server, self._cluster_server):
            if server is not None:
                server.close()
        for conn in list(self.connections):
            conn.close()

    async def wait_closed(self) -> None:
        """Wait for the listener to close."""
        for server in (self._server, self._ws_server, self._cluster_server):
            if server is not None:
                await server.wait_closed()
        if self._tasks:
            # Lease releases already under way get their (bounded) round trip.
            await asyncio.wait(self._tasks, timeout=5)
        if self.registry is not None:
            await self.registry.close()

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting, tell every joiner and host why, and wait for them to go.

        Hosts are disconnected with a reason that makes them redial (the same session id
        comes back on the next node or the restarted one); joiners get one line saying to run
        the same ssh command again. Returns when all are gone or after ``timeout_s``.
        """
        self.draining = True
        for listener in (self._listener, self._ws_listener):
            if listener is not None:
                listener.stop_accepting()
        deadline = time.monotonic() + timeout_s
        # What is already ending (a host that just closed, its joiners' exit statuses in
        # flight) finishes on its own first: telling those joiners would cut their status.
        self._drained.clear()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), min(DRAIN_SETTLE_S, timeout_s / 4))
        log.info("draining: %d connections to close", len(self.connections))
        for conn in [c for c in self.connections if not c.is_host]:
            # Joiners of a live session: ours, or one another node owns (carried by a hop).
            if conn._live_host() is not None or conn._target is not None:
                conn.tell_and_close(DRAIN_JOINER_TEXT)
        for conn in [c for c in self.connections if c.is_host]:
            conn.disconnect(DRAIN_HOST_TEXT)
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), max(0.0, deadline - time.monotonic()))
        for conn in list(self.connections):
            conn.close()

    def drained(self) -> None:
        """The last connection closed (wakes :meth:`drain`)."""
        self._drained.set()

    # -- registration (called by host connections) --

    def record_of(self, reg: Registration) -> SessionRecord:
        """What the cluster's registry stores of a registration of ours."""
        return SessionRecord(
            session_id=reg.session_id,
            generation=reg.generation,
            node_id=self.node_id,
            host_user=reg.host_user,
            host_key_blobs=reg.host_key_blobs,
            client_key_blobs=reg.client_key_blobs,
            invites=reg.invites,
        )

    async def claim(self, reg: Registration) -> bytes | None:
        """Take the cluster-wide lease of ``reg`` (``--routing redis``); what to tell the
        host if that is refused. Fails closed: no registry, no registration."""
        if self.registry is None:
            return None
        if not self.table.would_accept(reg):
            return SUPERSEDED_BYTES
        try:
            await self.registry.claim(
                self.record_of(reg),
                functools.partial(self.lease_lost, reg.session_id, reg.generation),
            )
        except LeaseHeld as exc:
            log.info(
                "session %s is held by generation %d elsewhere", reg.session_id, exc.generation
            )
            self.metrics.refusals.labels(reason="superseded").inc()
            return SUPERSEDED_BYTES
        except RegistryUnavailable as exc:
            log.warning("refused to register session %s: %s", reg.session_id, exc)
            self.metrics.refusals.labels(reason="registry-unavailable").inc()
            return REGISTRY_DOWN_TEXT.encode()
        return None

    def release_lease(self, session_id: str, generation: int) -> None:
        """Give a lease back in the background (a successor's is never touched; if Redis is
        down the lease simply expires)."""
        if self.registry is None:
            return
        registry = self.registry

        async def release() -> None:
            with contextlib.suppress(RegistryUnavailable):
                await registry.release(session_id, generation)

        task = asyncio.ensure_future(release())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def lease_lost(self, session_id: str, generation: int, why: str) -> None:
        """This node may no longer serve the session: no new joiners from now on, its
        joiners here are told and dropped, and its host is disconnected so that it redials
        (to whichever node the cluster then gives it)."""
        reg = self.table.get(session_id)
        if reg is None or reg.generation != generation:
            return
        owner = reg.owner
        for conn in [c for c in self.connections if not c.is_host and c.joined_reg is reg]:
            conn.tell_and_close(LEASE_LOST_JOINER_TEXT)
        if isinstance(owner, RelayConnection):
            owner.drop_session(session_id)
            owner.disconnect(
                f"upterm: this relay node lost session {session_id} ({why}); reconnect"
            )
        else:
            self.table.release(session_id, owner)

    async def dial_member(
        self, target: HopTarget, username: str, auth: wire.AuthRequest
    ) -> asyncssh.SSHClientConnection:
        """An SSH connection to the node owning a session, as this joiner (a hop).

        ``target`` comes from the registry only: its node is a registered member now and
        holds the session's lease. Nothing a joiner wrote is dialled.
        """
        host, _, port = target.addr.rpartition(":")
        cert = build_hop_certificate(
            self.identity.key.private,
            self.hop_key.private.public_key(),
            principal=username,
            auth=auth,
            generation=target.generation,
            from_node=self.node_id,
            to_node=target.node_id,
            now=int(time.time()),
        )
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    host.strip("[]"),
                    int(port),
                    username=username,
                    client_keys=[(self._hop_ssh_key, asyncssh.import_certificate(cert))],
                    # Every node shares the cluster key: a member presenting another is not one.
                    known_hosts=(
                        [asyncssh.import_public_key(self.identity.key.public_line())],
                        [],
                        [],
                    ),
                    agent_path=None,
                    config=None,
                    preferred_auth="publickey",
                    client_version=wire.relay_banner(self.version)[len("SSH-2.0-") :],
                    encoding=None,
                    keepalive_interval=self.limits.joiner_keepalive_s,
                    encryption_algs=sshcompat.PREFERRED_CIPHERS,
                ),
                HOP_TIMEOUT_S,
            )
        except BaseException:
            self.metrics.hops.labels(direction="failed").inc()
            raise
        sshcompat.skip_ignore_padding(conn)
        self.metrics.hops.labels(direction="out").inc()
        return conn

    async def open_inner(
        self,
        host_conn: asyncssh.SSHServerConnection,
        reg: Registration,
        username: str,
        auth: wire.AuthRequest,
        key_id: bytes,
        web: str = "",
    ) -> asyncssh.SSHClientConnection:
        """An SSH connection to the host's inner server for one guest, through a
        forwarded-streamlocal channel on ``host_conn``: the host key pinned to the
        registered session key, authenticated with a certificate this relay signs
        (principal ``username``, the guest as ``auth``, a browser's ``web`` credential)."""
        cert_line = wire.build_guest_certificate(
            self.identity.key.private,
            principal=username,
            key_id=key_id,
            auth=auth,
            now=int(time.time()),
            web=web,
        )
        host_keys = [
            asyncssh.import_public_key(wire.PublicKey(b).authorized_key_line())
            for b in reg.host_key_blobs
        ]
        conn = await asyncio.wait_for(
            asyncssh.connect(
                reg.session_id,
                0,
                tunnel=_ForwardedStreamTunnel(host_conn, reg.session_id),
                username=username,
                client_keys=[(self.identity.ssh_key, asyncssh.import_certificate(cert_line))],
                known_hosts=(host_keys, [], []),
                agent_path=None,
                config=None,
                preferred_auth="publickey",
                client_version=wire.relay_banner(self.version)[len("SSH-2.0-") :],
                encoding=None,
                keepalive_interval=0,
                encryption_algs=sshcompat.PREFERRED_CIPHERS,
            ),
            UPSTREAM_TIMEOUT_S,
        )
        sshcompat.skip_ignore_padding(conn)
        return conn

    def live_host(
        self, session_id: str
    ) -> tuple[Registration, asyncssh.SSHServerConnection] | None:
        """The registration of ``session_id`` and its host's connection, if that host is
        connected here now (and, in a cluster, this node holds the session's lease)."""
        reg = self.table.get(session_id)
        if reg is None or not isinstance(reg.owner, RelayConnection) or reg.owner.conn is None:
            return None
        if self.registry is not None and not self.registry.holds(session_id, reg.generation):
            return None
        return reg, reg.owner.conn

    def register(self, reg: Registration) -> None:
        """Add a registration; a displaced owner's connection is closed."""
        displaced = self.table.register(reg)
        self.web.session_back(reg.session_id)
        self.metrics.sessions.set(len(self.table))
        self.on_change()
        if isinstance(displaced, RelayConnection):
            log.info("session %s taken over by a newer registration", reg.session_id)
            displaced.drop_session(reg.session_id)
            displaced.close()


@dataclass(frozen=True)
class HopTarget:
    """Where a joiner's session lives when another node owns it (from the registry)."""

    addr: str
    node_id: str
    generation: int


#: A hop must be up (TCP, SSH, the owner's checks) within this.
HOP_TIMEOUT_S = 15.0
SUPERSEDED_BYTES = wire.SUPERSEDED.encode()
#: What a host hears when its node cannot reach the cluster's registry (it retries).
REGISTRY_DOWN_TEXT = (
    "upterm: this relay cannot reach its session registry right now; try again in a few "
    "seconds (a host that is reconnecting keeps trying by itself)"
)
#: What a joiner sees when the node serving it loses its session (moved or unrenewable).
LEASE_LOST_JOINER_TEXT = (
    "upterm: this session moved to another relay node; run the same ssh command again"
)
#: How long a drain first waits for what is already ending to end by itself.
DRAIN_SETTLE_S = 0.5
#: What a joiner sees when the relay drains (upgrade, restart, scale-in).
DRAIN_JOINER_TEXT = (
    "upterm: this relay is restarting; run the same ssh command again in a few seconds"
)
#: The disconnect reason hosts get when the relay drains; our hosts redial at once.
DRAIN_HOST_TEXT = "uptermd is restarting: reconnect to keep your session"


class RelayConnection(asyncssh.SSHServer):
    """One inbound SSH connection, host or joiner (decided by its banner)."""

    def __init__(self, relay: Relay, hop: bool = False) -> None:
        self.relay = relay
        #: Came in on the cluster listener: another node carrying a joiner (a hop).
        self.hop = hop
        #: What the entry node's certificate said about the joiner (hops only).
        self._hop_claim: HopClaim | None = None
        #: The node owning this joiner's session, when it is not this one.
        self._target: HopTarget | None = None
        self.conn: asyncssh.SSHServerConnection | None = None
        self.gate: Gate | None = None
        self.is_host = False
        self._token: wire.Token | None = None
        self._reg: Registration | None = None
        self._auth_key: bytes | None = None
        self._upstream: asyncio.Task[asyncssh.SSHClientConnection] | None = None
        self._owned: set[str] = set()
        #: Sessions of this host that take joiners' terminal bytes on direct channels.
        self.direct_sessions: set[str] = set()
        #: Channels this joiner has open now (not ever opened).
        self.open_channels = 0
        #: The session this joiner counts against (joiners per session), once authenticated.
        self._joined: str | None = None
        self._authed_state: str | None = None
        self._sessions: set[_JoinerSession] = set()
        self._refused_text: str | None = None
        self._lost = False
        self._unused_timer: asyncio.TimerHandle | None = None
        #: What this joiner asked for and never gets (ssh -R, -A, -X), told on its terminal.
        self.notes: set[str] = set()

    # -- connection lifecycle --

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        gate = conn.get_extra_info(GATE_INFO)
        self.gate = gate if isinstance(gate, Gate) else None
        if self.gate is not None:
            sshcompat.resume_parsing_later(conn, self.gate.defer_to_turn)
        self.relay.connections.add(self)
        sshcompat.install_global_request_handler(
            conn, wire.CREATE_SESSION_REQUEST, self._create_session
        )
        sshcompat.install_global_request_handler(conn, wire.INVITES_REQUEST, self._invites)
        sshcompat.install_global_request_handler(conn, wire.WEB_REQUEST, self._web_link)
        # Also makes the connection ignore a wrongly guessed key-exchange packet (dbclient).
        sshcompat.limit_global_requests(
            conn, self.relay.limits.global_requests_pending, self._too_many_requests
        )
        if self.hop:
            sshcompat.screen_public_key(conn, self._screen_hop)
        sshcompat.on_signed_public_key(conn, self._key_proven)
        sshcompat.refuse_sha1_signatures(conn)
        # ed25519 whenever the client takes it: the key hosts pin and guest certificates
        # are signed with.
        sshcompat.prefer_host_key(conn)  # ... and AES-GCM, half ChaCha20's cost to us
        sshcompat.answer_pings(conn)  # OpenSSH's keystroke-timing chaff needs them
        sshcompat.skip_ignore_padding(conn)  # a packet and a write less per packet sent
        sshcompat.lazy_keepalive(conn)  # no timer re-armed per packet received
        sshcompat.skip_config_reload(conn)  # no options rebuilt (in a thread) per login

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.relay.connections.discard(self)
        if not self.relay.connections:
            self.relay.drained()
        if isinstance(exc, asyncssh.ConnectionLost) and "keepalive" in str(exc):
            # asyncssh's own words when our probes went unanswered.
            log.info(
                "dropped %s %s: it stopped answering keepalives",
                "host" if self.is_host else "joiner",
                self.peer(),
            )
            self.relay.metrics.keepalive_drops.inc()
        for sid in list(self._owned):
            self.drop_session(sid)
        if self._joined is not None:
            self.relay.guard.joiners_by_session.give(self._joined)
            self._joined = None
            self.relay.metrics.joiners.dec()
        if self._authed_state is not None:
            self.relay.metrics.connections.labels(state=self._authed_state).dec()
            self._authed_state = None
        self._disarm_unused()
        if self._upstream is not None:
            self._upstream.cancel()
            if self._upstream.done() and not self._upstream.cancelled():
                with contextlib.suppress(Exception):
                    self._upstream.result().close()

    def close(self) -> None:
        """Disconnect this peer."""
        if self.conn is not None:
            self.conn.close()

    def disconnect(self, reason: str) -> None:
        """Disconnect with a reason the peer's client shows."""
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)

    def tell_and_close(self, text: str) -> None:
        """One line on every channel of this joiner, then disconnect with it as the reason."""
        for sess in list(self._sessions):
            sess.tell(text)
        self.disconnect(text)

    def drop_session(self, sid: str) -> None:
        """Forget a session this connection registered (its successor is left alone)."""
        self.direct_sessions.discard(sid)
        if sid in self._owned:
            self._owned.discard(sid)
            self.relay.guard.sessions_by_key.give(self._auth_key)
            self.relay.guard.sessions_by_source.give(self.source_key())
            if not self._owned:
                self._arm_unused()
        reg = self.relay.table.get(sid)
        if self.relay.table.release(sid, self):
            log.info("session %s closed", sid)
            if reg is not None:
                self.relay.release_lease(sid, reg.generation)
            self.relay.web.session_left(sid)
            self.relay.metrics.sessions.set(len(self.relay.table))
            self.relay.on_change()

    def _too_many_requests(self) -> None:
        log.info("disconnected %s: too many requests waiting for an answer", self.peer())
        self.relay.metrics.refusals.labels(reason="global-requests").inc()
        self.disconnect("upterm: too many requests waiting for an answer")

    # -- authentication --

    @property
    def joined_reg(self) -> Registration | None:
        """The registration this joiner authenticated for (None for hosts)."""
        return None if self.is_host else self._reg

    async def begin_auth(self, username: str) -> bool:
        assert self.conn is not None
        self._token = None
        self._reg = None
        self._target = None
        self._hop_claim = None
        self._refused_text = None
        banner = self.conn.get_extra_info("client_version") or ""
        self.is_host = banner == wire.HOST_CLIENT_VERSION and not self.hop
        if self.is_host:
            return True
        try:
            self._token = wire.decode_token(username)
        except RemoteProtocolError:
            log.info("refused joiner with a malformed token from %s", self.peer())
            self.relay.metrics.auth_failures.labels(reason="bad-token").inc()
            if self.gate is not None:
                self.gate.invalid_user = True
            return True
        sid = self._token.session_id
        reg = self.relay.table.get(sid)
        registry = self.relay.registry
        no_host = wire.BANNER_NO_HOST_FORMAT.format(session_id=sid)
        if registry is None:
            foreign = self._token.node_addr not in (None, self.relay.node_addr)
            if reg is None or foreign:
                # Never dial a node address named by a joiner: only known cluster members
                # count, and a single node knows none.
                self._refuse_joiner(no_host, "unknown-session")
                return True
        elif reg is not None:
            # Ours, but only while our lease holds (the node named in the token is a hint),
            # and, when the registry answers, only if it still says so: a host that redialled
            # to another node took the session there at once.
            if not registry.holds(sid, reg.generation) or not await self._still_ours(reg):
                self._refuse_joiner(wire.BANNER_LOOKUP_FAILED, "lease-not-held")
                return True
        elif self.hop:
            # A hop goes to the owner and no further: never a chain of nodes.
            self._refuse_joiner(no_host, "unknown-session")
            return True
        else:
            found = await self._look_up(sid)
            if found is None:
                return True
            reg, self._target = found
        limit = self.relay.guard.joiners_by_session.limit
        if limit and self.relay.guard.joiners_by_session.count(reg.session_id) >= limit:
            self._refuse_joiner(
                f"upterm: session {reg.session_id} is full ({limit} joiners); "
                "try again when someone leaves\n",
                "joiners-per-session",
            )
            return True
        self._reg = reg
        return True

    async def _still_ours(self, reg: Registration) -> bool:
        """Whether the registry names this node and generation for ``reg`` (True if it does
        not answer: the lease's deadline covers that). A newer holder ends our lease now."""
        registry = self.relay.registry
        assert registry is not None
        try:
            rec = await registry.lookup(reg.session_id)
        except RegistryUnavailable:
            return True
        if rec is not None and (rec.generation, rec.node_id) == (
            reg.generation,
            self.relay.node_id,
        ):
            return True
        if rec is not None and rec.generation > reg.generation:
            self.relay.lease_lost(
                reg.session_id, reg.generation, f"superseded by generation {rec.generation}"
            )
            return False
        # Gone or older (a restart, a flush, a failover): the next renewal claims it back.
        return True

    async def _look_up(self, sid: str) -> tuple[Registration, HopTarget] | None:
        """The registration of a session another node owns, and where that node takes hops;
        None (the joiner told why) if there is none or the registry cannot say."""
        registry = self.relay.registry
        assert registry is not None
        try:
            rec = await registry.lookup(sid)
            addr = None
            if rec is not None and rec.node_id != self.relay.node_id:
                # Only a member registered now is ever dialled.
                addr = await registry.member_addr_of(rec.node_id)
        except RegistryUnavailable:
            self._refuse_joiner(wire.BANNER_LOOKUP_FAILED, "lookup-failed")
            return None
        if rec is None or addr is None:
            self._refuse_joiner(
                wire.BANNER_NO_HOST_FORMAT.format(session_id=sid), "unknown-session"
            )
            return None
        reg = Registration(
            session_id=sid,
            node_addr=self.relay.node_addr,
            host_user=rec.host_user,
            host_key_blobs=rec.host_key_blobs,
            client_key_blobs=rec.client_key_blobs,
            generation=rec.generation,
            owner=None,
            invites=rec.invites,
        )
        return reg, HopTarget(addr, rec.node_id, rec.generation)

    def _reg_current(self) -> bool:
        """Whether this joiner's session may still be served through this node."""
        reg = self._reg
        if reg is None:
            return False
        if self._target is not None:
            return True  # the owner checks its own lease when the hop arrives
        if self.relay.table.get(reg.session_id) is not reg:
            return False
        registry = self.relay.registry
        return registry is None or registry.holds(reg.session_id, reg.generation)

    async def _screen_hop(self, username: str, blob: bytes) -> bool:
        """A hop's certificate, checked before asyncssh sees it: signed by the cluster key,
        for this joiner's session at the generation this node holds, naming a joiner key
        the session allows. Anything else is refused (and never read as a plain key)."""
        self._hop_claim = None
        try:
            claim = verify_hop_certificate(
                blob, self.relay.identity.key.public.blob, username, int(time.time())
            )
            joiner_blob = claim.auth.public_key().blob
        except RemoteProtocolError as exc:
            log.info("refused a hop from %s: %s", self.peer(), exc)
            self.relay.metrics.auth_failures.labels(reason="bad-hop").inc()
            return False
        reg = self._reg
        if claim.to_node != self.relay.node_id:
            log.info("refused a hop from node %s meant for node %s", claim.from_node, claim.to_node)
            self.relay.metrics.auth_failures.labels(reason="bad-hop").inc()
            return False
        if reg is None or not self._reg_current() or reg.generation != claim.generation:
            log.info(
                "refused a hop from node %s: it asked for generation %d, this node holds %s",
                claim.from_node,
                claim.generation,
                "none" if reg is None or not self._reg_current() else reg.generation,
            )
            self.relay.metrics.auth_failures.labels(reason="stale-hop").inc()
            return False
        token = self._token
        if token is not None and token.invite is not None:
            allowed = wire.invite_digest(token.invite) in reg.invites
        else:
            allowed = reg.allows_client(joiner_blob)
        if not allowed:
            self.relay.metrics.auth_failures.labels(reason="bad-key").inc()
            return False
        self._hop_claim = claim
        return True

    def _refuse_joiner(self, text: str, reason: str) -> None:
        """Say why in the user-auth banner; the auth that follows fails, unpenalised."""
        assert self.conn is not None
        self._refused_text = text
        self.conn.send_auth_banner(text)
        if reason in ("unknown-session", "lookup-failed", "lease-not-held"):
            self.relay.metrics.auth_failures.labels(reason=reason).inc()
        else:
            self.relay.metrics.refusals.labels(reason=reason).inc()
        if self.gate is not None:
            self.gate.no_penalty = True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self.gate is not None:
            self.gate.auth_attempted = True
        blob = bytes(key.public_data)
        if self.is_host:
            allowed = self.relay.host_keys
            if allowed is not None and blob not in allowed:
                log.info(
                    "refused host %s: key %s is not in --authorized-keys",
                    self.peer(),
                    wire.fingerprint_sha256(blob),
                )
                self.relay.metrics.auth_failures.labels(reason="host-not-authorized").inc()
                return False
            return True
        reg = self._reg
        if self.hop or reg is None or not self._reg_current():
            return False  # the cluster listener takes hop certificates only
        if self._token is not None and self._token.invite is not None:
            # Only codes the host declared get past here (as digests); the host checks the
            # code, its limits and the key itself.
            if wire.invite_digest(self._token.invite) in reg.invites:
                return True
            self.relay.metrics.auth_failures.labels(reason="unknown-invite").inc()
            if self._refused_text is None and self.conn is not None:
                self._refused_text = wire.BANNER_UNKNOWN_INVITE.format(session_id=reg.session_id)
                self.conn.send_auth_banner(self._refused_text)
            return False
        if reg.allows_client(blob):
            return True
        self.relay.metrics.auth_failures.labels(reason="bad-key").inc()
        if self._refused_text is None and self.conn is not None:
            self._refused_text = wire.BANNER_KEY_NOT_ALLOWED.format(
                session_id=reg.session_id, fingerprint=wire.fingerprint_sha256(blob)
            )
            self.conn.send_auth_banner(self._refused_text)
        return False

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Joiners' certificates are not an identity here; their plain key is. On the cluster
        # listener, a hop certificate already checked in full by _screen_hop.
        return (
            self.hop
            and self._hop_claim is not None
            and bytes(key.public_data) == self.relay.identity.key.public.blob
        )

    def auth_completed(self) -> None:
        assert self.conn is not None
        if self.gate is not None:
            self.gate.auth_completed()
        limits = self.relay.limits
        if self.is_host:
            self._authed_state = "host"
            # Probe hosts: one that vanished without closing TCP is dropped within
            # interval x (count + 1), and its joiners are told at once.
            self.conn.set_keepalive(limits.host_keepalive_s, limits.host_keepalive_count)
            if limits.host_rate_bytes_s > 0 and self.gate is not None:
                self.gate.limit_rate(limits.host_rate_bytes_s, limits.host_burst_bytes)
        else:
            self._authed_state = "joiner"
            self.conn.set_keepalive(limits.joiner_keepalive_s, limits.joiner_keepalive_count)
            if self._hop_claim is not None:
                self.relay.metrics.hops.labels(direction="in").inc()
            reg = self._reg
            if reg is not None:
                if not self.relay.guard.joiners_by_session.take(reg.session_id):
                    # Raced with another joiner past begin_auth: the session filled up.
                    self.relay.metrics.refusals.labels(reason="joiners-per-session").inc()
                    self.disconnect(f"upterm: session {reg.session_id} is full")
                    return
                self._joined = reg.session_id
                self.relay.metrics.joiners.inc()
        self.relay.metrics.connections.labels(state=self._authed_state).inc()
        self._arm_unused()

    def _arm_unused(self) -> None:
        """Close this connection if it keeps nothing open for ``unused_timeout_s``."""
        self._disarm_unused()
        if not self._lost and self.relay.limits.unused_timeout_s > 0:
            self._unused_timer = asyncio.get_running_loop().call_later(
                self.relay.limits.unused_timeout_s, self._unused
            )

    def _disarm_unused(self) -> None:
        if self._unused_timer is not None:
            self._unused_timer.cancel()
            self._unused_timer = None

    def _unused(self) -> None:
        self._unused_timer = None
        what = "session" if self.is_host else "channel"
        log.info(
            "closed %s: no %s open for %.0f s",
            self.peer(),
            what,
            self.relay.limits.unused_timeout_s,
        )
        self.relay.metrics.refusals.labels(reason="unused-connection").inc()
        self.disconnect(
            f"upterm: closed after {self.relay.limits.unused_timeout_s:.0f} s with no {what} open"
        )

    def _key_proven(self, key_blob: bytes) -> None:
        claim = self._hop_claim
        # A hop proved the entry node's key; the identity that counts is the joiner's.
        self._auth_key = claim.auth.public_key().blob if claim is not None else key_blob

    def peer(self) -> str:
        """The peer's address as ``host:port`` (the PROXY header's source, if any)."""
        assert self.conn is not None
        return format_addr(self.conn.get_extra_info("peername"))

    def source_key(self) -> str:
        """The network block this peer counts under for per-source quotas."""
        if self.gate is not None:
            return self.relay.guard.key(self.gate.addr)
        peer = self.conn.get_extra_info("peername") if self.conn is not None else None
        return self.relay.guard.key(str(peer[0]) if isinstance(peer, tuple) else "")

    # -- host side: registration and forwarding --

    async def _create_session(self, payload: bytes) -> sshcompat.GlobalReply:
        assert self.conn is not None
        if self._lost:
            # Queued before the connection went: nothing may be taken on its behalf now.
            return sshcompat.GlobalReply(False, b"connection closed")
        if not self.is_host:
            return sshcompat.GlobalReply(False, b"only hosts may create sessions")
        if self.relay.draining:
            return sshcompat.GlobalReply(False, b"upterm: this relay is restarting; retry")
        limits = self.relay.limits
        guard = self.relay.guard
        if len(self._owned) >= limits.sessions_per_connection:
            return self._quota_refusal(
                "sessions-per-connection",
                f"too many sessions on one connection (at most {limits.sessions_per_connection})",
            )
        if limits.sessions_total and len(self.relay.table) >= limits.sessions_total:
            return self._quota_refusal(
                "sessions-total", "this relay is full; try again later or use another relay"
            )
        key_count = guard.sessions_by_key.count(self._auth_key)
        if guard.sessions_by_key.limit and key_count >= guard.sessions_by_key.limit:
            return self._quota_refusal(
                "sessions-per-key",
                f"too many sessions for this host key (at most {limits.sessions_per_key})",
            )
        src_count = guard.sessions_by_source.count(self.source_key())
        if guard.sessions_by_source.limit and src_count >= guard.sessions_by_source.limit:
            return self._quota_refusal(
                "sessions-per-source",
                f"too many sessions from your address (at most {limits.sessions_per_source})",
            )
        try:
            req = wire.CreateSessionRequest.decode(payload)
            if len(req.client_authorized_keys) > MAX_KEYS_PER_SESSION:
                raise RemoteProtocolError("failed to create session: too many authorized keys")
            if req.host_key_proof:
                sid, generation = self._verify_proof(req)
            else:
                sid, generation = wire.random_session_id(), 0
            host_keys = [wire.parse_public_key_line(k) for k in req.host_public_keys]
            client_keys = [wire.parse_public_key_line(k) for k in req.client_authorized_keys]
        except RemoteProtocolError as exc:
            log.info("refused registration from %s: %s", self.peer(), exc)
            self.relay.metrics.refusals.labels(reason="bad-registration").inc()
            return sshcompat.GlobalReply(False, str(exc).encode())
        host_blobs = tuple(k.blob for k in host_keys if k is not None)
        if not host_blobs:
            return sshcompat.GlobalReply(False, b"failed to create session: no host key")
        reg = Registration(
            session_id=sid,
            node_addr=self.relay.node_addr,
            host_user=printable(req.host_user, 64),
            host_key_blobs=host_blobs,
            client_key_blobs=frozenset(k.blob for k in client_keys if k is not None),
            generation=generation,
            owner=self,
        )
        refusal = await self.relay.claim(reg)
        if refusal is not None:
            return sshcompat.GlobalReply(False, refusal)
        try:
            if self._lost:
                raise Superseded()  # went while the registry answered: nothing is kept
            self.relay.register(reg)
        except Superseded as exc:
            self.relay.release_lease(reg.session_id, reg.generation)
            return sshcompat.GlobalReply(False, str(exc).encode())
        self._owned.add(sid)
        self._disarm_unused()
        guard.sessions_by_key.take(self._auth_key)
        guard.sessions_by_source.take(self.source_key())
        log.info(
            "session %s registered by %s (user %r, key %s, generation %d, %d authorized keys)",
            sid,
            self.peer(),
            reg.host_user,
            wire.fingerprint_sha256(self._auth_key) if self._auth_key else "?",
            generation,
            len(reg.client_key_blobs),
        )
        resp = wire.CreateSessionResponse(
            session_id=sid,
            node_addr=reg.node_addr,
            ssh_user=wire.encode_token(sid, reg.node_addr),
            session_key_redial=True,
        )
        return sshcompat.GlobalReply(True, resp.encode())

    def _quota_refusal(self, reason: str, text: str) -> sshcompat.GlobalReply:
        log.info("refused registration from %s: %s", self.peer(), text)
        self.relay.metrics.refusals.labels(reason=reason).inc()
        return sshcompat.GlobalReply(False, f"upterm: {text}".encode())

    async def _invites(self, payload: bytes) -> sshcompat.GlobalReply:
        """A host declares the invite codes (digests) its session honours."""
        if self._lost or not self.is_host:
            return sshcompat.GlobalReply(False, b"only hosts may declare invites")
        try:
            sid, digests = wire.decode_invites(payload)
        except RemoteProtocolError as exc:
            return sshcompat.GlobalReply(False, str(exc).encode())
        reg = self.relay.table.get(sid)
        if sid not in self._owned or reg is None or reg.owner is not self:
            return sshcompat.GlobalReply(False, b"upterm: not your session")
        reg.invites = digests
        if self.relay.registry is not None:
            # Other nodes admit joiners by what the registry says: it must know the codes
            # (this node admits them already; a re-claim writes them too).
            try:
                stored = await self.relay.registry.update(self.relay.record_of(reg))
            except RegistryUnavailable:
                stored = False
            if not stored:
                return sshcompat.GlobalReply(False, REGISTRY_DOWN_TEXT.encode())
        return sshcompat.GlobalReply(True)

    async def _web_link(self, payload: bytes) -> sshcompat.GlobalReply:
        """A host declares (or withdraws) its session's web link; the reply is the page's
        base URL."""
        if self._lost or not self.is_host:
            return sshcompat.GlobalReply(False, b"only hosts may declare web links")
        try:
            req = wire.WebRegistration.decode(payload)
        except RemoteProtocolError as exc:
            return sshcompat.GlobalReply(False, str(exc).encode())
        reg = self.relay.table.get(req.session_id)
        if req.session_id not in self._owned or reg is None or reg.owner is not self:
            return sshcompat.GlobalReply(False, b"upterm: not your session")
        web = self.relay.web
        if req.web_id and not web.available:
            return sshcompat.GlobalReply(False, WEB_UNAVAILABLE_TEXT.encode())
        refusal = web.declare(req)
        if refusal is not None:
            return sshcompat.GlobalReply(False, refusal.encode())
        return sshcompat.GlobalReply(True, wire.ssh_string(web.base_url.encode()))

    def _verify_proof(self, req: wire.CreateSessionRequest) -> tuple[str, int]:
        assert self.conn is not None
        key = wire.check_proof_fields(req)
        try:
            ssh_key = asyncssh.import_public_key(key.authorized_key_line())
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise RemoteProtocolError(f"{wire.REFUSED_PROOF}: unusable host key") from exc
        payload = wire.proof_payload(
            sshcompat.session_id(self.conn), req.session_secret, req.generation
        )
        if not ssh_key.verify(payload, req.host_key_proof):
            raise RemoteProtocolError(f"{wire.REFUSED_PROOF}: bad signature")
        return wire.derive_session_id(key.blob, req.session_secret), req.generation

    def unix_server_requested(self, listen_path: str) -> Any:
        if listen_path.endswith(wire.DIRECT_PATH_SUFFIX) and self.is_host:
            sid = listen_path[: -len(wire.DIRECT_PATH_SUFFIX)]
            if sid in self._owned:
                # The host takes its joiners' terminal bytes directly (daemon.direct).
                self.direct_sessions.add(sid)
                return sshcompat.PassiveListener(lambda: self.direct_sessions.discard(sid))
        if not self.is_host or listen_path not in self._owned:
            log.info(
                "refused forward of %r from %s: not its session",
                printable(listen_path, 80),
                self.peer(),
            )
            return False
        if not self.relay.table.mark_forwarded(listen_path, self):
            return False
        return sshcompat.PassiveListener(lambda: self.drop_session(listen_path))

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        if not self.is_host:
            self.note(wire.REMOTE_FORWARDING_REFUSED)
        return False

    def note(self, text: str) -> None:
        """Tell the joiner once, on its terminal's stderr, what it asked for and never gets
        (OpenSSH shows a bare failure or nothing)."""
        if text not in self.notes:
            self.notes.add(text)
            for session in self._sessions:
                session.tell(f"upterm: {text}")

    # -- joiner side: proxy each session channel to the host --

    def session_requested(self) -> Any:
        if self.is_host or self._reg is None:
            return False
        self._take_channel()
        session = _JoinerSession(self)
        self._sessions.add(session)
        return session

    def _take_channel(self) -> None:
        """Count one more open channel, or refuse it with a reason the client shows."""
        limit = self.relay.limits.channels_per_joiner
        if limit and self.open_channels >= limit:
            self.relay.metrics.refusals.labels(reason="channels-per-joiner").inc()
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"upterm: too many open channels on this connection (at most {limit})",
            )
        self.open_channels += 1
        self._disarm_unused()

    def channel_closed(self, session: _JoinerSession | None = None) -> None:
        """A channel counted by :meth:`_take_channel` has closed."""
        self.open_channels = max(0, self.open_channels - 1)
        if session is not None:
            self._sessions.discard(session)
        if not self.open_channels:
            self._arm_unused()

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        """``ssh -J TOKEN@relay TOKEN@upterm``: splice to the host's inner server, end to end.

        The relay carries opaque SSH bytes between the joiner and the host's inner server;
        it authenticated the joiner for this hop only and sees no keystroke or output.
        Any other destination is refused: the relay is not a TCP proxy.
        """
        if self.is_host or self._reg is None:
            return False
        if dest_host != E2E_DESTINATION:
            return self._forward(dest_host, dest_port, orig_host, orig_port)
        sid = self._reg.session_id
        if self._target is not None:
            # Owned by another node: the splice goes through the hop, still end to end.
            self._take_channel()
            log.info("joiner %s opened an end-to-end channel to %s via a hop", self.peer(), sid)

            async def via_hop(factory: Callable[[], Any]) -> tuple[Any, Any]:
                hop = await asyncio.shield(self.upstream())
                return await hop.create_connection(
                    factory, E2E_DESTINATION, dest_port, max_pktsize=TUNNEL_MAX_PACKET_BYTES
                )

            return _open_splice(self, via_hop)
        host_conn = self._live_host()
        if host_conn is None:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED,
                wire.BANNER_NO_HOST_FORMAT.format(session_id=self._reg.session_id).strip(),
            )
        self._take_channel()
        log.info("joiner %s opened an end-to-end channel to %s", self.peer(), sid)
        return _open_splice(
            self,
            lambda factory: host_conn.create_unix_connection(
                factory, sid, max_pktsize=TUNNEL_MAX_PACKET_BYTES
            ),
        )

    def _forward(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        """``ssh -L`` in relay mode: the host decides (its inner server refuses unless the
        host allowed forwarding), so the channel goes to it as the joiner opened it; the
        relay itself never connects anywhere."""
        self._take_channel()

        async def via_host(factory: Callable[[], Any]) -> tuple[Any, Any]:
            try:
                upstream = await asyncio.shield(self.upstream())
                return await upstream.create_connection(
                    factory,
                    dest_host,
                    dest_port,
                    orig_host,
                    orig_port,
                    max_pktsize=TUNNEL_MAX_PACKET_BYTES,
                )
            except asyncssh.ChannelOpenError:
                raise  # the host's own refusal, with its words
            except Exception as exc:
                log.info("joiner %s: forward to its host failed: %r", self.peer(), exc)
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_CONNECT_FAILED, f"upterm: {wire.UPSTREAM_UNAVAILABLE}"
                ) from None

        return _open_splice(self, via_host)

    def _live_host(self) -> asyncssh.SSHServerConnection | None:
        """The connection of this joiner's host, if its registration is still current."""
        reg = self._reg
        if reg is None or self._target is not None:
            return None  # carried by another node: no host connection here
        live = self.relay.live_host(reg.session_id)
        return live[1] if live is not None and live[0] is reg else None

    def upstream(self) -> asyncio.Task[asyncssh.SSHClientConnection]:
        """The SSH connection to the host's inner server, opened once per joiner."""
        if self._upstream is None:
            self._upstream = asyncio.ensure_future(self._open_upstream())
        return self._upstream

    def _joiner_auth(self) -> wire.AuthRequest:
        """The joiner as the host (or the owning node) is told about it."""
        assert self.conn is not None and self._auth_key is not None
        claim = self._hop_claim
        if claim is not None:
            # Carried by another node: the joiner's own address and client, not the node's.
            return wire.AuthRequest(
                client_version=claim.auth.client_version,
                remote_addr=claim.auth.remote_addr,
                authorized_key=wire.PublicKey(self._auth_key).authorized_key_line(),
                local_addr=claim.auth.local_addr,
            )
        return wire.AuthRequest(
            client_version=self.conn.get_extra_info("client_version") or "",
            remote_addr=self.peer(),
            authorized_key=wire.PublicKey(self._auth_key).authorized_key_line(),
            local_addr=format_addr(self.conn.get_extra_info("sockname")),
        )

    async def _open_upstream(self) -> asyncssh.SSHClientConnection:
        assert self.conn is not None and self._reg is not None and self._auth_key is not None
        reg = self._reg
        username = self.conn.get_extra_info("username") or ""
        auth = self._joiner_auth()
        if self._target is not None:
            return await self.relay.dial_member(self._target, username, auth)
        host_conn = self._live_host()
        if host_conn is None:
            raise HostGone()
        # Upstream puts the raw exchange hash in the key id; hex keeps it UTF-8, which
        # asyncssh hosts require, and no host reads it.
        key_id = sshcompat.session_id(self.conn).hex().encode()
        return await self.relay.open_inner(host_conn, reg, username, auth, key_id)


#: Why a host's ``--web`` is refused here.
WEB_UNAVAILABLE_TEXT = (
    "upterm: this relay serves no web page (it needs a WebSocket listener, --ws-addr, "
    "and its page built by scripts/build-web.sh)"
)


class HostGone(ConnectionError):
    """The joiner's host is not connected (any more)."""


async def _open_splice(
    link: RelayConnection, open_peer: Callable[[Callable[[], Any]], Awaitable[tuple[Any, Any]]]
) -> _Splice:
    """The joiner's side of an end-to-end splice; ``open_peer(factory)`` opens the other
    (a channel to the host's inner server, or through a hop to the node that has it)."""
    relay = link.relay
    joiner_side = _Splice(relay, link=link)
    host_factory: Any = lambda: _Splice(relay, peer=joiner_side)  # noqa: E731
    try:
        _, host_side = await open_peer(host_factory)
    except BaseException:
        link.channel_closed()
        raise
    joiner_side.peer = cast(_Splice, host_side)
    return joiner_side


class _MergedWrites:
    """Data towards one channel, merged per event-loop pass.

    What one read of the socket brings is passed on in one write at the end of that pass:
    a host's inner SSH packets are a few bytes over an OpenSSH joiner's 32 KiB channel
    packet limit, and written one by one each would become a full packet and a runt,
    doubling the packets (and the cipher calls) towards the joiner. The first small piece
    a socket read brings (a keystroke, its echo) is written at once, with nothing to
    schedule; from a second piece on, the rest of that pass is merged, so a flood of tiny
    packets costs one write per pass, not one per packet. Order is kept, and pieces of
    different stream types (stdout, stderr) are never merged together.
    """

    def __init__(self, write: Callable[[bytes, int | None], None]) -> None:
        self._write = write
        self._pending: list[tuple[bytes, int | None]] = []
        self._pass_open = False
        #: The socket read (Gate.reads) whose first small piece was written at once.
        self._read = -1

    def add(self, data: bytes, datatype: int | None = None) -> None:
        if self._pass_open:
            self._pending.append((data, datatype))
            return  # merged at the end of this pass
        if len(data) < COALESCE_MIN_BYTES and self._read != Gate.reads:
            self._read = Gate.reads
            self._write(data, datatype)
            return
        self._pending.append((data, datatype))
        self._pass_open = True
        asyncio.get_running_loop().call_soon(self._end_pass)

    def _end_pass(self) -> None:
        self._pass_open = False
        if self._pending:
            self.flush()

    def flush(self) -> None:
        """Write what is waiting now (before an EOF or a close, which must come after)."""
        pending, self._pending = self._pending, []
        for datatype, group in itertools.groupby(pending, key=lambda item: item[1]):
            chunks = [data for data, _ in group]
            self._write(chunks[0] if len(chunks) == 1 else b"".join(chunks), datatype)


class _Splice(asyncssh.SSHTCPSession[bytes]):
    """One end of an opaque byte splice between two channels, with flow control.

    The joiner's end (``link`` set) counts as one of its open channels.
    """

    def __init__(
        self,
        relay: Relay,
        peer: _Splice | None = None,
        link: RelayConnection | None = None,
    ) -> None:
        self._relay = relay
        self.peer = peer
        self._link = link
        self.chan: Any = None  # a TCP channel (joiner side) or a UNIX channel (host side)
        self._out = _MergedWrites(self._write)
        self._bytes = relay.metrics.bytes.labels(
            direction="splice_host_to_joiner" if link is None else "splice_joiner_to_host"
        )

    def connection_made(self, chan: Any) -> None:
        self.chan = chan
        sshcompat.merge_channel_buffers(chan)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self._relay.observer is not None:
            self._relay.observer("splice", data)
        self._bytes.inc(len(data))
        self._out.add(data)

    def _write(self, data: bytes, _datatype: int | None) -> None:
        peer = self.peer
        if peer is None or peer.chan is None or self.chan is None:
            return
        try:
            peer.chan.write(data)
        except (OSError, asyncssh.Error):
            return  # the other side is closing; its connection_lost closes this one
        if peer.chan.get_write_buffer_size() > PROXY_HIGH_WATER_BYTES:
            self.chan.pause_reading()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.chan is not None:
            self.peer.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.chan is not None:
            self.peer.chan.resume_reading()

    def eof_received(self) -> bool:
        self._out.flush()  # data that came with the EOF goes first
        if self.peer is not None and self.peer.chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.peer.chan.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.flush()
        if self._link is not None:
            self._link.channel_closed()
            self._link = None
        if self.peer is not None and self.peer.chan is not None:
            self.peer.chan.close()


#: A host's refusal of a session's request (exec, subsystem, shell, pty), as asyncssh reports it.
_REQUEST_REFUSED = frozenset({OPEN_REQUEST_SESSION_FAILED, OPEN_REQUEST_PTY_FAILED})
HOST_REFUSED_COMMAND = (
    "the host runs no commands and has no file transfer (ssh TOKEN@HOST COMMAND, scp, sftp); "
    "join with a plain ssh line"
)
HOST_REFUSED_TERMINAL = "the host refused to open a terminal for you"


class _JoinerSession(asyncssh.SSHServerSession[bytes]):
    """A joiner's session channel, replayed request by request on a host channel."""

    def __init__(self, link: RelayConnection) -> None:
        self._link = link
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._up: asyncssh.SSHClientChannel[bytes] | None = None
        #: Input held until the host answers, as runs of one stream type (merged on arrival:
        #: memory is what was sent, not an entry per packet).
        self._pending: list[tuple[bytearray, int | None]] = []
        #: Bytes in _pending, kept as a running count (never re-summed per packet).
        self._pending_bytes = 0
        self._pending_eof = False
        self._closed = False
        self._out = _MergedWrites(self._write_host_output)
        self._in = _MergedWrites(self._write_to_host)
        metrics = link.relay.metrics
        self._in_bytes = metrics.bytes.labels(direction="joiner_to_host")
        self.out_bytes = metrics.bytes.labels(direction="host_to_joiner")
        self._term: tuple[str, tuple[int, int, int, int], Mapping[int, int]] | None = None
        self._size: tuple[int, int, int, int] | None = None
        self._size_pending: tuple[int, int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        #: The host's direct channel for this terminal (see upterm.daemon.direct), and the
        #: channel the joiner's bytes go on: it, or the host channel.
        self._direct: Any = None
        self._data: Any = None
        #: The host channel's end (status, signal), held until the direct channel closed.
        self._host_end: tuple[int | None, tuple[str, bool, str] | None] | None = None
        self._host_end_timer: asyncio.TimerHandle | None = None
        #: The host could not be reached (a direct channel still opening is closed).
        self._failed = False

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        sshcompat.merge_channel_buffers(chan)
        sshcompat.on_refused_forwarding(chan, self._refused_forwarding)
        for text in sorted(self._link.notes):
            self.tell(f"upterm: {text}")

    def _refused_forwarding(self, what: str) -> None:
        self._link.note(
            wire.AGENT_FORWARDING_REFUSED if what == "agent" else wire.X11_FORWARDING_REFUSED
        )

    def tell(self, text: str) -> None:
        """A line of ours on the joiner's terminal (stderr)."""
        if self._chan is not None and not self._closed:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._chan.write_stderr(f"\r\n{text}\r\n".encode())

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Mapping[int, int]
    ) -> bool:
        self._term = (term_type, term_size, term_modes)
        return True

    def shell_requested(self) -> bool:
        return self._start(command=None, subsystem=None)

    def exec_requested(self, command: str) -> bool:
        # The host decides what an exec request means; the relay only carries it.
        return self._start(command=command, subsystem=None)

    def subsystem_requested(self, subsystem: str) -> bool:
        return self._start(command=None, subsystem=subsystem)

    def _start(self, command: str | None, subsystem: str | None) -> bool:
        if self._task is not None:
            return False
        self._task = asyncio.ensure_future(self._open(command, subsystem))
        return True

    async def _open(self, command: str | None, subsystem: str | None) -> None:
        assert self._chan is not None
        chan = self._chan
        # A terminal's direct channel opens while the inner connection does (its handshake
        # takes round trips; the channel one), so it costs the join no time.
        direct = None
        if self._term is not None and command is None and subsystem is None:
            direct = asyncio.ensure_future(self._open_direct())
        try:
            # Shielded: cancelling this channel must not cancel the joiner's other channels.
            upstream = await asyncio.shield(self._link.upstream())
            kwargs: dict[str, Any] = {}
            if self._term is not None:
                kwargs.update(
                    term_type=self._term[0],
                    term_size=self._size or self._term[1],
                    term_modes=self._term[2],
                )
            # Shielded: a channel cancelled while it opens would be left open, cookieless,
            # on the host's tunnel; once open, _open_direct closes it if no longer wanted.
            cookie = await asyncio.shield(direct) if direct is not None else None
            if cookie is not None:
                kwargs.update(env={wire.DIRECT_ENV: cookie.hex()})
            up_chan, _ = await upstream.create_session(
                lambda: _HostSideSession(self),
                command=command,
                subsystem=subsystem,
                encoding=None,
                max_pktsize=INNER_MAX_PACKET_BYTES,
                **kwargs,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("joiner %s could not reach its host: %r", self._link.peer(), exc)
            self._failed = True
            if self._direct is not None:
                self._direct.close()
            # Fixed texts, as upstream: nothing about the host or its address leaks.
            hop = self._link._target is not None
            if (
                isinstance(exc, HostGone)
                or (not hop and self._link._live_host() is None)
                or (hop and isinstance(exc, (OSError, asyncssh.DisconnectError)))
            ):
                # Its host is gone (or went while we dialled): upstream's words for that.
                sid = self._link._reg.session_id if self._link._reg else "?"
                chan.write_stderr(wire.BANNER_NO_HOST_FORMAT.format(session_id=sid).encode())
                chan.exit(1)
                return
            if isinstance(exc, asyncssh.PermissionDenied):
                reason = wire.UPSTREAM_AUTH_FAILED  # the host refused this joiner
            elif isinstance(exc, asyncssh.HostKeyNotVerifiable):
                reason = wire.UPSTREAM_HOST_KEY_MISMATCH
            elif isinstance(exc, asyncssh.ChannelOpenError) and exc.code in _REQUEST_REFUSED:
                # The host is there and said no to this request (hosts that say no without
                # saying why: upstream's, and ours before they did).
                reason = (
                    HOST_REFUSED_COMMAND
                    if command is not None or subsystem is not None
                    else HOST_REFUSED_TERMINAL
                )
            else:
                reason = wire.UPSTREAM_UNAVAILABLE
            chan.write_stderr(f"upterm: {reason}\r\n".encode())
            chan.exit(1)
            return
        self._up = up_chan
        data_chan = self._data = self._direct or up_chan
        for data, datatype in self._pending:
            data_chan.write(bytes(data), datatype)
        self._pending.clear()
        self._pending_bytes = 0
        chan.resume_reading()
        if self._pending_eof:
            data_chan.write_eof()

    async def _open_direct(self) -> bytes | None:
        """Open a direct channel to the host for this terminal, if the host takes them:
        its bytes then skip the inner SSH layer (upterm.daemon.direct). Returns the cookie
        the session channel names it by, or None (then everything goes on that channel)."""
        link = self._link
        reg, host_conn = link._reg, link._live_host()
        if reg is None or host_conn is None or not isinstance(reg.owner, RelayConnection):
            return None
        if reg.session_id not in reg.owner.direct_sessions:
            return None  # upstream's host, or ours before direct channels
        cookie = secrets.token_bytes(wire.DIRECT_COOKIE_BYTES)
        try:
            chan, _ = await host_conn.create_unix_connection(
                lambda: _HostDirect(self),
                reg.session_id + wire.DIRECT_PATH_SUFFIX,
                max_pktsize=INNER_MAX_PACKET_BYTES,
            )
        except (OSError, asyncssh.Error) as exc:
            log.info("no direct channel to the host of %s: %r", reg.session_id, exc)
            return None
        if self._closed or self._failed:
            chan.close()
            return None
        try:
            chan.write(cookie)
        except (OSError, asyncssh.Error):
            chan.close()
            return None  # the host closed it at once: the host channel carries everything
        self._direct = chan
        return cookie

    # joiner → host

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self._link.relay.observer is not None:
            self._link.relay.observer("relay", data)
        self._in_bytes.inc(len(data))
        if self._up is None:
            # Held until the host answers: bounded, then the joiner's window does the rest.
            if self._pending and self._pending[-1][1] == datatype:
                self._pending[-1][0].extend(data)
            else:
                self._pending.append((bytearray(data), datatype))
            self._pending_bytes += len(data)
            if self._pending_bytes >= self._link.relay.limits.pending_bytes and self._chan:
                self._chan.pause_reading()
            return
        self._in.add(data, datatype)

    def _write_to_host(self, data: bytes, datatype: int | None) -> None:
        up = self._data
        if up is None:
            return
        try:
            up.write(data, datatype)
        except (OSError, asyncssh.Error):
            return  # the host side is closing; its connection_lost ends this channel
        if up.get_write_buffer_size() > PROXY_HIGH_WATER_BYTES and self._chan:
            self._chan.pause_reading()

    def eof_received(self) -> bool:
        if self._data is None:
            self._pending_eof = True
        else:
            self._in.flush()  # input that came before the EOF goes first
            with contextlib.suppress(OSError, asyncssh.Error):
                self._data.write_eof()
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        # Only the last size of an event-loop pass goes on: a flood of window-change
        # requests becomes one resize of the host's terminal, not a SIGWINCH storm.
        pending = self._size_pending
        self._size = self._size_pending = (width, height, pixwidth, pixheight)
        if pending is None:
            asyncio.get_running_loop().call_soon(self._send_size)

    def _send_size(self) -> None:
        size, self._size_pending = self._size_pending, None
        if size is not None and self._up is not None and not self._closed:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._up.change_terminal_size(*size)

    def signal_received(self, signal: str) -> None:
        if self._up is not None:
            self._up.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self._up is None:
            return False
        self._up.send_break(msec)
        return True

    def _host_reading(self, on: bool) -> None:
        """Read the host's output (both of its channels: the status must not overtake the
        output) or stop."""
        for chan in (self._up, self._direct):
            if chan is not None:
                (chan.resume_reading if on else chan.pause_reading)()

    def pause_writing(self) -> None:
        self._host_reading(False)

    def resume_writing(self) -> None:
        self._host_reading(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._in.flush()
        self._closed = True
        self._link.channel_closed(self)
        self._pending.clear()
        self._pending_bytes = 0
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._host_end_timer is not None:
            self._host_end_timer.cancel()
            self._host_end_timer = None
        if self._up is not None:
            self._up.close()
        if self._direct is not None:
            self._direct.close()

    # host → joiner (called by _HostSideSession)

    def host_data(self, data: bytes, datatype: int | None) -> None:
        self._out.add(data, datatype)

    def _write_host_output(self, data: bytes, datatype: int | None) -> None:
        if self._chan is None:
            return
        try:
            self._chan.write(data, datatype)
        except (OSError, asyncssh.Error):
            return  # the joiner is gone; its connection_lost closes the host side
        if self._chan.get_write_buffer_size() > PROXY_HIGH_WATER_BYTES:
            self._host_reading(False)

    def host_paused(self) -> None:
        """The host channel's send window is full: stop reading the joiner."""
        if self._chan is not None:
            self._chan.pause_reading()

    def host_resumed(self) -> None:
        if self._chan is not None:
            self._chan.resume_reading()

    def host_eof(self) -> None:
        self._out.flush()  # output that came with the EOF goes first
        if self._chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._chan.write_eof()

    def direct_lost(self) -> None:
        """The direct channel closed: after the host's last output (its end, held until
        now, goes on), or the host refused it (the host channel carries everything)."""
        self._direct = None
        if self._host_end_timer is not None:
            self._host_end_timer.cancel()
            self._host_end_timer = None
        end, self._host_end = self._host_end, None
        if end is not None:
            self.host_closed(*end)
        elif self._up is not None:
            self._data = self._up
            self.host_resumed()  # it may have paused the joiner; the host channel decides now

    def _direct_late(self) -> None:
        self._host_end_timer = None
        if self._direct is None:
            return
        if self._chan is not None and self._chan.get_write_buffer_size():
            # The joiner is still taking the host's last output: not the host's delay.
            self._host_end_timer = asyncio.get_running_loop().call_later(
                DIRECT_CLOSE_S, self._direct_late
            )
            return
        log.info("a host left a direct channel open after its session channel closed")
        self._direct.close()
        self.direct_lost()

    def host_closed(self, status: int | None, signal: tuple[str, bool, str] | None) -> None:
        if self._direct is not None:
            # The host closes the direct channel first, once its output there is sent;
            # whatever else happened, the joiner is not held longer than DIRECT_CLOSE_S.
            self._host_end = (status, signal)
            if self._host_end_timer is None:
                self._host_end_timer = asyncio.get_running_loop().call_later(
                    DIRECT_CLOSE_S, self._direct_late
                )
            return
        self._out.flush()
        if self._chan is None:
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            if signal is not None:
                self._chan.exit_with_signal(signal[0], signal[1], signal[2])
            elif status is not None:
                self._chan.exit(status)
            else:
                self._chan.close()


class _ToJoiner:
    """What a channel from the host hands its joiner: output, EOF and flow control."""

    _joiner: _JoinerSession

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._joiner.out_bytes.inc(len(data))
        self._joiner.host_data(data, datatype)

    def eof_received(self) -> bool:
        self._joiner.host_eof()
        return True

    def pause_writing(self) -> None:
        self._joiner.host_paused()

    def resume_writing(self) -> None:
        self._joiner.host_resumed()


class _HostDirect(_ToJoiner, asyncssh.SSHUNIXSession[bytes]):
    """The relay's end of a direct channel (upterm.daemon.direct): a joiner terminal's
    bytes, both ways, without the inner SSH layer."""

    def __init__(self, joiner: _JoinerSession) -> None:
        self._joiner = joiner

    def connection_made(self, chan: Any) -> None:
        sshcompat.merge_channel_buffers(chan)
        sshcompat.carry_stderr(chan)

    def connection_lost(self, exc: Exception | None) -> None:
        self._joiner.direct_lost()


class _HostSideSession(_ToJoiner, asyncssh.SSHClientSession[bytes]):
    """The relay's end of a host channel; hands everything back to its joiner."""

    def __init__(self, joiner: _JoinerSession) -> None:
        self._joiner = joiner
        self._status: int | None = None
        self._signal: tuple[str, bool, str] | None = None

    def connection_made(self, chan: Any) -> None:
        sshcompat.merge_channel_buffers(chan)

    def exit_status_received(self, status: int) -> None:
        self._status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self._signal = (signal, core_dumped, msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._joiner.host_closed(self._status, self._signal)
