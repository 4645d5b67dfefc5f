"""The terminal state a program's output leaves behind, and how to give or take it (sans-I/O).

A shared terminal is shown on several real terminals that arrive and leave at different
times. What a program set up long ago (the alternate screen, application cursor keys, mouse
reporting, a scroll region, a line-drawing character set, a title) is not in the recent
output a newcomer is replayed, and a terminal that stops showing the program must be given
back to its user. :class:`TerminalState` follows that state from the output, cheaply: it runs
on every byte a session prints, so it looks only at escape sequences, with one C-speed regex
that skips the common ones (colours, cursor moves) without a Python step.

It also finds the *queries* in the output (cursor position, device attributes, colours):
sent to every viewer, each would answer and the extra answers would become input, so the
session shows them to one viewer only. A sequence cut between two reads is held back until
its end arrives, so a query is never half-sent.
"""

from __future__ import annotations

import re

#: DEC private modes that put a terminal on the alternate screen.
ALT_SCREEN_MODES = frozenset({1049, 1047, 47})
#: DEC private modes a newcomer is given, with the value a terminal starts with: cursor keys,
#: reverse video, origin, autowrap, cursor blink and visibility, reverse wrap, keypad, mouse
#: modes and encodings, focus events, alternate scroll, bracketed paste.
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
#: ANSI modes a newcomer is given: insert (IRM) and newline (LNM).
ANSI_DEFAULTS: dict[int, bool] = {4: False, 20: False}
#: Longest title kept; longest control string (title, query) recognised.
MAX_TITLE = 256
#: Title stack depth followed (xterm's stack holds 10).
MAX_TITLE_PUSHES = 10
#: A sequence cut at the end of a read is held back at most this long (bytes).
MAX_HELD = 4096

#: Sequences that change what we track, or ask the terminal something. The final byte class
#: leaves out colours (m) and cursor moves (H, A-G...), so vim's output rarely stops the scan.
_SEQ = re.compile(
    rb"\x1b(?:"
    rb"\[([?>=<]?)([0-9;:]*)([ $!]?)([hlrnctpqwu])"  # 1 prefix, 2 params, 3 inter., 4 final
    rb"|\]([0-9]{1,4})(?:;([^\x07\x1b]{0,2048}))?(?:\x07|\x1b\\)"  # 5 number, 6 text
    rb"|P([+$]q[^\x07\x1b]{0,2048})(?:\x07|\x1b\\)"  # 7 DECRQSS / XTGETTCAP query
    rb"|([()*+])([ -/]?[0-~])"  # 8 G0-G3, 9 character set
    rb"|([=>c])"  # 10 keypad modes, full reset
    rb")"
)
#: Private modes alone (see TerminalState._scan).
_PRIVATE = re.compile(rb"\x1b\[\?([0-9;:]*)([ $!]?)([hlrnctpqwu])")
_DESIGNATION = re.compile(rb"\x1b([()*+])([ -/]?[0-~])")
_MARKS = bytes.maketrans(
    b"hlrnctpqwu]P=>c(?)*+HfdJ", b"\x01" * 15 + b"\x02\x03" + b"\x04" * 3 + b"\x05" * 4
)
_UNMARKED = b"[0123456789;:<$! "
#: A sequence starting at an ESC is complete (else, at the end of a read, it is held back).
_COMPLETE = re.compile(
    rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[\]P_^X][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]*[0-OQ-WYZ\\`a-~])"
)
#: Window operations that report something (size, position, title): XTWINOPS 11-21.
_REPORTING_WINOPS = frozenset({b"11", b"13", b"14", b"15", b"16", b"18", b"19", b"20", b"21"})

#: What a terminal needs when the program that set its modes is no longer shown on it: the
#: tracked modes at their start values, attributes and character sets reset, the scroll
#: region whole (DECSC/DECRC around it: setting it moves the cursor home).
SANE_MODES = (
    b"\x1b[?25h\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1005l\x1b[?1006l\x1b[?1015l"
    b"\x1b[?1016l\x1b[?1004l\x1b[?2004l\x1b[?1l\x1b[?66l\x1b>\x1b[?6l\x1b[?7h\x1b[4l"
    b"\x1b[0m\x1b(B\x0f\x1b7\x1b[r\x1b8"
)
#: Device attributes the session gives when no viewer can answer: a VT220 with colour.
MODEL_DA1 = b"\x1b[?62;22c"
#: Device status: "OK".
MODEL_DSR = b"\x1b[0n"


class TerminalState:
    """What a program's output has set on its terminal, followed chunk by chunk.

    :meth:`feed` takes each read of output and returns what may be shown now (a sequence cut
    at the end of the read is held until the rest arrives, or :meth:`flush`). After each call,
    :attr:`queries` lists the spans of terminal queries in what it returned, :attr:`switches`
    where the alternate screen was entered (True) or left (False), and :attr:`answers`
    answers the session may give when no viewer can (device attributes and status).
    """

    def __init__(self) -> None:
        self.alternate = False
        self.private = dict(PRIVATE_DEFAULTS)
        self.ansi = dict(ANSI_DEFAULTS)
        self.keypad = False
        #: Scroll region as its DECSTBM parameters ("top;bottom"); None: the whole screen.
        self.region: bytes | None = None
        #: Designated character sets: G0-G3 by their ESC intermediate byte.
        self.charsets: dict[int, bytes] = {}
        #: Shifted out (SO): G1 is in use.
        self.shifted = False
        self.title: bytes | None = None
        #: Titles saved on the terminal's title stack and not restored yet (vim saves the
        #: title when it starts; upterm saves it while a notice shows in it).
        self.title_pushes = 0
        self.cursor_style: bytes | None = None
        self.queries: list[tuple[int, int]] = []
        self.switches: list[tuple[int, int, bool]] = []
        self.answers: list[bytes] = []
        #: Whether the last read addressed the cursor absolutely or erased the display.
        self.addressed = False
        self._held = b""

    # -- following output --

    def feed(self, data: bytes) -> bytes:
        """Follow one read of output; return the bytes that may be shown now.

        :attr:`switches` holds (start, end, entered) of each sequence that switched screens.
        """
        if self.queries:
            self.queries = []
        if self.switches:
            self.switches = []
        if self.answers:
            self.answers = []
        self.addressed = False
        if self._held:
            data, self._held = self._held + data, b""
        elif b"\x1b" not in data:
            if b"\x0e" in data or b"\x0f" in data:
                self._note_shift(data)
            return data
        end = len(data)
        low = max(0, end - MAX_HELD)
        cut = data.rfind(b"\x1b", low)
        if cut >= 0 and _COMPLETE.match(data, cut) is None:
            # A lone ESC may be the first half of the terminator of a string (title,
            # query) that began at the ESC before it: hold from there.
            start = data.rfind(b"\x1b", low, cut)
            if (
                cut == end - 1
                and start >= 0
                and data[start + 1 : start + 2] in (b"]", b"P", b"_", b"^", b"X")
                and b"\x07" not in data[start:cut]
            ):
                cut = start
            self._held = data[cut:]
            end = cut
        view = data if end == len(data) else data[:end]
        self._scan(view)
        if b"\x0e" in view or b"\x0f" in view:
            self._note_shift(view)
        return view

    def _scan(self, view: bytes) -> None:
        """Follow the changes in ``view``, doing as little as its content allows.

        One C-speed translation marks what a read contains: parameters and ``[`` deleted,
        each final byte we follow made \\x01 (a sequence we follow becomes ESC \\x01), ``?``
        \\x03 (private modes), ``(`` \\x02 and ``)*+`` \\x04 (character sets), and the
        finals of cursor addressing and display erasing \\x05. Colours and
        cursor moves (most of a full-screen program's output) then cost a substring search.
        Private modes and character sets (vim's cursor hiding at each repaint, ncurses'
        ``ESC(B`` at each colour reset) have their own fast paths; anything else takes one
        ordered pass over the read.
        """
        marks = view.translate(_MARKS, _UNMARKED)
        # Cursor addressing or erasing the display (CUP, HVP, VPA, ED): a full-screen
        # program drawing on the normal screen (top), where a notice would land anywhere.
        self.addressed = b"\x1b\x05" in marks
        if b"\x1b\x01" in marks:
            for match in _SEQ.finditer(view):
                self._note(match)
            return
        if b"\x1b\x03" in marks:
            for match in _PRIVATE.finditer(view):
                self._csi(match, b"?", match.group(1), match.group(2), match.group(3))
        if b"\x1b\x02" in marks:
            self._last_designation(view, ord("("))
        if b"\x1b\x04" in marks:
            for slot in b")*+":
                self._last_designation(view, slot)

    def _last_designation(self, view: bytes, slot: int) -> None:
        at = view.rfind(b"\x1b" + bytes((slot,)))
        match = _DESIGNATION.match(view, at) if at >= 0 else None
        if match is not None:
            self.charsets[slot] = match.group(2)

    @property
    def holding(self) -> bool:
        """Whether the end of the last read is held back (an unfinished sequence)."""
        return bool(self._held)

    def flush(self) -> bytes:
        """What is held back, given up waiting for the rest of its sequence."""
        held, self._held = self._held, b""
        self.queries, self.switches, self.answers = [], [], []
        return held

    def _note_shift(self, data: bytes) -> None:
        self.shifted = data.rfind(b"\x0e") > data.rfind(b"\x0f")

    def _note(self, match: re.Match[bytes]) -> None:
        final = match.group(4)
        if final is not None:
            self._csi(match, match.group(1), match.group(2), match.group(3), final)
        elif match.group(5) is not None:
            self._osc(match, match.group(5), match.group(6))
        elif match.group(7) is not None:
            self.queries.append(match.span())
        elif match.group(8) is not None:
            self.charsets[match.group(8)[0]] = match.group(9)
        else:
            op = match.group(10)
            if op == b"c":
                self.reset(match)
            else:
                self.keypad = op == b"="

    def _csi(
        self, match: re.Match[bytes], prefix: bytes, params: bytes, inter: bytes, final: bytes
    ) -> None:
        if final in b"hl" and not inter:
            on = final == b"h"
            if prefix == b"?":
                for param in params.split(b";"):
                    if param.isdigit():
                        self._set_private(int(param), on, match)
            elif not prefix:
                for param in params.split(b";"):
                    if param.isdigit() and int(param) in self.ansi:
                        self.ansi[int(param)] = on
        elif final == b"r":
            if not prefix and not inter:
                self.region = params or None
        elif final == b"n":
            if prefix in (b"", b"?") and not inter and params:
                self.queries.append(match.span())
                if params == b"5" and not prefix:
                    self.answers.append(MODEL_DSR)
        elif final == b"c":
            if not inter and params in (b"", b"0"):
                self.queries.append(match.span())
                if not prefix:
                    self.answers.append(MODEL_DA1)
        elif final == b"p":
            if inter == b"$":
                self.queries.append(match.span())  # DECRQM: is this mode set?
            elif inter == b"!" and not params:
                self.soft_reset()
        elif final == b"q":
            if inter == b" " and not prefix:
                self.cursor_style = params
            elif prefix == b">" and not inter:
                self.queries.append(match.span())  # XTVERSION
        elif final == b"t":
            operation = params.split(b";", 1)[0]
            if prefix or inter:
                pass
            elif operation in _REPORTING_WINOPS:
                self.queries.append(match.span())
            elif operation == b"22":  # the title saved on the terminal's stack
                self.title_pushes = min(self.title_pushes + 1, MAX_TITLE_PUSHES)
            elif operation == b"23":
                self.title_pushes = max(self.title_pushes - 1, 0)
        elif final == b"u":
            if prefix == b"?" and not inter:
                self.queries.append(match.span())  # kitty keyboard flags
            elif inter == b"$":
                self.queries.append(match.span())  # DECRQTSR
        elif final == b"w" and inter == b"$":
            self.queries.append(match.span())  # DECRQPSR

    def _set_private(self, mode: int, on: bool, match: re.Match[bytes]) -> None:
        if mode in ALT_SCREEN_MODES:
            if on != self.alternate:
                self.alternate = on
                self.switches.append((match.start(), match.end(), on))
        elif mode in self.private:
            self.private[mode] = on

    def _osc(self, match: re.Match[bytes], number: bytes, text: bytes | None) -> None:
        if text is not None and b"?" in text.split(b";"):
            self.queries.append(match.span())  # a colour or clipboard query
        elif number in (b"0", b"2") and text is not None:
            self.title = text[:MAX_TITLE]

    def region_whole(self, rows: int) -> bool:
        """Whether the scroll region is the whole screen of ``rows`` rows (vim leaves one
        set to all rows when it exits)."""
        if self.region is None:
            return True
        top, _, bottom = self.region.partition(b";")
        return top in (b"", b"0", b"1") and (not bottom.isdigit() or int(bottom) >= rows)

    def soft_reset(self) -> None:
        """DECSTR: modes, keypad, character sets and scroll region back to their start."""
        self.private = dict(PRIVATE_DEFAULTS)
        self.ansi = dict(ANSI_DEFAULTS)
        self.keypad = False
        self.region = None
        self.charsets = {}
        self.shifted = False

    def reset(self, match: re.Match[bytes] | None = None) -> None:
        """RIS: everything a terminal starts with (``match``: where, in the last read)."""
        self.soft_reset()
        self.title = None
        self.title_pushes = 0
        self.cursor_style = None
        if self.alternate:
            self.alternate = False
            if match is not None:
                self.switches.append((match.start(), match.end(), False))

    def resized(self) -> None:
        """The terminal changed size: like xterm, the scroll region is whole again."""
        self.region = None

    # -- giving it --

    def modes_sequence(self) -> bytes:
        """Bytes that set every tracked mode, keypad, character set and scroll region of a
        terminal (on whatever screen it shows) to what the program has set."""
        out = bytearray()
        for mode, on in self.private.items():
            if mode == 6 and not on:
                # Setting or resetting origin mode moves the cursor home: left as the clean
                # screen before the replay set it (and the replay itself changed it).
                continue
            out += b"\x1b[?%d%c" % (mode, 104 if on else 108)
        for mode, on in self.ansi.items():
            out += b"\x1b[%d%c" % (mode, 104 if on else 108)
        out += b"\x1b=" if self.keypad else b"\x1b>"
        for slot, charset in self.charsets.items():
            out += b"\x1b%c%s" % (slot, charset)
        out += b"\x0e" if self.shifted else b"\x0f"
        out += b"\x1b7\x1b[" + (self.region or b"") + b"r\x1b8"
        if self.cursor_style is not None:
            out += b"\x1b[" + self.cursor_style + b" q"
        if self.title is not None:
            out += b"\x1b]2;" + self.title + b"\x07"
        return bytes(out)

    def restore_sequence(self) -> bytes:
        """What brings a terminal that showed this output back to a sane state (with the
        title it had, where the terminal keeps a title stack)."""
        return (
            (b"\x1b[?1049l" if self.alternate else b"")
            + SANE_MODES
            + b"\x1b[23;0t" * self.title_pushes
        )

    def restore(self) -> bytes:
        """:meth:`restore_sequence`, for a terminal that is then given back (forgets it)."""
        sequence = self.restore_sequence()
        self.alternate = False
        self.title_pushes = 0
        return sequence


def addresses_cursor(data: bytes) -> bool:
    """Whether output addresses the cursor absolutely or erases the display (as
    :attr:`TerminalState.addressed`, for a piece of a read)."""
    return b"\x1b" in data and b"\x1b\x05" in data.translate(_MARKS, _UNMARKED)


def strip_spans(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    """``data`` without the byte ranges in ``spans`` (sorted, not overlapping)."""
    pieces = []
    start = 0
    for begin, end in spans:
        pieces.append(data[start:begin])
        start = end
    pieces.append(data[start:])
    return b"".join(pieces)


#: Sequences that stay on the line they are written on (colours, erase and move within the
#: line, mode changes such as bash's bracketed paste at each prompt, character sets as in
#: ``tput sgr0``, titles and the title stack, which vim and less use as they exit): a line
#: made of these can be written again lower down.
_LINE_LOCAL = re.compile(
    rb"\x1b\[[0-9;:]*[mKCDGPX@]|\x1b\[\?[0-9;]*[hl]|\x1b\[>[0-9;]*m|\x1b\[2[23](?:;[0-9]*)*t"
    rb"|\x1b[()*+][0-~]|\x1b[=>]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|[\x20-\x7e\x80-\xff\b\t\r]+"
)
#: Longest current line kept for redrawing.
MAX_LINE = 2048


def line_redrawable(line: bytes, cols: int) -> bool:
    """Whether the bytes written since the last newline can be written again on the next
    row and show the same thing: only line-local sequences, and narrower than the screen
    (so the line has not wrapped)."""
    if len(line) >= MAX_LINE:
        return False
    pos = 0
    for match in _LINE_LOCAL.finditer(line):
        if match.start() != pos:
            return False
        pos = match.end()
    if pos != len(line):
        return False
    text = re.sub(rb"\x1b[^\x07a-zA-Z@]*[\x07a-zA-Z@]", b"", line)
    return all(len(part) < cols for part in text.split(b"\r"))


class ScreenTracker(TerminalState):
    """The state of a terminal that shows a session (the host's own, in the client)."""
