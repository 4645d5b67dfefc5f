"""--record writes asciicast v2 that asciinema reads; --record-input attributes keystrokes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PtyClient, UserEnv, wait_for
from tests.e2e.test_cli_e2e import headless
from tests.e2e.test_host_features_e2e import SHELL, join, session_info

pytestmark = pytest.mark.e2e


def test_recording_with_input(user_env: UserEnv, joiner_key: Path, tmp_path: Path) -> None:
    cast = tmp_path / "pair.cast"
    host = PtyClient(
        [
            *("upterm", "host", "--accept", "--quiet"),
            *("--record", str(cast), "--record-input", "--", *SHELL),
        ],
        user_env.env,
        100,
        30,
    )
    host.expect(b"sends a ~).")
    assert session_info(user_env)["recording"] == str(cast)
    host.type("echo host-said-$((1+1))\r")
    host.expect(b"host-said-2")
    joiner = join(user_env, session_info(user_env), joiner_key)
    joiner.expect(b"[upterm: this session is being recorded, including what you type]")
    joiner.expect(b"$ ")
    joiner.type("echo joiner-said-ünï-$((2+2))\r")
    joiner.expect("joiner-said-ünï-4".encode())
    fingerprint = session_info(user_env)["clients"][0]["fingerprint"]
    joiner.close()
    host.type("exit\r")
    assert host.wait() == 0
    wait_for(lambda: cast.exists() and cast.read_text().endswith("\n"), what="the recording")

    lines = cast.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and header["width"] == 100 and header["height"] == 30
    events = [json.loads(line) for line in lines[1:]]
    assert all(isinstance(e[0], float | int) for e in events)
    times = [e[0] for e in events]
    assert times == sorted(times)
    output = "".join(e[2] for e in events if e[1] == "o")
    assert "host-said-2" in output and "joiner-said-ünï-4" in output
    # Input, attributed: who typed is marked before their keystrokes.
    marks = [(i, e[2]) for i, e in enumerate(events) if e[1] == "m"]
    assert [m for _, m in marks][:2] == ["typed by host", f"typed by {fingerprint}"]
    joiner_typing = "".join(e[2] for e in events[marks[1][0] :] if e[1] == "i")
    assert "joiner-said" in joiner_typing
    # asciinema itself reads the file.
    played = subprocess.run(
        [str(Path(sys.executable).parent / "asciinema"), "cat", str(cast)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert played.returncode == 0, played.stderr
    assert "joiner-said-ünï-4" in played.stdout


def test_output_only_recording_and_bad_path(user_env: UserEnv, joiner_key, tmp_path) -> None:
    cast = tmp_path / "out.cast"
    out = headless(
        user_env,
        "host",
        "--detach",
        "--accept",
        "--name",
        "rec",
        "--record",
        str(cast),
        "--",
        *SHELL,
    )
    assert out.returncode == 0, out.stderr
    joiner = join(user_env, session_info(user_env), joiner_key)
    joiner.expect(b"[upterm: this session is being recorded]")
    joiner.type("echo x-$((3*3))\r")
    joiner.expect(b"x-9")
    joiner.close()
    headless(user_env, "session", "stop", "rec")
    wait_for(lambda: headless(user_env, "session", "list", "-o", "json").stdout.strip() == "[]")
    events = [json.loads(line) for line in cast.read_text().splitlines()[1:]]
    assert {e[1] for e in events} <= {"o", "r"}  # no keystrokes without --record-input
    bad = headless(
        user_env, "host", "--accept", "--record", "/nonexistent/dir/x.cast", "--", "true"
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("upterm: cannot record to /nonexistent/dir/x.cast:")
    lone = headless(user_env, "host", "--accept", "--record-input", "--", "true")
    assert lone.returncode == 2 and "--record-input needs --record" in lone.stderr
