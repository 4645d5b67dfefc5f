"""Admin socket client: requests, replies, streams, and starting the daemon on demand."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from upterm import adminproto, paths
from upterm.errors import (
    DaemonUnavailable,
    RemoteProtocolError,
    SocketOwnershipError,
    UptermError,
)

DAEMON_START_TIMEOUT_S = 15
_PEERCRED = struct.Struct("3i")


def _error_classes() -> dict[str, type[UptermError]]:
    found: dict[str, type[UptermError]] = {}
    todo: list[type[UptermError]] = [UptermError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found


_ERRORS = _error_classes()


def error_from_reply(reply: dict[str, Any]) -> UptermError:
    """Turn an ``error`` reply into the matching :class:`UptermError`."""
    code = str(reply.get("code", "error"))
    message = str(reply.get("message", "the daemon reported an error"))
    raw = reply.get("details")
    details = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    return _ERRORS.get(code, UptermError)(message, **details)


class AdminClient:
    """One connection to the daemon's (or a session's) admin socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.on_stream: Callable[[dict[str, Any]], None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect(cls, path: Path) -> AdminClient:
        """Connect to ``path`` after checking it, and its server, belong to us."""
        paths.check_socket_owner(path)
        reader, writer = await asyncio.open_unix_connection(
            str(path), limit=adminproto.MAX_FRAME_BYTES
        )
        sock: socket.socket = writer.get_extra_info("socket")
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        if _PEERCRED.unpack(raw)[1] != os.getuid():
            writer.close()
            raise SocketOwnershipError(f"{path} is served by another user; refusing to use it")
        return cls(reader, writer)

    async def _read_loop(self) -> None:
        decoder = adminproto.FrameDecoder()
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                for frame in decoder.feed(data):
                    if isinstance(frame, adminproto.BadFrame):
                        raise RemoteProtocolError(f"daemon sent a bad frame: {frame.reason}")
                    self._dispatch(frame)
        except (ConnectionError, OSError, RemoteProtocolError):
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(DaemonUnavailable("lost the connection to the upterm daemon"))
            if not self.closed.done():
                self.closed.set_result(None)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind in ("ok", "error"):
            fut = self._pending.pop(frame.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
            elif kind == "error":
                # An error not tied to a request (a frame the daemon could not read).
                for pending in self._pending.values():
                    if not pending.done():
                        pending.set_result(frame)
                self._pending.clear()
        elif self.on_stream is not None:
            self.on_stream(frame)

    def send(self, message: dict[str, Any]) -> None:
        """Send a frame that expects no reply (stream input, resize)."""
        if not self._writer.is_closing():
            self._writer.write(adminproto.encode_frame(message))

    async def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its reply; an error reply raises."""
        req_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        self.send({"type": kind, "id": req_id, **fields})
        reply = await fut
        if reply.get("type") == "error":
            raise error_from_reply(reply)
        return reply

    async def hello(self) -> dict[str, Any]:
        """Version handshake."""
        return await self.request("hello", version=adminproto.PROTOCOL_VERSION)

    async def aclose(self) -> None:
        """Close the connection."""
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        self._task.cancel()


def _spawn_daemon() -> subprocess.Popen[bytes]:
    log_path = paths.state_dir() / "daemon.log"
    try:
        log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_fh = log_path.open("ab")
    except OSError as exc:
        raise DaemonUnavailable(
            f"cannot start the upterm daemon: {log_path}: {exc.strerror}; check "
            "XDG_STATE_HOME and your home directory"
        ) from exc
    with log_fh:
        # The daemon's own start-up errors land in its log, where the message points.
        return subprocess.Popen(
            [sys.executable, "-m", "upterm.daemon", "--log-file"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_fh,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )


async def connect_daemon(autostart: bool = True) -> AdminClient:
    """Connect to this user's daemon, starting it in the background if it is not running.

    Two commands racing to start it end up with one daemon: the daemon holds a lock, a
    second instance exits at once (status 0), and both commands connect to the survivor.
    """
    run_dir = paths.runtime_dir()
    if run_dir.exists():
        paths.check_private_dir(run_dir)
    path = paths.daemon_socket_path()
    try:
        return await AdminClient.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        if not autostart:
            raise DaemonUnavailable(
                "the upterm daemon is not running; start it with 'upterm daemon'"
            ) from None
    proc = _spawn_daemon()
    deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        try:
            return await AdminClient.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            status = proc.poll()
            if status not in (None, 0):
                break
    raise DaemonUnavailable(
        f"the upterm daemon did not start; see {paths.state_dir() / 'daemon.log'} or run "
        "'upterm daemon' to see why"
    )
