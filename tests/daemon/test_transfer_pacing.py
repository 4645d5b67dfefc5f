"""Transfers yield to a terminal in use: the pacer (no network; the rate is its contract)."""

from __future__ import annotations

import time

import pytest

from upterm.daemon.session import Session
from upterm.daemon.transfer import INTERACTIVE_S, Pacer

pytestmark = pytest.mark.timeout(30)


async def test_nobody_typing_costs_a_transfer_nothing() -> None:
    Session.last_input_at = time.monotonic() - INTERACTIVE_S - 1
    pacer = Pacer(rate=1 << 20)
    started = time.monotonic()
    for _ in range(64):
        await pacer.take(1 << 20)  # 64 MiB "at 1 MiB/s" would take a minute
    assert time.monotonic() - started < 1


async def test_while_someone_types_transfers_move_at_the_rate() -> None:
    Session.last_input_at = time.monotonic()
    pacer = Pacer(rate=1 << 20)
    started = time.monotonic()
    for _ in range(5):
        await pacer.take(256 * 1024)  # 1.25 MiB at 1 MiB/s: the first step at once
    assert time.monotonic() - started >= 0.9
    Session.last_input_at = 0.0
