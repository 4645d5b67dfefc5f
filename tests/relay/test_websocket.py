"""uptermd's WebSocket listener: health and how-to pages, OpenSSH joining through
`upterm proxy`, refusals before the upgrade, and a hostile peer that never reaches SSH."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VENV_BIN, make_key
from tests.relay.test_relay_public import LOCAL, SshJoiner, inproc_relay, make_tunnel, start_host
from upterm import wire, wsproto
from upterm.daemon.tunnel import RelayURL
from upterm.keys import Ed25519Key
from upterm.relay.gate import parse_networks
from upterm.relay.guard import RelayLimits
from upterm.relay.policy import PenaltyConfig
from upterm.relay.server import Relay, RelayIdentity
from upterm.wsclient import HTTPProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests dial loopback directly unless they set a proxy themselves."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def ws_relay(**limits: Any) -> contextlib.AbstractAsyncContextManager[Relay]:
    """The in-process relay of test_relay_public, with a WebSocket listener too."""
    return inproc_relay(ws_addr=(LOCAL, 0), **limits)


async def http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_health_and_how_to_pages() -> None:
    async with ws_relay() as relay:
        health = await http(relay.ws_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert health.startswith(b"HTTP/1.1 200 OK\r\n") and health.endswith(b"\r\n\r\nOK")
        page = await http(relay.ws_port, b"GET / HTTP/1.1\r\nHost: relay.example.com\r\n\r\n")
        assert b"upterm host --server wss://relay.example.com -- YOUR_COMMAND" in page
        assert b"ProxyCommand='upterm proxy wss://TOKEN@relay.example.com'" in page
        # Load balancers' checks cost no penalty: many in a row stay answered.
        for _ in range(30):
            again = await http(relay.ws_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert again.startswith(b"HTTP/1.1 200 OK")


def proxy_command(ws_port: int, token: str) -> str:
    return f"{VENV_BIN}/upterm proxy ws://{token}@{LOCAL}:{ws_port}"


async def test_openssh_joins_through_upterm_proxy(tmp_path: Path) -> None:
    """The upstream-documented join: ssh with `upterm proxy` as its ProxyCommand types into
    the shared shell; the relay sees a joiner like any other (same SSH service)."""
    key = make_key(tmp_path / "j")
    async with ws_relay() as relay:
        host = await start_host(relay.port, tmp_path)
        try:
            joiner = await SshJoiner.start(
                relay.port,
                host.token,
                key,
                "-o",
                f"ProxyCommand={proxy_command(relay.ws_port, host.token)}",
            )
            assert await joiner.expect(b"$ "), bytes(joiner.out)
            joiner.type(b"echo over-ws-$((6*7))\r")
            assert await joiner.expect(b"over-ws-42"), bytes(joiner.out)
            # Bulk output comes through whole.
            joiner.type(b"head -c 3000000 /dev/zero | tr '\\0' x | wc -c\r")
            assert await joiner.expect(b"3000000"), bytes(joiner.out[-300:])
            assert [c for c in relay.connections if not c.is_host]
            rc, _ = await joiner.leave()
            assert rc == 0
        finally:
            host.close()


async def test_unknown_and_foreign_tokens_are_refused_before_the_upgrade(tmp_path: Path) -> None:
    """No open relay: a token naming no session here, or another node, gets a 404 with the
    reason, and nothing is dialled (a listener standing in for that node sees nothing)."""
    key = make_key(tmp_path / "j")
    bait = socket.socket()
    bait.bind((LOCAL, 0))
    bait.listen()
    bait.setblocking(False)
    bait_addr = f"{LOCAL}:{bait.getsockname()[1]}"
    async with ws_relay() as relay:
        host = await start_host(relay.port, tmp_path)
        try:
            foreign = wire.encode_token(host.reg.session_id, bait_addr)
            for token in ("AAAAAAAAAAAAAAAAAAAA", foreign):
                proc = await asyncio.create_subprocess_exec(
                    f"{VENV_BIN}/upterm", "proxy", f"ws://{token}@{LOCAL}:{relay.ws_port}",
                    stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                _, err = await asyncio.wait_for(proc.communicate(), 15)
                assert proc.returncode == 1
                text = err.decode()
                assert text.count("\n") == 1, text
                assert "refused the WebSocket: HTTP 404" in text
                assert "no host is connected for session" in text
            with pytest.raises(BlockingIOError):
                bait.accept()
            # The real token still works.
            joiner = await SshJoiner.start(
                relay.port, host.token, key,
                "-o", f"ProxyCommand={proxy_command(relay.ws_port, host.token)}",
            )  # fmt: skip
            assert await joiner.expect(b"$ "), bytes(joiner.out)
            await joiner.leave()
        finally:
            host.close()
            bait.close()


def upgrade(user: str, version: str = wire.CLIENT_CLIENT_VERSION) -> bytes:
    basic = base64.b64encode(user.encode()).decode()
    return wsproto.upgrade_request(
        "x", "/", wsproto.new_key(),
        (("Upterm-Client-Version", version), ("Authorization", f"Basic {basic}")),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("request_bytes", "status", "text"),
    [
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"400",
            b"missing upterm client version",
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Upterm-Client-Version: SSH-2.0-x\r\n\r\n",
            b"400",
            b"basic auth failed",
        ),
        (b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 10000, b"431", b"too large"),
        # urlsplit raises on an unclosed IPv6 bracket (it stranded others' turns once).
        (b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n", b"400", b"malformed request target"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n", b"400", b""),
    ],
)
async def test_malformed_upgrades_get_one_clear_answer(
    request_bytes: bytes, status: bytes, text: bytes
) -> None:
    async with ws_relay() as relay:
        answer = await http(relay.ws_port, request_bytes)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        assert text in answer


async def test_a_frame_flood_and_bad_frames_leave_a_bystander_typing(tmp_path: Path) -> None:
    """Peers that upgrade and then send garbage frames, unmasked frames or a huge claimed
    frame are closed (or starved by the gate) while a joiner's echo stays quick."""
    key = make_key(tmp_path / "j")
    async with ws_relay() as relay:
        host = await start_host(relay.port, tmp_path)
        try:
            bystander = await SshJoiner.start(relay.port, host.token, key)
            assert await bystander.expect(b"$ ")
            attackers = []
            # Junk after the bad frame: what is still unread when the relay closes makes the
            # close a reset (TCP), which can cut its answer short. Before login the relay
            # reads 16 KiB at a time, so the two whose answer is read below send less.
            for payload, junk in (
                (bytes([0x82, 0x05]) + b"plain", 8_000),  # unmasked: protocol error, closed
                (bytes([0xC2, 0x80]) + b"mask", 8_000),  # reserved bits
                (bytes([0x82, 0xFF]) + (1 << 62).to_bytes(8, "big") + b"mask", 100_000),  # huge
            ):
                reader, writer = await asyncio.open_connection(LOCAL, relay.ws_port)
                writer.write(upgrade(host.token) + payload + b"\x00" * junk)
                attackers.append((reader, writer))
            for reader, _ in attackers[:2]:
                data = await asyncio.wait_for(reader.read(), 10)
                assert data.startswith(b"HTTP/1.1 101")
                assert data.endswith(b"\x03\xea" + b"unmasked frame") or b"\x03\xea" in data
            worst = 0.0
            for i in range(5):
                start = time.perf_counter()
                bystander.type(f"echo by-$((100+{i}))\r".encode())
                assert await bystander.expect(f"by-{100 + i}".encode())
                worst = max(worst, time.perf_counter() - start)
            assert worst < 1.0, worst
            for _, writer in attackers:
                writer.close()
            await bystander.leave()
        finally:
            host.close()


async def test_a_host_over_websocket_is_joined_over_ssh_and_websocket(tmp_path: Path) -> None:
    """`upterm host --server ws://...`: the host's tunnel runs over the WebSocket listener
    into the same relay; joiners come by plain SSH or by WebSocket alike, and the card's
    line is the ProxyCommand one."""
    key = make_key(tmp_path / "j")
    async with ws_relay() as relay:
        tunnel = make_tunnel(relay.ws_port, tmp_path)
        tunnel.url = RelayURL.parse(f"ws://{LOCAL}:{relay.ws_port}")
        host = await start_host(relay.ws_port, tmp_path, tunnel=tunnel)
        try:
            line = tunnel.url.join_command(host.token)
            assert line == (
                f"ssh -o ProxyCommand='upterm proxy ws://{host.token}@{LOCAL}:{relay.ws_port}' "
                f"{host.token}@{LOCAL}"
            )
            (host_link,) = [c for c in relay.connections if c.is_host]
            assert host_link.conn.get_extra_info("upterm_websocket") is True
            for extra in ((), ("-o", f"ProxyCommand={proxy_command(relay.ws_port, host.token)}")):
                joiner = await SshJoiner.start(relay.port, host.token, key, *extra)
                assert await joiner.expect(b"$ "), bytes(joiner.out)
                joiner.type(b"echo host-over-ws-$((6*7))\r")
                assert await joiner.expect(b"host-over-ws-42"), bytes(joiner.out)
                await joiner.leave()
        finally:
            host.close()


def self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (its own CA), and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCAL))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def proxy_refusal(url: str, *extra: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        f"{VENV_BIN}/upterm", "proxy", *extra, url,
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 1
    return err.decode()


async def test_tls_served_directly_and_renewed_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--tls-cert/--tls-key: wss:// for the proxy (certificate checked against --ca-file)
    and for a host (against SSL_CERT_FILE); a renewed certificate applies to new
    connections after a reload, and an untrusted one is one line saying so."""
    key = make_key(tmp_path / "j")
    first_cert, first_key = self_signed(tmp_path, "first")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(first_cert.read_bytes())
    live_key.write_bytes(first_key.read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(first_cert))
    relay = Relay(
        RelayIdentity.from_key(Ed25519Key.generate()),
        host=LOCAL, port=0, node_addr=None, version="0.1.0",
        limits=RelayLimits(penalties=PenaltyConfig(exempt=parse_networks([LOCAL]))),
        ws_addr=(LOCAL, 0), ws_tls=(str(live_cert), str(live_key)),
    )  # fmt: skip
    await relay.start()
    try:
        tunnel = make_tunnel(relay.ws_port, tmp_path)
        tunnel.url = RelayURL.parse(f"wss://localhost:{relay.ws_port}")
        host = await start_host(relay.ws_port, tmp_path, tunnel=tunnel)
        wss = f"wss://{host.token}@localhost:{relay.ws_port}"
        try:
            joiner = await SshJoiner.start(
                relay.port, host.token, key,
                "-o", f"ProxyCommand={VENV_BIN}/upterm proxy --ca-file {first_cert} {wss}",
            )  # fmt: skip
            assert await joiner.expect(b"$ "), bytes(joiner.out)
            joiner.type(b"echo over-wss-$((6*7))\r")
            assert await joiner.expect(b"over-wss-42"), bytes(joiner.out)
            await joiner.leave()
            # Not trusted without the CA: one line.
            monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent")
            text = await proxy_refusal(wss)
            assert text.startswith(f"upterm: the certificate of localhost:{relay.ws_port} is ")
            assert text.count("\n") == 1, text
            # Renewal: a new certificate in place, then the reload uptermd does on SIGHUP.
            second_cert, second_key = self_signed(tmp_path, "second")
            live_cert.write_bytes(second_cert.read_bytes())
            live_key.write_bytes(second_key.read_bytes())
            relay.reload_tls()
            assert "not trusted" in await proxy_refusal(wss, "--ca-file", str(first_cert))
            joiner = await SshJoiner.start(
                relay.port, host.token, key,
                "-o", f"ProxyCommand={VENV_BIN}/upterm proxy --ca-file {second_cert} {wss}",
            )  # fmt: skip
            assert await joiner.expect(b"$ "), bytes(joiner.out)
            await joiner.leave()
        finally:
            host.close()
    finally:
        relay.close()


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((LOCAL, 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path | None = None) -> None:
    """Until a proxy the test started listens on ``port`` (10 s); its log if it died."""
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex((LOCAL, port)) == 0:
                return
        assert time.monotonic() < deadline and proc.poll() is None, (
            log.read_text() if log is not None and log.exists() else f"nothing on port {port}"
        )
        time.sleep(0.05)


@contextlib.contextmanager
def tinyproxy(tmp: Path, user: str, password: str) -> Iterator[int]:
    """Debian's tinyproxy on loopback with Basic auth; yields its port."""
    port = free_port()
    conf = tmp / "tinyproxy.conf"
    conf.write_text(
        f"Port {port}\nListen {LOCAL}\nTimeout 600\nAllow {LOCAL}\nMaxClients 20\n"
        f'BasicAuth {user} {password}\nLogLevel Info\nLogFile "{tmp / "tinyproxy.log"}"\n'
        f'PidFile "{tmp / "tinyproxy.pid"}"\n'
    )
    proc = subprocess.Popen(
        ["tinyproxy", "-d", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, proc, tmp / "tinyproxy.log")
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


async def test_joiners_and_hosts_go_through_an_http_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a real HTTP proxy with CONNECT and Basic auth (tinyproxy): `--proxy`,
    HTTP_PROXY, NO_PROXY, a wrong password as one line, and a host's tunnel too."""
    key = make_key(tmp_path / "j")
    with tinyproxy(tmp_path, "pxuser", "pxpass") as proxy_port:
        async with ws_relay() as relay:
            good = HTTPProxy(LOCAL, proxy_port, "pxuser", "pxpass")
            tunnel = make_tunnel(relay.ws_port, tmp_path)
            tunnel.url = RelayURL.parse(f"ws://{LOCAL}:{relay.ws_port}")
            tunnel.ws_proxy = good
            host = await start_host(relay.ws_port, tmp_path, tunnel=tunnel)
            ws = f"ws://{host.token}@{LOCAL}:{relay.ws_port}"
            proxy_url = f"http://pxuser:pxpass@{LOCAL}:{proxy_port}"
            try:
                via_flag = f"{VENV_BIN}/upterm proxy --proxy {proxy_url} {ws}"
                joiner = await SshJoiner.start(
                    relay.port, host.token, key, "-o", f"ProxyCommand={via_flag}"
                )
                assert await joiner.expect(b"$ "), bytes(joiner.out)
                joiner.type(b"echo via-proxy-$((6*7))\r")
                assert await joiner.expect(b"via-proxy-42"), bytes(joiner.out)
                await joiner.leave()
                # From the environment, as curl and git read it.
                monkeypatch.setenv("HTTP_PROXY", proxy_url)
                joiner = await SshJoiner.start(
                    relay.port,
                    host.token,
                    key,
                    "-o",
                    f"ProxyCommand={proxy_command(relay.ws_port, host.token)}",
                )
                assert await joiner.expect(b"$ "), bytes(joiner.out)
                await joiner.leave()
                log = (tmp_path / "tinyproxy.log").read_text()
                assert log.count(f"CONNECT {LOCAL}:{relay.ws_port}") >= 3, log[-2000:]
                # NO_PROXY: straight there, even with a proxy that is not listening.
                monkeypatch.setenv("HTTP_PROXY", f"http://{LOCAL}:1")
                monkeypatch.setenv("NO_PROXY", f"localhost,{LOCAL}")
                joiner = await SshJoiner.start(
                    relay.port,
                    host.token,
                    key,
                    "-o",
                    f"ProxyCommand={proxy_command(relay.ws_port, host.token)}",
                )
                assert await joiner.expect(b"$ "), bytes(joiner.out)
                await joiner.leave()
                monkeypatch.delenv("NO_PROXY")
                text = await proxy_refusal(ws)
                assert text == f"upterm: cannot reach the proxy {LOCAL}:1: Connection refused\n"
                bad = f"http://pxuser:wrong@{LOCAL}:{proxy_port}"
                text = await proxy_refusal(ws, "--proxy", bad)
                assert text.startswith(f"upterm: the proxy {LOCAL}:{proxy_port} refused to connect")
                # tinyproxy answers 401 where RFC 9110 says 407: both get the hint.
                assert "401 Unauthorized (check the proxy's user and password)" in text
                assert text.count("\n") == 1
            finally:
                host.close()


#: The nginx site in docs/operating-uptermd.md, as the test runs it (TLS at nginx).
NGINX_LOCATION = """
        location / {
            proxy_pass http://127.0.0.1:%(ws_port)d;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }
"""


@contextlib.contextmanager
def nginx(tmp: Path, ws_port: int, cert: Path, key: Path, server_extra: str = "") -> Iterator[int]:
    """Debian's nginx terminating TLS in front of the WebSocket listener; yields its port.
    ``server_extra``: more lines for its server block (a test's ``proxy_bind``)."""
    port = free_port()
    prefix = tmp / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    location = NGINX_LOCATION % {"ws_port": ws_port}
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log info;\nevents {{ worker_connections 64; }}\n"
        "http {\n"
        f"    access_log {prefix}/access.log;\n"
        f"    client_body_temp_path {prefix}/body;\n    proxy_temp_path {prefix}/proxy;\n"
        "    server {\n"
        f"        listen {LOCAL}:{port} ssl;\n"
        f"        ssl_certificate {cert};\n        ssl_certificate_key {key};\n"
        f"{server_extra}{location}"
        "    }\n}\n"
    )
    proc = subprocess.Popen(
        ["nginx", "-p", str(prefix), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, proc, prefix / "error.log")
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


async def test_behind_nginx_with_tls_hosts_and_joiners_get_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented nginx site, TLS at nginx: a host's tunnel and a joiner's ProxyCommand
    both cross it over wss://, and the health page answers through it."""
    key = make_key(tmp_path / "j")
    cert, cert_key = self_signed(tmp_path, "edge")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    doc = (Path(__file__).resolve().parents[2] / "docs" / "operating-uptermd.md").read_text()
    assert NGINX_LOCATION.replace("%(ws_port)d", "8080").strip() in doc
    async with ws_relay() as relay:
        with nginx(tmp_path, relay.ws_port, cert, cert_key) as edge:
            import ssl

            reader, writer = await asyncio.open_connection(
                LOCAL, edge, ssl=ssl.create_default_context(), server_hostname="localhost"
            )
            writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            health = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert health.startswith(b"HTTP/1.1 200 OK") and health.endswith(b"OK")
            tunnel = make_tunnel(edge, tmp_path)
            tunnel.url = RelayURL.parse(f"wss://localhost:{edge}")
            host = await start_host(edge, tmp_path, tunnel=tunnel)
            try:
                wss = f"wss://{host.token}@localhost:{edge}"
                joiner = await SshJoiner.start(
                    relay.port, host.token, key,
                    "-o", f"ProxyCommand={VENV_BIN}/upterm proxy {wss}",
                )  # fmt: skip
                assert await joiner.expect(b"$ "), bytes(joiner.out)
                joiner.type(b"echo behind-nginx-$((6*7))\r")
                assert await joiner.expect(b"behind-nginx-42"), bytes(joiner.out)
                joiner.type(b"head -c 2000000 /dev/zero | tr '\\0' y | wc -c\r")
                assert await joiner.expect(b"2000000"), bytes(joiner.out[-300:])
                await joiner.leave()
            finally:
                host.close()


async def test_the_ssh_config_stanza_of_a_websocket_session_joins(tmp_path: Path) -> None:
    """`upterm session ssh-config` for a host on a ws:// relay: the stanza carries the
    ProxyCommand (a Port line would send ssh to a port with no SSH behind it), and OpenSSH
    joins with it as written, the relay's key pinned from the stanza's comment."""
    from upterm.ctl import render

    key = make_key(tmp_path / "j")
    async with ws_relay() as relay:
        tunnel = make_tunnel(relay.ws_port, tmp_path)
        tunnel.url = RelayURL.parse(f"ws://{LOCAL}:{relay.ws_port}")
        host = await start_host(relay.ws_port, tmp_path, tunnel=tunnel)
        try:
            relay_key = wire.PublicKey(tunnel.relay_key_blob).authorized_key_line().decode()
            info = {
                "sessionId": host.reg.session_id, "name": "wspair", "host": str(tunnel.url),
                "sshUser": host.token, "relayHostKey": relay_key.strip(),
            }  # fmt: skip
            stanza = render.ssh_config(info)
            assert f"    ProxyCommand upterm proxy ws://{host.token}@{LOCAL}:{relay.ws_port}\n" in (
                stanza + "\n"
            )
            assert "    Port " not in stanza
            known = [ln[2:] for ln in stanza.splitlines() if ln.startswith(f"# {LOCAL} ")]
            assert len(known) == 1
            (tmp_path / "known_hosts").write_text(known[0] + "\n")
            (tmp_path / "config").write_text(
                stanza.replace("upterm proxy", f"{VENV_BIN}/upterm proxy")
                + f"\nHost *\n  IdentityFile {key}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {tmp_path / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
                "  BatchMode yes\n"
            )
            proc = await asyncio.create_subprocess_exec(
                "ssh", "-F", str(tmp_path / "config"), "-tt", "wspair",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            joiner = SshJoiner(proc)
            assert await joiner.expect(b"$ "), bytes(joiner.out)
            joiner.type(b"echo stanza-ws-$((6*7))\r")
            assert await joiner.expect(b"stanza-ws-42"), bytes(joiner.out)
            await joiner.leave()
        finally:
            host.close()


async def test_end_to_end_joins_over_websocket_as_printed_and_from_the_stanza(
    tmp_path: Path,
) -> None:
    """A host on a ws:// relay prints an end-to-end line (an ``ssh -W`` jump carried by
    upterm proxy, the host's key pinned); OpenSSH joins with it as printed and with the
    ``-e2e`` stanza, and the relay carries only ciphertext."""
    import shlex

    from upterm.ctl import render

    key = make_key(tmp_path / "j")
    async with ws_relay() as relay:
        seen: dict[str, bytearray] = {"relay": bytearray(), "splice": bytearray()}
        relay.observer = lambda mode, data: seen[mode].extend(data)
        tunnel = make_tunnel(relay.ws_port, tmp_path)
        tunnel.url = RelayURL.parse(f"ws://{LOCAL}:{relay.ws_port}")
        host = await start_host(relay.ws_port, tmp_path, tunnel=tunnel)
        try:
            assert host.reg.e2e_supported
            pin = tunnel.session_key.authorized_key_line().decode().strip()
            line = tunnel.url.e2e_join_command(host.token, pin)
            url = f"ws://{host.token}@{LOCAL}:{relay.ws_port}"
            assert line == (
                f"ssh -o ProxyCommand=\"ssh -o ProxyCommand='upterm proxy {url}' -W %h:%p "
                f"{host.token}@{LOCAL}\" -o KnownHostsCommand='/bin/echo upterm {pin}' "
                f"{host.token}@upterm"
            )
            relay_key = wire.PublicKey(tunnel.relay_key_blob).authorized_key_line().decode()
            info = {
                "sessionId": host.reg.session_id, "name": "wse2e", "host": str(tunnel.url),
                "sshUser": host.token, "relayHostKey": relay_key.strip(), "e2eCommand": line,
                "hostKeys": [k.authorized_key_line().decode().strip() for k in tunnel.host_keys],
            }  # fmt: skip
            stanza = render.ssh_config(info)
            assert "Host wse2e-e2e" in stanza and "ProxyJump" not in stanza
            (tmp_path / "known_hosts").write_text(f"{LOCAL} {relay_key}")
            config = tmp_path / "config"
            # The test's own config reaches the jump's ssh too (a user's ~/.ssh/config does
            # by itself).
            local = stanza.replace("upterm proxy", f"{VENV_BIN}/upterm proxy").replace(
                "ProxyCommand ssh -o", f"ProxyCommand ssh -F {config} -o"
            )
            config.write_text(
                local + f"\nHost *\n  IdentityFile {key}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {tmp_path / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
                "  BatchMode yes\n  LogLevel ERROR\n"
            )
            printed = shlex.split(line)
            printed[2] = printed[2].replace("upterm proxy", f"{VENV_BIN}/upterm proxy")
            printed[2] = printed[2].replace("ssh -o", f"ssh -F {config} -o", 1)
            ways = {
                "printed": [printed[0], "-F", str(config), "-tt", *printed[1:]],
                "stanza": ["ssh", "-F", str(config), "-tt", "wse2e-e2e"],
            }
            for n, (name, argv) in enumerate(ways.items()):
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                joiner = SshJoiner(proc)
                assert await joiner.expect(b"$ "), (name, bytes(joiner.out))
                joiner.type(f"echo SECRET-WS-$((40+{n}))\r".encode())
                assert await joiner.expect(f"SECRET-WS-{40 + n}".encode()), bytes(joiner.out)
                await joiner.leave()
                assert host.joined[-1].mode == "e2e", name
            assert len(seen["splice"]) > 1000
            assert b"SECRET-WS" not in seen["splice"]
            assert seen["relay"] == b""
        finally:
            host.close()


async def test_a_head_dripped_byte_by_byte_costs_linear_time_and_spares_a_bystander(
    tmp_path: Path,
) -> None:
    """Peers dripping an almost 8 KiB request head a byte at a time (each byte its own segment):
    the door looks for the head's end only in what arrived, and a joiner's echo stays quick."""
    key = make_key(tmp_path / "j")
    async with ws_relay() as relay:
        host = await start_host(relay.port, tmp_path)
        try:
            bystander = await SshJoiner.start(relay.port, host.token, key)
            assert await bystander.expect(b"$ ")

            async def drip() -> bytes:
                reader, writer = await asyncio.open_connection(LOCAL, relay.ws_port)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                head = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n"
                for i in range(len(head)):
                    writer.write(head[i : i + 1])
                    await writer.drain()
                    if i % 64 == 0:
                        await asyncio.sleep(0)
                answer = await asyncio.wait_for(reader.read(), 20)
                writer.close()
                return answer

            drips = [asyncio.ensure_future(drip()) for _ in range(3)]
            worst = 0.0
            for i in range(5):
                start = time.perf_counter()
                bystander.type(f"echo drip-$((200+{i}))\r".encode())
                assert await bystander.expect(f"drip-{200 + i}".encode())
                worst = max(worst, time.perf_counter() - start)
            answers = await asyncio.gather(*drips)
            # Just under the 8 KiB bound: parsed once, at its end, and answered.
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
            assert worst < 1.0, worst
            await bystander.leave()
        finally:
            host.close()


async def test_upstream_hosts_recorded_upgrade_is_answered_as_upstreams_relay_answers() -> None:
    """The exact bytes upstream's Go host sends, to our listener: the same 101 its uptermd
    gives, then our SSH banner in one binary frame, as its uptermd sends its own."""
    from tests.test_wsproto import UPSTREAM_HOST_UPGRADE, UPSTREAM_RELAY_ANSWER

    async with ws_relay() as relay:
        reader, writer = await asyncio.open_connection(LOCAL, relay.ws_port)
        writer.write(UPSTREAM_HOST_UPGRADE)
        answer = b""
        while b"SSH-2.0-" not in answer or not answer.endswith(b"\r\n"):
            chunk = await asyncio.wait_for(reader.read(4096), 10)
            assert chunk, answer
            answer += chunk
        writer.close()
    head, _, frame = answer.partition(b"\r\n\r\n")
    assert head == UPSTREAM_RELAY_ANSWER.partition(b"\r\n\r\n")[0]
    banner = b"SSH-2.0-uptermd-0.1.0\r\n"
    assert frame == bytes([0x82, len(banner)]) + banner
