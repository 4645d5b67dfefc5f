"""``upterm join LINE``: the printed line, end to end when it pins the host's key, and a
joiner that rejoins by itself after its relay restarts."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SSH_OPTS, VENV_BIN, PtyClient, UserEnv, wait_for
from tests.e2e.test_cli_e2e import headless
from tests.e2e.test_host_features_e2e import SHELL
from upterm import wire

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relay_on(user_env: UserEnv, port: int, state: Path) -> subprocess.Popen[bytes]:
    """uptermd on a fixed port (a restart comes back where hosts and joiners dial)."""
    proc = subprocess.Popen(
        [str(VENV_BIN / "uptermd"), "--ssh-addr", f"127.0.0.1:{port}", "--state-dir",
         str(state), "--penalty-exempt", "127.0.0.1"],
        env=user_env.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 15, what="uptermd")
    return proc


def test_join_rejoins_after_the_relay_restarts(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path
) -> None:
    port, state = free_port(), tmp_path / "relay"
    relay = relay_on(user_env, port, state)
    try:
        out = headless(
            user_env, "host", "--detach", "--accept", "--name", "j", "--skip-host-key-check",
            "--keepalive", "1", "--server", f"ssh://127.0.0.1:{port}", "--", *SHELL,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        info = json.loads(headless(user_env, "session", "info", "j", "-o", "json").stdout)
        joiner = PtyClient(
            ["upterm", "join", info["sshCommand"], "-i", str(joiner_key), *SSH_OPTS],
            user_env.env,
        )
        joiner.expect(b"upterm: joining through the relay")
        joiner.expect(b"$ ")
        joiner.type("echo before-$((20+1))\r")
        joiner.expect(b"before-21")

        relay.terminate()
        relay.wait(10)
        joiner.expect(b"upterm: the connection dropped; rejoining in")
        relay = relay_on(user_env, port, state)
        joiner.seen = b""
        joiner.expect(b"$ ", timeout=60)  # rejoined, once the host registered again
        joiner.type("echo after-$((20+2))\r")
        joiner.expect(b"after-22", timeout=30)
        assert (
            info["sshCommand"]
            == json.loads(headless(user_env, "session", "info", "j", "-o", "json").stdout)[
                "sshCommand"
            ]
        )

        # The session ends: no rejoining, the terminal is given back.
        rejoins = joiner.seen.count(b"rejoining")
        assert headless(user_env, "session", "stop", "j").returncode == 0
        status = joiner.wait(30)
        assert status != 255 and joiner.seen.count(b"rejoining") == rejoins
        assert b"\x1b[?1049l\x1b[?25h" in joiner.seen  # modes reset on the way out
    finally:
        relay.terminate()
        relay.wait(10)


def test_join_end_to_end_shows_the_host_key(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path
) -> None:
    out = headless(user_env, "host", "--detach", "--accept", "--name", "e", "--", *SHELL)
    assert out.returncode == 0, out.stderr
    info = json.loads(headless(user_env, "session", "info", "e", "-o", "json").stdout)
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host *\n  IdentityFile {joiner_key}\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
    )
    joiner = PtyClient(["upterm", "join", info["e2eCommand"], "-F", str(config)], user_env.env)
    fingerprint = wire.parse_public_key_line(info["hostKey"]).fingerprint  # type: ignore[union-attr]
    joiner.expect(f"joining end to end: the host's key is {fingerprint}".encode())
    joiner.expect(b"$ ")
    joiner.type("echo e2e-$((3*3))\r")
    joiner.expect(b"e2e-9")
    modes = [c["mode"] for c in json.loads(
        headless(user_env, "session", "info", "e", "-o", "json").stdout
    )["clients"]]  # fmt: skip
    assert modes == ["e2e"]
    joiner.close()
    bad = headless(user_env, "join", "not a line")
    assert bad.returncode == 2 and "that is not a join line" in bad.stderr
