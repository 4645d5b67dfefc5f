"""upterm.service under a real `systemd --user` manager.

The manager runs in a child cgroup made for the test (never the root cgroup), with its own
XDG_RUNTIME_DIR and HOME; everything it leaves (cgroups, /run/systemd entries, processes)
is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, UserEnv, wait_for

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = Path("/usr/lib/systemd/systemd")
RUN_SYSTEMD = Path("/run/systemd")

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.getuid() != 0, reason="making a cgroup for the manager needs root"),
]


def cgroup_roots() -> list[Path]:
    """Where to make the child cgroup: the v1 name=systemd and unified trees, or v2."""
    v1 = [Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified")]
    if v1[0].is_dir():
        return [p for p in v1 if p.is_dir()]
    return [Path("/sys/fs/cgroup")]


def remove_cgroup(path: Path) -> None:
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir():
            sub.rmdir()
    path.rmdir()


@pytest.fixture
def user_manager(user_env: UserEnv) -> Iterator[dict[str, str]]:
    before = set(os.listdir(RUN_SYSTEMD)) if RUN_SYSTEMD.exists() else None
    marker = RUN_SYSTEMD / "system"
    made_marker = not marker.exists()
    marker.mkdir(parents=True, exist_ok=True)  # sd_booted(): the manager checks for it
    name = f"upterm-test-{uuid.uuid4().hex[:8]}"
    groups = [root / name for root in cgroup_roots()]
    for group in groups:
        group.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": user_env.env["HOME"],
        "XDG_RUNTIME_DIR": user_env.env["XDG_RUNTIME_DIR"],
        "XDG_CONFIG_HOME": user_env.env["XDG_CONFIG_HOME"],
    }
    enter = "; ".join(f"echo $$ > {g}/cgroup.procs" for g in groups)
    manager = subprocess.Popen(
        ["sh", "-c", f"{enter}; exec {SYSTEMD} --user"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def running() -> bool:
            state = subprocess.run(
                ["systemctl", "--user", "is-system-running"],
                env=env,
                capture_output=True,
                text=True,
            ).stdout.strip()
            return state in ("running", "degraded")

        wait_for(running, 20, what="systemd --user to come up")
        yield env
    finally:
        subprocess.run(["systemctl", "--user", "exit"], env=env, capture_output=True)
        try:
            manager.wait(15)
        except subprocess.TimeoutExpired:
            manager.kill()
            manager.wait(5)
        for group in groups:
            wait_for(
                lambda g=group: (
                    not (g / "cgroup.procs").read_text().strip()
                    if (g / "cgroup.procs").exists()
                    else True
                ),
                10,
                what="cgroup to empty",
            )
            remove_cgroup(group)
        if made_marker:
            marker.rmdir()
        if before is not None:
            for entry in set(os.listdir(RUN_SYSTEMD)) - before:
                path = RUN_SYSTEMD / entry
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_upterm_service_under_systemd_user(user_manager: dict[str, str], user_env: UserEnv) -> None:
    env = user_manager

    def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemctl", "--user", *args], env=env, capture_output=True, text=True
        )

    # The README's steps from a checkout, as written.
    installed = subprocess.run(
        [str(ROOT / "scripts" / "install-user-units.sh")], env=env, capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stderr
    unit = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user" / "upterm.service"
    assert f"ExecStart={VENV_BIN}/upterm daemon" in unit.read_text()
    assert systemctl("daemon-reload").returncode == 0
    enabled = systemctl("enable", "--now", "upterm.socket")
    assert enabled.returncode == 0, enabled.stderr
    assert systemctl("is-enabled", "upterm.socket").stdout.strip() == "enabled"
    assert systemctl("is-active", "upterm.service").stdout.strip() == "inactive"
    # The first `upterm` command starts the daemon through the socket.
    hosted = user_env.run(
        "upterm",
        "host",
        "--detach",
        "--accept",
        "--name",
        "sd",
        "--",
        "sleep",
        "300",
        stdin=subprocess.DEVNULL,
    )
    assert hosted.returncode == 0, hosted.stderr
    assert systemctl("is-active", "upterm.service").stdout.strip() == "active"
    status = systemctl("show", "-p", "StatusText", "-p", "NRestarts", "upterm.service").stdout
    assert "StatusText=1 session, 0 joiners" in status
    listed = user_env.run("upterm", "session", "list")
    assert "sd" in listed.stdout
    # Stopping the service ends the session cleanly.
    pid = int(user_env.run("upterm", "session", "info", "sd", "-o", "template={pid}").stdout)
    assert systemctl("stop", "upterm.service").returncode == 0
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15, what="the session's command to end")
    assert systemctl("is-active", "upterm.service").stdout.strip() == "inactive"
    assert systemctl("stop", "upterm.socket").returncode == 0
    time.sleep(0.2)
