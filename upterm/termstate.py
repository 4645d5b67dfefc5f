"""What a terminal was left in by the output it showed, and how to give it back (sans-I/O).

A program such as vim or less switches the terminal to the alternate screen and turns on
modes (mouse reporting, bracketed paste, application keys). When upterm stops showing that
program on a terminal (a detach, the session's end, a joiner removed), the terminal must be
brought back before upterm prints anything, or the user is left typing into vim's screen.
"""

from __future__ import annotations

import re

#: DEC private modes that put a terminal in the alternate screen.
_ALT_SCREEN_MODES = frozenset({b"1049", b"1047", b"47"})
_PRIVATE_MODE_RE = re.compile(rb"\x1b\[\?([0-9;]*)([hl])")
#: What a terminal needs when the program that set its modes is no longer shown on it
#: (a detach, the end of the session, a lost daemon): cursor shown, mouse reporting, focus
#: events and bracketed paste off, cursor and keypad keys normal, attributes reset, the scroll
#: region whole (DECSC/DECRC around it: setting it moves the cursor home). Each is harmless
#: when already so.
SANE_MODES = (
    b"\x1b[?25h\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1005l\x1b[?1006l\x1b[?1015l"
    b"\x1b[?1004l\x1b[?2004l\x1b[?1l\x1b>\x1b[0m\x1b7\x1b[r\x1b8"
)


class ScreenTracker:
    """Follows, from the output shown, whether the terminal is on the alternate screen.

    Sans-I/O and cheap (a C-speed regex over each chunk, with a short tail so a sequence
    split between chunks is still seen). Leaving the alternate screen is the one reset that
    must not be sent blindly: ``ESC[?1049l`` also restores a saved cursor position.
    """

    _TAIL_BYTES = 16

    def __init__(self) -> None:
        self.alternate = False
        self._tail = b""

    def feed(self, data: bytes) -> None:
        """Note what one chunk of output did."""
        if b"\x1b" not in data and not self._tail:
            return
        window = self._tail + data
        for match in _PRIVATE_MODE_RE.finditer(window):
            if any(mode in _ALT_SCREEN_MODES for mode in match.group(1).split(b";")):
                self.alternate = match.group(2) == b"h"
        # Keep what could be the start of a sequence cut at the chunk's end.
        cut = window.rfind(b"\x1b", max(0, len(window) - self._TAIL_BYTES))
        self._tail = window[cut:] if cut >= 0 and not _PRIVATE_MODE_RE.match(window, cut) else b""

    def restore_sequence(self) -> bytes:
        """What brings a terminal that showed this output back to a sane state."""
        return (b"\x1b[?1049l" if self.alternate else b"") + SANE_MODES

    def restore(self) -> bytes:
        """:meth:`restore_sequence`, for a terminal that is then given back (forgets it)."""
        sequence = self.restore_sequence()
        self.alternate = False
        return sequence
