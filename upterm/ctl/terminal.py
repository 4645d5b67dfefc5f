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
from upterm.errors import DaemonUnavailable

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


class DetachFilter:
    """Spots the detach key in typed input, the way ssh spots its escapes.

    ``~.`` typed at the start of a line detaches; ``~~`` sends one ``~``; a ``~`` followed by
    anything else is sent as typed. Sans-I/O: bytes in, bytes to forward out.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._tilde = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Return the bytes to forward and whether the user asked to detach."""
        out = bytearray()
        for byte in data:
            ch = bytes((byte,))
            if self._tilde:
                self._tilde = False
                if ch == b".":
                    return bytes(out), True
                out += b"~" if ch == b"~" else b"~" + ch
            elif self._line_start and ch == b"~":
                self._tilde = True
                continue
            else:
                out += ch
            self._line_start = ch in (b"\r", b"\n")
        return bytes(out), False


async def relay_attached(client: AdminClient, session: str | None, primary: bool) -> int | None:
    """Attach this terminal to a session until its command exits.

    Returns the command's exit status, or None if the user detached (the session goes on).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int | None] = loop.create_future()
    detach_filter = DetachFilter()
    stream_box: list[int] = []

    def on_stream(frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "output" and isinstance(frame.get("data"), bytes):
            write_all(STDOUT_FD, frame["data"])
        elif kind == "exit" and not done.done():
            status = frame.get("status")
            done.set_result(status if isinstance(status, int) else 1)

    client.on_stream = on_stream
    cols, rows = terminal_size()
    with raw_mode(STDIN_FD):
        reply = await client.request(
            "attach", session=session, cols=cols, rows=rows, primary=primary
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
            data, detach = detach_filter.feed(data)
            if data:
                client.send({"type": "input", "stream": stream, "data": data})
            if detach and not done.done():
                client.send({"type": "detach", "stream": stream})
                done.set_result(None)

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
