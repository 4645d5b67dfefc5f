"""A joiner's own escapes: ``~:`` opens upterm's prompt on that joiner's terminal (sans-I/O).

At the start of a line, ``~:`` opens a one-line prompt seen only by that joiner; what it
types there goes nowhere else, Enter runs it (``help``, ``who``; a moderator also ``kick``,
``role``, ``end``), Ctrl-C or Escape closes it. ``~?`` shows the help at once (OpenSSH keeps
``~?`` for its own help: type ``~~?``, or use ``~:`` then ``help``). A ``~`` followed by
anything else goes to the terminal as typed.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The longest command line kept (more is dropped).
MAX_COMMAND = 200


@dataclass(frozen=True)
class Escape:
    """What a joiner's keystrokes asked for besides the terminal: ``open`` (the prompt
    opened), ``echo`` (show ``text`` on the prompt), ``run`` (the command ``text``),
    ``cancel`` (the prompt closed) or ``help``."""

    kind: str
    text: str = ""


class JoinerEscapes:
    """Splits a joiner's keystrokes into what goes to the terminal and its escapes."""

    def __init__(self) -> None:
        self._line_start = True
        self._tilde = False
        self._prompt: bytearray | None = None

    @property
    def prompting(self) -> bool:
        """Whether the prompt is open (keystrokes go to it)."""
        return self._prompt is not None

    def feed(self, data: bytes) -> tuple[bytes, list[Escape]]:
        """The bytes for the terminal, and the escapes, in order."""
        if self._prompt is None and not self._tilde and b"~" not in data:
            # Every keystroke comes this way: no per-byte loop unless there is a tilde.
            if data:
                self._line_start = data[-1:] in (b"\r", b"\n")
            return data, []
        out = bytearray()
        events: list[Escape] = []
        for byte in data:
            ch = bytes((byte,))
            if self._prompt is not None:
                self._prompt_key(ch, events)
                continue
            if self._tilde:
                self._tilde = False
                if ch == b":":
                    self._prompt = bytearray()
                    events.append(Escape("open"))
                    continue
                if ch == b"?":
                    events.append(Escape("help"))
                    self._line_start = True
                    continue
                out += b"~" if ch == b"~" else b"~" + ch
            elif self._line_start and ch == b"~":
                self._tilde = True
                continue
            else:
                out += ch
            self._line_start = ch in (b"\r", b"\n")
        return bytes(out), events

    def _prompt_key(self, ch: bytes, events: list[Escape]) -> None:
        assert self._prompt is not None
        if ch in (b"\r", b"\n"):
            text = self._prompt.decode("utf-8", "replace").strip()
            self._prompt = None
            self._line_start = True
            events.append(Escape("run", text))
        elif ch in (b"\x03", b"\x1b"):  # Ctrl-C, Escape
            self._prompt = None
            self._line_start = True
            events.append(Escape("cancel"))
        elif ch in (b"\x7f", b"\x08"):  # backspace
            if self._prompt:
                del self._prompt[-1]
                events.append(Escape("echo", "\b \b"))
        elif ch.isascii() and ch.decode().isprintable() and len(self._prompt) < MAX_COMMAND:
            self._prompt += ch
            events.append(Escape("echo", ch.decode()))
