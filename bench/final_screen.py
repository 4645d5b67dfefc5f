"""A joiner's final screen, from everything it received, computed offline with pyte.

A 64 MiB flood is far too much for pyte, but most of it is one run of the same printable
byte, and a long enough run leaves the same screen whatever its length modulo the width:
each extra full line of it only scrolls the same line of that byte in, once more. So runs
longer than ``(rows + 4) * cols`` are shortened by the largest multiple of ``cols`` that
keeps them at least ``(rows + 2) * cols`` long (``tests/test_bench_smoke.py`` checks this
against feeding the whole stream). Every other byte is fed as it came.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import pyte


def shortened(n: int, cols: int, rows: int) -> int:
    """The length a run of ``n`` identical printable bytes is fed as."""
    keep = (rows + 2) * cols
    if n <= (rows + 4) * cols:
        return n
    return n - (n - keep) // cols * cols


def shorten_runs(chunks: Iterable[bytes], cols: int, rows: int, byte: bytes = b"x") -> bytes:
    """The stream ``chunks`` make, each run of ``byte`` shortened (runs may span chunks)."""
    runs = re.compile(re.escape(byte) + b"+")
    out = bytearray()
    run = 0  # bytes of the current run, not yet written out
    for chunk in chunks:
        pos = 0
        for m in runs.finditer(chunk):
            if m.start() > pos:  # other bytes first: the run before them has ended
                out += byte * shortened(run, cols, rows)
                out += chunk[pos : m.start()]
                run = 0
            run += m.end() - m.start()
            pos = m.end()
        if pos < len(chunk):
            out += byte * shortened(run, cols, rows)
            out += chunk[pos:]
            run = 0
    out += byte * shortened(run, cols, rows)
    return bytes(out)


@dataclass(frozen=True)
class Screen:
    """What a terminal shows: its lines (trailing blanks stripped) and cursor (x, y)."""

    lines: tuple[str, ...]
    cursor: tuple[int, int]

    def without_notices(self) -> tuple[str, ...]:
        """The lines but upterm's own notices (``[upterm: ...]``, one line each)."""
        return tuple(line for line in self.lines if not line.startswith("[upterm: "))

    def equal_but_notices(self, other: Screen) -> bool:
        """Whether this screen is ``other`` with lines of upterm's notices added, each above
        the line the cursor is on: the lines above scrolled up by one, or (with room below)
        the lines from there on moved down by one with the cursor."""
        mine = self.without_notices()
        added = len(self.lines) - len(mine)
        if not added:
            return False
        x, y = other.cursor
        scrolled = self.cursor == (x, y) and mine == other.lines[added:]
        moved = self.cursor == (x, y + added) and mine + ("",) * added == other.lines
        return scrolled or moved


def final_screen(data: bytes, cols: int, rows: int) -> Screen:
    """The screen a ``cols`` x ``rows`` terminal shows after ``data`` (fed as it is)."""
    screen = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    stream.feed(data)
    return Screen(
        tuple(line.rstrip() for line in screen.display), (screen.cursor.x, screen.cursor.y)
    )


def screen_of(chunks: Iterable[bytes], cols: int, rows: int, byte: bytes = b"x") -> Screen:
    """The final screen after ``chunks``, their runs of ``byte`` shortened first."""
    return final_screen(shorten_runs(chunks, cols, rows, byte), cols, rows)
