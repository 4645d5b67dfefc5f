"""authorized_keys options: parsed as OpenSSH writes them, enforced or refused."""

from __future__ import annotations

import time

import pytest

from upterm import wire
from upterm.keyopts import (
    KeyOptionError,
    KeyRules,
    address_allowed,
    parse_expiry,
    parse_options,
    split_options,
)

LINE = (
    'restrict,from="10.0.0.0/8,!10.9.9.9,192.168.1.?",command="echo \\"hi, there\\"" '
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl backup"
)


def test_options_are_kept_with_the_key_and_read_as_openssh_writes_them() -> None:
    key = wire.parse_public_key_line(LINE)
    assert key is not None and key.comment == "backup"
    assert split_options(key.options) == [
        ("restrict", None),
        ("from", "10.0.0.0/8,!10.9.9.9,192.168.1.?"),
        ("command", 'echo "hi, there"'),
    ]
    rules = parse_options(key.options)
    assert rules.viewer_only and rules.command == 'echo "hi, there"'
    assert rules.from_patterns == ("10.0.0.0/8", "!10.9.9.9", "192.168.1.?")


@pytest.mark.parametrize(
    "options",
    [
        "cert-authority",
        'permitopen="localhost:80"',
        'environment="A=B"',
        "no-touch-required",
        'tunnel="1"',
        "command",  # a value is required
        'no-pty="x"',  # a flag takes none
        'from="unterminated',
    ],
)
def test_options_upterm_does_not_enforce_are_refused(options: str) -> None:
    with pytest.raises(KeyOptionError):
        parse_options(options)


def test_from_patterns_as_openssh_matches_them() -> None:
    patterns = ("10.0.0.0/8", "!10.9.9.9", "192.168.1.?", "2001:db8::/32")
    assert address_allowed(patterns, "10.1.2.3:5555")
    assert not address_allowed(patterns, "10.9.9.9:5555")  # negation wins
    assert address_allowed(patterns, "192.168.1.7:1")
    assert not address_allowed(patterns, "192.168.1.70:1")
    assert address_allowed(patterns, "[2001:db8::1]:22")
    assert not address_allowed(patterns, "203.0.113.5:22")
    assert not address_allowed(("*.example.com",), "203.0.113.5:22")  # no reverse lookups


def test_expiry_and_refusals() -> None:
    assert parse_expiry("20300101Z") == 1893456000.0
    assert parse_expiry("203001010930Z") == 1893490200.0
    with pytest.raises(KeyOptionError):
        parse_expiry("2030-01-01")
    expired = KeyRules(expires_at=time.time() - 1)
    assert "expired" in expired.refusal("10.0.0.1:1")
    assert "no-pty" in KeyRules(no_pty=True).refusal("10.0.0.1:1")
    limited = KeyRules(from_patterns=("10.0.0.0/8",))
    assert limited.refusal("10.0.0.1:1") == ""
    assert "may not join from 192.0.2.1" in limited.refusal("192.0.2.1:1")
    assert "end-to-end" in limited.refusal(None)  # the address is unknown: refused
    assert KeyRules().refusal(None) == ""
