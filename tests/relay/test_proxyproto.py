"""PROXY protocol v1/v2 parsing: golden vectors, incremental feeding, caps, malformed input.

The golden vectors are built by hand from the published spec (HAProxy ``proxy-protocol.txt``),
not with the encoders, so the encoders are checked against them too.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upterm.errors import LocalProtocolError, RemoteProtocolError
from upterm.relay.proxyproto import (
    MAX_HEADER_BYTES,
    V1_MAX_LINE_BYTES,
    V2_MAX_PAYLOAD_BYTES,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyInfo,
    encode_v1,
    encode_v2,
    encode_v2_local,
    parse,
)

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")
SSH_BANNER = b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n"
TRAILERS = [b"", SSH_BANNER, b"\r\n", b"\x00" * 5000, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"]

V4 = ProxyInfo(source=("192.0.2.1", 56324), dest=("198.51.100.2", 22), version=1)
V6 = ProxyInfo(source=("2001:db8::1", 56324), dest=("2001:db8::2", 22), version=1)
NONE_V1 = ProxyInfo(source=None, dest=None, version=1)
NONE_V2 = ProxyInfo(source=None, dest=None, version=2)


def _v2(info: ProxyInfo) -> ProxyInfo:
    return ProxyInfo(source=info.source, dest=info.dest, version=2)


# v2 address blocks, byte by byte: addresses, then ports 56324 (0xdc04) and 22 (0x0016).
V4_BLOCK = bytes.fromhex("c0000201c6336402dc040016")
V6_BLOCK = bytes.fromhex("20010db800000000000000000000000120010db8000000000000000000000002dc040016")
# AUTHORITY (0x02) "example.com", a NOOP (0x04) with no value, and an AWS-style 0xEA TLV:
# 14 + 3 + 7 = 24 bytes, so lengths are 12 + 24 = 0x24 (IPv4), 36 + 24 = 0x3c, 216 + 24 = 0xf0.
TLVS = b"\x02\x00\x0bexample.com" + b"\x04\x00\x00" + b"\xea\x00\x04\x01abc"

_FULL_V6 = b":".join([b"ffff"] * 8)
#: The spec's worst case for a v1 line, exactly 107 bytes.
LONGEST_UNKNOWN = b"PROXY UNKNOWN " + _FULL_V6 + b" " + _FULL_V6 + b" 65535 65535\r\n"

GOLDEN = [
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 22\r\n", V4, id="v1-tcp4"),
    pytest.param(b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 22\r\n", V6, id="v1-tcp6"),
    pytest.param(b"PROXY TCP6 2001:DB8:0:0::1 2001:db8::2 56324 22\r\n", V6, id="v1-tcp6-upper"),
    pytest.param(
        b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:198.51.100.2 56324 22\r\n", V4, id="v1-tcp6-mapped"
    ),
    pytest.param(
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        ProxyInfo(source=("0.0.0.0", 0), dest=("255.255.255.255", 65535), version=1),
        id="v1-tcp4-extremes",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", NONE_V1, id="v1-unknown-bare"),
    pytest.param(LONGEST_UNKNOWN, NONE_V1, id="v1-unknown-longest"),
    pytest.param(b"PROXY UNKNOWN anything \x00 at all\r\n", NONE_V1, id="v1-unknown-junk"),
    pytest.param(SIG + b"\x21\x11\x00\x0c" + V4_BLOCK, _v2(V4), id="v2-tcp4"),
    pytest.param(SIG + b"\x21\x11\x00\x24" + V4_BLOCK + TLVS, _v2(V4), id="v2-tcp4-tlvs"),
    pytest.param(SIG + b"\x21\x21\x00\x24" + V6_BLOCK, _v2(V6), id="v2-tcp6"),
    pytest.param(SIG + b"\x21\x21\x00\x3c" + V6_BLOCK + TLVS, _v2(V6), id="v2-tcp6-tlvs"),
    pytest.param(
        SIG
        + b"\x21\x21\x00\x24"
        + bytes.fromhex("00000000000000000000ffffc000020100000000000000000000ffffc6336402")
        + b"\xdc\x04\x00\x16",
        _v2(V4),
        id="v2-tcp6-mapped",
    ),
    pytest.param(SIG + b"\x20\x00\x00\x00", NONE_V2, id="v2-local"),
    # LOCAL ignores the family and whatever block follows (even one that is not valid TLVs).
    pytest.param(SIG + b"\x20\x11\x00\x0c" + V4_BLOCK, NONE_V2, id="v2-local-with-block"),
    pytest.param(SIG + b"\x20\xff\x00\x02\x01\x02", NONE_V2, id="v2-local-odd-family"),
    pytest.param(SIG + b"\x21\x00\x00\x00", NONE_V2, id="v2-proxy-unspec"),
    pytest.param(SIG + b"\x21\x00\x00\x03abc", NONE_V2, id="v2-proxy-unspec-block"),
    pytest.param(SIG + b"\x21\x31\x00\xd8" + b"/run/a".ljust(216, b"\0"), NONE_V2, id="v2-unix"),
    pytest.param(SIG + b"\x21\x31\x00\xf0" + bytes(216) + TLVS, NONE_V2, id="v2-unix-tlvs"),
]


def test_signature_is_the_published_one() -> None:
    assert V2_SIGNATURE == SIG
    assert MAX_HEADER_BYTES == 16 + 4096
    assert V1_MAX_LINE_BYTES == 107


@pytest.mark.parametrize(("header", "expected"), GOLDEN)
def test_golden_vectors(header: bytes, expected: ProxyInfo) -> None:
    assert parse(header) == (expected, len(header))


@pytest.mark.parametrize(("header", "expected"), GOLDEN)
def test_every_prefix_needs_more_and_trailing_bytes_are_not_consumed(
    header: bytes, expected: ProxyInfo
) -> None:
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut
    for trailer in TRAILERS:
        assert parse(header + trailer) == (expected, len(header))


def test_longest_unknown_line_is_exactly_the_cap() -> None:
    assert len(LONGEST_UNKNOWN) == V1_MAX_LINE_BYTES


def test_encoders_match_the_golden_vectors() -> None:
    src, dst = ("192.0.2.1", 56324), ("198.51.100.2", 22)
    assert encode_v1(src, dst) == b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 22\r\n"
    assert encode_v2(src, dst) == SIG + b"\x21\x11\x00\x0c" + V4_BLOCK
    assert encode_v2(src, dst, TLVS) == SIG + b"\x21\x11\x00\x24" + V4_BLOCK + TLVS
    src6, dst6 = ("2001:db8::1", 56324), ("2001:db8::2", 22)
    assert encode_v1(src6, dst6) == b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 22\r\n"
    assert encode_v2(src6, dst6) == SIG + b"\x21\x21\x00\x24" + V6_BLOCK
    assert encode_v2_local() == SIG + b"\x20\x00\x00\x00"


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("192.0.2.1", 1), ("2001:db8::1", 2)),
        (("192.0.2.1", 65536), ("192.0.2.2", 2)),
        (("192.0.2.1", 1), ("192.0.2.2", -1)),
        (("not-an-ip", 1), ("192.0.2.2", 2)),
    ],
)
def test_encoders_refuse_what_they_cannot_send(src: tuple[str, int], dst: tuple[str, int]) -> None:
    with pytest.raises(LocalProtocolError):
        encode_v1(src, dst)
    with pytest.raises(LocalProtocolError):
        encode_v2(src, dst)


# --- Early rejection -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "start",
    [
        b"S",
        b"SSH-2.0-",
        SSH_BANNER,
        b"\x00",
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01",  # a TLS ClientHello
        b"P\x00",
        b"PROXX",
        b"proxy ",
        b"PROXY  ",
        b"PROXY t",
        b"PROXY TCP5",
        b"PROXY UDP4 ",
        b"PROXY UNKNOWNX",
        b"PROXY UNKNOWN\rx",
        b"PROXY TCP4 1.2.3.256",
        b"PROXY TCP4 1.2.3.4.5",
        b"PROXY TCP4 01",
        b"PROXY TCP4 1.2.3.4  ",
        b"PROXY TCP4 ::1",
        b"PROXY TCP6 fe80::1%",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01",  # no leading zeros
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"\r\n\r\n\x00\r\nQUIX",
        b"\r\nSSH",
        b"\r\r",
        SIG + b"\x11",  # version 1 in the version/command byte
        SIG + b"\x01",
        SIG + b"\x22",  # command 2
        SIG + b"\x2f",
        SIG + b"\x21\x12",  # TCP4 family, DGRAM
        SIG + b"\x21\x22",
        SIG + b"\x21\x32",
        SIG + b"\x21\x02",
        SIG + b"\x21\x41",  # no family 4
        SIG + b"\x21\x13",
        SIG + b"\x21\x01",  # UNSPEC family with STREAM is not a listed combination
        SIG + b"\x21\x11\x10\x01",  # 4097 bytes: over the cap, refused before it arrives
        SIG + b"\x21\x11\xff\xff",
        SIG + b"\x21\x11\x00\x0b",  # too short for two IPv4 addresses and ports
        SIG + b"\x21\x21\x00\x0c",  # IPv6 needs 36
        SIG + b"\x21\x31\x00\xd7",  # UNIX needs 216
    ],
)
def test_rejected_from_the_first_bytes_that_cannot_be_a_header(start: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(start)
    with pytest.raises(ProxyHeaderError):
        parse(start + b"\r\n" + SSH_BANNER)


def test_proxy_header_error_is_a_remote_protocol_error() -> None:
    assert issubclass(ProxyHeaderError, RemoteProtocolError)


@pytest.mark.parametrize(
    "evil", [b"\x1b[2J\x1b[31mhello\nworld\r\n", b"PROXY TCP4 \x1b[2J\nfake log line\r\n"]
)
def test_error_messages_are_one_line_and_do_not_echo_raw_peer_bytes(evil: bytes) -> None:
    with pytest.raises(ProxyHeaderError) as caught:
        parse(evil)
    message = str(caught.value)
    assert message.isprintable()
    assert "\x1b" not in message
    assert "world" not in message
    assert "fake log line" not in message
    assert len(message) < 200


# --- Caps ----------------------------------------------------------------------------------


def test_v1_without_crlf_within_the_cap_is_refused() -> None:
    almost = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LINE_BYTES - 15)
    assert len(almost) == V1_MAX_LINE_BYTES - 1
    assert parse(almost) is None
    with pytest.raises(ProxyHeaderError, match="107"):
        parse(almost + b"x")
    # The CR as the 107th byte leaves no room for the LF.
    with pytest.raises(ProxyHeaderError):
        parse(almost + b"\r\n")
    assert parse(almost[:-1] + b"\r\n" + SSH_BANNER) == (NONE_V1, V1_MAX_LINE_BYTES)


def test_v2_length_at_the_cap_is_accepted_and_one_more_is_refused() -> None:
    src, dst = ("192.0.2.1", 56324), ("198.51.100.2", 22)
    noop = b"\x04" + struct.pack("!H", V2_MAX_PAYLOAD_BYTES - 12 - 3)
    filler = noop + bytes(V2_MAX_PAYLOAD_BYTES - 12 - 3)
    header = encode_v2(src, dst, filler)
    assert len(header) == MAX_HEADER_BYTES
    assert parse(header[:-1]) is None
    assert parse(header + SSH_BANNER) == (_v2(V4), MAX_HEADER_BYTES)
    over = encode_v2(src, dst, filler + b"\x04\x00\x00")
    with pytest.raises(ProxyHeaderError, match="4096"):
        parse(over[:16])


# --- Malformed fields ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 256.0.0.1 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 10.0.0.1 10.0.0.256 1 2\r\n",
        b"PROXY TCP4 1.2.3 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4.5 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 1..3.4 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 01.2.3.4 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 22\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 22 99999\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 022 22\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 22\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 22\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 0x16 22\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 22 \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4\r\n",
        b"PROXY \r\n",
        b"PROXY TCP4 ::1 ::2 1 2\r\n",  # wrong family for the addresses
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 2001:db8::1 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n",
        b"PROXY TCP6 2001:db8::g ::2 1 2\r\n",
        b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::2 1 2\r\n",
        b"PROXY TCP6 ::1::2 ::2 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
    ],
)
def test_malformed_v1_lines(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(line)
    with pytest.raises(ProxyHeaderError):
        parse(line + SSH_BANNER)


@pytest.mark.parametrize(
    "header",
    [
        SIG + b"\x11\x11\x00\x0c" + V4_BLOCK,  # version 1
        SIG + b"\x31\x11\x00\x0c" + V4_BLOCK,  # version 3
        SIG + b"\x22\x11\x00\x0c" + V4_BLOCK,  # unknown command
        SIG + b"\x21\x12\x00\x0c" + V4_BLOCK,  # UDP over IPv4
        SIG + b"\x21\x22\x00\x24" + V6_BLOCK,  # UDP over IPv6
        SIG + b"\x21\x11\x00\x0d" + V4_BLOCK + b"\x04",  # truncated TLV header
        SIG + b"\x21\x11\x00\x0e" + V4_BLOCK + b"\x04\x00",
        SIG + b"\x21\x11\x00\x11" + V4_BLOCK + b"\x02\x00\x05ab",  # TLV runs past the length
        SIG + b"\x21\x11\x00\x0f" + V4_BLOCK + b"\x04\x00\x01",
        SIG + b"\x21\x21\x00\x0c" + V4_BLOCK,  # IPv6 family, IPv4-sized block
        SIG + b"\x21\x31\x00\xda" + bytes(216) + b"\x04\x00",
    ],
)
def test_malformed_v2_headers(header: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(header)
    with pytest.raises(ProxyHeaderError):
        parse(header + SSH_BANNER)


def test_tlv_that_would_fit_only_with_the_next_stream_bytes_is_refused() -> None:
    # The TLV claims 5 value bytes; only 2 are inside the declared length, the rest would be
    # the SSH banner. Must not borrow from the stream.
    header = SIG + b"\x21\x11\x00\x11" + V4_BLOCK + b"\x02\x00\x05ab"
    with pytest.raises(ProxyHeaderError, match="TLV"):
        parse(header + b"cdefgh")


# --- Properties ----------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
ports = st.integers(min_value=0, max_value=65535)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=64)), max_size=8).map(
    lambda items: b"".join(bytes([t]) + struct.pack("!H", len(v)) + v for t, v in items)
)


def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@st.composite
def endpoints(draw: st.DrawFn) -> tuple[tuple[str, int], tuple[str, int]]:
    family = draw(st.sampled_from([ipv4, ipv6]))
    src, dst = draw(family), draw(family)
    return (str(src), draw(ports)), (str(dst), draw(ports))


@st.composite
def valid_headers(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["v1", "v2", "local", "unknown"]))
    if kind == "local":
        return encode_v2_local()
    if kind == "unknown":
        return b"PROXY UNKNOWN\r\n"
    src, dst = draw(endpoints())
    if kind == "v1":
        return encode_v1(src, dst)
    return encode_v2(src, dst, draw(tlv_lists))


@given(endpoints(), tlv_lists, st.binary(max_size=64))
def test_round_trip(
    ends: tuple[tuple[str, int], tuple[str, int]], tlvs: bytes, trailer: bytes
) -> None:
    src, dst = ends
    expected_src = (_text(ipaddress.ip_address(src[0])), src[1])
    expected_dst = (_text(ipaddress.ip_address(dst[0])), dst[1])
    v1 = encode_v1(src, dst)
    assert parse(v1 + trailer) == (ProxyInfo(expected_src, expected_dst, 1), len(v1))
    v2 = encode_v2(src, dst, tlvs)
    assert parse(v2 + trailer) == (ProxyInfo(expected_src, expected_dst, 2), len(v2))


@given(valid_headers())
def test_every_prefix_of_a_generated_header_needs_more(header: bytes) -> None:
    for cut in range(len(header)):
        assert parse(header[:cut]) is None
    result = parse(header)
    assert result is not None
    assert result[1] == len(header)


def _outcome(buf: bytes) -> tuple[ProxyInfo, int] | ProxyHeaderError | None:
    try:
        result = parse(buf)
    except ProxyHeaderError as exc:
        assert "\n" not in str(exc)
        return exc
    if result is None:
        # Never asks for more than the cap.
        assert len(buf) < MAX_HEADER_BYTES
    else:
        info, consumed = result
        assert 0 < consumed <= min(len(buf), MAX_HEADER_BYTES)
        assert info.version in (1, 2)
    return result


def _check_consistent(buf: bytes, cut: int) -> None:
    """Any outcome, and a prefix's verdict sticks: more bytes never undo a refusal or result."""
    whole = _outcome(buf)
    part = _outcome(buf[:cut])
    if isinstance(part, ProxyHeaderError):
        assert isinstance(whole, ProxyHeaderError)
    elif part is not None:
        assert whole == part


SEEDS = [
    b"",
    b"P",
    b"PROXY ",
    b"PROXY TCP4 ",
    b"PROXY TCP6 ",
    b"PROXY UNKNOWN",
    SIG,
    SIG + b"\x21",
    SIG + b"\x20",
    SIG + b"\x21\x11",
    SIG + b"\x21\x21",
    SIG + b"\x21\x31",
    SIG + b"\x21\x00",
]


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(SEEDS), st.binary(max_size=300), st.integers(min_value=0))
def test_fuzz_arbitrary_bytes(seed: bytes, tail: bytes, cut: int) -> None:
    buf = seed + tail
    _check_consistent(buf, cut % (len(buf) + 1))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.binary(min_size=4, max_size=4),
    st.sampled_from([b"\x00", b"\x04", b"\xff"]),
    st.integers(min_value=0),
)
def test_fuzz_v2_never_waits_past_the_cap(fixed: bytes, fill: bytes, cut: int) -> None:
    buf = SIG + fixed + fill * (MAX_HEADER_BYTES - 16)
    _check_consistent(buf, cut % (len(buf) + 1))


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "delete", "insert"]),
        st.integers(min_value=0),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=4,
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(valid_headers(), mutations, st.binary(max_size=32), st.integers(min_value=0))
def test_fuzz_mutated_valid_headers(
    header: bytes, edits: list[tuple[str, int, int]], trailer: bytes, cut: int
) -> None:
    buf = bytearray(header)
    for op, where, value in edits:
        index = where % (len(buf) + 1)
        if op == "insert":
            buf.insert(index, value)
        elif index < len(buf):
            if op == "flip":
                buf[index] ^= 1 << (value % 8)
            elif op == "set":
                buf[index] = value
            else:
                del buf[index]
    data = bytes(buf) + trailer
    _check_consistent(data, cut % (len(data) + 1))
