"""authorized_keys options, and what each means for a joiner of a shared terminal (sans-I/O).

A key line may carry options (``restrict``, ``from="..."``, ``command="..."``): a backup
robot's key in ``~/.ssh/authorized_keys`` is often limited that way. Dropping them would give
that key a full typing seat from anywhere. Each option upterm can honour maps onto the
session; any other is refused, naming the line (fail closed):

- ``from="pattern-list"``: the joiner's address must match (as OpenSSH: ``*``/``?``
  wildcards, CIDR blocks, ``!`` negation wins). End-to-end joins hide the address, so such a
  key joins through the relay only.
- ``expiry-time="YYYYMMDD[HHMM[SS]][Z]"``: refused after that time (local time unless Z).
- ``no-pty``: no terminal, so no seat (a shared terminal is all there is).
- ``command="..."``: the joiner gets its own process running that command (as with
  ``--force-command``), never the shared terminal.
- ``restrict``: a viewer at most (the host cannot make it a typist), so downloads only, and
  no port forwarding even where the session allows it.
- ``no-port-forwarding``: no ``ssh -L`` even where the session allows it.
- ``no-agent-forwarding``, ``no-X11-forwarding``, ``no-user-rc``, ``pty``: held anyway
  (joiners never get agent or X11 forwarding, nor an rc file; ``pty`` only undoes the
  ``no-pty`` of ``restrict``, and a restricted key still only watches).
"""

from __future__ import annotations

import calendar
import fnmatch
import ipaddress
import time
from dataclasses import dataclass

#: Options that restrict what upterm never offers anyway.
_HELD_ANYWAY = frozenset({"no-agent-forwarding", "no-x11-forwarding", "no-user-rc", "pty"})
_WITH_VALUE = frozenset({"from", "expiry-time", "command"})
_FLAGS = frozenset({"no-pty", "restrict", "no-port-forwarding"}) | _HELD_ANYWAY


class KeyOptionError(ValueError):
    """An option upterm does not enforce, or one it cannot read."""


@dataclass(frozen=True)
class KeyRules:
    """What a key's options allow a joiner."""

    from_patterns: tuple[str, ...] = ()
    #: Unix time after which the key is refused; None: never.
    expires_at: float | None = None
    no_pty: bool = False
    command: str | None = None
    viewer_only: bool = False
    no_port_forwarding: bool = False

    def refusal(self, addr: str | None, now: float | None = None) -> str:
        """Why a joiner from ``addr`` ("ip:port"; None when unknown, end to end) may not
        join with this key now, or "" if it may."""
        if self.expires_at is not None and (now or time.time()) >= self.expires_at:
            stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.expires_at))
            return f"your key's authorization expired on {stamp} (expiry-time)"
        if self.no_pty:
            return (
                "your key is authorized without a terminal (no-pty), and a terminal is all "
                "this session offers"
            )
        if self.from_patterns:
            if addr is None:
                return (
                    "your key may join only from some addresses (from=), which an end-to-end "
                    "join does not show; join through the relay with the plain ssh line"
                )
            if not address_allowed(self.from_patterns, addr):
                return f"your key may not join from {host_of(addr)} (from=)"
        return ""


def split_options(text: str) -> list[tuple[str, str | None]]:
    """``a,b="x,y",c`` → [("a", None), ("b", "x,y"), ("c", None)] (names lower-cased)."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(text):
        end = i
        while end < len(text) and text[end] not in ',="':
            end += 1
        name = text[i:end].strip().lower()
        value: str | None = None
        if end < len(text) and text[end] == "=":
            if end + 1 >= len(text) or text[end + 1] != '"':
                raise KeyOptionError(f"option {name!r}: its value must be in double quotes")
            close = end + 2
            chars: list[str] = []
            while close < len(text) and text[close] != '"':
                if text[close] == "\\" and close + 1 < len(text) and text[close + 1] == '"':
                    close += 1
                chars.append(text[close])
                close += 1
            if close >= len(text):
                raise KeyOptionError(f"option {name!r}: unterminated quoted value")
            value = "".join(chars)
            end = close + 1
        if not name:
            raise KeyOptionError("an empty option")
        out.append((name, value))
        if end < len(text) and text[end] != ",":
            raise KeyOptionError(f"option {name!r}: expected a comma after it")
        i = end + 1
    return out


def parse_options(text: str) -> KeyRules:
    """The rules of an options field (empty text: none); raises :class:`KeyOptionError`."""
    if not text:
        return KeyRules()
    patterns: tuple[str, ...] = ()
    expires_at: float | None = None
    no_pty = viewer_only = no_forwarding = False
    command: str | None = None
    for name, value in split_options(text):
        if name not in _WITH_VALUE | _FLAGS:
            raise KeyOptionError(f"option {name!r} is not one upterm enforces")
        if (name in _WITH_VALUE) != (value is not None):
            raise KeyOptionError(
                f"option {name!r} " + ("needs a value" if value is None else "takes no value")
            )
        if name == "from":
            assert value is not None
            patterns = tuple(p.strip() for p in value.split(",") if p.strip())
            if not patterns:
                raise KeyOptionError('option "from": an empty pattern list')
        elif name == "expiry-time":
            assert value is not None
            expires_at = parse_expiry(value)
        elif name == "command":
            command = value
        elif name == "no-pty":
            no_pty = True
        elif name == "restrict":
            viewer_only = no_forwarding = True
        elif name == "no-port-forwarding":
            no_forwarding = True
    return KeyRules(patterns, expires_at, no_pty, command, viewer_only, no_forwarding)


def parse_expiry(value: str) -> float:
    """OpenSSH's ``YYYYMMDD[HHMM[SS]][Z]`` (local time unless it ends in Z)."""
    utc = value.endswith(("Z", "z"))
    digits = value[:-1] if utc else value
    if not digits.isdigit() or len(digits) not in (8, 12, 14):
        raise KeyOptionError(f"expiry-time {value!r}: use YYYYMMDD[HHMM[SS]][Z]")
    digits = digits.ljust(14, "0")
    try:
        parsed = time.strptime(digits, "%Y%m%d%H%M%S")
    except ValueError as exc:
        raise KeyOptionError(f"expiry-time {value!r}: {exc}") from exc
    return float(calendar.timegm(parsed) if utc else time.mktime(parsed))


def host_of(addr: str) -> str:
    """The address part of "ip:port" / "[ip6]:port"."""
    if addr.startswith("["):
        return addr[1:].split("]", 1)[0]
    host, sep, port = addr.rpartition(":")
    return host if sep and port.isdigit() and host.count(":") == 0 else addr


def address_allowed(patterns: tuple[str, ...], addr: str) -> bool:
    """OpenSSH's pattern-list against an address: a matching negated pattern refuses, else
    any matching pattern allows. Host names never match (no reverse lookups)."""
    host = host_of(addr)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    allowed = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        if _matches(body, ip, host):
            if negated:
                return False
            allowed = True
    return allowed


def _matches(pattern: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str) -> bool:
    if "/" in pattern:
        try:
            return ip in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    return fnmatch.fnmatchcase(host, pattern)
