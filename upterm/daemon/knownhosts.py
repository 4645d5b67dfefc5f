"""Trusting the relay's host key: an OpenSSH known_hosts file, or a key we already know.

A relay's key is accepted on first use (and recorded, with a warning the user sees); a
relay whose key differs from the recorded one is refused, never silently re-trusted.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from upterm.errors import HostKeyChanged, RemoteProtocolError
from upterm.wire import PublicKey, fingerprint_sha256, parse_public_key_line

log = logging.getLogger(__name__)


def known_hosts_name(host: str, port: int) -> str:
    """OpenSSH's name for a host in known_hosts: ``host`` on port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        try:
            _, _, salt_b64, digest_b64 = pattern.split("|")
            salt, digest = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        except ValueError:
            return False
        mac = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(mac, digest)
    return _glob_regex(pattern).fullmatch(name) is not None


def _glob_regex(pattern: str) -> re.Pattern[str]:
    # OpenSSH's patterns know only '*' and '?'; '[' is literal (as in "[host]:2222"), so
    # fnmatch, which reads "[...]" as a character class, must not be used.
    parts = ("." if ch == "?" else ".*" if ch == "*" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts))


def _host_field_matches(hosts: str, name: str) -> bool:
    matched = False
    for pattern in hosts.split(","):
        if pattern.startswith("!"):
            if _pattern_matches(pattern[1:], name):
                return False
        elif _pattern_matches(pattern, name):
            matched = True
    return matched


@dataclass
class RelayTrust:
    """Decides whether the relay's host key is trusted; remembers what it accepted.

    With a known_hosts file: a recorded key must match (a different one is refused as
    changed); an unknown key is accepted only when ``accept_new`` is set (and recorded, with
    OpenSSH's warning) or when it equals ``confirmed``, the key the user said yes to.
    Otherwise :attr:`unknown` keeps it so the caller can ask the user.
    """

    name: str
    known_hosts: Path | None = None
    pinned: bytes | None = None
    accept_new: bool = True
    confirmed: bytes | None = None
    warnings: list[str] = field(default_factory=list)
    accepted: bytes | None = None
    #: Whether :attr:`accepted` came as the authority of a host certificate (else a plain key).
    accepted_as_authority: bool = False
    #: Whether :attr:`pinned` is to be met as a certificate authority (it was, the first
    #: time) or as a plain key.
    pinned_authority: bool = False
    unknown: bytes | None = None

    def ca_keys(self) -> list[bytes]:
        """Blobs of ``@cert-authority`` keys whose patterns match the relay's name.

        A pinned key counts as an authority only if it was one when first accepted: a relay
        whose certificate names another host (``uptermd --hostname``) than the address dialed
        was first accepted by its plain key, and must be met the same way on a redial (its
        certificate would be refused for the name).
        """
        if self.pinned is not None:
            return [self.pinned] if self.pinned_authority else []
        found: list[bytes] = []
        for fields in self._lines():
            if (
                fields[0] == "@cert-authority"
                and len(fields) >= 4
                and _host_field_matches(fields[1], self.name)
            ):
                with contextlib.suppress(RemoteProtocolError):
                    key = parse_public_key_line(" ".join(fields[2:]))
                    if key is not None:
                        found.append(key.blob)
        return found

    def _lines(self) -> list[list[str]]:
        if self.known_hosts is None or self.pinned is not None:
            return []
        try:
            text = self.known_hosts.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [line.split() for line in text.splitlines() if line.split()]

    def check(self, key_blob: bytes) -> bool:
        """True if ``key_blob`` may be the relay's key; raises :class:`HostKeyChanged`."""
        ok = key_blob == self.pinned if self.pinned is not None else self._check_file(key_blob)
        if ok:
            self.accepted = key_blob
        return ok

    def _check_file(self, key_blob: bytes) -> bool:
        assert self.known_hosts is not None
        key = PublicKey(key_blob)
        try:
            lines = self.known_hosts.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        offending: tuple[int, PublicKey] | None = None
        for lineno, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#") or fields[0].startswith("@"):
                continue
            if len(fields) < 3 or not _host_field_matches(fields[0], self.name):
                continue
            try:
                known = parse_public_key_line(" ".join(fields[1:]))
            except RemoteProtocolError:
                continue  # as OpenSSH: a line it cannot read neither matches nor conflicts
            if known is None:
                continue
            if known.blob == key_blob:
                return True
            if known.algorithm == key.algorithm:
                offending = (lineno, known)
        if offending is not None:
            lineno, known = offending
            raise HostKeyChanged(
                f"REMOTE HOST IDENTIFICATION HAS CHANGED for {self.name}: it now offers "
                f"{fingerprint_sha256(key_blob)}, {self.known_hosts}:{lineno} has "
                f"{known.fingerprint}; if the relay's key really changed, remove that line"
            )
        if not self.accept_new and key_blob != self.confirmed:
            self.unknown = key_blob
            return False
        self._record(key)
        return True

    def _record(self, key: PublicKey) -> None:
        assert self.known_hosts is not None
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.known_hosts.open("ab") as fh:
            fh.write(self.name.encode() + b" " + key.authorized_key_line())
        kind = key.algorithm.removeprefix("ssh-").upper()
        self.warnings.append(
            f"Warning: Permanently added '{self.name}' ({kind}) to the list of known hosts."
        )
