"""The local terminal while attached: raw mode, size changes, and relaying bytes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import shutil
import signal
import termios
import tty
from collections.abc import Iterator
from typing import Any

from upterm.ctl.client import AdminClient
from upterm.errors import DaemonUnavailable, UptermError
from upterm.termstate import ScreenTracker

STDIN_FD = 0
STDOUT_FD = 1


def terminal_size() -> tuple[int, int]:
    """Columns and rows of the controlling terminal (80x24 without one)."""
    try:
        size = os.get_terminal_size(STDOUT_FD)
    except OSError:
        fallback = shutil.get_terminal_size((80, 24))
        return fallback.columns, fallback.lines
    return max(size.columns, 1), max(size.lines, 1)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put a TTY in raw mode (keys go to the remote command, Ctrl-C included); restore after."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def write_all(fd: int, data: bytes) -> None:
    """Write everything, waiting if the terminal is slow (that paces the session)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])
        except OSError as exc:
            if exc.errno == errno.EIO:  # the terminal is gone
                return
            raise


DETACH_HELP = "~. at the start of a line detaches (~~ sends a ~)"
#: Escapes after a newline and ``~``: what each one asks for.
ESCAPES = {b".": "detach", b"y": "approve", b"a": "approve-all", b"n": "deny"}
#: The escapes that answer a question (only while one waits).
ANSWERS = frozenset({"approve", "approve-all", "deny"})


class DetachFilter:
    """Spots escapes in typed input, the way ssh does.

    At the start of a line, ``~.`` detaches, ``~~`` sends one ``~``, and while a question
    waits for the host (:attr:`approvals_waiting`, from the daemon: a joiner, a transfer, a
    forward) ``~y`` / ``~n`` answer the oldest (``~a``: yes to it and to all like it from
    that joiner); a ``~`` followed by anything else is sent as typed (``~nobody`` stays
    whole).
    Sans-I/O: bytes in, bytes to forward (and the escapes seen) out.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._tilde = False
        #: Whether a joiner waits for the host's approval (``~y`` and ``~n`` act only then).
        self.approvals_waiting = False

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        """Return the bytes to forward and the escapes typed ("detach" ends the input)."""
        out = bytearray()
        actions: list[str] = []
        for byte in data:
            ch = bytes((byte,))
            if self._tilde:
                self._tilde = False
                action = ESCAPES.get(ch)
                if action in ANSWERS and not self.approvals_waiting:
                    action = None
                if action == "detach":
                    return bytes(out), [*actions, action]
                if action is not None:
                    actions.append(action)
                    self._line_start = True
                    continue
                out += b"~" if ch == b"~" else b"~" + ch
            elif self._line_start and ch == b"~":
                self._tilde = True
                continue
            else:
                out += ch
            self._line_start = ch in (b"\r", b"\n")
        return bytes(out), actions


async def _answer(client: AdminClient, action: str, session: str | None) -> None:
    """Answer the oldest question waiting; the daemon's notice confirms it."""
    try:
        if action == "approve-all":
            await client.request("approve", session=session, everything=True)
        else:
            await client.request(action, session=session)
    except UptermError as exc:
        write_all(STDOUT_FD, f"\r\n[upterm: {exc}]\r\n".encode())


async def relay_attached(client: AdminClient, session: str | None, primary: bool) -> int | None:
    """Attach this terminal to a session until its command exits.

    Returns the command's exit status, or None if the user detached (the session goes on).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int | None] = loop.create_future()
    detach_filter = DetachFilter()
    background: set[asyncio.Task[None]] = set()
    stream_box: list[int] = []
    screen = ScreenTracker()

    def on_stream(frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "output" and isinstance(frame.get("data"), bytes):
            screen.feed(frame["data"])
            write_all(STDOUT_FD, frame["data"])
        elif kind == "waiting" and isinstance(frame.get("count"), int):
            detach_filter.approvals_waiting = frame["count"] > 0
        elif kind == "exit" and not done.done():
            status = frame.get("status")
            done.set_result(status if isinstance(status, int) else 1)

    client.on_stream = on_stream
    cols, rows = terminal_size()
    with raw_mode(STDIN_FD):
        reply = await client.request(
            "attach",
            session=session,
            cols=cols,
            rows=rows,
            primary=primary,
            # Questions (a joiner, a transfer) wait only for a terminal someone types in.
            answers=os.isatty(STDIN_FD),
        )
        stream = int(reply["stream"])
        stream_box.append(stream)

        def on_stdin() -> None:
            try:
                data = os.read(STDIN_FD, 65536)
            except OSError:
                data = b""
            if not data:
                # End of input (not a TTY): keep showing output, stop forwarding keys.
                loop.remove_reader(STDIN_FD)
                return
            data, actions = detach_filter.feed(data)
            if data:
                client.send({"type": "input", "stream": stream, "data": data})
            for action in actions:
                if action == "detach" and not done.done():
                    client.send({"type": "detach", "stream": stream})
                    done.set_result(None)
                elif action in ANSWERS:
                    task = asyncio.ensure_future(_answer(client, action, session))
                    background.add(task)
                    task.add_done_callback(background.discard)

        def on_winch() -> None:
            c, r = terminal_size()
            client.send({"type": "resize", "stream": stream, "cols": c, "rows": r})

        loop.add_reader(STDIN_FD, on_stdin)
        loop.add_signal_handler(signal.SIGWINCH, on_winch)
        try:
            closed: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(client.closed))
            waiters: set[asyncio.Future[Any]] = {done, closed}
            finished, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if done not in finished:
                raise DaemonUnavailable("lost the connection to the upterm daemon")
            return done.result()
        finally:
            loop.remove_reader(STDIN_FD)
            loop.remove_signal_handler(signal.SIGWINCH)
            # Whatever the program left on (vim's alternate screen, mouse reporting...), the
            # terminal is the user's again before upterm prints anything.
            if os.isatty(STDOUT_FD):
                write_all(STDOUT_FD, screen.restore())
