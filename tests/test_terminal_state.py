"""The tracker of what a program's output set on its terminal: modes, queries, held tails."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from upterm.termstate import (
    PRIVATE_DEFAULTS,
    TerminalState,
    line_redrawable,
    strip_spans,
)

QUERIES = [
    b"\x1b[6n",  # cursor position
    b"\x1b[5n",  # status
    b"\x1b[?6n",  # extended cursor position
    b"\x1b[c",  # primary device attributes
    b"\x1b[0c",
    b"\x1b[>c",  # secondary
    b"\x1b[=c",  # tertiary
    b"\x1b[?2004$p",  # DECRQM
    b"\x1b[>0q",  # XTVERSION
    b"\x1b[14t",  # window size in pixels
    b"\x1b[18t",  # text area size
    b"\x1b[?u",  # kitty keyboard flags
    b"\x1b]11;?\x07",  # background colour
    b"\x1b]10;?\x1b\\",  # foreground colour, ST-terminated
    b"\x1b]4;1;?\x07",  # palette entry
    b"\x1bP$qm\x1b\\",  # DECRQSS
    b"\x1bP+q544e\x1b\\",  # XTGETTCAP
]
NOT_QUERIES = [
    b"\x1b[31m",
    b"\x1b[10;20H",
    b"\x1b[22;0;0t",  # push title
    b"\x1b[23;0;0t",
    b"\x1b[2 q",  # cursor style
    b"\x1b[>4;1m",  # modifyOtherKeys
    b"\x1b[>1u",  # kitty push flags
    b"\x1b[u",  # restore cursor
    b"\x1b]2;a title\x07",
    b"\x1b[?1049h",
    b"\x1b[1;24r",
]
VIM_START = (
    b"\x1b[?1049h\x1b[22;0;0t\x1b[?1h\x1b=\x1b[?2004h\x1b[1;24r\x1b[?12h\x1b[?12l"
    b"\x1b[H\x1b[2J\x1b]2;file.txt - VIM\x07\x1b[?1000h\x1b[?1006h\x1b[3 q"
)


def test_queries_are_found_and_other_sequences_are_not() -> None:
    for query in QUERIES:
        term = TerminalState()
        data = b"before" + query + b"after"
        assert term.feed(data) == data
        assert term.queries == [(6, 6 + len(query))], query
    for seq in NOT_QUERIES:
        term = TerminalState()
        term.feed(b"x" + seq + b"y")
        assert term.queries == [], seq


def test_the_modes_a_full_screen_program_sets_are_given_to_a_newcomer() -> None:
    term = TerminalState()
    term.feed(b"$ vim file.txt\r\n" + VIM_START + b"~\r\n" * 20)
    assert term.alternate
    modes = term.modes_sequence()
    for seq in (
        b"\x1b[?1h",
        b"\x1b[?2004h",
        b"\x1b[?1000h",
        b"\x1b[?1006h",
        b"\x1b[?12l",
        b"\x1b=",
        b"\x1b7\x1b[1;24r\x1b8",
        b"\x1b[3 q",
        b"\x1b]2;file.txt - VIM\x07",
    ):
        assert seq in modes, seq
    # Modes at their start value are set too: a newcomer's terminal may differ.
    assert b"\x1b[?1003l" in modes and b"\x1b[?7h" in modes
    # Leaving: the program turns its modes off; the tracker follows.
    term.feed(b"\x1b[?1000l\x1b[?1006l\x1b[?2004l\x1b[?1l\x1b>\x1b[r\x1b[?1049l$ ")
    assert not term.alternate
    assert term.private == PRIVATE_DEFAULTS
    assert term.region is None and not term.keypad


def test_character_sets_and_shifts_are_followed() -> None:
    term = TerminalState()
    term.feed(b"\x1b)0\x0eqqq")  # G1 line drawing, shifted out
    assert term.charsets == {ord(")"): b"0"} and term.shifted
    assert b"\x1b)0" in term.modes_sequence() and b"\x0e" in term.modes_sequence()
    term.feed(b"\x0fplain")
    assert not term.shifted


def test_resets_bring_everything_back() -> None:
    term = TerminalState()
    term.feed(VIM_START)
    term.feed(b"\x1b[!p")  # soft reset: modes, not the screen
    assert term.alternate and term.private == PRIVATE_DEFAULTS and term.region is None
    term.feed(b"\x1bc")  # full reset
    assert not term.alternate and term.title is None
    assert term.switches and term.switches[0][2] is False


def test_a_sequence_cut_at_the_end_of_a_read_is_held_until_its_end() -> None:
    term = TerminalState()
    assert term.feed(b"text\x1b[") == b"text"
    assert term.holding
    assert term.feed(b"6nmore") == b"\x1b[6nmore"
    assert term.queries == [(0, 4)]
    # Given up on: flushed as it is.
    assert term.feed(b"\x1b]11;") == b""
    assert term.flush() == b"\x1b]11;"
    assert not term.holding


@given(st.lists(st.integers(min_value=0, max_value=600), max_size=30))
def test_any_split_shows_everything_once_and_finds_every_query(cuts: list[int]) -> None:
    data = (
        b"$ prompt\r\n"
        + VIM_START
        + b"".join(QUERIES)
        + b"\x1b[10;1Hline\x1b[K"
        + b"".join(NOT_QUERIES)
        + b"\x1b[?1049l$ "
    )
    term = TerminalState()
    shown = bytearray()
    stripped = bytearray()
    last = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out = term.feed(data[last:cut])
        last = cut
        shown += out
        stripped += strip_spans(out, term.queries)
    shown += term.flush()
    assert bytes(shown) == data
    assert bytes(stripped) == data.replace(b"".join(QUERIES), b"")
    assert not term.alternate and term.region == b"1;24"


def test_queries_without_anyone_to_answer_get_the_model_s_answer() -> None:
    term = TerminalState()
    term.feed(b"\x1b[c\x1b[5n\x1b[6n")
    assert term.answers == [b"\x1b[?62;22c", b"\x1b[0n"]  # no cursor to report


def test_a_line_can_be_written_again_only_if_it_stays_on_its_row() -> None:
    prompt = b"\x1b[?2004h\x1b]0;me@box: ~\x07\x1b[01;32mme@box\x1b[00m:~$ ls -l\x08\x08\x1b[K"
    assert line_redrawable(prompt, 80)
    assert line_redrawable(b"", 80)
    assert not line_redrawable(b"$ " + b"x" * 80, 80)  # wrapped onto a second row
    assert not line_redrawable(b"\x1b[5;1Hdrawn", 80)  # moves the cursor elsewhere
    assert not line_redrawable(b"\x1b7saved", 80)
    assert not line_redrawable(b"x" * 5000, 10_000)


def test_titles_saved_on_the_stack_are_restored_when_the_terminal_is_given_back() -> None:
    term = TerminalState()
    term.feed(VIM_START)  # vim saves the title (22;0;0t) as it starts
    term.feed(b"\x1b[22;2t\x1b]2;[upterm: a notice]\x07")  # and a notice saved it again
    assert term.title_pushes == 2
    assert term.restore().endswith(b"\x1b[23;0t\x1b[23;0t")
    term.feed(b"\x1b[22;0;0t" * 50)
    assert term.title_pushes == 10  # bounded, as the terminal's own stack
