"""Web links at the relay, sans-I/O: credentials, registrations, the origin check, and the
WebSocket framer's message mode the page's socket uses."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from upterm import wire, wsproto
from upterm.errors import RemoteProtocolError
from upterm.relay import web
from upterm.relay.web import WebService, same_origin


class _FakeRelay:
    """What WebService reads of its relay: none of it matters to links."""

    ws_port = 0
    serves_tls = False
    node_addr = "127.0.0.1:2222"


def _service(tmp_path) -> WebService:  # type: ignore[no-untyped-def]
    return WebService(_FakeRelay(), None, page_dir=tmp_path)  # type: ignore[arg-type]


def _registration(
    cred: wire.WebCredential, sid: str = "S1", expires: int = 2**40
) -> wire.WebRegistration:
    return wire.WebRegistration(sid, cred.web_id, cred.digest(), expires, "alice@box")


def test_a_credential_round_trips_and_nothing_else_parses() -> None:
    cred = wire.WebCredential.new()
    assert wire.WebCredential.parse(str(cred)) == cred
    assert len(cred.web_id) == 22 and len(cred.secret) == 43
    for bad in ("", str(cred) + "x", str(cred)[1:], cred.web_id, f"{cred.web_id}:{cred.secret}",
                str(cred).replace(cred.secret[0], "+"), " " + str(cred)):  # fmt: skip
        assert wire.WebCredential.parse(bad) is None
    assert wire.WebCredential.new() != cred


def test_a_registration_round_trips_and_malformed_ones_are_refused() -> None:
    cred = wire.WebCredential.new()
    reg = _registration(cred)
    assert wire.WebRegistration.decode(reg.encode()) == reg
    revoked = wire.WebRegistration("S1", "", b"", 0, "alice@box")
    assert wire.WebRegistration.decode(revoked.encode()) == revoked
    good = reg.encode()
    for bad in (
        good[:-1],
        good + b"\0",
        wire.WebRegistration("S 1", cred.web_id, cred.digest(), 1, "x").encode(),
        wire.WebRegistration("S1", "short", cred.digest(), 1, "x").encode(),
        wire.WebRegistration("S1", cred.web_id, b"\0" * 31, 1, "x").encode(),
        wire.WebRegistration("S1", cred.web_id, cred.digest(), 0, "x").encode(),
        wire.WebRegistration("S1", cred.web_id, cred.digest(), 1, "a\x1b[2J").encode(),
        wire.WebRegistration("S1", cred.web_id, cred.digest(), 1, "x" * 65).encode(),
    ):
        with pytest.raises(RemoteProtocolError):
            wire.WebRegistration.decode(bad)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_the_protocol_error(data: bytes) -> None:
    try:
        wire.WebRegistration.decode(data)
    except RemoteProtocolError:
        pass


def test_the_relay_admits_only_the_current_unexpired_link(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = _service(tmp_path)
    cred = wire.WebCredential.new()
    svc.declare(_registration(cred, expires=1000))
    link = svc.check(str(cred), now=999)
    assert link is not None and link.session_id == "S1" and link.host_label == "alice@box"
    assert svc.check(str(cred), now=1000) is None  # expired
    wrong = wire.WebCredential(cred.web_id, wire.WebCredential.new().secret)
    assert svc.check(str(wrong), now=0) is None  # the right id, another secret
    assert svc.check("garbage", now=0) is None
    # A new link replaces the old one; a revocation leaves none.
    new = wire.WebCredential.new()
    svc.declare(_registration(new, expires=1000))
    assert svc.check(str(cred), now=0) is None
    assert svc.check(str(new), now=0) is not None
    svc.declare(wire.WebRegistration("S1", "", b"", 0, "alice@box"))
    assert svc.check(str(new), now=0) is None
    assert len(svc) == 0


def test_a_link_outlives_its_session_only_for_the_grace(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = _service(tmp_path)
    creds = [wire.WebCredential.new() for _ in range(3)]
    for i, cred in enumerate(creds):
        svc.declare(_registration(cred, sid=f"S{i}"), now=0)
    svc.session_left("S0", now=10)
    svc.session_left("S1", now=20)
    link = svc.check(str(creds[0]), now=0)
    assert link is not None and link.gone_at == 10  # kept: its host may be redialling
    svc.session_back("S1")
    svc.session_left("S2", now=30)
    svc.session_left("S2", now=10 + web.GONE_GRACE_S)  # a later event prunes the oldest
    assert svc.check(str(creds[0]), now=0) is None
    assert svc.check(str(creds[1]), now=0) is not None  # came back before the grace ended
    assert len(svc) == 2


def test_the_page_is_refused_plainly_when_it_was_not_built(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = _service(tmp_path)
    assert not svc.available
    assert svc.response("/join") is not None and b"404" in svc.response("/join").split(b"\r\n")[0]  # type: ignore[union-attr]
    assert svc.response("/other") is None


def _get(svc: WebService, path: str, *headers: str) -> tuple[str, dict[str, str], bytes]:
    raw = f"GET {path} HTTP/1.1\r\nHost: r\r\n" + "".join(f"{h}\r\n" for h in headers)
    parsed = wsproto.parse_head((raw + "\r\n").encode())
    assert parsed is not None
    response = svc.response(path, parsed[0])
    assert response is not None
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_the_page_and_assets_carry_the_security_headers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in ("index.html", "app.js", "app.css", "LICENSES.txt"):
        (tmp_path / name).write_text(f"<{name}>" * 100)
    svc = _service(tmp_path)
    for path in ("/join", "/join/", "/assets/app.js", "/assets/app.css", "/assets/LICENSES.txt"):
        status, headers, body = _get(svc, path)
        assert status == "HTTP/1.1 200 OK"
        assert headers["Content-Security-Policy"] == web.CSP
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == ("no-store" if path.startswith("/join") else "no-cache")
        assert body.startswith(b"<") and int(headers["Content-Length"]) == len(body)
    csp = dict(part.strip().split(" ", 1) for part in web.CSP.split(";"))
    assert csp["script-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe-eval" not in web.CSP


def test_assets_are_gzipped_for_browsers_that_take_it_and_revalidated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import gzip

    (tmp_path / "index.html").write_text("<html>")
    (tmp_path / "app.js").write_text("console.log(1);" * 1000)
    svc = _service(tmp_path)
    status, headers, body = _get(svc, "/assets/app.js", "Accept-Encoding: gzip, deflate, br")
    assert headers["Content-Encoding"] == "gzip" and headers["Vary"] == "Accept-Encoding"
    assert gzip.decompress(body) == b"console.log(1);" * 1000 and len(body) < 1000
    for refusing in ("Accept-Encoding: br", "Accept-Encoding: gzip;q=0", "Accept-Encoding: *"):
        _, headers, body = _get(svc, "/assets/app.js", refusing)
        assert "Content-Encoding" not in headers and body.startswith(b"console")
    etag = headers["ETag"]
    status, headers, body = _get(svc, "/assets/app.js", f"If-None-Match: {etag}")
    assert status == "HTTP/1.1 304 Not Modified" and body == b""
    status, _, _ = _get(svc, "/assets/app.js", 'If-None-Match: "other"')
    assert status == "HTTP/1.1 200 OK"


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("https://relay.example.com", "relay.example.com", True),
        ("https://relay.example.com", "relay.example.com:443", True),
        ("HTTP://Relay.Example.com:80", "relay.example.com", True),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("", "127.0.0.1:8080", False),
        ("null", "127.0.0.1:8080", False),
        ("http://evil.example", "127.0.0.1:8080", False),
        ("http://127.0.0.1:8081", "127.0.0.1:8080", False),
        ("https://relay.example.com.evil.example", "relay.example.com", False),
        ("http://127.0.0.1:8080/path", "127.0.0.1:8080", False),
        ("file://", "127.0.0.1", False),
        ("http://127.0.0.1:8080", "", False),
    ],
)
def test_only_the_pages_own_origin_may_open_the_socket(origin: str, host: str, same: bool) -> None:
    assert same_origin(origin, host) is same


def _masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_the_framer_hands_whole_messages_with_their_kind() -> None:
    framer = wsproto.Framer(client=False, max_message=100)
    data = (
        _masked(wsproto.OP_TEXT, b'{"type":', fin=False)
        + _masked(wsproto.OP_CONTINUATION, b'"auth"}')
        + _masked(wsproto.OP_BINARY, b"")
        + _masked(wsproto.OP_PING, b"p")
        + _masked(wsproto.OP_BINARY, b"ls\r")
    )
    got: list[tuple[int, bytes]] = []
    for i in range(0, len(data), 3):  # byte by byte, three at a time
        events = framer.feed(data[i : i + 3])
        assert events.data == []
        got += events.messages
    assert got == [
        (wsproto.OP_TEXT, b'{"type":"auth"}'),
        (wsproto.OP_BINARY, b""),
        (wsproto.OP_BINARY, b"ls\r"),
    ]


def test_a_message_over_the_limit_is_refused_before_it_is_buffered() -> None:
    framer = wsproto.Framer(client=False, max_message=100)
    framer.feed(_masked(wsproto.OP_BINARY, b"x" * 60, fin=False))
    with pytest.raises(wsproto.FrameError) as err:
        framer.feed(_masked(wsproto.OP_CONTINUATION, b"x" * 60)[:8])
    assert err.value.close_code == wsproto.CLOSE_TOO_BIG


def test_unknown_links_may_yet_come_only_just_after_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = _service(tmp_path)
    started = svc._started
    cred, other = wire.WebCredential.new(), wire.WebCredential.new()
    # Unknown, well formed, just after the relay started: its host may not have redialled.
    assert svc.may_come(str(cred), now=started + 1)
    assert not svc.may_come("nonsense", now=started + 1)
    assert not svc.may_come(str(cred), now=started + web.RESTART_GRACE_S)
    # Known ids are judged, not waited for; replaced and revoked ones are refused outright.
    svc.declare(_registration(cred))
    assert not svc.may_come(str(cred), now=started + 1)
    svc.declare(_registration(other))
    assert not svc.may_come(str(cred), now=started + 1)
    svc.declare(wire.WebRegistration("S1", "", b"", 0, "alice@box"))
    assert not svc.may_come(str(other), now=started + 1)


def test_a_long_close_reason_is_cut_on_a_character_boundary() -> None:
    payload = wsproto.close_payload(4003, "é" * 100)
    assert len(payload) <= wsproto.MAX_CONTROL_PAYLOAD
    assert payload[2:].decode("utf-8") == "é" * 61


def test_a_host_cannot_take_over_a_link_another_session_holds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = _service(tmp_path)
    alice, mallory = wire.WebCredential.new(), wire.WebCredential.new()
    assert svc.declare(_registration(alice, sid="ALICE")) is None
    # Mallory was sent Alice's link: declaring its id for her own session is refused.
    stolen = wire.WebRegistration("MALLORY", alice.web_id, mallory.digest(), 2**40, "x")
    assert svc.declare(stolen) == web.LINK_TAKEN_TEXT
    link = svc.check(str(alice), now=0)
    assert link is not None and link.session_id == "ALICE"
    # Nor once Alice replaced it (an id is never reused), and her own redial is fine.
    assert svc.declare(_registration(alice, sid="ALICE")) is None
    assert svc.declare(_registration(mallory, sid="ALICE")) is None
    assert svc.declare(_registration(alice, sid="MALLORY")) == web.LINK_TAKEN_TEXT
    # Leaving and coming back touch only the session's own link (no KeyError on stale ids).
    svc.session_left("MALLORY")
    svc.session_back("MALLORY")
    svc.session_left("ALICE")
    svc.session_back("ALICE")
    assert svc.check(str(mallory), now=0) is not None


def test_only_the_latest_ping_of_a_read_is_answered() -> None:
    framer = wsproto.Framer(client=False, max_message=100)
    events = framer.feed(b"".join(_masked(wsproto.OP_PING, b"%d" % i) for i in range(1000)))
    assert len(events.replies) == 1
    assert wsproto.is_pong(events.replies[0]) and events.replies[0].endswith(b"999")
    assert not wsproto.is_pong(framer.close(1000))
