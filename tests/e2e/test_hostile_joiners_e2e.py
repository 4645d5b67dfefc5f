"""Joiners who ask for more than a shared terminal get a refusal; the session is undisturbed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import UserEnv
from tests.e2e.test_cli_e2e import Joiner, headless
from tests.e2e.test_host_features_e2e import detached

pytestmark = pytest.mark.e2e


def ssh(info: dict, key: Path, *extra: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", *Joiner.ssh_args(info, key), "-o", "BatchMode=yes", *extra],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_hostile_requests_are_refused(user_env: UserEnv, joiner_key: Path, tmp_path: Path) -> None:
    info = detached(user_env, "target")
    victim = tmp_path / "created"

    exec_req = ssh(info, joiner_key, f"touch {victim}")
    assert exec_req.returncode != 0
    assert not victim.exists()

    no_pty = ssh(info, joiner_key, "-T")
    assert no_pty.returncode == 1
    assert "PTY is required." in no_pty.stdout

    args = Joiner.ssh_args(info, joiner_key)  # ... user@host -p PORT -i KEY ...
    sftp_args = [a if a != "-p" else "-P" for a in args]
    sftp = subprocess.run(
        ["sftp", "-b", "-", *sftp_args],
        input="ls\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert sftp.returncode != 0

    local_fwd = ssh(info, joiner_key, "-W", "127.0.0.1:22")
    assert local_fwd.returncode == 255
    assert "forwarding failed" in local_fwd.stderr

    remote_fwd = ssh(
        info, joiner_key, "-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22"
    )
    assert remote_fwd.returncode == 255
    assert "forwarding failed" in remote_fwd.stderr

    # After all that, the session is fine and nobody is left over.
    joiner = Joiner(info, joiner_key)
    joiner.expect(b"$ ")
    joiner.type("echo still-fine-$((5*5))\r")
    joiner.expect(b"still-fine-25")
    joiner.close()
    assert (
        headless(user_env, "session", "info", "target", "-o", "template={clientCount}").returncode
        == 0
    )
