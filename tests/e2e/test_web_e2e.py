"""Browser joiners with the real binaries, the browser played by a WebSocket client that does
what the page does (tests/web drive the page itself in Chromium): uptermd's page and its
headers, the same-origin socket, the link's secret, roles the host decides, and the links
the host replaces, revokes or lets expire."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import UserEnv, start_relay, wait_for
from tests.e2e.test_cli_e2e import headless
from tests.e2e.test_websocket_e2e import free_port, host, info
from upterm.relay import web

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
LOCAL = "127.0.0.1"


class Browser:
    """What the page does on the socket: proves the link, then reads output and types."""

    def __init__(self, url: str, origin: str | None = None, cols: int = 80, rows: int = 24):
        base, _, credential = url.partition("#")
        netloc = base.split("/")[2]
        self.ws: ClientConnection = connect(
            f"ws://{netloc}{web.WS_PATH}",
            origin=origin or f"http://{netloc}",  # type: ignore[arg-type]
        ).__enter__()
        self.ws.send(
            json.dumps({"type": "auth", "credential": credential, "cols": cols, "rows": rows})
        )
        self.output = bytearray()
        self.texts: list[dict] = []

    def read_until(self, pred, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            assert left > 0, f"not seen; output {bytes(self.output[-300:])!r} texts {self.texts}"
            try:
                msg = self.ws.recv(timeout=min(left, 0.5))
            except TimeoutError:
                continue
            if isinstance(msg, str):
                self.texts.append(json.loads(msg))
            else:
                self.output += msg

    def expect(self, marker: bytes, timeout: float = 15) -> None:
        self.read_until(lambda: marker in self.output, timeout)

    def role(self) -> str:
        roles = [t["role"] for t in self.texts if t.get("type") in ("hello", "role")]
        return roles[-1] if roles else ""

    def type(self, text: str) -> None:
        self.ws.send(text.encode())

    def closed(self, timeout: float = 15) -> tuple[int, str]:
        """The close code and reason the relay ended the socket with."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            except ConnectionClosed as exc:
                assert exc.rcvd is not None
                return exc.rcvd.code, exc.rcvd.reason
            if isinstance(msg, bytes):
                self.output += msg
            assert time.monotonic() < deadline, "the socket was not closed"


def refused_with(url: str) -> tuple[int, str]:
    return Browser(url).closed()


def web_host(user_env: UserEnv, relay_url: str, name: str, *flags: str) -> dict:
    out = host(user_env, name, "--server", relay_url, "--web", *flags)
    assert out.returncode == 0, out.stderr
    return info(user_env, name)


def web_host_after(
    user_env: UserEnv, relay_url: str, name: str, trigger: Path, then: str, *flags: str
) -> dict:
    """A --web session whose program waits for ``trigger`` to exist, then runs ``then``
    (sh) and sleeps, so the join is over before the output a test looks at."""
    script = f"while [ ! -e {trigger} ]; do sleep 0.05; done; {then}; exec sleep 600"
    out = headless(
        user_env, "host", "--detach", "--accept", "--name", name, "--skip-host-key-check",
        "--known-hosts", str(trigger.parent / "kh"), "--server", relay_url, "--web", *flags,
        "--", "sh", "-c", script,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return info(user_env, name)


def upterm(user_env: UserEnv, *args: str) -> str:
    out = headless(user_env, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_web_joiners_watch_type_when_allowed_and_lose_revoked_links(
    user_env: UserEnv, tmp_path: Path
) -> None:
    ws_port = free_port()
    relay = start_relay(user_env, None, "--ws-addr", f"{LOCAL}:{ws_port}")
    try:
        session = web_host(user_env, relay.url, "w")
        url = session["webURL"]
        base, _, credential = url.partition("#")
        assert base == f"http://{LOCAL}:{ws_port}/join"
        assert credential and session["sshUser"] not in url  # the link is not the SSH token
        card = upterm(user_env, "session", "info", "w")
        assert f"Web:                {url}" in card

        # The page, as a browser gets it: strict CSP, no framing, nothing inline.
        with urllib.request.urlopen(base) as page:
            headers = page.headers
            html = page.read().decode()
        assert headers["Content-Security-Policy"] == web.CSP
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"
        assert "<script>" not in html and "/assets/app.js" in html
        with urllib.request.urlopen(f"http://{LOCAL}:{ws_port}/assets/app.js") as js:
            assert js.headers["Content-Type"].startswith("text/javascript")

        # Another origin, or none, cannot open the socket.
        for origin in ("http://evil.example", f"http://{LOCAL}:{ws_port + 1}"):
            with pytest.raises(InvalidStatus) as err:
                Browser(url, origin=origin)
            assert err.value.response.status_code == 403
        with socket.create_connection((LOCAL, ws_port), 5) as sock:  # no Origin at all
            sock.sendall(
                f"GET {web.WS_PATH} HTTP/1.1\r\nHost: {LOCAL}:{ws_port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert sock.recv(100).startswith(b"HTTP/1.1 403 ")

        # A wrong secret for the right id is refused, as is garbage.
        wrong = f"{base}#{credential[:23]}{'A' * 43}"
        assert refused_with(wrong) == (web.CLOSE_REFUSED, web.REFUSED_TEXT)
        assert refused_with(f"{base}#nonsense")[0] == web.CLOSE_REFUSED

        # A viewer by default: it sees the prompt, and its keys do nothing at the PTY.
        marker = tmp_path / "typed"
        viewer = Browser(url)
        viewer.read_until(lambda: viewer.role() == "viewer")
        hello = viewer.texts[0]
        assert hello["type"] == "hello" and hello["relayed"] is True and "@" in hello["host"]
        viewer.type(f"touch {marker}\r")
        clients = info(user_env, "w")["clients"]
        assert len(clients) == 1
        client = clients[0]
        assert client["version"] == "upterm-web" and client["addr"] == LOCAL
        assert client["role"] == "viewer"
        card = upterm(user_env, "session", "info", "w")
        assert f"{client['id']}: {LOCAL} web browser (the relay's page) [viewer]" in card
        time.sleep(1)
        assert not marker.exists()

        # Made a typist by the host: told at once, and its typing reaches the shell; its
        # size counts (the page's resize message).
        upterm(user_env, "session", "role", "w", client["id"], "typist")
        viewer.read_until(lambda: viewer.role() == "typist")
        viewer.ws.send(json.dumps({"type": "resize", "cols": 100, "rows": 30}))
        time.sleep(0.3)
        viewer.type(f"touch {marker}; stty size\r")
        viewer.expect(b"30 100")
        wait_for(marker.exists, 10, what="the typist's command to run")

        # A new link: the browser on the old one is removed, the old link is refused, the
        # new one works; a revoked link is refused.
        new_url = upterm(user_env, "session", "web", "w", "--new").strip()
        assert new_url != url and new_url.startswith(base + "#")
        code, reason = viewer.closed()
        assert code == web.CLOSE_REMOVED and "replaced this web link" in reason
        assert refused_with(url)[0] == web.CLOSE_REFUSED
        again = Browser(new_url)
        again.read_until(lambda: again.role() == "viewer")
        assert upterm(user_env, "session", "web", "w", "--revoke") == ""
        assert again.closed()[0] == web.CLOSE_REMOVED
        assert refused_with(new_url)[0] == web.CLOSE_REFUSED
        assert info(user_env, "w")["webURL"] == ""
        upterm(user_env, "session", "web", "w", "--new")

        # The session's end reaches browsers as such.
        last = Browser(info(user_env, "w")["webURL"])
        last.read_until(lambda: last.role() == "viewer")
        upterm(user_env, "session", "stop", "w")
        assert last.closed() == (web.CLOSE_ENDED, web.ENDED_TEXT)

        # An expired link is refused (the relay and the host both check the time).
        short = web_host(user_env, relay.url, "short", "--web-ttl", "2s")
        early = Browser(short["webURL"])
        early.read_until(lambda: early.role() == "viewer")
        code, reason = early.closed()  # those who joined with it leave when it expires
        assert code == web.CLOSE_REMOVED and "expired" in reason
        assert refused_with(short["webURL"])[0] == web.CLOSE_REFUSED
        assert info(user_env, "short")["webURL"] == ""
    finally:
        relay.proc.terminate()
        relay.proc.wait(5)


def test_web_joiners_wait_for_approval_and_can_be_kicked(user_env: UserEnv) -> None:
    ws_port = free_port()
    relay = start_relay(user_env, None, "--ws-addr", f"{LOCAL}:{ws_port}")
    try:
        url = web_host(user_env, relay.url, "a", "--approve", "--role", "web=typist")["webURL"]
        browser = Browser(url)
        # Typed at once, before the relay has the host's channel (it takes an SSH login):
        # kept, as an SSH joiner's early keys are, and played once the host lets it in.
        browser.type("echo early-$((6*7))")
        browser.ws.send(json.dumps({"type": "resize", "cols": 90, "rows": 20}))
        browser.type("; stty size\r")
        pending = wait_for(lambda: info(user_env, "a")["pending"], 10, what="the question")
        assert pending[0]["kind"] == "join" and pending[0]["version"] == "upterm-web"
        time.sleep(0.5)
        browser.read_until(lambda: True, 1)
        assert browser.role() == ""  # not let in yet: no hello
        upterm(user_env, "session", "approve", "a", pending[0]["id"])
        browser.read_until(lambda: browser.role() == "typist")  # --role web=typist
        browser.expect(b"early-42")
        browser.expect(b"20 90")  # the size asked for meanwhile, too
        upterm(user_env, "session", "kick", "a", pending[0]["id"])
        code, reason = browser.closed()
        assert code == web.CLOSE_REMOVED and "removed you" in reason
    finally:
        relay.proc.terminate()
        relay.proc.wait(5)


def test_web_needs_a_relay_that_serves_the_page(user_env: UserEnv, relay) -> None:  # type: ignore[no-untyped-def]
    out = host(user_env, "nope", "--server", relay.url, "--web")
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and "serves no web page" in out.stderr
    out = host(user_env, "nope", "--server", relay.url, "--web", "--e2e-only")
    assert out.returncode != 0 and "contradict" in out.stderr
    out = host(user_env, "nope", "--server", relay.url, "--web-ttl", "1h")
    assert out.returncode != 0 and "add --web" in out.stderr


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _raw_upgrade(port: int, origin: str, source: str = "127.0.0.2") -> socket.socket:
    sock = socket.create_connection((LOCAL, port), 5, source_address=(source, 0))
    sock.sendall(
        f"GET {web.WS_PATH} HTTP/1.1\r\nHost: {LOCAL}:{port}\r\nOrigin: {origin}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    return sock


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = bytes([0x80 | opcode]) + (
        bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    )
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_hostile_sockets_cost_the_relay_little_and_lock_nobody_out(user_env: UserEnv) -> None:
    """A browser that proves its link, then sends pings and never reads; pages of other
    sites knocking on the socket: the relay's memory stays flat, a bystander types on, and
    the address they came from is not locked out of the relay."""
    ws_port = free_port()
    relay = start_relay(user_env, None, "--ws-addr", f"{LOCAL}:{ws_port}")
    try:
        session = web_host(user_env, relay.url, "h", "--role", "web=typist")
        url = session["webURL"]
        bystander = Browser(url)
        bystander.read_until(lambda: bystander.role() == "typist")

        def echo_s() -> float:
            marker = f"E{time.monotonic_ns()}"
            start = time.monotonic()
            bystander.type(f"echo {marker[:1]}''{marker[1:]}\r")
            bystander.expect(marker.encode())
            return time.monotonic() - start

        before = max(echo_s() for _ in range(5))
        rss_before = _rss_kib(relay.proc.pid)
        flooder = _raw_upgrade(ws_port, f"http://{LOCAL}:{ws_port}")
        credential = url.partition("#")[2]
        auth = json.dumps({"type": "auth", "credential": credential, "cols": 80, "rows": 24})
        flooder.sendall(_masked_frame(0x1, auth.encode()))
        # ... and never reads: its pongs, one per ping, would be as many bytes as its pings.
        pings = _masked_frame(0x9, b"p" * 125) * 512  # 66 KiB of pings a write
        flooder.settimeout(0.2)
        sent, deadline = 0, time.monotonic() + 6
        during = []
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError, BlockingIOError):
                sent += flooder.send(pings)
            if len(during) < 5 and time.monotonic() > deadline - 4:
                during.append(echo_s())
        grown_mib = (_rss_kib(relay.proc.pid) - rss_before) / 1024
        # The relay kept reading the pings (as fast as they came), and holds nothing for them.
        assert sent > 32 * 1024 * 1024, sent
        assert grown_mib < 2, f"the relay grew {grown_mib:.1f} MiB for {sent >> 20} MiB of pings"
        assert max(during) < max(0.5, 10 * before), (before, during)
        flooder.close()

        # Pages elsewhere knocking: refused, never penalised (an SSH login from the same
        # address still gets the relay's banner, not a lock-out).
        for _ in range(40):
            with _raw_upgrade(ws_port, "https://evil.example") as knock:
                assert knock.recv(64).startswith(b"HTTP/1.1 403 ")
        with socket.create_connection((LOCAL, relay.port), 5, source_address=("127.0.0.2", 0)) as s:
            assert s.recv(64).startswith(b"SSH-2.0-"), "the address was locked out"
    finally:
        relay.proc.terminate()
        relay.proc.wait(5)


def test_a_browser_far_behind_is_still_told_it_was_removed(
    user_env: UserEnv, tmp_path: Path
) -> None:
    """A browser that reads nothing while the session prints megabytes is kicked: its close
    says so (4003, the host's words), not "the session ended"."""
    ws_port = free_port()
    relay = start_relay(user_env, None, "--ws-addr", f"{LOCAL}:{ws_port}")
    try:
        trigger = tmp_path / "go"
        session = web_host_after(
            user_env, relay.url, "far", trigger, "head -c 5000000 /dev/zero | tr '\\0' A"
        )
        credential = session["webURL"].partition("#")[2]
        sock = _raw_upgrade(ws_port, f"http://{LOCAL}:{ws_port}", source=LOCAL)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        auth = {"type": "auth", "credential": credential, "cols": 80, "rows": 24}
        sock.sendall(_masked_frame(0x1, json.dumps(auth).encode()))
        wait_for(lambda: info(user_env, "far")["clients"], 10, what="the browser to join")
        trigger.touch()
        time.sleep(3)  # megabytes pile up for a browser that reads nothing
        client = info(user_env, "far")["clients"][0]["id"]
        upterm(user_env, "session", "kick", "far", client)
        time.sleep(3)  # the host closes the connection meanwhile, its output still waiting
        got = bytearray()
        sock.settimeout(10)
        while chunk := sock.recv(1 << 20):
            got += chunk
        sock.close()
        close = got[got.rfind(b"\x88") :]  # the last frame: the close, with code and reason
        code = int.from_bytes(close[2:4], "big")
        assert code == web.CLOSE_REMOVED, bytes(close[:80])
        assert b"removed you" in close
    finally:
        relay.proc.terminate()
        relay.proc.wait(5)


def test_a_browser_sees_the_screen_an_ssh_joiner_sees(
    user_env: UserEnv, tmp_path: Path, joiner_key: Path
) -> None:
    """The same session through the page's socket and through ssh, screens compared in a
    terminal model (pyte): colours, cursor moves, a full-screen clear, wrapped lines."""
    import pyte

    from tests.e2e.test_websocket_e2e import Joiner

    ws_port = free_port()
    relay = start_relay(user_env, None, "--ws-addr", f"{LOCAL}:{ws_port}")
    ssh_joiner = None
    try:
        trigger = tmp_path / "go"
        drawing = (
            "printf '\\033[2J\\033[H\\033[1;31mred\\033[0m plain\\n\\033[5;10Hmoved'; "
            "printf '%0200d\\n' 0; printf '\\033[32mgreen\\033[0m\\033[3;1HOVER'; echo DR''AWN"
        )
        session = web_host_after(user_env, relay.url, "same", trigger, drawing)
        browser = Browser(session["webURL"])
        browser.read_until(lambda: browser.role() == "viewer")
        config = tmp_path / "ssh_config"
        config.write_text("")
        ssh_joiner = Joiner(session["sshCommand"], joiner_key, user_env.env, config)
        wait_for(lambda: len(info(user_env, "same")["clients"]) == 2, 15, what="both joiners")
        trigger.touch()
        browser.expect(b"DRAWN")
        ssh_joiner.expect(b"DRAWN")
        time.sleep(0.3)
        browser.read_until(lambda: True, 0.5)

        def screen(stream: bytes) -> list[str]:
            scr = pyte.Screen(80, 24)
            pyte.ByteStream(scr).feed(stream)
            return [line.rstrip() for line in scr.display]

        assert screen(bytes(browser.output)) == screen(bytes(ssh_joiner.seen))
        assert screen(bytes(browser.output))[0] == "red plain"
    finally:
        if ssh_joiner is not None:
            ssh_joiner.close()
        relay.proc.terminate()
        relay.proc.wait(5)
