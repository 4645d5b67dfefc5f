"""Browser joiners: figures a person on the web page feels, each beside an SSH joiner's in
the same run.

- time from opening the web link (a new tab) to the host's prompt on the page, against an
  OpenSSH joiner's time from starting ``ssh`` to the prompt;
- output throughput to a browser joiner: a command writes N MiB (after a trigger, so the
  join is not timed) and the page shows its end marker, against the same to one SSH joiner.
  Each joiner is the session's only viewer; joiners that fall behind skip ahead (frames),
  so this is the time until the browser shows the end, as a person sees it;
- the same N MiB to a WebSocket client that speaks the page's protocol but draws nothing,
  against the SSH joiner: what the relay's web path carries, apart from the browser.

Debian's Chromium, headless, driven by Playwright (``scripts/setup.sh --dev``).

Run: ``python -m bench.web`` (``--quick``: tiny sizes, a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import asyncssh

from bench.run import (
    NO_QUOTAS,
    Figure,
    Report,
    SshJoiner,
    free_port,
    machine_info,
    world,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
END = "END-MARK"


def _end_command(trigger: Path, size: int) -> list[str]:
    """A command that waits for ``trigger``, writes ``size`` bytes, then the end marker."""
    script = (
        f"while [ ! -e {trigger} ]; do sleep 0.02; done; "
        f"head -c {size} /dev/zero | tr '\\0' x; echo; echo END-MA''RK; exec sleep 3600"
    )
    return ["sh", "-c", script]


class _Tab:
    def __init__(self, browser, url: str) -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(viewport={"width": 1000, "height": 640})
        self.page = self.context.new_page()
        self.page.goto(url)

    def wait_text(self, text: str, limit_s: float) -> None:
        # Polled from here: the page's CSP refuses Playwright's in-page predicates (eval).
        deadline = time.monotonic() + limit_s
        probe = f"window.upterm && window.upterm.screenText().includes({json.dumps(text)})"
        while not self.page.evaluate(probe):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not on the page")
            time.sleep(0.005)

    def close(self) -> None:
        self.context.close()


class _BareSocket:
    """What the page does on the socket, without drawing: proves the link, reads output."""

    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        base, _, credential = url.partition("#")
        netloc = base.split("/")[2]
        self.ws = connect(
            f"ws://{netloc}/join/ws", origin=f"http://{netloc}", max_size=None
        ).__enter__()
        auth = {"type": "auth", "credential": credential, "cols": 80, "rows": 24}
        self.ws.send(json.dumps(auth))
        self.tail = b""
        deadline = time.monotonic() + 0.5  # joined and settled
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.ws.recv(timeout=0.1)

    def read_until(self, marker: bytes, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while marker not in self.tail:
            msg = self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(msg, bytes):
                self.tail = (self.tail + msg)[-256:]

    def close(self) -> None:
        self.ws.close()


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    joins, size = (3, 256 * 1024) if args.quick else (15, 32 * 1024 * 1024)
    report = Report(machine_info())
    print(json.dumps(report.machine, indent=2))
    key = asyncssh.generate_private_key("ssh-ed25519")
    with world() as w, sync_playwright() as p:
        w.key = key
        ws_port = free_port()
        _, port = w.start_relay("relay", *NO_QUOTAS, "--ws-addr", f"127.0.0.1:{ws_port}")
        server = f"ssh://127.0.0.1:{port}"
        key_file = w.root / "joiner"
        key_file.write_bytes(key.export_private_key())
        key_file.chmod(0o600)
        ssh = [
            "ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", str(key_file),
            "-p", str(port),
        ]  # fmt: skip
        args_ = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args_)

        # Opening the link to the prompt, against ssh to the prompt.
        info = w.host("first", server, "bash", "--norc", "--noprofile", flags=("--web",))
        url = str(info["webURL"])
        web_ms, ssh_ms = [], []
        for _ in range(joins):
            start = time.perf_counter()
            tab = _Tab(browser, url)
            tab.wait_text("$", 30)
            web_ms.append((time.perf_counter() - start) * 1000)
            tab.close()
            start = time.perf_counter()
            joiner = SshJoiner([*ssh, f"{info['sshUser']}@127.0.0.1"])
            joiner.read_until(b"$ ", 30)
            ssh_ms.append((time.perf_counter() - start) * 1000)
            joiner.close()
        report.add(Figure(
            "web link opened to the prompt (median)", statistics.median(web_ms), "ms",
            statistics.median(ssh_ms), "ssh started to the prompt", "figure",
        ))  # fmt: skip

        # N MiB to one browser, against N MiB to one SSH joiner (separate sessions).
        seconds = {}
        for kind in ("web", "bare", "ssh"):
            trigger = w.root / f"go-{kind}"
            info = w.host(f"flood-{kind}", server, *_end_command(trigger, size), flags=("--web",))
            if kind == "web":
                tab = _Tab(browser, str(info["webURL"]))
                tab.page.wait_for_timeout(500)  # joined and settled
                start = time.perf_counter()
                trigger.touch()
                tab.wait_text(END, 300)
                tab.close()
            elif kind == "bare":
                sock = _BareSocket(str(info["webURL"]))
                start = time.perf_counter()
                trigger.touch()
                sock.read_until(END.encode(), 300)
                sock.close()
            else:
                joiner = SshJoiner([*ssh, f"{info['sshUser']}@127.0.0.1"])
                time.sleep(0.5)
                start = time.perf_counter()
                trigger.touch()
                joiner.read_until(END.encode(), 300)
                joiner.close()
            seconds[kind] = time.perf_counter() - start
            w.upterm("session", "stop", f"flood-{kind}")
        mib = size / 1024 / 1024
        report.add(Figure(
            f"output to a browser joiner ({mib:g} MiB, until shown)", mib / seconds["web"],
            "MiB/s", mib / seconds["ssh"], "one SSH joiner", "figure",
        ))  # fmt: skip
        report.add(Figure(
            f"output to a WebSocket client ({mib:g} MiB, no drawing)", mib / seconds["bare"],
            "MiB/s", mib / seconds["ssh"], "one SSH joiner", "figure (the relay's web path)",
        ))  # fmt: skip
        browser.close()
    if args.json:
        figures = [{**f.__dict__, "ratio": f.ratio} for f in report.figures]
        args.json.write_text(json.dumps({"machine": report.machine, "figures": figures}) + "\n")


if __name__ == "__main__":
    main()
