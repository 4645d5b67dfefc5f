"""The printed end-to-end join line, typed as is by a joiner with a plain OpenSSH setup."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PtyClient, UserEnv
from tests.e2e.test_cli_e2e import Joiner
from tests.e2e.test_host_features_e2e import detached

pytestmark = pytest.mark.e2e


def joiner_config(tmp_path: Path) -> tuple[Path, Path]:
    """A joiner's ssh config: its key, and accept-new for the relay (the jump host).

    OpenSSH reads ~ from the password database, not $HOME, and hands -F on to the jump.
    """
    key = tmp_path / "id_joiner"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host *\n"
        f"    IdentityFile {key}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {tmp_path / 'known_hosts'}\n"
        "    StrictHostKeyChecking accept-new\n"
    )
    return config, key


def test_printed_e2e_line_joins_and_e2e_only_refuses_relay_joins(
    user_env: UserEnv, tmp_path: Path
) -> None:
    config, key = joiner_config(tmp_path)
    nobody = detached  # --e2e-only alone would let anyone (even the relay) in: refused
    out = subprocess.run(
        ["upterm", "host", "--accept", "--e2e-only", "--", "true"],
        env=user_env.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "--e2e-only needs --authorized-keys" in out.stderr
    info = nobody(user_env, "secret", "--e2e-only", "--authorized-keys", f"{key}.pub")
    assert info["e2eOnly"] is True
    line = info["e2eCommand"]
    assert line.startswith("ssh -J ") and line.endswith("@upterm")
    assert info["hostKey"] in line  # the host key is pinned inline
    argv = shlex.split(line)
    joiner = PtyClient([argv[0], "-F", str(config), *argv[1:], "-tt"], user_env.env)
    joiner.expect(b"$ ")
    joiner.type("echo e2e-$((4*4))\r")
    joiner.expect(b"e2e-16")
    listed = subprocess.run(
        ["upterm", "session", "info", "secret"], env=user_env.env, capture_output=True, text=True
    ).stdout
    assert "[end-to-end]" in listed and " end-to-end" in listed
    assert "SSH (end-to-end):" in listed and "\nSSH:" not in listed
    joiner.close()
    # The relay-mode line is refused by the host.
    relay_join = Joiner(info, key)
    assert relay_join.proc.wait(20) != 0
