"""The session gives every viewer the same terminal: newcomers get the program's state,
queries get one answer, notices never cover the program, sizes are explained.

A real bash on a real PTY; the viewers are our own Viewer interface, recording what they are
sent (the end-to-end tests compare real joiners' screens cell by cell).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from upterm.daemon.session import REPLAY_BYTES, Session

pytestmark = pytest.mark.timeout(30)


class RecordingViewer:
    def __init__(self, viewer_id: str, paces: bool = False) -> None:
        self.viewer_id = viewer_id
        self.paces = paces
        self.output = bytearray()

    def send(self, data: bytes) -> None:
        self.output += data

    def backlog(self) -> int:
        return 0

    def finish(self, status: int) -> None:
        pass

    def cut_off(self, message: bytes) -> None:
        raise AssertionError("cut off")


def bash(tmp_path: Path, cols: int = 80, rows: int = 24, **kw: object) -> Session:
    session = Session(
        ["bash", "--norc", "--noprofile"],
        env={"PATH": os.environ["PATH"], "PS1": "$ ", "TERM": "xterm"},
        cwd=str(tmp_path),
        cols=cols,
        rows=rows,
        **kw,  # type: ignore[arg-type]
    )
    session.start()
    return session


async def until(check: Callable[[], object], what: str) -> None:
    for _ in range(300):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(what)


async def run(session: Session, viewer: RecordingViewer, command: str, marker: str) -> None:
    """Type ``command`` and wait until ``marker`` shows in the viewer's output."""
    session.input(command.encode() + b"\n")
    needle = marker.encode()
    await until(lambda: needle in viewer.output, f"{marker!r} in {bytes(viewer.output[-300:])!r}")


async def test_a_late_newcomer_gets_the_normal_screen_then_the_program_s_screen_and_modes(
    tmp_path: Path,
) -> None:
    session = bash(tmp_path)
    host = RecordingViewer("host", paces=True)
    session.attach(host, 80, 24)
    # More than the replay of shell output, then a "program" that switches to the alternate
    # screen with its modes and prints more than the replay there too.
    (tmp_path / "prog").write_bytes(
        b"\x1b[?1049h\x1b[?1h\x1b=\x1b[?1000h\x1b[?2004h\x1b[2;20r\x1b]2;PROG\x07"
        + b"\x1b[H" + b"alt line\r\n" * 8000 + b"ALT-END"
    )  # fmt: skip
    await run(session, host, "seq 1 20000; echo SHELL-$((6*7))", "SHELL-42")
    await run(session, host, "stty raw -echo; cat prog", "ALT-END")
    newcomer = RecordingViewer("joiner")
    session.attach(newcomer, 80, 24)
    got = bytes(newcomer.output)
    # A clean screen, the shell's last output, then the program's screen, then its modes.
    assert got.index(b"\x1b[H\x1b[2J") < got.index(b"SHELL-42") < got.index(b"\x1b[?1049h")
    normal = got[: got.index(b"\x1b[?1049h")]
    assert b"alt line" not in normal and b"20000\r\n" in normal
    assert len(normal) <= REPLAY_BYTES + 200
    modes = got[got.rindex(b"ALT-END") :]
    for seq in (b"\x1b[?1h", b"\x1b=", b"\x1b[?1000h", b"\x1b[?2004h", b"\x1b[2;20r", b"PROG"):
        assert seq in modes, seq
    session.hangup()
    await asyncio.wait_for(session.exited, 10)


async def test_a_query_reaches_one_viewer_the_host_else_one_typist(tmp_path: Path) -> None:
    session = bash(tmp_path)
    host = RecordingViewer("host", paces=True)
    typist = RecordingViewer("typist")
    viewer = RecordingViewer("viewer")
    session.attach(viewer, 80, 24, sized=False)
    session.attach(typist, 80, 24)
    session.attach(host, 80, 24)
    # Split so that no query is in what bash echoes of the command.
    await run(session, viewer, "printf '\\033[''6n'; echo Q1-$((1+1))", "Q1-2")
    assert b"\x1b[6n" in host.output
    assert b"\x1b[6n" not in typist.output and b"\x1b[6n" not in viewer.output
    session.detach("host")
    await run(session, viewer, "printf '\\033]11;?\\007'; echo Q2-$((1+1))", "Q2-2")
    assert b"\x1b]11;?\x07" in typist.output and b"\x1b]11;?\x07" not in viewer.output
    # Newcomers are never replayed an old query.
    late = RecordingViewer("late")
    session.attach(late, 80, 24)
    assert b"\x1b[6n" not in late.output and b"\x1b]11;?" not in late.output
    session.hangup()
    await asyncio.wait_for(session.exited, 10)


async def test_with_nobody_to_answer_the_session_answers_device_attributes(
    tmp_path: Path,
) -> None:
    session = bash(tmp_path)
    viewer = RecordingViewer("viewer")  # cannot type: not an answerer
    session.attach(viewer, 80, 24, sized=False)
    await run(
        session,
        viewer,
        "stty -echo; printf '\\033[''c'; read -rs -d c -t 5 da; echo \"DA=[${da#?}]\"",
        "DA=[",
    )
    # What the read got after the ESC: the session's own answer, a VT220 with colour.
    await until(lambda: b"DA=[[?62;22]" in viewer.output, bytes(viewer.output[-200:]))
    session.hangup()
    await asyncio.wait_for(session.exited, 10)


async def test_notices_go_above_a_shell_line_and_wait_out_a_full_screen_program(
    tmp_path: Path,
) -> None:
    session = bash(tmp_path)
    host = RecordingViewer("host", paces=True)
    session.attach(host, 80, 24)
    await run(session, host, "echo READY-$((2+2))", "READY-4")
    await until(lambda: host.output.endswith(b"$ "), "prompt")
    session.input(b"echo half-typ")
    await until(lambda: host.output.endswith(b"half-typ"), "echo of typing")
    mark = len(host.output)
    session.notify_host("someone joined")
    # The line is cleared, the notice written, the prompt and the typing written again.
    assert bytes(host.output[mark:]) == (
        b"\r\x1b[2K\x1b[0m[upterm: someone joined]\r\n\x1b[?2004h$ echo half-typ"
    )
    session.input(b"\x15")  # ^U: drop the typing
    (tmp_path / "prog").write_bytes(b"\x1b[?1049hFULL-SCREEN")
    await run(session, host, "cat prog; sleep 0.5; printf '\\033[?1049lBACK'", "FULL-SCREEN")
    mark = len(host.output)
    session.notify_host("someone left", urgent=True)
    # On the alternate screen: the bell and the title, nothing written on the screen.
    assert bytes(host.output[mark:]) == b"\x07\x1b[22;2t\x1b]2;[upterm: someone left]\x07"
    await until(lambda: b"[upterm: someone left]\r\n" in host.output[mark:], "held notice")
    after = bytes(host.output[mark:])
    assert after.index(b"BACK") < after.index(b"\x1b[23;2t") < after.index(b"\r\x1b[2K")
    session.hangup()
    await asyncio.wait_for(session.exited, 10)


async def test_a_scroll_region_set_for_a_small_joiner_goes_when_the_terminal_grows(
    tmp_path: Path,
) -> None:
    session = bash(tmp_path, 100, 30)
    host = RecordingViewer("host", paces=True)
    small = RecordingViewer("small")
    session.attach(host, 100, 30)
    session.attach(small, 20, 5)
    assert session.size == (20, 5)
    await run(session, host, "printf '\\033[1;5r'; echo REGION-$((1+1))", "REGION-2")
    mark = len(host.output)
    session.detach("small")
    assert session.size == (100, 30)
    assert bytes(host.output[mark:]).startswith(b"\x1b7\x1b[r\x1b8")
    session.hangup()
    await asyncio.wait_for(session.exited, 10)


async def test_a_viewer_smaller_than_the_shared_terminal_is_told_once(tmp_path: Path) -> None:
    session = bash(tmp_path, 100, 30, size_policy="largest")
    host = RecordingViewer("host", paces=True)
    small = RecordingViewer("small")
    session.attach(host, 100, 30)
    await run(session, host, "echo GO-$((3+3))", "GO-6")
    session.attach(small, 60, 20)
    told = b"your terminal (60x20) is smaller than the shared one (100x30)"
    await until(lambda: told in small.output, bytes(small.output[-300:]))
    assert b"--size-policy smallest" in small.output
    session.resize("small", 50, 20)
    session.resize("small", 40, 20)
    assert small.output.count(b"is smaller than the shared one") == 1
    assert b"smaller" not in host.output
    session.hangup()
    await asyncio.wait_for(session.exited, 10)


async def test_a_notice_waits_while_a_program_draws_on_the_normal_screen(
    tmp_path: Path,
) -> None:
    """top draws on the normal screen with cursor addressing: even when its last write
    ended a line, a notice written at the cursor would land in its display."""
    session = bash(tmp_path)
    host = RecordingViewer("host", paces=True)
    session.attach(host, 80, 24)
    (tmp_path / "top").write_bytes(b"\x1b[H\x1b[2Jtop - load average\x1b[5;1HPID USER\r\n")
    await run(session, host, "cat top; sleep 0.5; echo AFTER-$((5+5))", "PID USER")
    mark = len(host.output)
    session.notify_host("someone joined")
    assert bytes(host.output[mark:]) == b"\x1b[22;2t\x1b]2;[upterm: someone joined]\x07"
    await until(lambda: b"[upterm: someone joined]\r\n" in host.output[mark:], "shown later")
    assert bytes(host.output).index(b"AFTER-10") < bytes(host.output).rindex(b"\x1b[23;2t")
    session.hangup()
    await asyncio.wait_for(session.exited, 10)
