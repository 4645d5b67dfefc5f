"""Bounds on logged-in connections: nothing open for too long (OpenSSH's
UnusedConnectionTimeout), and a host's byte rate (--host-rate)."""

from __future__ import annotations

import asyncio
import time

import asyncssh
import pytest

from tests.relay.test_relay_public import inproc_relay
from tests.relay.test_relay_security import host_session
from upterm.relay.server import Relay

pytestmark = pytest.mark.timeout(60)

UNUSED_S = 0.6


@pytest.fixture
async def relay():
    async with inproc_relay(unused_timeout_s=UNUSED_S) as r:
        yield r


async def _joiner(relay: Relay, token: str) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        relay.port,
        username=token,
        client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        known_hosts=None,
        agent_path=None,
        config=None,
    )


async def test_a_joiner_with_no_channel_is_closed_and_one_with_a_channel_stays(
    relay, tmp_path
) -> None:
    tunnel, session, reg = await host_session(relay, tmp_path)
    idle = await _joiner(relay, reg.token)
    busy = await _joiner(relay, reg.token)
    chan, _ = await busy.create_session(asyncssh.SSHClientSession, term_type="xterm", encoding=None)
    start = time.monotonic()
    await asyncio.wait_for(idle.wait_closed(), UNUSED_S * 5)
    closed_after = time.monotonic() - start
    assert closed_after >= UNUSED_S * 0.8, closed_after
    await asyncio.sleep(UNUSED_S * 2)
    assert not busy.is_closed()  # a channel is open: it stays
    # Its last channel closed: nothing open again, so it goes too.
    chan.close()
    await asyncio.wait_for(busy.wait_closed(), UNUSED_S * 5)
    # The host, whose session is registered, stays.
    assert tunnel.connected
    assert metric_value(relay, "unused-connection") == 2
    session.hangup()
    tunnel.close()


async def test_a_host_that_registers_nothing_is_closed(relay) -> None:
    conn = await asyncssh.connect(
        "127.0.0.1",
        relay.port,
        client_version="upterm-host-client",
        username="h",
        client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        known_hosts=None,
        agent_path=None,
        config=None,
    )
    await asyncio.wait_for(conn.wait_closed(), UNUSED_S * 5)


def metric_value(relay: Relay, reason: str) -> float:
    value = relay.metrics.registry.get_sample_value("uptermd_refusals_total", {"reason": reason})
    return value or 0.0


RATE_B_S = 400 * 1024
BURST_B = 64 * 1024
#: Random bytes, base64-encoded on the way: SSH may compress, and the cap counts what the host
#: sends on its connection, so the flood must not compress below its entropy.
RANDOM_B = 1_000_000
#: The cap is charged after each socket read (at most 256 KiB): the last read is not waited for.
READ_B = 256 * 1024


async def test_a_host_over_its_byte_rate_waits_its_turn(tmp_path) -> None:
    async with inproc_relay(host_rate_bytes_s=RATE_B_S, host_burst_bytes=BURST_B) as relay:
        tunnel, session, reg = await host_session(relay, tmp_path)
        conn = await _joiner(relay, reg.token)
        async with conn:
            proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
            out = bytearray()

            async def until(marker: bytes) -> None:
                while marker not in out:
                    out.extend(await asyncio.wait_for(proc.stdout.read(65536), 20))

            await until(b"$ ")
            start = time.monotonic()
            proc.stdin.write(
                f"head -c {RANDOM_B} /dev/urandom | base64 -w0; echo; echo END-$((1+1))\r".encode()
            )
            await until(b"END-2")
            elapsed = time.monotonic() - start
            proc.close()
        # Everything arrives, at no more than the cap after the burst.
        longest = max(len(line) for line in bytes(out).split(b"\r\n"))
        assert longest >= RANDOM_B * 4 // 3, longest  # every byte arrived
        floor_s = (RANDOM_B - BURST_B - READ_B) / RATE_B_S
        assert elapsed >= floor_s * 0.9, (elapsed, floor_s)
        assert metric_value(relay, "host-rate") >= 1
        session.hangup()
        tunnel.close()


async def test_logins_rebuild_no_server_options_in_threads(relay, tmp_path) -> None:
    """A login costs the relay and the host's inner server no thread-pool work: asyncssh's
    per-login rebuild of the server options (for sshd_config Match blocks, which neither
    loads) ran in a worker holding the GIL, and a flood of logins stalled every logged-in
    joiner's keystrokes behind it."""
    loop = asyncio.get_running_loop()
    rebuilds: list[str] = []
    submit = loop.run_in_executor

    def counting(executor, func, *args):  # type: ignore[no-untyped-def]
        target = getattr(func, "func", func)
        if getattr(func, "keywords", {}).get("reload") and target.__name__.startswith(
            "SSHServerConnectionOptions"
        ):
            rebuilds.append(target.__name__)
        return submit(executor, func, *args)

    loop.run_in_executor = counting  # type: ignore[method-assign]
    try:
        tunnel, session, reg = await host_session(relay, tmp_path)
        for _ in range(3):
            # Each login goes through the relay's server and the host's inner one.
            conn = await _joiner(relay, reg.token)
            chan, _ = await conn.create_session(
                asyncssh.SSHClientSession, term_type="xterm", encoding=None
            )
            chan.close()
            conn.close()
            await conn.wait_closed()
        session.hangup()
        tunnel.close()
    finally:
        del loop.run_in_executor
    assert rebuilds == []
