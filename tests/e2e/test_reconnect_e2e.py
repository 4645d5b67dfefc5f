"""The relay goes away and comes back: the command keeps running, the join line stays valid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import UserEnv, start_relay, wait_for
from tests.e2e.test_cli_e2e import Joiner, headless

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def info(user_env: UserEnv, name: str) -> dict:
    out = headless(user_env, "session", "info", name, "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def host(user_env: UserEnv, server: str, name: str, *extra: str) -> dict:
    """A detached bash session on ``server`` (keepalive 1 s), ``extra`` flags added."""
    out = headless(
        user_env,
        "host",
        "--detach",
        "--accept",
        "--name",
        name,
        "--server",
        server,
        "--keepalive",
        "1",
        "--skip-host-key-check",
        "--known-hosts",
        str(Path(user_env.env["HOME"]) / "known_hosts"),
        *extra,
        "--",
        "bash",
        "--norc",
        "--noprofile",
    )
    assert out.returncode == 0, out.stderr
    return info(user_env, name)


@pytest.mark.parametrize("hostname", [None, "relay.example.test"])
def test_relay_restart_keeps_session_id_and_join_line(
    user_env: UserEnv, joiner_key, hostname: str | None
) -> None:
    """With --hostname, the relay's certificate names a host other than the address dialed:
    it was trusted by its plain key the first time, and must be on the redial too."""
    named = ["--hostname", hostname] if hostname else []
    relay = start_relay(user_env, None, *named)
    first = host(user_env, relay.url, "r")
    assert first["reconnectSupported"] is True
    joiner = Joiner(first, joiner_key)
    joiner.expect(b"$ ")
    joiner.type("export MARK=alive-$((100+23)); echo set-$((1+1))\r")
    joiner.expect(b"set-2")

    relay.proc.kill()
    relay.proc.wait()
    assert joiner.proc.wait(15) == 255  # its connection went with the relay
    wait_for(lambda: info(user_env, "r")["relayState"] == "reconnecting", what="reconnecting")
    assert Path(f"/proc/{first['pid']}").exists(), "the command must keep running"

    # The same relay (same key, same address) comes back.
    again = subprocess.Popen(
        [
            "uptermd",
            "--ssh-addr",
            f"127.0.0.1:{relay.port}",
            "--state-dir",
            str(relay.state_dir),
            *named,
        ],
        env=user_env.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: info(user_env, "r")["relayState"] == "connected", 45, what="reconnect")
        now = info(user_env, "r")
        assert now["sessionId"] == first["sessionId"]
        assert now["sshCommand"] == first["sshCommand"]
        assert now["reconnects"] == 1
        rejoin = Joiner(first, joiner_key)  # the old join line
        rejoin.expect(b"$ ")
        rejoin.type("echo $MARK\r")
        rejoin.expect(b"alive-123")  # the same shell
        rejoin.close()
    finally:
        again.terminate()
        again.wait(10)


def test_dead_relay_is_detected_and_left_for_a_live_one(user_env: UserEnv, joiner_key) -> None:
    relay = start_relay(user_env)
    first = host(user_env, relay.url, "s")
    os.kill(relay.proc.pid, signal.SIGSTOP)  # alive to TCP, silent to SSH
    try:
        # Keepalive every 1 s, three missed: the daemon notices within seconds.
        wait_for(lambda: info(user_env, "s")["relayState"] == "reconnecting", 20, what="detection")
    finally:
        os.kill(relay.proc.pid, signal.SIGCONT)
    # Back to life: the redial registers a newer generation, which takes over the session
    # the relay still held for the silent connection.
    wait_for(lambda: info(user_env, "s")["relayState"] == "connected", 45, what="reconnect")
    joiner = Joiner(first, joiner_key)
    joiner.expect(b"$ ")
    joiner.type("echo back-$((7*7))\r")
    joiner.expect(b"back-49")
    joiner.close()
    relay.proc.terminate()
    relay.proc.wait(10)
