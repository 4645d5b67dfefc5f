"""Cluster benchmarks: uptermd nodes sharing sessions through Redis.

    python -m bench.cluster [--quick] [--json FILE]

Each figure beside its baseline from the same run: joining and typing through a node that
does not own the session (a hop) against the owning node itself; what one node's registry
sustains against redis-benchmark on the same server; a node's memory and CPU per idle
session with Redis routing against memory routing. Failover and drain times have no
baseline: they are what a joiner waits for after the owning node is killed (kill -9) or
drained (SIGTERM) behind HAProxy, from that moment until the same join line answers again.
Everything runs on 127.0.0.1 (redis-server, HAProxy and the nodes are started here).
These are measurements, not tests: nothing passes or fails on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import asyncssh

from bench.run import (
    KEY,
    NO_QUOTAS,
    Figure,
    Report,
    SshJoiner,
    World,
    echo_latency_ms,
    free_port,
    join_time_ms,
    machine_info,
    pct,
    relay_idle_sessions,
    world,
)
from upterm.relay.cluster import RedisRegistry, SessionRecord

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_BENCHMARK = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


class Cluster:
    """redis-server, nodes sharing one cluster key, and HAProxy in front of them."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.redis_port = free_port()
        proc = w.spawn(
            [REDIS, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"]
        )  # fmt: skip
        wait_port(self.redis_port, proc, "redis-server")
        self.url = f"redis://127.0.0.1:{self.redis_port}"
        self.lb_port = free_port()
        self.nodes: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}

    def start_node(self, name: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
        """A node; every node's state directory holds the first one's keys."""
        state = self.w.root / name
        first = self.w.root / "node-a"
        if name != "node-a" and not state.exists():
            shutil.copytree(first, state)
        metrics = self.nodes[name][2] if name in self.nodes else free_port()
        proc, port = self.w.start_relay(
            name, "--routing", "redis", "--redis-url", self.url, "--cluster-addr",
            "127.0.0.1:0", "--lease-ttl", "6s", "--node-addr", f"127.0.0.1:{self.lb_port}",
            "--metric-addr", f"127.0.0.1:{metrics}", "--penalty-exempt", "127.0.0.0/8", *extra,
        )  # fmt: skip
        self.nodes[name] = (proc, port, metrics)
        return proc, port

    def start_balancer(self, names: list[str]) -> None:
        servers = "\n".join(
            f"    server {n} 127.0.0.1:{self.nodes[n][1]} check port {self.nodes[n][2]} "
            "inter 200ms fall 1 rise 2"
            for n in names
        )
        conf = self.w.root / "haproxy.cfg"
        conf.write_text(
            "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1h\n"
            "    timeout server 1h\n    retries 2\n    option redispatch\n"
            f"frontend relay\n    bind 127.0.0.1:{self.lb_port}\n    default_backend nodes\n"
            "backend nodes\n    balance first\n    option httpchk GET /ready\n"
            f"    http-check expect status 200\n{servers}\n"
        )
        proc = self.w.spawn([HAPROXY, "-db", "-f", str(conf)])
        wait_port(self.lb_port, proc, "haproxy")


def ssh_argv(w: World, user: str, port: int) -> list[str]:
    key_file = w.root / "joiner"
    if not key_file.exists():
        key_file.write_bytes(KEY[0].export_private_key())
        key_file.chmod(0o600)
    return [
        "ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o",
        "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", str(key_file),
        "-p", str(port), f"{user}@127.0.0.1",
    ]  # fmt: skip


def back_after(
    argv: list[str], event: Callable[[], None], moved: Callable[[], bool], limit_s: float = 30
) -> float:
    """Seconds from ``event()`` until the host is back (``moved()``) and a joiner with
    ``argv`` sees a prompt."""
    t0 = time.monotonic()
    event()
    while time.monotonic() - t0 < limit_s:
        if not moved():
            time.sleep(0.02)
            continue
        j = SshJoiner(argv)
        try:
            j.read_until(b"$ ", 3)
            return time.monotonic() - t0
        except (TimeoutError, EOFError):
            time.sleep(0.05)
        finally:
            j.close()
    raise TimeoutError("the session did not come back")


async def registry_rates(url: str, seconds: float, leases: int) -> tuple[float, float]:
    """Lookups per second (32 in flight) and lease renewals per second (one pipelined batch
    of ``leases``) one node's registry client sustains."""
    reg = RedisRegistry(url, node_id="bench", member_addr="127.0.0.1:1", ttl_s=600)
    await reg.start()
    try:
        for i in range(leases):
            await reg.claim(SessionRecord(f"bench{i}", 1, "bench"), lambda _w: None)
        done = 0
        stop = time.monotonic() + seconds

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < stop:
                await reg.lookup(f"bench{i % leases}")
                done += 1
                i += 32

        t0 = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(32)))
        lookups = done / (time.monotonic() - t0)
        rounds = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await reg.renew_due(everything=True)
            rounds += 1
        renewals = rounds * leases / (time.monotonic() - t0)
        return lookups, renewals
    finally:
        await reg.close()


def redis_benchmark_gets(port: int, requests: int) -> float:
    """redis-benchmark's GET rate on the same server, 32 clients, no pipelining."""
    out = subprocess.run(
        [REDIS_BENCHMARK, "-p", str(port), "-c", "32", "-n", str(requests), "-t", "get",
         "-q", "--csv"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    row = next(line for line in out.stdout.splitlines() if line.startswith('"GET"'))
    return float(row.split(",")[1].strip('"'))


def run(quick: bool) -> Report:
    report = Report(machine_info(), name_width=56)
    joins = 5 if quick else 30
    keys = 100 if quick else 1000
    idle = 50 if quick else 1000
    rounds = 1 if quick else 3
    KEY.append(asyncssh.generate_private_key("ssh-ed25519"))
    with world() as w:
        w.key = KEY[0]
        c = Cluster(w)
        for name in ("node-a", "node-b", "node-c"):
            c.start_node(name)
        c.start_balancer(["node-a", "node-b", "node-c"])
        server = f"ssh://127.0.0.1:{c.lb_port}"
        info = w.host("cl", server, "cat")
        user = str(info["sshUser"])
        owner_port, other_port = c.nodes["node-a"][1], c.nodes["node-c"][1]
        direct, hop = ssh_argv(w, user, owner_port), ssh_argv(w, user, other_port)
        join_time_ms(direct, 2)
        own = statistics.median(join_time_ms(direct, joins))
        via = statistics.median(join_time_ms(hop, joins))
        report.add(Figure("join time via another node (a hop), median", via, "ms", own,
                          "owning node", "<= 1.5x owning node"))  # fmt: skip
        n = 200 if quick else 2000
        own_lat = echo_latency_ms(direct, n)
        hop_lat = echo_latency_ms(hop, n)
        report.add(Figure("echo latency via another node, p50", pct(hop_lat, 50), "ms",
                          pct(own_lat, 50), "owning node", "figure (one more hop)"))  # fmt: skip

        # Failover and drain, behind HAProxy. Each round hosts a session of its own (a host's
        # redial schedule starts afresh only after a minute up, as upstream's), kills or
        # drains the node it landed on, and starts that node again on the same port.
        for label, sig in (("kill -9", signal.SIGKILL), ("SIGTERM (drain)", signal.SIGTERM)):
            times = []
            for i in range(rounds):
                name = f"fo{sig.value}-{i}"
                before = sessions_per_node(c)
                w.host(name, server, "bash", "--norc", "--noprofile")
                user = json.loads(w.upterm("session", "info", name, "-o", "json"))["sshUser"]
                argv = ssh_argv(w, str(user), c.lb_port)
                after = sessions_per_node(c)
                (owner,) = [n for n in after if after[n] > before.get(n, 0)]
                proc, port, _ = c.nodes[owner]

                def moved(name: str = name) -> bool:
                    now = json.loads(w.upterm("session", "info", name, "-o", "json"))
                    return bool(now["relayState"] == "connected" and now["reconnects"] >= 1)

                times.append(back_after(argv, lambda p=proc, s=sig: p.send_signal(s), moved))
                proc.wait(20)
                c.start_node(owner, "--ssh-addr", f"127.0.0.1:{port}")
                time.sleep(1.0)  # the restarted node passes its health checks
                w.upterm("session", "stop", name)
            report.add(
                Figure(
                    f"joiner back after {label} of the owning node",
                    statistics.median(times) * 1000,
                    "ms",
                    None,
                    "",
                    "<= 10 s",
                )
            )

        lookups, renewals = asyncio.run(registry_rates(c.url, 1.0 if quick else 3.0, keys))
        gets = redis_benchmark_gets(c.redis_port, 20000 if quick else 200000)
        report.add(
            Figure(
                "registry lookups per second, one node (32 in flight)",
                lookups,
                "/s",
                gets,
                "redis-benchmark GET",
                "figure",
            )
        )
        report.add(
            Figure(
                f"lease renewals per second, one node ({keys} pipelined)",
                renewals,
                "/s",
                gets,
                "redis-benchmark GET",
                "figure",
            )
        )

        # Sessions per node: memory and idle CPU, Redis routing against memory routing.
        mem_proc, mem_port = w.start_relay("memory-node", *NO_QUOTAS)
        red_proc, red_port = c.start_node("node-idle", *NO_QUOTAS)
        idle_s = 3.0 if quick else 20.0
        mem_kib, mem_cpu = asyncio.run(relay_idle_sessions(mem_proc.pid, mem_port, idle, idle_s))
        red_kib, red_cpu = asyncio.run(relay_idle_sessions(red_proc.pid, red_port, idle, idle_s))
        report.add(
            Figure(
                f"uptermd memory per idle session, redis routing ({idle})",
                red_kib,
                "KiB",
                mem_kib,
                "memory routing",
                "<= 1.2x memory routing",
            )
        )
        report.add(
            Figure(
                f"uptermd CPU with {idle} idle sessions, redis routing",
                red_cpu,
                "% core",
                mem_cpu,
                "memory routing",
                "figure (renewals)",
            )
        )
    return report


def sessions_per_node(c: Cluster) -> dict[str, float]:
    """uptermd_sessions of every node that answers."""
    counts: dict[str, float] = {}
    for name, (_proc, _port, metrics) in c.nodes.items():
        url = f"http://127.0.0.1:{metrics}/metrics"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("uptermd_sessions "):
                    counts[name] = float(line.split()[1])
    return counts


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    report = run(args.quick)
    if args.json:
        data = {"machine": report.machine, "figures": [
            {**asdict(f), "ratio": f.ratio} for f in report.figures
        ]}  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
