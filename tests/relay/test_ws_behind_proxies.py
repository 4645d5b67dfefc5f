"""uptermd's WebSocket listener behind real reverse proxies (Debian's nginx and HAProxy, TLS
at the proxy): hosts and joiners get through, and the relay judges each client by its own
address (X-Forwarded-For from a trusted proxy, or a PROXY header), so one client's failures
do not lock out the others behind the same proxy."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, make_key
from tests.relay.test_relay_public import LOCAL, SshJoiner, make_tunnel, start_host
from tests.relay.test_websocket import free_port, nginx, self_signed, wait_listening
from upterm import wire, wsproto
from upterm.daemon.tunnel import RelayURL
from upterm.keys import Ed25519Key
from upterm.relay.gate import GateConfig, forwarded_client, parse_networks
from upterm.relay.guard import RelayLimits
from upterm.relay.policy import PenaltyConfig, PenaltyKind
from upterm.relay.server import Relay, RelayIdentity

pytestmark = pytest.mark.timeout(90)

#: The address the proxies dial uptermd from (the only one it trusts), distinct from the
#: clients' 127.0.0.1 and 127.0.0.2.
PROXY_SOURCE = "127.0.0.5"
BAD_CLIENT = "127.0.0.2"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "operating-uptermd.md"

#: The HAProxy configuration in docs/operating-uptermd.md.
HAPROXY_DOC = """
frontend upterm_wss
    mode http
    bind :443 ssl crt /etc/haproxy/certs/relay.example.com.pem
    timeout client 1h
    option forwardfor
    default_backend uptermd_ws
backend uptermd_ws
    mode http
    timeout connect 5s
    timeout server 1h
    timeout tunnel 1h
    option httpchk GET /health
    server relay1 127.0.0.1:8080 check
"""


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.mark.parametrize(
    ("header", "peer", "client"),
    [
        ("203.0.113.7", "10.0.0.5", "203.0.113.7"),
        # What a client wrote itself sits left of what the trusted proxy appended.
        ("198.51.100.1, 203.0.113.7", "10.0.0.5", "203.0.113.7"),
        # Two trusted proxies in a row: both skipped.
        ("198.51.100.1, 203.0.113.7, 10.0.0.6", "10.0.0.5", "203.0.113.7"),
        ("203.0.113.7:51234", "10.0.0.5", "203.0.113.7"),
        ("[2001:db8::7]:51234", "10.0.0.5", "2001:db8::7"),
        ("2001:db8::7", "10.0.0.5", "2001:db8::7"),
        ("::ffff:203.0.113.7", "10.0.0.5", "203.0.113.7"),
        # Missing or garbage: the last address a trusted proxy vouched for.
        ("", "10.0.0.5", "10.0.0.5"),
        ("not-an-address", "10.0.0.5", "10.0.0.5"),
        ("203.0.113.7, unknown", "10.0.0.5", "10.0.0.5"),
        ("unknown, 10.0.0.6", "10.0.0.5", "10.0.0.6"),
        ("10.0.0.6", "10.0.0.5", "10.0.0.6"),
    ],
)
def test_the_client_is_the_rightmost_address_no_trusted_proxy_wrote(
    header: str, peer: str, client: str
) -> None:
    assert forwarded_client(header, peer, parse_networks(["10.0.0.0/24"])) == client


def test_a_long_forwarded_header_is_read_only_at_its_right_end() -> None:
    trusted = parse_networks(["10.0.0.0/24"])
    header = ", ".join(["198.51.100.1"] + ["10.0.0.9"] * 40)
    # Past MAX_FORWARDED_HOPS trusted hops the walk stops at the last of them.
    assert forwarded_client(header, "10.0.0.5", trusted) == "10.0.0.9"


@contextlib.asynccontextmanager
async def relay_behind(ws_gate: GateConfig) -> AsyncIterator[Relay]:
    """A relay whose penalties bite at the first failure (a `noauth` costs 20 s), nobody
    exempt, its WebSocket listener trusting only PROXY_SOURCE."""
    penalties = PenaltyConfig(durations_s={PenaltyKind.NOAUTH: 20.0})
    relay = Relay(
        RelayIdentity.from_key(Ed25519Key.generate()),
        host=LOCAL, port=0, node_addr=None, version="0.1.0",
        limits=RelayLimits(penalties=penalties), ws_addr=(LOCAL, 0), ws_gate=ws_gate,
    )  # fmt: skip
    await relay.start()
    try:
        yield relay
    finally:
        relay.close()


@contextlib.contextmanager
def haproxy(tmp: Path, ws_port: int, cert: Path, key: Path, proxy_v2: bool) -> Iterator[int]:
    """Debian's HAProxy running the documented configuration; yields its port."""
    port = free_port()
    pem = tmp / "haproxy.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    server = f"127.0.0.1:{ws_port} source {PROXY_SOURCE} check"
    if proxy_v2:
        server += " send-proxy-v2 check-send-proxy"
    conf = tmp / "haproxy.cfg"
    conf.write_text(
        "global\n    maxconn 200\n"
        + HAPROXY_DOC.replace(
            ":443 ssl crt /etc/haproxy/certs/relay.example.com.pem", f"{LOCAL}:{port} ssl crt {pem}"
        ).replace("127.0.0.1:8080 check", server)
    )
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "haproxy.log", "wb"),  # noqa: SIM115
    )
    try:
        wait_listening(port, proc, tmp / "haproxy.log")
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


async def upgrade_from(source: str, port: int, cert: Path, token: str) -> bytes:
    """A WebSocket upgrade through the TLS proxy from ``source``, claiming to be someone
    else in its own X-Forwarded-For; the answer's status line."""
    basic = base64.b64encode(f"{token}:".encode()).decode()
    request = wsproto.upgrade_request(
        "localhost", "/", wsproto.new_key(),
        (("Upterm-Client-Version", wire.CLIENT_CLIENT_VERSION),
         ("Authorization", f"Basic {basic}"), ("X-Forwarded-For", "127.0.0.9")),
    )  # fmt: skip
    reader, writer = await asyncio.open_connection(
        LOCAL, port, ssl=ssl.create_default_context(cafile=str(cert)),
        server_hostname="localhost", local_addr=(source, 0),
    )  # fmt: skip
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    return answer.split(b"\r\n", 1)[0] + b" " + answer.rpartition(b"\r\n\r\n")[2].strip()


async def wait_until_up(port: int, cert: Path) -> None:
    """The proxy's health check has found uptermd (it answers 503 until then)."""
    deadline = time.monotonic() + 15
    context = ssl.create_default_context(cafile=str(cert))
    while True:
        reader, writer = await asyncio.open_connection(
            LOCAL, port, ssl=context, server_hostname="localhost"
        )
        writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        if answer.startswith(b"HTTP/1.1 200"):
            return
        assert time.monotonic() < deadline, answer[:200]
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("front", ["nginx", "haproxy", "haproxy-proxy-v2"])
async def test_behind_a_reverse_proxy_each_client_answers_for_itself(
    front: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the documented nginx site or HAProxy configuration (TLS at the proxy): a
    client that keeps presenting a bad token is penalised under its own address (what it
    writes in its own X-Forwarded-For changes nothing) and refused; a host and a joiner
    behind the same proxy get through, and the host sees the joiner's address."""
    cert, tls_key = self_signed(tmp_path, "front")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    trusted = parse_networks([PROXY_SOURCE])
    if front == "haproxy-proxy-v2":
        gate = GateConfig(proxy_protocol=True, proxy_from=trusted)
    else:
        gate = GateConfig(forwarded_from=trusted)
    key = make_key(tmp_path / "j")
    async with relay_behind(gate) as relay:
        with contextlib.ExitStack() as stack:
            if front == "nginx":
                port = stack.enter_context(
                    nginx(tmp_path, relay.ws_port, cert, tls_key, f"proxy_bind {PROXY_SOURCE};\n")
                )
            else:
                port = stack.enter_context(
                    haproxy(tmp_path, relay.ws_port, cert, tls_key, front.endswith("v2"))
                )
                await wait_until_up(port, cert)
            tunnel = make_tunnel(relay.ws_port, tmp_path)
            tunnel.url = RelayURL.parse(f"wss://localhost:{port}")
            host = await start_host(relay.ws_port, tmp_path, tunnel=tunnel)
            try:
                first = await upgrade_from(BAD_CLIENT, port, cert, "AAAAAAAAAAAAAAAAAAAA")
                assert first.startswith(b"HTTP/1.1 404"), first
                again = await upgrade_from(BAD_CLIENT, port, cert, "AAAAAAAAAAAAAAAAAAAA")
                assert again.startswith(b"HTTP/1.1 429"), again
                assert b"your address is refused" in again
                penalised = relay.guard.penalties
                now = time.monotonic()
                assert penalised.refused_for(BAD_CLIENT, now) > 0
                for innocent in (PROXY_SOURCE, LOCAL, "127.0.0.9"):
                    assert penalised.refused_for(innocent, now) == 0, innocent

                wss = f"wss://{host.token}@localhost:{port}"
                joiner = await SshJoiner.start(
                    relay.port, host.token, key,
                    "-o", f"ProxyCommand={VENV_BIN}/upterm proxy {wss}",
                )  # fmt: skip
                assert await joiner.expect(b"$ "), bytes(joiner.out)
                joiner.type(b"echo behind-proxy-$((6*7))\r")
                assert await joiner.expect(b"behind-proxy-42"), bytes(joiner.out)
                await joiner.leave()
                joined_from = host.joined[-1].addr
                assert joined_from.rpartition(":")[0] == LOCAL, joined_from
                (host_link,) = [c for c in relay.connections if c.is_host]
                assert host_link.peer().rpartition(":")[0] == LOCAL
            finally:
                host.close()


async def test_a_refusal_at_the_gate_is_an_http_answer() -> None:
    """Straight to the WebSocket port (no proxy): a penalised source is refused at accept
    with an HTTP 429 carrying the reason, not the SSH port's bare line."""
    async with relay_behind(GateConfig()) as relay:
        answers = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(
                LOCAL, relay.ws_port, local_addr=(BAD_CLIENT, 0)
            )
            basic = base64.b64encode(b"AAAAAAAAAAAAAAAAAAAA:").decode()
            writer.write(
                wsproto.upgrade_request(
                    "x",
                    "/",
                    wsproto.new_key(),
                    (
                        ("Upterm-Client-Version", wire.CLIENT_CLIENT_VERSION),
                        ("Authorization", f"Basic {basic}"),
                    ),
                )
            )
            answers.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
        assert answers[0].startswith(b"HTTP/1.1 404 Not Found\r\n"), answers[0]
        assert answers[1].startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), answers[1]
        body = answers[1].partition(b"\r\n\r\n")[2]
        assert body.startswith(b"upterm: your address is refused for "), body
        assert body.endswith(b" s after failed or unfinished logins; try again later\n"), body


def test_the_documented_haproxy_configuration_is_the_tested_one() -> None:
    doc = DOCS.read_text()
    assert HAPROXY_DOC.strip() in doc
    assert "server relay1 127.0.0.1:8080 check send-proxy-v2 check-send-proxy" in doc
