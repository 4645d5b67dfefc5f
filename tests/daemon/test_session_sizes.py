"""Who shapes the shared terminal: the host and typists do; a viewer does not shrink it.

A real command on a real PTY (``stty size`` reports what the program sees); the viewers are
our own Viewer interface, recording what they are sent.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from upterm.daemon.session import Session

pytestmark = pytest.mark.timeout(30)


class RecordingViewer:
    paces = False

    def __init__(self, viewer_id: str) -> None:
        self.viewer_id = viewer_id
        self.output = bytearray()
        self.status: int | None = None

    def send(self, data: bytes) -> None:
        self.output += data

    def backlog(self) -> int:
        return 0

    def finish(self, status: int) -> None:
        self.status = status

    def cut_off(self, message: bytes) -> None:
        raise AssertionError("cut off")


async def stty_size(session: Session, viewer: RecordingViewer, marker: str) -> str:
    """The size the program sees, as "rows cols"."""
    start = len(viewer.output)
    session.input(f"echo {marker}-$(stty size | tr ' ' x)-end\n".encode())
    needle = f"{marker}-".encode()
    for _ in range(200):
        seen = bytes(viewer.output[start:])
        at = seen.rfind(needle)
        if at >= 0 and b"-end" in seen[at:]:
            return seen[at + len(needle) : seen.index(b"-end", at)].decode()
        await asyncio.sleep(0.02)
    raise AssertionError(bytes(viewer.output[-300:]))


async def test_a_viewer_does_not_shrink_the_shared_terminal_until_it_may_type(tmp_path) -> None:
    session = Session(
        ["bash", "--norc", "--noprofile"],
        env={"PATH": os.environ["PATH"], "PS1": "$ ", "TERM": "xterm"},
        cwd=str(tmp_path),
        cols=100,
        rows=30,
    )
    session.start()
    try:
        typist, viewer = RecordingViewer("typist"), RecordingViewer("viewer")
        session.attach(typist, 100, 30)
        session.attach(viewer, 40, 10, sized=False)
        session.resize("viewer", 30, 8)  # it may resize its own window: nothing changes
        assert await stty_size(session, typist, "a") == "30x100"
        # Given the keyboard, its size counts (the smallest policy): the terminal shrinks.
        session.set_sized("viewer", True)
        assert await stty_size(session, typist, "b") == "8x30"
        # A viewer again: back to the typist's size.
        session.set_sized("viewer", False)
        assert await stty_size(session, typist, "c") == "30x100"
        session.detach("viewer")
        assert await stty_size(session, typist, "d") == "30x100"
    finally:
        session.hangup()
