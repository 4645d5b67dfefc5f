"""Bounds on logged-in connections that keep nothing open (OpenSSH's UnusedConnectionTimeout)."""

from __future__ import annotations

import asyncio
import time

import asyncssh
import pytest

from tests.relay.test_relay_security import host_session
from upterm.keys import Ed25519Key
from upterm.relay.gate import parse_networks
from upterm.relay.guard import RelayLimits
from upterm.relay.policy import PenaltyConfig
from upterm.relay.server import Relay, RelayIdentity

pytestmark = pytest.mark.timeout(60)

UNUSED_S = 0.6


@pytest.fixture
async def relay():
    r = Relay(
        RelayIdentity.from_key(Ed25519Key.generate()),
        host="127.0.0.1",
        port=0,
        node_addr=None,
        version="0.1.0",
        limits=RelayLimits(
            unused_timeout_s=UNUSED_S,
            penalties=PenaltyConfig(exempt=parse_networks(["127.0.0.1"])),
        ),
    )
    await r.start()
    yield r
    r.close()


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
