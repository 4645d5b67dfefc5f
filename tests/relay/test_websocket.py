"""uptermd's WebSocket listener: health and how-to pages, OpenSSH joining through
`upterm proxy`, refusals before the upgrade, and a hostile peer that never reaches SSH."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VENV_BIN, make_key
from tests.relay.test_relay_public import LOCAL, SshJoiner, make_tunnel, start_host
from upterm import wire, wsproto
from upterm.daemon.tunnel import RelayURL
from upterm.keys import Ed25519Key
from upterm.relay.gate import parse_networks
from upterm.relay.guard import RelayLimits
from upterm.relay.policy import PenaltyConfig
from upterm.relay.server import Relay, RelayIdentity

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def ws_relay(**limits: Any) -> AsyncIterator[Relay]:
    limits.setdefault("penalties", PenaltyConfig(exempt=parse_networks([LOCAL])))
    relay = Relay(
        RelayIdentity.from_key(Ed25519Key.generate()),
        host=LOCAL,
        port=0,
        node_addr=None,
        version="0.1.0",
        limits=RelayLimits(**limits),
        ws_addr=(LOCAL, 0),
    )
    await relay.start()
    try:
        yield relay
    finally:
        relay.close()


async def http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_health_and_how_to_pages() -> None:
    async with ws_relay() as relay:
        health = await http(relay.ws_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert health.startswith(b"HTTP/1.1 200 OK\r\n") and health.endswith(b"\r\n\r\nOK")
        page = await http(relay.ws_port, b"GET / HTTP/1.1\r\nHost: relay.example.com\r\n\r\n")
        assert b"upterm host --server wss://relay.example.com -- YOUR_COMMAND" in page
        assert b"ProxyCommand='upterm proxy wss://TOKEN@relay.example.com'" in page
        # Load balancers' checks cost no penalty: many in a row stay answered.
        for _ in range(30):
            again = await http(relay.ws_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert again.startswith(b"HTTP/1.1 200 OK")


def proxy_command(ws_port: int, token: str) -> str:
    return f"{VENV_BIN}/upterm proxy ws://{token}@{LOCAL}:{ws_port}"


async def test_openssh_joins_through_upterm_proxy(tmp_path: Path) -> None:
    """The upstream-documented join: ssh with `upterm proxy` as its ProxyCommand types into
    the shared shell; the relay sees a joiner like any other (same SSH service)."""
    key = make_key(tmp_path / "j")
    async with ws_relay() as relay:
        host = await start_host(relay.port, tmp_path)
        try:
            joiner = await SshJoiner.start(
                relay.port,
                host.token,
                key,
                "-o",
                f"ProxyCommand={proxy_command(relay.ws_port, host.token)}",
            )
            assert await joiner.expect(b"$ "), bytes(joiner.out)
            joiner.type(b"echo over-ws-$((6*7))\r")
            assert await joiner.expect(b"over-ws-42"), bytes(joiner.out)
            # Bulk output comes through whole.
            joiner.type(b"head -c 3000000 /dev/zero | tr '\\0' x | wc -c\r")
            assert await joiner.expect(b"3000000"), bytes(joiner.out[-300:])
            assert [c for c in relay.connections if not c.is_host]
            rc, _ = await joiner.leave()
            assert rc == 0
        finally:
            host.close()


async def test_unknown_and_foreign_tokens_are_refused_before_the_upgrade(tmp_path: Path) -> None:
    """No open relay: a token naming no session here, or another node, gets a 404 with the
    reason, and nothing is dialled (a listener standing in for that node sees nothing)."""
    key = make_key(tmp_path / "j")
    bait = socket.socket()
    bait.bind((LOCAL, 0))
    bait.listen()
    bait.setblocking(False)
    bait_addr = f"{LOCAL}:{bait.getsockname()[1]}"
    async with ws_relay() as relay:
        host = await start_host(relay.port, tmp_path)
        try:
            foreign = wire.encode_token(host.reg.session_id, bait_addr)
            for token in ("AAAAAAAAAAAAAAAAAAAA", foreign):
                proc = await asyncio.create_subprocess_exec(
                    f"{VENV_BIN}/upterm", "proxy", f"ws://{token}@{LOCAL}:{relay.ws_port}",
                    stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                _, err = await asyncio.wait_for(proc.communicate(), 15)
                assert proc.returncode == 1
                text = err.decode()
                assert text.count("\n") == 1, text
                assert "refused the WebSocket: HTTP 404" in text
                assert "no host is connected for session" in text
            with pytest.raises(BlockingIOError):
                bait.accept()
            # The real token still works.
            joiner = await SshJoiner.start(
                relay.port, host.token, key,
                "-o", f"ProxyCommand={proxy_command(relay.ws_port, host.token)}",
            )  # fmt: skip
            assert await joiner.expect(b"$ "), bytes(joiner.out)
            await joiner.leave()
        finally:
            host.close()
            bait.close()


def upgrade(user: str, version: str = wire.CLIENT_CLIENT_VERSION) -> bytes:
    basic = base64.b64encode(user.encode()).decode()
    return wsproto.upgrade_request(
        "x", "/", wsproto.new_key(),
        (("Upterm-Client-Version", version), ("Authorization", f"Basic {basic}")),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("request_bytes", "status", "text"),
    [
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"400",
            b"missing upterm client version",
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Upterm-Client-Version: SSH-2.0-x\r\n\r\n",
            b"400",
            b"basic auth failed",
        ),
        (b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 10000, b"431", b"too large"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n", b"400", b""),
    ],
)
async def test_malformed_upgrades_get_one_clear_answer(
    request_bytes: bytes, status: bytes, text: bytes
) -> None:
    async with ws_relay() as relay:
        answer = await http(relay.ws_port, request_bytes)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        assert text in answer


async def test_a_frame_flood_and_bad_frames_leave_a_bystander_typing(tmp_path: Path) -> None:
    """Peers that upgrade and then send garbage frames, unmasked frames or a huge claimed
    frame are closed (or starved by the gate) while a joiner's echo stays quick."""
    key = make_key(tmp_path / "j")
    async with ws_relay() as relay:
        host = await start_host(relay.port, tmp_path)
        try:
            bystander = await SshJoiner.start(relay.port, host.token, key)
            assert await bystander.expect(b"$ ")
            attackers = []
            for payload in (
                bytes([0x82, 0x05]) + b"plain",  # unmasked: protocol error, closed
                bytes([0xC2, 0x80]) + b"mask",  # reserved bits
                bytes([0x82, 0xFF]) + (1 << 62).to_bytes(8, "big") + b"mask",  # huge claim
            ):
                reader, writer = await asyncio.open_connection(LOCAL, relay.ws_port)
                writer.write(upgrade(host.token) + payload + b"\x00" * 100_000)
                attackers.append((reader, writer))
            for reader, _ in attackers[:2]:
                data = await asyncio.wait_for(reader.read(), 10)
                assert data.startswith(b"HTTP/1.1 101")
                assert data.endswith(b"\x03\xea" + b"unmasked frame") or b"\x03\xea" in data
            worst = 0.0
            for i in range(5):
                start = time.perf_counter()
                bystander.type(f"echo by-$((100+{i}))\r".encode())
                assert await bystander.expect(f"by-{100 + i}".encode())
                worst = max(worst, time.perf_counter() - start)
            assert worst < 1.0, worst
            for _, writer in attackers:
                writer.close()
            await bystander.leave()
        finally:
            host.close()


async def test_a_host_over_websocket_is_joined_over_ssh_and_websocket(tmp_path: Path) -> None:
    """`upterm host --server ws://...`: the host's tunnel runs over the WebSocket listener
    into the same relay; joiners come by plain SSH or by WebSocket alike, and the card's
    line is the ProxyCommand one."""
    key = make_key(tmp_path / "j")
    async with ws_relay() as relay:
        tunnel = make_tunnel(relay.ws_port, tmp_path)
        tunnel.url = RelayURL.parse(f"ws://{LOCAL}:{relay.ws_port}")
        host = await start_host(relay.ws_port, tmp_path, tunnel=tunnel)
        try:
            line = tunnel.url.join_command(host.token)
            assert line == (
                f"ssh -o ProxyCommand='upterm proxy ws://{host.token}@{LOCAL}:{relay.ws_port}' "
                f"{host.token}@{LOCAL}"
            )
            assert tunnel.url.e2e_join_command(host.token, "k") == ""
            (host_link,) = [c for c in relay.connections if c.is_host]
            assert host_link.conn.get_extra_info("upterm_websocket") is True
            for extra in ((), ("-o", f"ProxyCommand={proxy_command(relay.ws_port, host.token)}")):
                joiner = await SshJoiner.start(relay.port, host.token, key, *extra)
                assert await joiner.expect(b"$ "), bytes(joiner.out)
                joiner.type(b"echo host-over-ws-$((6*7))\r")
                assert await joiner.expect(b"host-over-ws-42"), bytes(joiner.out)
                await joiner.leave()
        finally:
            host.close()
