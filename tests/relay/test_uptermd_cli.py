"""uptermd as a program: banner, persistent host key, clear start-up errors."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.conftest import VENV_BIN, UserEnv, start_relay


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.makefile("rb").readline()


def host_key_line(port: int, kind: str = "ed25519") -> str:
    out = subprocess.run(
        ["ssh-keyscan", "-t", kind, "-p", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    (line,) = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith("#")]
    return line.split(None, 1)[1]


def test_banner_and_host_key_persist_across_restarts(user_env: UserEnv) -> None:
    first = start_relay(user_env)
    try:
        assert banner(first.port) == b"SSH-2.0-uptermd-0.1.0\r\n"
        # ssh-keyscan asks for one type per connection: each is served.
        keys = {kind: host_key_line(first.port, kind) for kind in ("ed25519", "ecdsa", "rsa")}
    finally:
        first.proc.terminate()
        first.proc.wait(5)
    assert keys["ecdsa"].startswith("ecdsa-sha2-nistp256 ") and keys["rsa"].startswith("ssh-rsa ")
    for kind, line in keys.items():
        key_file = first.state_dir / f"ssh_host_{kind}_key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.with_suffix(".pub").read_text().strip() == line
    second = start_relay(user_env, first.state_dir)
    try:
        for kind, line in keys.items():
            assert host_key_line(second.port, kind) == line
    finally:
        second.proc.terminate()
        second.proc.wait(5)


def test_bad_listen_address_is_one_line(user_env: UserEnv) -> None:
    out = user_env.run(str(VENV_BIN / "uptermd"), "--ssh-addr", "nonsense")
    assert out.returncode == 2
    assert out.stderr == ("uptermd: address 'nonsense' must be host:port, e.g. 127.0.0.1:2222\n")


def test_port_in_use_is_one_line(user_env: UserEnv) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = user_env.run(
            str(VENV_BIN / "uptermd"),
            "--ssh-addr",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(user_env.root / "rs"),
        )
    assert out.returncode == 2
    assert out.stderr.startswith(f"uptermd: cannot listen on 127.0.0.1:{port}: ")
    assert out.stderr.count("\n") == 1, out.stderr


def test_private_key_files_need_one_ed25519_key_and_one_of_each_type(
    user_env: UserEnv, tmp_path: Path
) -> None:
    """`--private-key` is repeatable (a node set shares its keys); ed25519 is required, as it
    signs the certificates hosts check, and two keys of one type are a mistake."""
    for name, kind in (("rsa", "rsa"), ("rsa2", "rsa"), ("ed", "ed25519")):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(tmp_path / name)], check=True
        )
    uptermd = str(VENV_BIN / "uptermd")
    only_rsa = user_env.run(uptermd, "--private-key", str(tmp_path / "rsa"))
    assert only_rsa.returncode != 0
    assert only_rsa.stderr.count("\n") == 1 and "needs an ed25519 key" in only_rsa.stderr
    twice = user_env.run(
        uptermd, "--private-key", str(tmp_path / "rsa"), "--private-key", str(tmp_path / "rsa2")
    )
    assert twice.returncode != 0 and "second ssh-rsa key" in twice.stderr
    both = start_relay(
        user_env,
        None,
        "--private-key",
        str(tmp_path / "ed"),
        "--private-key",
        str(tmp_path / "rsa"),
    )
    try:
        kind, blob = (tmp_path / "rsa.pub").read_text().split()[:2]
        assert host_key_line(both.port, "rsa") == f"{kind} {blob}"
        assert host_key_line(both.port, "ed25519").split()[1] in (tmp_path / "ed.pub").read_text()
    finally:
        both.proc.terminate()
        both.proc.wait(5)


def test_proxy_options_of_the_websocket_listener_are_checked_at_start(
    user_env: UserEnv, tmp_path: Path
) -> None:
    """Each mistake is one line naming the flag, before anything listens."""
    ws = ("--ws-addr", "127.0.0.1:0")
    tls = ("--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem"))
    cases = {
        ("--ws-proxy-protocol", *ws): "--ws-proxy-protocol needs --proxy-protocol-from",
        ("--ws-proxy-protocol", "--proxy-protocol-from", "10.0.0.5"): (
            "--ws-proxy-protocol is for the WebSocket listener: add --ws-addr"
        ),
        ("--ws-forwarded-from", "10.0.0.5"): (
            "--ws-forwarded-from is for the WebSocket listener: add --ws-addr"
        ),
        ("--ws-forwarded-from", "10.0.0.300", *ws): (
            "--ws-forwarded-from: '10.0.0.300' is not an address or CIDR block"
        ),
        ("--ws-proxy-protocol", "--proxy-protocol-from", "10.0.0.5", *ws, *tls): (
            "--ws-proxy-protocol cannot go with --tls-cert"
        ),
    }
    for args, text in cases.items():
        out = user_env.run(str(VENV_BIN / "uptermd"), "--state-dir", str(tmp_path / "s"), *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.startswith(f"uptermd: {text}"), (args, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr


def test_cluster_options_are_checked_at_start(user_env: UserEnv, tmp_path: Path) -> None:
    """Each mistake is one line naming the flag and what to do, before anything listens."""
    redis = ("--routing", "redis")
    cases = {
        (
            "--redis-url",
            "redis://10.0.0.9:6379",
        ): "--redis-url is for a cluster: add --routing redis",
        ("--cluster-addr", "10.0.0.5:2223"): "--cluster-addr is for a cluster: add --routing redis",
        redis: "--routing redis needs --redis-url",
        (*redis, "--redis-url", "redis://10.0.0.9:6379"): "--routing redis needs --cluster-addr",
        (*redis, "--redis-url", "http://10.0.0.9", "--cluster-addr", "127.0.0.1:0"): (
            "--redis-url 'http://10.0.0.9': use redis://HOST:PORT"
        ),
        (*redis, "--redis-url", "redis+sentinel://10.0.0.9:26379", "--cluster-addr", "x"): (
            "address 'x' must be host:port"
        ),
        (*redis, "--redis-url", "redis+sentinel://10.0.0.9:26379", "--cluster-addr", "h:0"): (
            "--redis-url 'redis+sentinel://10.0.0.9:26379' names no service"
        ),
        (
            *redis,
            "--redis-url",
            "redis://h:1",
            "--cluster-addr",
            "127.0.0.1:0",
            "--lease-ttl",
            "0.5s",
        ): ("--lease-ttl must be at least 1s"),
        (*redis, "--redis-url", "redis://h:1", "--cluster-addr", "0.0.0.0:2223"): (
            "--cluster-addr 0.0.0.0:2223 listens on every address, which other nodes cannot dial"
        ),
    }
    for args, text in cases.items():
        out = user_env.run(str(VENV_BIN / "uptermd"), "--state-dir", str(tmp_path / "s"), *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.startswith(f"uptermd: {text}"), (args, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr
