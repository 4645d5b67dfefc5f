"""upterm join reads the printed lines (sans-I/O): targets, the pinned host key, backoff."""

from __future__ import annotations

import pytest

from upterm.ctl.join import MAX_WAIT_S, backoff, parse_line
from upterm.errors import UsageError
from upterm.keys import Ed25519Key


def test_relay_and_end_to_end_lines() -> None:
    plain = parse_line("ssh abc:MTI3@relay.example.com -p 2222")
    assert plain.argv == ["abc:MTI3@relay.example.com", "-p", "2222"] and not plain.end_to_end
    key = Ed25519Key.generate()
    pub = key.public_line().decode().strip()
    e2e = parse_line(
        f"ssh -J abc@relay:2222 -o KnownHostsCommand='/bin/echo upterm {pub}' abc@upterm"
    )
    assert e2e.end_to_end and e2e.host_key is not None
    assert e2e.host_key.fingerprint == key.public.fingerprint
    assert e2e.argv[0] == "-J"


@pytest.mark.parametrize("bad", ["", "ls -l", "ssh", "ssh -p 22", "ssh 'unterminated"])
def test_what_is_not_a_join_line(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_line(bad)


def test_backoff_doubles_to_a_ceiling_with_jitter() -> None:
    assert backoff(1, lambda: 1.0) == 1.0 and backoff(1, lambda: 0.0) == 0.5
    assert backoff(3, lambda: 1.0) == 4.0
    assert backoff(20, lambda: 1.0) == MAX_WAIT_S
