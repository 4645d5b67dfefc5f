"""Moderated sessions (--moderators): input only while the moderators are here, held the
moment the last one leaves, and what moderators can do from their own ssh."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import UserEnv, make_key, wait_for
from tests.e2e.test_cli_e2e import headless
from tests.e2e.test_host_features_e2e import detached, join

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def info_of(user_env: UserEnv, name: str) -> dict:
    return json.loads(headless(user_env, "session", "info", name, "-o", "json").stdout)


def test_input_only_while_a_moderator_is_here(user_env: UserEnv, tmp_path: Path) -> None:
    mod, typist = make_key(tmp_path / "mod"), make_key(tmp_path / "typist")
    info = detached(
        user_env, "mod", "--moderators", "1",
        "--authorized-keys", f"{mod}.pub", "--authorized-keys", f"{typist}.pub",
        "--role", f"{mod}.pub=moderator",
    )  # fmt: skip
    assert info["moderators"] == 1 and info["held"] is True
    worker = join(user_env, info, typist)
    worker.expect(b"a moderated session: input only while its moderators are here")
    worker.type(f"touch {tmp_path}/while-held\r")
    time.sleep(1)

    moderator = join(user_env, info, mod)
    worker.expect(b"1 of 1 moderators here: input open")
    wait_for(lambda: not info_of(user_env, "mod")["held"], what="the release")
    worker.type(f"touch {tmp_path}/moderated\r")
    wait_for((tmp_path / "moderated").exists, what="input with a moderator here")
    assert not (tmp_path / "while-held").exists()  # typed while held: dropped, not queued

    # The moderator's connection closes: input stops at once, everyone is told.
    moderator.close()
    worker.expect(b"input paused and output held: 0 of 1 moderators here")
    assert info_of(user_env, "mod")["held"] is True
    worker.type(f"touch {tmp_path}/after-leave\r")
    time.sleep(1.5)
    assert not (tmp_path / "after-leave").exists()  # nothing reached the PTY

    # Back: open again; the moderator acts from its own ssh (~: prompt).
    moderator = join(user_env, info, mod)
    worker.expect(b"input open")
    moderator.expect(b"$ ")
    moderator.type("\r~:who\r")
    moderator.expect(b"[moderator] (you)")
    typist_id = next(c["id"] for c in info_of(user_env, "mod")["clients"] if c["role"] == "typist")
    moderator.type(f"\r~:role {typist_id} viewer\r")
    moderator.expect(b"upterm: done")
    worker.expect(b"you are a viewer now")
    moderator.type(f"\r~:kick {typist_id}\r")
    assert worker.wait(15) != 0
    assert b"the host removed you from the session" in worker.seen
    worker2 = join(user_env, info, typist)
    worker2.expect(b"$ ")
    worker2.type("\r~:end\r")
    worker2.expect(b"only moderators may end; you are a typist")
    moderator.type("\r~:end\r")
    wait_for(lambda: "mod" not in headless(user_env, "session", "list").stdout, what="the end")
    moderator.close()
    worker2.close()


def test_on_moderator_leave_end(user_env: UserEnv, tmp_path: Path) -> None:
    mod = make_key(tmp_path / "mod")
    info = detached(
        user_env, "strict", "--moderators", "1", "--on-moderator-leave", "end",
        "--default-role", "moderator",
    )  # fmt: skip
    moderator = join(user_env, info, mod)
    moderator.expect(b"1 of 1 moderators here: input open")
    moderator.close()
    wait_for(lambda: "strict" not in headless(user_env, "session", "list").stdout, what="end")


def test_moderators_need_someone_who_can_moderate(user_env: UserEnv) -> None:
    out = headless(user_env, "host", "--accept", "--moderators", "1", "--", "true")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("upterm: --moderators 1 needs --role SOURCE=moderator")
