"""Text from peers and relays, made safe to show (sans-I/O).

A refusal reason, a disconnect message, a joiner's client version or a relay's answer is
the other side's text: shown raw it could move the cursor, rewrite the screen or set the
terminal's title. Everything upterm shows or logs of it goes through :func:`printable`.
"""

from __future__ import annotations


def printable(text: str, limit: int = 200) -> str:
    """``text`` with every non-printable character (C0/C1 controls, ESC, DEL, line and
    paragraph separators) as ``?``, cut to ``limit`` characters."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
