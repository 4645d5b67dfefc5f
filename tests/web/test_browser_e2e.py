"""The browser joiner's page in a real headless Chromium (Debian's, driven by Playwright):
what a person sees and can do, and what another origin cannot.

Each test hosts a real session on a real uptermd with ``--web``; the page is the one the
build made (scripts/build-web.sh). A screenshot of the page is written to the test's output
directory, ``test-artifacts/`` (or ``UPTERM_TEST_ARTIFACTS``), and its path printed in the
run's output.
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright import sync_api as playwright_api

from tests.conftest import UserEnv, start_relay, wait_for
from tests.e2e.test_web_e2e import upterm, web_host, web_host_after
from tests.e2e.test_websocket_e2e import free_port, info
from upterm.relay import web

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]
LOCAL = "127.0.0.1"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    assert os.path.exists(CHROMIUM), "Debian's chromium is needed (scripts/setup.sh --dev)"
    with playwright_api.sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


@pytest.fixture
def web_relay(user_env: UserEnv) -> Iterator[tuple[str, int]]:
    ws_port = free_port()
    relay = start_relay(user_env, None, "--ws-addr", f"{LOCAL}:{ws_port}")
    yield relay.url, ws_port
    relay.proc.terminate()
    relay.proc.wait(5)


#: Where screenshots are kept (gitignored), unless UPTERM_TEST_ARTIFACTS says elsewhere.
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def artifact(tmp_path: Path, name: str) -> Path:
    where = Path(os.environ.get("UPTERM_TEST_ARTIFACTS") or ARTIFACTS)
    where.mkdir(parents=True, exist_ok=True)
    return where / name


def png_rows(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered scanlines of an 8-bit RGB(A) PNG (what Chromium's
    screenshots are), to look at pixels without an imaging library."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, bpp = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


class Page:
    """One tab on the join page, recording console errors and CSP violations."""

    def __init__(self, browser, url: str) -> None:  # type: ignore[no-untyped-def]
        self.context = browser.new_context(viewport={"width": 1000, "height": 640})
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(url)

    def _console(self, message) -> None:  # type: ignore[no-untyped-def]
        # Errors, and any word of the CSP; not the GL driver's performance notes (a
        # screenshot reads the WebGL canvas back).
        text = message.text
        if (
            message.type == "error" or "Content Security Policy" in text
        ) and "GL Driver Message" not in text:
            self.problems.append(text)

    def state(self) -> str:
        return str(self.page.evaluate("window.upterm ? window.upterm.state : ''"))

    def screen(self) -> str:
        return str(self.page.evaluate("window.upterm.screenText()"))

    def wait(self, expression: str, timeout: float = 20) -> None:
        # Polled from here: Playwright's wait_for_function compiles its predicate in the
        # page, which the page's CSP (no eval) rightly refuses.
        deadline = time.monotonic() + timeout
        while not self.page.evaluate(expression):
            assert time.monotonic() < deadline, f"not true on the page: {expression}"
            time.sleep(0.05)

    def wait_text(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen():
            assert time.monotonic() < deadline, f"{text!r} not on the page: {self.screen()!r}"
            time.sleep(0.1)

    def close(self) -> None:
        self.context.close()


def test_the_page_shows_the_terminal_and_only_typists_type(
    browser, web_relay, user_env: UserEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    relay_url, ws_port = web_relay
    session = web_host(user_env, relay_url, "b")
    url = session["webURL"]
    page = Page(browser, url)
    try:
        page.wait("window.upterm && window.upterm.state === 'open'")
        assert page.page.evaluate("window.upterm.role") == "viewer"
        assert "@" in page.page.evaluate("window.upterm.host")
        banner = page.page.inner_text("body")
        assert "viewer" in banner and "not end-to-end" in banner
        # The host's prompt is on the page (bash --norc: "bash-5.2$" or "#").
        page.wait("window.upterm.screenText().trim().length > 0")

        # A viewer's keys do nothing at the PTY.
        marker = tmp_path / "typed"
        page.page.click("#terminal")
        page.page.keyboard.type(f"touch {marker}\n")
        time.sleep(1)
        assert not marker.exists()

        # Made a typist: the banner says so, and its typing reaches the shell, in colour.
        client = info(user_env, "b")["clients"][0]
        assert client["version"] == "upterm-web"
        upterm(user_env, "session", "role", "b", client["id"], "typist")
        page.wait("window.upterm.role === 'typist'")
        assert "typist" in page.page.inner_text("body")
        page.page.keyboard.type(f"touch {marker}; printf '\\033[31mRED%s\\033[0m\\n' TEXT\n")
        wait_for(marker.exists, 10, what="the typist's command to run")
        page.wait_text("REDTEXT")
        red = page.page.evaluate(
            """() => {
                const buf = window.upterm.term.buffer.active;
                for (let y = 0; y < buf.length; y++) {
                    const line = buf.getLine(y);
                    const x = line.translateToString(true).indexOf('REDTEXT');
                    if (x >= 0 && !line.translateToString(true).includes('printf')) {
                        const cell = line.getCell(x);
                        return [cell.isFgPalette(), cell.getFgColor()];
                    }
                }
                return null;
            }"""
        )
        assert red == [True, 1]  # ANSI red, as the shell printed it

        # An underscore is drawn (a row too short for the font's descent clipped it once):
        # a clear screen, then a line of nothing but underscores on the first row.
        page.page.keyboard.type("clear; printf '%s' ________________; sleep 30\n")
        page.wait("window.upterm.screenText().startsWith('________________')")
        box = page.page.eval_on_selector(".xterm-screen", "e => e.getBoundingClientRect().toJSON()")
        rows = int(page.page.evaluate("window.upterm.term.rows"))
        row_h = box["height"] / rows
        shot_png = page.page.screenshot(
            clip={"x": box["x"], "y": box["y"], "width": 16 * 8, "height": row_h}
        )
        _, _, lines = png_rows(shot_png)
        lit = sum(1 for line in lines for v in line[::3] if v > 96)
        assert lit > 20, f"the underscores are not drawn ({lit} bright pixels in their row)"
        page.page.keyboard.press("Control+C")

        shot = artifact(tmp_path, "web-joiner.png")
        page.page.screenshot(path=str(shot))
        assert shot.stat().st_size > 5000
        with capsys.disabled():  # in the run's output, not only on failure
            print(f"\nscreenshot of the web joiner's page: {shot}")

        # Nothing the page did broke its policy or left this origin.
        assert page.problems == [], page.problems
        origin = f"http://{LOCAL}:{ws_port}/"
        socket = f"ws://{LOCAL}:{ws_port}{web.WS_PATH}"
        assert all(r.startswith(origin) or r == socket for r in page.requests), page.requests
    finally:
        page.close()


def test_wrong_revoked_links_and_other_origins_are_refused(
    browser, web_relay, user_env: UserEnv, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    relay_url, ws_port = web_relay
    url = web_host(user_env, relay_url, "r")["webURL"]
    base, _, credential = url.partition("#")

    wrong = Page(browser, f"{base}#{credential[:23]}{'x' * 43}")
    try:
        wrong.wait("window.upterm && window.upterm.state === 'closed'")
        assert wrong.page.evaluate("window.upterm.closeCode") == web.CLOSE_REFUSED
        assert "wrong, expired or revoked" in wrong.page.inner_text("body")
    finally:
        wrong.close()

    revoked = Page(browser, url)
    try:
        revoked.wait("window.upterm.state === 'open'")
        upterm(user_env, "session", "web", "r", "--revoke")
        revoked.wait("window.upterm.state === 'closed'")
        assert revoked.page.evaluate("window.upterm.closeCode") == web.CLOSE_REMOVED
        revoked.page.reload()
        revoked.wait("window.upterm.state === 'closed'")
        assert revoked.page.evaluate("window.upterm.closeCode") == web.CLOSE_REFUSED
    finally:
        revoked.close()

    # A page on another origin (another port is another origin) cannot open the socket,
    # even with the right link in hand.
    class Blank(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>elsewhere</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((LOCAL, 0), Blank)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = Page(browser, f"http://{LOCAL}:{server.server_address[1]}/")
    try:
        outcome = other.page.evaluate(
            """([url, credential]) => new Promise((resolve) => {
                const ws = new WebSocket(url);
                ws.onopen = () => {
                    ws.send(JSON.stringify({type: 'auth', credential, cols: 80, rows: 24}));
                    resolve('opened');
                };
                ws.onclose = (ev) => resolve('closed ' + ev.code);
            })""",
            [f"ws://{LOCAL}:{ws_port}{web.WS_PATH}", credential],
        )
        assert outcome == "closed 1006"  # the upgrade was refused (403)
    finally:
        other.close()
        server.shutdown()


def test_the_page_comes_back_after_the_relay_restarts(
    browser, user_env: UserEnv, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    ws_port = free_port()
    flags = ("--ws-addr", f"{LOCAL}:{ws_port}")
    relay = start_relay(user_env, None, *flags)
    try:
        url = web_host(user_env, relay.url, "again", "--keepalive", "1")["webURL"]
        page = Page(browser, url)
        try:
            page.wait("window.upterm.state === 'open'")
            # A blip: the relay goes away and comes back on the same ports (its state kept).
            relay.proc.kill()
            relay.proc.wait(5)
            page.wait("window.upterm.state === 'reconnecting'")
            relay = start_relay(
                user_env, relay.state_dir, *flags, "--ssh-addr", f"{LOCAL}:{relay.port}"
            )
            # The host redials and declares its link again; the page rejoins by itself.
            page.wait("window.upterm.state === 'open'", timeout=40)
            assert page.page.evaluate("window.upterm.role") == "viewer"
            page.wait("window.upterm.screenText().trim().length > 0")
        finally:
            page.close()
    finally:
        relay.proc.terminate()
        relay.proc.wait(5)


def test_osc52_never_reaches_the_clipboard_and_expired_links_end(
    browser, web_relay, user_env: UserEnv, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    relay_url, ws_port = web_relay
    trigger = tmp_path / "go"
    # The session's program asks the terminal to set the clipboard (OSC 52, "PWNED").
    osc52 = "printf '\\033]52;c;UFdORUQ=\\a'; echo OSC''DONE"
    url = web_host_after(user_env, relay_url, "clip", trigger, osc52, "--web-ttl", "4s")["webURL"]
    page = Page(browser, url)
    try:
        origin = f"http://{LOCAL}:{ws_port}"
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=origin)
        page.wait("window.upterm.state === 'open'")
        page.page.bring_to_front()
        page.page.evaluate("navigator.clipboard.writeText('BEFORE')")
        trigger.touch()
        page.wait_text("OSCDONE")
        assert page.page.evaluate("navigator.clipboard.readText()") == "BEFORE"
        # The link expires: the page is told it was removed, and a reload is refused.
        page.wait("window.upterm.state === 'closed'", timeout=15)
        assert page.page.evaluate("window.upterm.closeCode") == web.CLOSE_REMOVED
        assert "expired" in page.page.inner_text("body")
        page.page.reload()
        page.wait("window.upterm.state === 'closed'")
        assert page.page.evaluate("window.upterm.closeCode") == web.CLOSE_REFUSED
    finally:
        page.close()
