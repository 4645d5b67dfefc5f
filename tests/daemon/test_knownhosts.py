"""upterm/daemon/knownhosts.py: trust on first use, changed-key refusal, pinned keys."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from upterm.daemon.knownhosts import RelayTrust, known_hosts_name
from upterm.errors import HostKeyChanged
from upterm.keys import Ed25519Key

NAME = "[127.0.0.1]:2222"


def _entry(name: str, key: Ed25519Key) -> bytes:
    return name.encode() + b" " + key.public.authorized_key_line()


def test_known_hosts_name() -> None:
    assert known_hosts_name("h", 22) == "h"
    assert known_hosts_name("h", 2222) == "[h]:2222"
    assert known_hosts_name("127.0.0.1", 2222) == NAME


def test_missing_file_records_key(tmp_path: Path) -> None:
    key = Ed25519Key.generate()
    path = tmp_path / "sub" / "known_hosts"
    trust = RelayTrust(NAME, known_hosts=path)
    assert trust.check(key.public.blob) is True
    assert trust.accepted == key.public.blob
    text = path.read_text()
    assert text.splitlines() == [f"{NAME} {key.public_line().decode()}"]
    assert text.startswith("[127.0.0.1]:2222 ssh-ed25519 AAAA")
    assert text.endswith("\n")
    assert trust.warnings == [
        "Warning: Permanently added '[127.0.0.1]:2222' (ED25519) to the list of known hosts."
    ]


def test_second_check_same_key_adds_nothing(tmp_path: Path) -> None:
    key = Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    RelayTrust(NAME, known_hosts=path).check(key.public.blob)
    before = path.read_bytes()
    again = RelayTrust(NAME, known_hosts=path)
    assert again.check(key.public.blob) is True
    assert again.accepted == key.public.blob
    assert again.warnings == []
    assert path.read_bytes() == before
    assert len(before.splitlines()) == 1


def test_second_check_same_key_port_22(tmp_path: Path) -> None:
    key = Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    RelayTrust("relay.example", known_hosts=path).check(key.public.blob)
    again = RelayTrust("relay.example", known_hosts=path)
    assert again.check(key.public.blob) is True
    assert again.warnings == []
    assert path.read_bytes() == _entry("relay.example", key)


def test_changed_key_refused(tmp_path: Path) -> None:
    old, new = Ed25519Key.generate(), Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    path.write_bytes(b"# comment\n\n" + _entry("other.example", new) + _entry(NAME, old))
    before = path.read_bytes()
    trust = RelayTrust(NAME, known_hosts=path)
    with pytest.raises(HostKeyChanged) as info:
        trust.check(new.public.blob)
    message = str(info.value)
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in message
    assert f"{path}:4" in message
    assert new.public.fingerprint in message
    assert old.public.fingerprint in message
    assert trust.accepted is None
    assert trust.warnings == []
    assert path.read_bytes() == before


def test_changed_key_refused_port_22(tmp_path: Path) -> None:
    old, new = Ed25519Key.generate(), Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    path.write_bytes(_entry("relay.example", old))
    with pytest.raises(HostKeyChanged) as info:
        RelayTrust("relay.example", known_hosts=path).check(new.public.blob)
    assert f"{path}:1" in str(info.value)


def test_key_recorded_by_first_use_is_enforced(tmp_path: Path) -> None:
    # Trust on first use, then a different key for the same relay must be refused.
    old, new = Ed25519Key.generate(), Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    assert RelayTrust(NAME, known_hosts=path).check(old.public.blob) is True
    with pytest.raises(HostKeyChanged):
        RelayTrust(NAME, known_hosts=path).check(new.public.blob)
    assert path.read_bytes() == _entry(NAME, old)


def test_hashed_entry_matched(tmp_path: Path) -> None:
    old, new = Ed25519Key.generate(), Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    path.write_bytes(_entry(NAME, old))
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)
    hashed = path.read_bytes()
    assert hashed.startswith(b"|1|")
    assert b"127.0.0.1" not in hashed
    same = RelayTrust(NAME, known_hosts=path)
    assert same.check(old.public.blob) is True
    assert same.warnings == []
    assert path.read_bytes() == hashed
    with pytest.raises(HostKeyChanged) as info:
        RelayTrust(NAME, known_hosts=path).check(new.public.blob)
    assert f"{path}:1" in str(info.value)


def test_hashed_entry_for_port_22(tmp_path: Path) -> None:
    old, new = Ed25519Key.generate(), Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    path.write_bytes(_entry("relay.example", old))
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)
    assert RelayTrust("relay.example", known_hosts=path).check(old.public.blob) is True
    with pytest.raises(HostKeyChanged):
        RelayTrust("relay.example", known_hosts=path).check(new.public.blob)


def test_other_host_line_ignored(tmp_path: Path) -> None:
    mine, theirs = Ed25519Key.generate(), Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    path.write_bytes(
        _entry("[127.0.0.1]:2223", theirs)
        + _entry("127.0.0.1", theirs)
        + _entry("[127.0.0.2]:2222", theirs)
    )
    trust = RelayTrust(NAME, known_hosts=path)
    assert trust.check(mine.public.blob) is True
    assert len(trust.warnings) == 1
    assert path.read_bytes().splitlines()[-1] == _entry(NAME, mine).rstrip(b"\n")
    assert len(path.read_bytes().splitlines()) == 4


def test_comma_list_and_markers(tmp_path: Path) -> None:
    old, new = Ed25519Key.generate(), Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    path.write_bytes(
        b"@cert-authority * "
        + new.public.authorized_key_line()
        + _entry("alias,relay.example", old)
    )
    with pytest.raises(HostKeyChanged) as info:
        RelayTrust("relay.example", known_hosts=path).check(new.public.blob)
    assert f"{path}:2" in str(info.value)


def test_malformed_line_for_host_is_skipped(tmp_path: Path) -> None:
    # OpenSSH skips a line it cannot parse; it must not stop the relay from being trusted.
    key = Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    path.write_bytes(b"relay.example ssh-ed25519 not-base64!\n" + _entry("relay.example", key))
    trust = RelayTrust("relay.example", known_hosts=path)
    assert trust.check(key.public.blob) is True
    assert trust.warnings == []


def test_pinned_accepts_only_pinned_and_touches_no_file(tmp_path: Path) -> None:
    key, other = Ed25519Key.generate(), Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    trust = RelayTrust(NAME, known_hosts=path, pinned=key.public.blob)
    assert trust.check(other.public.blob) is False
    assert trust.accepted is None
    assert trust.check(key.public.blob) is True
    assert trust.accepted == key.public.blob
    assert trust.warnings == []
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_pinned_ignores_existing_file(tmp_path: Path) -> None:
    key, other = Ed25519Key.generate(), Ed25519Key.generate()
    path = tmp_path / "known_hosts"
    path.write_bytes(_entry(NAME, other))
    before = path.read_bytes()
    trust = RelayTrust(NAME, known_hosts=path, pinned=key.public.blob)
    assert trust.check(key.public.blob) is True  # no HostKeyChanged from the file
    assert trust.check(other.public.blob) is False
    assert path.read_bytes() == before


def test_pinned_without_file() -> None:
    key = Ed25519Key.generate()
    trust = RelayTrust(NAME, pinned=key.public.blob)
    assert trust.check(key.public.blob) is True
    assert trust.check(b"") is False
