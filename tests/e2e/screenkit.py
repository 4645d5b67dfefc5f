"""A terminal model for comparing what several real terminals show, cell by cell.

Stock pyte is a good cell grid but not a terminal a session can be compared on: it has no
alternate screen (``ESC[?1049h`` is remembered as a mode and changes nothing), it reads
``ESC[>4;2m`` as underline + faint and draws the text of DCS strings, it mistakes
``ESC]11;?`` for a title, and it knows nothing of window operations, keypad mode, mouse
modes or scroll (SU/SD), repeat (REP) and back-tab sequences that ncurses programs emit.

:class:`Terminal` puts a tokenizer in front of pyte: every escape sequence is recognised
whole (held back while cut between two reads), those pyte gets wrong are handled here, and
the rest is fed to pyte. On top of pyte it keeps an alternate screen (1049, 1047, 47) with
xterm's semantics, the modes a shared terminal must carry (cursor keys, mouse, bracketed
paste, keypad, scroll region, title and its stack, cursor style, character sets), and it
*answers queries* as a real terminal does (cursor position, device attributes, status,
colours, mode and setting requests), through a callback.

:class:`ModelClient` is a :class:`~tests.conftest.PtyClient` with this model: its answers
are written to the PTY master, so the program on the other side gets them as it would from
a person's terminal.

:func:`compare` gives a readable diff of two models (cells, cursor, modes), empty when the
same.
"""

from __future__ import annotations

import codecs
import copy
import os
import re
from collections import defaultdict
from collections.abc import Callable

import pyte
from pyte import modes as mo
from pyte.screens import Char, Margins, StaticDefaultDict

from tests.conftest import PtyClient

#: DEC private modes compared between terminals, with their power-on values (those a
#: session carries to newcomers: cursor keys, origin, autowrap, cursor blink and
#: visibility, mouse reporting and encodings, focus events, bracketed paste...).
PRIVATE_DEFAULTS: dict[int, bool] = {
    1: False,
    5: False,
    6: False,
    7: True,
    12: False,
    25: True,
    45: False,
    66: False,
    1000: False,
    1001: False,
    1002: False,
    1003: False,
    1004: False,
    1005: False,
    1006: False,
    1007: False,
    1015: False,
    1016: False,
    2004: False,
}
MOUSE_MODES = (1000, 1001, 1002, 1003, 1005, 1006, 1015, 1016)
ALT_MODES = (1049, 1047, 47)

#: Answers of the modelled terminal (an xterm-like VT220 with colour).
DA1_ANSWER = "\x1b[?62;22c"
DA2_ANSWER = "\x1b[>1;10;0c"
FG_COLOUR = "rgb:ffff/ffff/ffff"
BG_COLOUR = "rgb:0000/0000/0000"

_SEQ = re.compile(
    r"\x1b\[(?P<cp>[0-?]*)(?P<ci>[ -/]*)(?P<cf>[@-~])"
    r"|\x1b\](?P<osc>[^\x07\x1b]*)(?P<ost>\x07|\x1b\\)"
    r"|\x1b(?P<sk>[P_^X])(?P<str>[^\x1b]*)\x1b\\"
    r"|\x1b(?P<ei>[ -/]*)(?P<ef>[0-OQ-WYZ\\`a-~])",
    re.S,
)
#: The start of an escape sequence whose end has not come yet.
_PARTIAL = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?|[P_^X][^\x1b]*\x1b?|[ -/]*)\Z", re.S
)
#: Longest escape sequence held back waiting for its end.
MAX_HELD = 8192


class ModelScreen(pyte.Screen):
    """pyte's screen plus xterm's alternate screen and single-slot saved cursor."""

    def __init__(self, columns: int, lines: int) -> None:
        self.alternate = False
        self._other: dict | None = None  # the screen not shown (normal, while on alt)
        self._other_saved: list = []
        self._saved_1049 = None
        super().__init__(columns, lines)

    def _new_buffer(self) -> defaultdict:
        return defaultdict(lambda: StaticDefaultDict[int, Char](self.default_char))

    # xterm keeps one saved cursor per screen; DECRC does not use it up.
    def save_cursor(self) -> None:
        super().save_cursor()
        self.savepoints[:] = self.savepoints[-1:]

    def restore_cursor(self) -> None:
        keep, hidden = list(self.savepoints), self.cursor.hidden
        super().restore_cursor()
        self.savepoints[:] = keep
        self.cursor.hidden = hidden  # visibility is a mode, not saved with the cursor

    def reset(self) -> None:
        super().reset()
        self.alternate = False
        self._other = None
        self._other_saved = []
        self._saved_1049 = None

    def switch_screen(self, to_alternate: bool, mode: int) -> None:
        """Private mode 1049, 1047 or 47 set (``to_alternate``) or reset."""
        if to_alternate == self.alternate:
            return
        if to_alternate and mode == 1049:
            self._saved_1049 = (copy.copy(self.cursor), self.g0_charset, self.g1_charset)
        if not to_alternate and mode == 1047:
            self.erase_in_display(2)  # 1047 clears the alternate screen as it leaves
        normal_or_alt = self._other or self._new_buffer()
        self._other, self.buffer = self.buffer, normal_or_alt
        self._other_saved, self.savepoints = self.savepoints, self._other_saved
        self.alternate = to_alternate
        if to_alternate and mode == 1049:
            self.buffer.clear()  # 1049 starts on a clear alternate screen
        if not to_alternate and mode == 1049 and self._saved_1049 is not None:
            cursor, self.g0_charset, self.g1_charset = self._saved_1049
            hidden = self.cursor.hidden
            self.cursor = copy.copy(cursor)
            self.cursor.hidden = hidden
            self.ensure_hbounds()
            self.ensure_vbounds()
        self.dirty.update(range(self.lines))

    def resize(self, lines: int | None = None, columns: int | None = None) -> None:
        lines = lines or self.lines
        columns = columns or self.columns
        if self._other is not None and (lines, columns) != (self.lines, self.columns):
            # The screen not shown changes size as pyte changes the shown one: rows dropped
            # from the top, columns from the right.
            drop = max(0, self.lines - lines)
            other = self._new_buffer()
            for y, line in self._other.items():
                if y - drop >= 0 and y - drop < lines:
                    new = other[y - drop]
                    for x, char in line.items():
                        if x < columns:
                            new[x] = char
            self._other = other
        super().resize(lines, columns)

    def cell(self, x: int, y: int) -> Char:
        return self.buffer[y][x]


class Terminal:
    """A terminal of ``cols`` x ``rows``: feed it bytes as a program's output.

    ``answer`` gets what the terminal sends back (answers to queries), as bytes.
    """

    def __init__(self, cols: int, rows: int, answer: Callable[[bytes], None] | None = None):
        self.screen = ModelScreen(cols, rows)
        self._pyte = pyte.Stream(self.screen)
        self._pyte.use_utf8 = False  # honour ESC ( 0 line drawing, as xterm does
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._answer = answer or (lambda data: None)
        self.private = dict(PRIVATE_DEFAULTS)
        self.ansi = {4: False, 20: False}
        self.keypad = False
        self.title = ""
        self.title_stack: list[str] = []
        self.cursor_style = ""
        self.charsets = {"(": "B", ")": "B", "*": "B", "+": "B"}
        self.shifted = False
        self._last_char = " "
        #: Every query this terminal was sent (the sequence, as text), and its answers.
        self.queries: list[str] = []
        self.answers: list[bytes] = []

    # -- input --

    def feed(self, data: bytes) -> None:
        text = self._pending + self._decoder.decode(data)
        self._pending = ""
        pos = 0
        for match in _SEQ.finditer(text):
            if match.start() > pos:
                self._text(text[pos : match.start()])
            pos = match.end()
            self._sequence(match)
        rest = text[pos:]
        esc = rest.find("\x1b", max(0, len(rest) - MAX_HELD))
        while esc >= 0:
            # An escape sequence not finished yet: held until its end comes.
            if _PARTIAL.match(rest, esc):
                self._pending = rest[esc:]
                rest = rest[:esc]
                break
            esc = rest.find("\x1b", esc + 1)
        if rest:
            self._text(rest)

    def _text(self, text: str) -> None:
        # An ESC left here starts no sequence we know: drop it, as xterm would its sequence.
        text = text.replace("\x1b", "")
        if "\x0e" in text or "\x0f" in text:
            self.shifted = text.rfind("\x0e") > text.rfind("\x0f")
        if text:
            self._pyte.feed(text)
            printable = [c for c in text if c >= " " and c != "\x7f"]
            if printable:
                self._last_char = printable[-1]

    def _reply(self, text: str) -> None:
        data = text.encode()
        self.answers.append(data)
        self._answer(data)

    # -- sequences --

    def _sequence(self, m: re.Match[str]) -> None:
        if m.group("cf") is not None:
            self._csi(m.group(0), m.group("cp"), m.group("ci"), m.group("cf"))
        elif m.group("osc") is not None:
            self._osc(m.group("osc"), m.group("ost"))
        elif m.group("sk") is not None:
            self._string(m.group(0), m.group("sk"), m.group("str"))
        else:
            self._esc(m.group(0), m.group("ei"), m.group("ef"))

    def _esc(self, raw: str, inter: str, final: str) -> None:
        if inter in ("(", ")", "*", "+"):
            self.charsets[inter] = final
            if inter in "()":
                self.screen.define_charset(final, inter)
        elif inter:
            if inter == "#":
                self._pyte.feed(raw)
        elif final == "=":
            self.keypad = True
        elif final == ">":
            self.keypad = False
        elif final == "c":
            self.full_reset()
        elif final in "78DEHM":
            self._pyte.feed(raw)

    def full_reset(self) -> None:
        self.screen.reset()
        self.private = dict(PRIVATE_DEFAULTS)
        self.ansi = {4: False, 20: False}
        self.keypad = False
        self.title = ""
        self.title_stack = []
        self.cursor_style = ""
        self.charsets = {"(": "B", ")": "B", "*": "B", "+": "B"}
        self.shifted = False

    def soft_reset(self) -> None:
        """DECSTR."""
        screen = self.screen
        for mode, on in PRIVATE_DEFAULTS.items():
            self.private[mode] = on
        self.ansi = {4: False, 20: False}
        screen.mode.discard(mo.DECOM)
        screen.mode.discard(mo.IRM)
        screen.mode.add(mo.DECAWM)
        screen.mode.add(mo.DECTCEM)
        screen.cursor.hidden = False
        screen.margins = None
        screen.cursor.attrs = screen.default_char
        screen.charset = 0
        self.keypad = False
        self.shifted = False

    def _csi(self, raw: str, params: str, inter: str, final: str) -> None:
        prefix = ""
        if params[:1] in ("?", ">", "<", "="):
            prefix, params = params[0], params[1:]
        numbers = [int(p) if p.isdigit() else 0 for p in params.split(";")] if params else []
        first = numbers[0] if numbers else 0
        screen = self.screen
        if inter:
            if inter == " " and final == "q" and not prefix:
                self.cursor_style = params
            elif inter == "!" and final == "p":
                self.soft_reset()
            elif inter == "$" and final == "p":
                self.queries.append(raw)
                self._report_mode(first, prefix == "?")
            return
        if prefix == "?":
            if final in "hl":
                self._private_modes(numbers, final == "h")
            elif final == "n":
                self.queries.append(raw)
                if first == 6:
                    y, x = self._cursor_report()
                    self._reply(f"\x1b[?{y};{x};1R")
            elif final in "JK":
                self._pyte.feed(raw)
            return
        if prefix == ">":
            if final == "c":
                self.queries.append(raw)
                self._reply(DA2_ANSWER)
            elif final == "q":
                self.queries.append(raw)  # XTVERSION: not answered, like many terminals
            return
        if prefix:
            if final == "c":
                self.queries.append(raw)  # DA3: not answered
            return
        if final == "c":
            if first == 0:
                self.queries.append(raw)
                self._reply(DA1_ANSWER)
        elif final == "n":
            self.queries.append(raw)
            if first == 5:
                self._reply("\x1b[0n")
            elif first == 6:
                y, x = self._cursor_report()
                self._reply(f"\x1b[{y};{x}R")
        elif final == "t":
            self._window_op(raw, numbers)
        elif final in "hl":
            for mode in numbers:
                if mode in self.ansi:
                    self.ansi[mode] = final == "h"
            self._pyte.feed(raw)
        elif final == "s" and not params:
            screen.save_cursor()
        elif final == "u" and not params:
            screen.restore_cursor()
        elif final in "ST":
            self._scroll(max(first, 1), up=final == "S")
        elif final == "b":
            self._text(self._last_char * max(first, 1))
        elif final == "Z":
            for _ in range(max(first, 1)):
                stops = [t for t in screen.tabstops if t < screen.cursor.x]
                screen.cursor.x = max(stops) if stops else 0
        elif final == "I":
            for _ in range(max(first, 1)):
                screen.tab()
        elif final == "m":
            self._pyte.feed(raw.replace(":", ";"))
        elif final == "q":
            pass  # DECLL (keyboard LEDs)
        else:
            self._pyte.feed(raw)

    def _private_modes(self, numbers: list[int], on: bool) -> None:
        screen = self.screen
        rest = []
        for mode in numbers:
            if mode in ALT_MODES:
                screen.switch_screen(on, mode)
                continue
            if mode in self.private:
                self.private[mode] = on
            rest.append(mode)
        if rest:
            (screen.set_mode if on else screen.reset_mode)(*rest, private=True)

    def _cursor_report(self) -> tuple[int, int]:
        screen = self.screen
        y, x = screen.cursor.y + 1, min(screen.cursor.x, screen.columns - 1) + 1
        if mo.DECOM in screen.mode and screen.margins is not None:
            y -= screen.margins.top
        return y, x

    def _report_mode(self, mode: int, private: bool) -> None:
        if private:
            if mode in ALT_MODES:
                value = 1 if self.screen.alternate else 2
            elif mode in self.private:
                value = 1 if self.private[mode] else 2
            else:
                value = 0
            self._reply(f"\x1b[?{mode};{value}$y")
        else:
            value = (1 if self.ansi[mode] else 2) if mode in self.ansi else 0
            self._reply(f"\x1b[{mode};{value}$y")

    def _window_op(self, raw: str, numbers: list[int]) -> None:
        op = numbers[0] if numbers else 0
        which = numbers[1] if len(numbers) > 1 else 0
        screen = self.screen
        if op == 22 and which in (0, 2):
            self.title_stack.append(self.title)
            del self.title_stack[:-10]  # xterm keeps 10
        elif op == 23 and which in (0, 2):
            if self.title_stack:
                self.title = self.title_stack.pop()
        elif op == 18:
            self.queries.append(raw)
            self._reply(f"\x1b[8;{screen.lines};{screen.columns}t")
        elif op == 19:
            self.queries.append(raw)
            self._reply(f"\x1b[9;{screen.lines};{screen.columns}t")
        elif op == 14:
            self.queries.append(raw)
            self._reply(f"\x1b[4;{screen.lines * 16};{screen.columns * 8}t")
        elif op == 16:
            self.queries.append(raw)
            self._reply("\x1b[6;16;8t")
        elif op == 11:
            self.queries.append(raw)
            self._reply("\x1b[1t")
        elif op == 13:
            self.queries.append(raw)
            self._reply("\x1b[3;0;0t")
        elif op in (20, 21):
            self.queries.append(raw)  # title reports: off in xterm by default

    def _scroll(self, count: int, up: bool) -> None:
        screen = self.screen
        top, bottom = screen.margins or Margins(0, screen.lines - 1)
        saved = copy.copy(screen.cursor)
        for _ in range(min(count, screen.lines)):
            screen.cursor.y = bottom if up else top
            screen.index() if up else screen.reverse_index()
        screen.cursor = saved

    def _osc(self, body: str, terminator: str) -> None:
        number, _, text = body.partition(";")
        parts = text.split(";")
        if "?" in parts:
            self.queries.append("\x1b]" + body)
            if number == "10":
                self._reply(f"\x1b]10;{FG_COLOUR}{terminator}")
            elif number in ("11", "12"):
                colour = BG_COLOUR if number == "11" else FG_COLOUR
                self._reply(f"\x1b]{number};{colour}{terminator}")
            elif number == "4":
                for i in range(0, len(parts) - 1, 2):
                    if parts[i + 1] == "?":
                        self._reply(f"\x1b]4;{parts[i]};{BG_COLOUR}{terminator}")
            return
        if number in ("0", "2"):
            self.title = text
            self.screen.title = text

    def _string(self, raw: str, kind: str, body: str) -> None:
        if kind != "P":
            return  # APC, PM, SOS: ignored
        if body.startswith("$q"):
            self.queries.append(raw)
            setting = body[2:]
            screen = self.screen
            if setting == "m":
                self._reply("\x1bP1$r0m\x1b\\")
            elif setting == " q":
                self._reply(f"\x1bP1$r{self.cursor_style or '1'} q\x1b\\")
            elif setting == "r":
                top, bottom = screen.margins or Margins(0, screen.lines - 1)
                self._reply(f"\x1bP1$r{top + 1};{bottom + 1}r\x1b\\")
            else:
                self._reply("\x1bP0$r\x1b\\")
        elif body.startswith("+q"):
            self.queries.append(raw)
            self._reply(f"\x1bP0+r{body[2:]}\x1b\\")

    def snapshot(self) -> Terminal:
        """A copy of this terminal as it is now (it answers nothing)."""
        keep = self._pyte, self._answer, self._decoder
        self._pyte = self._answer = self._decoder = None  # type: ignore[assignment]
        try:
            copied = copy.deepcopy(self)
        finally:
            self._pyte, self._answer, self._decoder = keep
        copied._pyte = pyte.Stream(copied.screen)
        copied._pyte.use_utf8 = False
        copied._answer = lambda data: None
        copied._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return copied

    # -- state --

    def modes(self) -> dict[str, object]:
        """Everything compared besides the cells and the cursor."""
        screen = self.screen
        margins = screen.margins
        if margins is not None and tuple(margins) == (0, screen.lines - 1):
            margins = None
        return {
            "alternate screen": screen.alternate,
            **{f"?{mode}": on for mode, on in self.private.items()},
            **{f"ansi {mode}": on for mode, on in self.ansi.items()},
            "keypad": self.keypad,
            "scroll region": None if margins is None else (margins.top + 1, margins.bottom + 1),
            "title": self.title,
            "cursor style": self.cursor_style,
            "charsets": dict(self.charsets),
            "shifted out": self.shifted,
        }

    @property
    def cursor(self) -> tuple[int, int, bool]:
        """(column, row, visible), 0-based."""
        c = self.screen.cursor
        return c.x, c.y, not c.hidden

    def display(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def mouse_on(self) -> bool:
        return any(self.private[m] for m in (1000, 1001, 1002, 1003))


def _visible(char: Char) -> tuple:
    """What can be seen of a cell: a blank shows only its background (and reverse video);
    what pyte copies into blanks from the cursor's attributes when erasing (bold, a
    foreground colour), xterm does not keep and nobody sees."""
    if char.data in (" ", ""):
        return (char.data, char.bg, char.reverse)
    return tuple(char)


def compare(
    a: Terminal,
    b: Terminal,
    names: tuple[str, str] = ("a", "b"),
    cols: int | None = None,
    rows: int | None = None,
    cursor: bool = True,
    modes: bool = True,
    ignore_modes: tuple[str, ...] = (),
) -> str:
    """How two terminals differ (empty string: they show the same).

    Cells (character and visible attributes) of the top-left ``cols`` x ``rows`` (default:
    the whole screen; terminals of different sizes need the region given), the cursor, and
    the modes of :meth:`Terminal.modes`.
    """
    sa, sb = a.screen, b.screen
    if cols is None or rows is None:
        if (sa.columns, sa.lines) != (sb.columns, sb.lines):
            return f"sizes differ: {sa.columns}x{sa.lines} vs {sb.columns}x{sb.lines}"
        cols, rows = sa.columns, sa.lines
    assert cols <= min(sa.columns, sb.columns) and rows <= min(sa.lines, sb.lines)
    out: list[str] = []
    na, nb = names
    width = max(len(na), len(nb))
    bad_rows = []
    for y in range(rows):
        diff_x = [x for x in range(cols) if _visible(sa.buffer[y][x]) != _visible(sb.buffer[y][x])]
        if diff_x:
            bad_rows.append((y, diff_x))
    for y, diff_x in bad_rows[:12]:
        la = "".join(sa.buffer[y][x].data or " " for x in range(cols)).rstrip()
        lb = "".join(sb.buffer[y][x].data or " " for x in range(cols)).rstrip()
        out.append(f"row {y}: {len(diff_x)} cells differ from column {diff_x[0]}")
        out.append(f"  {na:>{width}}: {la!r}")
        out.append(f"  {nb:>{width}}: {lb!r}")
        if la == lb:
            x = diff_x[0]
            out.append(f"  cell {x}: {sa.buffer[y][x]} vs {sb.buffer[y][x]}")
    if len(bad_rows) > 12:
        out.append(f"... and {len(bad_rows) - 12} more rows differ")
    if cursor and a.cursor != b.cursor:
        out.append(f"cursor (x, y, visible): {na} {a.cursor} vs {nb} {b.cursor}")
    if modes:
        ma, mb = a.modes(), b.modes()
        for key in ma:
            if key not in ignore_modes and ma[key] != mb[key]:
                out.append(f"mode {key}: {na} {ma[key]!r} vs {nb} {mb[key]!r}")
    if out:
        out.append(f"--- {na} screen:")
        out.extend(f"  |{line}" for line in a.display()[:rows])
        out.append(f"--- {nb} screen:")
        out.extend(f"  |{line}" for line in b.display()[:rows])
    return "\n".join(out)


class ModelClient(PtyClient):
    """A program on a real PTY whose terminal is a :class:`Terminal`: it answers queries
    the program sends (through the PTY master), as a person's terminal does."""

    def __init__(self, argv: list[str], env: dict[str, str], cols: int = 80, rows: int = 24):
        super().__init__(argv, env, cols, rows)
        self.term = Terminal(cols, rows, answer=self._answer)
        self.screen = self.term.screen
        self._stream = self.term

    def _answer(self, data: bytes) -> None:
        try:
            os.write(self.master, data)
        except OSError:
            pass  # the program is gone

    def display(self) -> list[str]:
        return self.term.display()
