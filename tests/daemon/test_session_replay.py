"""What a newcomer (or a joiner catching up) is shown of recent output: a tail that starts
where a terminal can start, never inside an escape sequence or a character."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from upterm.daemon.session import REPLAY_BYTES, Session


async def replay_of(output: bytes, limit: int, tmp_path: Path) -> bytes:
    """Run a command printing ``output`` on a real PTY; return recent_output(limit)."""
    path = tmp_path / "output"
    path.write_bytes(output)
    # Raw mode: the bytes reach the session as written (no newline translation).
    session = Session(
        ["sh", "-c", f"stty raw -echo; cat {path}"],
        env=dict(os.environ), cwd="/", cols=80, rows=24,
    )  # fmt: skip
    session.start()
    await asyncio.wait_for(session.exited, 10)
    return session.recent_output(limit)


async def test_short_output_is_replayed_whole(tmp_path: Path) -> None:
    assert await replay_of(b"one\ntwo", 1024, tmp_path) == b"one\ntwo"


async def test_a_cut_tail_starts_after_a_newline(tmp_path: Path) -> None:
    out = b"a" * 3000 + b"\nlast line \xc3\xa9"
    assert await replay_of(out, 1024, tmp_path) == b"last line \xc3\xa9"


async def test_a_progress_bar_without_newlines_starts_at_a_carriage_return(tmp_path: Path) -> None:
    out = b"".join(b"\r%3d%% [" % (i % 100) + b"#" * 60 + b"]" for i in range(200))
    got = await replay_of(out, 1024, tmp_path)
    assert got.startswith(b"\r") and got.endswith(b"]") and len(got) > 900


async def test_a_screen_of_escape_sequences_starts_at_an_escape(tmp_path: Path) -> None:
    out = b"".join(b"\x1b[%d;1H\xe2\x94\x80 cell %d" % (i % 24 + 1, i) for i in range(500))
    got = await replay_of(out, 1024, tmp_path)
    assert got.startswith(b"\x1b[") and len(got) > 900


async def test_text_with_nowhere_safe_to_start_is_not_replayed(tmp_path: Path) -> None:
    assert await replay_of(b"x" * (REPLAY_BYTES + 100), 1024, tmp_path) == b""


def _screen(data: bytes, cols: int = 80, rows: int = 24) -> tuple[list[str], tuple[int, int]]:
    import pyte

    screen = pyte.Screen(cols, rows)
    pyte.ByteStream(screen).feed(data)
    return [line.rstrip() for line in screen.display], (screen.cursor.x, screen.cursor.y)


@pytest.mark.parametrize("length", [REPLAY_BYTES * 3, REPLAY_BYTES * 3 + 1, 100_037, 200_079])
@pytest.mark.parametrize("ended", [True, False])
async def test_a_line_longer_than_the_screen_is_replayed_from_its_column(
    length: int, ended: bool, tmp_path: Path
) -> None:
    """A line that alone fills the screen (a flood without newlines, as from bash: a mode
    change and a CR before it): the replay starts inside it, at a column 0 of the wrapped
    line, and shows the screen the whole output shows, whether the line has ended or not."""
    out = b"$ flood\r\n\x1b[?2004l\r" + b"x" * length
    if ended:
        out += b"\r\nDONE\r\n\x1b[?2004h$ "
    replay = await replay_of(out, REPLAY_BYTES, tmp_path)
    assert b"x" * 1920 in replay
    assert _screen(replay) == _screen(out)


async def test_a_long_line_of_other_than_plain_text_is_not_guessed_at(tmp_path: Path) -> None:
    """Wide characters make a byte's column unknowable: the replay starts after the line."""
    out = b"$ flood\r\n" + "\u4e16".encode() * 40000 + b"\r\nDONE\r\n$ "
    assert await replay_of(out, REPLAY_BYTES, tmp_path) == b"DONE\r\n$ "
