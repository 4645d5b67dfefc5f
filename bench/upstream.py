"""Upstream's Go upterm and uptermd (owenthereal/upterm) as an anchor for bench.run.

    python -m bench.run --upstream-bin DIR

DIR holds upstream's binaries ``upterm`` and ``uptermd``, built by hand (nothing here builds
or fetches them). Their uptermd runs on loopback with its in-memory session store and a host
key of its own; each upstream session is its own ``upterm host`` process, which wants a
terminal: it runs on a pseudo-terminal this module keeps reading (the shared command's output
is written to the host's terminal too, and blocks when nobody reads it), with HOME and
XDG_RUNTIME_DIR private to the run. It logs in to the relay with the joiner key the runner
uses (``-i``), accepts the relay's host key into a known_hosts file of its own
(``--skip-host-key-check``) and every joiner (``--accept``); by default its session admits any
joiner key. The join line is read from the card it prints (``ssh TOKEN@127.0.0.1 -p PORT``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

from bench.fds import readable

#: Control sequences, stripped from the card before its join line is read.
ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]")
JOIN_LINE = re.compile(rb"ssh (\S+)@127\.0\.0\.1 -p (\d+)")
#: Terminal queries a TUI library may send at start-up, and what a terminal answers.
QUERIES = {
    b"\x1b]11;?": b"\x1b]11;rgb:0000/0000/0000\x1b\\",  # background colour
    b"\x1b]10;?": b"\x1b]10;rgb:ffff/ffff/ffff\x1b\\",  # foreground colour
    b"\x1b[6n": b"\x1b[1;1R",  # cursor position
    b"\x1b[c": b"\x1b[?62;22c",  # primary device attributes
}
#: The host's terminal: wide enough that the card's join line is never wrapped.
ROWS, COLS = 50, 200


def missing(bin_dir: Path) -> str | None:
    """What is wrong with ``bin_dir`` as upstream's binaries, or None."""
    for name in ("upterm", "uptermd"):
        if not os.access(bin_dir / name, os.X_OK):
            return f"{bin_dir / name} is not an executable"
    return None


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


class UpstreamHost:
    """One ``upterm host --accept -- COMMAND`` on a pseudo-terminal that is read all the
    time: by a thread until its card is read (the thread answers terminal queries and keeps
    the card), then by a `cat` to /dev/null. A Python thread in the runner's process would
    hold upstream's floods back (its host writes the shared output to its own terminal too,
    synchronously): 16 vs 25 MiB/s in a trial."""

    def __init__(self, upterm: Path, env: dict[str, str], args: list[str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        try:
            self.proc = subprocess.Popen(
                [str(upterm), *args], env=env, stdin=slave, stdout=slave, stderr=slave,
                start_new_session=True, close_fds=True,
            )  # fmt: skip
        finally:
            os.close(slave)
        self.fd = master
        self.pid = self.proc.pid
        self.head = b""  # the first bytes the host printed (its card), for the join line
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cat: subprocess.Popen[bytes] | None = None
        self._card_read = False
        self.drain()

    # Read all the time, except while the caller reads the terminal itself (the host-terminal
    # echo figure): pause() and drain() hand it over.

    def drain(self) -> None:
        if self._card_read:
            self._cat = subprocess.Popen(
                ["cat"], stdin=self.fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def pause(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._cat is not None:
            self._cat.kill()
            self._cat.wait()
            self._cat = None

    def _drain(self) -> None:
        while not self._stop.is_set():
            if not readable([self.fd], 0.1):
                continue
            try:
                chunk = os.read(self.fd, 1 << 20)
            except OSError:  # EIO: the host is gone
                return
            if not chunk:
                return
            if len(self.head) < 1 << 16:
                with self._lock:
                    self.head += chunk
                for query, answer in QUERIES.items():
                    if query in chunk:
                        with contextlib.suppress(OSError):
                            os.write(self.fd, answer)

    def card(self) -> bytes:
        with self._lock:
            return ANSI.sub(b"", self.head)

    def join_line(self, timeout: float = 30) -> tuple[str, int]:
        """The session's token and relay port, from the card the host printed."""
        deadline = time.monotonic() + timeout
        while True:
            found = JOIN_LINE.search(self.card())
            if found:
                self.pause()
                self._card_read = True
                self.drain()
                return found[1].decode(), int(found[2])
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.card().decode(errors="replace")[-2000:]
                raise RuntimeError(f"upstream upterm host printed no join line:\n{text}")
            time.sleep(0.05)

    def terminal_echo_ms(self, n: int) -> list[float]:
        """The host's own terminal: a keystroke into it to its echo (the shared command is
        `cat`, echoed by the command's PTY, then copied out by the host), as the daemon's
        host-terminal figure does over its admin socket."""
        self.pause()
        try:
            while readable([self.fd], 0.3):
                os.read(self.fd, 1 << 20)
            samples = []
            for i in range(n + 20):
                ch = bytes([97 + i % 26])
                start = time.perf_counter()
                os.write(self.fd, ch)
                seen = b""
                while ch not in seen:
                    if not readable([self.fd], 5):
                        raise TimeoutError("no echo on the upstream host's terminal")
                    seen += os.read(self.fd, 1024)
                if i >= 20:
                    samples.append((time.perf_counter() - start) * 1000)
            return samples
        finally:
            self.drain()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.pause()
        os.close(self.fd)


class Upstream:
    """Upstream's uptermd processes and ``upterm host`` processes of one run."""

    def __init__(self, bin_dir: Path, root: Path, env: dict[str, str], key_file: Path) -> None:
        self.bin_dir = bin_dir
        self.root = root
        for sub in ("home", "run"):
            (root / sub).mkdir(mode=0o700, parents=True)
        # Its own HOME (~/.upterm: logs, admin sockets) and runtime dir (admin sockets when
        # XDG_RUNTIME_DIR is set): nothing shared with our daemon or the user's.
        self.env = {**env, "HOME": str(root / "home"), "XDG_RUNTIME_DIR": str(root / "run")}
        self.key_file = key_file
        self.known_hosts = root / "known_hosts"
        self.known_hosts.touch()
        self.relays: list[subprocess.Popen[bytes]] = []
        self.hosts: list[UpstreamHost] = []

    def start_relay(self, name: str) -> tuple[subprocess.Popen[bytes], int]:
        """Their uptermd on loopback (the in-memory store, a generated host key)."""
        port = free_port()
        with open(self.root / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    str(self.bin_dir / "uptermd"),
                    "--ssh-addr", f"127.0.0.1:{port}", "--node-addr", f"127.0.0.1:{port}",
                ],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        self.relays.append(proc)
        deadline = time.monotonic() + 15
        while not _port_open(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"upstream uptermd did not start: see {name}.log")
            time.sleep(0.05)
        return proc, port

    def host(self, port: int, *command: str) -> tuple[UpstreamHost, str]:
        """An upstream host sharing ``command`` through the relay on ``port`` (theirs or
        ours): the host and its session token."""
        server = f"ssh://127.0.0.1:{port}"
        known_hosts = str(self.known_hosts)
        args = ["host", "--server", server, "--accept", "--skip-host-key-check"]
        args += ["--known-hosts", known_hosts, "-i", str(self.key_file), "--", *command]
        host = UpstreamHost(self.bin_dir / "upterm", self.env, args)
        self.hosts.append(host)
        token, card_port = host.join_line()
        assert card_port == port, (card_port, port)
        return host, token

    def stop(self, host: UpstreamHost) -> None:
        host.close()
        self.hosts.remove(host)

    def close(self) -> None:
        for host in list(self.hosts):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.stop(host)
        for proc in self.relays:
            proc.terminate()
        for proc in self.relays:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def pss_kib(pid: int) -> int:
    """Proportional set size of a process (its shared pages divided among their users)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
