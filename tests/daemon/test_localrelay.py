"""The built-in relay is always ours: squatters are never used, orphans are replaced, a dead
child comes back. Real uptermd processes, real SSH key exchanges, real sessions and joiners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh
import pytest

from tests.conftest import VENV_BIN, UserEnv, ssh_join_command, wait_for
from upterm.daemon.localrelay import (
    HOST_KEY_NAME,
    PID_FILE_NAME,
    LocalRelay,
    serves_key,
)
from upterm.keys import Ed25519Key, load_or_create_host_key

pytestmark = pytest.mark.timeout(90)

JOIN_RE = re.compile(r"^SSH:\s+(ssh \S+@\S+(?: -p \d+)?)\s*$", re.M)

#: Another user's listener that only looks like uptermd: any key, the banner, and a record of
#: every authentication it is offered (a host that got that far would be registering there).
BANNER_SQUATTER = r"""
import asyncio, os, sys
import asyncssh

addr_file, record = sys.argv[1], sys.argv[2]

class Server(asyncssh.SSHServer):
    def begin_auth(self, username):
        with open(record, "a") as fh:
            fh.write(f"auth {username}\n")
        return True

    def public_key_auth_supported(self):
        return True

    def validate_public_key(self, username, key):
        return True

async def main():
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[key], server_version="uptermd-0.1.0",
        server_factory=Server,
    )
    port = server.sockets[0].getsockname()[1]
    with open(addr_file + ".tmp", "w") as fh:
        fh.write(f"127.0.0.1:{port}\n")
    os.replace(addr_file + ".tmp", addr_file)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class Squatter:
    """A process of "another user" holding a loopback port first."""

    def __init__(self, kind: str, root: Path) -> None:
        self.record = root / f"{kind}-squatter.record"
        self.record.touch()
        addr_file = root / f"{kind}-squatter.addr"
        if kind == "uptermd":
            # A real relay, with a key of its own (another user's state dir).
            argv = [sys.executable, "-m", "upterm.relay", "--ssh-addr", "127.0.0.1:0"]
            argv += ["--state-dir", str(root / "other-user"), "--addr-file", str(addr_file)]
        else:
            argv = [sys.executable, "-c", BANNER_SQUATTER, str(addr_file), str(self.record)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: addr_file.exists() or self.proc.poll() is not None, 15, what="squatter")
        assert self.proc.poll() is None, "the squatter did not start"
        self.port = int(addr_file.read_text().strip().rpartition(":")[2])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def state_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="ut-lr-", dir="/tmp"))
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=False)


def _our_key(state_dir: Path) -> Ed25519Key:
    return load_or_create_host_key(state_dir / HOST_KEY_NAME)


async def _presented_key(port: int) -> bytes:
    key = await asyncio.wait_for(asyncssh.get_server_host_key("127.0.0.1", port), 10)
    assert key is not None
    return bytes(key.public_data)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""
    except OSError:
        return False


async def _until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# -- the relay on its own ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uptermd", "banner"])
async def test_squatted_address_is_not_used(kind: str, state_root: Path, caplog) -> None:
    """Another user's uptermd (or anything with its banner) on our address: ours starts on
    another port, with our key, and the squatter is never authenticated to."""
    caplog.set_level(logging.INFO, logger="upterm.daemon.localrelay")
    squatter = Squatter(kind, state_root)
    state = state_root / "relay"
    relay = LocalRelay(f"127.0.0.1:{squatter.port}", state)
    try:
        info = await relay.ensure()
        ours = _our_key(state).public.blob
        assert info.pinned_key == ours
        assert info.port != squatter.port
        assert info.host == "127.0.0.1"
        assert await _presented_key(info.port) == ours
        assert await _presented_key(squatter.port) != ours
        assert squatter.proc.poll() is None
        assert f"127.0.0.1:{squatter.port} is held by another process" in caplog.text
        assert f"listens on 127.0.0.1:{info.port} instead" in caplog.text
        assert squatter.record.read_text() == ""
        # Asked again, the same relay: the squatter is not looked at twice.
        assert await relay.ensure() == info
    finally:
        await relay.close()
        squatter.stop()
    assert not (state / PID_FILE_NAME).exists()


async def test_serves_key_needs_the_private_key(state_root: Path) -> None:
    """The check is a key exchange: our relay passes; a relay with another key and a listener
    that only says "SSH-2.0-uptermd-" do not."""
    state = state_root / "relay"
    relay = LocalRelay("127.0.0.1:0", state)
    squatters = [Squatter("uptermd", state_root), Squatter("banner", state_root)]
    try:
        info = await relay.ensure()
        key = _our_key(state)
        assert await serves_key("127.0.0.1", info.port, key)
        for squatter in squatters:
            assert not await serves_key("127.0.0.1", squatter.port, key)
        assert not await serves_key("127.0.0.1", info.port, Ed25519Key.generate())
    finally:
        await relay.close()
        for squatter in squatters:
            squatter.stop()


def _start_relay_with(
    key_path: Path, root: Path, via_module: bool
) -> tuple[subprocess.Popen[bytes], int]:
    addr_file = root / f"hand-{os.urandom(3).hex()}.addr"
    prog = [sys.executable, "-m", "upterm.relay"] if via_module else [str(VENV_BIN / "uptermd")]
    args = ["--ssh-addr", "127.0.0.1:0", "--private-key", str(key_path)]
    proc = subprocess.Popen(
        [*prog, *args, "--addr-file", str(addr_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(lambda: addr_file.exists() or proc.poll() is not None, 15, what="uptermd")
    assert proc.poll() is None
    return proc, int(addr_file.read_text().strip().rpartition(":")[2])


async def test_orphan_with_our_key_is_replaced(state_root: Path) -> None:
    """A relay an earlier daemon left running (named by the pid file, our command line and
    key) is stopped, and ours takes its address."""
    state = state_root / "relay"
    state.mkdir(mode=0o700)
    key = _our_key(state)
    orphan, port = _start_relay_with(state / HOST_KEY_NAME, state_root, via_module=True)
    (state / PID_FILE_NAME).write_text(f"{orphan.pid}\n")
    relay = LocalRelay(f"127.0.0.1:{port}", state)
    try:
        info = await relay.ensure()
        assert orphan.poll() is not None, "the orphan must be stopped"
        assert (info.host, info.port, info.pinned_key) == ("127.0.0.1", port, key.public.blob)
        assert relay.pid not in (None, orphan.pid)
        assert (state / PID_FILE_NAME).read_text().strip() == str(relay.pid)
        assert await serves_key("127.0.0.1", port, key)
    finally:
        await relay.close()
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


async def test_pid_file_naming_another_process_is_left_alone(state_root: Path) -> None:
    """A pid file naming something else (pid reuse; any process that is not our relay
    command line) never gets it killed."""
    state = state_root / "relay"
    state.mkdir(mode=0o700)
    bystander = subprocess.Popen(["sleep", "60"])
    (state / PID_FILE_NAME).write_text(f"{bystander.pid}\n")
    relay = LocalRelay("127.0.0.1:0", state)
    try:
        info = await relay.ensure()
        assert info.pinned_key == _our_key(state).public.blob
        await asyncio.sleep(0.2)
        assert bystander.poll() is None
    finally:
        await relay.close()
        bystander.kill()
        bystander.wait()


async def test_relay_with_our_key_we_did_not_start_is_left_alone(state_root: Path, caplog) -> None:
    """Our key, but not a relay a daemon of ours started (run by hand as ``uptermd``, no pid
    file): not ours to stop, so ours goes to another port and that one keeps running."""
    caplog.set_level(logging.INFO, logger="upterm.daemon.localrelay")
    state = state_root / "relay"
    state.mkdir(mode=0o700)
    key = _our_key(state)
    by_hand, port = _start_relay_with(state / HOST_KEY_NAME, state_root, via_module=False)
    relay = LocalRelay(f"127.0.0.1:{port}", state)
    try:
        info = await relay.ensure()
        assert info.port != port
        assert info.pinned_key == key.public.blob
        assert await serves_key("127.0.0.1", info.port, key)
        assert by_hand.poll() is None
        assert "a relay with this user's key that this daemon did not start" in caplog.text
    finally:
        await relay.close()
        by_hand.kill()
        by_hand.wait()


async def test_killed_child_is_restarted_on_the_same_address(state_root: Path) -> None:
    """SIGKILL the child: the daemon restarts it on its own, same port, same key, before
    anyone asks for a new session."""
    state = state_root / "relay"
    relay = LocalRelay("127.0.0.1:0", state)
    try:
        info = await relay.ensure()
        first = relay.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        started = time.monotonic()
        await _until(lambda: relay.pid not in (None, first), 10, "a restarted relay")
        key = _our_key(state)
        while not await serves_key("127.0.0.1", info.port, key):
            assert time.monotonic() - started < 10, "the restarted relay is not serving"
            await asyncio.sleep(0.1)
        assert (state / PID_FILE_NAME).read_text().strip() == str(relay.pid)
        assert await relay.ensure() == info
    finally:
        await relay.close()


async def test_address_squatted_while_restarting_is_not_used(state_root: Path, caplog) -> None:
    """Someone grabs our port between our child's death and its restart: the restart goes to
    a free port, never to the squatter."""
    caplog.set_level(logging.INFO, logger="upterm.daemon.localrelay")
    state = state_root / "relay"
    relay = LocalRelay("127.0.0.1:0", state)
    connections = 0

    async def fake_uptermd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(b"SSH-2.0-uptermd-0.1.0\r\n")
        await writer.drain()
        writer.close()

    squatter: asyncio.Server | None = None
    try:
        info = await relay.ensure()
        first = relay.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        # Blocking on purpose: the event loop (and so the supervisor) cannot run until the
        # port is ours, so the squatter surely wins the race.
        sock = socket.socket()
        deadline = time.monotonic() + 5
        while True:
            try:
                sock.bind(("127.0.0.1", info.port))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed relay never let go of its port"
                time.sleep(0.01)
        sock.listen()
        squatter = await asyncio.start_server(fake_uptermd, sock=sock)
        await _until(lambda: relay.pid not in (None, first), 15, "a restarted relay")
        moved = await relay.ensure()
        assert moved.port != info.port
        assert moved.pinned_key == info.pinned_key == _our_key(state).public.blob
        assert await _presented_key(moved.port) == moved.pinned_key
        assert f"127.0.0.1:{info.port} is held by another process" in caplog.text
        assert connections == 1  # the key check, which it failed
    finally:
        await relay.close()
        if squatter is not None:
            squatter.close()


# -- the daemon, upterm host and a joiner -----------------------------------------------------


def _relay_state(user_env: UserEnv) -> Path:
    return Path(user_env.env["XDG_STATE_HOME"]) / "upterm" / "relay"


def _host(user_env: UserEnv, *options: str) -> tuple[subprocess.Popen[bytes], str]:
    """``upterm host`` with no --server: the process and its join line."""
    proc = subprocess.Popen(
        ["upterm", "host", "--accept", *options, "--", "bash", "--norc", "--noprofile"],
        env=user_env.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready, "upterm host printed nothing"
    while True:
        line = proc.stdout.readline().decode()
        assert line, proc.stderr.read().decode() if proc.stderr else ""
        if match := JOIN_RE.match(line):
            return proc, match.group(1)


def _join_echoes(join_line: str, key: Path, n: int, timeout: float = 15) -> bool:
    """Join with OpenSSH, type ``echo``; whether the shell's answer came back."""
    joiner = subprocess.Popen(
        [*shlex.split(ssh_join_command(join_line, key)), "-tt", "-o", "BatchMode=yes"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert joiner.stdin and joiner.stdout
    want = f"joined-{n * 7}".encode()
    seen = b""
    try:
        joiner.stdin.write(f"echo joined-$(({n}*7))\r".encode())
        joiner.stdin.flush()
        deadline = time.monotonic() + timeout
        while want not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([joiner.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(joiner.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
    except BrokenPipeError:
        pass
    finally:
        joiner.kill()
        joiner.wait()
    return want in seen


def _port_of(join_line: str) -> int:
    match = re.search(r" -p (\d+)$", join_line)
    assert match, join_line
    return int(match.group(1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _daemon_pid(user_env: UserEnv) -> int:
    marker = f"XDG_RUNTIME_DIR={user_env.env['XDG_RUNTIME_DIR']}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"upterm.daemon" in argv and marker in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
    pytest.fail("no daemon running")


def test_session_on_squatted_address_never_reaches_the_squatter(
    user_env: UserEnv, state_root: Path, joiner_key: Path
) -> None:
    """A look-alike uptermd of another user holds the configured address: the join line shows
    our relay's port instead, the joiner gets in there, and the squatter never sees a host
    authenticate, even for a host that skips host key checks; the daemon's log says which
    address was squatted."""
    squatter = Squatter("banner", state_root)
    user_env.env["UPTERM_LOCAL_RELAY_ADDR"] = f"127.0.0.1:{squatter.port}"
    try:
        host, join_line = _host(user_env, "--skip-host-key-check")
        try:
            port = _port_of(join_line)
            assert port != squatter.port
            assert _join_echoes(join_line, joiner_key, 6)
        finally:
            host.kill()
            host.wait()
        assert squatter.record.read_text() == ""
        log = (Path(user_env.env["XDG_STATE_HOME"]) / "upterm" / "daemon.log").read_text()
        assert f"127.0.0.1:{squatter.port} is held by another process" in log
    finally:
        squatter.stop()


def test_orphan_of_a_crashed_daemon_is_replaced(user_env: UserEnv, joiner_key: Path) -> None:
    """The daemon dies by SIGKILL and leaves its relay behind; the next daemon stops that
    orphan and runs its own on the same address, with no host key question."""
    port = _free_port()
    user_env.env["UPTERM_LOCAL_RELAY_ADDR"] = f"127.0.0.1:{port}"
    pid_file = _relay_state(user_env) / PID_FILE_NAME
    host, join_line = _host(user_env)
    try:
        assert _port_of(join_line) == port
        orphan = int(pid_file.read_text())
        os.kill(_daemon_pid(user_env), signal.SIGKILL)
    finally:
        host.kill()
        host.wait()
    time.sleep(0.3)
    assert _alive(orphan), "the relay should outlive its daemon (that is the orphan)"

    host, join_line = _host(user_env)
    try:
        assert _port_of(join_line) == port
        assert not _alive(orphan)
        assert int(pid_file.read_text()) != orphan
        assert _join_echoes(join_line, joiner_key, 5)
    finally:
        host.kill()
        host.wait()


def test_killed_relay_child_comes_back_and_so_does_the_session(
    user_env: UserEnv, joiner_key: Path
) -> None:
    """SIGKILL the daemon's uptermd: the daemon restarts it on the same port, the session
    redials under the same id, and the same join line works again within seconds."""
    pid_file = _relay_state(user_env) / PID_FILE_NAME
    host, join_line = _host(user_env)
    try:
        assert _join_echoes(join_line, joiner_key, 3)
        first = int(pid_file.read_text())
        os.kill(first, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(
            lambda: pid_file.exists() and int(pid_file.read_text() or 0) not in (0, first),
            10,
            what="a restarted relay",
        )
        while not _join_echoes(join_line, joiner_key, 4, timeout=5):
            assert time.monotonic() - killed_at < 30, "the session did not come back"
            time.sleep(0.5)
        took = time.monotonic() - killed_at
        assert took < 20, f"the session took {took:.1f}s to come back"
        assert host.poll() is None
    finally:
        host.kill()
        host.wait()
