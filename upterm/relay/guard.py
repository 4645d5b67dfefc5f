"""What one uptermd node allows each peer, and the bookkeeping that enforces it.

:class:`RelayLimits` holds every bound (each is an ``uptermd`` flag with the default here);
:class:`RelayGuard` applies the pre-authentication ones for the :mod:`gate` (caps with
random early drop, per-source caps, penalties) and keeps the counts of what is open now for
the quotas the server checks after authentication. Every count is O(1) per event and follows
what is open now, never what was ever opened.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from upterm.relay.metrics import RelayMetrics
from upterm.relay.policy import (
    Admission,
    OpenCounts,
    Penalties,
    PenaltyConfig,
    PenaltyKind,
    Refusal,
    StartupLimits,
    source_key,
)

log = logging.getLogger(__name__)

#: At most one info line per this many seconds sums up refusals before SSH.
REFUSAL_SUMMARY_S = 10.0
#: Parsed addresses remembered: a flood comes from few addresses, parsing each is not free.
_cached_source_key = functools.lru_cache(maxsize=4096)(source_key)


@dataclass(frozen=True)
class RelayLimits:
    """Every bound a relay keeps on its peers (defaults sized for a public relay)."""

    #: Unauthenticated connections: OpenSSH MaxStartups start:rate:full.
    startups: StartupLimits = field(default_factory=StartupLimits)
    #: Unauthenticated connections from one source (network block) at once: a class
    #: behind one NAT joining in the same second fits; one address cannot fill the relay.
    per_source_startups: int = 32
    #: OpenSSH PerSourcePenalties.
    penalties: PenaltyConfig = field(default_factory=PenaltyConfig)
    #: Key exchange and authentication must be done within this.
    handshake_timeout_s: float = 30.0
    #: Sessions registered now: per host key, per source address, in all, per connection.
    sessions_per_key: int = 10
    sessions_per_source: int = 20
    sessions_total: int = 10000
    sessions_per_connection: int = 8
    #: Joiner connections in one session at once.
    joiners_per_session: int = 32
    #: Channels one joiner connection has open at once.
    channels_per_joiner: int = 16
    #: Bytes a joiner may send on a channel before its host answers; then reading pauses.
    pending_bytes: int = 64 * 1024
    #: Global requests waiting for an answer on one connection; more and it is dropped.
    global_requests_pending: int = 16
    #: Bytes per second one host connection may send joiners (0: no cap), and its burst.
    host_rate_bytes_s: float = 0.0
    host_burst_bytes: float = 4 * 1024 * 1024
    #: Liveness probes: a host silent for interval x (count + 1) is dropped (28 s here).
    #: Each probe costs the relay a round trip: at 10,000 idle hosts, one per 14 s is
    #: about 700 a second (measured in bench/run.py), so probe no more than needed.
    host_keepalive_s: float = 14.0
    host_keepalive_count: int = 1
    joiner_keepalive_s: float = 30.0
    joiner_keepalive_count: int = 3
    #: An authenticated connection with nothing open (no channel for a joiner, no session
    #: for a host) is closed after this (OpenSSH's UnusedConnectionTimeout): idle
    #: connections cannot fill a session's joiner slots or a source's quota for free.
    unused_timeout_s: float = 60.0
    #: Receive window of joiners' channels: what a joiner can make us buffer per channel.
    joiner_window_bytes: int = 512 * 1024


class RelayGuard:
    """Pre-auth admission and penalties (for the gate) and the relay's open counts."""

    def __init__(self, limits: RelayLimits, metrics: RelayMetrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.admission = Admission(limits.startups, limits.per_source_startups)
        self.penalties = Penalties(limits.penalties)
        self.sessions_by_key = OpenCounts(limits.sessions_per_key)
        self.sessions_by_source = OpenCounts(limits.sessions_per_source)
        self.joiners_by_session = OpenCounts(limits.joiners_per_session)
        #: Penalty bookkeeping may be switched off (``--penalties no``).
        self._penalties_on = limits.penalties.enabled
        self._refused: dict[str, int] = {}
        self._preauth_gauge = metrics.connections.labels(state="preauth")
        self._refusal_counters: dict[str, Any] = {}
        self._refused_from: set[str] = set()
        self._summary_at = -REFUSAL_SUMMARY_S

    def key(self, addr: str) -> str:
        """The source an address counts under (its network block)."""
        cfg = self.limits.penalties
        return _cached_source_key(addr, cfg.ipv4_prefix, cfg.ipv6_prefix)

    # -- gate.Guard --

    def admit(self, addr: str, now: float) -> Refusal | None:
        if self._penalties_on:
            wait = self.penalties.refused_for(addr, now)
            if wait > 0:
                return Refusal(
                    "penalty",
                    f"your address is refused for {wait:.0f} s after failed or unfinished "
                    "logins; try again later",
                )
        refusal = self.admission.try_admit(self.key(addr))
        if refusal is None:
            self._preauth_gauge.set(self.admission.preauth)
        return refusal

    def left_preauth(self, addr: str) -> None:
        self.admission.release(self.key(addr))
        self._preauth_gauge.set(self.admission.preauth)

    def penalize(self, addr: str, kind: PenaltyKind, now: float) -> None:
        if not self._penalties_on:
            return
        self.penalties.add(addr, kind, now)
        self.metrics.penalties_added.labels(kind=kind.value).inc()
        self.metrics.penalties_active.set(self.penalties.active(now))

    def refused(self, addr: str, refusal: Refusal) -> None:
        counter = self._refusal_counters.get(refusal.reason)
        if counter is None:
            counter = self._refusal_counters[refusal.reason] = self.metrics.refusals.labels(
                reason=refusal.reason
            )
        counter.inc()
        # Refusals before SSH come in floods: each is logged at debug level, and at most
        # one summary line per REFUSAL_SUMMARY_S at info, so the log cannot become the
        # bottleneck (or the disk filler) of an attack.
        log.debug("refused %s: %s (%s)", addr, refusal.message, refusal.reason)
        self._refused[refusal.reason] = self._refused.get(refusal.reason, 0) + 1
        if len(self._refused_from) < 5:
            self._refused_from.add(addr)
        now = time.monotonic()
        if now - self._summary_at >= REFUSAL_SUMMARY_S:
            self._log_summary(now)

    def _log_summary(self, now: float) -> None:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self._refused.items()))
        sample = ", ".join(sorted(self._refused_from))
        log.info("refused before login since the last such line: %s (from %s)", counts, sample)
        self._refused.clear()
        self._refused_from.clear()
        self._summary_at = now

    def accept_error(self, name: str) -> None:
        self.metrics.accept_errors.labels(errno=name).inc()

    def connection_opened(self) -> None:
        self.metrics.connection_opened()

    def connection_closed(self, duration_s: float) -> None:
        self.metrics.connection_closed(duration_s)
