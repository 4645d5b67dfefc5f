"""Bad input never crashes the daemon or disturbs other clients; errors are one clear line."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from tests.conftest import UserEnv, wait_for
from upterm import adminproto

NOBODY_UID = 65534


def start_daemon(user_env: UserEnv) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "upterm.daemon"],
        env=user_env.env,
        stdout=subprocess.DEVNULL,
        stderr=open(user_env.root / "daemon.log", "ab"),  # noqa: SIM115
    )
    wait_for(lambda: (user_env.runtime / "daemon.sock").exists(), 10, what="daemon socket")
    return proc


def connect(user_env: UserEnv) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(user_env.runtime / "daemon.sock"))
    return s


def read_frame(s: socket.socket) -> dict:
    header = b""
    while len(header) < 4:
        chunk = s.recv(4 - len(header))
        assert chunk, "daemon closed the connection"
        header += chunk
    (length,) = struct.unpack(">I", header)
    body = b""
    while len(body) < length:
        body += s.recv(length - len(body))
    return msgpack.unpackb(body, raw=False)


def hello(s: socket.socket, req_id: int = 1) -> dict:
    s.sendall(adminproto.encode_frame({"type": "hello", "id": req_id, "version": 1}))
    return read_frame(s)


@pytest.fixture
def daemon(user_env: UserEnv):
    proc = start_daemon(user_env)
    yield proc
    proc.terminate()
    proc.wait(10)


def test_malformed_frames_get_error_replies_and_others_keep_working(
    user_env: UserEnv, daemon
) -> None:
    bystander = connect(user_env)
    assert hello(bystander)["type"] == "ok"

    s = connect(user_env)
    # A body that is not msgpack.
    s.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    reply = read_frame(s)
    assert (reply["type"], reply["id"], reply["code"]) == ("error", None, "bad_frame")
    assert reply["message"].startswith("undecodable frame")
    # msgpack, but not a map.
    s.sendall(struct.pack(">I", 1) + msgpack.packb(7))
    assert read_frame(s)["code"] == "bad_frame"
    # Wrong field types, missing fields, out-of-range values: bad_request with the id.
    s.sendall(adminproto.encode_frame({"type": "attach", "id": 5, "cols": "80", "rows": 24}))
    reply = read_frame(s)
    assert (reply["type"], reply["id"], reply["code"]) == ("error", 5, "bad_request")
    s.sendall(adminproto.encode_frame({"type": "attach", "id": 6, "cols": 0, "rows": 24}))
    assert read_frame(s)["code"] == "bad_request"
    s.sendall(adminproto.encode_frame({"id": 7}))
    assert read_frame(s)["code"] == "bad_request"
    # Unknown types are named in the answer.
    s.sendall(adminproto.encode_frame({"type": "format-disk", "id": 8}))
    reply = read_frame(s)
    assert (reply["id"], reply["code"]) == (8, "unknown_type")
    assert "format-disk" in reply["message"]
    # Unknown sessions.
    s.sendall(adminproto.encode_frame({"type": "info", "id": 9, "session": "nope"}))
    assert read_frame(s)["code"] == "not_found"
    # The same connection still works after all that.
    assert hello(s, 10) == {
        "type": "ok",
        "id": 10,
        "version": 1,
        "daemon": "0.1.0",
        "pid": daemon.pid,
    }

    # An oversized frame cannot be resynchronised: error, then a clean close.
    s.sendall(struct.pack(">I", adminproto.MAX_FRAME_BYTES + 1))
    assert read_frame(s)["code"] == "too_large"
    assert s.recv(10) == b""

    assert hello(bystander, 2)["type"] == "ok"
    assert daemon.poll() is None


def test_peer_disconnecting_mid_request_is_harmless(user_env: UserEnv, daemon) -> None:
    for _ in range(5):
        s = connect(user_env)
        frame = adminproto.encode_frame({"type": "hello", "id": 1, "version": 1})
        s.sendall(frame[: len(frame) // 2])
        s.close()
    s = connect(user_env)
    s.sendall(adminproto.encode_frame({"type": "list", "id": 1}))
    s.shutdown(socket.SHUT_WR)
    assert read_frame(s) == {"type": "ok", "id": 1, "sessions": []}
    assert hello(connect(user_env))["type"] == "ok"
    assert daemon.poll() is None


def test_client_of_another_uid_is_dropped(user_env: UserEnv, daemon) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as a second user")
    # Open the path up so only SO_PEERCRED stands between the other user and the daemon.
    os.chmod(user_env.env["XDG_RUNTIME_DIR"], 0o755)
    user_env.runtime.chmod(0o755)
    (user_env.runtime / "daemon.sock").chmod(0o777)
    code = (
        "import socket,struct,sys;s=socket.socket(socket.AF_UNIX);s.settimeout(5);"
        f"s.connect({str(user_env.runtime / 'daemon.sock')!r});"
        "s.sendall(bytes.fromhex(sys.argv[1]));print(repr(s.recv(100)))"
    )
    frame = adminproto.encode_frame({"type": "list", "id": 1}).hex()
    out = subprocess.run(
        # The system Python: the venv's may live where the other user cannot read it.
        ["/usr/bin/python3", "-c", code, frame],
        user=NOBODY_UID,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.stdout.strip() in ("b''", ""), out
    # The owner still gets answers.
    assert hello(connect(user_env))["type"] == "ok"


def test_socket_of_another_user_is_refused(user_env: UserEnv) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to create a socket owned by another user")
    user_env.runtime.mkdir(mode=0o700)
    path = user_env.runtime / "daemon.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen()
    os.chown(path, NOBODY_UID, NOBODY_UID)
    out = user_env.run("upterm", "session", "list")
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1, out.stderr
    assert f"belongs to uid {NOBODY_UID}" in out.stderr
    s.close()


def test_runtime_dir_open_to_others_is_refused(user_env: UserEnv) -> None:
    user_env.runtime.mkdir(mode=0o700)
    user_env.runtime.chmod(0o755)
    out = user_env.run("upterm", "session", "list")
    assert out.returncode != 0
    assert out.stderr.strip() == (
        f"upterm: {user_env.runtime} is open to other users (mode 755); "
        f"run 'chmod 700 {user_env.runtime}'"
    )


def test_sockets_are_private(user_env: UserEnv, daemon) -> None:
    assert user_env.runtime.stat().st_mode & 0o777 == 0o700
    assert (user_env.runtime / "daemon.sock").stat().st_mode & 0o777 == 0o600


def test_relay_unreachable_is_one_line_naming_the_url(user_env: UserEnv, daemon) -> None:
    # Port 1 on loopback: nothing listens there.
    out = user_env.run("upterm", "host", "--accept", "--server", "ssh://127.0.0.1:1", "--", "true")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("upterm: cannot reach the relay at ssh://127.0.0.1:1: ")
    # The daemon is unharmed.
    listed = user_env.run("upterm", "session", "list")
    assert listed.returncode == 0, listed.stderr
    assert "No active sessions" in listed.stdout


def test_not_in_session(user_env: UserEnv) -> None:
    out = user_env.run("upterm", "session", "current")
    assert out.returncode == 1
    assert out.stderr == (
        "upterm: not inside an upterm session (UPTERM_ADMIN_SOCKET is not set); run it in a "
        "shell started by 'upterm host'\n"
    )


def test_host_without_tty_needs_accept(user_env: UserEnv) -> None:
    out = user_env.run("upterm", "host", "--", "true", stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert out.stderr == (
        "upterm: interactive confirmation requires a terminal; pass --accept to share "
        "without asking\n"
    )


@pytest.mark.parametrize("content", ["", "# only a comment\n"])
def test_empty_authorized_keys_fail_closed(user_env: UserEnv, tmp_path: Path, content: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(content)
    out = user_env.run("upterm", "host", "--accept", "--authorized-keys", str(keys), "--", "true")
    assert out.returncode == 1
    assert "holds no key; refusing to open the session to everyone" in out.stderr
    # Nothing was shared: no daemon had to be started for it.
    assert not (user_env.runtime / "daemon.sock").exists()


def test_unreadable_authorized_keys_fail_closed(user_env: UserEnv, tmp_path: Path) -> None:
    out = user_env.run(
        "upterm", "host", "--accept", "--authorized-keys", str(tmp_path / "missing"), "--", "true"
    )
    assert out.returncode == 1
    assert out.stderr.startswith(f"upterm: cannot read authorized keys file {tmp_path}/missing")


def test_two_clients_racing_start_one_daemon(user_env: UserEnv) -> None:
    procs = [
        subprocess.Popen(
            ["upterm", "host", "--accept", "--server", "ssh://127.0.0.1:1", "--", "true"],
            env=user_env.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(4)
    ]
    for p in procs:
        p.wait(30)
    time.sleep(0.3)
    daemons = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit()
        and b"upterm.daemon" in Path(f"/proc/{pid}/cmdline").read_bytes()
        and f"XDG_RUNTIME_DIR={user_env.env['XDG_RUNTIME_DIR']}".encode()
        in Path(f"/proc/{pid}/environ").read_bytes()
    ]
    assert len(daemons) == 1


def test_command_that_cannot_run_is_one_line_and_shares_nothing(user_env: UserEnv, daemon) -> None:
    out = user_env.run("upterm", "host", "--accept", "--", "/nonexistent/cmd")
    assert out.returncode == 1
    assert out.stderr == (
        "upterm: command not found: /nonexistent/cmd; check the command after '--'\n"
    )
    listed = user_env.run("upterm", "session", "list", "-o", "json")
    assert listed.stdout.strip() == "[]"
    # The failed session's socket was removed again.
    assert sorted(p.name for p in user_env.runtime.iterdir()) == ["daemon.lock", "daemon.sock"]


def test_a_role_for_a_source_not_given_is_an_error(user_env: UserEnv, tmp_path: Path) -> None:
    keys = tmp_path / "team"
    keys.write_text("")
    out = user_env.run(
        "upterm", "host", "--accept", "--authorized-keys", str(keys),
        "--role", "github:bob=viewer", "--", "true",
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == (
        f"upterm: --role github:bob=viewer: no such source on the command line (sources: "
        f"{keys}); name it as --authorized-keys or a --*-user gives it\n"
    )
    # The file's own label is accepted (and then the empty file fails closed, as always).
    ok = user_env.run(
        "upterm", "host", "--accept", "--authorized-keys", str(keys),
        "--role", f"{keys}=viewer", "--", "true",
    )  # fmt: skip
    assert ok.returncode == 1 and "holds no key" in ok.stderr
    assert not (user_env.runtime / "daemon.sock").exists()
