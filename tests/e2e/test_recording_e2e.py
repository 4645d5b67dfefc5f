"""--record writes asciicast v2 that asciinema reads; --record-input attributes keystrokes."""

from __future__ import annotations

import json
import os
import re
import resource
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
    # No keystrokes without --record-input: who typed, and how much, only.
    assert {e[1] for e in events} <= {"o", "r", "m"}
    typed = [e[2] for e in events if e[1] == "m"]
    assert typed and all(re.fullmatch(r"SHA256:\S+ typed \d+ bytes", m) for m in typed), typed
    assert sum(int(m.split()[-2]) for m in typed) == len("echo x-$((3*3))\r")
    bad = headless(
        user_env, "host", "--accept", "--record", "/nonexistent/dir/x.cast", "--", "true"
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("upterm: cannot record to /nonexistent/dir/x.cast:")
    lone = headless(user_env, "host", "--accept", "--record-input", "--", "true")
    assert lone.returncode == 2 and "--record-input needs --record" in lone.stderr


def _events(cast: Path) -> list[list]:
    return [json.loads(line) for line in cast.read_text().splitlines()[1:]]


@pytest.mark.parametrize("record_input", [True, False])
def test_a_password_at_a_read_s_prompt_is_never_recorded(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path, record_input: bool
) -> None:
    """Whatever the flags, what is typed while the terminal reads a line without echo is
    absent from the recording byte for byte; only who typed then is marked. Typing at
    bash's own prompt (readline, which also turns echo off) is recorded as usual."""
    cast = tmp_path / "secret.cast"
    flags = ["--record", str(cast), *(["--record-input"] if record_input else [])]
    host = PtyClient(
        ["upterm", "host", "--accept", "--quiet", *flags, "--", *SHELL], user_env.env, 100, 30
    )
    host.expect(b"sends a ~).")
    host.type("read -s -p 'host password: ' pw; echo host-got-${#pw}\r")
    host.expect(b"host password: ")
    host.type("Hunter2-S3cret\r")
    host.expect(b"host-got-14")
    joiner = join(user_env, session_info(user_env), joiner_key)
    joiner.expect(b"$ ")
    joiner.type("read -s -p 'joiner passphrase: ' pp; echo joiner-got-${#pp}\r")
    joiner.expect(b"joiner passphrase: ")
    joiner.type("Correct-Horse-Battery\r")
    joiner.expect(b"joiner-got-21")
    fingerprint = session_info(user_env)["clients"][0]["fingerprint"]
    joiner.close()
    host.type("exit\r")
    assert host.wait() == 0
    wait_for(lambda: cast.exists() and cast.read_text().endswith("\n"), what="the recording")
    raw = cast.read_bytes()
    for secret in (b"Hunter2-S3cret", b"Correct-Horse-Battery", b"Hunter2", b"Battery"):
        assert secret not in raw
    markers = [e[2] for e in _events(cast) if e[1] == "m"]
    assert "host typed with echo off (not recorded)" in markers
    assert f"{fingerprint} typed with echo off (not recorded)" in markers
    typed = "".join(e[2] for e in _events(cast) if e[1] == "i")
    if record_input:
        assert "read -s -p 'host password: '" in typed  # the visible line is kept
    else:
        assert typed == "" and any(m.startswith("host typed ") for m in markers)


def _full_disk(tmp_path: Path) -> tuple[Path, object]:
    """A directory that fills up after 64 KiB: a small tmpfs as root, else (the test
    runs the daemon under) a file-size limit."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True
        )
        if mounted.returncode == 0:
            return where, None

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    return where, limit


@pytest.mark.parametrize("required", [True, False])
def test_a_recording_that_cannot_be_written(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path, required: bool
) -> None:
    where, limit = _full_disk(tmp_path)
    cast = where / "full.cast"
    try:
        flags = ["--record", str(cast), *(["--record-required"] if required else [])]
        host = PtyClient(
            ["upterm", "host", "--accept", "--quiet", *flags, "--", *SHELL],
            user_env.env, 100, 30, preexec=limit,
        )  # fmt: skip
        host.expect(b"sends a ~).")
        joiner = join(user_env, session_info(user_env), joiner_key)
        joiner.expect(b"[upterm: this session is being recorded]")
        # 200 KiB of output: more than the file system takes.
        host.type("for i in $(seq 1 2500); do echo line-$i-of-filler-text-to-fill-the-disk; done\r")
        if required:
            assert host.wait(30) != 0
            assert b"--record-required ends the session" in host.seen
        else:
            host.expect(b"the session goes on unrecorded")
            joiner.expect(b"this session is no longer being recorded")
            info = session_info(user_env)
            assert info["recordingError"] and "STOPPED" in (
                headless(user_env, "session", "info", str(info["sessionId"])).stdout
            )
            host.type("echo still-here-$((6*7))\r")
            host.expect(b"still-here-42")
            host.type("exit\r")
            host.wait(30)
        joiner.close()
        # Cut back to its last whole event: every line parses, asciinema plays it.
        lines = cast.read_text().splitlines()
        assert lines and all(json.loads(line) is not None for line in lines)
        played = subprocess.run(
            [str(Path(sys.executable).parent / "asciinema"), "cat", str(cast)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert played.returncode == 0, played.stderr
        assert "line-1-of-filler" in played.stdout
    finally:
        if limit is None:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
