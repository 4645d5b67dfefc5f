"""The benchmark runner, run with tiny sizes so it never rots (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    assert any(n.startswith("per-joiner throughput, 4 joiners (median)") for n in names)
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
        if figure["name"].startswith(("daemon idle wakeups", "uptermd CPU with")):
            assert figure["value"] >= 0, figure  # none at all is the best case
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
