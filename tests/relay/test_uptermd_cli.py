"""uptermd as a program: banner, persistent host key, clear start-up errors."""

from __future__ import annotations

import socket
import subprocess

from tests.conftest import VENV_BIN, UserEnv, start_relay


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.makefile("rb").readline()


def host_key_line(port: int) -> str:
    out = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
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
        key1 = host_key_line(first.port)
    finally:
        first.proc.terminate()
        first.proc.wait(5)
    key_file = first.state_dir / "ssh_host_ed25519_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (first.state_dir / "ssh_host_ed25519_key.pub").read_text().strip() == key1
    second = start_relay(user_env, first.state_dir)
    try:
        assert host_key_line(second.port) == key1
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
