"""The shell prompt's fast path: what it takes on, and that it imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys

from upterm.ctl.prompt import parse


def test_only_the_prompt_question_is_taken_on() -> None:
    assert parse(["session", "current", "-q", "-o", "template=[{name}] "]) == ("[{name}] ", True)
    assert parse(["se", "c", "--output=template={name}"]) == ("{name}", False)
    assert parse(["session", "current", "-otemplate={clientCount}"]) == ("{clientCount}", False)
    # Anything else is the full client's: other formats, other commands, unknown flags.
    assert parse(["session", "current"]) is None
    assert parse(["session", "current", "-o", "json"]) is None
    assert parse(["session", "info", "x", "-o", "template={name}"]) is None
    assert parse(["session", "current", "-o", "template={name}", "--help"]) is None
    assert parse(["--version"]) is None


def test_the_fast_path_imports_no_asyncio_click_or_typing() -> None:
    code = (
        "import sys, upterm.ctl.prompt, upterm.ctl.template, msgpack; "
        "print(sorted(m for m in ('asyncio', 'click', 'typing', 're', 'asyncssh') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
