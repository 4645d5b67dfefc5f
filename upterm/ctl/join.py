"""``upterm join LINE``: join with the printed line, and rejoin by yourself after a drop.

The line is run by OpenSSH's ``ssh`` as printed (plus the options given after it), so a
joiner's keys, agent and config work as with a plain ``ssh``. A line carrying the host's
key (the end-to-end line) shows that key's fingerprint first: the relay then sees nothing.
When the connection drops (ssh exits 255 without a refusal, or the relay says the host is
reconnecting), the local terminal is put back in order and the line runs again, after 1 s
doubling to 30 s (with jitter), until it works or ``--retry-for`` has passed. A refusal
(a key not allowed, a spent invite) ends it at once, as does the session ending.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upterm import wire
from upterm.errors import RemoteProtocolError, UsageError

#: What leaves a terminal as a program may have left it: the normal screen, a visible
#: cursor, no mouse reporting, no bracketed paste, normal cursor keys, plain colours.
RESTORE = (
    b"\x1b[?1049l\x1b[?25h\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1005l\x1b[?1006l"
    b"\x1b[?1015l\x1b[?1004l\x1b[?2004l\x1b[?1l\x1b>\x1b[0m"
)
FIRST_WAIT_S = 1.0
MAX_WAIT_S = 30.0
#: A connection that lasted this long starts the backoff again from FIRST_WAIT_S.
STABLE_S = 60.0
#: In ssh's stderr: a refusal, not a drop; rejoining would not help.
REFUSALS = (
    "does not let in key",
    "is not allowed in this session",
    "invite is no longer valid",
    "invite is not valid",
    "the host did not let you in",
    "the host removed you",
    "Host key verification failed",
    "REMOTE HOST IDENTIFICATION HAS CHANGED",
)
#: A refusal only on the first join: when rejoining, a relay that just restarted does not
#: know the session until its host has registered again.
FIRST_REFUSALS = ("Permission denied",)


@dataclass(frozen=True)
class JoinLine:
    """A printed join line, read."""

    argv: list[str]
    #: The host's key when the line pins it (end to end), else None.
    host_key: wire.PublicKey | None

    @property
    def end_to_end(self) -> bool:
        """Whether the relay only carries ciphertext."""
        return self.host_key is not None


def parse_line(line: str) -> JoinLine:
    """The ssh arguments of a printed line (``ssh ...`` or the arguments alone)."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot read the join line: {exc}") from exc
    if argv and Path(argv[0]).name == "ssh":
        argv = argv[1:]
    if not argv or not any("@" in a and not a.startswith("-") for a in argv):
        raise UsageError(
            "that is not a join line; pass the line the host printed, e.g. "
            "upterm join 'ssh TOKEN@relay.example.com -p 2222'"
        )
    host_key = None
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("KnownHostsCommand="):
            value = arg.split("=", 1)[1]
        elif arg == "-o" and i + 1 < len(argv) and argv[i + 1].startswith("KnownHostsCommand="):
            value = argv[i + 1].split("=", 1)[1]
        if value:
            words = value.split()
            with contextlib.suppress(RemoteProtocolError, IndexError):
                # "/bin/echo upterm ssh-ed25519 AAAA..."
                host_key = wire.parse_public_key_line(" ".join(words[2:4]))
    return JoinLine(argv, host_key)


def backoff(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before attempt ``attempt`` (1, 2, ...): 1 s doubling to 30 s, jittered."""
    base = min(MAX_WAIT_S, FIRST_WAIT_S * 2.0 ** (attempt - 1))
    return float(base * (0.5 + rng() / 2))


def run(line: JoinLine, ssh_args: Sequence[str], retry_for_s: float) -> int:
    """Join, rejoin after drops; the exit status of the last ssh (or of the session)."""

    def say(text: str) -> None:
        print(f"upterm: {text}", file=sys.stderr, flush=True)

    if line.host_key is not None:
        say(
            f"joining end to end: the host's key is {line.host_key.fingerprint} "
            "(the relay carries only ciphertext)"
        )
    else:
        say("joining through the relay (it carries the session; the host's -J line is end to end)")
    tty = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin.fileno()) if tty else None
    attempt = 0
    dropped_at: float | None = None
    joined = False
    try:
        while True:
            started = time.monotonic()
            status, stderr = _ssh([*ssh_args, *line.argv])
            lasted = time.monotonic() - started
            _restore(saved)
            refusals = REFUSALS if joined else REFUSALS + FIRST_REFUSALS
            refused = any(r in stderr for r in refusals)
            host_away = wire.BANNER_NO_HOST_PREFIX.strip() in stderr
            if status != 255 or (refused and not host_away):
                return status
            # It got in before this drop (a session lasting a moment counts too).
            joined = joined or "Permission denied" not in stderr
            if lasted >= STABLE_S or dropped_at is None:
                attempt, dropped_at = 0, time.monotonic()
            attempt += 1
            if time.monotonic() - dropped_at > retry_for_s:
                say(f"gave up rejoining after {retry_for_s:g} s")
                return status
            wait = backoff(attempt)
            say(f"the connection dropped; rejoining in {wait:.1f} s (Ctrl-C stops)")
            time.sleep(wait)
    except KeyboardInterrupt:
        _restore(saved)
        return 130


def _ssh(argv: list[str]) -> tuple[int, str]:
    """Run ssh on this terminal; its stderr is shown as it comes and kept."""
    proc = subprocess.Popen(["ssh", *argv], stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err_fd = proc.stderr.fileno()
    kept = bytearray()

    def copy() -> None:
        while chunk := os.read(err_fd, 4096):
            kept.extend(chunk)
            del kept[:-16384]
            with contextlib.suppress(OSError):
                os.write(2, chunk)

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        status = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    reader.join(5)
    return status, kept.decode("utf-8", "replace")


def _restore(saved: list[Any] | None) -> None:
    """Give the terminal back as it was before ssh (if ssh could not)."""
    if saved is not None:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    if sys.stdout.isatty():
        with contextlib.suppress(OSError):
            os.write(sys.stdout.fileno(), RESTORE)
