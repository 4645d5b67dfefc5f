"""File transfer benchmarks: what a joiner's scp gets, and what the terminal feels meanwhile.

    python -m bench.transfer [--quick] [--json FILE]

A 200 MiB file downloaded and uploaded with the session's printed ``scp`` line (SFTP mode,
through uptermd, accepted up front), beside the same ``scp`` against a stock OpenSSH sshd on
loopback in the same run. While each transfer runs, echo latency for the host's own
terminal and for another joiner on the same session, beside the same figures measured idle
just before. These are measurements, not tests: nothing passes or fails on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import asyncssh

from bench.run import (
    KEY,
    NO_QUOTAS,
    Figure,
    Report,
    attached_latency_ms,
    echo_latency_ms,
    machine_info,
    pct,
    world,
)

FULL_MIB, QUICK_MIB = 200, 4
FULL_ECHOES, QUICK_ECHOES = 1000, 30


def _ssh_options(key_file: Path) -> list[str]:
    return [
        "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o",
        "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", str(key_file),
    ]  # fmt: skip


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: {out.stderr.strip()}")
    return time.perf_counter() - start


@contextlib.contextmanager
def _running(argv: list[str], env: dict[str, str]) -> Iterator[Callable[[], bool]]:
    """A transfer in the background for as long as the block runs (restarted if it ends
    first, so the measurement never runs against an idle session)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            subprocess.run(argv, env=env, capture_output=True, timeout=900)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(1.0)  # under way
    try:
        yield stop.is_set
    finally:
        stop.set()
        thread.join(900)


async def run(quick: bool) -> Report:
    size_mib = QUICK_MIB if quick else FULL_MIB
    echoes = QUICK_ECHOES if quick else FULL_ECHOES
    report = Report(machine_info())
    print(json.dumps(report.machine, indent=2))
    KEY.append(asyncssh.generate_private_key("ssh-ed25519"))
    with world() as w:
        w.key = KEY[0]
        key_file = w.root / "joiner"
        key_file.write_bytes(KEY[0].export_private_key())
        key_file.chmod(0o600)
        pub = w.root / "joiner.pub"
        pub.write_bytes(KEY[0].export_public_key())
        _relay, port = w.start_relay("relay", *NO_QUOTAS)
        sshd_port = w.start_sshd()
        w.upterm(
            "host", "--detach", "--accept", "--quiet", "--skip-host-key-check",
            "--known-hosts", str(w.root / "known_hosts"), "--server",
            f"ssh://127.0.0.1:{port}", "--name", "xfer", "--accept-transfers",
            "--authorized-keys", str(pub), "--", "cat",
        )  # fmt: skip
        info = json.loads(w.upterm("session", "info", "xfer", "-o", "json"))
        home = Path(w.env["HOME"])
        big = home / "big.bin"
        with big.open("wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        local = w.root / "local.bin"
        local.write_bytes(big.read_bytes())
        opts = _ssh_options(key_file)
        scp_line = shlex.split(str(info["scpCommand"]))
        ours = [scp_line[0], *opts, *scp_line[1:-2]]
        remote = scp_line[-1]
        user = os.environ.get("USER") or "root"
        stock = ["scp", *opts, "-P", str(sshd_port)]
        legs = {
            "download": (
                [*ours, f"{remote}big.bin", str(w.root / "down.bin")],
                [*stock, f"{user}@127.0.0.1:{big}", str(w.root / "down-sshd.bin")],
            ),
            "upload": (
                [*ours, str(local), f"{remote}up.bin"],
                [*stock, str(local), f"{user}@127.0.0.1:{w.root / 'up-sshd.bin'}"],
            ),
        }
        for leg, (via_upterm, via_sshd) in legs.items():
            sshd_s = _timed(via_sshd, w.env)
            upterm_s = _timed(via_upterm, w.env)
            report.add(
                Figure(
                    f"scp {leg} of {size_mib} MiB, via uptermd",
                    size_mib / upterm_s, "MiB/s", size_mib / sshd_s, "scp to a stock sshd",
                    ">= 1x sshd",
                )
            )  # fmt: skip

        joiner = [
            "ssh", *opts, "-p", str(port), f"{info['sshUser']}@127.0.0.1",
        ]  # fmt: skip
        idle_joiner = echo_latency_ms(joiner, echoes)
        idle_host = await attached_latency_ms(w, "xfer", echoes)
        for leg, (via_upterm, _) in legs.items():
            with _running(via_upterm, w.env):
                busy_joiner = await asyncio.to_thread(echo_latency_ms, joiner, echoes)
                busy_host = await attached_latency_ms(w, "xfer", echoes)
            for who, idle, busy in (
                ("another joiner", idle_joiner, busy_joiner),
                ("the host's terminal", idle_host, busy_host),
            ):
                report.add(
                    Figure(
                        f"echo p99, {who}, during a {leg}", pct(busy, 99), "ms",
                        pct(idle, 99), "idle, same session", "<= 2x idle",
                    )
                )  # fmt: skip
            report.add(
                Figure(
                    f"echo p50, another joiner, during a {leg}", pct(busy_joiner, 50), "ms",
                    pct(idle_joiner, 50), "idle, same session",
                )
            )  # fmt: skip
    return report


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    report = asyncio.run(run(args.quick))
    if args.json:
        data = {"machine": report.machine, "figures": [
            {**asdict(f), "ratio": f.ratio} for f in report.figures
        ]}  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
