"""``upterm ci``: share a CI job's terminal, say where, and let the job go on.

Sans-I/O pieces (what is published, and how for each CI) and the wait loop the command
runs once its session is shared. The join line is published where the CI shows it: on
GitHub Actions as a step output (``GITHUB_OUTPUT``), in the job summary
(``GITHUB_STEP_SUMMARY``) and as a notice annotation; elsewhere as a plain line (the card
is printed anyway). The job goes on when the shared command ends, when the last joiner
leaves, when a continue file appears, or when nobody joined within the wait timeout (which
stops counting at the first join).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: How often the loop looks at continue files and the wait timeout.
POLL_S = 1.0


def workflow_escape(text: str) -> str:
    """A GitHub workflow command's message, escaped as the runner reads it."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def default_continue_files(env: Mapping[str, str]) -> tuple[str, ...]:
    """``/continue``, and ``continue`` in the GitHub workspace when there is one."""
    files = ["/continue"]
    if env.get("GITHUB_WORKSPACE"):
        files.append(str(Path(env["GITHUB_WORKSPACE"]) / "continue"))
    return tuple(files)


@dataclass(frozen=True)
class Published:
    """What to write where, for one session."""

    stdout: list[str]
    outputs: dict[str, str]
    summary: str


def publication(
    info: Mapping[str, Any], wait_timeout: str, continue_files: Sequence[str], github: bool
) -> Published:
    """The lines and values that tell people how to join (and how the job goes on)."""
    ssh = str(info.get("sshCommand") or "")
    e2e = str(info.get("e2eCommand") or "")
    join = ssh or e2e
    how_on = (
        f"The job goes on when the last joiner leaves, when {' or '.join(continue_files)} "
        f"exists, or if nobody joins within {wait_timeout}."
    )
    stdout = [f"upterm: join this job's terminal with: {join}"]
    if e2e and ssh:
        stdout.append(f"upterm: end to end (the relay sees nothing): {e2e}")
    stdout.append(f"upterm: {how_on}")
    if github:
        stdout.append(f"::notice title=upterm::{workflow_escape('Join this job: ' + join)}")
    outputs = {
        "session-id": str(info.get("sessionId", "")),
        "ssh-command": ssh,
        "e2e-command": e2e,
        "sftp-command": str(info.get("sftpCommand") or ""),
    }
    keys = info.get("authorizedKeys") or []
    who = ", ".join(sorted({str(k.get("comment") or k.get("fingerprint")) for k in keys}))
    summary = "\n".join(
        [
            "### Join this job's terminal (upterm)",
            "",
            "```sh",
            join,
            "```",
            *([f"End to end: `{e2e}`", ""] if e2e and ssh else [""]),
            f"Who may join: {who or 'nobody'}.",
            "",
            how_on,
            "",
        ]
    )
    return Published(stdout, outputs, summary)


def write_github_files(env: Mapping[str, str], published: Published) -> None:
    """Append the step outputs and the job summary where the runner reads them."""
    output = env.get("GITHUB_OUTPUT")
    if output:
        with open(output, "a", encoding="utf-8") as f:
            for name, value in published.outputs.items():
                f.write(f"{name}={value}\n")
    summary = env.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(published.summary + "\n")


async def wait_for_the_job(
    request: Callable[..., Any],
    session: str,
    *,
    wait_timeout_s: float,
    continue_files: Sequence[str],
    say: Callable[[str], None],
) -> str:
    """Until the job may go on; returns why. ``request(kind, **fields)`` asks the daemon."""
    started = time.monotonic()
    joined = False
    while True:
        reply = await request("wait", session=session, timeout_s=POLL_S)
        reason = reply.get("reason")
        if reason == "ended":
            return "the shared command ended"
        if reason == "last_left":
            return "the last joiner left"
        for name in continue_files:
            if os.path.lexists(name):  # noqa: ASYNC240 (a local file, once a second)
                return f"{name} exists"
        if not joined:
            info = (await request("info", session=session))["session"]
            joined = bool(info.get("hadJoiner"))
            waited = time.monotonic() - started
            if not joined and waited >= wait_timeout_s:
                return f"nobody joined within {wait_timeout_s:g} s"
            if joined:
                say("upterm: someone joined; the job waits until the last joiner leaves")
        await asyncio.sleep(0)
