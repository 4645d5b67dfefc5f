"""Real Redis servers and uptermd cluster nodes for the cluster tests (loopback only)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack

from tests.conftest import RelayProc, UserEnv, start_relay, wait_for
from tests.relay.test_websocket import free_port, wait_listening

#: .ci/run installs it (scripts/setup.sh); the cluster tests need the real server.
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


def _command(port: int, *args: str) -> bytes:
    """One inline command, its raw reply (no client library between us and the server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(" ".join(args).encode() + b"\r\n")
        return s.recv(1 << 16)


@dataclass
class RedisServer:
    """A redis-server process of our own on 127.0.0.1 (no persistence unless asked)."""

    root: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> RedisServer:
        self.port = self.port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                REDIS,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
                *extra,
            ],
            stdout=open(self.root / "redis.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: self.answers() or self.proc is None or self.proc.poll() is not None,
            10,
            what="redis-server to answer",
        )
        assert self.answers(), (self.root / "redis.log").read_text()[-2000:]
        return self

    def answers(self) -> bool:
        try:
            return _command(self.port, "PING").startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        return _command(self.port, *args)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def start_node(
    user_env: UserEnv,
    redis_url: str,
    state_dir: Path,
    *extra: str,
    ttl: str = "3s",
) -> RelayProc:
    """One uptermd node of a cluster. Nodes given the same ``state_dir`` share the cluster
    key (the relay's ed25519 key), as a real cluster's nodes must."""
    return start_relay(
        user_env,
        state_dir,
        "--routing",
        "redis",
        "--redis-url",
        redis_url,
        "--cluster-addr",
        "127.0.0.1:0",
        "--lease-ttl",
        ttl,
        *extra,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _bulk(reply: bytes) -> list[bytes | None]:
    """The bulk strings of a RESP reply (an array of them, or one)."""
    out: list[bytes | None] = []
    rest = reply
    if rest.startswith(b"*"):
        rest = rest.split(b"\r\n", 1)[1]
    while rest.startswith(b"$"):
        head, rest = rest.split(b"\r\n", 1)
        n = int(head[1:])
        if n < 0:
            out.append(None)
            continue
        out.append(rest[:n])
        rest = rest[n + 2 :]
    return out


def session_owner(redis: RedisServer, session_id: str) -> tuple[int, str] | None:
    """(generation, node id) the registry holds for a session, or None."""
    gen, node = _bulk(redis.command("HMGET", f"uptermd:{{{session_id}}}", "gen", "node"))
    if gen is None or node is None:
        return None
    return int(gen), node.decode()


def wait_owner(redis: RedisServer, session_id: str, timeout: float = 10.0) -> tuple[int, str]:
    found: list[tuple[int, str]] = []

    def owned() -> bool:
        got = session_owner(redis, session_id)
        if got is not None:
            found.append(got)
        return got is not None

    wait_for(owned, timeout, what=f"a registration of {session_id}")
    return found[-1]


def member_addrs(redis: RedisServer) -> dict[str, int]:
    """node id -> cluster port of every registered member."""
    out: dict[str, int] = {}
    for key in _bulk(redis.command("KEYS", "uptermd:node:*")):
        assert key is not None
        node = key.decode()[len("uptermd:node:{") : -1]
        (raw,) = _bulk(redis.command("GET", key.decode()))
        assert raw is not None
        out[node] = int(msgpack.unpackb(raw)["addr"].rpartition(":")[2])
    return out


def ready(port: int) -> bool:
    """Whether a node's /ready says 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


def metric(port: int, name: str) -> float:
    """One series (with its labels, as exposed) from a node's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@dataclass
class Balancer:
    """HAProxy in TCP mode in front of nodes, taking out any whose /ready says no."""

    port: int
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        stop(self.proc)


def balancer(root: Path, backends: Sequence[tuple[int, int]], port: int = 0) -> Balancer:
    """``backends``: (ssh port, metrics port) of each node, tried in order (``balance
    first``: everything goes to the first node that is ready)."""
    port = port or free_port()
    servers = "\n".join(
        f"    server n{i} 127.0.0.1:{ssh} check port {metrics} inter 200ms fall 1 rise 2"
        for i, (ssh, metrics) in enumerate(backends)
    )
    conf = root / f"lb-{port}.cfg"
    conf.write_text(
        "global\n"
        "    maxconn 2000\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 1s\n"
        "    timeout client 1h\n"
        "    timeout server 1h\n"
        "    retries 2\n"
        "    option redispatch\n"
        f"frontend relay\n    bind 127.0.0.1:{port}\n    default_backend nodes\n"
        "backend nodes\n"
        "    balance first\n"
        "    option httpchk GET /ready\n"
        "    http-check expect status 200\n"
        f"{servers}\n"
    )
    return _haproxy(conf, port)


def tcp_proxy(root: Path, target: int) -> Balancer:
    """A plain TCP forwarder (HAProxy) to 127.0.0.1:``target``: stop it with SIGSTOP and
    whoever goes through it is cut off while everyone else still gets through."""
    port = free_port()
    conf = root / f"proxy-{port}.cfg"
    conf.write_text(
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 1s\n"
        "    timeout client 1h\n"
        "    timeout server 1h\n"
        f"listen redis\n    bind 127.0.0.1:{port}\n    server r 127.0.0.1:{target}\n"
    )
    return _haproxy(conf, port)


def _haproxy(conf: Path, port: int) -> Balancer:
    """HAProxy in the foreground with ``conf``, once it listens on ``port``."""
    log = conf.with_suffix(".log")
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115
    )
    wait_listening(port, proc, log)
    return Balancer(port, proc)


@dataclass
class SentinelSet:
    """A master, one replica and one Sentinel (quorum 1) watching them, on loopback."""

    master: RedisServer
    replica: RedisServer
    #: The replica's link to the master goes through this proxy (to freeze replication).
    link: Balancer
    port: int
    proc: subprocess.Popen[bytes]
    service: str = "uptermd"

    def freeze_replication(self) -> None:
        """From now on the master's writes stay in a frozen proxy's buffers."""
        os.kill(self.link.proc.pid, signal.SIGSTOP)

    def lose_replication(self) -> None:
        """Kill the frozen proxy: what it held never reaches the replica."""
        os.kill(self.link.proc.pid, signal.SIGKILL)
        self.link.proc.wait(5)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}"

    def master_port(self) -> int:
        """The master's port once Sentinel has settled on it (``SENTINEL MASTER``: what
        clients discovering the master are told; ``get-master-addr-by-name`` names the
        promoted replica earlier, while the failover is still going on)."""
        fields = _bulk(_command(self.port, "SENTINEL", "MASTER", self.service))
        info = dict(zip(fields[::2], fields[1::2], strict=True))
        port = info.get(b"port")
        assert port is not None, info
        return int(port)

    def knows_replica(self) -> bool:
        return f"{self.replica.port}".encode() in _command(
            self.port, "SENTINEL", "replicas", self.service
        )

    def stop(self) -> None:
        stop(self.proc)
        if self.link.proc.poll() is None:
            os.kill(self.link.proc.pid, signal.SIGCONT)
            self.link.stop()
        self.replica.stop()
        self.master.stop()


def sentinel_set(root: Path) -> SentinelSet:
    master = RedisServer(root / "master").start()
    link = tcp_proxy(root, master.port)
    replica = RedisServer(root / "replica").start("--replicaof", "127.0.0.1", str(link.port))
    wait_for(
        lambda: b"master_link_status:up" in replica.command("INFO", "replication"),
        10,
        what="the replica to sync",
    )
    port = free_port()
    conf = root / "sentinel.conf"  # Sentinel rewrites it: ours alone, writable
    conf.write_text(
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f"dir {root}\n"
        f"sentinel monitor uptermd 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds uptermd 500\n"
        "sentinel failover-timeout uptermd 3000\n"
        "sentinel parallel-syncs uptermd 1\n"
    )
    proc = subprocess.Popen(
        ["redis-sentinel", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(port, proc)
    sset = SentinelSet(master, replica, link, port, proc)
    wait_for(sset.knows_replica, 15, what="Sentinel to find the replica")
    return sset


@dataclass
class RedisCluster:
    """Three Redis Cluster masters (no replicas) on loopback, slots spread by redis-cli."""

    servers: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers[:2])

    def keys_per_server(self, pattern: str) -> list[int]:
        return [len([k for k in _bulk(s.command("KEYS", pattern)) if k]) for s in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher) is free and valid too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port + 10000)) != 0:
                return port


def redis_cluster(root: Path) -> RedisCluster:
    servers = []
    for i in range(3):
        server = RedisServer(root / f"shard{i}", port=cluster_port())
        servers.append(
            server.start(
                "--cluster-enabled", "yes", "--cluster-config-file", str(root / f"nodes{i}.conf")
            )
        )
    made = subprocess.run(
        ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers),
         "--cluster-replicas", "0", "--cluster-yes"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    for server in servers:
        wait_for(
            lambda s=server: b"cluster_state:ok" in s.command("CLUSTER", "INFO"),
            15,
            what="the Redis Cluster to settle",
        )
    return RedisCluster(servers)
