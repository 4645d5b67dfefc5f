"""The attached client's tracker of the alternate screen, and what it sends to restore."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from upterm.termstate import SANE_MODES, ScreenTracker

VIM_START = b"\x1b[?1049h\x1b[22;0;0t\x1b[?1h\x1b=\x1b[H\x1b[2J~\r\n~\r\n\x1b[?1000h\x1b[?2004h"
VIM_END = b"\x1b[?2004l\x1b[?1000l\x1b[?1l\x1b>\x1b[?1049l\x1b[23;0;0t"


def feed_split(data: bytes, cuts: list[int]) -> ScreenTracker:
    tracker = ScreenTracker()
    last = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        tracker.feed(data[last:cut])
        last = cut
    tracker.feed(data[last:])
    return tracker


def test_alternate_screen_on_and_off() -> None:
    tracker = ScreenTracker()
    tracker.feed(b"$ vim\r\n" + VIM_START)
    assert tracker.alternate
    # vim saved the title on the terminal's stack as it started: it is restored too.
    assert tracker.restore() == b"\x1b[?1049l" + SANE_MODES + b"\x1b[23;0t"
    tracker.feed(VIM_START + b"text" + VIM_END + b"$ ")
    assert not tracker.alternate
    # On the normal screen nothing restores a cursor: only the harmless resets are sent.
    assert tracker.restore() == SANE_MODES


def test_the_old_modes_and_combined_parameters_count() -> None:
    for seq in (b"\x1b[?47h", b"\x1b[?1047h", b"\x1b[?1;1049h", b"\x1b[?1049;25h"):
        tracker = ScreenTracker()
        tracker.feed(seq)
        assert tracker.alternate, seq
    tracker = ScreenTracker()
    tracker.feed(b"\x1b[?25h\x1b[?1h\x1b[?2004h")  # other modes: not the alternate screen
    assert not tracker.alternate


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=40), st.booleans())
def test_any_split_of_the_output_gives_the_same_answer(cuts: list[int], ends: bool) -> None:
    data = b"hello\r\n" + VIM_START + b"x" * 50 + (VIM_END + b"$ " if ends else b"more")
    assert feed_split(data, cuts).alternate is not ends
