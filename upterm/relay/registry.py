"""The relay's session table (sans-I/O): who registered which session, and who may replace it.

A registration belongs to the connection that made it (an opaque ``owner``); only that owner
may forward, cancel or release it. A proven registration (generation >= 1) may be replaced
only by a strictly newer generation of the same session, which is how a host that lost its
connection takes its session id back; the displaced owner is returned so the caller can
close it. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from upterm.wire import SUPERSEDED


class Superseded(Exception):
    """A registration that is not newer than the one already held."""

    def __init__(self) -> None:
        super().__init__(SUPERSEDED)


@dataclass
class Registration:
    """One hosted session as the relay knows it."""

    session_id: str
    node_addr: str
    host_user: str
    #: Wire blobs of the keys the host's inner server may present (its session key).
    host_key_blobs: tuple[bytes, ...]
    #: Wire blobs of the joiner keys the host allows; empty means any key.
    client_key_blobs: frozenset[bytes]
    generation: int
    owner: object
    forwarded: bool = field(default=False)
    #: Digests of the invite codes the host declared (upterm-invites@upterm.dev).
    invites: frozenset[bytes] = field(default_factory=frozenset)

    def allows_client(self, key_blob: bytes) -> bool:
        """Whether a joiner presenting ``key_blob`` may reach this session."""
        return not self.client_key_blobs or key_blob in self.client_key_blobs


class SessionTable:
    """In-memory table of one relay node's registrations."""

    def __init__(self) -> None:
        self._by_id: dict[str, Registration] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, session_id: str) -> Registration | None:
        """The registration for ``session_id``, if any."""
        return self._by_id.get(session_id)

    def would_accept(self, reg: Registration) -> bool:
        """Whether :meth:`register` would take ``reg`` now (asked before the cluster's
        registry is, so a refused registration changes nothing there)."""
        cur = self._by_id.get(reg.session_id)
        return cur is None or not (
            cur.owner is reg.owner or cur.generation == 0 or reg.generation <= cur.generation
        )

    def register(self, reg: Registration) -> object | None:
        """Add ``reg``; return the owner it displaced (to be disconnected), if any.

        Raises :class:`Superseded` if a registration of the same id is at least as new.
        """
        cur = self._by_id.get(reg.session_id)
        if cur is None:
            self._by_id[reg.session_id] = reg
            return None
        # Legacy (generation 0) registrations have random ids and no proof: nobody may take
        # them over. A proven one yields only to a strictly newer generation.
        if cur.owner is reg.owner or cur.generation == 0 or reg.generation <= cur.generation:
            raise Superseded()
        self._by_id[reg.session_id] = reg
        return cur.owner

    def mark_forwarded(self, session_id: str, owner: object) -> bool:
        """Record that ``owner`` forwards its session; False if not its own or already done."""
        cur = self._by_id.get(session_id)
        if cur is None or cur.owner is not owner or cur.forwarded:
            return False
        cur.forwarded = True
        return True

    def release(self, session_id: str, owner: object) -> bool:
        """Remove ``session_id`` if ``owner`` holds it; a successor's entry is never touched."""
        cur = self._by_id.get(session_id)
        if cur is None or cur.owner is not owner:
            return False
        del self._by_id[session_id]
        return True

    def owned_by(self, owner: object) -> list[str]:
        """Ids of every session ``owner`` holds."""
        return [sid for sid, reg in self._by_id.items() if reg.owner is owner]
