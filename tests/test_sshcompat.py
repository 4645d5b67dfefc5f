"""The asyncssh adapter, tested directly: if an asyncssh upgrade breaks a mechanism, this fails."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import MSG_EXT_INFO

from upterm import sshcompat

pytestmark = pytest.mark.timeout(30)


class _Server(asyncssh.SSHServer):
    def __init__(self, handlers) -> None:
        self._handlers = handlers

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        for name, handler in self._handlers.items():
            sshcompat.install_global_request_handler(conn, name, handler)

    def begin_auth(self, username: str) -> bool:
        return False


async def _pair(handlers):
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=lambda: _Server(handlers),
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
    )
    port = server.sockets[0].getsockname()[1]
    conn = await asyncssh.connect(
        "127.0.0.1", port, username="u", known_hosts=None, agent_path=None, config=None
    )
    return server, conn


async def test_reply_payloads_failure_texts_and_ordering() -> None:
    async def echo(payload: bytes) -> sshcompat.GlobalReply:
        return sshcompat.GlobalReply(True, payload[::-1])

    async def slow_refusal(payload: bytes) -> sshcompat.GlobalReply:
        await asyncio.sleep(0.2)
        return sshcompat.GlobalReply(False, b"no: " + payload)

    async def empty_success(payload: bytes) -> sshcompat.GlobalReply:
        # b"" would be sent as a failure by asyncssh; the adapter must send success.
        return sshcompat.GlobalReply(True, b"")

    async def broken(payload: bytes) -> sshcompat.GlobalReply:
        raise RuntimeError("handler bug")

    server, conn = await _pair(
        {"echo@t": echo, "slow@t": slow_refusal, "empty@t": empty_success, "broken@t": broken}
    )
    async with conn:
        replies = await asyncio.gather(
            sshcompat.global_request(conn, "slow@t", b"first"),
            sshcompat.global_request(conn, "echo@t", b"abc"),
            sshcompat.global_request(conn, "broken@t", b""),
            sshcompat.global_request(conn, "empty@t", b""),
            sshcompat.global_request(conn, "unknown@t", b""),
            # After a handler raised, later requests are still answered (exactly once each).
            sshcompat.global_request(conn, "echo@t", b"xyz"),
        )
    server.close()
    assert replies == [
        sshcompat.GlobalReply(False, b"no: first"),
        sshcompat.GlobalReply(True, b"cba"),
        sshcompat.GlobalReply(False, b"internal error"),
        sshcompat.GlobalReply(True, b""),
        sshcompat.GlobalReply(False, b""),
        sshcompat.GlobalReply(True, b"zyx"),
    ]


async def test_session_id_is_the_same_on_both_ends() -> None:
    seen: list[bytes] = []

    async def record(payload: bytes) -> sshcompat.GlobalReply:
        return sshcompat.GlobalReply(True, b"")

    class _Recording(_Server):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            super().connection_made(conn)
            self.conn = conn

        def auth_completed(self) -> None:
            seen.append(sshcompat.session_id(self.conn))

        def begin_auth(self, username: str) -> bool:
            return False

    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=lambda: _Recording({"r@t": record}),
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
    )
    port = server.sockets[0].getsockname()[1]
    async with asyncssh.connect(
        "127.0.0.1", port, username="u", known_hosts=None, agent_path=None, config=None
    ) as conn:
        await sshcompat.global_request(conn, "r@t", b"")
        assert seen == [sshcompat.session_id(conn)]
        assert len(seen[0]) == 32  # SHA-256 exchange hash (curve25519-sha256)
    server.close()


async def test_lost_connection_is_not_mistaken_for_a_refusal() -> None:
    never = asyncio.Event()

    async def hang(payload: bytes) -> sshcompat.GlobalReply:
        await never.wait()
        return sshcompat.GlobalReply(True)

    server, conn = await _pair({"hang@t": hang})
    task = asyncio.ensure_future(sshcompat.global_request(conn, "hang@t", b""))
    await asyncio.sleep(0.1)
    conn.close()
    with pytest.raises(asyncssh.ConnectionLost):
        await task
    server.close()


def test_passive_listener_reports_close_once() -> None:
    closed: list[int] = []
    listener = sshcompat.PassiveListener(lambda: closed.append(1))
    listener.close()
    listener.close()
    assert closed == [1]
    assert listener.get_port() == 0


class _PausedSession(asyncssh.SSHServerSession[bytes]):
    """Pauses reading at once; keeps what it is later given."""

    def __init__(self, opened: asyncio.Queue) -> None:
        self.chan = None
        self.received = bytearray()
        self.got = asyncio.Event()
        self._opened = opened

    def connection_made(self, chan) -> None:
        self.chan = chan
        sshcompat.merge_channel_buffers(chan)

    def shell_requested(self) -> bool:
        return True

    def session_started(self) -> None:
        self._opened.put_nowait(self)

    def data_received(self, data: bytes, datatype) -> None:
        self.received += data
        if len(self.received) >= 5000:
            self.got.set()


class _SessionServer(asyncssh.SSHServer):
    def __init__(self, opened: asyncio.Queue) -> None:
        self._opened = opened

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self):
        return _PausedSession(self._opened)


async def test_a_paused_channel_holds_tiny_packets_merged_not_one_entry_each() -> None:
    opened: asyncio.Queue = asyncio.Queue()
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=lambda: _SessionServer(opened),
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        encoding=None,
        line_editor=False,
    )
    port = server.sockets[0].getsockname()[1]
    async with asyncssh.connect(
        "127.0.0.1", port, username="u", known_hosts=None, agent_path=None, config=None
    ) as conn:
        chan, _ = await conn.create_session(asyncssh.SSHClientSession, encoding=None)
        session = await asyncio.wait_for(opened.get(), 10)
        await asyncio.sleep(0.1)  # asyncssh starts reading once the session has started
        session.chan.pause_reading()
        for i in range(5000):  # one SSH packet each
            chan.write(bytes([48 + i % 10]))
        await asyncio.sleep(0.5)
        # asyncssh keeps a list entry per packet; merged, the paused channel holds one run.
        assert len(session.chan._recv_buf) == 1, len(session.received)
        session.chan.resume_reading()
        await asyncio.wait_for(session.got.wait(), 10)
        assert bytes(session.received) == bytes(48 + i % 10 for i in range(5000))
    server.close()


async def test_writes_waiting_for_a_closed_window_are_merged_and_sent_in_order() -> None:
    opened: asyncio.Queue = asyncio.Queue()
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=lambda: _SessionServer(opened),
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        encoding=None,
        line_editor=False,
    )
    port = server.sockets[0].getsockname()[1]
    received = bytearray()
    done = asyncio.Event()

    class _Client(asyncssh.SSHClientSession):
        def data_received(self, data, datatype) -> None:
            received.extend(data)
            if len(received) >= 70000:
                done.set()

    async with asyncssh.connect(
        "127.0.0.1", port, username="u", known_hosts=None, agent_path=None, config=None
    ) as conn:
        # A small window (16 KiB) that the client stops opening: writes pile up.
        chan, _ = await conn.create_session(_Client, encoding=None, window=16384)
        session = await asyncio.wait_for(opened.get(), 10)
        chan.pause_reading()
        expected = bytes(48 + i % 10 for i in range(70000))
        for i in range(70000):  # one write() each, as a host's one-byte echoes
            session.chan.write(expected[i : i + 1])
        await asyncio.sleep(0.3)
        # asyncssh keeps an entry per write; merged, a handful of runs wait.
        assert len(session.chan._send_buf) <= 2
        chan.resume_reading()
        await asyncio.wait_for(done.wait(), 10)
        assert bytes(received) == expected
    server.close()


def _kexinit(kex: bytes, host_keys: bytes, follows: bool) -> bytes:
    def string(value: bytes) -> bytes:
        return len(value).to_bytes(4, "big") + value

    lists = [kex, host_keys] + [b"aes128-ctr", b"aes128-ctr", b"hmac-sha2-256"] * 2 + [b"", b""]
    lists = lists[:10]
    return b"\x14" + bytes(16) + b"".join(map(string, lists)) + bytes([follows]) + bytes(4)


def test_a_key_exchange_guess_is_right_only_if_both_first_choices_agree() -> None:
    """RFC 4253 7.1 as OpenSSH and Dropbear apply it: the first key exchange *and* host key
    algorithms of both lists must be the same, else the guessed packet is ignored."""
    ours = _kexinit(b"mlkem768x25519-sha256,curve25519-sha256", b"ssh-ed25519", False)
    # Dropbear 2022.83: its first key exchange is not our first.
    dropbear = _kexinit(b"curve25519-sha256,kexguess2@matt.ucc.asn.au", b"ssh-ed25519", True)
    assert sshcompat.wrong_kex_guess(dropbear, ours)
    assert not sshcompat.wrong_kex_guess(
        _kexinit(b"mlkem768x25519-sha256", b"ssh-ed25519,rsa-sha2-512", True), ours
    )
    assert sshcompat.wrong_kex_guess(
        _kexinit(b"mlkem768x25519-sha256", b"rsa-sha2-512", True), ours
    )
    # No guess follows: nothing to ignore, whatever the lists.
    assert not sshcompat.wrong_kex_guess(
        _kexinit(b"curve25519-sha256", b"rsa-sha2-512", False), ours
    )
    assert not sshcompat.wrong_kex_guess(b"\x14short", ours)


class _PreferringServer(asyncssh.SSHServer):
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        sshcompat.prefer_host_key(conn)

    def begin_auth(self, username: str) -> bool:
        return False


_KEYS = [asyncssh.generate_private_key(alg) for alg in ("ssh-ed25519", "ecdsa-sha2-nistp256")]
_KEYS.append(asyncssh.generate_private_key("ssh-rsa", key_size=2048))


async def _preferring_server() -> tuple[asyncssh.SSHAcceptor, int]:
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=_PreferringServer,
        server_host_keys=_KEYS,
        # Our order would not matter: SSH lets the client's order pick.
    )
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("client_algs", "expected"),
    [
        # Go's order (ECDSA before ed25519): ed25519 all the same.
        (["ecdsa-sha2-nistp256", "rsa-sha2-512", "ssh-ed25519"], "ssh-ed25519"),
        (["rsa-sha2-256", "ssh-ed25519"], "ssh-ed25519"),
        # Clients without ed25519 get what they take.
        (["ecdsa-sha2-nistp256"], "ecdsa-sha2-nistp256"),
        (["rsa-sha2-512", "rsa-sha2-256"], "ssh-rsa"),
    ],
)
async def test_the_ed25519_host_key_is_used_whenever_the_client_takes_it(
    client_algs: list[str], expected: str
) -> None:
    server, port = await _preferring_server()
    seen: list[str] = []

    class Client(asyncssh.SSHClient):
        def validate_host_public_key(
            self, host: str, addr: str, port: int, key: asyncssh.SSHKey
        ) -> bool:
            seen.append(key.get_algorithm())
            return True

    conn = await asyncssh.connect(
        "127.0.0.1",
        port,
        client_factory=Client,
        username="u",
        known_hosts=([], [], []),
        agent_path=None,
        config=None,
        server_host_key_algs=client_algs,
    )
    conn.close()
    assert seen == [expected]
    server.close()


async def test_a_client_that_waits_for_the_servers_kexinit_still_gets_it() -> None:
    """The server holds its KEXINIT for the client's; a client that sends none first gets
    the server's after the hold, with every host key offered."""
    server, port = await _preferring_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"SSH-2.0-Patient_1.0\r\n")
    await writer.drain()
    version = await reader.readline()
    assert version.startswith(b"SSH-2.0-")
    start = asyncio.get_running_loop().time()
    header = await asyncio.wait_for(reader.readexactly(6), 5)
    waited = asyncio.get_running_loop().time() - start
    length, padding, msg = int.from_bytes(header[:4], "big"), header[4], header[5]
    body = await reader.readexactly(length - 2)
    assert msg == 20  # KEXINIT
    assert sshcompat.KEXINIT_HOLD_S * 0.8 <= waited < sshcompat.KEXINIT_HOLD_S + 2
    host_keys = sshcompat._name_lists(bytes([msg]) + body[: len(body) - padding])[1]
    assert set(host_keys.split(b",")) >= {b"ssh-ed25519", b"ecdsa-sha2-nistp256", b"rsa-sha2-256"}
    writer.close()
    server.close()


class _PingServer(asyncssh.SSHServer):
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        sshcompat.answer_pings(conn)

    def begin_auth(self, username: str) -> bool:
        return False


async def test_pings_are_answered_with_their_data_within_bounds() -> None:
    """OpenSSH's ping@openssh.com: advertised, answered in order with the same data; a ping
    too large to echo, or one while replies pile up unread, gets no pong (never memory)."""
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=_PingServer,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
    )
    port = server.sockets[0].getsockname()[1]
    pongs: asyncio.Queue[bytes] = asyncio.Queue()
    advertised: list[bytes] = []

    def on_pong(self: Any, pkttype: int, pktid: int, packet: Any) -> bool:
        pongs.put_nowait(packet.get_string())
        return True

    class Client(asyncssh.SSHClient):
        def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
            table = dict(type(conn)._packet_handlers)  # type: ignore[attr-defined]
            ext_info = table[MSG_EXT_INFO]

            def on_ext_info(self: Any, pkttype: int, pktid: int, packet: Any) -> Any:
                raw = packet.get_remaining_payload()
                count, rest = int.from_bytes(raw[:4], "big"), raw[4:]
                for _ in range(count):
                    name, rest = sshcompat._read_string(rest)
                    _, rest = sshcompat._read_string(rest)
                    advertised.append(name)
                return ext_info(self, pkttype, pktid, packet)

            table[MSG_EXT_INFO] = on_ext_info
            table[sshcompat.MSG_PONG] = on_pong
            conn._packet_handlers = table  # type: ignore[attr-defined]

    conn = await asyncssh.connect(
        "127.0.0.1",
        port,
        client_factory=Client,
        username="u",
        known_hosts=None,
        agent_path=None,
        config=None,
    )
    assert b"ping@openssh.com" in advertised
    client: Any = conn
    ping = lambda data: client.send_packet(sshcompat.MSG_PING, len(data).to_bytes(4, "big") + data)  # noqa: E731
    ping(b"PING!")
    ping(b"")
    assert await asyncio.wait_for(pongs.get(), 5) == b"PING!"
    assert await asyncio.wait_for(pongs.get(), 5) == b""
    ping(b"x" * (sshcompat.PING_REPLY_MAX_BYTES + 1))
    ping(b"after")
    assert await asyncio.wait_for(pongs.get(), 5) == b"after"
    conn.close()
    server.close()


@pytest.mark.parametrize(
    ("client_ciphers", "expected"),
    [
        # OpenSSH's default order: ChaCha20 first, AES-GCM last; steered to AES-GCM.
        (
            ["chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr",
             "aes128-gcm@openssh.com", "aes256-gcm@openssh.com"],
            "aes128-gcm@openssh.com",
        ),
        (["aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"], "aes256-gcm@openssh.com"),
        # Clients without AES-GCM (some Dropbear builds) get what they take.
        (["chacha20-poly1305@openssh.com", "aes128-ctr"], "chacha20-poly1305@openssh.com"),
        (["aes256-ctr"], "aes256-ctr"),
    ],
)  # fmt: skip
async def test_clients_that_take_aes_gcm_are_steered_to_it(
    client_ciphers: list[str], expected: str
) -> None:
    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            sshcompat.prefer_host_key(conn, ciphers=sshcompat.AES_GCM_CIPHERS)

        def begin_auth(self, username: str) -> bool:
            return False

    server = await asyncssh.listen(
        "127.0.0.1", 0, server_factory=Server, server_host_keys=_KEYS[:1]
    )
    port = server.sockets[0].getsockname()[1]
    conn = await asyncssh.connect(
        "127.0.0.1", port, username="u", known_hosts=None, agent_path=None, config=None,
        encryption_algs=client_ciphers,
    )  # fmt: skip
    assert conn.get_extra_info("send_cipher") == expected
    assert conn.get_extra_info("recv_cipher") == expected
    conn.close()
    server.close()


def test_aes_gcm_is_preferred_only_with_aes_instructions(tmp_path: Any) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    assert sshcompat.aes_in_hardware(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert not sshcompat.aes_in_hardware(str(info))
    info.write_text("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n")  # Arm
    assert sshcompat.aes_in_hardware(str(info))
    assert not sshcompat.aes_in_hardware(str(tmp_path / "missing"))


@pytest.mark.parametrize("skipping", [False, True])
async def test_no_ignore_packet_precedes_each_packet_once_skipped(skipping: bool) -> None:
    """asyncssh sends an empty MSG_IGNORE before every packet; a connection given
    skip_ignore_padding sends none (its peer counts them), and data still flows."""
    from asyncssh.constants import MSG_IGNORE

    ignored: list[int] = []

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            if skipping:
                sshcompat.skip_ignore_padding(conn)

        def begin_auth(self, username: str) -> bool:
            return False

    async def handle(process: Any) -> None:
        for _ in range(20):
            process.stdout.write(b"x" * 1000)
        process.exit(0)

    class Client(asyncssh.SSHClient):
        def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
            table = dict(type(conn)._packet_handlers)  # type: ignore[attr-defined]
            original = table[MSG_IGNORE]

            def count(self: Any, pkttype: int, pktid: int, packet: Any) -> Any:
                ignored.append(pktid)
                return original(self, pkttype, pktid, packet)

            table[MSG_IGNORE] = count
            conn._packet_handlers = table  # type: ignore[attr-defined]

    server = await asyncssh.listen(
        "127.0.0.1", 0, server_factory=Server, server_host_keys=_KEYS[:1],
        process_factory=handle, encoding=None,
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    conn = await asyncssh.connect(
        "127.0.0.1", port, client_factory=Client, username="u", known_hosts=None,
        agent_path=None, config=None,
    )  # fmt: skip
    result = await conn.run(encoding=None)
    assert result.stdout == b"x" * 20000
    conn.close()
    server.close()
    if skipping:
        assert ignored == []
    else:
        assert len(ignored) > 20  # one before each of its packets


def test_packet_log_lines_are_formatted_only_at_packet_debug_level() -> None:
    """After skip_unlogged_packet_formatting, asyncssh builds no per-packet log line unless
    its debug level is 3, and still logs every packet at 3."""
    from asyncssh.logging import SSHLogger
    from asyncssh.packet import SSHPacketLogger

    sshcompat.skip_unlogged_packet_formatting()
    sshcompat.skip_unlogged_packet_formatting()  # idempotent
    formatted: list[str] = []

    class Logger(SSHPacketLogger):
        _handler_names: dict[int, str] = {94: "MSG_CHANNEL_DATA"}

        def __init__(self) -> None:
            self._logger = asyncssh.logging.logger

        @property
        def logger(self) -> Any:
            class Sink:
                def packet(self, pktid: Any, packet: bytes, msg: str, *args: Any) -> None:
                    formatted.append(msg % args)

            return Sink()

    log = Logger()
    log.log_sent_packet(94, 1, b"data")
    log.log_received_packet(94, 2, b"data")
    assert formatted == []
    before = SSHLogger._debug_level
    SSHLogger._debug_level = 3
    try:
        log.log_sent_packet(94, 3, b"data")
        log.log_received_packet(94, 4, b"data")
    finally:
        SSHLogger._debug_level = before
    assert formatted == [
        "Sent MSG_CHANNEL_DATA (94), 4 bytes",
        "Received MSG_CHANNEL_DATA (94), 4 bytes",
    ]


async def test_unsent_output_is_discarded_and_flow_control_resumes() -> None:
    """discard_unsent drops what waits for a peer that does not read, and asyncssh then
    tells the writer it may write again (resume_writing), as a drained buffer would; also
    through asyncssh's line editor, which wraps a shell's channel."""
    events: list[str] = []
    writer_chans: list[Any] = []
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Writer(asyncssh.SSHServerSession[bytes]):
        def connection_made(self, chan: Any) -> None:
            self.chan = chan
            writer_chans.append(chan)
            sshcompat.merge_channel_buffers(chan)

        def shell_requested(self) -> bool:
            return True

        def session_started(self) -> None:
            for _ in range(64):
                self.chan.write(b"y" * 65536)  # far more than the peer's window

        def pause_writing(self) -> None:
            events.append("pause")
            asyncio.get_running_loop().call_soon(
                lambda: done.set_result(sshcompat.discard_unsent(self.chan))
            )

        def resume_writing(self) -> None:
            events.append("resume")

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False

        def session_requested(self) -> Any:
            return Writer()

    server = await asyncssh.listen(
        "127.0.0.1", 0, server_factory=Server, server_host_keys=_KEYS[:1], encoding=None
    )
    port = server.sockets[0].getsockname()[1]
    conn = await asyncssh.connect(
        "127.0.0.1", port, username="u", known_hosts=None, agent_path=None, config=None
    )
    chan, _ = await conn.create_session(asyncssh.SSHClientSession, encoding=None)
    chan.pause_reading()  # the joiner that stopped reading
    dropped = await asyncio.wait_for(done, 10)
    assert dropped > 1 << 20
    assert events == ["pause", "resume"]
    assert writer_chans[0].get_write_buffer_size() == 0
    conn.close()
    server.close()


@pytest.mark.parametrize(
    ("cheap", "most_timers", "least_silence_s"),
    [
        # About one timer per interval; a probe after (nearly) a whole interval of silence.
        pytest.param(sshcompat.lazy_keepalive, 6, 0.3, id="lazy"),
        # About two per interval (none added when idle); a probe after half an interval.
        pytest.param(sshcompat.coarse_keepalive, 12, 0.15, id="coarse"),
    ],
)
async def test_cheap_keepalives_probe_only_a_silent_peer_and_set_no_timer_per_packet(
    cheap: Any, most_timers: int, least_silence_s: float
) -> None:
    """With lazy_keepalive (the relay) or coarse_keepalive (the host's tunnel) a busy
    connection schedules no timer per packet and sends no probe; a peer that goes silent is
    probed and dropped as asyncssh would drop it."""
    probes: list[int] = []

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self.conn = conn
            servers.append(self)

        def begin_auth(self, username: str) -> bool:
            return False

    servers: list[Server] = []

    async def chatter(process: Any) -> None:
        for _ in range(60):  # 1.2 s of traffic, one packet every 20 ms
            process.stdout.write(b"tick\n")
            await asyncio.sleep(0.02)
        await asyncio.sleep(3600)

    async def on_probe(payload: bytes) -> sshcompat.GlobalReply:
        probes.append(1)
        return sshcompat.GlobalReply(True)

    server = await asyncssh.listen(
        "127.0.0.1", 0, server_factory=Server, server_host_keys=_KEYS[:1],
        process_factory=chatter, encoding=None,
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    conn = await asyncssh.connect(
        "127.0.0.1", port, username="u", known_hosts=None, agent_path=None, config=None,
        keepalive_interval=0.3, keepalive_count_max=1,
    )  # fmt: skip
    cheap(conn)
    sshcompat.install_global_request_handler(servers[0].conn, "keepalive@openssh.com", on_probe)
    loop = asyncio.get_running_loop()
    scheduled = 0
    real_call_later = loop.call_later

    def counting(delay: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
        nonlocal scheduled
        # Keepalive timers only (the server's sleeps run on this loop too).
        if getattr(callback, "__name__", "") in ("fired", "_keepalive_timer_callback"):
            scheduled += 1
        return real_call_later(delay, callback, *args, **kw)

    loop.call_later = counting  # type: ignore[method-assign]
    try:
        proc = await conn.create_process(encoding=None)
        got = b""
        while got.count(b"tick") < 60:
            got += await proc.stdout.read(4096)
        busy_timers = scheduled
        assert probes == []  # never silent for 0.3 s
        assert busy_timers <= most_timers, busy_timers  # not one per packet (60)
        # Silence: the server stops reading and writing; probes go unanswered.
        servers[0].conn._transport.pause_reading()  # type: ignore[attr-defined]
        t0 = loop.time()
        await asyncio.wait_for(conn.wait_closed(), 5)
        gone = loop.time() - t0
        assert least_silence_s <= gone < 2.0, gone  # about interval x (count + 1)
    finally:
        loop.call_later = real_call_later  # type: ignore[method-assign]
        conn.close()
        server.close()


async def test_a_smaller_receive_window_is_what_the_peer_is_granted_next() -> None:
    """set_receive_window: after the next top-up the peer may have at most the new window
    in flight (an upload paced by the host arrives in small bursts)."""
    from upterm.sshcompat import set_receive_window

    got: list[int] = []
    opened: asyncio.Future[asyncssh.SSHServerChannel[bytes]] = (
        asyncio.get_running_loop().create_future()
    )

    class Sink(asyncssh.SSHServerSession[bytes]):
        def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
            set_receive_window(chan, 64 * 1024)
            opened.set_result(chan)

        def shell_requested(self) -> bool:
            return True

        def data_received(self, data: bytes, datatype: int | None) -> None:
            got.append(len(data))

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False

        def session_requested(self) -> Any:
            return Sink()

    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        server_factory=Server, encoding=None, line_editor=False,
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    async with asyncssh.connect(
        "127.0.0.1", port, known_hosts=None, username="x", agent_path=None, config=None
    ) as conn:
        chan, _ = await conn.create_session(asyncssh.SSHClientSession, encoding=None)
        await opened
        chan.write(b"x" * (4 << 20))
        for _ in range(200):
            if sum(got) == 4 << 20:
                break
            await asyncio.sleep(0.05)
        assert sum(got) == 4 << 20
        # Once the first 2 MiB window is used, top-ups are at most 64 KiB: the client never
        # holds more than that again (asyncssh's default would have it at 2 MiB).
        assert chan._send_window <= 64 * 1024
        chan.close()
    server.close()


@pytest.mark.parametrize("name", ["aes128-gcm", "aes256-gcm"])  # asyncssh's own names
def test_reused_gcm_contexts_seal_what_a_fresh_context_per_packet_seals(name: str) -> None:
    """After reuse_gcm_contexts, each packet is sealed with the nonce RFC 5647 gives it
    (fixed field, 64-bit invocation counter that wraps), exactly as one AESGCM object per
    packet would; a forged tag still opens to None."""
    import os

    from asyncssh.crypto.cipher import GCMCipher
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    sshcompat.reuse_gcm_contexts()
    sshcompat.reuse_gcm_contexts()  # idempotent
    key = os.urandom(16 if name.startswith("aes128") else 32)
    fixed = os.urandom(4)
    start = (1 << 64) - 2  # the counter wraps within the packets below
    iv = fixed + start.to_bytes(8, "big")
    sender, receiver = GCMCipher(name, key, iv), GCMCipher(name, key, iv)
    for i in range(5):
        header, data = (40 + i).to_bytes(4, "big"), os.urandom(40 + i)
        sealed, tag = sender.encrypt_and_sign(header, data)
        nonce = fixed + ((start + i) & ((1 << 64) - 1)).to_bytes(8, "big")
        expected = AESGCM(key).encrypt(nonce, data, header)
        assert sealed == header + expected[:-16]
        assert tag == expected[-16:]
        assert receiver.verify_and_decrypt(header, sealed[4:], tag) == data
    header = b"\0\0\0\x10"
    sealed, tag = sender.encrypt_and_sign(header, b"x" * 16)
    assert receiver.verify_and_decrypt(header, sealed[4:], bytes(16)) is None
