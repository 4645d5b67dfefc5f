"""PROXY protocol v1 (text) and v2 (binary) headers, as a load balancer sends them to uptermd.

HAProxy, nginx and AWS NLB can prepend one such header to the TCP stream they forward so the
relay learns the real client's address instead of the balancer's. The facts (signatures, field
layout, limits) come from HAProxy's published ``proxy-protocol.txt``.

Sans-I/O: :func:`parse` takes the bytes received so far and says "need more", "here is the
header and how many bytes it used", or raises :class:`ProxyHeaderError`. It rejects a buffer as
soon as it can no longer become a valid header, so a client that speaks SSH straight away (no
balancer in front) is refused on its first bytes rather than after a timeout. The encoders let
tests and benches play the balancer.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from upterm.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_HEADER_BYTES",
    "V1_MAX_LINE_BYTES",
    "V1_PREFIX",
    "V2_FIXED_BYTES",
    "V2_MAX_PAYLOAD_BYTES",
    "V2_SIGNATURE",
    "ProxyHeaderError",
    "ProxyInfo",
    "encode_v1",
    "encode_v2",
    "encode_v2_local",
    "parse",
]

# --- Limits and constants ----------------------------------------------------------------

#: A v1 line is at most this long, CRLF included (the spec's worst case, "PROXY UNKNOWN" with
#: two full-length IPv6 addresses and ports).
V1_MAX_LINE_BYTES = 107
#: Fixed part of a v2 header: signature, version/command, family/protocol, length.
V2_FIXED_BYTES = 16
#: Our cap on the v2 length field (addresses + TLVs). The field allows 65535, but no balancer
#: we support sends more than a few hundred bytes, and the cap bounds what an unauthenticated
#: peer can make us buffer.
V2_MAX_PAYLOAD_BYTES = 4096
#: The most bytes :func:`parse` ever needs to see before it returns a header or raises.
MAX_HEADER_BYTES = max(V1_MAX_LINE_BYTES, V2_FIXED_BYTES + V2_MAX_PAYLOAD_BYTES)

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_V1_PROTO_TCP4 = b"TCP4"
_V1_PROTO_TCP6 = b"TCP6"
_V1_PROTO_UNKNOWN = b"UNKNOWN"
_V1_PROTOS = (_V1_PROTO_TCP4, _V1_PROTO_TCP6, _V1_PROTO_UNKNOWN)
#: Fields after "PROXY ": protocol, source address, destination address, two ports.
_V1_TCP_FIELD_COUNT = 5
#: Longest textual IPv6 address (full groups with a dotted-quad tail).
_V1_MAX_IPV6_TEXT_BYTES = 45
_V1_MAX_PORT_DIGITS = 5
_V1_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")
_DIGITS = frozenset(b"0123456789")
_MAX_PORT = 65535
_MAX_OCTET = 255

_V2_VERSION = 2
_V2_CMD_LOCAL = 0
_V2_CMD_PROXY = 1
# Family (high nibble) and transport (low nibble), combined as the spec lists them.
_V2_UNSPEC = 0x00
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_UNIX_STREAM = 0x31
_V2_DGRAM = 0x2
_V2_FAMILY_COUNT = 4  # UNSPEC, INET, INET6, UNIX
_V2_IPV4_ADDR_BYTES = 12  # two 4-byte addresses, two 2-byte ports
_V2_IPV6_ADDR_BYTES = 36  # two 16-byte addresses, two 2-byte ports
_V2_UNIX_ADDR_BYTES = 216  # two 108-byte socket paths
_V2_ADDR_BYTES = {
    _V2_UNSPEC: 0,
    _V2_TCP4: _V2_IPV4_ADDR_BYTES,
    _V2_TCP6: _V2_IPV6_ADDR_BYTES,
    _V2_UNIX_STREAM: _V2_UNIX_ADDR_BYTES,
}
_V2_TLV_HEADER_BYTES = 3  # 1-byte type, 2-byte big-endian length
_V2_MAX_LENGTH_FIELD = 0xFFFF

#: How many peer bytes an error message may show (as a repr, never raw).
_ERROR_PEEK_BYTES = 8


# --- Public types ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyInfo:
    """What a PROXY header said about the connection it precedes.

    ``source`` and ``dest`` are ``(ip, port)`` with the IP in its canonical text form
    (an IPv4-mapped IPv6 address is given as the IPv4 address). Both are ``None`` when the
    header carries no usable address (v2 LOCAL, v1 UNKNOWN, v2 UNIX or UNSPEC): the caller
    then uses the socket's own peer.
    """

    source: tuple[str, int] | None
    dest: tuple[str, int] | None
    #: 1 for the text header, 2 for the binary one.
    version: int


class ProxyHeaderError(RemoteProtocolError):
    """The bytes in front of the SSH stream are not a valid (or acceptable) PROXY header."""


# --- Parsing -----------------------------------------------------------------------------


def parse(buf: bytes) -> tuple[ProxyInfo, int] | None:
    """Parse the PROXY header at the start of ``buf``.

    Returns ``None`` when ``buf`` is a prefix of a possibly valid header and more bytes are
    needed (never once ``len(buf) >= MAX_HEADER_BYTES``), or ``(info, consumed)`` for a
    complete header, where ``buf[consumed:]`` belongs to the stream that follows. Raises
    :class:`ProxyHeaderError` as soon as ``buf`` cannot be the start of a valid header, or the
    header exceeds our caps.
    """
    if not buf:
        return None
    if buf[0] == V1_PREFIX[0]:
        return _parse_v1(buf)
    if buf[0] == V2_SIGNATURE[0]:
        return _parse_v2(buf)
    raise ProxyHeaderError(f"not a PROXY protocol header (starts with {_peek(buf)})")


def _peek(data: bytes) -> str:
    """Show at most a few peer bytes in a message, escaped so they cannot forge log lines."""
    return repr(data[:_ERROR_PEEK_BYTES])


def _error(version: int, what: str) -> ProxyHeaderError:
    return ProxyHeaderError(f"PROXY v{version} header: {what}")


# --- v1 ------------------------------------------------------------------------------------


def _parse_v1(buf: bytes) -> tuple[ProxyInfo, int] | None:
    prefix = buf[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(prefix):
        raise ProxyHeaderError(f"not a PROXY protocol header (starts with {_peek(buf)})")
    end = buf.find(b"\r\n", 0, V1_MAX_LINE_BYTES)
    if end >= 0:
        # The prefix check above guarantees the CRLF comes after "PROXY ".
        return _v1_line(buf[len(V1_PREFIX) : end]), end + 2
    if len(buf) >= V1_MAX_LINE_BYTES:
        raise _error(1, f"no CRLF within {V1_MAX_LINE_BYTES} bytes")
    if len(buf) > len(V1_PREFIX):
        _check_v1_partial(buf[len(V1_PREFIX) :])
    return None


def _v1_line(rest: bytes) -> ProxyInfo:
    """Validate the complete line after ``"PROXY "`` (CRLF excluded)."""
    if rest == _V1_PROTO_UNKNOWN or rest.startswith(_V1_PROTO_UNKNOWN + b" "):
        # The spec tells receivers to ignore whatever follows UNKNOWN up to the CRLF.
        return ProxyInfo(source=None, dest=None, version=1)
    fields = rest.split(b" ")
    proto = fields[0]
    if proto not in (_V1_PROTO_TCP4, _V1_PROTO_TCP6):
        raise _error(1, f"unknown protocol {_peek(proto)}")
    if len(fields) != _V1_TCP_FIELD_COUNT:
        raise _error(1, f"expected {_V1_TCP_FIELD_COUNT} single-space-separated fields")
    _, src_text, dst_text, sport_text, dport_text = fields
    src = _v1_address(proto, src_text, "source")
    dst = _v1_address(proto, dst_text, "destination")
    sport = _v1_port(sport_text, "source")
    dport = _v1_port(dport_text, "destination")
    return ProxyInfo(source=(src, sport), dest=(dst, dport), version=1)


def _check_v1_partial(rest: bytes) -> None:
    """Raise if ``rest`` (the line after ``"PROXY "`` so far, no CRLF) cannot grow into one."""
    if rest.startswith(_V1_PROTO_UNKNOWN):
        tail = rest[len(_V1_PROTO_UNKNOWN) :]
        # After UNKNOWN comes the CRLF or a space and anything; a lone CR must be the last
        # byte so far, since CR + LF would have completed the line.
        if tail and tail[:1] != b" " and tail != b"\r":
            raise _error(1, f"unknown protocol {_peek(rest)}")
        return
    if rest.endswith(b"\r"):
        # Only the LF is missing: what we have must already be a complete, valid line.
        _v1_line(rest[:-1])
        return
    fields = rest.split(b" ")
    if len(fields) > _V1_TCP_FIELD_COUNT:
        raise _error(1, f"expected {_V1_TCP_FIELD_COUNT} single-space-separated fields")
    *done, partial = fields
    if not done:
        if not any(p.startswith(partial) for p in _V1_PROTOS):
            raise _error(1, f"unknown protocol {_peek(partial)}")
        return
    proto = done[0]
    if proto not in (_V1_PROTO_TCP4, _V1_PROTO_TCP6):
        raise _error(1, f"unknown protocol {_peek(proto)}")
    names = ("source", "destination")
    for index, text in enumerate(done[1:3]):
        _v1_address(proto, text, names[index])
    for index, text in enumerate(done[3:5]):
        _v1_port(text, names[index])
    position = len(done)  # index of the field being received
    name = names[(position - 1) % 2]
    if position <= 2:
        _check_v1_address_prefix(proto, partial, name)
    else:
        _check_v1_port_prefix(partial, name)


def _v1_address(proto: bytes, text: bytes, name: str) -> str:
    if proto == _V1_PROTO_TCP4:
        if not _is_ipv4_text(text):
            raise _error(1, f"{name} address {_peek(text)} is not an IPv4 address")
        return str(ipaddress.IPv4Address(text.decode("ascii")))
    # The character check keeps out what ipaddress would accept but the spec does not
    # (a "%zone" suffix, surrounding whitespace).
    if not text or len(text) > _V1_MAX_IPV6_TEXT_BYTES or not set(text) <= _V1_IPV6_CHARS:
        raise _error(1, f"{name} address {_peek(text)} is not an IPv6 address")
    try:
        address = ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        raise _error(1, f"{name} address {_peek(text)} is not an IPv6 address") from None
    return _ipv6_text(address)


def _is_ipv4_text(text: bytes) -> bool:
    """Exactly four decimal octets, 0..255, no leading zeros (the spec's "dotted quad")."""
    octets = text.split(b".")
    return len(octets) == 4 and all(_is_decimal(o, _MAX_OCTET) for o in octets)


def _is_decimal(text: bytes, maximum: int) -> bool:
    """A canonical decimal number in ``0..maximum``: digits only, no leading zero."""
    if not text or not set(text) <= _DIGITS or (len(text) > 1 and text[0] == ord("0")):
        return False
    return len(text) <= len(str(maximum)) and int(text) <= maximum


def _check_v1_address_prefix(proto: bytes, text: bytes, name: str) -> None:
    if proto == _V1_PROTO_TCP4:
        *octets, last = text.split(b".")
        ok = len(octets) < 4 and all(_is_decimal(o, _MAX_OCTET) for o in octets)
        ok = ok and (not last or _is_decimal(last, _MAX_OCTET))
        if not ok:
            raise _error(1, f"{name} address {_peek(text)} is not an IPv4 address")
    elif len(text) > _V1_MAX_IPV6_TEXT_BYTES or not set(text) <= _V1_IPV6_CHARS:
        raise _error(1, f"{name} address {_peek(text)} is not an IPv6 address")


def _v1_port(text: bytes, name: str) -> int:
    # The spec forbids leading zeros (they could be read as octal); HAProxy never sends them.
    if not _is_decimal(text, _MAX_PORT):
        raise _error(1, f"{name} port {_peek(text)} is not a decimal number in 0..65535")
    return int(text)


def _check_v1_port_prefix(text: bytes, name: str) -> None:
    # Every prefix of a number <= 65535 is itself <= 65535, so the full check applies.
    if text and not _is_decimal(text, _MAX_PORT):
        raise _error(1, f"{name} port {_peek(text)} is not a decimal number in 0..65535")


# --- v2 ------------------------------------------------------------------------------------


def _parse_v2(buf: bytes) -> tuple[ProxyInfo, int] | None:
    signature = buf[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise ProxyHeaderError(f"not a PROXY protocol header (starts with {_peek(buf)})")
    # Check each fixed byte as soon as it arrives so a bad header fails without waiting.
    if len(buf) <= len(V2_SIGNATURE):
        return None
    ver_cmd = buf[12]
    version, command = ver_cmd >> 4, ver_cmd & 0x0F
    if version != _V2_VERSION:
        raise _error(2, f"version {version} in the version/command byte, only 2 is defined")
    if command not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
        raise _error(2, f"unknown command {command:#x}")
    if len(buf) < 14:
        return None
    family = buf[13]
    # LOCAL (a balancer's health check) ignores the family and the whole address block.
    if command == _V2_CMD_PROXY:
        if family & 0x0F == _V2_DGRAM and family >> 4 < _V2_FAMILY_COUNT:
            raise _error(2, "datagram (UDP) connections are not supported")
        if family not in _V2_ADDR_BYTES:
            raise _error(2, f"unsupported family/protocol byte {family:#04x}")
    if len(buf) < V2_FIXED_BYTES:
        return None
    (length,) = struct.unpack_from("!H", buf, 14)
    if length > V2_MAX_PAYLOAD_BYTES:
        raise _error(2, f"length {length} is over our {V2_MAX_PAYLOAD_BYTES}-byte cap")
    address_bytes = _V2_ADDR_BYTES[family] if command == _V2_CMD_PROXY else 0
    if length < address_bytes:
        raise _error(2, f"length {length} is too short for its addresses ({address_bytes})")
    consumed = V2_FIXED_BYTES + length
    if len(buf) < consumed:
        return None
    if command == _V2_CMD_LOCAL:
        return ProxyInfo(source=None, dest=None, version=2), consumed
    payload = buf[V2_FIXED_BYTES:consumed]
    if family == _V2_UNSPEC:
        # An unspecified family has no defined address layout, so nothing in the block can be
        # located (not even TLVs); the spec lets us accept it and use the real endpoints.
        return ProxyInfo(source=None, dest=None, version=2), consumed
    _check_v2_tlvs(payload[address_bytes:])
    if family == _V2_TCP4:
        src4, dst4, sport, dport = struct.unpack_from("!4s4sHH", payload)
        source = (str(ipaddress.IPv4Address(src4)), sport)
        dest = (str(ipaddress.IPv4Address(dst4)), dport)
        return ProxyInfo(source=source, dest=dest, version=2), consumed
    if family == _V2_TCP6:
        src6, dst6, sport, dport = struct.unpack_from("!16s16sHH", payload)
        source = (_ipv6_text(ipaddress.IPv6Address(src6)), sport)
        dest = (_ipv6_text(ipaddress.IPv6Address(dst6)), dport)
        return ProxyInfo(source=source, dest=dest, version=2), consumed
    # UNIX stream: a socket path is no client address we could log or rate-limit by.
    return ProxyInfo(source=None, dest=None, version=2), consumed


def _check_v2_tlvs(tlvs: bytes) -> None:
    """The TLVs must tile the rest of the block exactly; we skip their contents."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < _V2_TLV_HEADER_BYTES:
            raise _error(2, "truncated TLV header at the end of the address block")
        (value_bytes,) = struct.unpack_from("!H", tlvs, offset + 1)
        offset += _V2_TLV_HEADER_BYTES + value_bytes
        if offset > len(tlvs):
            raise _error(2, "a TLV runs past the declared length")


def _ipv6_text(address: ipaddress.IPv6Address) -> str:
    # Dual-stack balancers report IPv4 clients as ::ffff:a.b.c.d; callers want the IPv4 form.
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


# --- Encoding (tests and benches acting as a balancer) -------------------------------------

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _endpoints(src: tuple[str, int], dst: tuple[str, int]) -> tuple[_IPAddress, _IPAddress]:
    try:
        src_ip = ipaddress.ip_address(src[0])
        dst_ip = ipaddress.ip_address(dst[0])
    except ValueError as exc:
        raise LocalProtocolError(f"cannot encode a PROXY header: {exc}") from None
    if src_ip.version != dst_ip.version:
        raise LocalProtocolError(
            "cannot encode a PROXY header: source and destination families differ"
        )
    for port in (src[1], dst[1]):
        if not 0 <= port <= _MAX_PORT:
            raise LocalProtocolError(f"cannot encode a PROXY header: port {port} is out of range")
    return src_ip, dst_ip


def encode_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """The v1 line for a TCP connection from ``src`` to ``dst`` (both IPv4 or both IPv6)."""
    src_ip, dst_ip = _endpoints(src, dst)
    proto = "TCP4" if src_ip.version == 4 else "TCP6"
    return f"PROXY {proto} {src_ip} {dst_ip} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(src: tuple[str, int], dst: tuple[str, int], tlvs: bytes = b"") -> bytes:
    """The v2 PROXY header for a TCP connection from ``src`` to ``dst``.

    The family follows the addresses (both IPv4 or both IPv6). ``tlvs`` is appended to the
    address block as-is, so a test can also send malformed TLVs.
    """
    src_ip, dst_ip = _endpoints(src, dst)
    family = _V2_TCP4 if src_ip.version == 4 else _V2_TCP6
    block = src_ip.packed + dst_ip.packed + struct.pack("!HH", src[1], dst[1]) + tlvs
    if len(block) > _V2_MAX_LENGTH_FIELD:
        raise LocalProtocolError("cannot encode a PROXY header: TLVs overflow the length field")
    ver_cmd = _V2_VERSION << 4 | _V2_CMD_PROXY
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, family, len(block)) + block


def encode_v2_local() -> bytes:
    """The v2 LOCAL header a balancer sends on its own health-check connections."""
    ver_cmd = _V2_VERSION << 4 | _V2_CMD_LOCAL
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, _V2_UNSPEC, 0)
