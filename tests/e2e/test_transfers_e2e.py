"""Files and ports through a session, only with the host's consent.

The real ``sftp``, ``scp`` and ``ssh -L`` from OpenSSH and ``psftp``/``pscp`` from PuTTY,
through the relay and end to end, against a session whose host answers in its terminal,
from another shell, or not at all.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SSH_OPTS, PtyClient, UserEnv, make_key, wait_for
from tests.e2e.test_cli_e2e import headless
from tests.e2e.test_clients_e2e import putty_key, relay_fingerprint, relay_port
from tests.e2e.test_host_features_e2e import SHELL, detached

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def info_of(user_env: UserEnv, name: str) -> dict:
    return json.loads(headless(user_env, "session", "info", name, "-o", "json").stdout)


def home(user_env: UserEnv) -> Path:
    return Path(user_env.env["HOME"])


def printed(line: str, key: Path, *extra: str) -> list[str]:
    """A printed scp/sftp line as typed, plus the test's key and options."""
    argv = shlex.split(line)
    return [argv[0], *SSH_OPTS, "-i", str(key), "-o", "BatchMode=yes", *extra, *argv[1:]]


def sftp(info: dict, key: Path, commands: str, env: dict[str, str], timeout: float = 60):
    argv = printed(str(info["sftpCommand"]), key, "-b", "-")
    return subprocess.run(
        argv, input=commands, capture_output=True, text=True, timeout=timeout, env=env
    )


def scp(info: dict, key: Path, src: str, dst: str, env: dict[str, str]):
    """``src``/``dst`` with ``REMOTE:`` for the session's side (the printed host part)."""
    argv = printed(str(info["scpCommand"]), key)
    remote = argv[-1]  # "HOST:"
    argv = argv[:-2]
    return subprocess.run(
        [*argv, src.replace("REMOTE:", remote), dst.replace("REMOTE:", remote)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def keyed(user_env: UserEnv, tmp_path: Path) -> Path:
    return make_key(tmp_path / "friend")


def test_sftp_and_scp_with_the_printed_lines(
    user_env: UserEnv, keyed: Path, tmp_path: Path
) -> None:
    """Download, upload, listing, setstat, symlinks out of the home, odd names: all work
    as the host user, and each is in the session's activity with its bytes."""
    root = home(user_env)
    (root / "notes.txt").write_text("host notes\n")
    spaced = root / "dir with spaces"
    spaced.mkdir()
    (spaced / "größe ✓.txt").write_text("unicode content\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("beyond the home\n")
    (root / "out-link").symlink_to(outside)
    info = detached(user_env, "files", "--accept-transfers", "--authorized-keys", f"{keyed}.pub")
    assert info["sftpCommand"].startswith("sftp ") and "-o User=" in info["sftpCommand"]
    assert info["scpCommand"].startswith("scp ") and info["scpCommand"].endswith(":")
    card = headless(user_env, "session", "info", "files").stdout
    assert "File Transfer:" in card and "without asking (--accept-transfers)" in card
    assert f"SFTP:               {info['sftpCommand']}" in card

    local = tmp_path / "local"
    local.mkdir()
    (local / "up load.bin").write_bytes(os.urandom(300_000))
    out = sftp(
        info,
        keyed,
        f"""ls -l
get notes.txt {local}/notes.txt
get "dir with spaces/größe ✓.txt" {local}/unicode.txt
get out-link {local}/outside.txt
put "{local}/up load.bin" "dir with spaces/up load.bin"
chmod 600 "dir with spaces/up load.bin"
mkdir made
rename notes.txt made/notes-moved.txt
symlink /etc/hostname made/host-link
rm "dir with spaces/größe ✓.txt"
ls made
pwd
""",
        user_env.env,
    )
    assert out.returncode == 0, out.stderr
    assert "notes.txt" in out.stdout and "dir with spaces" in out.stdout
    assert f"Remote working directory: {root}" in out.stdout
    assert (local / "notes.txt").read_text() == "host notes\n"
    assert (local / "unicode.txt").read_text() == "unicode content\n"
    assert (local / "outside.txt").read_text() == "beyond the home\n"
    uploaded = spaced / "up load.bin"
    assert uploaded.read_bytes() == (local / "up load.bin").read_bytes()
    assert uploaded.stat().st_mode & 0o777 == 0o600
    assert (root / "made" / "notes-moved.txt").read_text() == "host notes\n"
    assert os.readlink(root / "made" / "host-link") == "/etc/hostname"
    assert not (spaced / "größe ✓.txt").exists()

    # scp (SFTP mode, OpenSSH's default) with the printed line, both ways, with ~ paths.
    (local / "for-scp.txt").write_text("by scp\n")
    up = scp(info, keyed, str(local / "for-scp.txt"), "REMOTE:~/scp-up.txt", user_env.env)
    assert up.returncode == 0, up.stderr
    assert (root / "scp-up.txt").read_text() == "by scp\n"
    down = scp(info, keyed, "REMOTE:made/notes-moved.txt", str(local / "back.txt"), user_env.env)
    assert down.returncode == 0, down.stderr
    assert (local / "back.txt").read_text() == "host notes\n"

    activity = info_of(user_env, "files")["activity"]
    kinds = [(a["kind"], a["what"]) for a in activity]
    assert ("download", "~/notes.txt") in kinds
    assert ("upload", "~/dir with spaces/up load.bin") in kinds
    assert ("rename", "~/notes.txt -> ~/made/notes-moved.txt") in kinds
    assert ("remove", "~/dir with spaces/größe ✓.txt") in kinds
    assert ("upload", "~/scp-up.txt") in kinds
    upload = next(a for a in activity if a["what"] == "~/dir with spaces/up load.bin")
    assert upload["bytesIn"] == 300_000 and upload["allowed"] and not upload["open"]
    assert upload["by"] == "--accept-transfers"
    assert all(a["allowed"] for a in activity)


def _sftp_bg(info: dict, key: Path, commands: str, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        printed(str(info["sftpCommand"]), key, "-b", "-"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(commands)
    proc.stdin.close()
    return proc


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    assert proc.stderr is not None
    rc = proc.wait(60)
    return rc, proc.stderr.read()


def test_each_transfer_asks_the_host_who_answers_here_or_from_any_shell(
    user_env: UserEnv, keyed: Path, tmp_path: Path
) -> None:
    """Allow once (~y), refuse (~n), allow all from this joiner (~a), answer from another
    shell; a question nobody can answer (no terminal attached, or no answer in time) is
    refused, never allowed."""
    root = home(user_env)
    for name in ("a.txt", "c.txt"):
        (root / name).write_text(f"content of {name}\n")
    (tmp_path / "b.txt").write_text("uploaded\n")
    host = PtyClient(
        ["upterm", "host", "--accept", "--name", "ask", "--approve-timeout", "4s", "--", *SHELL],
        user_env.env,
        140,
        40,
    )
    host.expect(b"sends a ~).")
    info = info_of(user_env, "ask")
    env = user_env.env

    get = _sftp_bg(info, keyed, f"get a.txt {tmp_path}/a.txt\n", env)
    host.expect(b"asks to download ~/a.txt: ~y allows it, ~a allows all")
    pending = info_of(user_env, "ask")["pending"]
    assert [(p["kind"], p["what"]) for p in pending] == [("download", "~/a.txt")]
    host.type("\r~y")
    rc, err = _finish(get)
    assert rc == 0, err
    assert "upterm: asking the host to allow: download ~/a.txt" in err
    assert (tmp_path / "a.txt").read_text() == "content of a.txt\n"

    host.seen = b""
    put = _sftp_bg(info, keyed, f"put {tmp_path}/b.txt b.txt\n", env)
    host.expect(b"asks to upload ~/b.txt")
    host.type("\r~n")
    rc, err = _finish(put)
    assert rc != 0 and "upload ~/b.txt refused: the host" in err, err
    assert not (root / "b.txt").exists()

    # ~a: this and everything later from this joiner (same key, new connections too are
    # new joiners: the allowance lives as long as the connection).
    host.seen = b""
    batch = f"put {tmp_path}/b.txt b.txt\nrm a.txt\nrename c.txt c-renamed.txt\n"
    both = _sftp_bg(info, keyed, batch, env)
    host.expect(b"asks to upload ~/b.txt")
    host.type("\r~a")
    rc, err = _finish(both)
    assert rc == 0, err
    assert (root / "b.txt").read_text() == "uploaded\n" and not (root / "a.txt").exists()
    assert (root / "c-renamed.txt").exists()
    assert b"asks to remove" not in host.seen and b"asks to rename" not in host.seen

    # From any shell: 'upterm session approve NAME CLIENT'.
    other = _sftp_bg(info, make_key(tmp_path / "other"), f"get b.txt {tmp_path}/b2.txt\n", env)
    wait_for(lambda: info_of(user_env, "ask")["pending"], what="a waiting download")
    client = info_of(user_env, "ask")["pending"][0]["id"]
    out = headless(user_env, "session", "approve", "ask", client)
    assert out.returncode == 0, out.stderr
    rc, err = _finish(other)
    assert rc == 0 and (tmp_path / "b2.txt").read_text() == "uploaded\n", err

    # Nobody answers in time: refused.
    started = time.monotonic()
    late = _sftp_bg(info, keyed, f"get b.txt {tmp_path}/late.txt\n", env)
    rc, err = _finish(late)
    assert rc != 0 and "refused: the host did not answer in time" in err, err
    assert 3 < time.monotonic() - started < 30

    # Detached: no terminal to ask in, so refused at once.
    host.type("\r~.")
    host.wait()
    started = time.monotonic()
    rc, err = _finish(_sftp_bg(info, keyed, f"get b.txt {tmp_path}/none.txt\n", env))
    assert rc != 0 and "refused: nobody could answer (no host terminal attached)" in err, err
    assert time.monotonic() - started < 10 and not (tmp_path / "none.txt").exists()

    verdicts = [(a["kind"], a["allowed"], a["by"]) for a in info_of(user_env, "ask")["activity"]]
    assert ("download", True, "the host") in verdicts
    assert ("upload", False, "the host") in verdicts
    assert ("remove", True, "the host (everything from this joiner)") in verdicts
    assert ("download", False, "the host did not answer in time") in verdicts
    assert ("download", False, "nobody could answer (no host terminal attached)") in verdicts
    headless(user_env, "session", "stop", "ask")


def test_read_only_sessions_and_viewers_only_download(
    user_env: UserEnv, keyed: Path, tmp_path: Path
) -> None:
    (home(user_env) / "shared.txt").write_text("read me\n")
    (tmp_path / "up.txt").write_text("nope\n")
    viewer_key = make_key(tmp_path / "viewer")
    for name, flags, key in (
        ("ro", ["--read-only"], keyed),
        ("vw", ["--authorized-keys", f"{viewer_key}.pub", "--role", f"{viewer_key}.pub=viewer"],
         viewer_key),
    ):  # fmt: skip
        info = detached(
            user_env, name, "--accept-transfers", "--authorized-keys", f"{keyed}.pub", *flags
        )
        down = sftp(info, key, f"get shared.txt {tmp_path}/{name}.txt\n", user_env.env)
        assert down.returncode == 0, down.stderr
        for command in (
            "put {0}/up.txt up.txt",
            "rm shared.txt",
            "mkdir d",
            "chmod 600 shared.txt",
        ):
            out = sftp(info, key, command.format(tmp_path) + "\n", user_env.env)
            assert out.returncode != 0, command
            assert "you may only download in this session" in out.stderr, out.stderr
        assert not (home(user_env) / "up.txt").exists()
        assert (home(user_env) / "shared.txt").stat().st_mode & 0o777 != 0o600


def test_end_to_end_and_ssh_config_aliases(user_env: UserEnv, keyed: Path, tmp_path: Path) -> None:
    """``upterm session ssh-config`` Host aliases carry the token: ``scp FILE ALIAS:`` and
    ``sftp ALIAS-e2e`` work as typed, through the relay and end to end."""
    info = detached(user_env, "cfg", "--accept-transfers", "--authorized-keys", f"{keyed}.pub")
    config = tmp_path / "ssh_config"
    stanza = headless(user_env, "session", "ssh-config", "cfg").stdout
    config.write_text(
        stanza + f"\nHost *\n  IdentityFile {keyed}\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n"
        "  LogLevel ERROR\n"
    )
    (tmp_path / "via-relay.txt").write_text("through the relay\n")
    up = subprocess.run(
        ["scp", "-F", str(config), str(tmp_path / "via-relay.txt"), "cfg:"],
        capture_output=True, text=True, timeout=60, env=user_env.env,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert (home(user_env) / "via-relay.txt").read_text() == "through the relay\n"
    e2e = subprocess.run(
        ["sftp", "-F", str(config), "-b", "-", "cfg-e2e"],
        input=f"get via-relay.txt {tmp_path}/back.txt\nput {tmp_path}/via-relay.txt e2e.txt\n",
        capture_output=True, text=True, timeout=60, env=user_env.env,
    )  # fmt: skip
    assert e2e.returncode == 0, e2e.stderr
    assert (tmp_path / "back.txt").read_text() == "through the relay\n"
    assert (home(user_env) / "e2e.txt").exists()
    modes = {a["what"]: a for a in info_of(user_env, "cfg")["activity"]}
    assert modes["~/e2e.txt"]["kind"] == "upload" and info["e2eCommand"]


def test_putty_psftp_and_pscp(user_env: UserEnv, keyed: Path, tmp_path: Path) -> None:
    info = detached(user_env, "putty", "--accept-transfers", "--authorized-keys", f"{keyed}.pub")
    (home(user_env) / "for-putty.txt").write_text("hello putty\n")
    (tmp_path / "from-putty.txt").write_text("from pscp\n")
    base = [
        "-batch", "-P", str(relay_port(info)), "-l", str(info["sshUser"]),
        "-i", str(putty_key(keyed)), "-hostkey", relay_fingerprint(user_env),
    ]  # fmt: skip
    script = tmp_path / "psftp.txt"
    script.write_text(f"get for-putty.txt {tmp_path}/got.txt\nls\n")
    out = subprocess.run(
        ["psftp", *base, "-b", str(script), "127.0.0.1"],
        capture_output=True, text=True, timeout=60, env=user_env.env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "got.txt").read_text() == "hello putty\n"
    pscp = subprocess.run(
        ["pscp", *base, str(tmp_path / "from-putty.txt"), "127.0.0.1:pscp.txt"],
        capture_output=True, text=True, timeout=60, env=user_env.env,
    )  # fmt: skip
    assert pscp.returncode == 0, pscp.stdout + pscp.stderr
    assert (home(user_env) / "pscp.txt").read_text() == "from pscp\n"


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on loopback: what a joiner's ssh -L reaches."""

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                self.request.sendall(data)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def through(port: int, payload: bytes = b"ping\n") -> bytes:
    """What comes back from a connection to the joiner's forwarded local port (b"" when the
    forward was refused); waits for ssh to listen."""
    deadline = time.monotonic() + 20
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=15)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "ssh never listened"
            time.sleep(0.1)
    with sock:
        sock.sendall(payload)
        try:
            return sock.recv(100)
        except ConnectionResetError:
            return b""


def joiner_with(info: dict, key: Path, *extra: str, env: dict[str, str]) -> PtyClient:
    from tests.e2e.test_cli_e2e import Joiner

    # LogLevel INFO (ssh's default; the tests' options say ERROR): "open failed: ..." is
    # logged at INFO.
    return PtyClient(
        ["ssh", "-o", "LogLevel=INFO", *extra, *Joiner.ssh_args(info, key)], env, 120, 30
    )


def test_forwarding_is_off_by_default_and_remote_agent_x11_never_offered(
    user_env: UserEnv, keyed: Path, echo_port: int, tmp_path: Path
) -> None:
    info = detached(user_env, "fwoff")
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(tmp_path / "agent.sock")])
    try:
        wait_for((tmp_path / "agent.sock").exists, what="ssh-agent")
        local = free_port()
        joiner = joiner_with(
            info, keyed,
            "-L", f"{local}:127.0.0.1:{echo_port}", "-R", "0:127.0.0.1:9", "-A", "-X",
            env={**user_env.env, "SSH_AUTH_SOCK": str(tmp_path / "agent.sock"), "DISPLAY": ":99"},
        )  # fmt: skip
        joiner.expect(b"$ ")
        joiner.expect(b"upterm: remote forwarding (ssh -R) is never offered")
        joiner.expect(b"upterm: agent forwarding (ssh -A) is never offered")
        joiner.expect(b"upterm: X11 forwarding (ssh -X, -Y) is never offered")
        assert through(local) == b""
        joiner.expect(b"port forwarding (ssh -L) is off in this session")
        joiner.type("echo still-$((20+22))\r")
        joiner.expect(b"still-42")
        joiner.close()
    finally:
        agent.kill()
        agent.wait()


def test_loopback_forwards_ask_per_destination(
    user_env: UserEnv, keyed: Path, echo_port: int
) -> None:
    host = PtyClient(
        ["upterm", "host", "--accept", "--name", "fw", "--allow-forwarding", "loopback",
         "--", *SHELL],
        user_env.env, 160, 40,
    )  # fmt: skip
    host.expect(b"sends a ~).")
    info = info_of(user_env, "fw")
    assert "Port Forwarding:    ssh -L to this machine's loopback, each destination asks you" in (
        headless(user_env, "session", "info", "fw").stdout
    )
    ports = [free_port() for _ in range(3)]
    joiner = joiner_with(
        info, keyed,
        "-L", f"{ports[0]}:127.0.0.1:{echo_port}",
        "-L", f"{ports[1]}:0.0.0.0:{echo_port}",
        "-L", f"{ports[2]}:localhost:{echo_port}",
        env=user_env.env,
    )  # fmt: skip
    joiner.expect(b"$ ")
    replies: list[bytes] = []
    first = threading.Thread(target=lambda: replies.append(through(ports[0], b"one\n")))
    first.start()
    host.expect(f"asks to forward 127.0.0.1:{echo_port}: ~y allows it".encode())
    host.type("\r~y")
    first.join(30)
    assert replies == [b"one\n"]
    host.seen = b""
    assert through(ports[0], b"two\n") == b"two\n"  # the same destination: not asked again
    # 0.0.0.0 reaches this machine's services too, but is not a loopback address: refused
    # without a question.
    assert through(ports[1]) == b""
    joiner.expect(f"only loopback destinations (localhost, 127.0.0.0/8, ::1) may be forwarded "
                  f"in this session, not 0.0.0.0:{echo_port}".encode())  # fmt: skip
    second = threading.Thread(target=lambda: replies.append(through(ports[2], b"three\n")))
    second.start()
    host.expect(f"asks to forward localhost:{echo_port}".encode())
    host.type("\r~n")
    second.join(30)
    assert replies[-1] == b""
    joiner.expect(b"refused: the host")
    assert b"asks to forward 0.0.0.0" not in host.seen and b"asks to forward 127.0.0.1" not in (
        host.seen
    )
    activity = info_of(user_env, "fw")["activity"]
    done = [a for a in activity if a["what"] == f"127.0.0.1:{echo_port}"]
    assert [a["by"] for a in done] == ["the host", "the host (this destination, earlier)"]
    assert all(a["bytesIn"] == a["bytesOut"] == 4 for a in done)
    joiner.close()
    host.type("exit\r")
    host.wait()


def test_any_forwards_accepted_up_front_and_who_may_not(
    user_env: UserEnv, keyed: Path, echo_port: int, tmp_path: Path
) -> None:
    viewer = make_key(tmp_path / "viewer")
    locked = make_key(tmp_path / "locked")
    locked_line = tmp_path / "locked.keys"
    locked_line.write_text("no-port-forwarding " + Path(f"{locked}.pub").read_text())
    info = detached(
        user_env, "any", "--allow-forwarding", "any", "--accept-forwards",
        "--authorized-keys", f"{keyed}.pub", "--authorized-keys", f"{viewer}.pub",
        "--authorized-keys", str(locked_line), "--role", f"{viewer}.pub=viewer",
    )  # fmt: skip
    port = free_port()
    # 0.0.0.0 is not loopback, so only "any" lets it through (to this machine).
    joiner = joiner_with(info, keyed, "-N", "-L", f"{port}:0.0.0.0:{echo_port}", env=user_env.env)
    assert through(port, b"anywhere\n") == b"anywhere\n"
    joiner.close()
    # End to end the host's own server decides the same way.
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host *\n  IdentityFile {keyed}\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  BatchMode yes\n"
    )
    port = free_port()
    e2e = PtyClient(
        ["ssh", "-F", str(config), "-N", "-L", f"{port}:127.0.0.1:{echo_port}",
         *shlex.split(str(info["e2eCommand"]))[1:]],
        user_env.env,
    )  # fmt: skip
    assert through(port, b"e2e\n") == b"e2e\n"
    e2e.close()
    for key, why in (
        (viewer, b"viewers may not forward ports"),
        (locked, b"your key may not forward ports (no-port-forwarding or restrict)"),
    ):
        port = free_port()
        joiner = joiner_with(info, key, "-L", f"{port}:127.0.0.1:{echo_port}", env=user_env.env)
        joiner.expect(b"$ ")
        assert through(port) == b""
        joiner.expect(why)
        joiner.close()


def test_access_options_are_checked_before_anything_starts(user_env: UserEnv) -> None:
    for flags, words in (
        (["--allow-forwarding", "loopback", "--read-only"], "cannot go with --read-only"),
        (["--accept-forwards"], "--accept-forwards needs --allow-forwarding"),
        (["--accept-transfers", "--no-sftp"], "contradict each other"),
        (["--full-access", "--read-only"], "contradict each other"),
        (["--accept-transfers"], "--accept-transfers needs --authorized-keys or a --*-user"),
        (["--full-access"], "--full-access needs --authorized-keys or a --*-user"),
    ):
        out = headless(user_env, "host", "--accept", *flags, "--", "true")
        assert out.returncode != 0, flags
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (flags, out.stderr)


async def test_a_flood_of_file_requests_costs_a_bystander_little(
    user_env: UserEnv, tmp_path: Path
) -> None:
    """Attack: a joiner floods the host's SFTP server with stat requests (they ask
    nobody) and with opens that are refused at once (no terminal to ask). Each is a
    request the daemon serves on the terminal's event loop; while someone types they move
    at the transfer pace, and refusals past ten per ten seconds reach neither the log nor
    the host's screen one by one. A bystander joiner typing meanwhile keeps its echo."""
    import asyncio

    import asyncssh

    from tests.relay.attackkit import Latency, judge

    victim, attacker = make_key(tmp_path / "victim"), make_key(tmp_path / "attacker")
    info = detached(
        user_env, "flood", "--authorized-keys", f"{victim}.pub",
        "--authorized-keys", f"{attacker}.pub", cmd=["cat"],
    )  # fmt: skip
    port, token = relay_port(info), str(info["sshUser"])

    def connect(key: Path) -> Any:
        return asyncssh.connect(
            "127.0.0.1", port, username=token, client_keys=[str(key)], known_hosts=None,
            agent_path=None, config=None,
        )  # fmt: skip

    async with connect(victim) as typing:
        out: asyncio.Queue[bytes] = asyncio.Queue()

        class Screen(asyncssh.SSHClientSession[bytes]):
            def data_received(self, data: bytes, datatype: int | None) -> None:
                out.put_nowait(data)

        chan, _ = await typing.create_session(Screen, term_type="xterm", encoding=None)
        await asyncio.sleep(1)

        async def echoes(n: int) -> Latency:
            samples = []
            for i in range(n):
                ch = bytes([97 + i % 26])
                while not out.empty():
                    out.get_nowait()
                start = time.perf_counter()
                chan.write(ch)
                seen = b""
                while ch not in seen:
                    seen += await asyncio.wait_for(out.get(), 5)
                samples.append(time.perf_counter() - start)
                await asyncio.sleep(0.01)
            return Latency(tuple(samples))

        before = await echoes(150)
        log_file = Path(user_env.env["XDG_STATE_HOME"]) / "upterm" / "daemon.log"
        log_before = log_file.read_text().count("refused:")
        requests = 0
        async with connect(attacker) as hostile, hostile.start_sftp_client() as files:
            stop = asyncio.Event()

            async def stats() -> None:
                nonlocal requests
                while not stop.is_set():
                    await files.stat(".")
                    requests += 1

            async def opens() -> None:
                nonlocal requests
                while not stop.is_set():
                    with pytest.raises(asyncssh.SFTPPermissionDenied):
                        await files.open(".bashrc-nope", "w")
                    requests += 1

            workers = [asyncio.ensure_future(w()) for w in (stats, stats, stats, opens, opens)]
            await asyncio.sleep(0.5)
            during = await echoes(150)
            stop.set()
            await asyncio.gather(*workers)
        ok, line = judge("sftp flood", before, during)
        print(line, f"; {requests} requests")
        assert ok, line
        assert requests > 500  # a real flood, even paced
        refusals = log_file.read_text().count("refused:") - log_before
        assert 0 < refusals <= 12, refusals  # ten a window, not one per refused open
        activity = info_of(user_env, "flood")["activity"]
        assert len(activity) <= 64
        chan.close()


def test_transfers_go_to_the_recording_and_the_log(
    user_env: UserEnv, keyed: Path, tmp_path: Path
) -> None:
    (home(user_env) / "report.txt").write_text("r" * 5000)
    cast = tmp_path / "session.cast"
    info = detached(
        user_env, "rec", "--record", str(cast), "--accept-transfers",
        "--authorized-keys", f"{keyed}.pub",
    )  # fmt: skip
    out = sftp(info, keyed, f"get report.txt {tmp_path}/r.txt\n", user_env.env)
    assert out.returncode == 0, out.stderr
    wait_for(
        lambda: any(a["what"] == "~/report.txt" for a in info_of(user_env, "rec")["activity"]),
        what="the download in the activity",
    )
    assert headless(user_env, "session", "stop", "rec").returncode == 0
    wait_for(lambda: "rec" not in headless(user_env, "session", "list").stdout, what="the end")
    events = [json.loads(line) for line in cast.read_text().splitlines()[1:]]
    markers = [e[2] for e in events if e[1] == "m"]
    assert any(
        m.startswith("download ~/report.txt by ") and "allowed by --accept-transfers, 4.9 KiB" in m
        for m in markers
    ), markers
    log = (Path(user_env.env["XDG_STATE_HOME"]) / "upterm" / "daemon.log").read_text()
    assert "download ~/report.txt by " in log and "4.9 KiB" in log


def test_a_terminal_nobody_types_in_answers_nothing(
    user_env: UserEnv, keyed: Path, tmp_path: Path
) -> None:
    """Attached with its input not a terminal (a CI log, a pipe): nobody can type ~y there,
    so a transfer is refused at once rather than after the approval timeout."""
    (home(user_env) / "f.txt").write_text("x\n")
    info = detached(user_env, "piped")
    watcher = subprocess.Popen(
        ["upterm", "session", "attach", "piped"],
        env=user_env.env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)  # attached
        started = time.monotonic()
        out = sftp(info, keyed, f"get f.txt {tmp_path}/f.txt\n", user_env.env)
        assert out.returncode != 0 and "nobody could answer" in out.stderr, out.stderr
        assert time.monotonic() - started < 10
    finally:
        watcher.kill()
        watcher.wait()


async def test_what_a_hostile_sftp_client_tries(
    user_env: UserEnv, keyed: Path, tmp_path: Path
) -> None:
    """An SFTP client of our own making (asyncssh's) tries what OpenSSH's never sends:
    reading a file opened to overwrite it, a 4 GiB read, listings left open, a path whose
    ``..`` goes through a symlink, a truncate and a setuid mode dressed as "attributes"."""
    import asyncssh

    root = home(user_env)
    (root / "secret.txt").write_text("do not read me\n")
    (root / "big.bin").write_bytes(os.urandom(1 << 20))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "inner").mkdir(parents=True)
    (root / "door").symlink_to(elsewhere / "inner")
    info = detached(user_env, "hostile", "--accept-transfers", "--authorized-keys", f"{keyed}.pub")
    async with asyncssh.connect(
        "127.0.0.1", relay_port(info), username=str(info["sshUser"]), client_keys=[str(keyed)],
        known_hosts=None, agent_path=None, config=None,
    ) as conn, conn.start_sftp_client() as files:  # fmt: skip
        # Read and write at once: the download is asked (and recorded) too.
        async with files.open("secret.txt", "r+b") as f:
            assert await f.read(5) == b"do no"
        # One read never returns more than 256 KiB, whatever it asks.
        handle = await files._handler.open(b"big.bin", asyncssh.FXF_READ, asyncssh.SFTPAttrs())
        data, _ = await files._handler.read(handle, 0, 0xFFFFFFF0)
        assert len(data) == 256 * 1024
        await files._handler.close(handle)
        # A server-side copy (copy-data) copies everything.
        await files.copy("big.bin", "copy.bin", remote_only=True)
        assert (root / "copy.bin").read_bytes() == (root / "big.bin").read_bytes()
        # Listings left open are bounded.
        handles = []
        with pytest.raises(asyncssh.SFTPFailure, match="open listings"):
            for _ in range(40):
                handles.append(await files._handler.opendir(b"."))
        assert len(handles) == 16
        # The question names what the change really touches.
        async with files.open("door/../planted.txt", "wb") as f:
            await f.write(b"x")
        assert (elsewhere / "planted.txt").exists()
        # Attributes said plainly; no setuid bit from a joiner.
        await files.truncate("copy.bin", 0)
        await files.chmod("copy.bin", 0o4777)
        assert (root / "copy.bin").stat().st_mode & 0o7777 == 0o777
    activity = [(a["kind"], a["what"]) for a in info_of(user_env, "hostile")["activity"]]
    assert ("download", "~/secret.txt") in activity and ("overwrite", "~/secret.txt") in activity
    assert ("upload", f"{elsewhere}/planted.txt") in activity
    assert ("truncate", "~/copy.bin to 0 bytes") in activity
    assert ("chmod", "~/copy.bin (mode 777)") in activity
