"""The host's consent: questions a joiner's requests put to the host, and what came of them.

A joiner waiting to be let in (``--approve``), a file transfer and a port forward are all
questions with the same answers (allow once, allow everything from this joiner, refuse),
asked in the host's attached terminal and answerable from any shell (``upterm session
approve|deny``). A question nobody can answer is refused, never allowed: the host must be
there to say yes.

What was asked and decided, and how many bytes then moved, is kept as :class:`Activity`
(``upterm session info``, the daemon's log, the recording).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from upterm.daemon.session import ClientInfo

#: File operations that change nothing and ask nobody: listing, stat, realpath, readlink.
#: Everything a joiner does to the host's files is one of these kinds.
TRANSFER_KINDS = frozenset(
    {
        "download",
        "upload",
        "overwrite",
        "remove",
        "rename",
        "mkdir",
        "rmdir",
        "chmod",
        "truncate",
        "link",
    }
)
#: Kinds that only read: the only ones read-only sessions and viewers may do.
READING_KINDS = frozenset({"download"})
#: Questions (transfers and forwards) that may wait for the host at once, per session, and
#: per joiner: more are refused at once. Each holds a request of the joiner's open and a
#: line in the host's view.
MAX_WAITING_QUESTIONS = 16
MAX_WAITING_PER_JOINER = 2
#: Activity kept for ``upterm session info`` (the log and the recording keep everything).
MAX_ACTIVITY_KEPT = 64

#: Who decided, as the audit says it.
BY_HOST = "the host"
BY_HOST_ALL = "the host (everything from this joiner)"
BY_HOST_BEFORE = "the host (this destination, earlier)"
BY_NOBODY = "nobody could answer (no host terminal attached)"
BY_TIMEOUT = "the host did not answer in time"
BY_TOO_MANY = "too many requests already wait for the host"
BY_JOINER_GONE = "the joiner left before the host answered"


@dataclass
class Question:
    """Something a joiner waits on the host for."""

    qid: str
    client: ClientInfo
    #: "join", a TRANSFER_KINDS kind, or "forward".
    kind: str
    #: The path(s) or destination, as the host reads it ("" for a join).
    what: str
    answer: asyncio.Future[str]
    asked_at: float = field(default_factory=time.time)

    @property
    def waiting(self) -> bool:
        """Whether the host has not answered yet."""
        return not self.answer.done()


@dataclass(frozen=True)
class Decision:
    """Whether a request may go ahead, and who said so (for the audit)."""

    allowed: bool
    by: str


@dataclass
class Activity:
    """One transfer or forward a joiner asked for: allowed or not, then its bytes."""

    client: ClientInfo
    kind: str
    what: str
    allowed: bool
    by: str
    at: float = field(default_factory=time.time)
    #: Bytes from the joiner (uploads, forwarded requests) and to it (downloads, replies).
    bytes_in: int = 0
    bytes_out: int = 0
    #: Over: refused, or the file closed, or the forwarded connection ended.
    ended: bool = False

    def describe(self) -> str:
        """One line for the host, the log and the recording."""
        who = f"{self.client.addr} ({self.client.fingerprint})"
        verdict = f"allowed by {self.by}" if self.allowed else f"refused: {self.by}"
        moved = ""
        if self.allowed and self.ended:
            moved = f", {_size(self.bytes_in + self.bytes_out)}"
        return f"{self.kind} {self.what} by {who}: {verdict}{moved}"

    def as_dict(self) -> dict[str, object]:
        """As ``upterm session info`` shows it (camelCase, as the rest of it)."""
        return {
            "client": self.client.client_id,
            "fingerprint": self.client.fingerprint,
            "addr": self.client.addr,
            "kind": self.kind,
            "what": self.what,
            "allowed": self.allowed,
            "by": self.by,
            "at": self.at,
            "bytesIn": self.bytes_in,
            "bytesOut": self.bytes_out,
            "open": self.allowed and not self.ended,
        }


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} GiB"


def group_of(kind: str) -> str:
    """What "allow everything from this joiner" covers: its transfers, or its forwards."""
    return "forward" if kind == "forward" else "transfer"
