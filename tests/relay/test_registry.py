"""upterm/relay/registry.py: who may register, replace, forward and release a session."""

from __future__ import annotations

import pytest

from upterm.relay.registry import Registration, SessionTable, Superseded
from upterm.wire import SUPERSEDED


class Conn:
    """An opaque connection owner (identity matters, not equality)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Conn({self.name})"


def reg(
    owner: object,
    generation: int = 1,
    session_id: str = "sid",
    clients: frozenset[bytes] = frozenset(),
) -> Registration:
    return Registration(
        session_id=session_id,
        node_addr="10.0.0.1:22",
        host_user="alice",
        host_key_blobs=(b"hostkey",),
        client_key_blobs=clients,
        generation=generation,
        owner=owner,
    )


def test_register_and_get() -> None:
    table = SessionTable()
    a = Conn("a")
    r = reg(a)
    assert table.register(r) is None
    assert table.get("sid") is r
    assert table.get("other") is None
    assert len(table) == 1
    assert r.forwarded is False


def test_duplicate_from_same_owner_refused() -> None:
    table = SessionTable()
    a = Conn("a")
    first = reg(a, generation=1)
    table.register(first)
    with pytest.raises(Superseded) as info:
        table.register(reg(a, generation=2))
    assert str(info.value) == SUPERSEDED
    assert table.get("sid") is first


def test_same_generation_from_other_owner_refused() -> None:
    table = SessionTable()
    a, b = Conn("a"), Conn("b")
    first = reg(a, generation=5)
    table.register(first)
    with pytest.raises(Superseded):
        table.register(reg(b, generation=5))
    with pytest.raises(Superseded):
        table.register(reg(b, generation=4))
    assert table.get("sid") is first


def test_higher_generation_replaces_and_returns_old_owner() -> None:
    table = SessionTable()
    a, b = Conn("a"), Conn("b")
    table.register(reg(a, generation=1))
    newer = reg(b, generation=2)
    assert table.register(newer) is a
    assert table.get("sid") is newer
    assert len(table) == 1
    # And the displaced owner cannot come back with its old generation.
    with pytest.raises(Superseded):
        table.register(reg(a, generation=1))


def test_legacy_generation_zero_cannot_be_replaced() -> None:
    table = SessionTable()
    a, b = Conn("a"), Conn("b")
    legacy = reg(a, generation=0)
    table.register(legacy)
    with pytest.raises(Superseded):
        table.register(reg(b, generation=0))
    # Not even by a "proven" registration: a legacy session has no key to prove against.
    with pytest.raises(Superseded):
        table.register(reg(b, generation=5))
    assert table.get("sid") is legacy


def test_release_only_by_owner() -> None:
    table = SessionTable()
    a, b = Conn("a"), Conn("b")
    r = reg(a)
    table.register(r)
    assert table.release("sid", b) is False
    assert table.get("sid") is r
    assert table.release("sid", a) is True
    assert table.get("sid") is None
    assert len(table) == 0
    assert table.release("sid", a) is False
    assert table.release("missing", a) is False


def test_superseded_owner_release_never_deletes_successor() -> None:
    table = SessionTable()
    a, b = Conn("a"), Conn("b")
    table.register(reg(a, generation=1))
    successor = reg(b, generation=2)
    assert table.register(successor) is a
    assert table.release("sid", a) is False
    assert table.get("sid") is successor
    assert table.mark_forwarded("sid", a) is False
    assert successor.forwarded is False


def test_mark_forwarded_owner_only_and_once() -> None:
    table = SessionTable()
    a, b = Conn("a"), Conn("b")
    r = reg(a)
    table.register(r)
    assert table.mark_forwarded("sid", b) is False
    assert r.forwarded is False
    assert table.mark_forwarded("sid", a) is True
    assert r.forwarded is True
    assert table.mark_forwarded("sid", a) is False
    assert table.mark_forwarded("missing", a) is False


def test_owned_by() -> None:
    table = SessionTable()
    a, b = Conn("a"), Conn("b")
    table.register(reg(a, session_id="s1"))
    table.register(reg(a, session_id="s2"))
    table.register(reg(b, session_id="s3"))
    assert sorted(table.owned_by(a)) == ["s1", "s2"]
    assert table.owned_by(b) == ["s3"]
    assert table.owned_by(Conn("c")) == []
    table.register(reg(b, session_id="s1", generation=2))
    assert table.owned_by(a) == ["s2"]
    assert sorted(table.owned_by(b)) == ["s1", "s3"]


def test_owner_identity_not_equality() -> None:
    # Two owners that compare equal are still different connections.
    class Same(Conn):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

    table = SessionTable()
    a, a2 = Same("a"), Same("a")
    assert a == a2
    assert a is not a2
    table.register(reg(a))
    assert table.release("sid", a2) is False
    assert table.get("sid") is not None


def test_allows_client_empty_means_any() -> None:
    r = reg(Conn("a"))
    assert r.allows_client(b"anything")
    assert r.allows_client(b"")


def test_allows_client_with_keys() -> None:
    r = reg(Conn("a"), clients=frozenset({b"k1", b"k2"}))
    assert r.allows_client(b"k1")
    assert r.allows_client(b"k2")
    assert not r.allows_client(b"k3")
    assert not r.allows_client(b"")
    assert not r.allows_client(b"k")
