"""A person shares a terminal and another joins it: real upterm, uptermd, ssh and tmux."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.conftest import RelayProc, Tmux, UserEnv, make_key, ssh_join_command

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
    tmux.wait_text(host_pane, "connected.\n$ ")

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
    assert re.search(r"^  - 127\.0\.0\.1:\d+ SSH-2\.0-OpenSSH.* SHA256:\S+$", screen, re.M), screen

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
    join_line = start_host(
        tmux,
        f"--server {relay.url} --accept --known-hosts {shlex.quote(str(known))} "
        f"--authorized-keys {shlex.quote(str(good))}.pub -- bash --norc --noprofile",
    )
    host_pane = tmux.panes[0]
    assert known.read_text().startswith(f"[127.0.0.1]:{relay.port} ssh-ed25519 ")

    joiner_pane = tmux.split()
    tmux.send(joiner_pane, ssh_join_command(join_line, bad) + " -o BatchMode=yes")
    tmux.wait_text(joiner_pane, "Permission denied (publickey)")

    tmux.send(joiner_pane, "clear; " + ssh_join_command(join_line, good) + "; echo joiner-rc=$?")
    tmux.wait_text(joiner_pane, "$ ")
    tmux.send(joiner_pane, "echo allowed-$((5*5))")
    tmux.wait_text(host_pane, "allowed-25")
    tmux.send(host_pane, "exit")
    tmux.wait_text(joiner_pane, "joiner-rc=0")
    tmux.wait_text(host_pane, "host-rc=0")
