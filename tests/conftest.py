"""Shared fixtures: isolated user environments, a real uptermd, joiner keys, tmux."""

from __future__ import annotations

import functools
import http.server
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
SSH_OPTS = [
    "-F",
    "/dev/null",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "IdentitiesOnly=yes",
    "-o",
    "LogLevel=ERROR",
]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@dataclass
class UserEnv:
    """A user's environment of its own: home, runtime, state and config dirs."""

    root: Path
    env: dict[str, str]

    @property
    def runtime(self) -> Path:
        return Path(self.env["XDG_RUNTIME_DIR"]) / "upterm"

    def run(self, *args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )


def _kill_processes_of(runtime: str) -> None:
    """End every process started with this runtime dir (daemons, built-in relays)."""
    marker = f"XDG_RUNTIME_DIR={runtime}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture
def user_env() -> Iterator[UserEnv]:
    # Short paths: UNIX socket paths are limited to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="ut-", dir="/tmp"))
    for sub in ("home", "run", "state", "config"):
        (root / sub).mkdir(mode=0o700)
    env = {
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(root / "home"),
        "XDG_RUNTIME_DIR": str(root / "run"),
        "XDG_STATE_HOME": str(root / "state"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "UPTERM_LOCAL_RELAY_ADDR": "127.0.0.1:0",
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        "SHELL": "/bin/bash",
        "PS1": "$ ",
    }
    yield UserEnv(root, env)
    _kill_processes_of(env["XDG_RUNTIME_DIR"])
    time.sleep(0.2)
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class RelayProc:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    state_dir: Path

    @property
    def url(self) -> str:
        return f"ssh://{self.host}:{self.port}"


def start_relay(user_env: UserEnv, state_dir: Path | None = None, *extra: str) -> RelayProc:
    state = state_dir or (user_env.root / "relay-state")
    addr_file = user_env.root / f"relay-{uuid.uuid4().hex[:6]}.addr"
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "uptermd"),
            "--ssh-addr",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
            "--addr-file",
            str(addr_file),
            # Tests join from 127.0.0.1 many times, some on purpose with the wrong key;
            # penalties are tested from other loopback addresses (tests/relay).
            "--penalty-exempt",
            "127.0.0.1",
            *extra,
        ],
        env=user_env.env,
        stdout=subprocess.DEVNULL,
        stderr=open(user_env.root / "uptermd.log", "ab"),  # noqa: SIM115
    )
    wait_for(lambda: addr_file.exists() or proc.poll() is not None, 15, what="uptermd to listen")
    assert proc.poll() is None, (user_env.root / "uptermd.log").read_text()
    host, _, port = addr_file.read_text().strip().rpartition(":")
    return RelayProc(host, int(port), proc, state)


@pytest.fixture
def relay(user_env: UserEnv) -> Iterator[RelayProc]:
    r = start_relay(user_env)
    yield r
    r.proc.terminate()
    try:
        r.proc.wait(5)
    except subprocess.TimeoutExpired:
        r.proc.kill()


def make_key(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return path


@pytest.fixture
def joiner_key(tmp_path: Path) -> Path:
    return make_key(tmp_path / "joiner")


class Tmux:
    """A private tmux server; panes run commands in a given environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.socket = f"ut-{uuid.uuid4().hex[:10]}"
        self.env = env
        self._tmux(
            "new-session", "-d", "-s", "main", "-x", "120", "-y", "40", "bash --norc --noprofile"
        )
        self.panes = ["main:0.0"]
        self._prompt(self.panes[0])

    def _prompt(self, pane: str) -> None:
        # bash resets PS1 for interactive shells; a plain "$ " keeps assertions simple.
        self.send(pane, "export PS1='$ '; clear")
        self.wait_text(pane, "$ ")

    def _tmux(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode != 0:
            raise RuntimeError(f"tmux {args[0]} failed: {out.stderr}")
        return out.stdout

    def split(self) -> str:
        self._tmux("split-window", "-t", "main", "-v", "bash --norc --noprofile")
        self.panes.append(f"main:0.{len(self.panes)}")
        self._prompt(self.panes[-1])
        return self.panes[-1]

    def send(self, pane: str, text: str, enter: bool = True) -> None:
        self._tmux("send-keys", "-t", pane, "-l", text)
        if enter:
            self._tmux("send-keys", "-t", pane, "Enter")

    def screen(self, pane: str) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", pane)

    def wait_text(self, pane: str, text: str, timeout: float = 15.0) -> str:
        return wait_for(
            lambda: (s := self.screen(pane)) and text in s and s,
            timeout,
            what=f"{text!r} in pane {pane}; screen was:\n{self.screen(pane)}",
        )

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False)


@pytest.fixture
def tmux(user_env: UserEnv) -> Iterator[Tmux]:
    t = Tmux(user_env.env)
    yield t
    t.kill()


class PtyClient:
    """A program (``upterm host``, ``ssh``) on a real PTY of a given size, with a screen model.

    What it prints is fed to pyte, so tests can assert what a person would see.
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        cols: int = 80,
        rows: int = 24,
        preexec: Callable[[], None] | None = None,
    ):
        import fcntl
        import struct
        import termios

        import pyte

        master, slave = os.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            if preexec is not None:
                preexec()  # e.g. a resource limit the daemon it starts inherits

        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=controlling_tty,
        )
        os.close(slave)
        self.master = master
        self.seen = b""
        self.screen = pyte.Screen(cols, rows)
        self._stream = pyte.ByteStream(self.screen)

    def pump(self, timeout: float = 0.1) -> bool:
        """Read what is there (waiting up to ``timeout``); False once the program is gone."""
        import select

        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:
            return False
        if not chunk:
            return False
        self.seen += chunk
        self._stream.feed(chunk)
        return True

    def expect(self, marker: bytes, timeout: float = 15) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            if time.monotonic() > deadline:
                pytest.fail(f"{marker!r} not seen; last output {self.seen[-400:]!r}")
            if not self.pump(0.2) and marker not in self.seen:
                pytest.fail(f"program ended before {marker!r}: {self.seen[-400:]!r}")
        return self.seen

    def type(self, text: str | bytes) -> None:
        os.write(self.master, text.encode() if isinstance(text, str) else text)

    def resize(self, cols: int, rows: int) -> None:
        import fcntl
        import struct
        import termios

        # The kernel sends SIGWINCH to the program, as a terminal window resize would.
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.screen.resize(rows, cols)

    def settle(self, quiet_s: float = 0.5, timeout: float = 10) -> None:
        """Read until nothing new arrives for ``quiet_s``."""
        deadline = time.monotonic() + timeout
        last = len(self.seen)
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            self.pump(0.05)
            if len(self.seen) != last:
                last, quiet_since = len(self.seen), time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return

    def display(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def wait(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(0.1)
        status = self.proc.wait(max(0.1, deadline - time.monotonic()))
        while self.pump(0.05) and time.monotonic() < deadline:  # what it printed last
            if not select_ready(self.master):
                break
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)


def select_ready(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def start_shell(cwd: Path):
    """A bare ``bash`` on a PTY as the shared command (call inside a running event loop)."""
    from upterm.daemon.session import Session

    session = Session(
        ["bash", "--norc", "--noprofile"],
        env={"PATH": os.environ["PATH"], "PS1": "$ ", "TERM": "xterm"},
        cwd=str(cwd),
        cols=80,
        rows=24,
    )
    session.start()
    return session


def ssh_join_command(join_line: str, key: Path) -> str:
    """The printed join line plus what a test joiner needs (its key, no host-key prompts)."""
    return join_line + " -i " + shlex.quote(str(key)) + " " + shlex.join(SSH_OPTS)


@pytest.fixture
def keys_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local stand-in for https://github.com/<user>.keys."""
    root = tmp_path / "keys"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
