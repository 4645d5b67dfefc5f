"""A joiner's ~: prompt (sans-I/O): what reaches the terminal, and what the prompt gets."""

from __future__ import annotations

from upterm.daemon.escapes import Escape, JoinerEscapes


def test_plain_typing_passes_and_a_tilde_inside_a_line_is_typed() -> None:
    e = JoinerEscapes()
    assert e.feed(b"echo hi~:x\r") == (b"echo hi~:x\r", [])
    assert e.feed(b"~~") == (b"~", [])  # ~~ types one tilde
    assert e.feed(b"\r~nobody\r") == (b"\r~nobody\r", [])


def test_the_prompt_takes_a_command_and_keeps_it_off_the_terminal() -> None:
    e = JoinerEscapes()
    out, events = e.feed(b"~:kick 3\r")
    assert out == b""
    assert events[0] == Escape("open") and events[-1] == Escape("run", "kick 3")
    assert "".join(ev.text for ev in events if ev.kind == "echo") == "kick 3"
    out, events = e.feed(b"~:who\x7f\x7f\x03ls\r")
    assert out == b"ls\r" and events[-1] == Escape("cancel")
    assert [ev.text for ev in events if ev.kind == "echo"][-2:] == ["\b \b", "\b \b"]


def test_help_and_split_reads() -> None:
    e = JoinerEscapes()
    assert e.feed(b"~") == (b"", [])
    assert e.feed(b"?") == (b"", [Escape("help")])
    assert e.feed(b"x\r") == (b"x\r", [])
    assert e.feed(b"~")[0] == b"" and e.feed(b":")[1] == [Escape("open")]
    assert e.prompting
    assert e.feed(b"\r")[1] == [Escape("run", "")]
