"""The attached client's escapes: ~. always, ~y and ~n only while a joiner waits."""

from __future__ import annotations

from upterm.ctl.terminal import DetachFilter


def test_tilde_escapes_act_only_at_the_start_of_a_line() -> None:
    f = DetachFilter()
    assert f.feed(b"echo a~.b\r") == (b"echo a~.b\r", [])
    assert f.feed(b"~~x") == (b"~x", [])
    assert f.feed(b"\r~.rest") == (b"\r", ["detach"])


def test_answers_are_escapes_only_while_a_joiner_waits() -> None:
    f = DetachFilter()
    # Nobody waits: "~nobody" and "~yes" reach the program whole.
    assert f.feed(b"~nobody\r~yes\r") == (b"~nobody\r~yes\r", [])
    f.approvals_waiting = True
    assert f.feed(b"~y") == (b"", ["approve"])
    assert f.feed(b"~n") == (b"", ["deny"])
    f.approvals_waiting = False
    assert f.feed(b"~n") == (b"~n", [])
