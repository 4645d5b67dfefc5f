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


def test_upterm_proxy_takes_the_fast_path_only_for_what_it_knows() -> None:
    from upterm.ctl.prompt import parse_proxy

    url = "wss://T:x@relay"
    assert parse_proxy(["proxy", url]) == (url, None, None)
    assert parse_proxy(["proxy", "--ca-file", "ca.pem", "--proxy=http://p:3128", url]) == (
        url, "ca.pem", "http://p:3128",
    )  # fmt: skip
    assert parse_proxy(["proxy", url, "--ca-file=ca.pem"]) == (url, "ca.pem", None)
    # Anything else is the full client's: help, typos, a missing or second URL, repeats.
    for argv in (
        ["proxy"], ["proxy", "--help"], ["proxy", url, "--help"], ["proxy", "--cafile", "x", url],
        ["proxy", url, url], ["proxy", "--ca-file"], ["proxy", "--proxy", "a", "--proxy", "b", url],
        ["host", url],
    ):  # fmt: skip
        assert parse_proxy(argv) is None, argv


def test_upterm_proxy_fast_path_skips_the_full_client() -> None:
    """ssh starts upterm proxy at every WebSocket join: it imports the WebSocket client,
    not click, the admin protocol or protobuf (80 ms of a join)."""
    code = (
        "import sys, upterm.ctl.prompt, upterm.wsclient; "
        "print(sorted(m for m in ('click', 'google.protobuf', 'upterm.wire', 'asyncssh', "
        "'upterm.adminproto', 'websockets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
