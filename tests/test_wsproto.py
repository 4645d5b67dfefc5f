"""upterm.wsproto against an independent WebSocket implementation (the ``websockets``
library, both as client and as server), plus what a hostile peer may send."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
import websockets
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve

from upterm import wsproto

pytestmark = pytest.mark.timeout(30)

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 1 << 20]


async def _our_echo_server() -> tuple[asyncio.Server, int]:
    """A server made of wsproto alone: upgrade, then echo every payload byte back in binary
    frames (boundaries are not kept, so the echo is of the stream)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        while (parsed := wsproto.parse_head(buf)) is None:
            buf += await reader.read(4096)
        head, used = parsed
        writer.write(wsproto.upgrade_response(wsproto.check_upgrade(head)))
        framer = wsproto.Framer(client=False)
        pending = bytes(buf[used:])
        while True:
            events = framer.feed(pending)
            for chunk in events.data:
                writer.write(framer.binary(chunk))
            for reply in events.replies:
                writer.write(reply)
            if events.closed:
                await writer.drain()
                writer.close()
                return
            pending = await reader.read(65536)
            if not pending:
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_stream(ws: websockets.asyncio.client.ClientConnection, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        msg = await asyncio.wait_for(ws.recv(), 10)
        got += msg if isinstance(msg, bytes) else msg.encode()
    return bytes(got)


async def test_our_server_with_the_websockets_client() -> None:
    server, port = await _our_echo_server()
    async with ws_connect(
        f"ws://127.0.0.1:{port}/", compression=None, max_size=None, ping_interval=None
    ) as ws:
        for size in SIZES:
            data = os.urandom(size)
            await ws.send(data)
            assert await _read_stream(ws, size) == data, size
        # A fragmented message, a text message, a ping: all carried or answered.
        await ws.send([b"frag", b"ment", b"ed"])
        assert await _read_stream(ws, 10) == b"fragmented"
        await ws.send("text")
        assert await _read_stream(ws, 4) == b"text"
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 5)
        await ws.close(4001, "bye")
        assert ws.close_code == 4001  # our close frame echoed the code
    server.close()


async def test_our_client_with_the_websockets_server() -> None:
    async def echo(ws: websockets.asyncio.server.ServerConnection) -> None:
        async for msg in ws:
            await ws.send(msg)

    async with ws_serve(echo, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = wsproto.new_key()
        writer.write(
            wsproto.upgrade_request(
                f"127.0.0.1:{port}", "/", key, (("Upterm-Client-Version", "SSH-2.0-x"),)
            )
        )
        buf = bytearray()
        while (parsed := wsproto.parse_head(buf)) is None:
            buf += await reader.read(4096)
        head, used = parsed
        wsproto.check_upgrade_response(head, key)
        framer = wsproto.Framer(client=True)
        got = bytearray()
        pending = bytes(buf[used:])
        for size in SIZES:
            data = os.urandom(size)
            writer.write(framer.binary(data))
            while len(got) < size:
                got += b"".join(framer.feed(pending).data)
                pending = b"" if len(got) >= size else await reader.read(65536)
            assert bytes(got[:size]) == data, size
            del got[:size]
        writer.write(framer.close(wsproto.CLOSE_NORMAL, "done"))
        while True:
            events = framer.feed(await reader.read(4096))
            if events.closed:
                assert events.closed[0] == wsproto.CLOSE_NORMAL
                break
        writer.close()


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_any_split_of_the_stream_gives_the_same_bytes(
    payloads: list[bytes], cuts: list[int]
) -> None:
    """Frames cut anywhere (inside headers, masks, payloads) give the same stream, with a
    ping in between answered once."""
    wire = b"".join(wsproto.frame(wsproto.OP_BINARY, p, masked=True) for p in payloads)
    wire += wsproto.frame(wsproto.OP_PING, b"p", masked=True)
    framer = wsproto.Framer(client=False)
    out, replies = bytearray(), []
    pos = 0
    for cut in [*sorted({min(c, len(wire)) for c in cuts}), len(wire)]:
        events = framer.feed(wire[pos:cut])
        out += b"".join(events.data)
        replies += events.replies
        pos = cut
    assert bytes(out) == b"".join(payloads)
    assert replies == [wsproto.frame(wsproto.OP_PONG, b"p", masked=False)]


def _raw(b0: int, b1: int, rest: bytes = b"") -> bytes:
    return bytes([b0, b1]) + rest


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_raw(0x82, 0x01, b"x"), "unmasked frame"),
        (_raw(0xC2, 0x80, b"mask"), "reserved bits"),
        (_raw(0x89, 0x80 | 126, struct.pack("!H", 200) + b"mask"), "control frames"),
        (_raw(0x09, 0x80, b"mask"), "control frames"),
        (_raw(0x80, 0x80, b"mask"), "continuation without a message"),
        (_raw(0x83, 0x80, b"mask"), "unknown opcode"),
        (_raw(0x8B, 0x80, b"mask"), "unknown control opcode"),
        (_raw(0x02, 0x80, b"mask") + _raw(0x82, 0x80, b"mask"), "new message inside"),
        (_raw(0x88, 0x81, b"mask" + b"x"), "one-byte payload"),
        (_raw(0x82, 0x80 | 127, struct.pack("!Q", 1 << 63) + b"mask"), "out of range"),
    ],
)
def test_framing_violations_are_refused_with_a_reason(data: bytes, why: str) -> None:
    with pytest.raises(wsproto.FrameError, match=why) as err:
        wsproto.Framer(client=False).feed(data)
    assert err.value.close_code == wsproto.CLOSE_PROTOCOL_ERROR


def test_a_huge_claimed_frame_costs_only_what_arrives() -> None:
    """A frame claiming 2**62 bytes is streamed: nothing is held for it."""
    framer = wsproto.Framer(client=False)
    mask = b"\x00\x00\x00\x00"
    events = framer.feed(_raw(0x82, 0x80 | 127, struct.pack("!Q", 1 << 62) + mask) + b"abc")
    assert events.data == [b"abc"]
    assert len(framer._buf) == 0


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400),
        (
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
            b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n",
            426,
        ),
        (
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\x1bb\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000, 431),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 70 + b"\r\n", 431),
    ],
)
def test_bad_upgrade_requests_get_a_status_and_a_reason(request_bytes: bytes, status: int) -> None:
    with pytest.raises(wsproto.HandshakeError) as err:
        parsed = wsproto.parse_head(request_bytes)
        assert parsed is not None
        wsproto.check_upgrade(parsed[0])
    assert err.value.status == status


def test_a_good_upgrade_is_accepted_case_insensitively() -> None:
    req = (
        b"GET /x HTTP/1.1\r\nHost: a\r\nUPGRADE: WebSocket\r\nconnection: keep-alive, upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nextra"
    )
    parsed = wsproto.parse_head(req)
    assert parsed is not None
    head, used = parsed
    assert req[used:] == b"extra"
    key = wsproto.check_upgrade(head)
    # RFC 6455's own example.
    assert wsproto.accept_key(key) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert wsproto.parse_head(req[:20]) is None


# --- Golden vectors: upstream's Go upterm and uptermd, built by hand from its source
# snapshot, recorded off the wire. Header order differs from ours (Go sorts them and adds a
# User-Agent); the bytes that matter are pinned here.

#: Upstream's `upterm host --server ws://127.0.0.1:38101` (Basic "root:": its user name and
#: an empty password).
UPSTREAM_HOST_UPGRADE = (
    b"GET / HTTP/1.1\r\n"
    b"Host: 127.0.0.1:38101\r\n"
    b"User-Agent: Go-http-client/1.1\r\n"
    b"Authorization: Basic cm9vdDo=\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: aBFKJNfJlbJEymJawDbtdg==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Upgrade: websocket\r\n"
    b"Upterm-Client-Version: SSH-2.0-upterm-host-client\r\n"
    b"\r\n"
)
#: Upstream's `upterm proxy ws://SESSIONID:bm9kZTo=@127.0.0.1:38102`: the token split at its
#: first ':' into user and password.
UPSTREAM_PROXY_UPGRADE = (
    b"GET / HTTP/1.1\r\n"
    b"Host: 127.0.0.1:38102\r\n"
    b"User-Agent: Go-http-client/1.1\r\n"
    b"Authorization: Basic U0VTU0lPTklEOmJtOWtaVG89\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: 5GbVEyQ9TGIBs2XAHg+qEg==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Upgrade: websocket\r\n"
    b"Upterm-Client-Version: SSH-2.0-upterm-client-client\r\n"
    b"\r\n"
)
#: Upstream uptermd's answer to UPSTREAM_HOST_UPGRADE, and its first frame (its SSH banner).
UPSTREAM_RELAY_ANSWER = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: 9Q2OF6j2OyuTHZ3KSyL4bgti80k=\r\n"
    b"\r\n"
    b"\x82\x1bSSH-2.0-uptermd-0.0.0+dev\r\n"
)
#: Upstream's host's first frame after the upgrade: its SSH banner, masked.
UPSTREAM_HOST_FIRST_FRAME = bytes.fromhex(
    "829c2089b3d073dafbfd12a783fd55f9c7b552e49eb84ffac7fd43e5dab54efdbeda"
)


def test_upstreams_upgrades_parse_and_carry_the_token_as_our_door_reads_it() -> None:
    from upterm.relay.wsdoor import _basic_user

    head, used = wsproto.parse_head(UPSTREAM_HOST_UPGRADE) or (None, 0)
    assert head is not None and used == len(UPSTREAM_HOST_UPGRADE)
    assert wsproto.check_upgrade(head) == "aBFKJNfJlbJEymJawDbtdg=="
    assert head.header("upterm-client-version") == "SSH-2.0-upterm-host-client"
    assert _basic_user(head.header("authorization")) == "root"
    head, _ = wsproto.parse_head(UPSTREAM_PROXY_UPGRADE) or (None, 0)
    assert head is not None
    assert head.header("upterm-client-version") == "SSH-2.0-upterm-client-client"
    assert _basic_user(head.header("authorization")) == "SESSIONID:bm9kZTo="


def test_our_upgrade_answer_is_upstream_relays_byte_for_byte() -> None:
    answer, _, _ = UPSTREAM_RELAY_ANSWER.partition(b"\r\n\r\n")
    assert wsproto.upgrade_response("aBFKJNfJlbJEymJawDbtdg==") == answer + b"\r\n\r\n"
    # ... and our client takes upstream's answer and its banner frame.
    head, used = wsproto.parse_head(UPSTREAM_RELAY_ANSWER) or (None, 0)
    assert head is not None
    wsproto.check_upgrade_response(head, "aBFKJNfJlbJEymJawDbtdg==")
    events = wsproto.Framer(client=True).feed(UPSTREAM_RELAY_ANSWER[used:])
    assert b"".join(events.data) == b"SSH-2.0-uptermd-0.0.0+dev\r\n"


def test_our_request_names_what_upstreams_does() -> None:
    """Same request line, Upgrade, Connection, version, client version and credentials as
    upstream's proxy sends (order and User-Agent aside)."""
    ours = wsproto.upgrade_request(
        "127.0.0.1:38102", "/", "5GbVEyQ9TGIBs2XAHg+qEg==",
        (("Upterm-Client-Version", "SSH-2.0-upterm-client-client"),
         ("Authorization", "Basic U0VTU0lPTklEOmJtOWtaVG89")),
    )  # fmt: skip
    mine, _ = wsproto.parse_head(ours) or (None, 0)
    theirs, _ = wsproto.parse_head(UPSTREAM_PROXY_UPGRADE) or (None, 0)
    assert mine is not None and theirs is not None
    assert mine.start == theirs.start
    assert {k: v for k, v in theirs.headers.items() if k != "user-agent"} == mine.headers


def test_upstream_hosts_masked_banner_frame_is_read() -> None:
    events = wsproto.Framer(client=False).feed(UPSTREAM_HOST_FIRST_FRAME)
    assert b"".join(events.data) == b"SSH-2.0-upterm-host-client\r\n"


@pytest.mark.parametrize("size", [1, 5, 4095, 4096, 70001])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_masking_matches_the_definition_in_c_and_in_python(size: int, offset: int) -> None:
    """RFC 6455 5.3: octet i of the payload is XORed with octet (i + offset) mod 4 of the
    key; large payloads go through websockets' C mask when it is there."""
    data, key = os.urandom(size), os.urandom(4)
    expected = bytes(b ^ key[(i + offset) % 4] for i, b in enumerate(data))
    assert wsproto._mask(data, key, offset) == expected
