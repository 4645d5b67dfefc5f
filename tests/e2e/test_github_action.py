"""The composite GitHub Action's script, run as a CI job would run it (no terminal)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RelayProc, UserEnv, make_key, wait_for
from tests.e2e.test_cli_e2e import Joiner, headless

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def run_action(user_env: UserEnv, **inputs: str) -> subprocess.Popen[str]:
    env = {
        **user_env.env,
        "GITHUB_ACTIONS": "true",  # as on a runner: upterm ci speaks workflow commands
        **{f"UPTERM_ACTION_{k.upper()}": v for k, v in inputs.items()},
    }
    return subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "github-action.sh")],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_action_yml_passes_every_input_to_the_script() -> None:
    text = (ROOT / "action.yml").read_text()
    script = (ROOT / "scripts" / "github-action.sh").read_text()
    assert "using: composite" in text
    passed = set(re.findall(r"(UPTERM_ACTION_\w+): \$\{\{ inputs\.([\w-]+) \}\}", text))
    declared = set(re.findall(r"^  ([\w-]+):\n    description:", text, re.M))
    assert {name for _, name in passed} == declared
    for var, _ in passed:
        assert "${" + var in script, var
    assert "default: ${{ github.actor }}" in text


def test_action_shares_with_the_actor_only_and_ends_when_they_leave(
    user_env: UserEnv, relay: RelayProc, keys_server, tmp_path: Path
) -> None:
    url, root = keys_server
    actor = make_key(tmp_path / "actor")
    stranger = make_key(tmp_path / "stranger")
    (root / "octocat.keys").write_text((tmp_path / "actor.pub").read_text())
    user_env.env["UPTERM_KNOWN_HOSTS"] = str(tmp_path / "known_hosts")
    job = run_action(
        user_env, server=relay.url, users="octocat", keys_url=url, timeout="60s", name="ci"
    )
    wait_for(
        lambda: "ci" in headless(user_env, "session", "list").stdout or job.poll() is not None,
        20,
        what="the action to share the session",
    )
    assert job.poll() is None, job.communicate()
    info = json.loads(headless(user_env, "session", "info", "ci", "-o", "json").stdout)
    assert [k["fingerprint"] for k in info["authorizedKeys"]] != []

    refused = subprocess.run(
        ["ssh", *Joiner.ssh_args(info, stranger), "-o", "BatchMode=yes", "true"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    joiner = Joiner(info, actor)
    joiner.expect(b"# " if os.getuid() == 0 else b"$ ")  # the action shares a login shell
    joiner.type("echo debugging-$((6*7))\r")
    joiner.expect(b"debugging-42")
    assert job.poll() is None
    joiner.close()
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert info["sshCommand"] in out
    assert "Host ci" in out
    assert "upterm: the last joiner left" in err
    wait_for(lambda: "ci" not in headless(user_env, "session", "list").stdout, what="stop")


def test_action_fails_closed_without_keys(user_env: UserEnv, relay: RelayProc, keys_server) -> None:
    url, root = keys_server
    job = run_action(user_env, server=relay.url, users="ghost", keys_url=url, timeout="5s")
    out, err = job.communicate(timeout=30)
    assert job.returncode != 0
    # Workflow commands go to stdout, where GitHub reads them.
    assert out.startswith("::error title=upterm::") and "ghost" in out
    assert "404" in err
    (root / "empty.keys").write_text("")
    job = run_action(user_env, server=relay.url, users="empty", keys_url=url, timeout="5s")
    _, err = job.communicate(timeout=30)
    assert job.returncode != 0
    assert "has no SSH keys" in err and "refusing to open the session to everyone" in err
    assert headless(user_env, "session", "list", "-o", "json").stdout.strip() == "[]"
