"""``upterm ci`` as a CI job runs it: no terminal, GitHub's files and variables."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import RelayProc, UserEnv, make_key, wait_for
from tests.e2e.test_cli_e2e import Joiner, headless

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def job_env(user_env: UserEnv, tmp_path: Path, keys_url: str, **extra: str) -> dict[str, str]:
    """What a GitHub Actions runner gives a step."""
    (tmp_path / "output").write_text("")
    (tmp_path / "summary").write_text("")
    return {
        **user_env.env,
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "GITHUB_ACTOR": "octocat",
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary"),
        "GITHUB_WORKSPACE": str(tmp_path / "workspace"),
        "UPTERM_GITHUB_KEYS_URL": keys_url,
        "UPTERM_KNOWN_HOSTS": str(tmp_path / "known_hosts"),
        **extra,
    }


def run_ci(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["upterm", "ci", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # no controlling terminal
    )


def shared(user_env: UserEnv, job: subprocess.Popen[str], name: str = "ci") -> dict:
    wait_for(
        lambda: name in headless(user_env, "session", "list").stdout or job.poll() is not None,
        30,
        what="the job's session",
    )
    assert job.poll() is None, job.communicate()
    return json.loads(headless(user_env, "session", "info", name, "-o", "json").stdout)


def test_the_actor_joins_the_line_is_published_and_the_job_goes_on(
    user_env: UserEnv,
    relay: RelayProc,
    keys_server,
    tmp_path: Path,
) -> None:
    url, root = keys_server
    actor = make_key(tmp_path / "actor")
    (root / "octocat.keys").write_text((tmp_path / "actor.pub").read_text())
    env = job_env(user_env, tmp_path, url)
    job = run_ci(env, "--server", relay.url, "--wait-timeout", "60s", "--", "bash", "--norc")
    info = shared(user_env, job)
    assert [k["comment"] for k in info["authorizedKeys"]] == ["github:octocat"]
    outputs = dict(line.split("=", 1) for line in (tmp_path / "output").read_text().splitlines())
    assert outputs["ssh-command"] == info["sshCommand"]
    assert outputs["session-id"] == info["sessionId"]
    assert outputs["sftp-command"] == info["sftpCommand"]
    summary = (tmp_path / "summary").read_text()
    assert info["sshCommand"] in summary and "Who may join: github:octocat." in summary
    joiner = Joiner(info, actor)
    joiner.type("echo kept-out-of-the-log-$((6*7))\r")
    joiner.expect(b"kept-out-of-the-log-42")
    wait_for(lambda: json.loads(
        headless(user_env, "session", "info", "ci", "-o", "json").stdout
    )["hadJoiner"], what="the join")  # fmt: skip
    joiner.close()
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert f"::notice title=upterm::Join this job: {info['sshCommand']}" in out
    assert "kept-out-of-the-log" not in out  # the session's output stays out of the log
    assert "upterm: the last joiner left; the job goes on" in err
    wait_for(lambda: "ci" not in headless(user_env, "session", "list").stdout, what="stop")


def test_nobody_joins_or_a_continue_file_appears(
    user_env: UserEnv,
    relay: RelayProc,
    keys_server,
    tmp_path: Path,
) -> None:
    url, root = keys_server
    actor = make_key(tmp_path / "actor")
    (root / "octocat.keys").write_text((tmp_path / "actor.pub").read_text())
    env = job_env(user_env, tmp_path, url)
    started = time.monotonic()
    job = run_ci(env, "--server", relay.url, "--wait-timeout", "3s")
    out, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    assert "upterm: nobody joined within 3 s; the job goes on" in err
    assert 3 <= time.monotonic() - started < 40
    assert headless(user_env, "session", "list", "-o", "json").stdout.strip() == "[]"

    # Someone joins (the wait timeout no longer counts), then the job is told to go on.
    (tmp_path / "workspace").mkdir()
    job = run_ci(
        env, "--server", relay.url, "--wait-timeout", "3s", "--log-session-output",
        "--", "bash", "--norc",
    )  # fmt: skip
    info = shared(user_env, job)
    joiner = Joiner(info, actor)
    joiner.type("echo in-the-log-$((2*21))\r")
    joiner.expect(b"in-the-log-42")
    time.sleep(5)  # past the wait timeout: someone joined, so the job still waits
    assert job.poll() is None
    (tmp_path / "workspace" / "continue").touch()  # the default continue file
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert f"{tmp_path / 'workspace' / 'continue'} exists; the job goes on" in err
    assert "in-the-log-42" in out  # --log-session-output
    joiner.close()


def test_no_keys_no_session(
    user_env: UserEnv,
    relay: RelayProc,
    keys_server,
    tmp_path: Path,
) -> None:
    url, root = keys_server
    env = job_env(user_env, tmp_path, url)
    # The actor has no published keys (404): refused, with an error annotation.
    job = run_ci(env, "--server", relay.url)
    out, err = job.communicate(timeout=60)
    assert job.returncode != 0
    assert out.startswith("::error title=upterm::") and "octocat" in out
    assert len(err.strip().splitlines()) == 1
    (root / "octocat.keys").write_text("")
    job = run_ci(env, "--server", relay.url)
    _, err = job.communicate(timeout=60)
    assert job.returncode != 0 and "refusing to open the session to everyone" in err
    # Not on GitHub, and no key source given: nothing to restrict to, so nothing shared.
    plain = {k: v for k, v in env.items() if not k.startswith("GITHUB_")}
    job = run_ci(plain, "--server", relay.url)
    out, err = job.communicate(timeout=60)
    assert job.returncode == 2 and out == ""
    assert err.strip() == (
        "upterm: upterm ci needs --authorized-keys or a --*-user: its join line lands in "
        "the CI log, which others may read"
    )
    assert headless(user_env, "session", "list", "-o", "json").stdout.strip() == "[]"
