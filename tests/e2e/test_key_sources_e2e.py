"""Joiners' keys from forge accounts: fetched before sharing, failing closed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import UserEnv, make_key
from tests.e2e.test_cli_e2e import Joiner, headless

pytestmark = pytest.mark.e2e


@pytest.fixture
def forges(user_env: UserEnv, keys_server) -> tuple[str, Path]:
    url, root = keys_server
    for forge in ("GITHUB", "GITLAB", "SRHT", "CODEBERG"):
        user_env.env[f"UPTERM_{forge}_KEYS_URL"] = url
    return url, root


def test_forge_keys_let_their_owner_in_and_nobody_else(
    user_env: UserEnv, forges, tmp_path: Path
) -> None:
    _, root = forges
    octo = make_key(tmp_path / "octo")
    bob = make_key(tmp_path / "bob")
    stranger = make_key(tmp_path / "stranger")
    (root / "octocat.keys").write_text((tmp_path / "octo.pub").read_text())
    (root / "~bob.keys").write_text((tmp_path / "bob.pub").read_text())
    out = headless(
        user_env,
        "host",
        "--detach",
        "--accept",
        "--name",
        "forge",
        "--github-user",
        "octocat",
        "--authorized-user",
        "srht:bob",
        "--",
        "bash",
        "--norc",
        "--noprofile",
    )
    assert out.returncode == 0, out.stderr
    # Each source is listed with its keys' fingerprints.
    assert "  github:octocat:\n    - SHA256:" in out.stdout
    assert "  srht:bob:\n    - SHA256:" in out.stdout
    info = json.loads(headless(user_env, "session", "info", "forge", "-o", "json").stdout)
    assert {k["comment"] for k in info["authorizedKeys"]} == {"github:octocat", "srht:bob"}
    for key in (octo, bob):
        joiner = Joiner(info, key)
        joiner.expect(b"$ ")
        joiner.close()
    refused = Joiner(info, stranger)
    assert refused.proc.wait(20) == 255


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--github-user", "ghost"], "ghost.keys failed: HTTP 404"),
        (["--gitlab-user", "empty"], "gitlab user empty has no SSH keys"),
        (["--codeberg-user", "../../etc"], "'../../etc' is not a valid codeberg user name"),
        (["--authorized-user", "myspace:tom"], "use FORGE:NAME with FORGE one of github"),
    ],
)
def test_forge_sources_fail_closed(user_env: UserEnv, forges, args, message) -> None:
    _, root = forges
    (root / "empty.keys").write_text("")
    out = headless(user_env, "host", "--accept", *args, "--", "true")
    assert out.returncode in (1, 2)
    assert message in out.stderr
    assert out.stderr.count("\n") == 1
    # Nothing was shared.
    assert headless(user_env, "session", "list", "-o", "json").stdout.strip() == "[]"


def test_unreachable_forge_fails_closed(user_env: UserEnv) -> None:
    user_env.env["UPTERM_GITHUB_KEYS_URL"] = "http://127.0.0.1:1"
    out = headless(user_env, "host", "--accept", "--github-user", "octocat", "--", "true")
    assert out.returncode == 1
    assert out.stderr.startswith("upterm: fetching http://127.0.0.1:1/octocat.keys failed:")
    assert "refusing to share without those keys" in out.stderr
