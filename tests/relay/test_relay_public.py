"""uptermd in public: every bound, refusal and lifecycle a stranger can reach, both ways.

Real processes and sockets throughout: ``uptermd`` subprocesses (or an in-process
:class:`Relay` where its limits are set directly), in-process hosts (:class:`Tunnel` with a
real shell on a PTY), OpenSSH and asyncssh joiners. Penalties are counted per source
address, so tests about them connect from other loopback addresses (127.0.0.2 and up).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SSH_OPTS, VENV_BIN, make_key, start_shell
from upterm import sshcompat, wire
from upterm.daemon.knownhosts import RelayTrust
from upterm.daemon.session import ClientInfo, Session
from upterm.daemon.sshd import GuestPolicy, Invite
from upterm.daemon.tunnel import RelayURL, Tunnel
from upterm.errors import RelayPermissionDenied
from upterm.keys import Ed25519Key
from upterm.relay import proxyproto
from upterm.relay.gate import parse_networks
from upterm.relay.guard import RelayLimits
from upterm.relay.policy import PenaltyConfig
from upterm.relay.server import DRAIN_JOINER_TEXT, Relay, RelayIdentity

pytestmark = pytest.mark.timeout(60)

LOCAL = "127.0.0.1"


# --------------------------------------------------------------------------------------------
# uptermd as a process


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


@dataclass
class Uptermd:
    """One uptermd process, its log, and (optionally) its metrics port."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    state: Path
    metric_port: int | None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def launch(
    tmp: Path,
    *args: str,
    port: int = 0,
    state: Path | None = None,
    metrics: bool = False,
    exempt: str | None = LOCAL,
) -> Uptermd:
    """Start uptermd on 127.0.0.1 and wait until it listens (without blocking the loop)."""
    tag = uuid.uuid4().hex[:6]
    state = state or tmp / f"uptermd-state-{tag}"
    addr_file = tmp / f"uptermd-{tag}.addr"
    log = tmp / f"uptermd-{tag}.log"
    metric_port = free_port() if metrics else None
    argv = [
        str(VENV_BIN / "uptermd"),
        "--ssh-addr",
        f"{LOCAL}:{port}",
        "--state-dir",
        str(state),
        "--addr-file",
        str(addr_file),
        *(["--penalty-exempt", exempt] if exempt else []),
        *(["--metric-addr", f"{LOCAL}:{metric_port}"] if metric_port else []),
        *args,
    ]
    with log.open("ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 15
    while not addr_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"uptermd did not start: {log.read_text()}")
        await asyncio.sleep(0.05)
    bound = int(addr_file.read_text().strip().rpartition(":")[2])
    return Uptermd(proc, bound, log, state, metric_port)


@contextlib.asynccontextmanager
async def uptermd(tmp: Path, *args: str, **kw: Any) -> AsyncIterator[Uptermd]:
    relay = await launch(tmp, *args, **kw)
    try:
        yield relay
    finally:
        relay.stop()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOCAL, port), 5)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(relay: Uptermd) -> Samples:
    assert relay.metric_port is not None
    status, body = await http_get(relay.metric_port, "/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_metric(
    relay: Uptermd, name: str, pred: Callable[[float], bool], timeout: float = 10, **labels: str
) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = metric(await scrape(relay), name, **labels)
        if pred(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{name}{labels} stayed at {value}")
        await asyncio.sleep(0.05)


async def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------------------------
# hosts (in-process Tunnel + shell) and joiners


@dataclass
class Host:
    tunnel: Tunnel
    session: Session
    reg: Any
    policy: GuestPolicy
    joined: list[ClientInfo] = field(default_factory=list)

    @property
    def token(self) -> str:
        return str(self.reg.token)

    def close(self) -> None:
        self.tunnel.close()
        self.session.hangup()


class RecordingPolicy(GuestPolicy):
    """The host's real policy, remembering every key check the inner server asked for."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.key_checks: list[str] = []

    def key_refusal(self, username: str, blob: bytes, addr: str | None = None) -> tuple[str, str]:
        self.key_checks.append(username)
        return super().key_refusal(username, blob, addr)


def make_tunnel(
    port: int,
    tmp: Path,
    *,
    identities: list[asyncssh.SSHKey] | None = None,
    keepalive_s: float = 50,
    pinned: bytes | None = None,
) -> Tunnel:
    trust = (
        RelayTrust(name=f"r{port}", pinned=pinned)
        if pinned is not None
        else RelayTrust(name=f"[{LOCAL}]:{port}", known_hosts=tmp / f"kh-{uuid.uuid4().hex[:6]}")
    )
    return Tunnel(
        RelayURL("ssh", LOCAL, port),
        trust,
        Ed25519Key.generate(),
        wire.new_session_secret(),
        on_state=lambda state: None,
        keepalive_s=keepalive_s,
        identities=identities or (),
    )


async def start_host(
    port: int,
    tmp: Path,
    *,
    authorized: list[wire.PublicKey] | None = None,
    identities: list[asyncssh.SSHKey] | None = None,
    keepalive_s: float = 50,
    invites: dict[str, Invite] | None = None,
    tunnel: Tunnel | None = None,
) -> Host:
    tunnel = tunnel or make_tunnel(port, tmp, identities=identities, keepalive_s=keepalive_s)
    reg = await tunnel.connect(authorized or [])
    session = start_shell(tmp)
    accepting = asyncio.Event()
    accepting.set()
    joined: list[ClientInfo] = []
    policy = RecordingPolicy(
        session,
        tunnel.relay_key_blob,
        frozenset(k.blob for k in authorized or []),
        accepting,
        on_join=joined.append,
        on_leave=lambda c: None,
        invites=invites or {},
    )
    await tunnel.serve(policy)
    return Host(tunnel, session, reg, policy, joined)


def pub(path: Path) -> wire.PublicKey:
    key = wire.parse_public_key_line((path.parent / (path.name + ".pub")).read_text())
    assert key is not None
    return key


class SshJoiner:
    """An OpenSSH joiner on a pseudo-terminal it asked for (-tt), driven through pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = bytearray()

    @classmethod
    async def start(cls, port: int, user: str, key: Path, *extra: str) -> SshJoiner:
        proc = await asyncio.create_subprocess_exec(
            "ssh",
            "-tt",
            # The first -o wins: INFO, so the relay's banners and disconnect texts show.
            "-o",
            "LogLevel=INFO",
            *SSH_OPTS,
            "-o",
            "BatchMode=yes",
            "-i",
            str(key),
            "-p",
            str(port),
            *extra,
            f"{user}@{LOCAL}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def expect(self, marker: bytes, timeout: float = 20) -> bool:
        """Read until ``marker`` shows (True), or the output ends or time runs out (False)."""
        assert self.proc.stdout is not None

        async def until() -> bool:
            while marker not in self.out:
                chunk = await self.proc.stdout.read(4096)  # type: ignore[union-attr]
                if not chunk:
                    return False
                self.out.extend(chunk)
            return True

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            return False

    def type(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)

    async def leave(self, timeout: float = 15) -> tuple[int, bytes]:
        """Close its input (the joiner leaves, the session goes on); its status and stderr."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        return await self.finish(timeout)

    async def finish(self, timeout: float = 15) -> tuple[int, bytes]:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        rest, err = await asyncio.wait_for(
            asyncio.gather(self.proc.stdout.read(), self.proc.stderr.read()), timeout
        )
        self.out.extend(rest)
        return await asyncio.wait_for(self.proc.wait(), timeout), err

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


async def ssh_once(port: int, user: str, key: Path, *extra: str) -> tuple[int, bytes, bytes]:
    """Join, and if a prompt comes, leave at once; (status, stdout, stderr)."""
    joiner = await SshJoiner.start(port, user, key, *extra)
    if await joiner.expect(b"$ "):
        rc, err = await joiner.leave()
    else:
        rc, err = await joiner.finish()
    return rc, bytes(joiner.out), err


async def asyncssh_join(
    port: int,
    user: str,
    key: asyncssh.SSHKey | None = None,
    *,
    local_addr: tuple[str, int] | None = None,
    sock: socket.socket | None = None,
) -> asyncssh.SSHClientConnection:
    kw: dict[str, Any] = {"sock": sock} if sock is not None else {"host": LOCAL, "port": port}
    if local_addr is not None:
        kw["local_addr"] = local_addr
    return await asyncio.wait_for(
        asyncssh.connect(
            **kw,
            username=user,
            client_keys=[key or asyncssh.generate_private_key("ssh-ed25519")],
            known_hosts=None,
            agent_path=None,
            config=None,
        ),
        15,
    )


async def shell_roundtrip(conn: asyncssh.SSHClientConnection, n: int) -> bytes:
    """A shell on ``conn`` (a viewer of the shared terminal): type a sum, wait for its value."""
    async with conn.create_process(term_type="xterm", encoding=None) as proc:
        out = bytearray()
        want = f"v-{n}".encode()

        async def until(marker: bytes) -> None:
            while marker not in out:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    raise AssertionError(f"shell closed before {marker!r}: {bytes(out)!r}")
                out.extend(chunk)

        await asyncio.wait_for(until(b"$ "), 20)
        proc.stdin.write(f"echo v-$(({n - 1}+1))\r".encode())
        await asyncio.wait_for(until(want), 20)
        proc.stdin.write_eof()
        return bytes(out)


# --------------------------------------------------------------------------------------------
# In-process relay with chosen limits (127.0.0.1 exempt from penalties, as in
# test_relay_security.py; penalties are tested from other loopback addresses).


@contextlib.asynccontextmanager
async def inproc_relay(
    ws_addr: tuple[str, int] | None = None, **limits: Any
) -> AsyncIterator[Relay]:
    limits.setdefault("penalties", PenaltyConfig(exempt=parse_networks([LOCAL])))
    relay = Relay(
        RelayIdentity.from_key(Ed25519Key.generate()),
        host=LOCAL,
        port=0,
        node_addr=None,
        version="0.1.0",
        limits=RelayLimits(**limits),
        ws_addr=ws_addr,
    )
    await relay.start()
    try:
        yield relay
    finally:
        relay.close()


# ============================================================================================
# 1. Counting what is open now: channels over one OpenSSH ControlMaster connection


@contextlib.asynccontextmanager
async def control_master(port: int, user: str, key: Path, tmp: Path) -> AsyncIterator[list[str]]:
    """An OpenSSH master connection (ControlPersist, in the background); yields the -o options
    that make later ``ssh`` runs open their channels over it."""
    ctl = tmp / f"cm-{uuid.uuid4().hex[:6]}"
    mux = ["-o", f"ControlPath={ctl}"]
    master = await asyncio.create_subprocess_exec(
        "ssh",
        "-o",
        "LogLevel=INFO",
        *SSH_OPTS,
        "-o",
        "BatchMode=yes",
        "-i",
        str(key),
        "-p",
        str(port),
        "-o",
        "ControlMaster=yes",
        "-o",
        "ControlPersist=60",
        *mux,
        # The master is the client that opens every channel: what it is told lands here.
        "-E",
        str(tmp / "master.log"),
        "-N",
        "-f",
        f"{user}@{LOCAL}",
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(master.wait(), 20) == 0
    try:
        yield mux
    finally:
        await asyncio.create_subprocess_exec(
            "ssh", *mux, "-O", "exit", f"x@{LOCAL}", stderr=asyncio.subprocess.DEVNULL
        )


async def test_control_master_channels_count_what_is_open_now(tmp_path: Path) -> None:
    key = make_key(tmp_path / "j")
    async with inproc_relay() as relay:
        host = await start_host(relay.port, tmp_path)
        try:
            async with control_master(relay.port, host.token, key, tmp_path) as mux:
                (link,) = [c for c in relay.connections if not c.is_host]
                # 20 joins one after the other over the one connection: each channel closes
                # before the next opens, so the cap of 16 open at once is never reached.
                for i in range(20):
                    j = await SshJoiner.start(relay.port, host.token, key, *mux)
                    assert await j.expect(b"$ "), (i, bytes(j.out))
                    assert link.open_channels == 1
                    host.session.input(f"echo seq-$((1000+{i}))\r".encode())
                    assert await j.expect(f"seq-{1000 + i}".encode()), (i, bytes(j.out))
                    rc, _ = await j.leave()
                    assert rc == 0
                    await wait_until(lambda: link.open_channels == 0, 5, "the channel to close")
                assert [c for c in relay.connections if not c.is_host] == [link]
                # 16 open at once: all work; the 17th is refused with the relay's reason.
                held = [await SshJoiner.start(relay.port, host.token, key, *mux) for _ in range(16)]
                for j in held:
                    assert await j.expect(b"$ "), bytes(j.out)
                assert link.open_channels == 16
                # (A refused mux session makes ssh fall back to a connection of its own:
                # a ProxyCommand that fails keeps this one on the master.)
                rc, out, err = await ssh_once(
                    relay.port, host.token, key, *mux, "-o", "ProxyCommand=/bin/false"
                )
                assert rc != 0, out
                assert b"Session open refused by peer" in err, err
                master_log = (tmp_path / "master.log").read_text()
                reason = "upterm: too many open channels on this connection (at most 16)"
                assert reason in master_log, (master_log, err)
                assert link.open_channels == 16
                assert [c for c in relay.connections if not c.is_host] == [link]
                # Closing one frees a slot.
                rc, _ = await held.pop().leave()
                assert rc == 0
                await wait_until(lambda: link.open_channels == 15, 5, "a slot to free")
                again = await SshJoiner.start(relay.port, host.token, key, *mux)
                assert await again.expect(b"$ "), bytes(again.out)
                host.session.input(b"echo again-$((40+2))\r")
                assert await again.expect(b"again-42"), bytes(again.out)
                for j in [*held, again]:
                    await j.leave()
        finally:
            host.close()


async def test_a_joiner_reopening_a_channel_over_one_connection_keeps_typing(
    tmp_path: Path,
) -> None:
    """Each session over one ControlMaster connection types into the shared terminal, not
    only the first (the relay carries them all on one connection to the host)."""
    key = make_key(tmp_path / "j")
    async with inproc_relay() as relay:
        host = await start_host(relay.port, tmp_path)
        try:
            async with control_master(relay.port, host.token, key, tmp_path) as mux:
                for i in range(3):
                    j = await SshJoiner.start(relay.port, host.token, key, *mux)
                    assert await j.expect(b"$ "), (i, bytes(j.out))
                    j.type(f"echo typed-$((2000+{i}))\r".encode())
                    seen = await j.expect(f"typed-{2000 + i}".encode(), timeout=5)
                    rc, _ = await j.leave()
                    assert seen, f"session {i + 1} over the master could not type: {bytes(j.out)!r}"
                    assert rc == 0
        finally:
            host.close()


# ============================================================================================
# 2. Quotas, counted on what is open now, each with its one-line refusal


async def test_sessions_per_host_key(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    async with inproc_relay(sessions_per_key=2) as relay:
        first, second, third = (
            make_tunnel(relay.port, tmp_path, identities=[key]) for _ in range(3)
        )
        await first.connect([])
        await second.connect([])
        with pytest.raises(RelayPermissionDenied) as refused:
            await third.connect([])
        assert str(refused.value).endswith(
            "refused the session: upterm: too many sessions for this host key (at most 2)"
        )
        # Another host key is not counted with this one.
        other = make_tunnel(relay.port, tmp_path)
        await other.connect([])
        assert len(relay.table) == 3
        # Closing one frees its slot: the count is of sessions open now.
        first.close()
        await wait_until(lambda: len(relay.table) == 2, 5, "the session to go")
        again = make_tunnel(relay.port, tmp_path, identities=[key])
        await again.connect([])
        assert len(relay.table) == 3
        for t in (second, third, other, again):
            t.close()


async def _raw_host_from(port: int, source: str) -> asyncssh.SSHClientConnection:
    return await asyncio.wait_for(
        asyncssh.connect(
            LOCAL,
            port,
            local_addr=(source, 0),
            client_version=wire.HOST_CLIENT_VERSION[len("SSH-2.0-") :],
            username="h",
            client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            known_hosts=None,
            agent_path=None,
            config=None,
        ),
        15,
    )


async def _legacy_register(conn: asyncssh.SSHClientConnection) -> tuple[bool, bytes]:
    req = wire.CreateSessionRequest(
        host_user="h", host_public_keys=(Ed25519Key.generate().public.authorized_key_line(),)
    )
    reply = await sshcompat.global_request(conn, wire.CREATE_SESSION_REQUEST, req.encode())
    return reply.ok, reply.payload


async def test_sessions_per_source_address(tmp_path: Path) -> None:
    async with inproc_relay(sessions_per_source=2) as relay:
        # Three hosts, each with a key of its own, all from 127.0.0.2.
        a, b, c = [await _raw_host_from(relay.port, "127.0.0.2") for _ in range(3)]
        assert (await _legacy_register(a))[0]
        assert (await _legacy_register(b))[0]
        assert await _legacy_register(c) == (
            False,
            b"upterm: too many sessions from your address (at most 2)",
        )
        # Another source is not counted with it.
        d = await _raw_host_from(relay.port, "127.0.0.3")
        assert (await _legacy_register(d))[0]
        # One of 127.0.0.2's hosts goes: its slot is free again (now-open count).
        a.close()
        await wait_until(lambda: len(relay.table) == 2, 5, "the session to go")
        assert (await _legacy_register(c))[0]
        for conn in (b, c, d):
            conn.close()


async def test_sessions_in_all(tmp_path: Path) -> None:
    async with inproc_relay(sessions_total=2) as relay:
        one, two, three = (make_tunnel(relay.port, tmp_path) for _ in range(3))
        await one.connect([])
        await two.connect([])
        with pytest.raises(RelayPermissionDenied) as refused:
            await three.connect([])
        assert str(refused.value).endswith(
            "refused the session: upterm: this relay is full; try again later or use another relay"
        )
        two.close()
        await wait_until(lambda: len(relay.table) == 1, 5, "the session to go")
        again = make_tunnel(relay.port, tmp_path)
        await again.connect([])
        assert len(relay.table) == 2
        one.close()
        again.close()


async def test_joiners_per_session_full_then_freed(tmp_path: Path) -> None:
    key = make_key(tmp_path / "j")
    async with inproc_relay(joiners_per_session=2) as relay:
        host = await start_host(relay.port, tmp_path)
        sid = host.reg.session_id
        try:
            held = [await SshJoiner.start(relay.port, host.token, key) for _ in range(2)]
            for j in held:
                assert await j.expect(b"$ "), bytes(j.out)
            # The third is told why in the user-auth banner. Refused four times from a
            # source that is not exempt: a full session is not the joiner's fault, so it
            # earns no penalty (three auth failures would).
            for _ in range(4):
                rc, out, err = await ssh_once(relay.port, host.token, key, "-b", "127.0.0.2")
                assert rc == 255, out
                assert (
                    f"upterm: session {sid} is full (2 joiners); try again when someone leaves"
                    in err.decode()
                ), err
            # One leaves: the slot is free again (joiners open now, not ever).
            rc, _ = await held.pop().leave()
            assert rc == 0
            await wait_until(
                lambda: relay.guard.joiners_by_session.count(sid) == 1, 5, "the joiner to go"
            )
            third = await SshJoiner.start(relay.port, host.token, key, "-b", "127.0.0.2")
            assert await third.expect(b"$ "), bytes(third.out)
            host.session.input(b"echo third-$((3*3))\r")
            assert await third.expect(b"third-9"), bytes(third.out)
            for j in [*held, third]:
                await j.leave()
        finally:
            host.close()


# ============================================================================================
# 3. Liveness: a host that goes silent without closing TCP


class TcpProxy:
    """A TCP relay in front of uptermd: a load balancer (a PROXY header first, if given) or a
    network path that can go silent (``freeze``: nothing forwarded, every socket kept open)."""

    def __init__(
        self, target_port: int, header: Callable[[tuple[str, int]], bytes] | None = None
    ) -> None:
        self._target = target_port
        self._header = header
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, LOCAL, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def freeze(self) -> None:
        self._flowing.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(LOCAL, self._target)
        self._writers += [writer, up_writer]
        if self._header is not None:
            up_writer.write(self._header(writer.get_extra_info("peername")))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(src, dst))
            self._tasks.add(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                await self._flowing.wait()
                data = await src.read(65536)
                await self._flowing.wait()  # read while flowing, held once frozen
                if not data:
                    with contextlib.suppress(OSError):
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()


async def test_silent_host_is_dropped_and_joiners_are_told(tmp_path: Path) -> None:
    key = make_key(tmp_path / "j")
    async with uptermd(tmp_path, "--host-keepalive", "1s", metrics=True) as relay:
        path = await TcpProxy(relay.port).start()
        # The host's own keepalive is slow: the relay must be the one to notice.
        host = await start_host(path.port, tmp_path, keepalive_s=120)
        sid = host.reg.session_id
        try:
            # Allowed: a host that answers keeps its session well past three intervals.
            await asyncio.sleep(3.5)
            assert metric(await scrape(relay), "uptermd_sessions") == 1
            rc, out, _ = await ssh_once(relay.port, host.token, key)
            assert rc == 0 and b"$ " in out
            # A joiner that is in before the host goes silent, with no channel yet.
            early = await asyncssh_join(relay.port, host.token)
            path.freeze()
            silent_at = time.monotonic()
            # It opens a channel while the host is silent: it waits, then is told.
            proc = await early.create_process(term_type="xterm", encoding=None)
            told = asyncio.ensure_future(asyncio.wait_for(proc.stderr.read(), 15))
            await wait_metric(relay, "uptermd_sessions", lambda v: v == 0, timeout=10)
            dropped_after = time.monotonic() - silent_at
            assert 1.5 <= dropped_after <= 6, dropped_after
            err = await told
            told_after = time.monotonic() - silent_at
            assert f"upterm: no host is connected for session {sid}".encode() in err, err
            assert told_after <= dropped_after + 2, (told_after, dropped_after)
            assert (await asyncio.wait_for(proc.wait(), 5)).exit_status == 1
            early.close()
            # A joiner arriving now gets upstream's banner at once.
            start = time.monotonic()
            rc, _, err = await ssh_once(relay.port, host.token, key)
            assert rc == 255
            assert f"upterm: no host is connected for session {sid}".encode() in err, err
            assert time.monotonic() - start < 3
            assert metric(await scrape(relay), "uptermd_keepalive_drops_total") == 1
        finally:
            host.close()
            path.close()


# ============================================================================================
# 4. --authorized-keys: which keys may host


def run_uptermd(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """uptermd that is expected not to start: its status and what it said."""
    return subprocess.run(
        [
            str(VENV_BIN / "uptermd"),
            "--ssh-addr",
            f"{LOCAL}:0",
            "--state-dir",
            str(tmp / "refused-state"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_authorized_keys_unreadable_or_empty_refuses_to_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    out = run_uptermd(tmp_path, "--authorized-keys", str(missing))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and str(missing) in out.stderr, out.stderr
    assert out.stderr.startswith(f"uptermd: cannot read --authorized-keys {missing}: ")
    for name, text in (("empty", ""), ("comments", "# nobody yet\n\n")):
        path = tmp_path / name
        path.write_text(text)
        out = run_uptermd(tmp_path, "--authorized-keys", str(path))
        assert out.returncode == 2
        assert out.stderr.count("\n") == 1 and str(path) in out.stderr, out.stderr
        assert "holds no public key" in out.stderr
    # A directory cannot be read as a file either.
    out = run_uptermd(tmp_path, "--authorized-keys", str(tmp_path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and str(tmp_path) in out.stderr


def _line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode()


async def test_authorized_keys_decide_who_may_host_and_sighup_reloads(tmp_path: Path) -> None:
    alice, bob = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    listed = tmp_path / "hosts"
    listed.write_text("# who may host\n" + _line(alice))
    async with uptermd(tmp_path, "--authorized-keys", str(listed)) as relay:
        ok = make_tunnel(relay.port, tmp_path, identities=[alice])
        await ok.connect([])
        with pytest.raises(RelayPermissionDenied, match="Permission denied"):
            await make_tunnel(relay.port, tmp_path, identities=[bob]).connect([])
        # SIGHUP reloads: now Bob, not Alice.
        listed.write_text(_line(bob))
        relay.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: "SIGHUP: reloaded" in relay.log_text(), 10, "the reload")
        bob_host = make_tunnel(relay.port, tmp_path, identities=[bob])
        await bob_host.connect([])
        with pytest.raises(RelayPermissionDenied, match="Permission denied"):
            await make_tunnel(relay.port, tmp_path, identities=[alice]).connect([])
        # A reload that finds the file empty keeps the keys it had (never open to all).
        listed.write_text("")
        relay.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: "kept the previous host keys" in relay.log_text(), 10, "it")
        bob_again = make_tunnel(relay.port, tmp_path, identities=[bob])
        await bob_again.connect([])
        with pytest.raises(RelayPermissionDenied, match="Permission denied"):
            await make_tunnel(relay.port, tmp_path, identities=[alice]).connect([])
        assert relay.proc.poll() is None
        for t in (ok, bob_host, bob_again):
            t.close()


# ============================================================================================
# 5. Invites at the relay: only codes the host declared get past its key check


async def test_relay_lets_invite_tokens_through_only_for_declared_codes(tmp_path: Path) -> None:
    member, stranger = make_key(tmp_path / "member"), make_key(tmp_path / "stranger")
    code, other_code = "Inv1te0code", "N0tDeclared"
    async with inproc_relay() as relay:
        host = await start_host(
            relay.port,
            tmp_path,
            authorized=[pub(member)],
            # The host honours the code; the relay has not been told about it yet.
            invites={code: Invite(code, frozenset(), "", time.time() + 600, uses_left=5)},
        )
        sid = host.reg.session_id
        invite_token = wire.with_invite(host.token, code)
        checks = host.policy.key_checks  # type: ignore[attr-defined]
        try:

            def failures(reason: str) -> float:
                value = relay.metrics.registry.get_sample_value(
                    "uptermd_auth_failures_total", {"reason": reason}
                )
                return value or 0.0

            # Refused: the session declared no invites, so the relay stops an invite token
            # itself; the host never sees a connection.
            rc, _, err = await ssh_once(relay.port, invite_token, stranger)
            assert rc == 255 and b"Permission denied (publickey)" in err, err
            assert f"upterm: this invite is not valid for session {sid}".encode() in err, err
            assert failures("unknown-invite") == 1
            assert checks == []
            # The host declares it (as the manager does when an invite is made).
            await host.tunnel.set_invites([code])
            reg = relay.table.get(sid)
            assert reg is not None and reg.invites == frozenset({wire.invite_digest(code)})
            # A code the host did not declare is still stopped at the relay.
            rc, _, err = await ssh_once(
                relay.port, wire.with_invite(host.token, other_code), stranger
            )
            assert rc == 255 and b"Permission denied (publickey)" in err, err
            assert checks == []
            # Allowed: the declared code passes the relay's key check; the host decides (yes).
            rc, out, _ = await ssh_once(relay.port, invite_token, stranger)
            assert rc == 0 and b"$ " in out, out
            assert checks == [invite_token]
            # The plain token still takes only the host's authorized keys.
            rc, _, err = await ssh_once(relay.port, host.token, stranger)
            assert rc == 255 and b"Permission denied (publickey)" in err
            assert failures("bad-key") == 1
            # The relay lets a declared code through even when the host no longer honours it:
            # the host is reached and says no, and why (the relay only carries its answer).
            del host.policy.invites[code]
            rc, out, err = await ssh_once(relay.port, invite_token, stranger)
            assert rc != 0 and b"$ " not in out
            assert b"upterm: this invite is no longer valid" in out + err, (out, err)
            assert checks == [invite_token, invite_token]
            # Revoked at the relay too (set_invites([])): stopped there again.
            await host.tunnel.set_invites([])
            assert reg.invites == frozenset() and relay.table.get(sid) is reg
            rc, _, err = await ssh_once(relay.port, invite_token, stranger)
            assert rc == 255 and b"Permission denied (publickey)" in err
            assert len(checks) == 2
            assert failures("unknown-invite") == 3
        finally:
            host.close()


# ============================================================================================
# 6. PROXY protocol: the load balancer's word on the client's address, from it alone


RELAY_DEST = ("10.0.0.1", 22)


def lb_socket(port: int, header: bytes, bind: str = LOCAL) -> socket.socket:
    """A connection to uptermd as the load balancer makes it: the header, then the client's
    bytes (the caller's SSH)."""
    sock = socket.create_connection((LOCAL, port), timeout=5, source_address=(bind, 0))
    sock.sendall(header)
    sock.setblocking(False)
    return sock


def raw_exchange(port: int, data: bytes, bind: str = LOCAL, timeout: float = 5) -> bytes:
    """Send ``data``, then read what the relay says until it closes."""
    with socket.create_connection((LOCAL, port), timeout=timeout, source_address=(bind, 0)) as s:
        s.sendall(data)
        got = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(4096):
                got += chunk
        return bytes(got)


async def lb_join(
    port: int, user: str, source: str, key: asyncssh.SSHKey | None = None, version: int = 2
) -> asyncssh.SSHClientConnection:
    encode = proxyproto.encode_v2 if version == 2 else proxyproto.encode_v1
    sock = await asyncio.to_thread(lb_socket, port, encode((source, 50000), RELAY_DEST))
    return await asyncssh_join(port, user, key, sock=sock)


def test_proxy_protocol_needs_its_load_balancers(tmp_path: Path) -> None:
    out = run_uptermd(tmp_path, "--ssh-proxy-protocol")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--proxy-protocol-from" in out.stderr, out.stderr
    assert out.stderr.startswith("uptermd: ")


async def test_proxy_protocol_gives_the_clients_address(tmp_path: Path) -> None:
    good = asyncssh.generate_private_key("ssh-ed25519")
    good_pub = wire.parse_public_key_line(_line(good))
    assert good_pub is not None
    async with uptermd(
        tmp_path,
        "--ssh-proxy-protocol",
        "--proxy-protocol-from",
        LOCAL,
        exempt=None,  # the balancer itself is not exempt: nothing may count against it
        metrics=True,
    ) as relay:
        # The host, too, comes in through the balancer.
        lb = await TcpProxy(
            relay.port, lambda peer: proxyproto.encode_v2(("192.0.2.10", 4242), RELAY_DEST)
        ).start()
        host = await start_host(lb.port, tmp_path, authorized=[good_pub])
        try:
            assert "registered by 192.0.2.10:4242" in relay.log_text()
            # v2 and v1 headers: the host sees the client's address, not the balancer's.
            for version, source in ((2, "203.0.113.7"), (1, "198.51.100.10")):
                conn = await lb_join(relay.port, host.token, source, good, version)
                await shell_roundtrip(conn, 40 + version)
                conn.close()
                assert host.joined[-1].addr == f"{source}:50000", host.joined
            # A wrong-key flood "from" 203.0.113.7: four quick failures put that source under
            # penalty (5 s each, refused once 15 s are outstanding).
            for _ in range(4):
                with pytest.raises(asyncssh.PermissionDenied):
                    await lb_join(relay.port, host.token, "203.0.113.7")
            header = proxyproto.encode_v2(("203.0.113.7", 50001), RELAY_DEST)
            said = await asyncio.to_thread(raw_exchange, relay.port, header + b"SSH-2.0-x\r\n")
            assert said.startswith(b"upterm: ") and b"refused" in said, said
            assert b"SSH-2.0-" not in said
            # ... and not against the balancer: another client through it still joins.
            conn = await lb_join(relay.port, host.token, "198.51.100.9", good)
            await shell_roundtrip(conn, 77)
            conn.close()
            assert host.joined[-1].addr == "198.51.100.9:50000"
            samples = await scrape(relay)
            assert metric(samples, "uptermd_penalties_added_total", kind="authfail") == 4
            assert metric(samples, "uptermd_penalties_active") == 1
            assert metric(samples, "uptermd_refusals_total", reason="penalty") == 1
        finally:
            host.close()
            lb.close()


async def test_proxy_protocol_refuses_bad_headers_and_unbelieved_peers(tmp_path: Path) -> None:
    async with uptermd(
        tmp_path, "--ssh-proxy-protocol", "--proxy-protocol-from", LOCAL, metrics=True
    ) as relay:
        lb = await TcpProxy(
            relay.port, lambda peer: proxyproto.encode_v1(("192.0.2.10", 4242), RELAY_DEST)
        ).start()
        host = await start_host(lb.port, tmp_path)
        try:
            # From the balancer: a malformed header, or none at all, is refused with a line.
            for bad in (
                b"PROXY TCP4 203.0.113.7 nonsense\r\n",
                b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
                proxyproto.V2_SIGNATURE + b"\x99\x11\x00\x0c" + bytes(12),
                b"SSH-2.0-OpenSSH_9.2\r\n",
            ):
                said = await asyncio.to_thread(raw_exchange, relay.port, bad)
                assert said == b"upterm: malformed PROXY protocol header\r\n", (bad, said)
            samples = await scrape(relay)
            assert metric(samples, "uptermd_refusals_total", reason="proxy-header") == 4
            # From a peer that is not a listed balancer, a header is not believed: it is
            # not SSH, so the connection fails, and nobody reaches the host as 203.0.113.7.
            for encode in (proxyproto.encode_v2, proxyproto.encode_v1):
                header = encode(("203.0.113.7", 50000), RELAY_DEST)
                sock = await asyncio.to_thread(lb_socket, relay.port, header, "127.0.0.2")
                with pytest.raises((asyncssh.Error, ConnectionError, OSError)):
                    conn = await asyncssh_join(relay.port, host.token, sock=sock)
                    conn.close()
            assert host.joined == []
            # The balancer's own clients still get in.
            conn = await lb_join(relay.port, host.token, "198.51.100.20")
            await shell_roundtrip(conn, 12)
            conn.close()
            assert [c.addr for c in host.joined] == ["198.51.100.20:50000"]
        finally:
            host.close()
            lb.close()


# ============================================================================================
# 7. Metrics


async def test_metrics_follow_sessions_joiners_bytes_failures_and_refusals(tmp_path: Path) -> None:
    member, stranger = make_key(tmp_path / "member"), make_key(tmp_path / "stranger")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    async with uptermd(tmp_path, "--max-sessions-per-key", "1", metrics=True) as relay:
        assert relay.metric_port is not None
        assert await http_get(relay.metric_port, "/health") == (200, b"ok\n")
        assert await http_get(relay.metric_port, "/ready") == (200, b"ready\n")
        before = await scrape(relay)
        assert metric(before, "uptermd_sessions") == 0
        assert metric(before, "uptermd_joiners") == 0
        host = await start_host(
            relay.port, tmp_path, authorized=[pub(member)], identities=[host_key]
        )
        try:
            await wait_metric(relay, "uptermd_sessions", lambda v: v == 1)
            # A second session for the same host key: refused, and counted by reason.
            with pytest.raises(RelayPermissionDenied):
                await make_tunnel(relay.port, tmp_path, identities=[host_key]).connect([])
            samples = await scrape(relay)
            assert metric(samples, "uptermd_refusals_total", reason="sessions-per-key") == 1
            assert metric(samples, "uptermd_sessions") == 1
            # A joiner in: counted while it is there; bytes flow both ways.
            joiner = await SshJoiner.start(relay.port, host.token, member)
            assert await joiner.expect(b"$ ")
            assert metric(await scrape(relay), "uptermd_joiners") == 1
            joiner.type(b"echo bytes-$((6*7))\r")
            assert await joiner.expect(b"bytes-42")
            mid = await scrape(relay)
            to_host = metric(mid, "uptermd_relayed_bytes_total", direction="joiner_to_host")
            to_joiner = metric(mid, "uptermd_relayed_bytes_total", direction="host_to_joiner")
            assert to_host >= len(b"echo bytes-$((6*7))\r")
            assert to_joiner > 0
            host.session.input(b"seq 1 2000\r")
            assert await joiner.expect(b"\r\n2000\r\n")
            later = await scrape(relay)
            grown = metric(later, "uptermd_relayed_bytes_total", direction="host_to_joiner")
            assert grown >= to_joiner + 8000, (to_joiner, grown)
            await joiner.leave()
            await wait_metric(relay, "uptermd_joiners", lambda v: v == 0)
            # Failures, by reason: a key the host did not authorize, a session that is not.
            rc, _, _ = await ssh_once(relay.port, host.token, stranger)
            assert rc == 255
            rc, _, _ = await ssh_once(relay.port, "AAAAAAAAAAAAAAAAAAAA", stranger)
            assert rc == 255
            rc, _, _ = await ssh_once(relay.port, "not a token!", stranger)
            assert rc == 255
            samples = await scrape(relay)
            assert metric(samples, "uptermd_auth_failures_total", reason="bad-key") == 1
            assert metric(samples, "uptermd_auth_failures_total", reason="unknown-session") == 1
            assert metric(samples, "uptermd_auth_failures_total", reason="bad-token") == 1
            assert metric(samples, "uptermd_joiners") == 0
        finally:
            host.close()
        await wait_metric(relay, "uptermd_sessions", lambda v: v == 0)
        assert metric(await scrape(relay), "uptermd_connections", state="host") == 0


# ============================================================================================
# 8. Drain on SIGTERM, and a restart the host rides through


def poll_ready(port: int, stop: float) -> list[int | str]:
    """GET /ready as fast as it answers until it stops answering (or ``stop``)."""
    seen: list[int | str] = []
    while time.monotonic() < stop:
        try:
            with socket.create_connection((LOCAL, port), timeout=2) as s:
                s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            seen.append(int(data.split()[1]) if data else "empty")
        except ConnectionRefusedError:
            seen.append("refused")
            return seen
        except OSError as exc:
            seen.append(type(exc).__name__)
    return seen


async def test_drain_tells_joiners_and_the_host_comes_back_by_itself(tmp_path: Path) -> None:
    key = make_key(tmp_path / "j")
    first = await launch(tmp_path, "--drain-timeout", "3s", metrics=True)
    port, state = first.port, first.state
    pinned = wire.parse_public_key_line((state / "ssh_host_ed25519_key.pub").read_text())
    assert pinned is not None
    tunnel = make_tunnel(port, tmp_path, pinned=pinned.blob)
    host = await start_host(port, tmp_path, tunnel=tunnel)
    sid, token = host.reg.session_id, host.token
    second: Uptermd | None = None
    try:
        joiner = await SshJoiner.start(port, token, key)
        assert await joiner.expect(b"$ ")
        assert first.metric_port is not None
        assert await http_get(first.metric_port, "/ready") == (200, b"ready\n")
        poller = asyncio.ensure_future(
            asyncio.to_thread(poll_ready, first.metric_port, time.monotonic() + 10)
        )
        await asyncio.sleep(0.2)
        sent = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        # The joiner is told in one line on its terminal, and its ssh ends.
        rc, err = await joiner.finish(timeout=10)
        assert rc != 0
        shown = bytes(joiner.out) + err
        assert DRAIN_JOINER_TEXT.encode() in shown, shown
        # uptermd is gone within the drain timeout (3 s), with a margin for the exit.
        status = await asyncio.to_thread(first.proc.wait, 10)
        assert status == 0, first.log_text()
        assert time.monotonic() - sent < 3 + 2
        seen = await poller
        # A new uptermd, same state dir, same port: the host redials with backoff and gets
        # its session id back; the same join line works again.
        second = await launch(tmp_path, port=port, state=state)
        await wait_until(lambda: tunnel.reconnects >= 1 and tunnel.connected, 25, "redial")
        assert tunnel.registered is not None and tunnel.registered.session_id == sid
        again = await SshJoiner.start(port, token, key)
        assert await again.expect(b"$ "), bytes(again.out)
        host.session.input(b"echo back-$((50+5))\r")
        assert await again.expect(b"back-55")
        await again.leave()
        # While it drained, /ready said so (503) to the load balancer, and never 200 again.
        answers = [s for s in seen if isinstance(s, int)]
        assert answers and answers[0] == 200, seen
        assert 503 in answers, f"no 503 from /ready while draining; last answers {seen[-5:]}"
        assert 200 not in answers[answers.index(503) :], seen
    finally:
        host.close()
        first.stop()
        if second is not None:
            second.stop()


# ============================================================================================
# 9. The handshake deadline


def silent_client(port: int, source: str, send: bytes) -> tuple[float, bytes]:
    """Connect from ``source``, send ``send`` (maybe nothing), then wait: (seconds until the
    relay closed, what it sent)."""
    with socket.create_connection((LOCAL, port), timeout=10, source_address=(source, 0)) as s:
        start = time.monotonic()
        if send:
            s.sendall(send)
        got = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(4096):
                got += chunk
        return time.monotonic() - start, bytes(got)


async def test_handshake_deadline_closes_and_penalises(tmp_path: Path) -> None:
    async with uptermd(tmp_path, "--handshake-timeout", "1s", metrics=True) as relay:
        # Allowed: a host that logs in within the deadline stays well past it.
        host = await start_host(relay.port, tmp_path)
        try:
            # Refused: a version line and nothing more, or nothing at all (both from
            # 127.0.0.2, at once), are closed after about the deadline.
            (slow_line, line_said), (slow_mute, mute_said) = await asyncio.gather(
                asyncio.to_thread(silent_client, relay.port, "127.0.0.2", b"SSH-2.0-lurker\r\n"),
                asyncio.to_thread(silent_client, relay.port, "127.0.0.2", b""),
            )
            assert 0.8 <= slow_line <= 3, slow_line
            assert 0.8 <= slow_mute <= 3, slow_mute
            assert line_said.startswith(b"SSH-2.0-uptermd-")
            assert mute_said.startswith(b"SSH-2.0-uptermd-")
            samples = await scrape(relay)
            assert metric(samples, "uptermd_penalties_added_total", kind="grace-exceeded") == 2
            assert metric(samples, "uptermd_refusals_total", reason="handshake-timeout") == 2
            # The source carries the penalty (10 s each, refused from 15 s): refused at once
            # with a line saying why; another source is not.
            took, said = await asyncio.to_thread(silent_client, relay.port, "127.0.0.2", b"")
            assert said.startswith(b"upterm: ") and b"refused" in said, said
            assert took < 0.5
            with socket.create_connection(
                (LOCAL, relay.port), timeout=5, source_address=("127.0.0.3", 0)
            ) as s:
                assert s.recv(64).startswith(b"SSH-2.0-uptermd-")
            # The host, past the deadline long ago, is still registered and serving.
            assert metric(await scrape(relay), "uptermd_sessions") == 1
            conn = await asyncssh_join(relay.port, host.token)
            await shell_roundtrip(conn, 99)
            conn.close()
        finally:
            host.close()
