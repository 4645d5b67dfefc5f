"""What the README's prompt recipe costs per prompt, inside a session.

``PS1='$(upterm session current -q -o template="[{name}] ")\\$ '`` runs ``upterm`` before every
command line. This starts a private daemon with one session, then times that command as the
prompt runs it (inside the session: ``UPTERM_ADMIN_SOCKET`` set), against the same Python
doing nothing (the floor) and the full client (``session info``, same answer). Medians of
many runs; the target is under 20 ms.

    .venv/bin/python -m bench.prompt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def ms(argv: list[str], env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    """Print the prompt's cost per command line, with its floor and the full client's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="upterm-prompt-") as root:
        base = Path(root)
        for sub in ("home", "run", "state"):
            (base / sub).mkdir(mode=0o700)
        env = {
            "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "HOME": str(base / "home"),
            "XDG_RUNTIME_DIR": str(base / "run"),
            "XDG_STATE_HOME": str(base / "state"),
            "UPTERM_LOCAL_RELAY_ADDR": "127.0.0.1:0",
            "LANG": "C.UTF-8",
        }
        upterm = str(VENV_BIN / "upterm")
        try:
            subprocess.run(
                [upterm, "host", "--detach", "--accept", "--name", "bench", "--", "sleep", "600"],
                env=env, check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            info = json.loads(
                subprocess.run(
                    [upterm, "session", "info", "bench", "-o", "json"],
                    env=env, check=True, capture_output=True, text=True,
                ).stdout
            )  # fmt: skip
            inside = {**env, "UPTERM_ADMIN_SOCKET": str(info["adminSocket"])}
            prompt = [upterm, "session", "current", "-q", "-o", "template=[{name}] "]
            out = subprocess.run(prompt, env=inside, capture_output=True, text=True).stdout
            assert out == "[bench] ", out
            floor = ms([sys.executable, "-c", "pass"], inside, args.runs)
            fast = ms(prompt, inside, args.runs)
            full = ms(
                [upterm, "session", "info", "bench", "-o", "template=[{name}] "], env, args.runs
            )
            print(f"{'figure':<44} {'ms (median)':>12}")
            print(f"{'prompt, in a session (target < 20 ms)':<44} {fast:>12.1f}")
            print(f"{'python doing nothing (the floor)':<44} {floor:>12.1f}")
            print(f"{'full client, same answer (session info)':<44} {full:>12.1f}")
        finally:
            subprocess.run([upterm, "session", "stop", "bench"], env=env, capture_output=True)
            stop_daemon(env["XDG_RUNTIME_DIR"])


def stop_daemon(runtime: str) -> None:
    """End the private daemon (and its built-in relay): every process started with this
    runtime directory. (There is no `upterm daemon stop`: that line used to start a daemon
    that refused the word, and the real one was left running after each run.)"""
    marker = f"XDG_RUNTIME_DIR={runtime}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGTERM)


if __name__ == "__main__":
    os.environ.pop("UPTERM_ADMIN_SOCKET", None)
    main()
