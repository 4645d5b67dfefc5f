"""What following the terminal's state costs per byte of output (upterm.termstate).

Every read of a session's output goes through :class:`TerminalState.feed` and into the
session's replay logs. This prints, for kinds of output a shared terminal carries (plain
text, coloured listings, a full-screen editor's repaint, a system monitor's refresh), the
tracker's time per MiB against the copy into the replay log that the session makes anyway
(the baseline, measured in the same run), in reads of a typical size.

    .venv/bin/python -m bench.screens
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from upterm.termstate import TerminalState, strip_spans

READ = 4096  # what one PTY read typically brings


def plain(n: int) -> bytes:
    """``seq``: digits and newlines, no escape sequence."""
    return b"".join(b"%d\r\n" % i for i in range(n))


def coloured(n: int) -> bytes:
    """``ls --color``: a colour on and off around each name."""
    return b"".join(
        b"\x1b[01;34mdir%05d\x1b[0m  \x1b[01;32mexe%05d\x1b[0m\r\n" % (i, i) for i in range(n)
    )


def editor(n: int) -> bytes:
    """vim repainting: cursor moves, colours, erase-to-end, cursor hidden and shown."""
    frame = bytearray(b"\x1b[?25l")
    for row in range(1, 50):
        frame += b"\x1b[%d;1H\x1b[38;5;%dm%4d \x1b[0mdef function_%d(arg):\x1b[K" % (
            row,
            row % 200,
            row,
            row,
        )
    frame += b"\x1b[50;1H\x1b[1m-- INSERT --\x1b[0m\x1b[12;9H\x1b[?25h"
    return bytes(frame) * max(1, n // 40)


def monitor(n: int) -> bytes:
    """htop refreshing: many short coloured fields, ncurses' ``ESC(B`` with each colour
    reset, and a scroll region set at each refresh (as htop does): the tracker's worst
    case, an ordered pass over every escape sequence (htop prints a few KiB per second)."""
    frame = bytearray(b"\x1b[1;50r\x1b[H")
    for row in range(2, 50):
        frame += b"\x1b[%dd\x1b[30m\x1b[46m%6d\x1b(B\x1b[m \x1b[36mroot\x1b[39m %5.1f%%\x1b[K" % (
            row,
            row * 37,
            row / 3,
        )
    return bytes(frame) * max(1, n // 40)


def reads(data: bytes) -> list[bytes]:
    return [data[i : i + READ] for i in range(0, len(data), READ)]


def copy_only(chunks: list[bytes]) -> None:
    log = bytearray()
    for chunk in chunks:
        log += chunk
        if len(log) > 65536:
            del log[: len(log) - 65536]


def tracked(chunks: list[bytes]) -> None:
    term = TerminalState()
    log = bytearray()
    for chunk in chunks:
        shown = term.feed(chunk)
        if term.queries:
            shown = strip_spans(shown, term.queries)
        log += shown
        if len(log) > 65536:
            del log[: len(log) - 65536]


def ms_per_mib(work: Callable[[list[bytes]], None], chunks: list[bytes], repeat: int) -> float:
    size = sum(map(len, chunks))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work(chunks)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / (size / (1 << 20)) * 1000


def main() -> None:
    """Print the tracker's cost per MiB for each kind of output."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args()
    n, repeat = (2000, 3) if args.quick else (200_000, 9)
    print(f"{'output':<12} {'tracked ms/MiB':>15} {'copy ms/MiB':>12} {'extra ms/MiB':>13}")
    for name, make in (
        ("plain", plain),
        ("coloured", coloured),
        ("editor", editor),
        ("monitor", monitor),
    ):
        chunks = reads(make(n))
        base = ms_per_mib(copy_only, chunks, repeat)
        cost = ms_per_mib(tracked, chunks, repeat)
        print(f"{name:<12} {cost:>15.2f} {base:>12.2f} {cost - base:>13.2f}")


if __name__ == "__main__":
    main()
