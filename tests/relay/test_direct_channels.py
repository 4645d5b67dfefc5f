"""Direct channels (upterm.daemon.direct): a joiner's terminal bytes on the tunnel itself.

Our relay and our host carry a relay joiner's keystrokes and output on one channel of the
tunnel instead of inside the inner SSH connection; the inner connection still
authenticates the joiner and carries requests, the exit status and the close. Here: both
ends use it, nothing overtakes the last output, a host or relay without it still works,
and what a relay (a peer like any other) can make the host hold for it is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tests.relay.attackkit import _delay_channel_opens
from tests.relay.test_relay_public import asyncssh_join
from tests.relay.test_relay_security import host_session, relay  # noqa: F401 - fixture
from upterm import wire
from upterm.daemon import direct
from upterm.daemon.sshd import GuestSession
from upterm.relay.server import Relay, RelayConnection, _HostDirect, _JoinerSession

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def _hosted(r: Relay, tmp_path: Path, **kw: Any) -> AsyncIterator[Any]:
    """A host with a shell, registered on ``r``; hung up and disconnected after."""
    tunnel, session, reg = await host_session(r, tmp_path, **kw)
    try:
        yield tunnel, session, reg
    finally:
        session.hangup()
        tunnel.close()


def _guests(tunnel: Any) -> list[GuestSession]:
    return [g for gs in tunnel._policy.by_client.values() for g in gs]


def _joiner_sessions(r: Relay) -> list[_JoinerSession]:
    return [s for c in r.connections if not c.is_host for s in c._sessions]


def _host_link(r: Relay, session_id: str) -> RelayConnection:
    reg = r.table.get(session_id)
    assert reg is not None
    owner = reg.owner
    assert isinstance(owner, RelayConnection)
    return owner


class _Reader:
    """A joiner's shell, read into one buffer."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.out = bytearray()

    async def until(self, marker: bytes, timeout: float = 20) -> None:
        async def read() -> None:
            while marker not in self.out:
                chunk = await self.proc.stdout.read(65536)
                if not chunk:
                    raise AssertionError(
                        f"output ended before {marker!r}: {bytes(self.out)[-300:]!r}"
                    )
                self.out.extend(chunk)

        await asyncio.wait_for(read(), timeout)

    async def to_end(self, timeout: float = 30) -> None:
        async def read() -> None:
            while chunk := await self.proc.stdout.read(65536):
                self.out.extend(chunk)

        await asyncio.wait_for(read(), timeout)


async def _shell(r: Relay, token: str) -> tuple[asyncssh.SSHClientConnection, _Reader]:
    conn = await asyncssh_join(r.port, token)
    proc = await conn.create_process(term_type="xterm", encoding=None)
    shell = _Reader(proc)
    await shell.until(b"$ ")
    return conn, shell


async def test_a_joiners_terminal_rides_a_direct_channel_and_its_status_comes_last(
    relay: Relay,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with _hosted(relay, tmp_path) as (tunnel, session, reg):
        assert reg.session_id in _host_link(relay, reg.session_id).direct_sessions
        conn, shell = await _shell(relay, reg.token)
        # Both ends carry this terminal on the direct channel.
        (guest,) = _guests(tunnel)
        (joiner,) = _joiner_sessions(relay)
        assert guest._direct is not None
        assert joiner._direct is not None and joiner._data is joiner._direct
        shell.proc.stdin.write(b"echo direct-$((40+2))\r")
        await shell.until(b"direct-42")
        # Output the joiner does not read for a while (every window on the way fills and the
        # host holds the rest on the direct channel), then the command ends with status 7: the
        # host's last words must come before the status, never be cut off by it.
        session.farewell = b"\r\nFAREWELL-MARK\r\n"
        shell.proc.stdin.write(b"head -c 12000000 /dev/zero | tr '\\0' x; echo; exit 7\r")
        await asyncio.sleep(2)
        # Something still waits for the joiner here (else the output was dropped, or nothing
        # was held back and the test would prove nothing).
        assert guest.backlog() > 0
        await shell.to_end()
        await asyncio.wait_for(shell.proc.wait(), 10)
        assert bytes(shell.out).rstrip().endswith(b"FAREWELL-MARK"), bytes(shell.out)[-200:]
        assert shell.proc.exit_status == 7
        conn.close()


async def test_viewers_removed_joiners_and_closed_input_through_a_direct_channel(
    relay: Relay,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with _hosted(relay, tmp_path) as (tunnel, session, reg):
        policy = tunnel._policy
        conn, shell = await _shell(relay, reg.token)
        (guest,) = _guests(tunnel)
        assert guest._direct is not None
        # A viewer's keystrokes reach the host on the direct channel and go no further.
        policy.roles[guest._client.client_id] = "viewer"
        marker = tmp_path / "typed-by-a-viewer"
        shell.proc.stdin.write(f"touch {marker}\r".encode())
        await asyncio.sleep(0.5)
        assert not marker.exists()
        policy.roles[guest._client.client_id] = "typist"
        shell.proc.stdin.write(b"echo again-$((1+1))\r")
        await shell.until(b"again-2")
        # Removed: the host's words on stderr, then status 1.
        guest.remove(b"\r\nupterm: you were removed by the host\r\n")
        err = await asyncio.wait_for(shell.proc.stderr.read(), 10)
        await asyncio.wait_for(shell.proc.wait(), 10)
        assert b"removed by the host" in err
        assert shell.proc.exit_status == 1
        conn.close()
        # A second joiner closes its input: it leaves with status 0, the session goes on.
        conn2, shell2 = await _shell(relay, reg.token)
        shell2.proc.stdin.write_eof()
        await asyncio.wait_for(shell2.proc.wait(), 10)
        assert shell2.proc.exit_status == 0
        assert not session.exited.done()
        conn2.close()


async def test_without_direct_channels_the_inner_connection_carries_everything(
    relay: Relay,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A host that did not forward the direct path (upstream's, or ours before them)."""
    async with _hosted(relay, tmp_path) as (tunnel, _session, reg):
        _host_link(relay, reg.session_id).direct_sessions.clear()
        conn, shell = await _shell(relay, reg.token)
        (guest,) = _guests(tunnel)
        (joiner,) = _joiner_sessions(relay)
        assert guest._direct is None and joiner._direct is None and joiner._data is joiner._up
        shell.proc.stdin.write(b"echo inner-$((40+2)); exit 3\r")
        await shell.until(b"inner-42")
        await shell.to_end()
        await asyncio.wait_for(shell.proc.wait(), 10)
        assert shell.proc.exit_status == 3
        conn.close()


async def _open_direct(r: Relay, session_id: str, first: bytes) -> Any:
    """What a relay can do: open a direct channel to the host and write ``first``."""
    host_conn = _host_link(r, session_id).conn
    assert host_conn is not None
    chan, _ = await host_conn.create_unix_connection(
        asyncssh.SSHUNIXSession, session_id + wire.DIRECT_PATH_SUFFIX
    )
    with contextlib.suppress(BrokenPipeError):  # the host may have refused it at once
        chan.write(first)
    return chan


async def test_what_a_relay_can_make_the_host_hold_on_direct_channels_is_bounded(
    relay: Relay,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Channels no terminal claims: at most MAX_WAITING wait, each at most WAIT_S, with at
    most EARLY_BYTES of early input; a joiner's shell types on meanwhile (the bystander)."""
    monkeypatch.setattr(direct, "WAIT_S", 2.0)
    monkeypatch.setattr(direct, "COOKIE_S", 1.0)
    async with _hosted(relay, tmp_path) as (tunnel, _session, reg):
        table = tunnel._policy.direct
        conn, shell = await _shell(relay, reg.token)
        # Channels that never finish their cookie count too, and go after COOKIE_S.
        partial = [await _open_direct(relay, reg.session_id, b"c" * 15) for _ in range(8)]
        assert len(table) == 8
        await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in partial)), 5)
        assert len(table) == 0
        chans = [
            await _open_direct(relay, reg.session_id, secrets.token_bytes(wire.DIRECT_COOKIE_BYTES))
            for _ in range(direct.MAX_WAITING + 8)
        ]
        big = await _open_direct(
            relay, reg.session_id, secrets.token_bytes(16) + b"k" * (direct.EARLY_BYTES + 1)
        )
        shell.proc.stdin.write(b"echo bystander-$((2+3))\r")
        await shell.until(b"bystander-5")
        assert len(table) <= direct.MAX_WAITING
        closed = [c for c in chans if c.is_closing()]
        assert len(closed) >= 8, f"{len(closed)} of {len(chans)} refused"
        await asyncio.wait_for(big.wait_closed(), 5)  # too much early input
        # Unclaimed, each gives up after WAIT_S.
        await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in chans)), 10)
        assert len(table) == 0
        shell.proc.stdin.write(b"echo still-$((3+4))\r")
        await shell.until(b"still-7")
        conn.close()


async def test_an_end_to_end_joiner_cannot_take_a_direct_channel(
    relay: Relay,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A cookie is claimed only by a joiner the relay certified: an end-to-end joiner
    (which the relay cannot read) naming one in its environment gets nothing from it."""
    async with _hosted(relay, tmp_path) as (tunnel, _session, reg):
        cookie = secrets.token_bytes(wire.DIRECT_COOKIE_BYTES)
        planted = await _open_direct(relay, reg.session_id, cookie)
        jump = await asyncssh_join(relay.port, reg.token)
        inner = await asyncio.wait_for(
            asyncssh.connect(
                "upterm",
                22,
                tunnel=jump,
                username=reg.token,
                client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                known_hosts=None,
                agent_path=None,
                config=None,
            ),
            15,
        )
        proc = await inner.create_process(
            term_type="xterm", encoding=None, env={wire.DIRECT_ENV: cookie.hex()}
        )
        shell = _Reader(proc)
        await shell.until(b"$ ")
        (guest,) = _guests(tunnel)
        assert guest._client.mode != "relay"
        assert guest._direct is None
        assert tunnel._policy.direct.claim(cookie) is not None  # still waiting, unclaimed
        planted.close()
        inner.close()
        jump.close()


def test_cookies_are_read_from_either_kind_of_environment() -> None:
    cookie = os.urandom(wire.DIRECT_COOKIE_BYTES)
    assert direct.cookie_of({wire.DIRECT_ENV: cookie.hex()}) == cookie
    assert direct.cookie_of({wire.DIRECT_ENV.encode(): cookie.hex().encode()}) == cookie
    assert direct.cookie_of({"LANG": "C"}) is None
    assert direct.cookie_of({wire.DIRECT_ENV: "zz"}) is None
    assert direct.cookie_of({wire.DIRECT_ENV: cookie.hex()[:-2]}) is None


async def test_a_refused_joiner_is_told_at_once_not_after_its_direct_channel_times_out(
    relay: Relay,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The host refuses this relay joiner (--e2e-only) on the terminal's channel: the direct
    channel opened for it is closed first, so the relay passes the status on at once."""
    async with _hosted(relay, tmp_path, e2e_only=True) as (tunnel, _session, reg):
        conn = await asyncssh_join(relay.port, reg.token)
        t0 = asyncio.get_running_loop().time()
        proc = await conn.create_process(term_type="xterm", encoding=None)
        err = await asyncio.wait_for(proc.stderr.read(), 15)
        await asyncio.wait_for(proc.wait(), 15)
        took = asyncio.get_running_loop().time() - t0
        assert proc.exit_status == 1, err
        assert took < 3, f"told after {took:.1f} s"
        assert len(tunnel._policy.direct) == 0
        conn.close()


def _direct_channels_at_relay(r: Relay, session_id: str) -> int:
    conn = _host_link(r, session_id).conn
    assert conn is not None
    chans = conn._channels.values()
    return sum(1 for c in chans if isinstance(getattr(c, "_session", None), _HostDirect))


async def test_terminals_closed_while_their_direct_channel_opens_leave_none_behind(
    relay: Relay,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A joiner that closes each terminal before the host confirmed its direct channel (a
    slow link: here the host answers channel opens 0.3 s late): each such channel is
    closed once it opens, never left on the tunnel without its cookie."""
    async with _hosted(relay, tmp_path) as (tunnel, _session, reg):
        conn, shell = await _shell(relay, reg.token)
        assert _direct_channels_at_relay(relay, reg.session_id) == 1  # this shell's
        _delay_channel_opens(tunnel._conn, 0.3, lambda: None)
        for _ in range(12):
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, term_type="xterm")
            await asyncio.sleep(0.02)
            chan.close()
            await chan.wait_closed()
        await asyncio.sleep(1.5)
        assert len(tunnel._policy.direct) == 0
        assert _direct_channels_at_relay(relay, reg.session_id) == 1
        shell.proc.stdin.write(b"echo alive-$((6*7))\r")
        await shell.until(b"alive-42")
        conn.close()


async def test_a_joiner_far_behind_still_gets_its_exit_status_when_removed(
    relay: Relay,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Removed while megabytes wait for it: the connection is closed a second later, before
    the direct channel could flush, and the joiner is still told status 1 (the status went
    at once, as a channel request, and the relay kept it)."""
    async with _hosted(relay, tmp_path) as (tunnel, _session, reg):
        conn, shell = await _shell(relay, reg.token)
        (guest,) = _guests(tunnel)
        shell.proc.stdin.write(b"head -c 20000000 /dev/zero | tr '\\0' y\r")
        await asyncio.sleep(2)  # not reading: the windows fill, the host holds the rest
        assert guest.backlog() > 0
        guest.remove(b"\r\nupterm: you were removed by the host\r\n")
        await asyncio.sleep(2)  # the host closed the connection after KICK_CLOSE_DELAY_S
        await shell.to_end()
        await asyncio.wait_for(shell.proc.wait(), 10)
        assert shell.proc.exit_status == 1
        conn.close()
