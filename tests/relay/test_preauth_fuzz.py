"""Fuzzing what a stranger can make the relay parse, in code and through a live uptermd.

Parsers (hypothesis, bytes or text in): the joiner's user name (``wire.decode_token``), a
host's ``upterm-create-session@upterm.dev`` payload (``CreateSessionRequest.decode``, then
``check_proof_fields`` and the key lines in it) and its ``upterm-invites@upterm.dev`` payload
(``decode_invites``). Each returns a value or raises :class:`RemoteProtocolError`, never
anything else. ``proxyproto.parse`` is fuzzed in test_proxyproto.py; here its bytes go
through a live relay. Live relays (uptermd processes) get random garbage, mutated PROXY
headers and mutated real SSH openings from many connections, and must keep serving a
bystander: its echo keeps coming back while the flood runs, and a new join works after.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
import struct
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SSH_OPTS, make_key
from tests.relay.test_relay_public import (
    LOCAL,
    RELAY_DEST,
    TcpProxy,
    Uptermd,
    asyncssh_join,
    lb_join,
    shell_roundtrip,
    ssh_once,
    start_host,
    uptermd,
)
from upterm import wire
from upterm.errors import RemoteProtocolError
from upterm.keys import Ed25519Key
from upterm.relay import proxyproto

pytestmark = pytest.mark.timeout(60)

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few bytes flipped, cut, inserted or duplicated."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "dup"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del data[pos:]
        elif op == "dup" and data:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


# --------------------------------------------------------------------------------------------
# wire.decode_token: the joiner's SSH user name


def _check_token(user: str) -> None:
    try:
        token = wire.decode_token(user)
    except RemoteProtocolError:
        return
    assert isinstance(token, wire.Token)
    assert 1 <= len(token.session_id) <= 64 and all(c in BASE62 for c in token.session_id)
    if token.invite is not None:
        assert token.invite and all(c in BASE62 for c in token.invite)
    if token.node_addr is not None:
        assert token.node_addr and token.node_addr.isprintable()
    assert len(user) <= wire.MAX_TOKEN_LEN


@st.composite
def near_tokens(draw: st.DrawFn) -> str:
    """Tokens that are nearly right: a session id, maybe an invite, maybe a node part."""
    sid = draw(st.text(alphabet=BASE62 + "+:-_/=. \x00é", min_size=0, max_size=70))
    parts = [sid]
    if draw(st.booleans()):
        parts.append("+" + draw(st.text(alphabet=BASE62 + "+:", max_size=20)))
    if draw(st.booleans()):
        node = draw(st.text(max_size=40))
        b64 = base64.urlsafe_b64encode(node.encode("utf-8", "surrogatepass")).decode()
        parts.append(":" + draw(st.sampled_from([b64, b64.rstrip("="), b64 + "=", b64[:-1]])))
    return "".join(parts)


@FUZZ
@given(st.one_of(st.text(max_size=700), near_tokens()))
def test_decode_token_returns_a_token_or_a_protocol_error(user: str) -> None:
    _check_token(user)


@FUZZ
@given(
    st.text(alphabet=BASE62, min_size=1, max_size=64),
    st.one_of(st.none(), st.text(alphabet=BASE62, min_size=1, max_size=32)),
    st.text(min_size=1, max_size=60).filter(str.isprintable),
)
def test_decode_token_round_trips_what_the_relay_hands_out(
    sid: str, invite: str | None, node: str
) -> None:
    token = wire.encode_token(sid, node)
    if invite is not None:
        token = wire.with_invite(token, invite)
    if len(token) > wire.MAX_TOKEN_LEN:
        with pytest.raises(RemoteProtocolError):
            wire.decode_token(token)
        return
    assert wire.decode_token(token) == wire.Token(sid, node, invite)


# --------------------------------------------------------------------------------------------
# CreateSessionRequest.decode + check_proof_fields: a host's registration payload


def _check_registration(payload: bytes) -> None:
    try:
        req = wire.CreateSessionRequest.decode(payload)
    except RemoteProtocolError:
        return
    assert isinstance(req.host_user, str)
    assert all(isinstance(k, bytes) for k in req.host_public_keys)
    assert all(isinstance(k, bytes) for k in req.client_authorized_keys)
    assert isinstance(req.session_secret, bytes) and isinstance(req.host_key_proof, bytes)
    assert isinstance(req.generation, int)
    try:
        key = wire.check_proof_fields(req)
    except RemoteProtocolError:
        pass
    else:
        assert isinstance(key, wire.PublicKey) and key.blob
        assert len(req.session_secret) == wire.SESSION_SECRET_LEN and req.generation >= 1
    # The relay parses every key line in it too (legacy and proven registrations alike).
    for line in (*req.host_public_keys, *req.client_authorized_keys):
        try:
            parsed = wire.parse_public_key_line(line)
        except RemoteProtocolError:
            continue
        assert parsed is None or isinstance(parsed, wire.PublicKey)


_KEY_LINE = Ed25519Key.generate().public.authorized_key_line()


@st.composite
def registrations(draw: st.DrawFn) -> bytes:
    """A valid registration (proven or legacy), then mutated."""
    req = wire.CreateSessionRequest(
        host_user=draw(st.text(max_size=20)),
        host_public_keys=tuple(
            draw(st.lists(st.sampled_from([_KEY_LINE, b"ssh-ed25519 AAAA", b""]), max_size=3))
        ),
        client_authorized_keys=tuple(
            draw(st.lists(st.one_of(st.just(_KEY_LINE), st.binary(max_size=60)), max_size=3))
        ),
        session_secret=draw(st.binary(min_size=0, max_size=20)),
        generation=draw(st.integers(0, 2**64 - 1)),
        host_key_proof=draw(st.binary(max_size=90)),
    )
    return draw(mutated(req.encode()))


@FUZZ
@given(st.one_of(st.binary(max_size=400), registrations()))
def test_registration_payload_gives_values_or_a_protocol_error(payload: bytes) -> None:
    _check_registration(payload)


# --------------------------------------------------------------------------------------------
# decode_invites: a host's invite declaration


def _check_invites(payload: bytes) -> None:
    try:
        sid, digests = wire.decode_invites(payload)
    except RemoteProtocolError:
        return
    assert 1 <= len(sid) <= 64 and all(c in BASE62 for c in sid)
    assert isinstance(digests, frozenset) and len(digests) <= wire.MAX_INVITES
    assert all(isinstance(d, bytes) and len(d) == hashlib.sha256().digest_size for d in digests)


@st.composite
def invite_payloads(draw: st.DrawFn) -> bytes:
    sid = draw(st.text(alphabet=BASE62, min_size=1, max_size=30))
    codes = draw(st.lists(st.text(alphabet=BASE62, min_size=1, max_size=12), max_size=5))
    payload = wire.encode_invites(sid, codes)
    if draw(st.booleans()):
        # A count that lies, either way.
        off = 4 + len(sid)
        fake = draw(st.sampled_from([0, 1, len(codes) + 1, wire.MAX_INVITES + 1, 2**32 - 1]))
        payload = payload[:off] + struct.pack(">I", fake) + payload[off + 4 :]
    return draw(mutated(payload))


@FUZZ
@given(st.one_of(st.binary(max_size=300), invite_payloads()))
def test_invites_payload_gives_values_or_a_protocol_error(payload: bytes) -> None:
    _check_invites(payload)


def test_invites_round_trip() -> None:
    sid, digests = wire.decode_invites(wire.encode_invites("abc123", ["x1", "y2"]))
    assert (sid, digests) == (
        "abc123",
        frozenset({wire.invite_digest("x1"), wire.invite_digest("y2")}),
    )


# --------------------------------------------------------------------------------------------
# Live relays


def exchange(port: int, chunks: list[bytes], source: str, wait_banner: bool) -> bytes:
    """One connection: (maybe read the relay's banner,) send ``chunks``, close our side,
    and read what the relay says until it closes (it must, and soon)."""
    with socket.create_connection((LOCAL, port), timeout=5, source_address=(source, 0)) as s:
        got = bytearray()
        if wait_banner:
            with contextlib.suppress(OSError):
                got += s.recv(256)
        with contextlib.suppress(OSError):
            for chunk in chunks:
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"the relay kept a connection open after EOF; it said {bytes(got)!r}")
        return bytes(got)


def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces, last = [], 0
    for cut in cuts:
        pieces.append(data[last:cut])
        last = cut
    pieces.append(data[last:])
    return [p for p in pieces if p]


def assert_serving(relay: Uptermd) -> None:
    assert relay.proc.poll() is None, relay.log_text()
    log = relay.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


async def bystander_while(conn: asyncssh.SSHClientConnection, flood: asyncio.Future[None]) -> float:
    """Round trips on a joined shell while ``flood`` runs; the slowest one, in seconds."""
    worst = 0.0
    n = 1000
    async with conn.create_process(term_type="xterm", encoding=None) as proc:
        out = bytearray()

        async def until(marker: bytes) -> None:
            while marker not in out:
                chunk = await proc.stdout.read(4096)
                assert chunk, bytes(out)
                out.extend(chunk)

        await asyncio.wait_for(until(b"$ "), 20)
        while not flood.done() or n == 1000:
            n += 1
            start = time.monotonic()
            proc.stdin.write(f"echo by-$(({n - 1}+1))\r".encode())
            await asyncio.wait_for(until(f"by-{n}".encode()), 10)
            worst = max(worst, time.monotonic() - start)
            await asyncio.sleep(0.05)
        proc.stdin.write_eof()
    return worst


@st.composite
def proxy_garbage(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    src = (
        f"203.0.113.{draw(st.integers(1, 254))}",
        draw(st.integers(1, 65535)),
    )
    valid = draw(
        st.sampled_from(
            [
                proxyproto.encode_v1(src, RELAY_DEST),
                proxyproto.encode_v2(src, RELAY_DEST),
                proxyproto.encode_v2(src, RELAY_DEST, tlvs=b"\x04\x00\x02ok"),
                proxyproto.encode_v2_local(),
                b"PROXY UNKNOWN\r\n",
            ]
        )
    )
    tail = draw(
        st.sampled_from([b"", b"SSH-2.0-fuzz\r\n", b"SSH-2.0-fuzz\r\n" + bytes(40), b"\r\n"])
    )
    payload = draw(
        st.one_of(
            st.binary(max_size=300),
            mutated(valid + tail),
            st.binary(max_size=120).map(lambda b: proxyproto.V2_SIGNATURE + b),
            st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        )
    )
    return split(draw, payload), draw(st.booleans())


async def test_proxy_protocol_garbage_never_crashes_a_live_relay(tmp_path: Path) -> None:
    async with uptermd(
        tmp_path, "--ssh-proxy-protocol", "--proxy-protocol-from", LOCAL, exempt=None
    ) as relay:
        lb = await TcpProxy(
            relay.port, lambda peer: proxyproto.encode_v2(("192.0.2.10", 4242), RELAY_DEST)
        ).start()
        host = await start_host(lb.port, tmp_path)
        try:
            bystander = await lb_join(relay.port, host.token, "198.51.100.77")
            said: list[bytes] = []

            @settings(FUZZ, max_examples=250)
            @given(proxy_garbage())
            def flood(case: tuple[list[bytes], bool]) -> None:
                chunks, _ = case
                # From the balancer itself: every header it passes on is believed.
                answer = exchange(relay.port, chunks, LOCAL, wait_banner=False)
                assert answer == b"" or answer.startswith((b"upterm: ", b"SSH-2.0-uptermd-")), (
                    answer
                )
                said.append(answer[:8])

            running = asyncio.ensure_future(asyncio.to_thread(flood))
            worst = await bystander_while(bystander, running)
            await running
            bystander.close()
            assert worst < 2, worst
            # Refused malformed headers, and well-formed ones let through to SSH: both seen.
            assert b"upterm: " in said and b"SSH-2.0-" in said, set(said)
            assert_serving(relay)
            conn = await lb_join(relay.port, host.token, "198.51.100.78")
            await shell_roundtrip(conn, 31)
            conn.close()
            assert [c.addr for c in host.joined][-1] == "198.51.100.78:50000"
        finally:
            host.close()
            lb.close()


def client_opening(tmp: Path) -> bytes:
    """What OpenSSH sends first (its version line and key exchange init), captured."""
    with socket.socket() as srv:
        srv.bind((LOCAL, 0))
        srv.listen()
        srv.settimeout(10)
        key = make_key(tmp / "capture")
        proc = subprocess.Popen(
            [
                "ssh",
                *SSH_OPTS,
                "-o",
                "BatchMode=yes",
                "-i",
                str(key),
                "-p",
                str(srv.getsockname()[1]),
                f"x@{LOCAL}",
                "true",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = srv.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                conn.settimeout(2)
                got = b""
                with contextlib.suppress(TimeoutError):
                    while len(got) < 512 or b"\r\n" not in got:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        got += chunk
                    # The rest of its first packet.
                    while chunk := conn.recv(65536):
                        got += chunk
        finally:
            proc.kill()
            proc.wait(5)
    assert got.startswith(b"SSH-2.0-OpenSSH") and len(got) > 200, got
    return got


@st.composite
def ssh_garbage(draw: st.DrawFn, opening: bytes) -> tuple[list[bytes], bool, str]:
    banner = b"SSH-2.0-fuzz\r\n"
    packet_len = draw(st.integers(0, 2**32 - 1))
    packet = struct.pack(">IB", packet_len, draw(st.integers(0, 255))) + draw(
        st.binary(max_size=64)
    )
    payload = draw(
        st.one_of(
            st.binary(max_size=400),  # before any banner
            st.binary(max_size=400).map(lambda b: banner + b),  # after ours
            st.just(banner + packet),  # a packet header that lies
            mutated(opening),  # a real client's opening, bent
            st.lists(st.binary(max_size=40), max_size=6).map(lambda ls: b"\r\n".join(ls) + banner),
        )
    )
    source = f"127.0.0.{draw(st.integers(2, 9))}"
    return split(draw, payload), draw(st.booleans()), source


async def test_ssh_garbage_from_many_connections_leaves_a_bystander_served(
    tmp_path: Path,
) -> None:
    opening = await asyncio.to_thread(client_opening, tmp_path)
    key = make_key(tmp_path / "j")
    # Every garbage source exempt from penalties, so that each connection reaches the SSH
    # parser; the bystander comes from 127.0.0.1.
    async with uptermd(tmp_path, exempt="127.0.0.0/8") as relay:
        host = await start_host(relay.port, tmp_path)
        try:
            bystander = await asyncssh_join(relay.port, host.token)

            @settings(FUZZ, max_examples=300)
            @given(ssh_garbage(opening))
            def flood(case: tuple[list[bytes], bool, str]) -> None:
                chunks, wait_banner, source = case
                answer = exchange(relay.port, chunks, source, wait_banner)
                assert answer.startswith(b"SSH-2.0-uptermd-"), answer

            running = asyncio.ensure_future(asyncio.to_thread(flood))
            worst = await bystander_while(bystander, running)
            await running
            bystander.close()
            assert worst < 2, worst
            assert_serving(relay)
            rc, out, _ = await ssh_once(relay.port, host.token, key)
            assert rc == 0 and b"$ " in out, out
        finally:
            host.close()
