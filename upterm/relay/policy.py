"""The relay's admission and limits core (sans-I/O): who may start a connection, and how much.

A public relay is reached by people who need no key, so everything a peer can make us hold
must be bounded, and the bookkeeping for it must cost O(1) per event whatever the peer did
before. Every counter here counts what is *open now*, never what was ever opened: keys are
deleted when they reach zero so memory follows live state, not history. Nothing here does
I/O or reads a clock; time is passed in as ``now`` (monotonic seconds).

The pieces, and what each bounds:

- :class:`Admission` bounds unauthenticated connections, the cheapest thing to open and the
  most expensive to hold (a handshake's crypto state). It applies OpenSSH's ``MaxStartups``
  random early drop across all sources, so a flood degrades admission gradually instead of
  cutting it at a cliff, plus a per-source cap so one address cannot take all the slots.
- :class:`Penalties` remembers sources (by netblock) that misbehaved - failed or skipped
  authentication, overran the login deadline, were refused, or presented a bad session
  token - and refuses them for a while (OpenSSH ``PerSourcePenalties``). Its table is itself
  bounded (``max_sources``) and purged lazily from an expiry heap.
- :class:`OpenCounts` bounds anything countable by key once a connection is in: sessions per
  host key, per source, joiners per session, channels per joiner.
- :class:`TokenBucket` bounds one connection's byte rate, so a burst cannot hold the event
  loop or a shared uplink.

Each refusal carries a :class:`Refusal`: a short machine-readable reason for metrics and a
one-line message a person can read.
"""

from __future__ import annotations

import enum
import functools
import heapq
import ipaddress
import math
import random
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from upterm.errors import ConfigError

__all__ = [
    "Admission",
    "OpenCounts",
    "Penalties",
    "PenaltyConfig",
    "PenaltyKind",
    "Refusal",
    "StartupLimits",
    "TokenBucket",
    "penalty_refusal",
    "source_key",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Longest run of digits we parse as an integer. Python refuses to convert very long digit
#: strings (and nothing sensible needs more), so longer ones are a configuration error.
_MAX_INT_DIGITS: Final = 18

_INT_RE: Final = re.compile(r"[0-9]+")
#: One piece of an OpenSSH-style time: a number and an optional unit ("1m30s" is two pieces).
_DURATION_PIECE_RE: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smh]?)")
_UNIT_S: Final[Mapping[str, float]] = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


class PenaltyKind(enum.Enum):
    """An offence that earns its source a penalty; values are OpenSSH's names (logs, metrics)."""

    #: Authentication was attempted and failed; the connection closed unauthenticated.
    AUTHFAIL = "authfail"
    #: The connection closed without ever attempting authentication.
    NOAUTH = "noauth"
    #: The handshake/login deadline passed.
    GRACE_EXCEEDED = "grace-exceeded"
    #: The connection was refused by policy (over a per-source cap).
    REFUSED = "refusedconnection"
    #: A joiner presented a malformed or unknown session token.
    INVALIDUSER = "invaliduser"


# ---------------------------------------------------------------------------------------------
# Parsing helpers


def _parse_int(text: str, what: str) -> int:
    """A non-negative decimal integer, or :class:`ConfigError` naming ``what``."""
    # A strict regex rather than int(): int() also takes "+5", " 5", "1_000" and non-ASCII
    # digits, none of which belong in a config value.
    if not _INT_RE.fullmatch(text) or len(text) > _MAX_INT_DIGITS:
        raise ConfigError(f"{what}: expected a non-negative whole number, got {text!r}")
    return int(text)


def _parse_duration_s(text: str, what: str) -> float:
    """Seconds from ``"5"``, ``"5s"``, ``"10m"``, ``"1h"`` or a sum like ``"1m30s"``."""
    total_s = 0.0
    pos = 0
    for m in _DURATION_PIECE_RE.finditer(text):
        if m.start() != pos or len(m.group(1)) > _MAX_INT_DIGITS:
            break
        total_s += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not text or pos != len(text) or not math.isfinite(total_s):
        raise ConfigError(
            f"{what}: expected a duration like 5s, 10m or 1h (or bare seconds), got {text!r}"
        )
    return total_s


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class StartupLimits:
    """Caps on unauthenticated connections, with OpenSSH ``MaxStartups`` semantics.

    Below ``start`` open pre-auth connections every new one is admitted; at ``full`` or more
    every new one is refused; in between a new one is refused with a probability rising
    linearly from ``rate_pct`` percent at ``start`` to 100 percent at ``full``.
    """

    start: int = 100
    rate_pct: int = 30
    full: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.start <= self.full:
            raise ConfigError(
                f"max startups {self.start}:{self.rate_pct}:{self.full}: "
                "need 0 < start <= full (e.g. 100:30:1000)"
            )
        if not 0 <= self.rate_pct <= 100:
            raise ConfigError(
                f"max startups {self.start}:{self.rate_pct}:{self.full}: "
                "rate must be a percentage from 0 to 100 (e.g. 100:30:1000)"
            )

    @classmethod
    def parse(cls, text: str) -> StartupLimits:
        """Parse ``"start:rate:full"`` or ``"N"`` (meaning ``N:100:N``, a hard cap)."""
        parts = text.strip().split(":")
        what = f"max startups {text!r}"
        if len(parts) == 1:
            n = _parse_int(parts[0], what)
            return cls(start=n, rate_pct=100, full=n)
        if len(parts) == 3:
            start, rate, full = (_parse_int(p, what) for p in parts)
            return cls(start=start, rate_pct=rate, full=full)
        raise ConfigError(f"{what}: expected start:rate:full (e.g. 100:30:1000) or one number")


def _default_durations() -> dict[PenaltyKind, float]:
    return {
        PenaltyKind.AUTHFAIL: 5.0,
        PenaltyKind.NOAUTH: 1.0,
        PenaltyKind.GRACE_EXCEEDED: 10.0,
        PenaltyKind.REFUSED: 10.0,
        PenaltyKind.INVALIDUSER: 5.0,
    }


@dataclass(frozen=True)
class PenaltyConfig:
    """Per-source penalties, with OpenSSH 9.8+ ``PerSourcePenalties`` defaults.

    ``durations_s`` is how much each offence adds to its source's penalty; kinds it leaves
    out keep their defaults. A source is refused once its outstanding penalty reaches
    ``min_s``, and a penalty never reaches further than ``max_s`` ahead. Sources are grouped
    by netblock (``ipv4_prefix``/``ipv6_prefix``) because one host usually owns many
    addresses, most of all in IPv6. At most ``max_sources`` netblocks are tracked; beyond
    that new sources are let in untracked (permissive) or all refused (``overflow_deny_all``).
    """

    durations_s: Mapping[PenaltyKind, float] = field(default_factory=_default_durations)
    max_s: float = 600.0
    min_s: float = 15.0
    ipv4_prefix: int = 32
    ipv6_prefix: int = 128
    max_sources: int = 65536
    overflow_deny_all: bool = False
    exempt: tuple[IPNetwork, ...] = ()
    enabled: bool = True

    def __post_init__(self) -> None:
        merged = _default_durations()
        for kind, seconds in self.durations_s.items():
            if not isinstance(kind, PenaltyKind):
                raise ConfigError(f"penalty {kind!r}: not a penalty kind")
            merged[kind] = float(seconds)
        # A read-only view, so the frozen config cannot be changed through its mapping.
        object.__setattr__(self, "durations_s", MappingProxyType(merged))
        for kind, seconds in merged.items():
            _check_seconds(seconds, f"penalty {kind.value}")
        _check_seconds(self.max_s, "penalty max")
        _check_seconds(self.min_s, "penalty min")
        if self.min_s > self.max_s:
            raise ConfigError(
                f"penalty min ({self.min_s:g}s) is above max ({self.max_s:g}s), so no source "
                "could ever be refused; lower min or raise max"
            )
        if not 0 <= self.ipv4_prefix <= 32:
            raise ConfigError(f"penalty netblock: IPv4 prefix {self.ipv4_prefix} not in 0..32")
        if not 0 <= self.ipv6_prefix <= 128:
            raise ConfigError(f"penalty netblock: IPv6 prefix {self.ipv6_prefix} not in 0..128")
        if self.max_sources < 1:
            raise ConfigError(f"penalty max-sources {self.max_sources}: must be at least 1")

    @classmethod
    def parse(
        cls, text: str, exempt: Iterable[str] = (), netblock: str = "32:128"
    ) -> PenaltyConfig:
        """Parse OpenSSH's ``PerSourcePenalties`` syntax, exemptions and netblock sizes.

        ``text`` is ``"yes"`` or ``""`` (defaults), ``"no"`` (disabled) or space-separated
        ``kind:duration`` items (``authfail``, ``noauth``, ``grace-exceeded``,
        ``refusedconnection``, ``invaliduser``, ``max``, ``min``), ``max-sources4:N``,
        ``max-sources6:N`` and ``overflow:deny-all|permissive``. ``exempt`` holds CIDR
        strings; ``netblock`` is ``"v4:v6"`` prefix lengths or one v4 prefix.
        """
        ipv4_prefix, ipv6_prefix = _parse_netblock(netblock)
        exempt_nets = tuple(_parse_cidr(c) for c in exempt)
        words = text.split()
        enabled = not (len(words) == 1 and words[0].lower() == "no")
        if not enabled or (len(words) == 1 and words[0].lower() == "yes"):
            words = []

        kinds = {k.value: k for k in PenaltyKind}
        durations: dict[PenaltyKind, float] = {}
        max_s = cls.max_s
        min_s = cls.min_s
        sources: list[int] = []
        deny_all = False
        for word in words:
            name, sep, value = word.partition(":")
            name = name.lower()
            if not sep or not value:
                raise ConfigError(f"penalty item {word!r}: expected name:value (e.g. authfail:5s)")
            what = f"penalty item {word!r}"
            if name in kinds:
                durations[kinds[name]] = _parse_duration_s(value, what)
            elif name == "crash":
                # OpenSSH penalises sshd child crashes; the relay has no such children, so an
                # sshd_config line copied as is still parses, and the item does nothing.
                _parse_duration_s(value, what)
            elif name == "max":
                max_s = _parse_duration_s(value, what)
            elif name == "min":
                min_s = _parse_duration_s(value, what)
            elif name in ("max-sources4", "max-sources6"):
                # We keep one table for both families, so its cap is the larger of the two.
                sources.append(_parse_int(value, what))
            elif name in ("overflow", "overflow6"):
                if value not in ("deny-all", "permissive"):
                    raise ConfigError(f"{what}: overflow must be deny-all or permissive")
                # One table, one mode: failing closed if either family asked to.
                deny_all = deny_all or value == "deny-all"
            else:
                raise ConfigError(
                    f"{what}: unknown item; expected one of "
                    f"{', '.join(kinds)}, max, min, max-sources4, max-sources6, overflow"
                )
        return cls(
            durations_s=durations,
            max_s=max_s,
            min_s=min_s,
            max_sources=max(sources) if sources else cls.max_sources,
            overflow_deny_all=deny_all,
            ipv4_prefix=ipv4_prefix,
            ipv6_prefix=ipv6_prefix,
            exempt=exempt_nets,
            enabled=enabled,
        )


def _check_seconds(seconds: float, what: str) -> None:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"{what}: {seconds!r} is not a finite, non-negative number of seconds")


def _parse_netblock(text: str) -> tuple[int, int]:
    what = f"penalty netblock {text!r}"
    parts = text.strip().split(":")
    if len(parts) == 1:
        return _parse_int(parts[0], what), 128
    if len(parts) == 2:
        return _parse_int(parts[0], what), _parse_int(parts[1], what)
    raise ConfigError(f"{what}: expected IPv4:IPv6 prefix lengths (e.g. 32:128) or one (e.g. 24)")


def _parse_cidr(text: str) -> IPNetwork:
    try:
        # strict=False: "10.1.2.3/8" means 10.0.0.0/8, which is what a person typing it meant.
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(
            f"penalty exemption {text!r}: expected an address or CIDR (e.g. 192.0.2.0/24)"
        ) from None


# ---------------------------------------------------------------------------------------------
# Sources


def _parse_addr(addr: str) -> IPAddress | None:
    """The address, with IPv4-mapped IPv6 unwrapped to IPv4; None if it is not an IP."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def source_key(addr: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The network ``addr`` belongs to, as a string such as ``"203.0.113.0/24"``.

    IPv4-mapped IPv6 addresses count as IPv4, so a dual-stack listener does not give one host
    two identities. An address that is not an IP (``""``, a UNIX socket path) is returned
    unchanged.
    """
    ip = _parse_addr(addr)
    if ip is None:
        return addr
    prefix = ipv4_prefix if isinstance(ip, ipaddress.IPv4Address) else ipv6_prefix
    return str(ipaddress.ip_network((ip, prefix), strict=False))


#: :func:`source_key`, remembered: a flood comes from few addresses, and parsing is not free.
_cached_source_key = functools.lru_cache(maxsize=4096)(source_key)


@dataclass(frozen=True)
class Refusal:
    """Why a connection was refused: a reason for metrics and a line for the person."""

    #: Short machine-readable reason, e.g. ``"startups-full"`` or ``"penalty"``.
    reason: str
    #: One line a person can read; no control characters.
    message: str


_STARTUPS_BUSY: Final = (
    "too many unauthenticated connections to this relay; try again in a few seconds"
)
REFUSAL_STARTUPS_FULL: Final = Refusal("startups-full", _STARTUPS_BUSY)
REFUSAL_STARTUPS_RANDOM_DROP: Final = Refusal("startups-random-drop", _STARTUPS_BUSY)
REFUSAL_PER_SOURCE: Final = Refusal(
    "per-source-startups",
    "too many unauthenticated connections from your address; finish or close one and retry",
)


def penalty_refusal(wait_s: float) -> Refusal:
    """The refusal for a source under penalty for another ``wait_s`` seconds."""
    return Refusal(
        "penalty",
        "too many failed or abandoned connections from your address; "
        f"try again in {math.ceil(max(wait_s, 0.0))} seconds",
    )


# ---------------------------------------------------------------------------------------------
# Penalties


class _Entry:
    """One penalised netblock."""

    __slots__ = ("active", "expiry")

    def __init__(self, expiry: float) -> None:
        self.expiry = expiry
        #: Set once the outstanding penalty reached min_s; the source is then refused until
        #: expiry even as the outstanding time falls below min_s again.
        self.active = False


class Penalties:
    """Per-netblock penalty table (OpenSSH ``PerSourcePenalties``), purged lazily.

    Each offence adds its duration to the netblock's expiry, counted from the later of now and
    the current expiry and capped at ``now + max_s``. The netblock is refused once the
    outstanding penalty reaches ``min_s`` (so a single slip costs nothing) and then until
    expiry. Expired entries leave through a min-heap holding exactly one entry per tracked
    netblock, so each call does amortised O(log n) work and never scans the table.
    """

    def __init__(self, cfg: PenaltyConfig) -> None:
        self._cfg = cfg
        self._entries: dict[str, _Entry] = {}
        # (time, key): time is at most the key's real expiry. A later extension does not push
        # a second entry; when the stale one surfaces it is pushed again at the real expiry.
        # So the heap has one entry per key, and each push is paid for by an add().
        self._heap: list[tuple[float, str]] = []
        self._n_active = 0
        self._exempt4 = [n for n in cfg.exempt if isinstance(n, ipaddress.IPv4Network)]
        self._exempt6 = [n for n in cfg.exempt if isinstance(n, ipaddress.IPv6Network)]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def config(self) -> PenaltyConfig:
        """The configuration this table enforces."""
        return self._cfg

    def _is_exempt(self, addr: str) -> bool:
        ip = _parse_addr(addr)
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv4Address):
            return any(ip in net for net in self._exempt4)
        return any(ip in net for net in self._exempt6)

    def _key(self, addr: str) -> str:
        return _cached_source_key(addr, self._cfg.ipv4_prefix, self._cfg.ipv6_prefix)

    def _purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = self._entries[key]
            if entry.expiry > now:
                heapq.heappush(heap, (entry.expiry, key))
                continue
            del self._entries[key]
            if entry.active:
                self._n_active -= 1

    def add(self, addr: str, kind: PenaltyKind, now: float) -> None:
        """Record that ``addr`` committed offence ``kind`` at ``now``."""
        cfg = self._cfg
        if not cfg.enabled or self._is_exempt(addr):
            return
        self._purge(now)
        key = self._key(addr)
        entry = self._entries.get(key)
        base = now if entry is None else max(now, entry.expiry)
        expiry = min(base + cfg.durations_s[kind], now + cfg.max_s)
        if expiry <= now:
            return  # a zero penalty (or max 0): nothing to remember
        if entry is None:
            if len(self._entries) >= cfg.max_sources:
                # Table full: in permissive mode the source goes untracked; in deny-all mode
                # refused_for() already refuses it, so there is nothing to record either.
                return
            entry = _Entry(expiry)
            self._entries[key] = entry
            heapq.heappush(self._heap, (expiry, key))
        else:
            # Never shorten: with max_s lowered relative to an old expiry (or a clock that
            # stepped back) the cap must not forgive a penalty already earned.
            entry.expiry = max(entry.expiry, expiry)
        if not entry.active and entry.expiry - now >= cfg.min_s:
            entry.active = True
            self._n_active += 1

    def refused_for(self, addr: str, now: float) -> float:
        """Seconds ``addr`` is still refused, or ``0.0`` if it may connect now."""
        cfg = self._cfg
        if not cfg.enabled or self._is_exempt(addr):
            return 0.0
        self._purge(now)
        entry = self._entries.get(self._key(addr))
        if entry is not None:
            return min(entry.expiry - now, cfg.max_s) if entry.active else 0.0
        if cfg.overflow_deny_all and len(self._entries) >= cfg.max_sources and self._heap:
            # Refused until room frees up, which is when the earliest entry expires. After the
            # purge the heap's head is in the future, so this is positive.
            return min(self._heap[0][0] - now, cfg.max_s)
        return 0.0

    def active(self, now: float) -> int:
        """How many netblocks are refused at ``now`` (for a gauge)."""
        self._purge(now)
        return self._n_active


# ---------------------------------------------------------------------------------------------
# Counting what is open


class Admission:
    """Unauthenticated connections open now: ``MaxStartups`` random early drop and a per-source cap.

    ``try_admit`` counts a connection in; ``release`` counts it out when it authenticates or
    closes. ``rng`` is for tests; by default drops are drawn from the OS's random source so an
    attacker cannot predict which of their connections get through.
    """

    def __init__(
        self, limits: StartupLimits, per_source: int, rng: random.Random | None = None
    ) -> None:
        if per_source < 0:
            raise ValueError(f"per_source must be >= 0, got {per_source}")
        self._limits = limits
        self._per_source_cap = per_source
        self._rng = rng if rng is not None else random.SystemRandom()
        self._preauth = 0
        self._by_source: dict[str, int] = {}

    @property
    def preauth(self) -> int:
        """Unauthenticated connections open now."""
        return self._preauth

    @property
    def limits(self) -> StartupLimits:
        """The ``MaxStartups`` limits applied."""
        return self._limits

    def per_source(self, key: str) -> int:
        """Unauthenticated connections open now from ``key``."""
        return self._by_source.get(key, 0)

    def drop_probability(self) -> float:
        """Probability (0..1) that a new connection is refused at the current count."""
        lim = self._limits
        n = self._preauth
        if n < lim.start:
            return 0.0
        if n >= lim.full:
            return 1.0
        # start < full here (start <= n < full), so the division is safe.
        pct = lim.rate_pct + (100 - lim.rate_pct) * (n - lim.start) / (lim.full - lim.start)
        return pct / 100.0

    def try_admit(self, key: str) -> Refusal | None:
        """Admit and count a new connection from ``key``, or say why not (nothing counted)."""
        cap = self._per_source_cap
        count = self._by_source.get(key, 0)
        # Per source first: a source over its own cap must not consume a random-drop draw
        # that would otherwise tell it how busy the relay is.
        if cap and count >= cap:
            return REFUSAL_PER_SOURCE
        lim = self._limits
        if self._preauth >= lim.full:
            return REFUSAL_STARTUPS_FULL
        if self._preauth >= lim.start and self._rng.random() < self.drop_probability():
            return REFUSAL_STARTUPS_RANDOM_DROP
        self._preauth += 1
        self._by_source[key] = count + 1
        return None

    def release(self, key: str) -> None:
        """Count out a connection from ``key`` (it authenticated or closed)."""
        count = self._by_source.get(key, 0)
        if count <= 0:
            # Not ours (or released twice): ignoring keeps every count >= 0 and equal to the
            # sum over sources, which a double release must not break.
            return
        if count == 1:
            del self._by_source[key]
        else:
            self._by_source[key] = count - 1
        self._preauth -= 1


class OpenCounts:
    """Counters of what is open now, one per key, each capped at ``limit`` (0: unlimited).

    Keys at zero are deleted, so memory follows what is open rather than what ever was.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._limit = limit
        self._counts: dict[Hashable, int] = {}

    @property
    def limit(self) -> int:
        """The cap per key; 0 means unlimited."""
        return self._limit

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, key: Hashable) -> int:
        """How many are open now under ``key``."""
        return self._counts.get(key, 0)

    def take(self, key: Hashable) -> bool:
        """Count one more under ``key``; ``False`` (nothing counted) if it is at the limit."""
        n = self._counts.get(key, 0)
        if self._limit and n >= self._limit:
            return False
        self._counts[key] = n + 1
        return True

    def give(self, key: Hashable) -> None:
        """Count one fewer under ``key``; a key not open is left alone (never negative)."""
        n = self._counts.get(key, 0)
        if n <= 1:
            self._counts.pop(key, None)
        else:
            self._counts[key] = n - 1


class TokenBucket:
    """A byte-rate cap: ``rate_per_s`` sustained, up to ``burst`` at once.

    The bucket starts full. ``take`` charges after the fact (a read already happened), so the
    balance may go negative; the answer is how long to pause before the next read so the
    average stays at ``rate_per_s``.
    """

    def __init__(self, rate_per_s: float, burst: float) -> None:
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise ValueError(f"rate_per_s must be a positive finite number, got {rate_per_s!r}")
        if not (math.isfinite(burst) and burst >= 0):
            raise ValueError(f"burst must be a non-negative finite number, got {burst!r}")
        self._rate_per_s = rate_per_s
        self._burst = burst
        self._tokens = burst
        self._last: float | None = None

    def take(self, amount: float, now: float) -> float:
        """Charge ``amount``; return seconds to wait before taking more (0.0 within budget)."""
        if self._last is not None:
            # max(0, ...): a clock that steps back must not drain the bucket.
            elapsed_s = max(0.0, now - self._last)
            self._tokens = min(self._burst, self._tokens + elapsed_s * self._rate_per_s)
        self._last = now if self._last is None else max(self._last, now)
        self._tokens -= amount
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self._rate_per_s
