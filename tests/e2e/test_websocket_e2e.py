"""Hosting over WebSocket with the real binaries: uptermd serving wss:// itself, the user's
daemon dialling it with --ca-file or through --proxy, joiners using the printed lines, and a
relay restart the host rides out under the same line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SSH_OPTS, VENV_BIN, UserEnv, start_relay, wait_for
from tests.e2e.test_cli_e2e import headless
from tests.relay.test_websocket import free_port, self_signed, tinyproxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]
LOCAL = "127.0.0.1"


def info(user_env: UserEnv, name: str) -> dict:
    out = headless(user_env, "session", "info", name, "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def host(user_env: UserEnv, name: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return headless(
        user_env, "host", "--detach", "--accept", "--name", name, "--keepalive", "1",
        "--skip-host-key-check", "--known-hosts", str(Path(user_env.env["HOME"]) / "kh"),
        *flags, "--", "bash", "--norc", "--noprofile",
    )  # fmt: skip


class Joiner:
    """The printed line, run as typed (``upterm`` found on PATH), plus a test's key and
    options; the jump ssh of an end-to-end line reads ``config``."""

    def __init__(self, line: str, key: Path, env: dict[str, str], config: Path) -> None:
        argv = shlex.split(line)
        argv = [
            a.replace("ssh -o ProxyCommand=", f"ssh -F {config} -o ProxyCommand=") for a in argv
        ]
        argv[1:1] = ["-F", str(config), "-tt", "-i", str(key), *SSH_OPTS]
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.seen = bytearray()

    def expect(self, marker: bytes, timeout: float = 20) -> None:
        import select
        import time

        assert self.proc.stdout
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{marker!r} not seen; got {bytes(self.seen[-300:])!r}"
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                assert chunk, f"ssh ended: {bytes(self.seen[-300:])!r} {self.proc.stderr.read()!r}"  # type: ignore[union-attr]
                self.seen += chunk

    def type(self, text: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def joiner_env(user_env: UserEnv, cert: Path) -> dict[str, str]:
    return {**user_env.env, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "SSL_CERT_FILE": str(cert)}


def test_wss_host_with_ca_file_rides_out_a_relay_restart(user_env: UserEnv, joiner_key) -> None:
    """uptermd --tls-cert on its WebSocket listener; the host trusts it by --ca-file alone
    (without, one line says the certificate is not trusted); joiners use the printed
    ProxyCommand line and the end-to-end line; the relay is killed and started again, and
    the host comes back over WebSocket under the same lines, the same shell behind them."""
    cert, key = self_signed(user_env.root, "relay")
    ws_port = free_port()
    ws_flags = ("--ws-addr", f"{LOCAL}:{ws_port}", "--tls-cert", str(cert), "--tls-key", str(key))
    relay = start_relay(user_env, None, *ws_flags)
    server = f"wss://localhost:{ws_port}"
    try:
        out = host(user_env, "untrusted", "--server", server)
        assert out.returncode == 1
        assert out.stderr.startswith(f"upterm: the certificate of localhost:{ws_port} is not ")
        assert out.stderr.count("\n") == 1, out.stderr

        out = host(user_env, "w", "--server", server, "--ca-file", str(cert))
        assert out.returncode == 0, out.stderr
        first = info(user_env, "w")
        token = first["sshUser"]
        assert first["sshCommand"] == (
            f"ssh -o ProxyCommand='upterm proxy wss://{token}@localhost:{ws_port}' "
            f"{token}@localhost"
        )
        assert first["e2eCommand"].startswith('ssh -o ProxyCommand="ssh -o ProxyCommand=')
        config = user_env.root / "ssh_config"
        config.write_text(
            f"Host *\n  IdentityFile {joiner_key}\n  IdentitiesOnly yes\n  BatchMode yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        )
        env = joiner_env(user_env, cert)
        joiner = Joiner(first["sshCommand"], joiner_key, env, config)
        joiner.expect(b"$ ")
        joiner.type("export MARK=alive-$((100+23)); echo set-$((1+1))\r")
        joiner.expect(b"set-2")

        relay.proc.kill()
        relay.proc.wait()
        assert joiner.proc.wait(15) == 255
        wait_for(lambda: info(user_env, "w")["relayState"] == "reconnecting", what="reconnecting")
        again = subprocess.Popen(
            ["uptermd", "--ssh-addr", f"{LOCAL}:{relay.port}", "--state-dir",
             str(relay.state_dir), "--penalty-exempt", LOCAL, *ws_flags],
            env=user_env.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(lambda: info(user_env, "w")["relayState"] == "connected", 45, what="back")
            now = info(user_env, "w")
            assert now["reconnects"] == 1
            assert (now["sessionId"], now["sshCommand"], now["e2eCommand"]) == (
                first["sessionId"], first["sshCommand"], first["e2eCommand"],
            )  # fmt: skip
            for n, line in enumerate((first["sshCommand"], first["e2eCommand"])):
                rejoin = Joiner(line, joiner_key, env, config)
                rejoin.expect(b"$ ")
                rejoin.type(f"echo $MARK-{n}\r")
                rejoin.expect(f"alive-123-{n}".encode())
                rejoin.close()
        finally:
            again.terminate()
            again.wait(10)
    finally:
        if relay.proc.poll() is None:
            relay.proc.kill()


def test_a_host_goes_through_the_http_proxy_it_is_given(user_env: UserEnv, joiner_key) -> None:
    """--proxy with Basic auth (tinyproxy): the host's tunnel crosses the proxy; a wrong
    password is one line naming the proxy, and --proxy for an ssh:// relay is refused."""
    ws_port = free_port()
    relay = start_relay(user_env, None, "--ws-addr", f"{LOCAL}:{ws_port}")
    try:
        with tinyproxy(user_env.root, "pxuser", "pxpass") as proxy_port:
            server = f"ws://{LOCAL}:{ws_port}"
            bad = f"http://pxuser:wrong@{LOCAL}:{proxy_port}"
            out = host(user_env, "bad", "--server", server, "--proxy", bad)
            assert out.returncode == 1
            assert out.stderr.startswith(f"upterm: the proxy {LOCAL}:{proxy_port} refused"), out
            assert out.stderr.count("\n") == 1, out.stderr
            good = f"http://pxuser:pxpass@{LOCAL}:{proxy_port}"
            out = host(user_env, "p", "--server", server, "--proxy", good)
            assert out.returncode == 0, out.stderr
            log = (user_env.root / "tinyproxy.log").read_text()
            assert f"CONNECT {LOCAL}:{ws_port}" in log, log[-2000:]
            config = user_env.root / "ssh_config"
            config.write_text(f"Host *\n  IdentityFile {joiner_key}\n  BatchMode yes\n")
            env = {**user_env.env, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
            joiner = Joiner(info(user_env, "p")["sshCommand"], joiner_key, env, config)
            joiner.expect(b"$ ")
            joiner.type("echo proxied-$((6*7))\r")
            joiner.expect(b"proxied-42")
            joiner.close()
        out = host(user_env, "x", "--server", relay.url, "--proxy", good)
        assert (out.returncode, out.stderr) == (
            2, f"upterm: --proxy is for ws:// and wss:// relays; --server is {relay.url}\n",
        )  # fmt: skip
    finally:
        relay.proc.terminate()
        relay.proc.wait(10)
