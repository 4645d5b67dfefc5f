"""The ``uptermd`` command: run one relay node."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import resource
import signal
import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric import ed25519

from upterm import __version__, log, wire
from upterm.errors import ConfigError, UptermError
from upterm.keys import (
    EXTRA_KEY_TYPES,
    Ed25519Key,
    KeyPair,
    PrivateHostKey,
    load_any_private_key,
    load_or_create_host_key,
    load_or_create_key,
)
from upterm.relay.cluster import RedisRegistry, new_node_id
from upterm.relay.gate import GateConfig, parse_networks
from upterm.relay.guard import RelayLimits
from upterm.relay.metrics import LoopLagMonitor, serve_http
from upterm.relay.policy import PenaltyConfig, StartupLimits
from upterm.relay.server import Relay, RelayIdentity
from upterm.service import Notifier, tune_allocator

logger = logging.getLogger(__name__)

DEFAULT_SSH_ADDR = "127.0.0.1:2222"
HOST_KEY_NAME = "ssh_host_ed25519_key"
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgG]i?[bB]?|[bB])?$")


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY`` if set, else ``$XDG_STATE_HOME/uptermd``."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "uptermd"


def split_addr(addr: str) -> tuple[str, int]:
    """Parse ``host:port`` / ``[v6]:port``; raises :class:`ConfigError` with what to fix."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"address {addr!r} must be host:port, e.g. 127.0.0.1:2222")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - an empty host means all


def parse_duration_s(text: str, flag: str) -> float:
    """``30s``, ``10m``, ``500ms``, ``1h`` or bare seconds."""
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise ConfigError(f"{flag} {text!r} is not a duration; use e.g. 30s, 10m or 1h")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def parse_size(text: str, flag: str) -> float:
    """``2M``, ``512KiB``, ``100k`` or bare bytes (K = 1024)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ConfigError(f"{flag} {text!r} is not a size; use e.g. 2M or 512K")
    unit = (m.group(2) or "b")[0].lower()
    return float(m.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def load_identity(state_dir: Path, private_keys: tuple[str, ...]) -> RelayIdentity:
    """The ``--private-key`` files, else the persistent keys in the state directory.

    One ed25519 key is required (it signs the certificates hosts check); ECDSA and RSA keys
    beside it serve clients limited to those types. In the state directory all three are
    created on first use, as OpenSSH's ``ssh-keygen -A`` does.
    """
    if not private_keys:
        extra = [
            load_or_create_key(state_dir / name, kind) for kind, name in EXTRA_KEY_TYPES.items()
        ]
        return RelayIdentity.from_key(load_or_create_host_key(state_dir / HOST_KEY_NAME), extra)
    keys: dict[bytes, PrivateHostKey] = {}
    for name in private_keys:
        path = Path(name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --private-key {path}: {exc.strerror}") from exc
        key = load_any_private_key(data, str(path))
        kind = KeyPair(key).public.algorithm.encode()
        if kind in keys:
            raise ConfigError(
                f"--private-key {path} is a second {kind.decode()} key; give one key of each type"
            )
        keys[kind] = key
    signer = keys.pop(b"ssh-ed25519", None)
    if not isinstance(signer, ed25519.Ed25519PrivateKey):
        raise ConfigError(
            "--private-key: uptermd needs an ed25519 key among them (it signs the "
            "certificates hosts check); create one with ssh-keygen -t ed25519"
        )
    return RelayIdentity.from_key(Ed25519Key(signer), list(keys.values()))


def load_host_keys(paths: tuple[str, ...]) -> frozenset[bytes] | None:
    """The keys that may register sessions; None (any key) when no file is given.

    Fails closed: a file that cannot be read or holds no key stops the relay from starting
    rather than opening it to every key.
    """
    if not paths:
        return None
    blobs: set[bytes] = set()
    for name in paths:
        try:
            text = Path(name).read_text(errors="replace")
        except OSError as exc:
            raise ConfigError(
                f"cannot read --authorized-keys {name}: {exc.strerror}; fix the path or "
                "its permissions (the relay will not start open to every key)"
            ) from exc
        keys = wire.parse_public_keys(text)
        if not keys:
            raise ConfigError(
                f"--authorized-keys {name} holds no public key; add the hosts' keys "
                "(the relay will not start open to every key)"
            )
        blobs.update(k.blob for k in keys)
    return frozenset(blobs)


def cluster_options(
    routing: str, redis_url: str, lease_ttl: str, cluster_addr: str, advertise: str
) -> tuple[RedisRegistry | None, tuple[str, int] | None]:
    """The registry and cluster listener of ``--routing redis``; (None, None) for memory."""
    if routing != "redis":
        for flag, value in (
            ("--redis-url", redis_url),
            ("--cluster-addr", cluster_addr),
            ("--cluster-advertise", advertise),
        ):
            if value:
                raise ConfigError(f"{flag} is for a cluster: add --routing redis")
        return None, None
    if not redis_url:
        raise ConfigError(
            "--routing redis needs --redis-url, e.g. redis://10.0.0.5:6379 or "
            "redis+sentinel://10.0.0.5:26379/mymaster"
        )
    if not cluster_addr:
        raise ConfigError(
            "--routing redis needs --cluster-addr HOST:PORT, where the other nodes carry "
            "joiners to this one (on the cluster's private network)"
        )
    at = split_addr(cluster_addr)
    if advertise:
        split_addr(advertise)
    elif at[0] in ("0.0.0.0", "::", ""):  # noqa: S104 - detecting a wildcard, not binding one
        raise ConfigError(
            f"--cluster-addr {cluster_addr} listens on every address, which other nodes "
            "cannot dial: add --cluster-advertise HOST:PORT (e.g. this node's own IP)"
        )
    ttl_s = parse_duration_s(lease_ttl, "--lease-ttl")
    try:
        import redis  # noqa: F401 - checked here so the error is one line at start
    except ImportError as exc:
        raise ConfigError(
            "--routing redis needs the redis Python package (Debian: python3-redis; pip: redis)"
        ) from exc
    registry = RedisRegistry(
        redis_url,
        node_id=new_node_id(),
        member_addr=advertise or cluster_addr,
        ttl_s=ttl_s,
    )
    return registry, at


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd starts us at 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the descriptor limit from %d: %s", soft, exc)
    return soft, hard


async def serve(
    relay: Relay,
    addr_file: Path | None,
    metric_addr: tuple[str, int] | None = None,
    drain_timeout_s: float = 10.0,
    authorized_keys: tuple[str, ...] = (),
    drain_delay_s: float = 0.0,
) -> None:
    """Run until SIGINT/SIGTERM, then drain."""
    try:
        await relay.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {relay.bind_host}:{relay.port}: {exc.strerror}; "
            "choose another --ssh-addr (or --ws-addr)"
        ) from exc
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    logger.info("descriptor limit %d (hard %d)", soft, hard)
    # Everything made so far lives as long as the process: out of the collector's way, so
    # its full collections (which stall every session) have less to walk.
    gc.collect()
    gc.freeze()
    # A short interval: a stall shows as lag only from the wake-up it delays.
    lag = LoopLagMonitor(relay.metrics.loop_lag, interval_s=0.05)
    lag.start()
    http = None
    if metric_addr is not None:
        try:
            http = await serve_http(
                metric_addr[0], metric_addr[1], relay.metrics, lambda: relay.ready
            )
        except OSError as exc:
            relay.close()
            raise ConfigError(
                f"cannot listen on {metric_addr[0]}:{metric_addr[1]} for metrics: "
                f"{exc.strerror}; choose another --metric-addr"
            ) from exc
        logger.info("metrics on http://%s:%d/metrics", metric_addr[0], metric_addr[1])
    if addr_file is not None:
        tmp = addr_file.with_name(addr_file.name + ".tmp")
        tmp.write_text(f"{relay.bind_host}:{relay.port}\n")
        tmp.replace(addr_file)
    notifier = Notifier()

    def status() -> str:
        return f"{len(relay.table)} sessions on {relay.bind_host}:{relay.port}"

    relay.on_change = lambda: notifier.status(status())
    notifier.ready(status())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        try:
            relay.reload_tls()
        except ConfigError as exc:
            logger.error("SIGHUP: kept the previous TLS certificate: %s", exc)
        else:
            if relay.serves_tls:
                logger.info("SIGHUP: reloaded the TLS certificate")
        if not authorized_keys:
            return
        try:
            relay.host_keys = load_host_keys(authorized_keys)
        except ConfigError as exc:
            logger.error("SIGHUP: kept the previous host keys: %s", exc)
            return
        count = len(relay.host_keys) if relay.host_keys is not None else "any"
        logger.info("SIGHUP: reloaded --authorized-keys (%s keys)", count)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    notifier.send(f"STOPPING=1\nSTATUS=draining {len(relay.connections)} connections")
    relay.draining = True  # /ready says 503 from now on
    if drain_delay_s > 0:
        # A load balancer polling /ready takes the node out before it stops accepting.
        logger.info("stopping: /ready is 503; still accepting for %.1f s", drain_delay_s)
        await asyncio.sleep(drain_delay_s)
    logger.info("stopping: draining for at most %.0f s", drain_timeout_s)
    await relay.drain(drain_timeout_s)
    notifier.stopping()
    lag.stop()
    relay.close()
    if http is not None:
        http.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(http.wait_closed(), 1)
    await relay.wait_closed()


@click.command(
    context_settings={
        "auto_envvar_prefix": "UPTERMD",
        "help_option_names": ["-h", "--help"],
        "max_content_width": 100,
    }
)
@click.option("--ssh-addr", default=DEFAULT_SSH_ADDR, show_default=True, help="SSH listen address.")
@click.option(
    "--tls-cert",
    default="",
    help="With --ws-addr: serve TLS (wss://) with this PEM certificate chain; SIGHUP reloads it.",
)
@click.option("--tls-key", default="", help="The private key for --tls-cert (PEM).")
@click.option(
    "--ws-addr",
    default="",
    help="WebSocket listen address (HTTP: /health, a how-to page, and SSH over WebSocket "
    "for hosts and joiners behind firewalls). Off by default.",
)
@click.option(
    "--web-url",
    default="",
    help="With --ws-addr: the public base URL of the browser joiners' page (as behind a "
    "reverse proxy, e.g. https://relay.example.com); default: the WebSocket listener's "
    "address. Hosts opt in per session with upterm host --web.",
)
@click.option("--node-addr", default="", help="Address other nodes and tokens use for this node.")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the persistent host key lives.",
)
@click.option(
    "--private-key",
    multiple=True,
    help="Host key file, repeatable: one ed25519 key, plus ECDSA and RSA keys if wanted; "
    "default: all three, created in the state dir.",
)
@click.option(
    "--hostname",
    multiple=True,
    help="Also offer a host certificate (self-signed) for this name (repeatable).",
)
@click.option(
    "--authorized-keys",
    multiple=True,
    help="Only these keys may register sessions (OpenSSH authorized_keys format, repeatable; "
    "SIGHUP reloads). Unreadable or empty: refuse to start. Default: any key.",
)
@click.option(
    "--handshake-timeout",
    default="30s",
    show_default=True,
    help="Key exchange and login must finish within this.",
)
@click.option(
    "--max-startups",
    default="100:30:1000",
    show_default=True,
    help="Unauthenticated connections (OpenSSH MaxStartups start:rate:full): from start on, "
    "new ones are dropped with rate%% probability rising to 100%% at full.",
)
@click.option(
    "--per-source-max-startups",
    default=32,
    show_default=True,
    type=click.IntRange(min=0),
    help="Unauthenticated connections from one source address block (0: no cap).",
)
@click.option(
    "--penalties",
    default="yes",
    show_default=True,
    help="Per-source penalties, OpenSSH PerSourcePenalties syntax, e.g. 'authfail:5s "
    "noauth:1s grace-exceeded:10s refusedconnection:10s invaliduser:5s max:10m min:15s', "
    "'yes' (these defaults) or 'no'.",
)
@click.option(
    "--penalty-netblock",
    default="32:128",
    show_default=True,
    help="Group sources by these IPv4:IPv6 prefix lengths for caps and penalties.",
)
@click.option(
    "--penalty-exempt",
    multiple=True,
    help="Addresses or CIDR blocks never penalised (repeatable).",
)
@click.option("--max-sessions", default=10000, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--max-sessions-per-key",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="Sessions one host key may have registered at once (0: no cap).",
)
@click.option(
    "--max-sessions-per-source",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="Sessions registered from one source address block at once (0: no cap).",
)
@click.option(
    "--max-joiners-per-session",
    default=32,
    show_default=True,
    type=click.IntRange(min=0),
    help="Joiner connections in one session at once (0: no cap).",
)
@click.option(
    "--max-channels-per-joiner",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Channels one joiner connection may have open at once.",
)
@click.option(
    "--host-rate",
    default="0",
    show_default=True,
    help="Bytes per second one host connection may send its joiners, e.g. 2M (0: no cap).",
)
@click.option(
    "--host-burst",
    default="4M",
    show_default=True,
    help="Burst allowed above --host-rate.",
)
@click.option(
    "--host-keepalive",
    default="14s",
    show_default=True,
    help="Probe a silent host after this; it is dropped when a second interval passes "
    "without an answer (28 s by default).",
)
@click.option(
    "--unused-timeout",
    default="60s",
    show_default=True,
    help="Close a logged-in connection with nothing open (a joiner without a channel, a host "
    "without a session) after this (0: never).",
)
@click.option(
    "--ssh-proxy-protocol",
    is_flag=True,
    help="Read a PROXY protocol v1/v2 header on the SSH listener (needs --proxy-protocol-from).",
)
@click.option(
    "--proxy-protocol-from",
    multiple=True,
    help="Load balancers (addresses or CIDR blocks) whose PROXY headers are believed.",
)
@click.option(
    "--ws-proxy-protocol",
    is_flag=True,
    help="Read a PROXY protocol v1/v2 header on the WebSocket listener (needs "
    "--proxy-protocol-from), e.g. from HAProxy's send-proxy-v2.",
)
@click.option(
    "--ws-forwarded-from",
    multiple=True,
    help="HTTP proxies (addresses or CIDR blocks) in front of the WebSocket listener whose "
    "X-Forwarded-For names the client (its limits and penalties then apply to the client).",
)
@click.option(
    "--routing",
    type=click.Choice(["memory", "redis"]),
    default="memory",
    show_default=True,
    help="Where sessions are registered: this node's memory (one node), or Redis shared by "
    "every node of a cluster (needs --redis-url and --cluster-addr).",
)
@click.option(
    "--redis-url",
    default="",
    envvar="UPTERMD_REDIS_URL",
    help="The cluster's registry: redis://[:PASSWORD@]HOST:PORT[/DB], rediss://… (TLS), "
    "redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/SERVICE, or "
    "redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT…] (Redis Cluster).",
)
@click.option(
    "--lease-ttl",
    default="30s",
    show_default=True,
    help="How long a registration outlives its node's last renewal (renewed every third).",
)
@click.option(
    "--cluster-addr",
    default="",
    help="Where this node takes joiners carried from other nodes (host:port on the "
    "cluster's private network; only nodes holding the cluster key get in).",
)
@click.option(
    "--cluster-advertise",
    default="",
    help="The --cluster-addr other nodes dial, if not the bound one (e.g. the pod's IP).",
)
@click.option(
    "--metric-addr",
    default="",
    help="Serve Prometheus /metrics, /health and /ready on this host:port.",
)
@click.option(
    "--drain-timeout",
    default="10s",
    show_default=True,
    help="On SIGTERM: how long joiners and hosts get to go before the exit.",
)
@click.option(
    "--drain-delay",
    default="0s",
    show_default=True,
    help="On SIGTERM: how long /ready says 503 while the relay still accepts, before the "
    "drain (give a load balancer polling /ready time to take the node out).",
)
@click.option(
    "--addr-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the bound address here once listening.",
)
@click.option("--debug", is_flag=True, envvar=["UPTERMD_DEBUG", "DEBUG"], help="Verbose logs.")
@click.version_option(__version__, prog_name="uptermd")
def main(
    ssh_addr: str,
    tls_cert: str,
    tls_key: str,
    ws_addr: str,
    web_url: str,
    node_addr: str,
    state_dir: Path | None,
    private_key: tuple[str, ...],
    hostname: tuple[str, ...],
    authorized_keys: tuple[str, ...],
    handshake_timeout: str,
    max_startups: str,
    per_source_max_startups: int,
    penalties: str,
    penalty_netblock: str,
    penalty_exempt: tuple[str, ...],
    max_sessions: int,
    max_sessions_per_key: int,
    max_sessions_per_source: int,
    max_joiners_per_session: int,
    max_channels_per_joiner: int,
    host_rate: str,
    host_burst: str,
    host_keepalive: str,
    unused_timeout: str,
    ssh_proxy_protocol: bool,
    proxy_protocol_from: tuple[str, ...],
    ws_proxy_protocol: bool,
    ws_forwarded_from: tuple[str, ...],
    routing: str,
    redis_url: str,
    lease_ttl: str,
    cluster_addr: str,
    cluster_advertise: str,
    metric_addr: str,
    drain_timeout: str,
    drain_delay: str,
    addr_file: Path | None,
    debug: bool,
) -> None:
    """Run an upterm relay: hosts register sessions, joiners reach them with ssh TOKEN@relay.

    \b
    Examples:
      uptermd                                  # 127.0.0.1:2222, key in ~/.local/state/uptermd
      uptermd --ssh-addr 0.0.0.0:22 --node-addr relay.example.com:22
      uptermd --ssh-addr 0.0.0.0:2222 --ssh-proxy-protocol --proxy-protocol-from 10.0.0.0/8
    """
    log.setup(debug)
    try:
        host, port = split_addr(ssh_addr)
        ws_at = split_addr(ws_addr) if ws_addr else None
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("--tls-cert and --tls-key go together; give both or neither")
        if tls_cert and ws_at is None:
            raise ConfigError("--tls-cert is for the WebSocket listener: add --ws-addr")
        if web_url and ws_at is None:
            raise ConfigError("--web-url is for the WebSocket listener: add --ws-addr")
        if web_url and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", web_url):
            raise ConfigError(
                f"--web-url {web_url!r}: give an http(s) URL such as https://relay.example.com"
            )
        keys = load_host_keys(authorized_keys)
        for flag, on in (
            ("--ssh-proxy-protocol", ssh_proxy_protocol),
            ("--ws-proxy-protocol", ws_proxy_protocol),
        ):
            if on and not proxy_protocol_from:
                raise ConfigError(
                    f"{flag} needs --proxy-protocol-from with your load balancers' addresses "
                    "(a PROXY header from anyone else would let them pick their address)"
                )
        if ws_proxy_protocol and tls_cert:
            raise ConfigError(
                "--ws-proxy-protocol cannot go with --tls-cert: the PROXY header would come "
                "before TLS; terminate TLS at the proxy, or drop the PROXY protocol there"
            )
        if (ws_proxy_protocol or ws_forwarded_from) and ws_at is None:
            flag = "--ws-proxy-protocol" if ws_proxy_protocol else "--ws-forwarded-from"
            raise ConfigError(f"{flag} is for the WebSocket listener: add --ws-addr")
        try:
            proxies = parse_networks(proxy_protocol_from)
        except ValueError as exc:
            raise ConfigError(f"--proxy-protocol-from: {exc}") from exc
        try:
            forwarders = parse_networks(ws_forwarded_from)
        except ValueError as exc:
            raise ConfigError(f"--ws-forwarded-from: {exc}") from exc
        handshake_s = parse_duration_s(handshake_timeout, "--handshake-timeout")
        if handshake_s <= 0:
            raise ConfigError("--handshake-timeout must be more than 0, e.g. 30s")
        keepalive_s = parse_duration_s(host_keepalive, "--host-keepalive")
        if keepalive_s <= 0:
            raise ConfigError("--host-keepalive must be more than 0, e.g. 14s")
        limits = RelayLimits(
            startups=StartupLimits.parse(max_startups),
            per_source_startups=per_source_max_startups,
            penalties=PenaltyConfig.parse(
                penalties, exempt=penalty_exempt, netblock=penalty_netblock
            ),
            handshake_timeout_s=handshake_s,
            sessions_total=max_sessions,
            sessions_per_key=max_sessions_per_key,
            sessions_per_source=max_sessions_per_source,
            joiners_per_session=max_joiners_per_session,
            channels_per_joiner=max_channels_per_joiner,
            host_rate_bytes_s=parse_size(host_rate, "--host-rate"),
            host_burst_bytes=parse_size(host_burst, "--host-burst"),
            host_keepalive_s=keepalive_s,
            unused_timeout_s=parse_duration_s(unused_timeout, "--unused-timeout"),
        )
        metrics_at = split_addr(metric_addr) if metric_addr else None
        drain_s = parse_duration_s(drain_timeout, "--drain-timeout")
        delay_s = parse_duration_s(drain_delay, "--drain-delay")
        identity = load_identity(state_dir or default_state_dir(), private_key)
        registry, cluster_at = cluster_options(
            routing, redis_url, lease_ttl, cluster_addr, cluster_advertise
        )
        raise_fd_limit()
        relay = Relay(
            identity,
            host=host,
            port=port,
            node_addr=node_addr or None,
            version=__version__,
            hostnames=hostname,
            limits=limits,
            gate=GateConfig(
                handshake_timeout_s=handshake_s,
                proxy_protocol=ssh_proxy_protocol,
                proxy_from=proxies,
            ),
            host_keys=keys,
            ws_addr=ws_at,
            ws_tls=(tls_cert, tls_key) if tls_cert else None,
            ws_gate=GateConfig(
                handshake_timeout_s=handshake_s,
                proxy_protocol=ws_proxy_protocol,
                proxy_from=proxies,
                forwarded_from=forwarders,
            ),
            registry=registry,
            cluster_addr=cluster_at,
            cluster_advertise=cluster_advertise or None,
            web_url=web_url or None,
        )
        tune_allocator()
        asyncio.run(serve(relay, addr_file, metrics_at, drain_s, authorized_keys, delay_s))
    except UptermError as exc:
        click.echo(f"uptermd: {exc}", err=True)
        sys.exit(exc.exit_code)
