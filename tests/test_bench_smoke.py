"""The benchmark runner, run with tiny sizes so it never rots (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)


def test_bench_quick_run_reports_every_figure(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--json", str(tmp_path / "b.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"cores", "cpu", "python", "asyncssh", "openssh"} <= set(data["machine"])
    names = [f["name"] for f in data["figures"]]
    assert any(n.startswith("echo latency via uptermd, p50") for n in names)
    assert any(n.startswith("output throughput to 1 joiner") for n in names)
    assert any(n.startswith("join time") for n in names)
    assert any(n.startswith("uptermd memory per idle session") for n in names)
    assert any(n.startswith("daemon memory per idle session") for n in names)
    assert any(n.startswith("pre-auth connections held at the first refusal") for n in names)
    assert "time of a 1 MiB cat, 4 joiners watching" in names
    assert "joiners showing the host's screen 1 s after" in names
    assert "joiners that skipped ahead (4 watching)" in names
    assert any(n.startswith("live joiner's throughput, another one stopped") for n in names)
    assert any(n.startswith("daemon idle wakeups") for n in names)
    assert any(n.startswith("output throughput, end-to-end join") for n in names)
    assert any(n.startswith("echo latency, end-to-end join") for n in names)
    for over_ws in (
        "echo latency, joiner over WebSocket, p50",
        "echo latency, joiner over WebSocket, p99",
        "throughput, joiner over WebSocket",
        "uptermd CPU per relayed MiB, joiner over WS",
        "join time, joiner over WebSocket (median)",
        "throughput, host over WebSocket",
        "uptermd CPU per relayed MiB, host over WS",
        "throughput, host and joiner over WS",
    ):
        figure = next(f for f in data["figures"] if f["name"].startswith(over_ws))
        assert figure["baseline"] and figure["ratio"], figure  # beside plain SSH
    for figure in data["figures"]:
        if figure["name"].startswith(("daemon idle wakeups", "uptermd CPU with", "joiners ")):
            assert figure["value"] >= 0, figure  # counts, and idle figures: 0 can be true
        else:
            assert figure["value"] > 0, figure
        if figure["baseline"] is not None:
            assert figure["baseline"] > 0


#: Upstream's Go binaries, built by hand on machines that compare against upstream (CI has none).
UPSTREAM_BIN = Path(os.environ.get("UPTERM_UPSTREAM_BIN", "/work/upstream-build/bin"))


@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not all((UPSTREAM_BIN / name).is_file() for name in ("upterm", "uptermd")),
    reason=f"upstream's Go binaries are not built here ({UPSTREAM_BIN})",
)
def test_bench_quick_run_measures_upstream_beside_ours(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable, "-m", "bench.run", "--quick", "--upstream-bin", str(UPSTREAM_BIN),
            "--json", str(tmp_path / "b.json"),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=880,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads((tmp_path / "b.json").read_text())["figures"]
    names = [f["name"] for f in figures]
    assert any(n.startswith("echo latency via uptermd, p50") for n in names)  # ours still
    assert any(n.startswith("daemon idle wakeups") for n in names)
    for vs_upstream in (
        "echo latency via uptermd, p50, vs upstream",
        "echo latency via uptermd, p99, vs upstream",
        "echo latency, our host, upstream relay, p50",
        "echo latency, upstream host, our relay, p50",
        "echo latency, host terminal, p50, vs upstream",
        "throughput to 1 joiner (1 MiB), vs upstream",
        "throughput, our host, upstream relay",
        "throughput, upstream host, our relay",
        "uptermd CPU per relayed MiB, vs upstream",
        "relay CPU per MiB, our host, upstream relay",
        "relay CPU per MiB, upstream host, our relay",
        "join time (median), vs upstream",
        "join time, our host, upstream relay (median)",
        "join time, upstream host, our relay (median)",
        "uptermd memory per idle session (50), vs upstream",
        "uptermd CPU with 50 idle sessions, vs upstream",
        "host memory per idle session, vs upstream RSS",
        "host memory per idle session, vs upstream PSS",
    ):
        figure = next(f for f in figures if f["name"] == vs_upstream)
        assert figure["baseline_name"].startswith("upstream"), figure
        if "CPU" in vs_upstream:  # counted in clock ticks: 1 MiB may take none
            assert figure["value"] >= 0 and figure["baseline"] >= 0, figure
        else:
            assert figure["value"] > 0 and figure["baseline"] > 0 and figure["ratio"], figure
    sshd = next(f for f in figures if f["name"].endswith(", vs sshd"))
    assert sshd["name"].startswith("throughput to 1 joiner") and sshd["baseline"] > 0


def test_terminal_state_bench_quick_run_prints_each_kind_of_output() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.screens", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {"plain", "coloured", "editor", "monitor"}
    assert all(float(value) >= 0 for values in rows.values() for value in values)


def test_prompt_bench_quick_run_prints_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.prompt", "--runs", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "prompt, in a session" in out.stdout and "full client" in out.stdout

    def left_behind() -> list[str]:
        """Processes of this bench's private daemon still running."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    environ = (entry / "environ").read_bytes()
                except OSError:
                    continue
                if b"XDG_RUNTIME_DIR=/tmp/upterm-prompt-" in environ:
                    found.append(entry.name)
        return found

    deadline = time.monotonic() + 10
    while left_behind() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left_behind() == []  # its daemon and built-in relay are stopped


# --- the 20-joiner figure's screen comparison, proven on small screens ---------------------

#: Bits of terminal output a shell session's stream could hold before and after a flood.
PIECES = (
    b"$ ", b"hello", b"xx", b"x" * 13, b"\r", b"\n", b"\r\n", b"\x1b[31m", b"\x1b[0m",
    b"\x1b[K", b"\x1b[2J", b"\x1b[H", b"\x1b[3;5H", b"\x1b[2A", b"\x1b[4C", b"\x1b[?7l",
    b"\x1b[?7h", b"\x1b[2;3r", b"\x1b[r", b"\x1b]2;title\x07", b"\x1b7", b"\x1b8", b"\x1b[4h",
    b"\x1b[4l",
    "\u00e9t\u00e9".encode(), b"\t", b"\x08", b"[upterm: a notice]\r\n",
)  # fmt: skip
#: How a run may start: after any piece, inside an escape sequence or a title.
RUN_STARTS = (b"", b"\x1b[", b"\x1b", b"\x1b]2;")


@pytest.mark.parametrize(("cols", "rows"), [(10, 4), (20, 5)])
def test_shortened_runs_leave_the_same_final_screen(cols: int, rows: int) -> None:
    import random

    from bench.final_screen import final_screen, screen_of, shorten_runs, shortened

    rng = random.Random(cols * 1000 + rows)
    longer = (rows + 4) * cols
    lengths = [0, 1, cols, longer - 1, longer, longer + 1, longer + cols - 1, longer + cols]
    lengths += [longer + k * cols + r for k in (2, 7) for r in (0, 1, cols // 2)]
    for case in range(300):
        prefix = b"".join(rng.choice(PIECES) for _ in range(rng.randrange(12)))
        prefix += rng.choice(RUN_STARTS)
        suffix = b"".join(rng.choice(PIECES) for _ in range(rng.randrange(8)))
        runs = [rng.choice(lengths) for _ in range(rng.randrange(1, 3))]
        stream = prefix + b"\x07".join(b"x" * n for n in runs) + suffix
        # Cut anywhere, as reads cut a stream: runs span chunks.
        cuts = sorted(rng.sample(range(1, len(stream)), min(6, len(stream) - 1)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        short = shorten_runs(chunks, cols, rows)
        assert short == shorten_runs([stream], cols, rows), case
        assert len(short) <= len(stream)
        expected = final_screen(stream, cols, rows)
        assert screen_of(chunks, cols, rows) == expected, (case, stream)
    for n in range(3 * longer):  # never below the floor, and only by whole lines
        m = shortened(n, cols, rows)
        assert m == n or ((n - m) % cols == 0 and (rows + 2) * cols <= m <= longer), n
    assert len(shorten_runs([b"x" * (1 << 20)], cols, rows)) <= longer


def test_screens_equal_but_for_upterm_notices() -> None:
    from bench.final_screen import final_screen

    ref = final_screen(b"x" * 200 + b"\r\nDONE\r\n$ ", 20, 4)
    noticed = final_screen(b"x" * 200 + b"\r\nDONE\r\n[upterm: hi]\r\n$ ", 20, 4)
    assert noticed != ref and noticed.equal_but_notices(ref)
    assert not ref.equal_but_notices(ref)
    other = final_screen(b"x" * 200 + b"\r\nDONE\r\n[upterm: hi]\r\n$ x", 20, 4)
    assert not other.equal_but_notices(ref)
    # With room below, a notice moves the lines under it down, the cursor with them.
    ref = final_screen(b"DONE\r\n$ ", 20, 4)
    noticed = final_screen(b"DONE\r\n[upterm: hi]\r\n[upterm: ho]\r\n$ ", 20, 4)
    assert noticed.equal_but_notices(ref)
    assert not final_screen(b"DONE\r\n[upterm: hi]\r\n$ ", 20, 4).equal_but_notices(noticed)


def test_cluster_bench_quick_run_reports_every_figure(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--quick", "--json", str(tmp_path / "c.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "c.json").read_text())
    names = [f["name"] for f in data["figures"]]
    for expected in (
        "join time via another node (a hop), median",
        "echo latency via another node, p50",
        "joiner back after kill -9 of the owning node",
        "joiner back after SIGTERM (drain) of the owning node",
        "registry lookups per second, one node (32 in flight)",
        "lease renewals per second, one node (100 pipelined)",
        "uptermd memory per idle session, redis routing (50)",
        "uptermd CPU with 50 idle sessions, redis routing",
    ):
        assert expected in names, names
    for figure in data["figures"]:
        assert figure["value"] >= 0, figure


def test_bench_transfer_quick_run(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.transfer", "--quick", "--json", str(tmp_path / "t.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures = {f["name"]: f for f in json.loads((tmp_path / "t.json").read_text())["figures"]}
    for leg in ("download", "upload"):
        assert figures[f"scp {leg} of 4 MiB, via uptermd"]["ratio"] > 0
        for who in ("another joiner", "the host's terminal"):
            assert figures[f"echo p99, {who}, during a {leg}"]["baseline"] > 0


def test_bench_web_quick_run_reports_its_figures(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.web", "--quick", "--json", str(tmp_path / "w.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads((tmp_path / "w.json").read_text())["figures"]
    names = [f["name"] for f in figures]
    assert names[0] == "web link opened to the prompt (median)"
    assert names[1].startswith("output to a browser joiner")
    for figure in figures:
        assert figure["value"] > 0 and figure["baseline"] > 0, figure  # beside SSH
