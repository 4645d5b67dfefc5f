"""``ssh -L`` through a session: a joiner's connection to a destination the host allows.

Refused unless the host opened it (``--allow-forwarding=loopback|any``). Loopback means a
literal loopback address or ``localhost`` (no DNS: a name that resolves elsewhere later
cannot get in); any means what the host's resolver says. Each new destination of each
joiner asks the host (unless accepted up front), viewers and keys marked
``no-port-forwarding``/``restrict`` never forward, and each connection's bytes go to the
activity log when it closes. Forwarded bytes yield to a terminal in use, as file transfers
do (:class:`upterm.daemon.transfer.Pacer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable

import asyncssh

from upterm import sshcompat
from upterm.daemon.consent import Activity
from upterm.daemon.session import ClientInfo
from upterm.daemon.transfer import FULL_WINDOW_BYTES, PACED_WINDOW_BYTES, PACER
from upterm.text import printable

FORWARDING_OFF = (
    "upterm: port forwarding (ssh -L) is off in this session; the host can allow it with "
    "--allow-forwarding loopback"
)
NOT_FOR_VIEWERS = "upterm: viewers may not forward ports; ask the host for the typist role"
KEY_NO_FORWARDING = "upterm: your key may not forward ports (no-port-forwarding or restrict)"
LOOPBACK_ONLY = (
    "upterm: only loopback destinations (localhost, 127.0.0.0/8, ::1) may be forwarded in "
    "this session, not {}"
)
REFUSED = "upterm: forwarding to {} refused: {}"
CONNECT_FAILED = "upterm: the host could not connect to {}: {}"
#: Resolving and connecting give up after this long.
CONNECT_TIMEOUT_S = 10.0
#: Bytes a forwarded connection holds for a slow reader before it stops reading the other.
HIGH_WATER_BYTES = 256 * 1024


def _prohibited(text: str) -> asyncssh.ChannelOpenError:
    return asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, text)


def loopback_targets(dest_host: str) -> list[str] | None:
    """The addresses a loopback-only forward may connect to for ``dest_host``, or None if
    it names anything else (names other than localhost are never resolved)."""
    if dest_host.lower() in ("localhost", "localhost."):
        return ["127.0.0.1", "::1"]
    try:
        addr = ipaddress.ip_address(dest_host.strip("[]"))
    except ValueError:
        return None
    return [str(addr)] if addr.is_loopback else None


async def open_forward(
    *,
    mode: str,
    may_forward: str,
    client: ClientInfo,
    dest_host: str,
    dest_port: int,
    ask: Callable[[ClientInfo, str, str], Awaitable[Activity]],
    report: Callable[[Activity], None],
) -> _ChannelSide:
    """Decide on one ``direct-tcpip`` channel and connect it; raises the refusal the
    joiner's ssh shows ("open failed: administratively prohibited: ...")."""
    if not mode:
        raise _prohibited(FORWARDING_OFF)
    if may_forward:
        raise _prohibited(may_forward)
    dest = printable(f"{dest_host}:{dest_port}", 300)
    if not 0 < dest_port < 65536 or not dest_host or len(dest_host) > 255:
        raise _prohibited(REFUSED.format(dest, "no such destination"))
    targets = loopback_targets(dest_host)
    if mode == "loopback" and targets is None:
        raise _prohibited(LOOPBACK_ONLY.format(dest))
    activity = await ask(client, "forward", dest)
    if not activity.allowed:
        raise _prohibited(REFUSED.format(dest, activity.by))
    try:
        _, splice = await asyncio.wait_for(
            _connect(targets or [dest_host], dest_port), CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        activity.allowed, activity.by = False, f"{activity.by}, then {why}"
        activity.ended = True
        report(activity)
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_CONNECT_FAILED, CONNECT_FAILED.format(dest, why)
        ) from None
    splice.activity, splice.report = activity, report
    return splice.channel_side


async def _connect(hosts: list[str], port: int) -> tuple[asyncio.BaseTransport, _Splice]:
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for host in hosts:
        try:
            return await loop.create_connection(_Splice, host, port, family=socket.AF_UNSPEC)
        except OSError as exc:
            last = exc
    assert last is not None
    raise last


class _Reading:
    """Whether one side is read: paused while any reason holds it (the other side's buffer
    is full, the pacer, the channel not open yet), read again once none does."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._pause, self._resume = pause, resume
        self._holds: dict[str, int] = {}

    def hold(self, reason: str) -> None:
        if not self._holds:
            with contextlib.suppress(OSError, asyncssh.Error, RuntimeError):
                self._pause()
        self._holds[reason] = self._holds.get(reason, 0) + 1

    def release(self, reason: str, all_of_it: bool = False) -> None:
        left = 0 if all_of_it else self._holds.get(reason, 0) - 1
        if left > 0:
            self._holds[reason] = left
        else:
            self._holds.pop(reason, None)
        if not self._holds:
            with contextlib.suppress(OSError, asyncssh.Error, RuntimeError):
                self._resume()  # the connection may have closed meanwhile

    def pace(self, size: int) -> None:
        """Bytes just passed on: stop reading until they were due (the transfer pacer)."""
        delay = PACER.reserve(size)
        if delay > 0:
            self.hold("pace")
            asyncio.get_running_loop().call_later(delay, self.release, "pace")


class _Splice(asyncio.Protocol):
    """The TCP side of a forward; :attr:`channel_side` is the SSH side. Each side stops
    reading while the other holds more than HIGH_WATER_BYTES for its reader, and while
    the pacer says so."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.activity: Activity | None = None
        self.report: Callable[[Activity], None] | None = None
        self.channel_side = _ChannelSide(self)
        self.tcp_reading: _Reading | None = None
        self.chan_reading: _Reading | None = None
        self._reported = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER_BYTES)
        self.tcp_reading = _Reading(transport.pause_reading, transport.resume_reading)
        # Nothing is read (a server's greeting) until the channel is there to carry it.
        self.tcp_reading.hold("opening")

    def data_received(self, data: bytes) -> None:
        if self.activity is not None:
            self.activity.bytes_out += len(data)
        if self.chan is not None:
            self.chan.write(data)
        if self.tcp_reading is not None:
            self.tcp_reading.pace(len(data))

    def eof_received(self) -> bool:
        if self.chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.chan.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.chan is not None:
            self.chan.close()
        self.finished()

    def pause_writing(self) -> None:
        if self.chan_reading is not None:
            self.chan_reading.hold("full")

    def resume_writing(self) -> None:
        if self.chan_reading is not None:
            self.chan_reading.release("full", all_of_it=True)

    def finished(self) -> None:
        """Both sides are done (or the joiner went before the channel opened): the
        connection closes, and the forward's bytes go to the audit, once."""
        if self.transport is not None:
            self.transport.close()
        if self.activity is not None and self.report is not None and not self._reported:
            self._reported = True
            self.activity.ended = True
            self.report(self.activity)


class _ChannelSide(asyncssh.SSHTCPSession[bytes]):
    def __init__(self, splice: _Splice) -> None:
        self._splice = splice

    def abandon(self) -> None:
        """The channel never opened (the joiner left meanwhile): close the TCP side."""
        self._splice.finished()

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        splice = self._splice
        splice.chan = chan
        chan.set_write_buffer_limits(HIGH_WATER_BYTES)
        splice.chan_reading = _Reading(chan.pause_reading, chan.resume_reading)
        if splice.tcp_reading is not None:
            splice.tcp_reading.release("opening")

    def data_received(self, data: bytes, datatype: int | None) -> None:
        splice = self._splice
        if splice.activity is not None:
            splice.activity.bytes_in += len(data)
        if splice.transport is not None:
            splice.transport.write(data)
        chan = splice.chan
        if chan is not None and splice.chan_reading is not None:
            paced = PACER.interactive()
            sshcompat.set_receive_window(chan, PACED_WINDOW_BYTES if paced else FULL_WINDOW_BYTES)
            splice.chan_reading.pace(len(data))

    def eof_received(self) -> bool:
        transport = self._splice.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
            return True
        return False

    def pause_writing(self) -> None:
        if self._splice.tcp_reading is not None:
            self._splice.tcp_reading.hold("full")

    def resume_writing(self) -> None:
        if self._splice.tcp_reading is not None:
            self._splice.tcp_reading.release("full", all_of_it=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.finished()
