"""Joiners that fall behind a flood get the screen now and then, not the stream, and the
screen every terminal shows once it ends is the host's (what a newcomer is given)."""

from __future__ import annotations

import os
import select
import signal
import time

import pytest

from bench.final_screen import screen_of
from tests.conftest import UserEnv
from tests.e2e.test_cli_e2e import Joiner
from tests.e2e.test_host_features_e2e import detached

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
FLOOD = 48 << 20


def drain(joiners: list[Joiner], seconds: float) -> None:
    """Read whatever every joiner is sent, for ``seconds``."""
    deadline = time.monotonic() + seconds
    fds = {j.proc.stdout.fileno(): j for j in joiners if j.proc.stdout}
    while (left := deadline - time.monotonic()) > 0:
        for fd in select.select(list(fds), [], [], min(left, 0.1))[0]:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                fds[fd].seen += chunk


def test_joiners_behind_a_flood_get_frames_and_end_on_the_hosts_screen(
    user_env: UserEnv, joiner_key
) -> None:
    info = detached(user_env, "frames")
    typist = Joiner(info, joiner_key)
    typist.expect(b"$ ")
    watchers = [Joiner(info, joiner_key) for _ in range(3)]
    for w in watchers:
        w.expect(b"$ ")
    start = [len(w.seen) for w in watchers]
    for w in watchers:
        os.kill(w.proc.pid, signal.SIGSTOP)  # they fall behind at once
    try:
        typist.type(f"head -c {FLOOD} /dev/zero | tr '\\0' x; echo; echo END-$((4+4))\r")
        drain([typist], 0.5)
    finally:
        for w in watchers:
            os.kill(w.proc.pid, signal.SIGCONT)
    everyone = [typist, *watchers]
    deadline = time.monotonic() + 90
    while b"END-8" not in typist.seen[-4096:]:
        assert time.monotonic() < deadline, "the flood did not end"
        drain(everyone, 0.2)
    drain(everyone, 1.5)  # the last frame, then live again
    newcomer = Joiner(info, joiner_key)
    newcomer.expect(b"END-8")
    drain([newcomer], 1.0)
    reference = screen_of([bytes(newcomer.seen)], 80, 24)
    assert reference.lines[-2:] == ("END-8", "$") or "END-8" in reference.lines
    assert sum("x" * 80 in line for line in reference.lines) >= 10  # the flood's end shows
    for w, before in zip(watchers, start, strict=True):
        got = bytes(w.seen[before:])
        # Frames while it streamed: a fraction of the flood, not the flood.
        assert got.count(b"x") < FLOOD // 4, got.count(b"x")
        assert b"output skipped to catch up" in got  # said in the title
        assert screen_of([got], 80, 24) == reference
    assert screen_of([bytes(typist.seen)], 80, 24) == reference
    # And they are live again.
    watchers[0].type("echo back-$((5+5))\r")
    for j in everyone:
        j.expect(b"back-10")
    for j in [*everyone, newcomer]:
        j.close()
