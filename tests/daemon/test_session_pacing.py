"""How fast the shared PTY is read: as fast as the fastest viewer takes it, and never held
back for long by a joiner that stopped taking anything.

A real command on a real PTY; the viewers are our own Viewer interface with a send buffer
the test drains by hand, standing where a joiner's SSH channel is.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from upterm.daemon import session as session_mod
from upterm.daemon.session import FOLLOW_HIGH_WATER_BYTES, Session
from upterm.daemon.sshd import SKIP_AHEAD_BYTES

FLOOD = 8 << 20  # far beyond every buffer on the way: the command blocks if not read


class HeldViewer:
    """A joiner whose output piles up until the test lets it drain; like a real joiner's
    channel (sshd.GuestSession) it skips ahead rather than hold more than SKIP_AHEAD_BYTES."""

    paces = False

    def __init__(self, viewer_id: str, session: Session, *, draining: bool) -> None:
        self.viewer_id = viewer_id
        self._session = session
        self.draining = draining
        self.received = 0
        self.held = 0
        self.status: int | None = None

    def send(self, data: bytes) -> None:
        if self.draining:
            self.received += len(data)
        elif self.held <= SKIP_AHEAD_BYTES:
            self.received += len(data)
            self.held += len(data)

    def backlog(self) -> int:
        return self.held

    def drain(self) -> None:
        self.held = 0
        self.draining = True
        self._session.drained(self.viewer_id)

    def finish(self, status: int) -> None:
        self.status = status

    def cut_off(self, message: bytes) -> None:
        raise AssertionError("a joiner was cut off")


def flood_session() -> Session:
    # The command waits for a line on its input, so viewers attach before any output.
    command = f"read go; head -c {FLOOD} /dev/zero"
    return Session(["sh", "-c", command], env=dict(os.environ), cwd="/", cols=80, rows=24)


async def start(session: Session, *viewers: HeldViewer) -> None:
    session.start()
    for viewer in viewers:
        session.attach(viewer, 80, 24)
    await asyncio.sleep(0.2)
    session.input(b"\n")


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stall limit far beyond the test's timeouts: any wait seen is pacing, not a stall."""
    monkeypatch.setattr(session_mod, "JOINER_STALL_S", 60.0)


async def test_the_pty_waits_for_a_lone_busy_joiner_until_it_drains(patient: None) -> None:
    session = flood_session()
    joiner = HeldViewer("j1", session, draining=False)
    await start(session, joiner)
    await asyncio.sleep(1.0)
    # Paused just past the high-water mark: the command is blocked on its full PTY.
    assert not session.exited.done()
    assert FOLLOW_HIGH_WATER_BYTES < joiner.held < FOLLOW_HIGH_WATER_BYTES + (1 << 20)
    joiner.drain()
    assert await asyncio.wait_for(session.exited, 20) == 0
    assert joiner.received >= FLOOD


async def test_the_fastest_joiner_sets_the_pace(patient: None) -> None:
    session = flood_session()
    stuck = HeldViewer("stuck", session, draining=False)
    fast = HeldViewer("fast", session, draining=True)
    await start(session, stuck, fast)
    # The stuck joiner's backlog never drains, yet the command runs to its end at once.
    assert await asyncio.wait_for(session.exited, 20) == 0
    assert fast.received >= FLOOD


async def test_a_joiner_that_makes_no_progress_stops_holding_the_pty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_mod, "JOINER_STALL_S", 0.3)
    session = flood_session()
    stopped = HeldViewer("stopped", session, draining=False)
    await start(session, stopped)
    # Waited for once, briefly, then read on without it (it skipped the rest).
    assert await asyncio.wait_for(session.exited, 20) == 0
    assert stopped.received < FLOOD


async def test_a_drained_joiner_is_followed_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(session_mod, "JOINER_STALL_S", 0.3)
    first_done = tmp_path / "first"
    two_floods = (
        f"read a; head -c {FLOOD} /dev/zero; touch {first_done}; read b; head -c {FLOOD} /dev/zero"
    )
    session = Session(["sh", "-c", two_floods], env=dict(os.environ), cwd="/", cols=80, rows=24)
    joiner = HeldViewer("j1", session, draining=False)
    await start(session, joiner)
    for _ in range(100):  # the first flood goes past the stopped joiner
        if first_done.exists():
            break
        await asyncio.sleep(0.1)
    assert first_done.exists()
    joiner.drain()  # it caught up: it counts again
    joiner.draining = False
    monkeypatch.setattr(session_mod, "JOINER_STALL_S", 60.0)
    session.input(b"\n")
    await asyncio.sleep(1.0)
    assert not session.exited.done()  # the second flood waits for it
    assert FOLLOW_HIGH_WATER_BYTES < joiner.held < FOLLOW_HIGH_WATER_BYTES + (1 << 20)
    joiner.drain()
    assert await asyncio.wait_for(session.exited, 20) == 0
