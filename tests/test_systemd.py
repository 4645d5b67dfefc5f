"""systemd: the units verify, uptermd's sandbox scores low, sd_notify and socket activation
work with real sockets and systemd's own tools."""

from __future__ import annotations

import array
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, UserEnv, wait_for

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"


def unit_copies(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this checkout's programs (verify checks paths)."""
    out = tmp_path / "units"
    out.mkdir()
    for unit in UNITS.iterdir():
        text = unit.read_text()
        text = text.replace("/usr/bin/upterm ", f"{VENV_BIN}/upterm ")
        text = text.replace("/usr/bin/uptermd", f"{VENV_BIN}/uptermd")
        (out / unit.name).write_text(text)
    return out


def test_units_verify_cleanly(tmp_path: Path) -> None:
    units = unit_copies(tmp_path)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    user = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--user", "upterm.service", "upterm.socket"],
        cwd=units,
        env=env,
        capture_output=True,
        text=True,
    )
    assert (user.returncode, user.stderr) == (0, "")
    system = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "uptermd.service"],
        cwd=units,
        capture_output=True,
        text=True,
    )
    assert (system.returncode, system.stderr) == (0, "")


def test_uptermd_exposure_is_low(tmp_path: Path) -> None:
    units = unit_copies(tmp_path)
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "uptermd.service"],
        cwd=units,
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for uptermd\.service: ([\d.]+)", out.stdout)
    assert match, out.stdout[-500:] + out.stderr
    score = float(match.group(1))
    print(f"uptermd.service exposure: {score}")  # the figure, for the record
    assert score <= 2.0


def notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(10)
    return sock


def receive(sock: socket.socket) -> tuple[int, str]:
    """One notification and the pid that sent it (SCM_CREDENTIALS)."""
    msg, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = -1
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = array.array("i", data[:12])[0]
    return pid, msg.decode()


@pytest.mark.parametrize("program", ["daemon", "relay"])
def test_sd_notify_messages_from_the_main_pid(
    user_env: UserEnv, tmp_path: Path, program: str
) -> None:
    sock = notify_socket(tmp_path)
    env = {**user_env.env, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
    argv = (
        [sys.executable, "-m", "upterm.daemon"]
        if program == "daemon"
        else [str(VENV_BIN / "uptermd"), "--ssh-addr", "127.0.0.1:0", "--state-dir", str(tmp_path)]
    )
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    try:
        messages: list[str] = []
        started = time.monotonic()
        while sum("WATCHDOG=1" in m for m in messages) < 3:
            pid, text = receive(sock)
            assert pid == proc.pid  # from the main PID, as NotifyAccess=main requires
            messages.append(text)
        first = messages[0]
        assert first.startswith("READY=1\n") and "STATUS=" in first
        if program == "daemon":
            # READY only once the control socket listens.
            assert (user_env.runtime / "daemon.sock").exists()
            assert "STATUS=0 sessions, 0 joiners" in first
        # WATCHDOG every WATCHDOG_USEC / 2 = 0.2 s: three take about 0.4 s, not seconds.
        assert time.monotonic() - started < 5
        proc.send_signal(signal.SIGTERM)
        while True:
            pid, text = receive(sock)
            if text.startswith("STOPPING=1"):
                break
        assert pid == proc.pid
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_status_follows_sessions(user_env: UserEnv, tmp_path: Path) -> None:
    sock = notify_socket(tmp_path)
    env = {**user_env.env, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "upterm.daemon"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        assert receive(sock)[1].startswith("READY=1")
        out = subprocess.run(
            ["upterm", "host", "--detach", "--accept", "--name", "s", "--", "sleep", "60"],
            env=user_env.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        statuses = []
        while "STATUS=1 session, 0 joiners" not in statuses:
            statuses.append(receive(sock)[1])
    finally:
        proc.terminate()
        proc.wait(10)


def test_socket_activation(user_env: UserEnv) -> None:
    user_env.runtime.mkdir(mode=0o700)
    path = user_env.runtime / "daemon.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(path), sys.executable, "-m", "upterm.daemon"],
        env=user_env.env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(path.exists, what="systemd-socket-activate to listen")
        inode = path.stat().st_ino
        out = user_env.run("upterm", "session", "list", "-o", "json")
        assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr
        # The daemon served on the socket systemd made, without replacing it.
        assert path.stat().st_ino == inode
        hosted = user_env.run(
            "upterm",
            "host",
            "--detach",
            "--accept",
            "--name",
            "sa",
            "--",
            "sleep",
            "30",
            stdin=subprocess.DEVNULL,
        )
        assert hosted.returncode == 0, hosted.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_allocator_keeps_its_heap_through_bursts_of_output() -> None:
    """tune_allocator: a stream of 128 KiB reads cut into SSH-sized packets, as the daemon
    moves output, takes a handful of page faults instead of one per page per burst."""
    import subprocess
    import sys

    code = """
import resource, sys
from upterm.service import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
chunk = bytes(4096)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(1000):
    batch = b"".join([chunk] * 32)
    packets = [batch[i:i + 32768] + b"pad" for i in range(0, len(batch), 32768)]
    joined = b"".join(packets)
    del batch, packets, joined
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", code, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("plain", "tuned")
    }
    assert faults["plain"] > 10_000, faults  # glibc's default: trimmed and regrown
    assert faults["tuned"] < faults["plain"] / 20, faults
