"""The host decides who gets in and who may type, live: approvals, roles, kicks."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SSH_OPTS, PtyClient, UserEnv, make_key, wait_for
from tests.e2e.test_cli_e2e import headless
from tests.e2e.test_host_features_e2e import SHELL, detached, join, session_info

pytestmark = pytest.mark.e2e


def info_of(user_env: UserEnv, name: str) -> dict:
    return json.loads(headless(user_env, "session", "info", name, "-o", "json").stdout)


def test_approve_and_deny_in_the_host_terminal(user_env: UserEnv, tmp_path: Path) -> None:
    host = PtyClient(["upterm", "host", "--accept", "--approve", "--", *SHELL], user_env.env)
    host.expect(b"sends a ~).")
    first = join(user_env, session_info(user_env), make_key(tmp_path / "a"))
    host.expect(b"asks to join: ~y lets in, ~n refuses")
    assert session_info(user_env)["pending"][0]["fingerprint"].startswith("SHA256:")
    first.expect(b"[upterm: waiting for the host to let you in]")
    time.sleep(0.5)
    assert b"$ " not in first.seen  # still waiting
    host.type("\r~y")
    first.expect(b"$ ")
    host.expect(b" let in]")
    second = join(user_env, session_info(user_env), make_key(tmp_path / "b"))
    host.seen = b""
    host.expect(b"asks to join")
    host.type("\r~n")
    assert second.wait(20) == 1
    assert b"upterm: the host did not let you in." in second.seen
    # Nobody waiting: ~y and ~n are not escapes; the program gets them as typed.
    host.type("\r~yes-$((3+4))\r")
    host.expect(b"~yes-7: command not found")
    first.close()
    host.type("exit 0\r")
    assert host.wait() == 0


def test_approve_from_another_shell_and_timeout(user_env: UserEnv, tmp_path: Path) -> None:
    detached(user_env, "gate", "--approve", "--approve-timeout", "3s")
    joiner = join(user_env, info_of(user_env, "gate"), make_key(tmp_path / "a"))
    wait_for(lambda: info_of(user_env, "gate")["pending"], what="a waiting joiner")
    waiting = info_of(user_env, "gate")["pending"][0]["id"]
    out = headless(user_env, "session", "approve", "gate", waiting)
    assert out.returncode == 0, out.stderr
    joiner.expect(b"$ ")
    ignored = join(user_env, info_of(user_env, "gate"), make_key(tmp_path / "b"))
    started = time.monotonic()
    assert ignored.wait(20) == 1  # nobody answered: refused
    assert b"upterm: the host did not answer in time; ask them, then join again." in ignored.seen
    assert 2 < time.monotonic() - started < 15
    bad = headless(user_env, "session", "approve", "gate", "999")
    assert bad.returncode == 1 and "no joiner 999 is waiting for approval" in bad.stderr
    joiner.close()


def test_roles_change_live_and_kick(user_env: UserEnv, tmp_path: Path) -> None:
    typist_key, viewer_key = make_key(tmp_path / "t"), make_key(tmp_path / "v")
    info = detached(
        user_env,
        "roles",
        "--authorized-keys",
        f"{typist_key}.pub",
        "--authorized-keys",
        f"{viewer_key}.pub",
        "--role",
        f"{viewer_key}.pub=viewer",
    )
    typist = join(user_env, info, typist_key)
    viewer = join(user_env, info, viewer_key)
    typist.expect(b"$ ")
    viewer.expect(b"$ ")
    made = tmp_path / "made"
    viewer.type(f"touch {made}-by-viewer\r")
    typist.type("echo typist-$((3+4))\r")
    viewer.expect(b"typist-7")  # a viewer sees everything
    assert not Path(f"{made}-by-viewer").exists()
    clients = {c["source"]: c for c in info_of(user_env, "roles")["clients"]}
    viewer_id = clients[f"{viewer_key}.pub"]["id"]
    assert clients[f"{viewer_key}.pub"]["role"] == "viewer"
    assert clients[f"{typist_key}.pub"]["role"] == "typist"

    # Pass the keyboard.
    assert headless(user_env, "session", "role", "roles", viewer_id, "typist").returncode == 0
    viewer.expect(b"[upterm: you can type now]")
    viewer.type(f"touch {made}-now\r")
    wait_for(lambda: Path(f"{made}-now").exists(), what="the new typist's keystrokes")
    assert headless(user_env, "session", "role", "roles", viewer_id, "viewer").returncode == 0
    viewer.expect(b"[upterm: you are a viewer now]")

    # Kick.
    assert headless(user_env, "session", "kick", "roles", viewer_id).returncode == 0
    assert viewer.wait(15) != 0
    assert b"the host removed you from the session" in viewer.seen
    wait_for(lambda: len(info_of(user_env, "roles")["clients"]) == 1, what="one joiner left")
    gone = headless(user_env, "session", "kick", "roles", viewer_id)
    assert gone.returncode == 1 and "no joiner" in gone.stderr
    typist.close()


def test_default_role_viewer(user_env: UserEnv, joiner_key: Path, tmp_path: Path) -> None:
    info = detached(user_env, "watch", "--default-role", "viewer")
    joiner = join(user_env, info, joiner_key)
    joiner.expect(b"$ ")
    joiner.type(f"touch {tmp_path / 'nope'}\r")
    time.sleep(1)
    assert not (tmp_path / "nope").exists()
    joiner.close()


def test_a_key_query_neither_asks_the_host_nor_tells_the_joiner(
    user_env: UserEnv, tmp_path: Path
) -> None:
    """OpenSSH offers a key before signing with it. With a passphrase it cannot give
    (BatchMode), it only ever asks: the host is not asked, and the answer is the same "yes"
    for a key the host would refuse (end to end, the host's own server answers)."""
    ok = make_key(tmp_path / "ok")
    detached(user_env, "asked", "--approve", "--authorized-keys", f"{ok}.pub")
    info = info_of(user_env, "asked")
    stranger = tmp_path / "stranger"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(stranger)], check=True
    )
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host upterm\n  IdentityFile {stranger}\n"
        f"Host 127.0.0.1\n  IdentityFile {ok}\n"
        "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
        "  IdentitiesOnly yes\n  BatchMode yes\n"
    )
    e2e = subprocess.run(
        ["ssh", "-F", str(config), "-v", *shlex.split(info["e2eCommand"])[1:], "true"],
        capture_output=True, text=True, timeout=30, env=user_env.env,
    )  # fmt: skip
    assert e2e.returncode == 255
    assert f"Server accepts key: {stranger}" in e2e.stderr, e2e.stderr[-2000:]
    relay = subprocess.run(
        [*shlex.split(info["sshCommand"]), *SSH_OPTS, "-o", "BatchMode=yes", "-i", str(stranger)],
        capture_output=True, text=True, timeout=30, env=user_env.env,
    )  # fmt: skip
    assert relay.returncode == 255
    assert info_of(user_env, "asked")["pending"] == []
