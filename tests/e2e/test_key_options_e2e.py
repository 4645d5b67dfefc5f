"""authorized_keys options hold for joiners: restrict, from=, command=, no-pty, expiry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import UserEnv, make_key
from tests.e2e.test_cli_e2e import headless
from tests.e2e.test_host_features_e2e import detached, join

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def key_line(key: Path, options: str = "") -> str:
    return (options + " " if options else "") + (key.with_suffix(".pub")).read_text().strip()


def test_each_enforced_option_holds_for_its_key(user_env: UserEnv, tmp_path: Path) -> None:
    watcher, robot = make_key(tmp_path / "watcher"), make_key(tmp_path / "robot")
    elsewhere, nopty = make_key(tmp_path / "elsewhere"), make_key(tmp_path / "nopty")
    old = make_key(tmp_path / "old")
    keys = tmp_path / "authorized_keys"
    keys.write_text(
        "\n".join(
            [
                key_line(watcher, "restrict"),
                key_line(robot, 'command="echo own-$((6*7))"'),
                key_line(elsewhere, 'from="10.0.0.0/8,!127.0.0.1"'),
                key_line(nopty, "no-pty,no-port-forwarding"),
                key_line(old, 'expiry-time="20200101"'),
            ]
        )
        + "\n"
    )
    info = detached(user_env, "opts", "--authorized-keys", str(keys))

    # restrict: a viewer, whatever the host tries.
    viewer = join(user_env, info, watcher)
    viewer.expect(b"$ ")
    listed = json.loads(headless(user_env, "session", "info", "opts", "-o", "json").stdout)
    (client,) = listed["clients"]
    assert client["role"] == "viewer"
    promote = headless(user_env, "session", "role", "opts", client["id"], "typist")
    assert promote.returncode != 0 and "restricted to watching" in promote.stderr
    viewer.type("echo typed-$((2+2))\r")
    viewer.settle(0.5)
    assert b"typed-4" not in viewer.seen
    viewer.close()

    # command=: its own process, never the shared terminal.
    own = join(user_env, info, robot)
    own.expect(b"own-42")
    assert own.wait(20) == 0

    # from=, no-pty, expiry-time: refused, each saying why.
    for key, why in (
        (elsewhere, b"your key may not join from 127.0.0.1 (from=)"),
        (nopty, b"authorized without a terminal (no-pty)"),
        (old, b"your key's authorization expired on 2020-01-01"),
    ):
        refused = join(user_env, info, key)
        assert refused.wait(20) == 1
        assert why in refused.seen, refused.seen
    reasons = json.loads(headless(user_env, "session", "info", "opts", "-o", "json").stdout)
    assert len(reasons["refused"]) == 3


def test_an_option_upterm_does_not_enforce_refuses_to_share(
    user_env: UserEnv, tmp_path: Path
) -> None:
    keys = tmp_path / "authorized_keys"
    keys.write_text(
        key_line(make_key(tmp_path / "a"))
        + "\n"
        + key_line(make_key(tmp_path / "b"), 'permitopen="localhost:5432"')
        + "\n"
    )
    out = headless(user_env, "host", "--accept", "--authorized-keys", str(keys), "--", "true")
    assert out.returncode == 1
    assert out.stderr.startswith(
        f"upterm: {keys} line 2: option 'permitopen' is not one upterm enforces; fix or "
        "remove the line"
    ), out.stderr
    assert len(out.stderr.splitlines()) == 1
