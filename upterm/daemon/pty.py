"""A command on a pseudo-terminal, driven from the asyncio loop without threads.

The child becomes a session leader with the PTY as its controlling terminal, so job control,
Ctrl-C and SIGWINCH behave as in any terminal. Exit is observed through a pidfd, so nothing
polls and no SIGCHLD handler competes with other code in the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import subprocess
import termios
from collections.abc import Callable, Mapping, Sequence

from upterm.errors import UptermError

log = logging.getLogger(__name__)

#: Largest read from the PTY master in one go.
#: Programs whose being in the foreground means the user is at a prompt.
SHELLS = frozenset({"bash", "sh", "dash", "zsh", "fish", "ksh", "mksh", "tcsh", "csh", "ash"})
#: A hang-up is repeated after this long if the command still runs (see PtyProcess.hangup).
HANGUP_REPEAT_S = 0.5
READ_CHUNK_BYTES = 64 * 1024
#: Most output passed on from one readiness callback.
READ_BATCH_BYTES = 128 * 1024
#: A read shorter than this means the PTY had no more (the kernel hands over up to ~4 KiB).
SMALL_READ_BYTES = 1024


def _become_controlling_tty() -> None:  # pragma: no cover - runs in the child
    # subprocess has already called setsid() (start_new_session); make fd 0, the PTY
    # slave, our controlling terminal. Only an ioctl: safe between fork and exec.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def set_winsize(fd: int, cols: int, rows: int) -> None:
    """Set a terminal's size; the kernel signals SIGWINCH to its foreground group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def exit_status(wait_status: int) -> int:
    """Shell convention: the exit code, or 128 + N for a process killed by signal N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


class PtyProcess:
    """A child process on a fresh PTY; output and exit are delivered as callbacks."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        cols: int,
        rows: int,
        on_output: Callable[[bytes], None],
        on_exit: Callable[[int], None],
    ) -> None:
        self._on_output = on_output
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        try:
            set_winsize(master, cols, rows)
            try:
                self._proc = subprocess.Popen(
                    list(argv),
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    env=dict(env),
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=_become_controlling_tty,
                    close_fds=True,
                )
            except FileNotFoundError as exc:
                raise UptermError(
                    f"command not found: {argv[0]}; check the command after '--'"
                ) from exc
            except NotADirectoryError as exc:
                raise UptermError(f"working directory {cwd} is not usable") from exc
            except PermissionError as exc:
                raise UptermError(f"cannot run {argv[0]}: permission denied") from exc
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master_fd = master
        self.pid = self._proc.pid
        self._reading = False
        self._paused = False
        self._status: int | None = None
        self._pidfd = os.pidfd_open(self.pid)
        self._loop.add_reader(self._pidfd, self._reap)
        self._start_reading()

    @property
    def returncode(self) -> int | None:
        """The exit status once the command has ended."""
        return self._status

    def _start_reading(self) -> None:
        if not self._reading and self.master_fd >= 0:
            self._loop.add_reader(self.master_fd, self._read)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.master_fd)
            self._reading = False

    def pause_output(self) -> None:
        """Stop reading the PTY: the command blocks once the kernel buffer fills."""
        self._paused = True
        self._stop_reading()

    def resume_output(self) -> None:
        """Read the PTY again."""
        self._paused = False
        if self._status is None:
            self._start_reading()

    def _read(self) -> None:
        # Read what is there, up to READ_BATCH_BYTES: the kernel hands a PTY's output over a
        # few KiB per read, and every read passed on alone would become its own SSH packet
        # on each hop. A command that writes faster than we forward fills the PTY buffer, so
        # batching grows exactly when it pays; an echoed keystroke still goes out at once.
        chunks: list[bytes] = []
        size = 0
        while size < READ_BATCH_BYTES:
            try:
                data = os.read(self.master_fd, READ_CHUNK_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:
                # EIO: every slave fd is closed (the command and its children are gone).
                if exc.errno != errno.EIO:
                    log.warning("reading the PTY failed: %s", exc)
                self._stop_reading()
                break
            if not data:
                self._stop_reading()
                break
            chunks.append(data)
            size += len(data)
            if len(data) < SMALL_READ_BYTES:
                break  # not a command streaming output: no second syscall for a keystroke
        if chunks:
            self._on_output(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _reap(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        try:
            _, wait_status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            wait_status = 0
        self._proc.returncode = exit_status(wait_status)
        self._status = exit_status(wait_status)
        # Deliver what the command wrote before it exited; a background job that keeps the
        # slave open must not hold the session, so stop at the first empty read.
        self._stop_reading()
        while True:
            try:
                data = os.read(self.master_fd, READ_CHUNK_BYTES)
            except OSError:
                break
            if not data:
                break
            self._on_output(data)
        self._on_exit(self._status)

    def write(self, data: bytes) -> None:
        """Send keystrokes to the command (drops them if the PTY is gone or full)."""
        if self.master_fd < 0:
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master_fd, view)
            except BlockingIOError:
                # The line discipline's input queue is full (a stalled reader); typing
                # more into it would block the daemon, so the excess is dropped.
                log.debug("PTY input full: dropped %d bytes", len(view))
                return
            except OSError:
                return
            view = view[n:]

    def reading_secret(self) -> bool:
        """Whether the terminal reads a line without echoing it: a password or passphrase
        prompt (getpass, readpassphrase, ``read -s``, sudo, ssh all turn echo off and keep
        line editing on). Line editors and full-screen programs (readline, vim) turn both
        off and echo what they show themselves. Unknown counts as secret: it decides
        whether keystrokes may be recorded."""
        if self.master_fd < 0:
            return True
        try:
            lflag = termios.tcgetattr(self.master_fd)[3]
        except termios.error:
            return True
        return not lflag & termios.ECHO and bool(lflag & termios.ICANON)

    def resize(self, cols: int, rows: int) -> None:
        """Set the PTY size."""
        if self.master_fd >= 0:
            with contextlib.suppress(OSError):
                set_winsize(self.master_fd, cols, rows)

    def redraw(self) -> None:
        """Ask the program in the foreground to repaint (SIGWINCH), e.g. for a new viewer.

        Full-screen programs (vim, less, top) redraw everything on SIGWINCH, so a viewer
        who arrives mid-screen sees the current screen, not a fragment of old output.
        """
        if self._status is None and self.master_fd >= 0:
            with contextlib.suppress(OSError):
                os.killpg(os.tcgetpgrp(self.master_fd), signal.SIGWINCH)

    def foreground_is_shell(self) -> bool:
        """Whether the terminal's foreground process group is led by a shell (the user is at
        a prompt, not in a program such as top)."""
        if self._status is not None or self.master_fd < 0:
            return False
        try:
            leader = os.tcgetpgrp(self.master_fd)
            with open(f"/proc/{leader}/comm", encoding="utf-8", errors="replace") as comm:
                name = comm.read().strip()
        except OSError:
            return False
        return name.lstrip("-") in SHELLS

    def send_signal(self, sig: int) -> None:
        """Signal the command's process group."""
        if self._status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def hangup(self) -> None:
        """SIGHUP the command's process group, as a terminal closing would.

        Once more a moment later if it is still running: a shell that got the SIGHUP just
        before it went back to waiting for input (bash right after a SIGWINCH, when a viewer
        arrived) only acts on it when its wait is interrupted, and a closing terminal's read
        error, which would interrupt it, never comes while we hold the PTY open.
        """
        if self._status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGHUP)
            self._loop.call_later(HANGUP_REPEAT_S, self._hangup_again)

    def _hangup_again(self) -> None:
        if self._status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL the command's process group."""
        if self._status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Release the PTY (after the command has ended)."""
        self._stop_reading()
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self.master_fd >= 0:
            os.close(self.master_fd)
            self.master_fd = -1
