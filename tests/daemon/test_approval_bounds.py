"""Joiners waiting for the host's approval are bounded: per session, and one per key."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import start_shell
from upterm.daemon.sshd import (
    MAX_PENDING_APPROVALS,
    NOT_APPROVED,
    TOO_MANY_WAITING,
    ClientInfo,
    GuestPolicy,
)

pytestmark = pytest.mark.timeout(30)


def _client(n: int, fingerprint: str | None = None) -> ClientInfo:
    return ClientInfo(
        client_id=str(n),
        version="SSH-2.0-test",
        addr="127.0.0.2:1",
        fingerprint=fingerprint or f"SHA256:key{n}",
        mode="relay",
        source="",
    )


async def test_waiting_joiners_are_bounded_and_answered_ones_free_their_place(tmp_path) -> None:
    session = start_shell(tmp_path)
    accepting = asyncio.Event()
    accepting.set()
    policy = GuestPolicy(
        session, b"relay", frozenset(), accepting, lambda c: None, lambda c: None, approve=True
    )
    try:
        waiting = [
            asyncio.ensure_future(policy.admit(_client(i))) for i in range(MAX_PENDING_APPROVALS)
        ]
        await asyncio.sleep(0)
        assert len(policy.pending) == MAX_PENDING_APPROVALS
        # One more is refused at once, not queued; so is a second wait for a key that waits.
        assert await asyncio.wait_for(policy.admit(_client(99)), 1) == TOO_MANY_WAITING
        assert await asyncio.wait_for(policy.admit(_client(98, "SHA256:key0")), 1) == (
            TOO_MANY_WAITING
        )
        # An answer frees a place: the next joiner waits again (and is let in).
        assert policy.answer("0", True) is not None
        assert await waiting[0] is None  # let in
        late = asyncio.ensure_future(policy.admit(_client(100)))
        await asyncio.sleep(0)
        assert "100" in policy.pending
        policy.answer("100", False)
        assert await late == NOT_APPROVED
    finally:
        for fut in waiting:
            fut.cancel()
        session.hangup()
