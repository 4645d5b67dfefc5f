"""`upterm host` features, each seen through a real OpenSSH joiner on a real PTY."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import PtyClient, UserEnv, wait_for
from tests.e2e.test_cli_e2e import Joiner, headless

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
SHELL = ["bash", "--norc", "--noprofile"]


def detached(user_env: UserEnv, name: str, *flags: str, cmd: list[str] = SHELL) -> dict:
    out = headless(user_env, "host", "--detach", "--accept", "--name", name, *flags, "--", *cmd)
    assert out.returncode == 0, out.stderr
    return json.loads(headless(user_env, "session", "info", name, "-o", "json").stdout)


def join(user_env: UserEnv, info: dict, key: Path, cols=80, rows=24, term="xterm") -> PtyClient:
    return PtyClient(
        ["ssh", *Joiner.ssh_args(info, key)],
        {**user_env.env, "TERM": term},
        cols,
        rows,
    )


def attached_host(user_env: UserEnv, *flags: str, cmd=SHELL, cols=100, rows=30) -> PtyClient:
    host = PtyClient(["upterm", "host", "--accept", *flags, "--", *cmd], user_env.env, cols, rows)
    host.expect(b"sends a ~).")
    return host


def session_info(user_env: UserEnv) -> dict:
    (only,) = json.loads(headless(user_env, "session", "list", "-o", "json").stdout)
    return only


def test_read_only_joiner_sees_everything_and_types_nothing(
    user_env: UserEnv, joiner_key, tmp_path
) -> None:
    host = attached_host(user_env, "--read-only")
    joiner = join(user_env, session_info(user_env), joiner_key, 60, 15)
    joiner.expect(b"attached to a read-only session")
    # A viewer's smaller window does not shrink the host's shared terminal.
    assert _stty(host, "ro") == "30x100"
    target = tmp_path / "created-by-joiner"
    joiner.type(f"touch {target}\r")
    host.type("echo host-$((20+22))\r")
    joiner.expect(b"host-42")  # output still reaches the joiner
    time.sleep(0.5)
    assert not target.exists()
    assert b"touch" not in host.seen  # nothing the joiner typed reached the shell
    host.type("exit\r")
    assert host.wait() == 0
    joiner.close()


def test_force_command_gives_each_joiner_its_own_process(
    user_env: UserEnv, joiner_key, tmp_path
) -> None:
    script = "echo forced-$((2*3)) TERM=$TERM; stty size; read x; exit 7"
    info = detached(user_env, "fc", "--force-command", f"bash --norc -c '{script}'")
    assert info["forceCommand"] == f"bash --norc -c '{script}'"
    first = join(user_env, info, joiner_key, 91, 33, term="vt220")
    second = join(user_env, info, joiner_key, 70, 20)
    first.expect(b"forced-6 TERM=vt220")
    first.expect(b"33 91")  # its own PTY, at its own size
    second.expect(b"20 70")
    first.type("y\r")
    assert first.wait() == 7  # the joiner's exit status is its command's
    second.type("y\r")
    assert second.wait() == 7
    assert session_info(user_env)["sessionId"] == info["sessionId"]  # the session goes on


def test_forced_command_is_hung_up_when_its_joiner_leaves(
    user_env: UserEnv, joiner_key, tmp_path
) -> None:
    hup = tmp_path / "got-hup"
    stubborn = tmp_path / "stubborn.pid"
    polite = f"trap 'echo hup > {hup}; exit 0' HUP; echo ready-1; while :; do sleep 0.1; done"
    rude = f"trap '' HUP TERM; echo $$ > {stubborn}; echo ready-2; while :; do sleep 0.1; done"
    info = detached(user_env, "hup", "-f", shlex.join(["bash", "--norc", "-c", polite]))
    joiner = join(user_env, info, joiner_key)
    joiner.expect(b"ready-1")
    joiner.close()
    wait_for(hup.exists, 5, what="SIGHUP to the forced command")

    info = detached(user_env, "hup2", "-f", shlex.join(["bash", "--norc", "-c", rude]))
    joiner = join(user_env, info, joiner_key)
    joiner.expect(b"ready-2")
    pid = int(stubborn.read_text())
    joiner.close()
    # Ignores SIGHUP and SIGTERM: SIGKILL about two seconds later.
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 8, what="the stubborn command to die")


def _stty(host: PtyClient, marker: str) -> str:
    """The shared PTY's size as the shell sees it, e.g. "24x80"."""
    start = len(host.seen)  # a retry with the same marker must not find an old answer
    host.type(f"echo {marker}-$(stty size | tr ' ' x)-end\r")
    pattern = re.compile(rf"{marker}-(\d+x\d+)-end".encode())
    deadline = time.monotonic() + 10
    while not (match := pattern.search(host.seen, start)):
        assert time.monotonic() < deadline, host.seen[-300:]
        host.pump(0.1)
    return match.group(1).decode()


def test_size_policies(user_env: UserEnv, joiner_key) -> None:
    host = attached_host(user_env, "--quiet", cols=100, rows=30)
    assert _stty(host, "a") == "30x100"
    joiner = join(user_env, session_info(user_env), joiner_key, 80, 24)
    joiner.expect(b"$ ")
    wait_for(lambda: _stty(host, "b") == "24x80", 10, what="smallest size")
    joiner.close()
    wait_for(lambda: _stty(host, "c") == "30x100", 10, what="size recomputed on leave")
    host.type("exit\r")
    host.wait()

    host = attached_host(user_env, "--quiet", "--size-policy", "host", cols=100, rows=30)
    joiner = join(user_env, session_info(user_env), joiner_key, 80, 24)
    joiner.expect(b"$ ")
    time.sleep(0.5)
    assert _stty(host, "d") == "30x100"
    joiner.close()
    host.type("exit\r")
    host.wait()

    host = attached_host(user_env, "--quiet", "--pty-size", "90x20", cols=100, rows=30)
    assert _stty(host, "e") == "20x90"
    host.resize(120, 40)
    time.sleep(0.3)
    assert _stty(host, "f") == "20x90"
    host.type("exit\r")
    host.wait()


def test_largest_policy_and_hostile_resizes(user_env: UserEnv, joiner_key) -> None:
    host = attached_host(user_env, "--quiet", "--size-policy", "largest", cols=100, rows=30)
    joiner = join(user_env, session_info(user_env), joiner_key, 120, 40)
    joiner.expect(b"$ ")
    wait_for(lambda: _stty(host, "g") == "40x120", 10, what="largest size")
    # A flood of window changes, ending huge: clamped, and the session is unharmed.
    for i in range(300):
        joiner.resize(50 + i % 50, 20 + i % 10)
    joiner.resize(65000, 65000)
    time.sleep(1)
    assert _stty(host, "h") == "10000x10000"
    joiner.close()
    wait_for(lambda: _stty(host, "i") == "30x100", 10, what="back to the host's size")
    host.type("exit\r")
    assert host.wait() == 0


def test_joiner_mid_full_screen_program_sees_the_current_screen(
    user_env: UserEnv, joiner_key, tmp_path
) -> None:
    text = tmp_path / "numbers.txt"
    text.write_text("".join(f"line {i:04d} of the file\n" for i in range(1, 1001)))
    host = attached_host(user_env, "--quiet", cmd=["less", str(text)], cols=80, rows=24)
    host.expect(b"line 0001")
    for _ in range(5):
        host.type(" ")  # page down: the early output is long gone from the screen
    host.expect(b"line 0116")
    host.settle()
    started = time.monotonic()
    joiner = join(user_env, session_info(user_env), joiner_key, 80, 24)
    joiner.expect(b"line 0116")
    joiner.settle(0.3)
    host.settle(0.3)
    assert time.monotonic() - started < 5
    assert joiner.display() == host.display()
    assert any("line 0116" in line for line in joiner.display())
    host.type("q")
    assert host.wait() == 0
    joiner.close()


def test_join_and_leave_notices_and_quiet(user_env: UserEnv, joiner_key) -> None:
    host = attached_host(user_env)
    joiner = join(user_env, session_info(user_env), joiner_key)
    joiner.expect(b"$ ")
    host.expect(b"[upterm: 127.0.0.1:")
    host.expect(b" joined (SHA256:")
    assert b"joined (SHA256:" not in joiner.seen  # only the host is told
    joiner.close()
    host.expect(b" left (SHA256:")
    host.type("exit\r")
    host.wait()
    quiet = attached_host(user_env, "--quiet")
    joiner = join(user_env, session_info(user_env), joiner_key)
    joiner.expect(b"$ ")
    quiet.settle(0.5)
    assert b"joined" not in quiet.seen
    joiner.close()
    quiet.type("exit\r")
    quiet.wait()


def test_client_ip_hidden_in_ci(user_env: UserEnv, joiner_key) -> None:
    user_env.env["GITHUB_ACTIONS"] = "true"
    info = detached(user_env, "ci")
    assert info["hideClientIp"] is True
    joiner = join(user_env, info, joiner_key)
    joiner.expect(b"$ ")
    (client,) = json.loads(headless(user_env, "session", "info", "ci", "-o", "json").stdout)[
        "clients"
    ]
    assert client["addr"] == "[redacted]"
    log = (Path(user_env.env["XDG_STATE_HOME"]) / "upterm" / "daemon.log").read_text()
    assert "client joined from [redacted]" in log
    assert "joined from 127.0.0.1" not in log
    joiner.close()
    shown = detached(user_env, "shown", "--show-client-ip")
    assert shown["hideClientIp"] is False


def test_stalled_joiner_never_holds_back_the_others(user_env: UserEnv, joiner_key) -> None:
    info = detached(user_env, "flood")
    stalled = join(user_env, info, joiner_key)
    stalled.expect(b"$ ")
    os.kill(stalled.proc.pid, signal.SIGSTOP)  # stops reading, keeps the connection
    try:
        reader = Joiner(info, joiner_key)
        reader.expect(b"$ ")
        reader.type("head -c 20000000 /dev/zero | tr '\\0' x; echo; echo DONE-$((2+2))\r")
        # The live reader gets to the end (skipping ahead itself whenever it reads slower
        # than the command writes), while the stalled one holds nothing back.
        reader.expect(b"DONE-4", timeout=60)
    finally:
        os.kill(stalled.proc.pid, signal.SIGCONT)
    # The stalled joiner was never cut off: it skipped ahead, saw how the output ended, and
    # is live again.
    stalled.expect(b"output skipped to catch up", timeout=30)
    stalled.expect(b"DONE-4")
    stalled.type("echo alive-$((8+8))\r")
    stalled.expect(b"alive-16")
    assert (
        json.loads(headless(user_env, "session", "info", "flood", "-o", "json").stdout)[
            "clientCount"
        ]
        == 2
    )
    reader.close()
    stalled.close()


def test_lone_joiner_gets_every_byte_of_a_flood(user_env: UserEnv, joiner_key) -> None:
    # Nobody watches locally: the PTY follows the joiner instead of outrunning it, so a
    # joiner that reads as fast as it can is never skipped ahead.
    info = detached(user_env, "follow")
    reader = Joiner(info, joiner_key)
    reader.expect(b"$ ")
    # `tr` writes far faster than any SSH path carries: without following the joiner, the
    # PTY would be drained ahead of it and it would skip.
    reader.type("head -c 24000000 /dev/zero | tr '\\0' x; echo; echo END-$((3+3))\r")
    seen = reader.expect(b"END-6\r\n", timeout=90)
    assert b"output skipped" not in seen
    output = seen[seen.index(b"(3+3))\r\n") :]  # after the echoed command line (its own x)
    assert output.count(b"x") == 24000000
    reader.close()


def test_stopped_lone_joiner_does_not_hold_the_command(
    user_env: UserEnv, joiner_key, tmp_path: Path
) -> None:
    info = detached(user_env, "nohold")
    stopped = join(user_env, info, joiner_key)
    stopped.expect(b"$ ")
    done = tmp_path / "done"
    stopped.type(f"head -c 30000000 /dev/zero | tr '\\0' x; touch {done}\r")
    time.sleep(0.2)
    os.kill(stopped.proc.pid, signal.SIGSTOP)
    try:
        # The PTY waits for the only joiner briefly, then reads on without it.
        wait_for(done.exists, timeout=60)
    finally:
        os.kill(stopped.proc.pid, signal.SIGCONT)
    stopped.expect(b"output skipped to catch up", timeout=30)
    stopped.type("echo alive-$((9+9))\r")
    stopped.expect(b"alive-18")
    stopped.close()


def test_startup_confirmation(user_env: UserEnv, joiner_key) -> None:
    host = PtyClient(["upterm", "host", "--", *SHELL], user_env.env)
    host.expect(b"Accept connections? [y/n]: ")
    host.type("n\r")
    host.expect(b"Session discarded.")
    assert host.wait() == 0
    assert headless(user_env, "session", "list", "-o", "json").stdout.strip() == "[]"

    host = PtyClient(["upterm", "host", "--", *SHELL], user_env.env)
    host.expect(b"Accept connections? [y/n]: ")
    # A joiner arriving before the answer waits; it gets in once the host says yes.
    joiner = join(user_env, session_info(user_env), joiner_key)
    time.sleep(1)
    assert b"$ " not in joiner.seen
    host.type("y\r")
    host.expect(b"sends a ~).")
    joiner.expect(b"$ ")
    joiner.close()
    host.type("exit\r")
    assert host.wait() == 0


def test_attaching_the_session_you_are_inside_is_refused(user_env: UserEnv) -> None:
    """Attached inside itself, a session would feed its output back into itself for ever."""
    host = attached_host(user_env, "--name", "self")
    host.expect(b"$ ")
    host.type("upterm session attach self; echo rc=$?\r")
    host.expect(b"rc=2")
    screen = "\n".join(host.display())
    assert (
        "you are inside session self: attaching it here would feed its output back into itself"
        in screen.replace("\n", "")
    ), screen
    # The shell goes on.
    host.type("echo still-$((6*7))\r")
    host.expect(b"still-42")
    host.type("exit\r")
    assert host.wait() == 0


def test_detaching_from_a_full_screen_program_gives_the_terminal_back(user_env: UserEnv) -> None:
    """~. while a program holds the alternate screen with mouse reporting and bracketed
    paste on: the host's terminal is taken back to the normal screen with those modes off
    before the detach line is printed."""
    host = attached_host(user_env, "--name", "alt")
    host.expect(b"$ ")
    # What vim and less do on start, then wait.
    # (the marker is split in the command line, so only the program's output shows it whole)
    host.type("printf '\\033[?1049h\\033[?1000h\\033[?2004h\\033[?25lFULL''SCREEN'; read x\r")
    host.expect(b"FULLSCREEN")
    host.type("\r~.")
    host.expect(b"[detached; 'upterm session attach alt' to return]")
    seen = bytes(host.seen)
    detach_at = seen.rindex(b"[detached;")
    tail = seen[seen.rindex(b"FULLSCREEN") : detach_at]
    for reset in (b"\x1b[?1049l", b"\x1b[?1000l", b"\x1b[?2004l", b"\x1b[?25h"):
        assert reset in tail, (reset, tail)
    assert host.wait() == 0
    headless(user_env, "session", "stop", "alt")


def test_a_session_ending_in_a_full_screen_program_gives_joiners_their_terminal_back(
    user_env: UserEnv, joiner_key
) -> None:
    info = detached(user_env, "altend")
    joiner = join(user_env, info, joiner_key)
    joiner.expect(b"$ ")
    # The command ends while the terminal is on the alternate screen with mouse reporting on.
    joiner.type("printf '\\033[?1049h\\033[?1000hALT''SCREEN'; sleep 0.3; exit 3\r")
    joiner.expect(b"ALTSCREEN")
    assert joiner.wait() == 3
    seen = bytes(joiner.seen)
    tail = seen[seen.rindex(b"ALTSCREEN") :]
    for reset in (b"\x1b[?1049l", b"\x1b[?1000l", b"\x1b[?25h"):
        assert reset in tail, (reset, tail)


def test_bursts_of_small_writes_and_keys_leave_every_screen_the_same(
    user_env: UserEnv, joiner_key
) -> None:
    """The relay merges small pieces that arrive in one pass (output towards a joiner, keys
    towards the host): order and content must be exactly kept, so the joiner's screen model
    equals the host's cell for cell after a burst of cursor-addressed one-number writes and
    a burst of keystrokes typed faster than they are echoed."""
    host = attached_host(user_env, "--quiet", cols=80, rows=24)
    joiner = join(user_env, session_info(user_env), joiner_key, 80, 24)
    joiner.expect(b"$ ")
    host.type("clear\r")
    # Hundreds of tiny writes, each moving the cursor: any reordering shows on screen.
    host.type(
        "for i in $(seq 1 400); do printf '\\033[%d;%dH%03d' $((i%20+2)) $((i%19*4+1)) $i; "
        "done; printf '\\033[23;1HBURST-''DONE'\r"
    )
    host.expect(b"BURST-DONE")
    joiner.expect(b"BURST-DONE")
    # The joiner types a whole line in one write: its keys reach the shell in order.
    joiner.type("echo " + "".join(f"k{i:02d}" for i in range(60)) + " | wc -c\r")
    host.expect(b"181")  # 60 x 3 characters and the newline
    host.settle(0.3)
    joiner.settle(0.3)
    assert joiner.display() == host.display()
    host.type("exit\r")
    assert host.wait() == 0
