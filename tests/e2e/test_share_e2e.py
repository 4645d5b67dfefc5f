"""A person shares a terminal and another joins it: real upterm, uptermd, ssh and tmux."""

from __future__ import annotations

import os
import re
import select
import shlex
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import (
    VENV_BIN,
    RelayProc,
    Tmux,
    UserEnv,
    _kill_processes_of,
    make_key,
    ssh_join_command,
)

pytestmark = pytest.mark.e2e

JOIN_RE = re.compile(r"^SSH:\s+(ssh \S+@\S+(?: -p \d+)?)\s*$", re.M)


def start_host(tmux: Tmux, args: str) -> str:
    """Run ``upterm host ARGS`` in pane 0; return the printed join line."""
    tmux.send(tmux.panes[0], f"upterm host {args}; echo host-rc=$?")
    screen = tmux.wait_text(tmux.panes[0], "SSH:", timeout=30)
    match = JOIN_RE.search(screen)
    assert match, screen
    return match.group(1)


def test_host_and_join_with_builtin_relay(tmux: Tmux, user_env: UserEnv, joiner_key) -> None:
    """The main job: no --server, the daemon's built-in relay, a plain OpenSSH joiner."""
    host_pane = tmux.panes[0]
    join_line = start_host(tmux, "--accept -- bash --norc --noprofile")
    assert ":" in join_line.split("@")[0], "token must be SESSIONID:base64url(node)"
    tmux.wait_text(host_pane, "sends a ~).\n$ ")

    joiner_pane = tmux.split()
    tmux.send(joiner_pane, ssh_join_command(join_line, joiner_key) + "; echo joiner-rc=$?")
    tmux.wait_text(joiner_pane, "$ ")

    # Typed in the host's pane: both see it.
    tmux.send(host_pane, "echo host-typed-$((6*7))")
    tmux.wait_text(host_pane, "host-typed-42")
    tmux.wait_text(joiner_pane, "host-typed-42")
    # Typed in the joiner's pane: both see it.
    tmux.send(joiner_pane, "echo joiner-typed-$((6*8))")
    tmux.wait_text(joiner_pane, "joiner-typed-48")
    tmux.wait_text(host_pane, "joiner-typed-48")

    # `upterm session current` inside the session lists the joiner.
    tmux.send(host_pane, "clear; upterm session current")
    screen = tmux.wait_text(host_pane, "OpenSSH")
    assert re.search(
        r"^  \d+: 127\.0\.0\.1:\d+ SSH-2\.0-OpenSSH.* SHA256:\S+ \[typist\]$", screen, re.M
    ), screen

    # The host ends the shell with status 3: the joiner's ssh ends, upterm host exits 3.
    tmux.send(host_pane, "exit 3")
    tmux.wait_text(joiner_pane, "joiner-rc=3")
    tmux.wait_text(host_pane, "host-rc=3")


def test_authorized_keys_refuse_wrong_key(
    tmux: Tmux, user_env: UserEnv, relay: RelayProc, tmp_path
) -> None:
    """With --authorized-keys, another key is refused; the allowed key joins."""
    good = make_key(tmp_path / "good")
    bad = make_key(tmp_path / "bad")
    known = tmp_path / "known_hosts"
    host_pane = tmux.panes[0]
    tmux.send(
        host_pane,
        f"upterm host --server {relay.url} --accept --known-hosts {shlex.quote(str(known))} "
        f"--authorized-keys {shlex.quote(str(good))}.pub -- bash --norc --noprofile; "
        "echo host-rc=$?",
    )
    # A relay seen for the first time: OpenSSH's question, answered in the terminal.
    screen = tmux.wait_text(host_pane, "(yes/no/[fingerprint])? ")
    assert f"The authenticity of host '[127.0.0.1]:{relay.port} (127.0.0.1)'" in screen
    assert "ED25519 key fingerprint is SHA256:" in screen
    tmux.send(host_pane, "maybe")
    tmux.wait_text(host_pane, "Please type 'yes', 'no' or the fingerprint: ")
    tmux.send(host_pane, "yes")
    screen = tmux.wait_text(host_pane, "SSH:", timeout=30)
    assert "Permanently added" in screen
    match = JOIN_RE.search(screen)
    assert match, screen
    join_line = match.group(1)
    assert known.read_text().startswith(f"[127.0.0.1]:{relay.port} ssh-ed25519 ")

    joiner_pane = tmux.split()
    # LogLevel INFO (set first, so it wins): OpenSSH shows the relay's banner, as it does
    # by default.
    tmux.send(
        joiner_pane, ssh_join_command(join_line + " -o LogLevel=INFO", bad) + " -o BatchMode=yes"
    )
    refused = tmux.wait_text(joiner_pane, "Permission denied (publickey)")
    assert "does not let in key SHA256:" in refused and "only keys the host authorized" in refused

    tmux.send(joiner_pane, "clear; " + ssh_join_command(join_line, good) + "; echo joiner-rc=$?")
    tmux.wait_text(joiner_pane, "$ ")
    tmux.send(joiner_pane, "echo allowed-$((5*5))")
    tmux.wait_text(host_pane, "allowed-25")
    tmux.send(host_pane, "exit")
    tmux.wait_text(joiner_pane, "joiner-rc=0")
    tmux.wait_text(host_pane, "host-rc=0")


def test_two_users_share_one_builtin_relay_address(tmp_path, joiner_key) -> None:
    """Two users (two daemons) on one machine, both on the default built-in relay address:
    the first daemon runs uptermd there; the second never uses a relay that lacks its own key,
    so it runs its own on another port, and a joiner reaches both sessions."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    users = []
    for name in ("alice", "bob"):
        root = Path(tempfile.mkdtemp(prefix=f"ut-{name}-", dir="/tmp"))
        env = {
            "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "HOME": str(root),
            "XDG_RUNTIME_DIR": str(root),
            "XDG_STATE_HOME": str(root / "state"),
            "UPTERM_LOCAL_RELAY_ADDR": f"127.0.0.1:{port}",
        }
        users.append(env)
    procs = []
    try:
        lines = []
        for env in users:
            proc = subprocess.Popen(
                # Bob's daemon finds Alice's relay on the address and runs its own elsewhere.
                [
                    "upterm",
                    "host",
                    "--accept",
                    "--skip-host-key-check",
                    "--",
                    "bash",
                    "--norc",
                    "--noprofile",
                ],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdout is not None
            while True:
                line = proc.stdout.readline().decode()
                assert line, proc.stderr.read() if proc.stderr else ""
                if match := JOIN_RE.match(line):
                    lines.append(match.group(1))
                    break
        # Alice's relay holds the address; Bob's daemon never uses a relay without its own
        # key, so Bob's runs on another port and his join line says so.
        assert lines[0].endswith(f"-p {port}")
        assert not lines[1].endswith(f"-p {port}")
        for i, line in enumerate(lines):
            joiner = subprocess.Popen(
                [*shlex.split(ssh_join_command(line, joiner_key)), "-tt"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert joiner.stdin and joiner.stdout
            joiner.stdin.write(f"echo user-{i}-$((10+{i}))\r".encode())
            joiner.stdin.flush()
            seen = b""
            deadline = time.monotonic() + 20
            while f"user-{i}-{10 + i}".encode() not in seen and time.monotonic() < deadline:
                ready, _, _ = select.select([joiner.stdout], [], [], 0.5)
                if ready:
                    seen += os.read(joiner.stdout.fileno(), 4096)
            joiner.kill()
            joiner.wait()
            assert f"user-{i}-{10 + i}".encode() in seen, seen
    finally:
        for proc in procs:
            proc.kill()
        for env in users:
            _kill_processes_of(env["XDG_RUNTIME_DIR"])
