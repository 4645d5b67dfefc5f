"""WebSocket (RFC 6455), sans-I/O: the opening handshake and the framing.

Only what SSH over WebSocket needs, as upstream upterm carries it: one byte stream in binary
messages, both directions. No extension is ever negotiated (so no permessage-deflate), no
subprotocol. Text messages are taken as bytes too (upstream's reader does). Message
boundaries mean nothing to an SSH stream, so payload is handed on as it arrives, unmasked in
place, and never assembled into messages: memory per connection does not depend on what size
a peer claims for a frame.

Why not the ``websockets`` library: Debian 12, whose libraries our packages use, ships 10.4,
and PyPI ships 17.x; their asyncio APIs differ, and the part we need is this small. The tests
check this module against ``websockets`` as an independent peer.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from upterm.errors import RemoteProtocolError

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Request or response line plus headers: more is refused (431), never buffered.
MAX_HEAD_BYTES = 8192
MAX_HEADERS = 64
#: Control frames carry at most this much (RFC 6455 5.5).
MAX_CONTROL_PAYLOAD = 125

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TOO_BIG = 1009


class HandshakeError(RemoteProtocolError):
    """A request that is not a usable upgrade: answered with ``status`` and ``text``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class FrameError(RemoteProtocolError):
    """A framing violation: the connection is closed with ``close_code``."""

    def __init__(self, close_code: int, text: str) -> None:
        super().__init__(text)
        self.close_code = close_code


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()  # noqa: S324 - RFC 6455
    return base64.b64encode(digest).decode("ascii")


def new_key() -> str:
    """A random ``Sec-WebSocket-Key``."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


@dataclass(frozen=True)
class Head:
    """A parsed request or response head: start line, and headers by lower-case name
    (repeated headers joined with ", ", as HTTP allows)."""

    start: tuple[str, str, str]
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str:
        """The header's value, or "" when absent."""
        return self.headers.get(name.lower(), "")

    def has_token(self, name: str, token: str) -> bool:
        """Whether a comma-separated header lists ``token`` (case-insensitive)."""
        return token.lower() in (t.strip().lower() for t in self.header(name).split(","))


def parse_head(buf: bytes | bytearray) -> tuple[Head, int] | None:
    """Parse an HTTP/1.1 head from the start of ``buf``: (head, bytes used), or None when
    more is needed. Raises :class:`HandshakeError` for anything malformed or too large."""
    end = bytes(buf[: MAX_HEAD_BYTES + 4]).find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD_BYTES:
            raise HandshakeError(431, "request header too large")
        return None
    try:
        text = bytes(buf[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeError(400, "request header is not ASCII") from None
    if any((ch < " " and ch not in "\t\r\n") or ch == "\x7f" for ch in text):
        raise HandshakeError(400, "control characters in the request header")
    lines = text.split("\r\n")
    start = lines[0].split(" ", 2)
    if len(start) != 3 or not all(start):
        raise HandshakeError(400, "malformed request line")
    headers: dict[str, str] = {}
    if len(lines) - 1 > MAX_HEADERS:
        raise HandshakeError(431, "too many request headers")
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or not name.isprintable():
            raise HandshakeError(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Head((start[0], start[1], start[2]), headers), end + 4


def check_upgrade(head: Head) -> str:
    """Check a server-side upgrade request; return its ``Sec-WebSocket-Key``."""
    method, _target, version = head.start
    if method != "GET" or version != "HTTP/1.1":
        raise HandshakeError(400, "a WebSocket upgrade is a GET over HTTP/1.1")
    if not head.has_token("upgrade", "websocket") or not head.has_token("connection", "upgrade"):
        raise HandshakeError(400, "ws upgrade failed: not a WebSocket upgrade request")
    if head.header("sec-websocket-version") != "13":
        raise HandshakeError(426, "ws upgrade failed: WebSocket version 13 is required")
    key = head.header("sec-websocket-key")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise HandshakeError(400, "ws upgrade failed: bad Sec-WebSocket-Key") from None
    return key


def upgrade_response(key: str) -> bytes:
    """The 101 answer to an upgrade with ``key`` (no extension, no subprotocol)."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
    ).encode("ascii")


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def http_response(status: int, body: str, extra_headers: tuple[str, ...] = ()) -> bytes:
    """A complete plain-text HTTP/1.1 response that closes the connection."""
    data = body.encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(data)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
        *extra_headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + data


def upgrade_request(host: str, path: str, key: str, headers: tuple[tuple[str, str], ...]) -> bytes:
    """A client's upgrade request."""
    lines = [
        f"GET {path or '/'} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def check_upgrade_response(head: Head, key: str) -> None:
    """Check a server's answer to our upgrade; raises :class:`HandshakeError` with its status."""
    version, status, reason = head.start
    if not version.startswith("HTTP/1.") or not status.isdigit():
        raise HandshakeError(502, "the server's answer is not HTTP")
    if status != "101":
        raise HandshakeError(int(status), f"HTTP {status} {reason}")
    if not head.has_token("upgrade", "websocket") or head.header(
        "sec-websocket-accept"
    ) != accept_key(key):
        raise HandshakeError(502, "the server's upgrade answer does not match the request")
    if head.header("sec-websocket-extensions"):
        raise HandshakeError(502, "the server chose an extension that was not offered")


#: Payloads at least this large are masked in C when websockets' speedups are there (a
#: host's output over WebSocket is masked by the daemon and unmasked by uptermd, every
#: byte: 3.5 ms per MiB in Python, 0.03 ms in C). Smaller ones (keystrokes, handshakes)
#: do not pay for that import (36 ms, felt by ``upterm proxy`` at start).
C_MASK_MIN_BYTES = 4096
_c_apply_mask: Callable[[bytes, bytes], bytes] | None = None
_c_mask_tried = False


def _mask(data: bytes, mask: bytes, offset: int) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` starting at mask position ``offset``."""
    if not data:
        return b""
    global _c_apply_mask, _c_mask_tried
    rolled = mask[offset % 4 :] + mask[: offset % 4]
    n = len(data)
    if n >= C_MASK_MIN_BYTES:
        if not _c_mask_tried:
            _c_mask_tried = True
            try:
                from websockets.speedups import apply_mask
            except ImportError:  # optional: the Python below is the same, slower
                pass
            else:
                _c_apply_mask = apply_mask
        if _c_apply_mask is not None:
            return _c_apply_mask(data, rolled)
    key = (rolled * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One final frame (clients mask, servers do not)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, (0x80 if masked else 0) | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, (0x80 if masked else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, (0x80 if masked else 0) | 127, n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + _mask(payload, mask, 0)


def is_pong(data: bytes) -> bool:
    """Whether ``data`` (a frame made here) is a pong: writers skip it while the peer is not
    reading (a pong is owed only "as soon as is practical")."""
    return bool(data) and data[0] & 0x0F == OP_PONG


#: A pong is not written while this much waits to be sent to its peer.
PONG_SKIP_BYTES = 64 * 1024


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: the code and as much of ``reason`` as fits."""
    # Cut on a character boundary: a browser fails the connection on a reason that is not
    # valid UTF-8 (RFC 6455 5.5.1), which would lose the close code too.
    text = reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore")
    return struct.pack("!H", code) + text.encode("utf-8")


@dataclass
class Events:
    """What one :meth:`Framer.feed` produced."""

    #: Message payload, in order (boundaries are not kept).
    data: list[bytes] = field(default_factory=list)
    #: Frames to send back (pongs, the close reply).
    replies: list[bytes] = field(default_factory=list)
    #: The peer's close: (code, reason); the connection ends after ``replies`` are sent.
    closed: tuple[int, str] | None = None
    #: With ``max_message`` set: whole messages, (opcode, payload), instead of ``data``.
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    #: The payload of the latest ping of this read (its pong goes into ``replies``).
    pong: bytes | None = None

    def owed(self, waiting: int) -> list[bytes]:
        """The replies to send now, with ``waiting`` bytes not yet sent to the peer: no
        pong to a peer that is not reading (one is owed only "as soon as is practical")."""
        if waiting <= PONG_SKIP_BYTES:
            return self.replies
        return [r for r in self.replies if not is_pong(r)]


class Framer:
    """One side's frame reader and writer. Feed it received bytes; it hands back payload and
    the control replies owed; :meth:`binary` and :meth:`close` make frames to send."""

    def __init__(self, *, client: bool, max_message: int | None = None) -> None:
        """``max_message``: hand on whole messages (with their opcode) of at most this many
        bytes, for peers whose messages mean something (a browser's text and binary
        messages); a longer one is a protocol error (1009). None: a byte stream."""
        self._client = client
        self._max_message = max_message
        self._message = bytearray()
        self._message_opcode = 0
        self._fin = True
        self._buf = bytearray()
        # The frame being read: opcode, bytes of payload left, mask, offset into the mask.
        self._in_frame = False
        self._remaining = 0
        self._opcode = 0
        self._mask: bytes | None = None
        self._mask_off = 0
        self._in_message = False
        self.closed = False

    def binary(self, payload: bytes) -> bytes:
        """A binary message carrying ``payload``."""
        return frame(OP_BINARY, payload, masked=self._client)

    def text(self, payload: str) -> bytes:
        """A text message carrying ``payload``."""
        return frame(OP_TEXT, payload.encode("utf-8"), masked=self._client)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
        """Our close frame."""
        return frame(OP_CLOSE, close_payload(code, reason), masked=self._client)

    def feed(self, data: bytes) -> Events:
        """Take received bytes; raises :class:`FrameError` on a protocol violation."""
        events = Events()
        self._buf += data
        buf = self._buf
        while not self.closed:
            if not self._in_frame:
                if not self._start_frame():
                    break
                self._in_frame = True
            if self._opcode < 0x8:
                # Data: handed on as it comes, unmasked piece by piece.
                take = min(self._remaining, len(buf))
                if take:
                    chunk = bytes(buf[:take])
                    del buf[:take]
                    if self._mask is not None:
                        chunk = _mask(chunk, self._mask, self._mask_off)
                        self._mask_off = (self._mask_off + take) % 4
                    self._remaining -= take
                    if self._max_message is None:
                        events.data.append(chunk)
                    else:
                        self._message += chunk
                if self._remaining:
                    break
                self._in_frame = False
                if self._max_message is not None and self._fin:
                    events.messages.append((self._message_opcode, bytes(self._message)))
                    self._message.clear()
            else:
                if len(buf) < self._remaining:
                    break
                payload = bytes(buf[: self._remaining])
                del buf[: self._remaining]
                if self._mask is not None:
                    payload = _mask(payload, self._mask, 0)
                self._in_frame = False
                self._control(self._opcode, payload, events)
        if events.pong is not None and events.closed is None:
            events.replies.insert(0, frame(OP_PONG, events.pong, masked=self._client))
        return events

    def _start_frame(self) -> bool:
        """Read the next frame header if it is all here."""
        buf = self._buf
        if len(buf) < 2:
            return False
        b0, b1 = buf[0], buf[1]
        fin, rsv, opcode = b0 & 0x80, b0 & 0x70, b0 & 0x0F
        masked, length = b1 & 0x80, b1 & 0x7F
        if rsv:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
        if bool(masked) == self._client:
            raise FrameError(
                CLOSE_PROTOCOL_ERROR,
                "a server's frames must not be masked" if self._client else "unmasked frame",
            )
        need = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if masked else 0)
        if len(buf) < need:
            return False
        pos = 2
        if length == 126:
            (length,) = struct.unpack_from("!H", buf, 2)
            pos = 4
        elif length == 127:
            (length,) = struct.unpack_from("!Q", buf, 2)
            if length >> 63:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "frame length out of range")
            pos = 10
        mask = bytes(buf[pos : pos + 4]) if masked else None
        del buf[:need]
        if opcode >= 0x8:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown control opcode {opcode}")
            if not fin or length > MAX_CONTROL_PAYLOAD:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "control frames are short and whole")
        elif opcode == OP_CONTINUATION:
            if not self._in_message:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation without a message")
            self._in_message = not fin
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._in_message:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            self._in_message = not fin
            self._message_opcode = opcode
        else:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if opcode < 0x8:
            self._fin = bool(fin)
            limit = self._max_message
            if limit is not None and len(self._message) + length > limit:
                raise FrameError(CLOSE_TOO_BIG, f"a message over {limit} bytes")
        self._opcode, self._remaining, self._mask, self._mask_off = opcode, length, mask, 0
        return True

    def _control(self, opcode: int, payload: bytes, events: Events) -> None:
        if opcode == OP_PING:
            # Only the latest ping of a read is answered (RFC 6455 5.5.3 allows it): a
            # peer that sends pings and never reads must not grow our replies per ping.
            events.pong = payload
        elif opcode == OP_CLOSE:
            code, reason = CLOSE_NORMAL, ""
            if len(payload) == 1:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte payload")
            if len(payload) >= 2:
                (code,) = struct.unpack_from("!H", payload)
                reason = payload[2:].decode("utf-8", "replace")
            self.closed = True
            events.closed = (code, reason)
            # Echo the code, as RFC 6455 5.5.1 suggests (none received: a normal close).
            events.replies.append(self.close(code if code >= CLOSE_NORMAL else CLOSE_NORMAL))
