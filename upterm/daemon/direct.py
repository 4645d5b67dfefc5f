"""A joiner's terminal bytes carried straight on the tunnel, beside its inner SSH connection.

Through our relay, a keystroke used to be an SSH packet three times over on the host's side
of the relay: the joiner's inner connection inside a tunnel channel inside the tunnel. When
the relay is ours, the host also forwards ``SESSION_ID`` + :data:`wire.DIRECT_PATH_SUFFIX`,
and for each joiner terminal the relay opens a channel there and writes a random cookie
first; the inner session channel names the same cookie in its environment
(:data:`wire.DIRECT_ENV`). The joiner's :class:`~upterm.daemon.sshd.GuestSession` claims the
channel when its terminal starts, and from then on its output and input (and the joiner's
EOF) ride that channel: one SSH layer instead of two on the relay and here.

The inner connection still does everything else: it authenticates the joiner (the relay's
certificate), carries the terminal's requests (size, signals), the exit status and the
close. The status goes at once; the close waits until the direct channel has flushed and
closed, so the end never overtakes the last output. Only the relay opens channels on the
tunnel, and a cookie is claimed only by a relay-certified joiner's terminal, once.

Bounds (a relay is a peer like any other): at most :data:`MAX_WAITING` channels are open
and not claimed, counted from the moment they open (with or without their cookie); each has
:data:`COOKIE_S` to bring its cookie and then :data:`WAIT_S` to be claimed, holding at
most :data:`EARLY_BYTES` of early input; past any of these the channel is closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import asyncssh

from upterm import sshcompat, wire

log = logging.getLogger(__name__)

#: Longest a direct channel waits for its terminal to claim it.
WAIT_S = 30.0
#: Longest a direct channel may take to bring its cookie (the relay writes it at once).
COOKIE_S = 5.0
#: Most direct channels open and not claimed, per session.
MAX_WAITING = 32
#: Most input held for a direct channel not claimed yet (the relay sends none before the
#: terminal opened; this only bounds a relay that does).
EARLY_BYTES = 64 * 1024


class DirectSink(Protocol):
    """What a claimed direct channel hands its traffic to (a joiner's terminal)."""

    def direct_data(self, data: bytes, datatype: int | None) -> None:
        """Input from the joiner."""

    def direct_eof(self) -> None:
        """The joiner closed its input."""

    def direct_paused(self) -> None:
        """The relay's window is full: output waits here."""

    def direct_resumed(self) -> None:
        """Output flows again."""

    def direct_closed(self) -> None:
        """The channel closed (flushed, or the relay closed it)."""


class DirectTable:
    """Direct channels of one session not claimed yet: all of them, and by cookie those
    whose cookie came."""

    def __init__(self) -> None:
        self._open: set[DirectChannel] = set()
        self._waiting: dict[bytes, DirectChannel] = {}

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, chan: DirectChannel) -> bool:
        """Count a channel that just opened; False if refused (too many not claimed)."""
        if len(self._open) >= MAX_WAITING:
            return False
        self._open.add(chan)
        return True

    def arrived(self, cookie: bytes, chan: DirectChannel) -> bool:
        """Keep ``chan`` for the terminal that names ``cookie``; False if the cookie is
        taken."""
        if cookie in self._waiting:
            return False
        self._waiting[cookie] = chan
        return True

    def claim(self, cookie: bytes) -> DirectChannel | None:
        """The channel that came with ``cookie``, once."""
        chan = self._waiting.pop(cookie, None)
        if chan is not None:
            self._open.discard(chan)
        return chan

    def claim_named(self, env: Any) -> DirectChannel | None:
        """The channel a session channel's environment names (:func:`cookie_of`), once."""
        cookie = cookie_of(env)
        return self.claim(cookie) if cookie is not None else None

    def forget(self, cookie: bytes | None, chan: DirectChannel) -> None:
        """``chan`` closed or gave up waiting."""
        self._open.discard(chan)
        if cookie is not None and self._waiting.get(cookie) is chan:
            del self._waiting[cookie]


def cookie_of(env: Any) -> bytes | None:
    """The cookie a session channel's environment names (asyncssh gives names and values
    as text or as bytes, by version), or None."""
    for name, value in dict(env).items():
        key = name.encode() if isinstance(name, str) else bytes(name)
        if key != wire.DIRECT_ENV.encode():
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes | bytearray) else value
        try:
            cookie = bytes.fromhex(str(text))
        except ValueError:
            return None
        return cookie if len(cookie) == wire.DIRECT_COOKIE_BYTES else None
    return None


def release_direct(table: DirectTable, env: Any) -> None:
    """Close at once the direct channel a session channel's environment names, for a
    channel that will not use it (a refused joiner): the relay holds the channel's exit
    status until its direct channel has closed."""
    chan = table.claim_named(env)
    if chan is not None:
        chan.close()


class DirectChannel(asyncssh.SSHUNIXSession[bytes]):
    """The host's end of one direct channel: first its cookie, then the joiner's bytes."""

    def __init__(self, table: DirectTable) -> None:
        self._table = table
        self.chan: Any = None
        self._head = bytearray()
        self._cookie: bytes | None = None
        self._early = bytearray()
        self._early_eof = False
        self._sink: DirectSink | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._dropped = False

    def connection_made(self, chan: Any) -> None:
        self.chan = chan
        sshcompat.merge_channel_buffers(chan)
        sshcompat.carry_stderr(chan)
        if not self._table.opened(self):
            log.info("refused a direct channel: %d not claimed already", len(self._table))
            self.close()
            return
        self._timer = asyncio.get_running_loop().call_later(COOKIE_S, self._give_up)

    def _give_up(self) -> None:
        self._timer = None
        if self._sink is None:
            log.info("closed a direct channel no joiner terminal claimed")
            self.close()

    def close(self) -> None:
        """Close at once, dropping what waits (a joiner gone, or a channel refused)."""
        self._dropped = True
        if self.chan is not None and not self._closed:
            sshcompat.discard_unsent(self.chan)
            self.chan.close()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        sink = self._sink
        if sink is not None:
            sink.direct_data(data, datatype)
            return
        if self._dropped:
            return  # refused or given up: what comes before the close is nobody's
        if self._cookie is None:
            self._head += data
            if len(self._head) < wire.DIRECT_COOKIE_BYTES:
                return
            cookie = bytes(self._head[: wire.DIRECT_COOKIE_BYTES])
            data = bytes(self._head[wire.DIRECT_COOKIE_BYTES :])
            self._head = bytearray()
            if not self._table.arrived(cookie, self):
                log.info("refused a direct channel: its cookie is taken")
                self.close()
                return
            self._cookie = cookie
            if self._timer is not None:
                self._timer.cancel()
                self._timer = asyncio.get_running_loop().call_later(WAIT_S, self._give_up)
        self._early += data
        if len(self._early) > EARLY_BYTES:
            self.close()

    def eof_received(self) -> bool:
        if self._sink is not None:
            self._sink.direct_eof()
        else:
            self._early_eof = True
        return True

    def pause_writing(self) -> None:
        if self._sink is not None:
            self._sink.direct_paused()

    def resume_writing(self) -> None:
        if self._sink is not None:
            self._sink.direct_resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._table.forget(self._cookie, self)
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.direct_closed()

    def attach(self, sink: DirectSink) -> None:
        """Hand this channel to the terminal that claimed it (with what came early)."""
        self._sink = sink
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        early, self._early = bytes(self._early), bytearray()
        if early:
            sink.direct_data(early, None)
        if self._early_eof:
            sink.direct_eof()

    def detach(self) -> None:
        """The terminal is gone: nothing more is handed to it."""
        self._sink = None
