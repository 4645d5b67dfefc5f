"""The relay's front door: every TCP connection passes here before asyncssh sees a byte.

asyncssh's own listener accepts everything, keeps every unauthenticated connection for its
whole login timeout, parses whatever one socket read brought in one go (an attacker's
256 KiB of tiny packets held the event loop for everyone) and cannot read a PROXY protocol
header. So uptermd runs its own accept loop and hands asyncssh each admitted connection
through a thin protocol, the :class:`Gate`, which

- refuses at once, before any SSH work, a source under penalty or over the pre-auth caps
  (OpenSSH's MaxStartups with random early drop, and a per-source cap), with one line of text
  saying why (visible with ``ssh -v`` or ``nc``) and a log line;
- reads the PROXY protocol header first when the peer is a trusted load balancer, so that
  caps, penalties, logs and ``session current`` use the client's real address;
- keeps a handshake deadline (no key exchange and authentication within it: closed, and the
  source penalised for "grace-exceeded");
- feeds asyncssh what the socket brought in slices, at most a bounded time per connection per
  pass of the event loop, so one connection's burst waits its turn behind everyone else's;
- gives all connections not yet logged in, together, one bounded turn per pass of the event
  loop (:class:`PreauthTurns`): key exchanges are the dearest work a stranger can ask for,
  and however many of them come at once, a logged-in keystroke waits behind one turn, not
  behind all of them;
- tells the relay, when the connection ends unauthenticated, which penalty it earned.

The accept loop survives running out of descriptors (EMFILE/ENFILE): it stops accepting for
a moment, counts it, and keeps serving every existing connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from upterm.relay import proxyproto
from upterm.relay.policy import PenaltyKind, Refusal, TokenBucket

log = logging.getLogger(__name__)

#: Time one connection may spend being parsed per pass of the event loop before the others
#: get their turn. A burst of tiny packets is worth a few milliseconds, never a stall.
FEED_BUDGET_S = 0.002
#: The slice of received bytes handed to asyncssh at a time adapts per connection between
#: these: large for bulk data (few, big packets: cheap per byte), small for floods of tiny
#: packets (asyncssh's work per call grows with the packets in it).
FEED_MIN_SLICE_BYTES = 256
FEED_MAX_SLICE_BYTES = 256 * 1024
FEED_START_SLICE_BYTES = 4 * 1024
#: What one piece should cost at this connection's cost per byte: well inside the budget.
FEED_PIECE_S = FEED_BUDGET_S / 4
#: Stop reading the socket while this much received data waits to be parsed.
BACKLOG_HIGH_BYTES = 256 * 1024
#: The same, and the size of one socket read, before login: nothing in a login is larger
#: (an SSH handshake's messages, an HTTP request head, a browser's link), and a stranger
#: waiting for its turn must not make the relay hold more (a thousand of them: ~32 MiB).
PREAUTH_BACKLOG_HIGH_BYTES = 16 * 1024
PREAUTH_READ_BYTES = 16 * 1024
#: Connections accepted per readiness event before other work runs, and the time that
#: may take (a refused connection costs tens of microseconds, mostly the kernel's).
ACCEPT_BATCH = 64
ACCEPT_BUDGET_S = 0.001
#: Time all connections not yet logged in may spend, together, per pass of the event loop
#: (at least one piece of one connection is fed per pass, so logins always make progress).
PREAUTH_TURN_BUDGET_S = 0.001
#: Back-off of the accept loop when the process or system is out of descriptors.
ACCEPT_BACKOFF_MIN_S = 0.05
ACCEPT_BACKOFF_MAX_S = 1.0
#: Listen backlog: a public relay meets bursts of connections.
LISTEN_BACKLOG = 4096
#: Errors of accept(2) that mean "out of resources", not "that one connection failed".
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Extra-info key under which asyncssh's connection finds its gate.
GATE_INFO = "upterm_gate"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Guard(Protocol):
    """What the gate asks of the relay: admission, penalties and counting."""

    def admit(self, addr: str, now: float) -> Refusal | None:
        """Admit a new unauthenticated connection from ``addr`` (counted), or refuse it."""
        ...

    def left_preauth(self, addr: str) -> None:
        """A connection admitted by :meth:`admit` authenticated or closed."""
        ...

    def penalize(self, addr: str, kind: PenaltyKind, now: float) -> None:
        """Record a penalty against ``addr``."""
        ...

    def refused(self, addr: str, refusal: Refusal) -> None:
        """A connection was refused before SSH (for logs and metrics)."""
        ...

    def accept_error(self, name: str) -> None:
        """accept(2) failed for want of resources (``name`` is the errno name)."""
        ...

    def connection_opened(self) -> None:
        """A TCP connection was accepted."""
        ...

    def connection_closed(self, duration_s: float) -> None:
        """A TCP connection that was accepted has closed."""
        ...


@dataclass(frozen=True)
class GateConfig:
    """How the front door behaves."""

    handshake_timeout_s: float = 30.0
    #: Read a PROXY protocol header (v1 or v2) from peers in ``proxy_from``.
    proxy_protocol: bool = False
    proxy_from: tuple[Network, ...] = ()

    #: HTTP proxies (the WebSocket listener only) whose ``X-Forwarded-For`` is believed:
    #: a connection from one is admitted by the client address it names, once the request
    #: head has been read, instead of by the proxy's at accept.
    forwarded_from: tuple[Network, ...] = ()

    def trusts_proxy(self, peer: str) -> bool:
        """Whether ``peer`` (the socket's address) may send us a PROXY header."""
        return self.proxy_protocol and in_networks(peer, self.proxy_from)

    def trusts_forwarded(self, peer: str) -> bool:
        """Whether ``peer`` is an HTTP proxy whose ``X-Forwarded-For`` names the client."""
        return in_networks(peer, self.forwarded_from)


def in_networks(addr: str, nets: tuple[Network, ...]) -> bool:
    """Whether ``addr`` (IPv4-mapped IPv6 counts as IPv4) is in one of ``nets``."""
    if not nets:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


#: At most this many ``X-Forwarded-For`` entries are looked at (from the right).
MAX_FORWARDED_HOPS = 16


def forwarded_client(header: str, peer: str, trusted: tuple[Network, ...]) -> str:
    """The client's address from ``X-Forwarded-For`` as sent by ``peer`` (a trusted proxy).

    Each proxy appends the address it received from, so the list is read from the right:
    trusted proxies are skipped and the first other address is the client's. Anything left
    of it was written by the client itself and is ignored. A malformed entry ends the walk
    at the last address a trusted proxy vouched for (the peer itself when the header is
    missing), so a client cannot choose its address with garbage.
    """
    client = peer
    entries = [e.strip() for e in header.split(",")] if header.strip() else []
    for entry in reversed(entries[-MAX_FORWARDED_HOPS:]):
        addr = _forwarded_addr(entry)
        if addr is None:
            break
        client = addr
        if not in_networks(addr, trusted):
            break
    return client


def _forwarded_addr(entry: str) -> str | None:
    """An address from one entry: ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1`` or
    ``[2001:db8::1]:5678``; None when it is none of these."""
    text = entry
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def ssh_refusal(refusal: Refusal) -> bytes:
    """A refusal as the SSH listener says it: before the SSH version line, RFC 4253 allows
    other lines (OpenSSH shows them with -v, nc as they are). The text is ours, never the
    peer's."""
    return f"upterm: {refusal.message}\r\n".encode("ascii", "replace")


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or bare addresses) as networks; ValueError names the bad one."""
    nets: list[Network] = []
    for value in values:
        for part in value.replace(",", " ").split():
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError as exc:
                raise ValueError(f"{part!r} is not an address or CIDR block") from exc
    return tuple(nets)


class PreauthTurns:
    """One shared turn per pass of the event loop for every connection not yet logged in.

    A key exchange costs the relay about a millisecond of Python per step; fed as they
    arrived, eight handshakes in flight put 10-15 ms of them in front of a logged-in
    joiner's keystroke. Here gates that are not logged in queue for the turn instead, and
    each turn feeds them one piece each, in arrival order, until PREAUTH_TURN_BUDGET_S is
    spent; the rest wait for the next pass. Logins still go as fast as the loop is free
    (a pass with nothing else to do is short), and what a flood of them costs anyone else
    is one turn per pass, whatever the number of attackers or their addresses.
    """

    def __init__(self, budget_s: float = PREAUTH_TURN_BUDGET_S) -> None:
        self._budget_s = budget_s
        self._queue: collections.deque[Gate] = collections.deque()
        self._scheduled = False

    def want(self, gate: Gate) -> None:
        """Queue ``gate`` for a piece in a coming turn."""
        self._queue.append(gate)
        if not self._scheduled:
            self._scheduled = True
            # call_later(0) runs after the I/O callbacks of the pass (see Gate._feed).
            asyncio.get_running_loop().call_later(0, self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        clock = time.perf_counter
        start = clock()
        # Only the gates queued before this turn: one that goes again is at the back, for
        # the next pass.
        try:
            for _ in range(len(self._queue)):
                gate = self._queue.popleft()
                try:
                    gate._feed(one_piece=True)
                except Exception:
                    # What a peer's bytes broke ends that peer's connection (as asyncio
                    # does when a protocol raises), never the turn of those behind it.
                    log.exception("closed %s: its input raised", gate.addr)
                    gate.abort()
                if clock() - start >= self._budget_s:
                    break
        finally:
            if self._queue and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_later(0, self._turn)


class _TransportView(asyncio.Transport):
    """The transport asyncssh is given: the real one, with the client's real address.

    Reading is paused when either asyncssh asked for it or the gate holds a backlog, and
    resumed only when neither does.
    """

    def __init__(self, gate: Gate, real: asyncio.Transport, peername: Any) -> None:
        super().__init__()
        self._gate = gate
        self._real = real
        #: The client's address (set again when a trusted proxy names the client).
        self.peername = peername
        self.inner_paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peername
        if name == GATE_INFO:
            return self._gate
        return self._real.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._real.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._real.writelines(list_of_data)

    def write_eof(self) -> None:
        self._real.write_eof()

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._real.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def abort(self) -> None:
        self._real.abort()

    def close(self) -> None:
        self._real.close()

    def is_closing(self) -> bool:
        return self._real.is_closing()

    def pause_reading(self) -> None:
        self.inner_paused = True
        self._gate.update_reading()

    def resume_reading(self) -> None:
        self.inner_paused = False
        self._gate.inner_resumed()

    def is_reading(self) -> bool:
        return not self.inner_paused

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("the gate owns this transport's protocol")

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._gate


class Gate(asyncio.Protocol):
    """One accepted connection on its way into asyncssh (see the module docstring)."""

    #: Socket reads so far, over every gate of the process: what the relay writes while
    #: handling one read can be told from what a later read brings (server._MergedWrites).
    reads = 0

    def __init__(
        self,
        guard: Guard,
        cfg: GateConfig,
        inner_factory: Callable[[], asyncio.Protocol],
        sock_peer: str,
        sock_port: int,
        admitted: bool = False,
        refusal_bytes: Callable[[Refusal], bytes] | None = None,
        turns: PreauthTurns | None = None,
    ) -> None:
        self._guard = guard
        #: Where this connection's input waits its turn until it logs in (None: no turns).
        self._turns = turns
        #: What a refused peer is told, in the listener's protocol.
        self._refusal_bytes = refusal_bytes or ssh_refusal
        self._cfg = cfg
        self._inner_factory = inner_factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._view: _TransportView | None = None
        self._opened_at = time.monotonic()
        #: The client's address (the PROXY header's source when there is one).
        self.addr = sock_peer
        self.port = sock_port
        self._awaiting_header = cfg.trusts_proxy(sock_peer)
        #: From a trusted HTTP proxy: admitted by :meth:`forwarded`, once the request head
        #: names the client.
        self.deferred = not admitted and not self._awaiting_header
        self.deferred = self.deferred and cfg.trusts_forwarded(sock_peer)
        self._header = bytearray()
        #: Admitted by the accept loop already (no PROXY header to wait for).
        self._admitted = admitted
        self._preauth = False
        self.authenticated = False
        #: Set by the relay: the peer tried to authenticate (and, unauthenticated, failed).
        self.auth_attempted = False
        #: Set by the relay: the peer gave a user name that is no session token.
        self.invalid_user = False
        #: Set by the relay: the peer's failure was not its fault (its host is away).
        self.no_penalty = False
        self._timed_out = False
        self._deadline: asyncio.TimerHandle | None = None
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_bytes = 0
        self._head_off = 0
        self._feeding = False
        self._eof_pending = False
        self._slice = FEED_START_SLICE_BYTES
        #: Seconds of parsing per received byte, averaged (starts as a bulk connection's).
        self._cost_s_per_byte = FEED_PIECE_S / FEED_START_SLICE_BYTES
        self._reading_paused = False
        self._closed = False
        self._bucket: TokenBucket | None = None
        self._throttle: asyncio.TimerHandle | None = None
        #: What is behind the gate, resuming in a coming turn (see defer_to_turn).
        self._resume: Callable[[], None] | None = None

    # -- asyncio protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if hasattr(type(transport), "max_size"):
            # asyncio's plain socket transport reads up to max_size (256 KiB) at a time: a
            # stranger gets far less until it logs in (auth_completed gives it back).
            transport.max_size = PREAUTH_READ_BYTES  # type: ignore[attr-defined]
        self._guard.connection_opened()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._cfg.handshake_timeout_s, self._grace_exceeded)
        if self._admitted:
            self._start_inner()
        elif self.deferred:
            # Not yet anyone's pre-auth connection: that waits for the client's address.
            self._start_inner(preauth=False)
        elif not self._awaiting_header:
            self._admit()

    def data_received(self, data: bytes) -> None:
        Gate.reads += 1
        if self._closed:
            return
        if self._awaiting_header:
            self._header += data
            try:
                parsed = proxyproto.parse(bytes(self._header))
            except proxyproto.ProxyHeaderError as exc:
                log.info("refused %s: bad PROXY protocol header: %s", self.addr, exc)
                self._refuse(Refusal("proxy-header", "malformed PROXY protocol header"))
                return
            if parsed is None:
                return
            info, used = parsed
            rest = bytes(self._header[used:])
            self._header = bytearray()
            self._awaiting_header = False
            if info.source is not None:
                self.addr, self.port = info.source
            if not self._admit():
                return
            if not rest:
                return
            data = rest
        if (
            not self._feeding
            and not self._backlog
            and self._bucket is None
            and self._inner is not None
            and len(data) <= FEED_MIN_SLICE_BYTES
            and (self.authenticated or self._turns is None)
        ):
            # A keystroke or a small packet with nothing queued ahead: straight through, no
            # backlog bookkeeping (a slice this small is never split, and costs little to
            # learn from). Reading was not paused for it, so nothing to update either.
            self._inner.data_received(data)
            return
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        if self._bucket is not None:
            self._charge(len(data))
        if self._backlog_bytes >= self._backlog_high() and not self._reading_paused:
            self.update_reading()  # waiting for its feed or its turn: bounded all the same
        if not self._feeding:
            if self._turns is not None and not self.authenticated and self._inner is not None:
                self._feeding = True
                self._turns.want(self)
                self.update_reading()
            else:
                self._feed()

    def eof_received(self) -> bool:
        if self._closed or self._inner is None:
            return False
        if self._feeding or self._backlog:
            self._eof_pending = True  # after the backlog (waiting for a feed or a resume)
            return True
        result = self._inner.eof_received()
        return bool(result)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._backlog.clear()
        self._backlog_bytes = 0
        if self._deadline is not None:
            self._deadline.cancel()
        if self._throttle is not None:
            self._throttle.cancel()
        if self._preauth:
            self._preauth = False
            self._guard.left_preauth(self.addr)
            self._penalize_unauthenticated()
        self._guard.connection_closed(time.monotonic() - self._opened_at)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def abort(self) -> None:
        """Drop this connection at once (its input broke what is behind the gate)."""
        if self._transport is not None and not self._closed:
            self._transport.abort()

    def abandon(self) -> None:
        """The transport could not be made: give back what admission counted."""
        if not self._closed and self._transport is None and self._admitted:
            self._closed = True
            self._guard.left_preauth(self.addr)

    # -- called by the relay --

    def auth_completed(self) -> None:
        """The peer authenticated: it leaves the pre-auth caps and its deadline."""
        self.authenticated = True
        if self._transport is not None and "max_size" in vars(self._transport):
            del self._transport.max_size  # type: ignore[attr-defined]  # asyncio's again
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._preauth:
            self._preauth = False
            self._guard.left_preauth(self.addr)

    def defer_to_turn(self, resume: Callable[[], None]) -> bool:
        """Run ``resume`` in this connection's next turn, if it is not logged in yet (False:
        run it now). asyncssh handles some login messages in a task and, once that is done,
        parses what arrived meanwhile from the task's callback: a key exchange sent in one
        write with its KEXINIT was computed there, around the turns."""
        if self.authenticated or self._turns is None or self._closed:
            return False
        self._resume = resume
        if not self._feeding:
            self._feeding = True
            self._turns.want(self)
        return True

    def _backlog_high(self) -> int:
        return BACKLOG_HIGH_BYTES if self.authenticated else PREAUTH_BACKLOG_HIGH_BYTES

    def inner_resumed(self) -> None:
        """What is behind the gate takes input again: read, and feed what waits."""
        self.update_reading()
        if self._backlog and not self._feeding and not self._closed and self._inner is not None:
            self._feeding = True
            if self._turns is not None and not self.authenticated:
                self._turns.want(self)
            else:
                asyncio.get_running_loop().call_later(0, self._feed)

    def update_reading(self) -> None:
        """Pause or resume the socket: paused while asyncssh asks or a backlog waits."""
        if self._transport is None or self._closed:
            return
        want_paused = (
            self._backlog_bytes >= self._backlog_high()
            or self._throttle is not None
            or (self._view is not None and self._view.inner_paused)
        )
        if want_paused and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        elif not want_paused and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()

    def limit_rate(self, rate_bytes_s: float, burst_bytes: float) -> None:
        """Cap what this peer may send (a host's output, ``--host-rate``): over the rate, its
        socket is not read until the debt is paid, and TCP holds the rest at the sender."""
        self._bucket = TokenBucket(rate_bytes_s, burst_bytes)

    def _charge(self, nbytes: int) -> None:
        assert self._bucket is not None
        wait = self._bucket.take(nbytes, time.monotonic())
        if wait > 0 and self._throttle is None:
            self._guard.refused(self.addr, Refusal("host-rate", "over its byte rate"))
            self._throttle = asyncio.get_running_loop().call_later(wait, self._unthrottle)
            self.update_reading()

    def _unthrottle(self) -> None:
        self._throttle = None
        self.update_reading()

    # -- internals --

    def _admit(self) -> bool:
        now = time.monotonic()
        refusal = self._guard.admit(self.addr, now)
        if refusal is not None:
            self._refuse(refusal)
            return False
        self._admitted = True
        self._start_inner()
        return True

    def forwarded(self, header: str) -> Refusal | None:
        """The request head's ``X-Forwarded-For``, on a connection from a trusted HTTP
        proxy: the client it names becomes this connection's address and is judged now as
        any other at accept (caps, penalties). No-op on other connections."""
        if not self.deferred or self._closed:
            return None
        self.deferred = False
        self.addr = forwarded_client(header, self.addr, self._cfg.forwarded_from)
        self.port = 0
        if self._view is not None:
            self._view.peername = (self.addr, self.port)
        refusal = self._guard.admit(self.addr, time.monotonic())
        if refusal is not None:
            self._guard.refused(self.addr, refusal)
            return refusal
        self._admitted = True
        self._preauth = True
        return None

    def _start_inner(self, preauth: bool = True) -> None:
        self._preauth = preauth
        assert self._transport is not None
        peername: Any = (self.addr, self.port)
        self._view = _TransportView(self, self._transport, peername)
        # asyncssh starts its own login timer when its connection object is made: make it
        # only now, once admitted.
        self._inner = self._inner_factory()
        self._inner.connection_made(self._view)

    def _refuse(self, refusal: Refusal) -> None:
        self._guard.refused(self.addr, refusal)
        transport = self._transport
        if transport is None:
            return
        with contextlib.suppress(Exception):
            transport.write(self._refusal_bytes(refusal))
        transport.close()

    def _grace_exceeded(self) -> None:
        self._deadline = None
        if self.authenticated or self._closed:
            return
        self._timed_out = True
        log.debug("closed %s: no login within %.0f s", self.addr, self._cfg.handshake_timeout_s)
        self._guard.refused(self.addr, Refusal("handshake-timeout", "login took too long"))
        if self._transport is not None:
            self._transport.abort()

    def _penalize_unauthenticated(self) -> None:
        now = time.monotonic()
        if self._timed_out:
            kind = PenaltyKind.GRACE_EXCEEDED
        elif self.invalid_user:
            kind = PenaltyKind.INVALIDUSER
        elif self.no_penalty:
            return
        elif self.auth_attempted:
            kind = PenaltyKind.AUTHFAIL
        else:
            kind = PenaltyKind.NOAUTH
        self._guard.penalize(self.addr, kind, now)

    def _take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes from the front of the backlog."""
        head = self._backlog[0]
        off = self._head_off
        if off == 0 and len(head) <= limit:
            self._backlog.popleft()
            chunk = head
        else:
            end = min(len(head), off + limit)
            chunk = head[off:end]
            if end == len(head):
                self._backlog.popleft()
                self._head_off = 0
            else:
                self._head_off = end
        self._backlog_bytes -= len(chunk)
        return chunk

    def _feed(self, one_piece: bool = False) -> None:
        """Hand asyncssh received bytes for at most FEED_BUDGET_S (or ``one_piece``, in a
        pre-auth turn), then let others run.

        The budget is checked between pieces, so each piece is sized by what this
        connection's bytes have cost so far (an average of seconds per byte): a piece of
        tiny packets is a few hundred bytes, a piece of bulk data up to 256 KiB.
        """
        self._feeding = False
        inner = self._inner
        if self._closed or inner is None:
            return
        clock = time.perf_counter
        start = clock()
        resume, self._resume = self._resume, None
        if resume is not None:
            resume()  # first: it parses what came before anything still in the backlog
        view = self._view
        while self._backlog and not self._closed and not (one_piece and resume is not None):
            if view is not None and view.inner_paused:
                # What is behind the gate asked for no more: the rest waits here (bounded:
                # the socket is not read meanwhile) until it asks again (inner_resumed).
                self.update_reading()
                return
            piece = self._take(self._slice)
            t0 = clock()
            inner.data_received(piece)
            now = clock()
            self._learn_cost(now - t0, len(piece))
            if one_piece or now - start >= FEED_BUDGET_S:
                break
        if self._closed or self._feeding:  # (fed again already: a resume queued it)
            return
        if self._backlog and self._turns is not None and not self.authenticated:
            self._feeding = True
            self._turns.want(self)
        elif self._backlog:
            self._feeding = True
            # call_later(0), not call_soon: asyncio puts expired timers in the ready queue
            # after the I/O callbacks of the same pass, so whatever other connections
            # received meanwhile is handled before this connection's next slice (with
            # call_soon a bystander's packet waited behind two slices of a flood).
            asyncio.get_running_loop().call_later(0, self._feed)
        elif self._eof_pending:
            self._eof_pending = False
            if not inner.eof_received() and self._transport is not None:
                self._transport.close()
        self.update_reading()

    def _learn_cost(self, elapsed_s: float, nbytes: int) -> None:
        """Update the cost per byte and the next piece's size from one piece's parse time."""
        if nbytes <= 0:
            return
        cost = elapsed_s / nbytes
        # Quick to rise (a flood shows at once), slower to fall (one cheap piece that only
        # buffered half a packet says little).
        weight = 0.5 if cost > self._cost_s_per_byte else 0.1
        self._cost_s_per_byte += weight * (cost - self._cost_s_per_byte)
        target = int(FEED_PIECE_S / max(self._cost_s_per_byte, 1e-12))
        self._slice = max(FEED_MIN_SLICE_BYTES, min(FEED_MAX_SLICE_BYTES, target))


class GatedListener:
    """The listening socket and its accept loop; asyncssh sees it as a tunnel's server.

    ``asyncssh.listen(tunnel=listener, ...)`` calls :meth:`create_server` with its
    connection factory; each admitted connection then gets one asyncssh server connection.
    """

    def __init__(
        self,
        host: str,
        port: int,
        guard: Guard,
        cfg: GateConfig,
        reuse_port: bool = False,
        turns: PreauthTurns | None = None,
    ) -> None:
        self._host = host
        #: Shared by every listener of one relay: one turn per pass for all logins.
        self.turns = turns or PreauthTurns()
        self._port = port
        self._guard = guard
        self.cfg = cfg
        self._reuse_port = reuse_port
        self.sockets: list[socket.socket] = []
        self._factory: Callable[[str, int], Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff_s = ACCEPT_BACKOFF_MIN_S
        self._paused: set[int] = set()
        self._closed = asyncio.Event()
        self._serving = False
        self._bound_port = port
        #: TLS for every new connection (None: plain TCP); replaced on reload, so renewed
        #: certificates apply to new connections without a restart.
        self.tls: ssl.SSLContext | None = None

    async def create_server(
        self, session_factory: Callable[[str, int], Any], _host: str, _port: int
    ) -> GatedListener:
        """Bind and start accepting (called by asyncssh's ``listen``)."""
        self._loop = asyncio.get_running_loop()
        self._factory = session_factory
        infos = await self._loop.getaddrinfo(
            self._host or None,
            self._port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        seen: set[tuple[Any, ...]] = set()
        try:
            for family, type_, proto, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                sock = socket.socket(family, type_, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self._reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if self._port == 0 and len(self.sockets) > 1:
                    # One port for every address family, as asyncio does for port 0.
                    addr = (addr[0], self.sockets[0].getsockname()[1], *addr[2:])
                sock.bind(addr)
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
        except OSError:
            for sock in self.sockets:
                sock.close()
            self.sockets = []
            raise
        self._bound_port = int(self.sockets[0].getsockname()[1]) if self.sockets else 0
        self._serving = True
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._on_readable, sock)
        return self

    def refusal_bytes(self, refusal: Refusal) -> bytes:
        """What a refused connection is told (the SSH listener's way; see subclasses)."""
        return ssh_refusal(refusal)

    def get_port(self) -> int:
        """The bound port (still known after the sockets closed)."""
        return self._bound_port

    def is_serving(self) -> bool:
        """Whether new connections are accepted."""
        return self._serving

    def stop_accepting(self) -> None:
        """Stop taking connections (draining); established ones go on."""
        if not self._serving:
            return
        self._serving = False
        assert self._loop is not None
        for sock in self.sockets:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
            sock.close()

    def close(self) -> None:
        """Stop accepting (asyncssh's acceptor close)."""
        self.stop_accepting()
        self._closed.set()

    async def wait_closed(self) -> None:
        """Wait for :meth:`close`."""
        await self._closed.wait()

    def _on_readable(self, sock: socket.socket) -> None:
        # A burst of connections takes turns with everyone else too: at most ACCEPT_BATCH
        # and ACCEPT_BUDGET_S per readiness event (the listening socket stays readable, so
        # the rest come on the next pass).
        deadline = time.perf_counter() + ACCEPT_BUDGET_S
        for _ in range(ACCEPT_BATCH):
            if time.perf_counter() >= deadline:
                return
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._out_of_resources(sock, exc)
                    return
                # ECONNABORTED and the like: that one connection failed; go on.
                continue
            self._backoff_s = ACCEPT_BACKOFF_MIN_S
            self._start(conn, peer)

    def _out_of_resources(self, sock: socket.socket, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._guard.accept_error(name)
        log.warning(
            "accept: %s (%s); pausing new connections for %.2f s, existing ones go on",
            exc.strerror,
            name,
            self._backoff_s,
        )
        assert self._loop is not None
        fd = sock.fileno()
        self._loop.remove_reader(fd)
        self._paused.add(fd)
        self._loop.call_later(self._backoff_s, self._resume, sock)
        self._backoff_s = min(ACCEPT_BACKOFF_MAX_S, self._backoff_s * 2)

    def _resume(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        self._paused.discard(fd)
        if self._serving and fd >= 0 and self._loop is not None:
            self._loop.add_reader(fd, self._on_readable, sock)

    def _start(self, conn: socket.socket, peer: Any) -> None:
        assert self._factory is not None and self._loop is not None
        conn.setblocking(False)
        host = str(peer[0]) if isinstance(peer, tuple) else ""
        port = int(peer[1]) if isinstance(peer, tuple) else 0
        if host.startswith("::ffff:"):
            host = host[len("::ffff:") :]
        factory = self._factory
        admitted = False
        if not self.cfg.trusts_proxy(host) and not self.cfg.trusts_forwarded(host):
            # Judge the source before any transport or SSH state exists: a refused flood
            # costs an accept and a close.
            refusal = self._guard.admit(host, time.monotonic())
            if refusal is not None:
                self._guard.refused(host, refusal)
                if self.tls is None:  # in clear text only: nothing is said before TLS
                    with contextlib.suppress(OSError):
                        conn.send(self.refusal_bytes(refusal))
                conn.close()
                return
            admitted = True
        gate = Gate(
            self._guard, self.cfg, lambda: factory(host, port), host, port, admitted,
            self.refusal_bytes, self.turns,
        )  # fmt: skip
        self._loop.create_task(self._connect(conn, gate))

    async def _connect(self, conn: socket.socket, gate: Gate) -> None:
        assert self._loop is not None
        try:
            if self.tls is None:
                await self._loop.connect_accepted_socket(lambda: gate, conn)
            else:
                # The gate's deadline covers the TLS handshake too.
                await self._loop.connect_accepted_socket(
                    lambda: gate,
                    conn,
                    ssl=self.tls,
                    ssl_handshake_timeout=self.cfg.handshake_timeout_s,
                )
        except (OSError, ssl.SSLError, TimeoutError):
            conn.close()
            gate.abandon()
