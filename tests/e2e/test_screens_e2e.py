"""Every terminal that shows a session shows the same thing, cell for cell.

Each scenario drives real programs (bash, vim, less, top, htop) in a session through real
terminals: the host's ``upterm host`` and OpenSSH joiners, each on a PTY whose output is
fed to :class:`tests.e2e.screenkit.Terminal`, a terminal model that has an alternate
screen, follows modes and answers queries as a real terminal does. Each scenario ends by
comparing the models: cells, cursor and modes.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import UserEnv, make_key, wait_for
from tests.e2e.screenkit import ModelClient, compare
from tests.e2e.test_cli_e2e import Joiner, headless
from tests.e2e.test_host_features_e2e import SHELL, detached, session_info

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
TERM = "xterm-256color"
#: More than the 64 KiB of normal-screen output a newcomer is replayed.
FLOOD = "seq 1 20000"
VIM = "vim -i NONE -n"


# -- terminals --


def host_term(
    user_env: UserEnv, *flags: str, cmd=SHELL, cols: int = 80, rows: int = 24
) -> ModelClient:
    host = ModelClient(
        ["upterm", "host", "--accept", *flags, "--", *cmd],
        {**user_env.env, "TERM": TERM},
        cols,
        rows,
    )
    host.expect(b"sends a ~).")
    return host


def joiner_term(
    user_env: UserEnv, info: dict, key: Path, cols: int = 80, rows: int = 24
) -> ModelClient:
    return ModelClient(
        ["ssh", *Joiner.ssh_args(info, key)], {**user_env.env, "TERM": TERM}, cols, rows
    )


def attach_term(user_env: UserEnv, name: str, cols: int = 80, rows: int = 24) -> ModelClient:
    return ModelClient(
        ["upterm", "session", "attach", name], {**user_env.env, "TERM": TERM}, cols, rows
    )


def settle(*terms: ModelClient, quiet_s: float = 0.6, timeout: float = 15) -> None:
    """Read every terminal until none of them gets anything new for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    sizes = [len(t.seen) for t in terms]
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        for t in terms:
            t.pump(0.02)
        now = [len(t.seen) for t in terms]
        if now != sizes:
            sizes, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
    pytest.fail(f"terminals never went quiet within {timeout}s")


def screen_text(term: ModelClient) -> str:
    return "\n".join(term.display())


def wait_screen(term: ModelClient, text: str, timeout: float = 15) -> None:
    """Wait until ``text`` is on the terminal's screen (as its model shows it)."""
    deadline = time.monotonic() + timeout
    while text not in screen_text(term):
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not on screen:\n{screen_text(term)}")
        term.pump(0.1)


def logical_lines(term: ModelClient) -> list[str]:
    """The screen's lines with those that wrapped (filled the whole width) joined again."""
    out: list[str] = []
    cont = False
    for line in term.display():
        if cont:
            out[-1] += line
        else:
            out.append(line)
        cont = len(line) == term.term.screen.columns
    return out


def assert_same(a: ModelClient, b: ModelClient, names=("host", "joiner"), **kw) -> None:
    diff = compare(a.term, b.term, names, **kw)
    assert not diff, "screens differ:\n" + diff


def shell_at_prompt(term: ModelClient) -> None:
    wait_for(
        lambda: term.pump(0.05) and term.display()[term.term.cursor[1]].endswith("$"),
        15,
        what=f"a prompt; screen:\n{screen_text(term)}",
    )


def run_flood(host: ModelClient) -> None:
    host.type(FLOOD + "\r")
    host.expect(b"\r\n20000\r\n", timeout=30)
    settle(host, quiet_s=0.3)


def numbers_file(tmp_path: Path, n: int = 500) -> Path:
    path = tmp_path / "numbers.txt"
    path.write_text("".join(f"line {i:04d} of the file\n" for i in range(1, n + 1)))
    return path


# -- full-screen programs: a newcomer after 64 KiB and the program's start --


def _full_screen_program(
    user_env: UserEnv, key: Path, start: str, ready: str, quit_keys: str, alternate=True
) -> None:
    """Flood, start a full-screen program, a joiner arrives: same screen; the program
    quits: same normal screen (the shell's history under it) on both.

    ``alternate``: whether the program uses the alternate screen (top draws on the normal
    one, so what it leaves behind is its last frame, not the shell's history)."""
    host = host_term(user_env, "--quiet")
    run_flood(host)
    host.type(start + "\r")
    wait_screen(host, ready)
    settle(host)
    assert host.term.screen.alternate is alternate
    joiner = joiner_term(user_env, session_info(user_env), key)
    wait_screen(joiner, ready)
    settle(host, joiner)
    assert_same(host, joiner)
    host.type(quit_keys)
    shell_at_prompt(host)
    settle(host, joiner)
    assert not host.term.screen.alternate
    assert_same(host, joiner)
    if alternate:
        lines = host.display()
        assert "20000" in lines, screen_text(host)  # the shell's history under the program
        assert any(line.startswith("$ " + start.split()[0]) for line in lines)
    # The shell is intact: the next command line is clean, on both.
    host.type("echo after-$((6*7))\r")
    wait_screen(joiner, "\nafter-42\n$")
    settle(host, joiner)
    assert_same(host, joiner)
    host.type("exit\r")
    assert host.wait() == 0
    joiner.close()


def test_screens_vim(user_env: UserEnv, joiner_key: Path, tmp_path: Path) -> None:
    path = numbers_file(tmp_path)
    _full_screen_program(user_env, joiner_key, f"{VIM} {path}", "line 0023 of the file", "\x1b:q\r")


def test_screens_less(user_env: UserEnv, joiner_key: Path, tmp_path: Path) -> None:
    path = numbers_file(tmp_path)
    _full_screen_program(user_env, joiner_key, f"less {path}", "line 0023 of the file", "q")


# top and htop show live numbers (clock, load, CPU use): with a refresh delay of 100 s
# nothing changes while the scenario runs, except when they repaint on SIGWINCH (the
# newcomer's nudge), which both terminals get alike; so whole screens are compared.


def test_screens_top(user_env: UserEnv, joiner_key: Path) -> None:
    _full_screen_program(user_env, joiner_key, "top -d 100", "load average", "q", alternate=False)


def test_screens_htop(user_env: UserEnv, joiner_key: Path) -> None:
    _full_screen_program(user_env, joiner_key, "htop -d 1000", "Load average", "q")


# -- host detaching inside vim, and coming back --


def test_screens_detach_and_reattach_in_vim(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path
) -> None:
    path = numbers_file(tmp_path)
    host = host_term(user_env, "--quiet", "--name", "re")
    run_flood(host)
    host.type(f"{VIM} {path}\r")
    wait_screen(host, "line 0023 of the file")
    joiner = joiner_term(user_env, session_info(user_env), joiner_key)
    wait_screen(joiner, "line 0023 of the file")
    settle(host, joiner)
    host.type("\r~.")  # vim gets the Enter (cursor one line down); upterm takes ~.
    host.expect(b"[detached; 'upterm session attach re' to return]")
    assert host.wait() == 0
    settle(joiner)
    back = attach_term(user_env, "re")
    wait_screen(back, "line 0023 of the file")
    settle(back, joiner)
    assert_same(back, joiner, ("re-attached host", "joiner"))
    assert back.term.screen.alternate and back.term.mouse_on()
    joiner.type("\x1b:q\r")  # the joiner quits vim: both back on the shell's history
    shell_at_prompt(back)
    settle(back, joiner)
    assert_same(back, joiner, ("re-attached host", "joiner"))
    assert "20000" in back.display()
    back.type("exit\r")
    assert back.wait() == 0
    joiner.close()


# -- the session ends while vim runs --


def test_screens_session_ends_inside_vim(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path
) -> None:
    path = numbers_file(tmp_path)
    host = host_term(user_env, "--quiet", "--name", "end")
    joiner = joiner_term(user_env, session_info(user_env), joiner_key)
    wait_screen(joiner, "$")
    host.type(f"{VIM} {path}\r")
    wait_screen(host, "line 0023 of the file")
    wait_screen(joiner, "line 0023 of the file")
    settle(host, joiner)
    for term in (host, joiner):
        assert term.term.screen.alternate and term.term.mouse_on()
        assert term.term.private[2004] and term.term.private[1]
    assert headless(user_env, "session", "stop", "end").returncode == 0
    host.wait()
    joiner.wait()
    for name, term in (("host", host), ("joiner", joiner)):
        modes = term.term.modes()
        assert not term.term.screen.alternate, (name, modes)
        assert term.term.cursor[2], f"{name}: cursor hidden"
        assert not term.term.mouse_on(), (name, modes)
        assert not modes["?1006"] and not modes["?2004"] and not modes["?1"], (name, modes)
        assert not modes["keypad"], (name, modes)


# -- size policies: a scroll region set on a PTY of another size does not stay --


def pty_size(host: ModelClient, want: str) -> None:
    """Wait until the shared PTY is ``want`` (rows x cols) as the shell sees it."""

    def check() -> bool:
        start = len(host.seen)
        host.type("sz\r")
        deadline = time.monotonic() + 5
        while not re.search(rb"sz-\d", host.seen[start:]) and time.monotonic() < deadline:
            host.pump(0.05)
        settle(host, quiet_s=0.2)
        return f"sz-{want}\r".encode() in host.seen[start:]

    wait_for(check, 15, what=f"a {want} PTY; last output {host.seen[-300:]!r}")


def _size_policy_scenario(
    user_env: UserEnv,
    key: Path,
    tmp_path: Path,
    policy: str,
    joiner_size: tuple[int, int],
    newcomer: bool = False,
) -> None:
    """The PTY takes another size (a joiner's, or the host's window), a program sets a
    scroll region there, the PTY size changes back: every terminal's scroll region is
    whole again, so output scrolls the host's whole screen, and a newcomer sees the same."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    region = bin_dir / "rg"
    # Sets rows 2-4 as the scroll region (and leaves it set), then scrolls inside it.
    region.write_text(
        "#!/bin/sh\nprintf '\\033[2;4r\\033[4;1H'\nfor i in 1 2 3 4 5 6; do echo r$i; done\n"
    )
    region.chmod(0o755)
    (bin_dir / "sz").write_text("#!/bin/sh\necho \"sz-$(stty size | tr ' ' x)\"\n")
    (bin_dir / "sz").chmod(0o755)
    user_env.env["PATH"] = f"{bin_dir}:{user_env.env['PATH']}"
    host = host_term(user_env, "--quiet", "--size-policy", policy)
    shell_at_prompt(host)
    joiner = joiner_term(user_env, session_info(user_env), key, *joiner_size)
    wait_screen(joiner, "$")
    settle(host, joiner)
    if policy == "host":
        host.resize(20, 5)  # the host's window decides: the PTY follows it
    pty_size(host, {"smallest": "5x20", "largest": "60x200", "host": "5x20"}[policy])
    host.type("rg\r")
    host.expect(b"r6")
    settle(host, joiner)
    for name, term in (("host", host), ("joiner", joiner)):
        assert term.term.modes()["scroll region"] == (2, 4), (name, screen_text(term))
    if policy == "host":
        host.resize(200, 60)  # the PTY changes size with the region set
        pty_size(host, "60x200")
        settle(host, joiner)
        # The joiner's terminal did not change size: it was told to drop the region.
        assert joiner.term.modes()["scroll region"] is None, joiner.seen[-200:]
        host.resize(80, 24)
        joiner.close()
    else:
        joiner.close()  # the PTY goes back to the host's size
    pty_size(host, "24x80")
    settle(host)
    assert host.term.modes()["scroll region"] is None
    host.type("seq 1 100\r")
    host.expect(b"\r\n100\r\n")
    shell_at_prompt(host)
    settle(host)
    # The host's whole screen scrolled: the last 23 numbers, then the prompt.
    assert host.display()[:23] == [str(i) for i in range(78, 101)], screen_text(host)
    if newcomer:
        # Joins after all that: replayed the output since, it must end up with the same
        # screen (the region set by rg must not come back for the output after it).
        late = joiner_term(user_env, session_info(user_env), key)
        wait_screen(late, "100")
        settle(host, late)
        assert_same(host, late, ("host", "newcomer"))
        late.close()
    told = b"[upterm: your terminal (20x5) is smaller than the shared one (80x24)"
    if policy == "host":
        assert joiner.seen.count(told) == 1, joiner.seen[-600:]  # told once, not per resize
    else:
        assert told not in joiner.seen
    host.type("exit\r")
    assert host.wait() == 0


def test_screens_size_policy_smallest(user_env: UserEnv, joiner_key: Path, tmp_path) -> None:
    _size_policy_scenario(user_env, joiner_key, tmp_path, "smallest", (20, 5))


def test_screens_size_policy_largest(user_env: UserEnv, joiner_key: Path, tmp_path) -> None:
    _size_policy_scenario(user_env, joiner_key, tmp_path, "largest", (200, 60))


def test_screens_size_policy_host(user_env: UserEnv, joiner_key: Path, tmp_path) -> None:
    _size_policy_scenario(user_env, joiner_key, tmp_path, "host", (20, 5))


def test_screens_newcomer_after_scroll_region_was_reset(
    user_env: UserEnv, joiner_key: Path, tmp_path
) -> None:
    _size_policy_scenario(user_env, joiner_key, tmp_path, "smallest", (20, 5), newcomer=True)


# -- notices never write over the program --

JOINED = re.compile(r"\[upterm: 127\.0\.0\.1:\d+ joined \(SHA256:[^)]*\)\]")
LEFT = re.compile(r"\[upterm: 127\.0\.0\.1:\d+ left \(SHA256:[^)]*\)\]")


def _notices_in_program(
    user_env: UserEnv, key: Path, start: str, ready: str, quit_keys: str
) -> None:
    """A joiner arrives and leaves while a full-screen program runs on the host: the
    host's cells are those the joiner sees (the notices are in the title meanwhile); once
    the program is quit, the notices are written out and the shell prompt is intact."""
    host = host_term(user_env)
    shell_at_prompt(host)
    title_before, stack_before = host.term.title, list(host.term.title_stack)
    host.type(start + "\r")
    wait_screen(host, ready)
    settle(host)
    joiner = joiner_term(user_env, session_info(user_env), key)
    wait_screen(joiner, ready)
    settle(host, joiner)
    assert JOINED.fullmatch(host.term.title), host.term.title
    assert "[upterm" not in screen_text(host)
    assert_same(host, joiner, ignore_modes=("title",))
    assert "upterm" not in joiner.term.title
    during = host.term.snapshot()
    joiner.close()
    wait_for(
        lambda: host.pump(0.1) and LEFT.fullmatch(host.term.title),
        10,
        what=f"the left notice in the title; title {host.term.title!r}",
    )
    settle(host)
    diff = compare(during, host.term, ("before the joiner left", "after"), ignore_modes=("title",))
    assert not diff, "a notice changed the host's screen:\n" + diff
    host.type(quit_keys)
    shell_at_prompt(host)
    settle(host)
    lines = logical_lines(host)
    joined = [i for i, line in enumerate(lines) if JOINED.fullmatch(line)]
    left = [i for i, line in enumerate(lines) if LEFT.fullmatch(line)]
    assert len(joined) == 1 and len(left) == 1 and left[0] == joined[0] + 1, screen_text(host)
    assert lines[left[0] + 1] == "$", screen_text(host)  # the prompt, below the notices
    # The title is the host's own again (every push popped).
    assert (host.term.title, host.term.title_stack) == (title_before, stack_before)
    # The prompt is whole: the next command line reads as typed.
    host.type("echo next-$((2+3))\r")
    wait_screen(host, "$ echo next-$((2+3))\nnext-5\n$")
    host.type("exit\r")
    assert host.wait() == 0


def test_screens_notices_during_vim(user_env: UserEnv, joiner_key: Path, tmp_path) -> None:
    path = numbers_file(tmp_path)
    _notices_in_program(user_env, joiner_key, f"{VIM} {path}", "line 0023 of the file", "\x1b:q\r")


def test_screens_notices_during_less(user_env: UserEnv, joiner_key: Path, tmp_path) -> None:
    path = numbers_file(tmp_path)
    _notices_in_program(user_env, joiner_key, f"less {path}", "line 0023 of the file", "q")


def test_screens_notices_during_top(user_env: UserEnv, joiner_key: Path) -> None:
    # top draws on the normal screen with cursor moves: not a shell line either.
    _notices_in_program(user_env, joiner_key, "top -d 100", "load average", "q")


def test_screens_notices_in_shell(user_env: UserEnv, joiner_key: Path) -> None:
    """On a shell line a notice goes above the line, and the prompt and what was typed so
    far are written again below it; typing goes on where it was."""
    # 40 rows: below the card (about 20) there is room for both notices, so nothing scrolls
    # (at 24 rows whether the second one scrolled the card depended on how its lines wrapped).
    host = host_term(user_env, rows=40)
    shell_at_prompt(host)
    # A fresh prompt line first (see test_screens_prompt_intact_when_the_host_attaches).
    host.type("\r")
    wait_screen(host, "$\n$")
    host.type("echo part")
    wait_screen(host, "$ echo part")
    settle(host)
    row = host.term.cursor[1]
    above = host.display()[:row]
    joiner = joiner_term(user_env, session_info(user_env), joiner_key, rows=40)
    wait_screen(joiner, "$ echo part")
    host.expect(b" joined (SHA256:")
    settle(host, joiner)
    lines = host.display()
    assert lines[:row] == above, screen_text(host)  # nothing above was written over
    # Where the line was: the notice (two rows: wider than the screen), then the line again.
    assert JOINED.fullmatch(lines[row] + lines[row + 1]), screen_text(host)
    assert lines[row + 2] == "$ echo part", screen_text(host)
    assert host.term.cursor == (len("$ echo part"), row + 2, True)
    assert "[upterm" not in screen_text(joiner)
    joiner.close()
    host.expect(b" left (SHA256:")
    settle(host)
    lines = host.display()
    assert lines[:row] == above, screen_text(host)
    assert JOINED.fullmatch(lines[row] + lines[row + 1]), screen_text(host)
    assert LEFT.fullmatch(lines[row + 2] + lines[row + 3]), screen_text(host)
    assert lines[row + 4] == "$ echo part", screen_text(host)
    assert host.term.cursor == (len("$ echo part"), row + 4, True)
    host.type("ial-$((1+1))\r")
    wait_screen(host, "$ echo partial-$((1+1))\npartial-2\n$")
    host.type("exit\r")
    assert host.wait() == 0


def test_screens_prompt_intact_when_the_host_attaches(user_env: UserEnv) -> None:
    """The shell has printed its prompt when the host's terminal attaches: the cursor is
    after the prompt, where the shell left it, so what the host types reads "$ ..."."""
    detached(user_env, "late")
    time.sleep(0.5)  # the shell's prompt is out before the host's terminal attaches
    host = attach_term(user_env, "late")
    wait_screen(host, "$")
    settle(host)
    row = host.term.cursor[1]
    assert host.display()[row] == "$", screen_text(host)
    assert host.term.cursor[:2] == (2, row), (host.term.cursor, screen_text(host))
    host.type("echo first-$((3*3))\r")
    wait_screen(host, "$ echo first-$((3*3))\nfirst-9\n$")
    host.type("exit\r")
    assert host.wait() == 0


# -- terminal queries: exactly one answer --

CPR_COMMAND = (
    "read -rs -d R -p $'\\e[6n' pos; read -rs -t 1 extra; echo \"cpr[${pos#?}][${#extra}]\""
)
CPR_OUTPUT = re.compile(r"cpr\[\[(\d+);(\d+)\]\[(\d+)\]")


def _cpr_once(typist: ModelClient, everyone: list[ModelClient], answerer: ModelClient) -> None:
    """``typist`` runs a command that asks the cursor position: one answer, from
    ``answerer``, reaches it; the others never see the query; the next line is clean."""
    asked_before = [len(t.term.queries) for t in everyone]
    typist.type(CPR_COMMAND + "\r")
    deadline = time.monotonic() + 15
    while not CPR_OUTPUT.search(screen_text(typist)):
        assert time.monotonic() < deadline, f"no position read:\n{screen_text(typist)}"
        for term in everyone:  # the answerer answers what it reads
            term.pump(0.03)
    settle(*everyone)
    settle(*everyone)
    # The answer is the answerer's cursor: the start of the line the output went on there
    # (the host's terminal may show it on another row than the joiners').
    (row,) = [i for i, line in enumerate(answerer.display()) if CPR_OUTPUT.fullmatch(line)]
    match = CPR_OUTPUT.search(screen_text(typist))
    assert match and (match[1], match[2], match[3]) == (str(row + 1), "1", "0"), screen_text(typist)
    asked = [t.term.queries[n:] for t, n in zip(everyone, asked_before, strict=True)]
    assert asked == [["\x1b[6n"] if t is answerer else [] for t in everyone], asked
    typist.type("echo done-$((4*4))\r")
    wait_screen(typist, "\n$ echo done-$((4*4))\ndone-16\n$")
    settle(*everyone)
    # Joiners of one size show the same (the host's terminal also shows upterm's banner).
    joiners = [t for t in everyone if t.proc.args[0] == "ssh"]
    for term in joiners[1:]:
        assert_same(joiners[0], term, ("a joiner", "another"))


def test_screens_queries_three_typists(user_env: UserEnv, tmp_path: Path) -> None:
    info = detached(user_env, "q3")
    joiners = []
    for i in range(3):  # one after the other: the first to attach is the first typist
        joiners.append(joiner_term(user_env, info, make_key(tmp_path / f"k{i}")))
        wait_screen(joiners[-1], "$")
        settle(*joiners)
    # The first joiner who can type answers, whoever runs the command.
    _cpr_once(joiners[2], joiners, joiners[0])
    for j in joiners:
        j.close()


def test_screens_queries_host_and_two_typists(user_env: UserEnv, tmp_path: Path) -> None:
    host = host_term(user_env, "--quiet")
    joiners = []
    for i in range(2):
        joiners.append(joiner_term(user_env, session_info(user_env), make_key(tmp_path / f"k{i}")))
        wait_screen(joiners[-1], "$")
        settle(host, *joiners)
    # The host's own terminal answers, though a joiner asks.
    _cpr_once(joiners[1], [host, *joiners], host)
    host.type("exit\r")
    assert host.wait() == 0


def test_screens_queries_one_typist_and_a_viewer(user_env: UserEnv, tmp_path: Path) -> None:
    typist_key, viewer_key = make_key(tmp_path / "t"), make_key(tmp_path / "v")
    info = detached(
        user_env,
        "q1",
        "--authorized-keys",
        f"{typist_key}.pub",
        "--authorized-keys",
        f"{viewer_key}.pub",
        "--role",
        f"{viewer_key}.pub=viewer",
    )
    viewer = joiner_term(user_env, info, viewer_key)  # first in, but cannot type
    wait_screen(viewer, "$")
    typist = joiner_term(user_env, info, typist_key)
    wait_screen(typist, "$")
    settle(viewer, typist)
    _cpr_once(typist, [typist, viewer], typist)
    typist.close()
    viewer.close()


def test_screens_queries_nobody_can_answer(user_env: UserEnv, tmp_path: Path) -> None:
    """Host detached, only a viewer: the session answers device attributes and status
    itself, once each."""
    go = tmp_path / "go"
    # Echo off throughout: the session answers at once, possibly before `read -s` would
    # have turned echo off, and the tty would echo the answer.
    script = (
        f"stty -echo; while [ ! -e {go} ]; do sleep 0.1; done; "
        "printf '\\033[c'; read -rs -d c -t 3 da; "
        "printf '\\033[5n'; read -rs -d n -t 3 st; "
        "read -rs -t 1 extra; "
        'echo "da[${da#?}] st[${st#?}] extra[${#extra}]"; sleep 60'
    )
    info = detached(user_env, "q0", "--default-role", "viewer", cmd=["bash", "-c", script])
    viewer = joiner_term(user_env, info, make_key(tmp_path / "v"))
    settle(viewer)
    go.touch()
    wait_screen(viewer, "extra[")
    settle(viewer)
    assert "da[[?62;22] st[[0] extra[0]" in viewer.display(), screen_text(viewer)
    assert viewer.term.queries == []  # the viewer's terminal was never asked
    viewer.close()
    headless(user_env, "session", "stop", "q0")
