"""The asyncio glue shared by both ends of SSH over WebSocket: asyncssh writes to a
:class:`FramedTransport`, which sends each write as one binary message through its
:class:`Carrier` (the relay's door, or a host's or proxy's dialled connection)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from upterm import wsproto

log = logging.getLogger(__name__)

#: ``get_extra_info`` name that is true on connections that came over WebSocket.
WS_INFO = "upterm_websocket"


class Carrier(Protocol):
    """What a :class:`FramedTransport` needs from the connection under it."""

    framer: wsproto.Framer
    closed: bool

    def close(self, code: int, reason: str) -> None:
        """Send a close frame and close the connection."""


class FramedTransport(asyncio.Transport):
    """What asyncssh writes to: each write becomes one binary message."""

    def __init__(self, door: Carrier, real: asyncio.Transport) -> None:
        super().__init__()
        self._door = door
        self._real = real

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == WS_INFO:
            return True
        return self._real.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self._door.closed:
            self._real.write(self._door.framer.binary(bytes(data)))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(bytes(d) for d in list_of_data))

    def write_eof(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._real.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def abort(self) -> None:
        self._real.abort()

    def close(self) -> None:
        self._door.close(wsproto.CLOSE_NORMAL, "")

    def is_closing(self) -> bool:
        return self._real.is_closing()

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError

    def get_protocol(self) -> asyncio.BaseProtocol:
        raise NotImplementedError


class WebSocketCarrier(asyncio.Protocol):
    """A connection that starts with an HTTP handshake (:meth:`handshake`, per side) and
    then carries an SSH connection (asyncssh's protocol) in WebSocket frames."""

    def __init__(self, *, client: bool) -> None:
        self._transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._ssh: asyncio.Protocol | None = None
        self.framer = wsproto.Framer(client=client)
        self.closed = False

    def handshake(self, head: wsproto.Head, rest: bytes) -> None:
        """Act on the peer's HTTP head; call :meth:`start_ssh` to go on. Raising
        :class:`wsproto.HandshakeError` ends the connection (see :meth:`refused`)."""
        raise NotImplementedError

    def refused(self, exc: wsproto.HandshakeError) -> None:
        """The handshake failed: close."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def start_ssh(self, ssh: asyncio.Protocol, rest: bytes) -> None:
        """From now on, frames carry ``ssh``'s bytes (``rest``: frames already received)."""
        assert self._transport is not None
        self._ssh = ssh
        ssh.connection_made(FramedTransport(self, self._transport))
        if rest:
            self._frames(rest)

    # -- asyncio protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._ssh is not None:
            self._frames(data)
            return
        self._head += data
        # Parse only once the head can be complete: a peer dripping its head a byte at a
        # time must not make each byte re-scan all that came before (O(n) in all, not n^2).
        start = max(0, len(self._head) - len(data) - 3)
        if self._head.find(b"\r\n\r\n", start) < 0 and len(self._head) <= wsproto.MAX_HEAD_BYTES:
            return
        try:
            parsed = wsproto.parse_head(self._head)
            if parsed is None:
                return
            head, used = parsed
            rest = bytes(self._head[used:])
            self._head = bytearray()
            self.handshake(head, rest)
        except wsproto.HandshakeError as exc:
            self.refused(exc)

    def eof_received(self) -> bool:
        if self._ssh is not None and not self.closed:
            return bool(self._ssh.eof_received())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._ssh is not None:
            self._ssh.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._ssh is not None:
            self._ssh.pause_writing()

    def resume_writing(self) -> None:
        if self._ssh is not None:
            self._ssh.resume_writing()

    # -- frames --

    def _frames(self, data: bytes) -> None:
        assert self._ssh is not None and self._transport is not None
        try:
            events = self.framer.feed(data)
        except wsproto.FrameError as exc:
            log.info("closed a WebSocket connection: %s", exc)
            self.close(exc.close_code, str(exc))
            return
        for chunk in events.data:
            if self.closed:
                return
            self._ssh.data_received(chunk)
        for reply in events.owed(self._transport.get_write_buffer_size()):
            self._transport.write(reply)
        if events.closed is not None and not self.closed:
            self.closed = True
            self._transport.close()

    def close(self, code: int, reason: str) -> None:
        """Send a close frame and close the connection."""
        if self.closed or self._transport is None:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._transport.write(self.framer.close(code, reason))
        self._transport.close()
