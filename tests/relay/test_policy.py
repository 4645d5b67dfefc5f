"""upterm/relay/policy.py: admission, penalties, open counts and byte rates, with time passed in."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upterm.errors import ConfigError
from upterm.relay.policy import (
    Admission,
    OpenCounts,
    Penalties,
    PenaltyConfig,
    PenaltyKind,
    Refusal,
    StartupLimits,
    TokenBucket,
    penalty_refusal,
    source_key,
)

AUTHFAIL = PenaltyKind.AUTHFAIL


def cfg(**kw: object) -> PenaltyConfig:
    return PenaltyConfig(**kw)  # type: ignore[arg-type]


def assert_one_clean_line(text: str) -> None:
    assert text
    assert text.isprintable(), repr(text)


# ---------------------------------------------------------------------------------------------
# StartupLimits


def test_startup_limits_defaults() -> None:
    assert StartupLimits() == StartupLimits(100, 30, 1000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10:30:100", StartupLimits(10, 30, 100)),
        (" 10:0:10 ", StartupLimits(10, 0, 10)),
        ("1:100:1", StartupLimits(1, 100, 1)),
        ("50", StartupLimits(50, 100, 50)),
    ],
)
def test_startup_limits_parse_good(text: str, expected: StartupLimits) -> None:
    assert StartupLimits.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "0", "0:30:10", "20:30:10", "10:101:100", "10:30", "10:30:100:5", "a:b:c", "-1",
     "+5", "1_0", "10:-3:100", "1e3", "१०", "9" * 40, "10::100"],
)  # fmt: skip
def test_startup_limits_parse_bad(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        StartupLimits.parse(text)
    assert_one_clean_line(str(info.value))


# ---------------------------------------------------------------------------------------------
# PenaltyConfig


def test_penalty_config_defaults() -> None:
    c = PenaltyConfig()
    assert dict(c.durations_s) == {
        PenaltyKind.AUTHFAIL: 5.0,
        PenaltyKind.NOAUTH: 1.0,
        PenaltyKind.GRACE_EXCEEDED: 10.0,
        PenaltyKind.REFUSED: 10.0,
        PenaltyKind.INVALIDUSER: 5.0,
    }
    assert (c.max_s, c.min_s, c.ipv4_prefix, c.ipv6_prefix) == (600.0, 15.0, 32, 128)
    assert (c.max_sources, c.overflow_deny_all, c.exempt, c.enabled) == (65536, False, (), True)
    assert PenaltyConfig.parse("") == c
    assert PenaltyConfig.parse("yes") == c
    assert PenaltyKind.REFUSED.value == "refusedconnection"
    assert PenaltyKind.GRACE_EXCEEDED.value == "grace-exceeded"


def test_penalty_config_defaults_not_shared_and_read_only() -> None:
    a, b = PenaltyConfig(), PenaltyConfig()
    with pytest.raises(TypeError):
        a.durations_s[AUTHFAIL] = 99.0  # type: ignore[index]
    assert b.durations_s[AUTHFAIL] == 5.0


def test_penalty_config_partial_durations_keep_defaults() -> None:
    c = PenaltyConfig(durations_s={AUTHFAIL: 30.0})
    assert c.durations_s[AUTHFAIL] == 30.0
    assert c.durations_s[PenaltyKind.NOAUTH] == 1.0


def test_penalty_config_parse_full() -> None:
    c = PenaltyConfig.parse(
        "authfail:1m noauth:2 grace-exceeded:1h refusedconnection:1m30s invaliduser:0.5s "
        "max:20m min:10s max-sources4:100 max-sources6:50 overflow:deny-all crash:90s",
        exempt=["192.0.2.0/24", "2001:db8::/32", "10.1.2.3/8"],
        netblock="24:64",
    )
    assert dict(c.durations_s) == {
        PenaltyKind.AUTHFAIL: 60.0,
        PenaltyKind.NOAUTH: 2.0,
        PenaltyKind.GRACE_EXCEEDED: 3600.0,
        PenaltyKind.REFUSED: 90.0,
        PenaltyKind.INVALIDUSER: 0.5,
    }
    assert (c.max_s, c.min_s) == (1200.0, 10.0)
    assert c.max_sources == 100
    assert c.overflow_deny_all
    assert (c.ipv4_prefix, c.ipv6_prefix) == (24, 64)
    assert c.exempt == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
    assert c.enabled


def test_penalty_config_parse_no_and_netblock_v4_only() -> None:
    c = PenaltyConfig.parse("no", netblock="24")
    assert not c.enabled
    assert (c.ipv4_prefix, c.ipv6_prefix) == (24, 128)
    assert PenaltyConfig.parse("overflow:permissive").overflow_deny_all is False
    assert PenaltyConfig.parse("overflow6:deny-all").overflow_deny_all is True


@pytest.mark.parametrize(
    ("text", "exempt", "netblock", "names"),
    [
        ("authfail", (), "32:128", "authfail"),
        ("authfail:", (), "32:128", "authfail"),
        ("authfail:5x", (), "32:128", "5x"),
        ("authfail:-5s", (), "32:128", "-5s"),
        ("authfail:s", (), "32:128", "authfail:s"),
        ("authfail:1.2.3s", (), "32:128", "1.2.3s"),
        ("authfail:inf", (), "32:128", "inf"),
        ("bogus:5s", (), "32:128", "bogus"),
        ("max:10s min:20s", (), "32:128", "min"),
        ("max-sources4:0", (), "32:128", "max-sources"),
        ("max-sources4:lots", (), "32:128", "lots"),
        ("overflow:maybe", (), "32:128", "overflow:maybe"),
        ("", ("not-a-net",), "32:128", "not-a-net"),
        ("", ("10.0.0.0/33",), "32:128", "10.0.0.0/33"),
        ("", (), "33:128", "33"),
        ("", (), "32:129", "129"),
        ("", (), "24:64:1", "24:64:1"),
        ("", (), "", "netblock"),
        ("", (), "x", "'x'"),
    ],
)
def test_penalty_config_parse_bad(
    text: str, exempt: tuple[str, ...], netblock: str, names: str
) -> None:
    with pytest.raises(ConfigError) as info:
        PenaltyConfig.parse(text, exempt=exempt, netblock=netblock)
    message = str(info.value)
    assert_one_clean_line(message)
    assert names in message


def test_penalty_config_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError):
        PenaltyConfig(max_s=-1.0)
    with pytest.raises(ConfigError):
        PenaltyConfig(durations_s={AUTHFAIL: float("nan")})
    with pytest.raises(ConfigError):
        PenaltyConfig(max_sources=0)
    with pytest.raises(ConfigError):
        StartupLimits(0, 30, 10)


_WORDS = st.sampled_from(
    ["authfail", "noauth", "grace-exceeded", "refusedconnection", "invaliduser", "crash",
     "max", "min", "max-sources4", "max-sources6", "overflow", "overflow6", "yes", "no", ""]
)  # fmt: skip
_VALUES = st.one_of(
    st.from_regex(r"[0-9]{0,25}(\.[0-9]{0,3})?[smhdx]?([0-9]{1,3}[smh])?", fullmatch=True),
    st.sampled_from(["deny-all", "permissive", "", "-1", "inf", "nan"]),
    st.text(max_size=8),
)
_ITEMS = st.builds(
    lambda w, sep, v: f"{w}{sep}{v}", _WORDS, st.sampled_from([":", "", "::"]), _VALUES
)


_CIDRISH = st.one_of(st.text(max_size=20), st.from_regex(r"[0-9./:a-f]{1,20}"))
_NETBLOCKISH = st.one_of(
    st.text(max_size=10), st.from_regex(r"[0-9]{1,4}(:[0-9]{1,4})?", fullmatch=True)
)


@settings(max_examples=400, deadline=None)
@given(
    text=st.one_of(st.text(), st.lists(_ITEMS, max_size=6).map(" ".join)),
    exempt=st.lists(_CIDRISH, max_size=3),
    netblock=_NETBLOCKISH,
)
def test_fuzz_penalty_config_parse(text: str, exempt: list[str], netblock: str) -> None:
    try:
        c = PenaltyConfig.parse(text, exempt=exempt, netblock=netblock)
    except ConfigError as e:
        assert_one_clean_line(str(e))
    else:
        assert 0 <= c.min_s <= c.max_s
        assert all(v >= 0 for v in c.durations_s.values())


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.from_regex(r"-?[0-9]{0,25}(:-?[0-9]{0,25}){0,3}", fullmatch=True),
    )
)
def test_fuzz_startup_limits_parse(text: str) -> None:
    try:
        lim = StartupLimits.parse(text)
    except ConfigError as e:
        assert_one_clean_line(str(e))
    else:
        assert 0 < lim.start <= lim.full
        assert 0 <= lim.rate_pct <= 100


# ---------------------------------------------------------------------------------------------
# source_key


@pytest.mark.parametrize(
    ("addr", "v4", "v6", "expected"),
    [
        ("203.0.113.77", 24, 128, "203.0.113.0/24"),
        ("203.0.113.77", 32, 128, "203.0.113.77/32"),
        ("::ffff:203.0.113.77", 24, 64, "203.0.113.0/24"),
        ("2001:db8:1:2:3:4:5:6", 24, 64, "2001:db8:1:2::/64"),
        ("2001:db8::1", 32, 128, "2001:db8::1/128"),
        ("fe80::1%eth0", 32, 64, "fe80::/64"),
        ("", 24, 64, ""),
        ("/run/uptermd.sock", 24, 64, "/run/uptermd.sock"),
        ("not an address", 24, 64, "not an address"),
    ],
)
def test_source_key(addr: str, v4: int, v6: int, expected: str) -> None:
    assert source_key(addr, v4, v6) == expected


# ---------------------------------------------------------------------------------------------
# Penalties


def test_penalty_below_min_is_not_refused_then_accumulates() -> None:
    p = Penalties(PenaltyConfig())  # authfail 5s, min 15s
    p.add("198.51.100.1", AUTHFAIL, now=0.0)
    p.add("198.51.100.1", AUTHFAIL, now=0.0)
    assert p.refused_for("198.51.100.1", now=0.0) == 0.0
    assert p.active(0.0) == 0
    assert len(p) == 1
    p.add("198.51.100.1", AUTHFAIL, now=0.0)
    assert p.refused_for("198.51.100.1", now=0.0) == 15.0
    assert p.active(0.0) == 1
    assert p.refused_for("198.51.100.2", now=0.0) == 0.0


def test_penalty_extends_from_current_expiry_not_now() -> None:
    p = Penalties(cfg(min_s=0.0))
    p.add("198.51.100.1", AUTHFAIL, now=0.0)  # expiry 5
    p.add("198.51.100.1", AUTHFAIL, now=2.0)  # max(2, 5) + 5 = 10
    assert p.refused_for("198.51.100.1", now=2.0) == 8.0


def test_penalty_from_now_once_expired() -> None:
    p = Penalties(cfg(min_s=0.0))
    p.add("198.51.100.1", AUTHFAIL, now=0.0)
    p.add("198.51.100.1", AUTHFAIL, now=100.0)
    assert p.refused_for("198.51.100.1", now=100.0) == 5.0


def test_active_penalty_lasts_until_expiry_below_min() -> None:
    p = Penalties(cfg(min_s=15.0))
    for _ in range(4):
        p.add("198.51.100.1", AUTHFAIL, now=0.0)  # expiry 20
    assert p.refused_for("198.51.100.1", now=10.0) == 10.0  # under min now, still refused
    assert p.refused_for("198.51.100.1", now=19.5) == 0.5
    assert p.refused_for("198.51.100.1", now=20.0) == 0.0
    assert len(p) == 0
    assert p.active(20.0) == 0


def test_penalty_capped_at_max() -> None:
    p = Penalties(cfg(max_s=60.0, min_s=15.0))
    for i in range(100):
        p.add("198.51.100.1", PenaltyKind.GRACE_EXCEEDED, now=i * 0.01)
    assert p.refused_for("198.51.100.1", now=0.99) == pytest.approx(60.0)
    assert p.refused_for("198.51.100.1", now=30.0) == pytest.approx(30.99)
    assert p.refused_for("198.51.100.1", now=61.0) == 0.0


def test_penalty_kinds_have_their_durations() -> None:
    p = Penalties(cfg(min_s=0.0))
    for i, kind in enumerate(PenaltyKind):
        p.add(f"198.51.100.{i}", kind, now=0.0)
    assert [p.refused_for(f"198.51.100.{i}", 0.0) for i in range(5)] == [5, 1, 10, 10, 5]


def test_penalty_expiry_and_active_gauge() -> None:
    p = Penalties(cfg(min_s=1.0))
    p.add("198.51.100.1", PenaltyKind.NOAUTH, now=0.0)  # 1s: reaches min
    p.add("198.51.100.2", PenaltyKind.GRACE_EXCEEDED, now=0.0)  # 10s
    p.add("198.51.100.3", PenaltyKind.NOAUTH, now=0.5)  # until 1.5
    assert p.active(0.5) == 3
    assert p.active(1.0) == 2
    assert p.active(1.5) == 1
    assert len(p) == 1
    assert p.active(10.0) == 0
    assert len(p) == 0


def test_penalty_zero_duration_is_not_tracked() -> None:
    p = Penalties(cfg(durations_s={AUTHFAIL: 0.0}, min_s=0.0))
    p.add("198.51.100.1", AUTHFAIL, now=0.0)
    assert len(p) == 0
    assert p.refused_for("198.51.100.1", now=0.0) == 0.0


def test_penalty_exempt() -> None:
    c = PenaltyConfig.parse("min:0", exempt=["192.0.2.0/24", "2001:db8::/32"])
    p = Penalties(c)
    for addr in ("192.0.2.9", "::ffff:192.0.2.9", "2001:db8::5"):
        for _ in range(50):
            p.add(addr, PenaltyKind.GRACE_EXCEEDED, now=0.0)
        assert p.refused_for(addr, now=0.0) == 0.0
    assert len(p) == 0
    p.add("192.0.3.1", AUTHFAIL, now=0.0)
    assert p.refused_for("192.0.3.1", now=0.0) == 5.0


def test_penalty_disabled() -> None:
    p = Penalties(PenaltyConfig.parse("no"))
    for _ in range(50):
        p.add("198.51.100.1", PenaltyKind.GRACE_EXCEEDED, now=0.0)
    assert p.refused_for("198.51.100.1", now=0.0) == 0.0
    assert len(p) == 0


def test_penalty_groups_ipv4_slash24_and_mapped() -> None:
    p = Penalties(PenaltyConfig.parse("min:15s", netblock="24:64"))
    p.add("203.0.113.1", AUTHFAIL, now=0.0)
    p.add("203.0.113.200", AUTHFAIL, now=0.0)
    p.add("::ffff:203.0.113.99", AUTHFAIL, now=0.0)
    assert len(p) == 1
    for addr in ("203.0.113.7", "::ffff:203.0.113.7"):
        assert p.refused_for(addr, now=0.0) == 15.0
    assert p.refused_for("203.0.114.1", now=0.0) == 0.0


def test_penalty_groups_ipv6_slash64() -> None:
    p = Penalties(PenaltyConfig.parse("min:15s", netblock="24:64"))
    for addr in ("2001:db8:0:7::1", "2001:db8:0:7:ffff:ffff:ffff:ffff", "2001:db8:0:7:abcd::1"):
        p.add(addr, AUTHFAIL, now=0.0)
    assert len(p) == 1
    assert p.refused_for("2001:db8:0:7::42", now=0.0) == 15.0
    assert p.refused_for("2001:db8:0:8::42", now=0.0) == 0.0


def test_penalty_default_netblock_is_per_address() -> None:
    p = Penalties(cfg(min_s=0.0))
    p.add("203.0.113.1", AUTHFAIL, now=0.0)
    assert p.refused_for("203.0.113.2", now=0.0) == 0.0


def test_penalty_unparsable_address_keyed_as_is() -> None:
    p = Penalties(cfg(min_s=0.0))
    p.add("/run/uptermd.sock", AUTHFAIL, now=0.0)
    assert p.refused_for("/run/uptermd.sock", now=0.0) == 5.0
    assert p.refused_for("", now=0.0) == 0.0


def test_overflow_permissive_leaves_new_sources_untracked() -> None:
    p = Penalties(cfg(min_s=0.0, max_sources=2))
    p.add("198.51.100.1", AUTHFAIL, now=0.0)
    p.add("198.51.100.2", AUTHFAIL, now=0.0)
    p.add("198.51.100.3", AUTHFAIL, now=0.0)
    assert len(p) == 2
    assert p.refused_for("198.51.100.3", now=0.0) == 0.0
    assert p.refused_for("198.51.100.4", now=0.0) == 0.0
    # Tracked sources keep their penalties and can still be extended.
    p.add("198.51.100.1", AUTHFAIL, now=0.0)
    assert p.refused_for("198.51.100.1", now=0.0) == 10.0


def test_overflow_deny_all_refuses_untracked_until_room() -> None:
    p = Penalties(cfg(min_s=15.0, max_sources=2, overflow_deny_all=True))
    p.add("198.51.100.1", PenaltyKind.NOAUTH, now=0.0)  # until 1, under min: not refused
    p.add("198.51.100.2", PenaltyKind.GRACE_EXCEEDED, now=0.0)  # until 10
    assert p.refused_for("198.51.100.1", now=0.0) == 0.0  # tracked, below min
    wait = p.refused_for("198.51.100.9", now=0.0)
    assert 0.0 < wait <= 1.0  # until the earliest entry expires
    assert p.refused_for("198.51.100.9", now=1.0) == 0.0  # room freed
    p.add("198.51.100.9", AUTHFAIL, now=1.0)
    assert p.refused_for("203.0.113.1", now=1.0) > 0.0


def test_purge_keeps_table_bounded_over_100k_sources() -> None:
    p = Penalties(PenaltyConfig())  # authfail 5s
    rate_per_s = 100.0
    for i in range(100_000):
        addr = str(ipaddress.IPv4Address(0x0A000000 + i))
        p.add(addr, AUTHFAIL, now=i / rate_per_s)
        # Only what was added in the last 5s can still be live.
        assert len(p) <= 5 * rate_per_s + 1
    assert len(p._heap) == len(p)
    assert p.active(1e9) == 0
    assert len(p) == 0
    assert p._heap == []


def test_repeat_offender_does_not_grow_heap() -> None:
    p = Penalties(PenaltyConfig())
    for i in range(10_000):
        p.add("198.51.100.1", AUTHFAIL, now=i * 0.001)
    assert len(p) == 1
    assert len(p._heap) == 1


_ADDRS = [
    "198.51.100.1",
    "198.51.100.200",
    "::ffff:198.51.100.3",
    "203.0.113.5",
    "2001:db8::1",
    "2001:db8::2:1",
    "2001:db8:1::1",
    "192.0.2.1",  # exempt
    "::ffff:192.0.2.77",  # exempt
    "2001:db8:ffff::9",  # exempt
    "",
]
_EXEMPT = ["192.0.2.0/24", "2001:db8:ffff::/48"]


class _PenaltyModel:
    """A slow reference: no heap, expired entries ignored rather than purged."""

    def __init__(self, c: PenaltyConfig) -> None:
        self.c = c
        self.entries: dict[str, list[float | bool]] = {}

    def live(self, now: float) -> dict[str, list[float | bool]]:
        return {k: e for k, e in self.entries.items() if float(e[0]) > now}

    def add(self, key: str, kind: PenaltyKind, now: float) -> None:
        self.entries = self.live(now)
        e = self.entries.get(key)
        base = now if e is None else max(now, float(e[0]))
        expiry = min(base + self.c.durations_s[kind], now + self.c.max_s)
        if expiry <= now:
            return
        if e is None:
            if len(self.entries) >= self.c.max_sources:
                return
            e = self.entries[key] = [expiry, False]
        e[0] = max(float(e[0]), expiry)
        if float(e[0]) - now >= self.c.min_s:
            e[1] = True

    def refused_for(self, key: str, now: float) -> float:
        live = self.live(now)
        e = live.get(key)
        if e is not None:
            return float(e[0]) - now if e[1] else 0.0
        if self.c.overflow_deny_all and len(live) >= self.c.max_sources:
            return -1.0  # "some positive wait"
        return 0.0

    def active(self, now: float) -> int:
        return sum(1 for e in self.live(now).values() if e[1])


@settings(max_examples=300, deadline=None)
@given(
    min_s=st.sampled_from([0.0, 1.0, 5.0, 15.0]),
    max_s=st.sampled_from([15.0, 30.0, 600.0]),
    max_sources=st.integers(1, 5),
    deny_all=st.booleans(),
    netblock=st.sampled_from(["32:128", "24:64", "16:48"]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "check", "active"]),
            st.sampled_from(_ADDRS),
            st.sampled_from(list(PenaltyKind)),
            # Mostly small steps, so penalties pile up, extend and cross min and expiry.
            st.one_of(st.sampled_from([0.0, 0.0, 0.25, 1.0, 3.0, 7.0, 16.0]), st.floats(0, 20)),
        ),
        max_size=80,
    ),
)
def test_penalties_property(
    min_s: float,
    max_s: float,
    max_sources: int,
    deny_all: bool,
    netblock: str,
    ops: list[tuple[str, str, PenaltyKind, float]],
) -> None:
    c = PenaltyConfig.parse(
        f"min:{min_s} max:{max_s} max-sources4:{max_sources}"
        f" overflow:{'deny-all' if deny_all else 'permissive'}",
        exempt=_EXEMPT,
        netblock=netblock,
    )
    p = Penalties(c)
    model = _PenaltyModel(c)
    exempt = {"192.0.2.1", "::ffff:192.0.2.77", "2001:db8:ffff::9"}
    now = 0.0
    for op, addr, kind, dt in ops:
        now += dt
        key = source_key(addr, c.ipv4_prefix, c.ipv6_prefix)
        if op == "add":
            p.add(addr, kind, now)
            if addr not in exempt:
                model.add(key, kind, now)
        elif op == "check":
            got = p.refused_for(addr, now)
            assert 0.0 <= got <= c.max_s
            if addr in exempt:
                assert got == 0.0
            else:
                want = model.refused_for(key, now)
                if want < 0:
                    assert got > 0.0
                else:
                    assert got == pytest.approx(want)
        else:
            assert p.active(now) == model.active(now)
        assert len(p) <= max_sources


# ---------------------------------------------------------------------------------------------
# Refusals


def test_refusal_messages_are_one_clean_line() -> None:
    a = Admission(StartupLimits(1, 100, 1), per_source=1)
    assert a.try_admit("k") is None
    per_source = a.try_admit("k")
    full = a.try_admit("other")
    assert per_source is not None
    assert full is not None
    assert per_source.reason == "per-source-startups"
    assert full.reason == "startups-full"
    pen = penalty_refusal(12.2)
    assert pen == Refusal(pen.reason, pen.message)
    assert pen.reason == "penalty"
    assert "13 seconds" in pen.message
    for r in (per_source, full, pen):
        assert_one_clean_line(r.message)


# ---------------------------------------------------------------------------------------------
# Admission


def test_admission_below_start_always_admits() -> None:
    a = Admission(StartupLimits(10, 100, 10), per_source=0, rng=random.Random(1))
    for i in range(10):
        assert a.try_admit(f"k{i % 3}") is None
    assert a.preauth == 10
    r = a.try_admit("k0")
    assert r is not None
    assert r.reason == "startups-full"
    assert a.preauth == 10
    assert a.per_source("k0") == 4


def test_admission_per_source_cap_checked_first() -> None:
    a = Admission(StartupLimits(2, 100, 2), per_source=2)
    assert a.try_admit("k") is None
    assert a.try_admit("k") is None
    r = a.try_admit("k")
    assert r is not None
    assert r.reason == "per-source-startups"  # not startups-full, though both apply
    assert a.per_source("k") == 2
    a.release("k")
    assert a.try_admit("k") is None


def test_admission_release_never_negative_and_deletes() -> None:
    a = Admission(StartupLimits(), per_source=0)
    a.release("nobody")
    assert a.preauth == 0
    assert a.try_admit("k") is None
    a.release("k")
    a.release("k")
    a.release("other")
    assert a.preauth == 0
    assert a.per_source("k") == 0
    assert a._by_source == {}


@pytest.mark.parametrize("n", [10, 11, 15, 19])
def test_random_early_drop_probability(n: int) -> None:
    start, rate, full = 10, 30, 20
    a = Admission(StartupLimits(start, rate, full), per_source=0, rng=random.Random(n))
    while a.preauth < n:
        a.try_admit(f"fill{a.preauth}")
    expected = (rate + (100 - rate) * (n - start) / (full - start)) / 100
    assert a.drop_probability() == pytest.approx(expected)
    trials = 20_000
    refused = 0
    for _ in range(trials):
        r = a.try_admit("probe")
        if r is None:
            a.release("probe")
        else:
            assert r.reason == "startups-random-drop"
            refused += 1
        assert a.preauth == n
    assert refused / trials == pytest.approx(expected, abs=0.02)


def test_random_early_drop_rate_zero_at_start_admits() -> None:
    a = Admission(StartupLimits(5, 0, 10), per_source=0, rng=random.Random(0))
    for _ in range(5):
        assert a.try_admit("k") is None
    assert a.drop_probability() == 0.0
    assert a.try_admit("k") is None


@settings(max_examples=300, deadline=None)
@given(
    per_source=st.integers(0, 3),
    start=st.integers(1, 6),
    extra=st.integers(0, 6),
    rate=st.integers(0, 100),
    seed=st.integers(0, 2**32),
    ops=st.lists(st.tuples(st.booleans(), st.sampled_from("abcd")), max_size=80),
)
def test_admission_counts_property(
    per_source: int,
    start: int,
    extra: int,
    rate: int,
    seed: int,
    ops: list[tuple[bool, str]],
) -> None:
    lim = StartupLimits(start, rate, start + extra)
    a = Admission(lim, per_source=per_source, rng=random.Random(seed))
    model: dict[str, int] = {}
    for admit, key in ops:
        if admit:
            if a.try_admit(key) is None:
                model[key] = model.get(key, 0) + 1
        elif model.get(key, 0) > 0:
            a.release(key)
            model[key] -= 1
        else:
            a.release(key)  # a release that matches nothing changes nothing
        assert a.preauth == sum(model.values())
        assert a.preauth <= lim.full
        for k in "abcd":
            assert a.per_source(k) == model.get(k, 0)
            assert per_source == 0 or a.per_source(k) <= per_source
        assert set(a._by_source) == {k for k, v in model.items() if v > 0}


# ---------------------------------------------------------------------------------------------
# OpenCounts


def test_open_counts_limit_and_deletion() -> None:
    c = OpenCounts(2)
    assert c.limit == 2
    assert c.take("a")
    assert c.take("a")
    assert not c.take("a")
    assert c.count("a") == 2
    assert c.take(("b", 1))
    assert len(c) == 2
    c.give("a")
    c.give("a")
    c.give("a")  # never negative
    assert c.count("a") == 0
    assert len(c) == 1
    c.give("never")
    assert len(c) == 1
    c.give(("b", 1))
    assert len(c) == 0


def test_open_counts_unlimited() -> None:
    c = OpenCounts(0)
    for _ in range(10_000):
        assert c.take("k")
    assert c.count("k") == 10_000


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(0, 4),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 4)), max_size=80),
)
def test_open_counts_property(limit: int, ops: list[tuple[bool, int]]) -> None:
    c = OpenCounts(limit)
    model: dict[int, int] = {}
    for take, key in ops:
        if take:
            ok = c.take(key)
            assert ok == (limit == 0 or model.get(key, 0) < limit)
            if ok:
                model[key] = model.get(key, 0) + 1
        else:
            c.give(key)
            if model.get(key, 0) > 0:
                model[key] -= 1
        for k in range(5):
            assert c.count(k) == model.get(k, 0)
            assert limit == 0 or c.count(k) <= limit
        assert len(c) == sum(1 for v in model.values() if v > 0)


# ---------------------------------------------------------------------------------------------
# TokenBucket


def test_token_bucket_burst_then_wait() -> None:
    b = TokenBucket(rate_per_s=1000.0, burst=500.0)
    assert b.take(500.0, now=0.0) == 0.0
    assert b.take(100.0, now=0.0) == pytest.approx(0.1)  # 100 bytes of debt at 1000/s


def test_token_bucket_refills_up_to_burst_only() -> None:
    b = TokenBucket(rate_per_s=1000.0, burst=500.0)
    assert b.take(500.0, now=0.0) == 0.0
    assert b.take(250.0, now=0.25) == 0.0  # refilled 250
    assert b.take(1.0, now=0.25) == pytest.approx(0.001)
    # A long idle refills to the burst, not beyond.
    assert b.take(500.0, now=100.0) == 0.0
    assert b.take(10.0, now=100.0) == pytest.approx(0.01)


def test_token_bucket_debt_repaid_by_waiting() -> None:
    b = TokenBucket(rate_per_s=100.0, burst=0.0)
    wait = b.take(1000.0, now=0.0)
    assert wait == pytest.approx(10.0)
    assert b.take(0.0, now=wait) == 0.0


def test_token_bucket_clock_step_back_does_not_refill_or_drain() -> None:
    b = TokenBucket(rate_per_s=100.0, burst=100.0)
    assert b.take(100.0, now=10.0) == 0.0
    assert b.take(50.0, now=5.0) == pytest.approx(0.5)
    assert b.take(0.0, now=10.5) == 0.0


def test_token_bucket_rejects_bad_rates() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0.0, 10.0)
    with pytest.raises(ValueError):
        TokenBucket(10.0, -1.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2000), st.floats(0, 1)), max_size=50))
def test_token_bucket_average_rate_property(steps: list[tuple[float, float]]) -> None:
    """Whoever waits as told never gets more than burst + rate * elapsed."""
    rate, burst = 1000.0, 500.0
    b = TokenBucket(rate, burst)
    now = 0.0
    total = 0.0
    for amount, dt in steps:
        now += dt
        total += amount
        now += b.take(amount, now)
        assert total <= burst + rate * now + 1e-6
