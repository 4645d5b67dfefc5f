"""Admin socket server: private UNIX sockets speaking the msgpack admin protocol.

Transport only. Each socket is created 0600 in a 0700 directory; every peer's uid is checked
with SO_PEERCRED and a peer of another uid is dropped before it can send a byte. Frames are
decoded with :mod:`upterm.adminproto`; a bad frame gets an error reply (or, if the stream
cannot be resynchronised, a clean close) and never reaches the dispatcher. The dispatcher
(the session manager) answers each request and may open streams on the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from upterm import adminproto
from upterm.errors import RemoteProtocolError, UptermError

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")
#: Read this much from a client at a time.
READ_CHUNK_BYTES = 64 * 1024


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a UNIX socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return int(uid)


class AdminConnection:
    """One client of an admin socket."""

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        bound_session: str | None,
    ) -> None:
        self.writer = writer
        #: On a session's own socket, the session that requests without an id refer to.
        self.bound_session = bound_session
        self._on_close: list[Callable[[], None]] = []
        self._next_stream = 1
        #: Streams the dispatcher opened on this connection, by stream number.
        self.streams: dict[int, Any] = {}
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        """Queue one frame to the client."""
        if not self.closed:
            self.writer.write(adminproto.encode_frame(message))

    def backlog(self) -> int:
        """Bytes queued to this client."""
        transport = self.writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    def new_stream(self) -> int:
        """Allocate a stream number on this connection."""
        stream = self._next_stream
        self._next_stream += 1
        return stream

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once when the client goes away."""
        self._on_close.append(callback)

    def close(self) -> None:
        """Close the connection after queued frames are sent."""
        if not self.closed:
            self.closed = True
            self.writer.close()

    def _closed(self) -> None:
        self.closed = True
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("admin close callback failed")


Dispatcher = Callable[[adminproto.Request, AdminConnection], Awaitable[dict[str, Any] | None]]


class AdminServer:
    """Serves one admin socket path."""

    def __init__(
        self,
        path: Path,
        dispatch: Dispatcher,
        *,
        bound_session: str | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.path = path
        self._dispatch = dispatch
        self._bound = bound_session
        self._sock = sock
        #: A socket systemd created (socket activation) is systemd's to remove.
        self._owns_path = sock is None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[AdminConnection] = set()

    async def start(self) -> None:
        """Bind (or adopt an inherited socket) and listen."""
        if self._sock is None:
            with contextlib.suppress(FileNotFoundError):
                if self.path.is_socket():
                    self.path.unlink()
            old_umask = os.umask(0o177)
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            self.path.chmod(0o600)
            self._sock = sock
        self._server = await asyncio.start_unix_server(
            self._serve, sock=self._sock, limit=adminproto.MAX_FRAME_BYTES
        )

    def close(self) -> None:
        """Stop listening, drop clients and remove the socket file."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.close()
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            uid = peer_uid(sock)
        except OSError:
            uid = -1
        if uid != os.getuid():
            log.warning("refused admin client with uid %d on %s", uid, self.path)
            writer.close()
            return
        conn = AdminConnection(writer, self._bound)
        self._connections.add(conn)
        decoder = adminproto.FrameDecoder()
        try:
            while True:
                data = await reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                for raw in decoder.feed(data):
                    await self._handle(conn, raw)
                    if conn.closed:
                        return
        except adminproto.FrameTooLarge as exc:
            conn.send(adminproto.error(None, "too_large", str(exc)))
        except (ConnectionError, OSError):
            pass
        finally:
            self._connections.discard(conn)
            conn._closed()
            writer.close()

    async def _handle(
        self, conn: AdminConnection, raw: dict[str, Any] | adminproto.BadFrame
    ) -> None:
        if isinstance(raw, adminproto.BadFrame):
            conn.send(adminproto.error(None, "bad_frame", raw.reason))
            return
        req_id = adminproto.request_id_of(raw)
        try:
            req = adminproto.parse_request(raw)
        except RemoteProtocolError as exc:
            conn.send(adminproto.error(req_id, "bad_request", str(exc)))
            return
        if isinstance(req, adminproto.UnknownType):
            conn.send(
                adminproto.error(req.id, "unknown_type", f"unknown message type {req.type!r}")
            )
            return
        try:
            reply = await self._dispatch(req, conn)
        except UptermError as exc:
            reply = adminproto.error(req_id, exc.code, str(exc), exc.details)
        except Exception as exc:
            log.exception("admin request %s failed", type(req).__name__)
            reply = adminproto.error(req_id, "internal", f"internal error: {type(exc).__name__}")
        if reply is not None:
            conn.send(reply)
