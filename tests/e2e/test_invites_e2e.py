"""Invites: a join line for one identity, a number of uses, a lifetime; revocable."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SSH_OPTS, UserEnv, make_key
from tests.e2e.test_cli_e2e import headless
from tests.e2e.test_host_features_e2e import detached

pytestmark = pytest.mark.e2e


def invite(user_env: UserEnv, *args: str) -> dict:
    out = headless(user_env, "session", "invite", "inv", *args, "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def try_join(line: str, key: Path) -> tuple[int, str]:
    """Join with ``line``, run one command, return (status, what was seen)."""
    proc = subprocess.run(
        [*shlex.split(line), "-i", str(key), *SSH_OPTS, "-o", "BatchMode=yes", "-tt"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_invites(user_env: UserEnv, keys_server, tmp_path: Path) -> None:
    url, root = keys_server
    user_env.env["UPTERM_GITHUB_KEYS_URL"] = url
    member, bob, stranger = (make_key(tmp_path / n) for n in ("member", "bob", "stranger"))
    (root / "bob.keys").write_text((tmp_path / "bob.pub").read_text())
    info = detached(
        user_env,
        "inv",
        "--authorized-keys",
        f"{member}.pub",
        # Each joiner that gets in runs this and leaves: proof of entry, no shared state.
        "--force-command",
        "bash --norc -c 'echo inside-$((6*6))'",
    )
    # The member gets in with the normal line; Bob is not authorized and does not.
    status, seen = try_join(info["sshCommand"], member)
    assert (status, "inside-36" in seen) == (0, True), seen
    status, _ = try_join(info["sshCommand"], bob)
    assert status != 0

    # An invite for Bob's GitHub keys, one use.
    for_bob = invite(user_env, "--for", "github:bob", "--expires", "10m")
    assert for_bob["sshCommand"] != info["sshCommand"]
    assert f"+{for_bob['code']}:" in for_bob["sshCommand"]
    status, seen = try_join(for_bob["sshCommand"], stranger)  # not Bob: refused, told why
    assert status != 0 and "upterm: this invite is for someone else's key" in seen
    status, seen = try_join(for_bob["sshCommand"], bob)
    assert (status, "inside-36" in seen) == (0, True), seen
    status, seen = try_join(for_bob["sshCommand"], bob)  # used up
    assert "upterm: this invite is no longer valid" in seen

    # An invite for anyone, twice; revoked after one use.
    open_invite = invite(user_env, "--uses", "2")
    listed = json.loads(headless(user_env, "session", "info", "inv", "-o", "json").stdout)
    assert [i["code"] for i in listed["invites"]] == [open_invite["code"]]
    status, seen = try_join(open_invite["sshCommand"], stranger)
    assert (status, "inside-36" in seen) == (0, True), seen
    assert headless(user_env, "session", "revoke", "inv", open_invite["code"]).returncode == 0
    _, seen = try_join(open_invite["sshCommand"], stranger)
    # Revoked: the relay knows it from the host and refuses it at its own door (its banner
    # says why; this joiner runs with LogLevel=ERROR, which hides banners).
    assert "Permission denied (publickey)" in seen and "upstream" not in seen, seen

    # An invite that expires.
    short = invite(user_env, "--expires", "1s")
    time.sleep(1.5)
    _, seen = try_join(short["sshCommand"], stranger)
    assert "upterm: this invite is no longer valid" in seen

    # A made-up code is refused by the relay itself: it never reaches the host (before,
    # any invite-shaped token went past the relay's key check, for any key).
    forged = short["sshCommand"].replace(short["code"], "AAAAAAAAAA")
    _, seen = try_join(forged, stranger)
    assert "Permission denied (publickey)" in seen and "upstream" not in seen, seen
    gone = headless(user_env, "session", "revoke", "inv", "nope")
    assert gone.returncode == 1 and "no invite 'nope'" in gone.stderr
