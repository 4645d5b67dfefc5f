"""A shared terminal: one command on a PTY and every viewer attached to it.

Output fans out to each viewer without letting one stall another. The PTY is read as fast
as the fastest viewer takes it, never faster than every viewer can carry:

- A viewer that *paces* (the host's own attached terminal) pauses the PTY while its socket
  drains, as a real terminal would.
- With no such terminal attached, the PTY follows the fastest SSH joiner: it pauses while
  every joiner has a full send buffer, and reads on as soon as one drains. A joiner that
  makes no progress for ``JOINER_STALL_S`` stops counting (until it drains again), so a
  stopped joiner holds the command back for at most that long, once.
- Joiners slower than the pace skip ahead (see ``sshd.SKIP_AHEAD_BYTES``); a viewer whose
  backlog still grows past ``VIEWER_BACKLOG_LIMIT_BYTES`` is cut off with a message.

Following the fastest joiner matters for throughput: a session nobody watches locally would
otherwise read the PTY far faster than any SSH path carries it and every joiner would skip.
The PTY size is the smallest of the attached terminals whose viewers may type (a viewer
does not shrink it for everyone), recomputed whenever one joins, resizes, changes role or
leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from upterm.daemon.pty import PtyProcess
from upterm.daemon.recording import Recorder
from upterm.termstate import ScreenTracker

log = logging.getLogger(__name__)

#: A joiner with more unsent output than this is cut off. Joiners skip ahead well before
#: (see sshd.SKIP_AHEAD_BYTES): this is the safety net for a viewer that does not.
VIEWER_BACKLOG_LIMIT_BYTES = 4 << 20
#: A pacing viewer above this pauses the PTY until it drains.
PACE_HIGH_WATER_BYTES = 256 * 1024
#: A joiner with more unsent output than this is busy (also its channel's high-water mark,
#: so its ``resume_writing`` reports when it drains to a quarter of it).
FOLLOW_HIGH_WATER_BYTES = 256 * 1024
#: How long the PTY waits for a busy joiner to drain before reading on without it.
JOINER_STALL_S = 0.5
#: Recent output replayed to a new viewer so it does not start on a blank screen.
REPLAY_BYTES = 64 * 1024
CUT_OFF_MESSAGE = b"\r\nupterm: you fell too far behind the session's output; disconnected.\r\n"


class Viewer(Protocol):
    """Something that shows the session's output: a local terminal or an SSH joiner."""

    @property
    def viewer_id(self) -> str:
        """Unique within the session."""
        ...

    @property
    def paces(self) -> bool:
        """True if this viewer may hold the PTY back (the host's own terminal)."""
        ...

    def send(self, data: bytes) -> None:
        """Queue output; must not block."""
        ...

    def backlog(self) -> int:
        """Bytes queued but not yet delivered."""
        ...

    def finish(self, status: int) -> None:
        """The command ended with ``status``."""
        ...

    def cut_off(self, message: bytes) -> None:
        """Disconnect this viewer with ``message``."""
        ...


@dataclass(frozen=True)
class ClientInfo:
    """A connected joiner, as ``upterm session current`` lists it."""

    client_id: str
    version: str
    addr: str
    fingerprint: str
    #: "relay" (the relay vouched with a certificate; it sees the session) or "e2e".
    mode: str = "relay"
    #: The authorized-keys source the joiner's key came from, if any.
    source: str = ""
    joined_at: float = field(default_factory=time.time)


class Session:
    """The terminal core of a hosted session."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        cols: int,
        rows: int,
        size_policy: str = "smallest",
        pinned_size: tuple[int, int] | None = None,
    ) -> None:
        self.argv = tuple(argv)
        self._env = dict(env)
        self._size_policy = size_policy
        self._pinned = pinned_size
        if pinned_size is not None:
            cols, rows = pinned_size
        self._cwd = cwd
        self._size = (cols, rows)
        self._proc: PtyProcess | None = None
        self._viewers: dict[str, Viewer] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        #: What the output has left terminals in (to give a leaving viewer's back).
        self.screen = ScreenTracker()
        #: Viewers whose size does not count (those who cannot type), with the size they
        #: last asked for, kept in case they may type later.
        self._unsized: dict[str, tuple[int, int]] = {}
        self._pacing_blocked: set[str] = set()
        #: Joiners that made no progress within JOINER_STALL_S: not followed until drained.
        self._stalled: set[str] = set()
        self._stall_timer: asyncio.TimerHandle | None = None
        self._replay = bytearray()
        #: Set by the manager when the session is recorded.
        self.recorder: Recorder | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    # -- lifecycle --

    def start(self) -> None:
        """Start the command (raises :class:`UptermError` if it cannot run)."""
        cols, rows = self._size
        self._proc = PtyProcess(
            self.argv,
            env=self._env,
            cwd=self._cwd,
            cols=cols,
            rows=rows,
            on_output=self._output,
            on_exit=self._exit,
        )

    @property
    def started(self) -> bool:
        """Whether the command has been started."""
        return self._proc is not None

    @property
    def env(self) -> dict[str, str]:
        """The command's environment (forced commands start from it too)."""
        return dict(self._env)

    @property
    def cwd(self) -> str:
        """The command's working directory."""
        return self._cwd

    @property
    def pid(self) -> int | None:
        """The command's process id."""
        return self._proc.pid if self._proc else None

    def hangup(self) -> None:
        """End the session as a closed terminal would: SIGHUP to the command's group."""
        if self._proc is not None:
            self._proc.hangup()
        elif not self.exited.done():
            self._exit(129)

    def kill(self) -> None:
        """SIGKILL what is left of the command."""
        if self._proc is not None:
            self._proc.kill()

    def _exit(self, status: int) -> None:
        log.info("command %s exited with status %d", self.argv[0], status)
        for viewer in list(self._viewers.values()):
            viewer.finish(status)
        self._viewers.clear()
        self._sizes.clear()
        self._unsized.clear()
        self._cancel_stall_timer()
        if self._proc is not None:
            self._proc.close()
        if self.recorder is not None:
            self.recorder.close()
        if not self.exited.done():
            self.exited.set_result(status)

    # -- viewers --

    def attach(self, viewer: Viewer, cols: int, rows: int, sized: bool = True) -> None:
        """Add a viewer: it gets recent output, then everything live.

        ``sized``: whether its terminal's size counts for the shared terminal's. A viewer
        who cannot type (read-only, or the viewer role) does not shrink it for everyone.
        """
        if self.exited.done():
            viewer.finish(self.exited.result())
            return
        self._viewers[viewer.viewer_id] = viewer
        if not sized:
            self._unsized[viewer.viewer_id] = (cols, rows)
        replay = self.recent_output(REPLAY_BYTES)
        if replay:
            viewer.send(replay)
        before = self._size
        self.resize(viewer.viewer_id, cols, rows)
        if self._size == before and self._proc is not None:
            # No size change means no SIGWINCH from the kernel: nudge the program so a
            # full-screen one repaints for the newcomer.
            self._proc.redraw()
        self._maybe_resume()  # a newcomer can take output: the PTY need not wait

    def detach(self, viewer_id: str) -> None:
        """Remove a viewer; the PTY size is recomputed without it."""
        self._viewers.pop(viewer_id, None)
        self._unsized.pop(viewer_id, None)
        self._pacing_blocked.discard(viewer_id)
        self._stalled.discard(viewer_id)
        if self._sizes.pop(viewer_id, None) is not None:
            self._apply_size()
        self._maybe_resume()

    def resize(self, viewer_id: str, cols: int, rows: int) -> None:
        """A viewer's terminal changed size."""
        if viewer_id not in self._viewers:
            return
        if viewer_id in self._unsized:
            self._unsized[viewer_id] = (cols, rows)
            return
        self._sizes[viewer_id] = (cols, rows)
        self._apply_size()

    def set_sized(self, viewer_id: str, sized: bool) -> None:
        """Count a viewer's size for the shared terminal, or stop counting it (its role
        changed: typists count, viewers do not)."""
        if viewer_id not in self._viewers or sized == (viewer_id not in self._unsized):
            return
        if sized:
            self._sizes[viewer_id] = self._unsized.pop(viewer_id)
        else:
            self._unsized[viewer_id] = self._sizes.pop(viewer_id, self._size)
        self._apply_size()

    def _apply_size(self) -> None:
        if self._pinned is not None or not self._sizes:
            return
        sizes = list(self._sizes.values())
        pick = min
        if self._size_policy == "largest":
            pick = max
        elif self._size_policy == "host":
            local = [self._sizes[v] for v in self._sizes if self._viewers[v].paces]
            sizes = local or sizes
        size = (pick(c for c, _ in sizes), pick(r for _, r in sizes))
        if size != self._size:
            self._size = size
            if self._proc is not None:
                self._proc.resize(*size)
            if self.recorder is not None:
                self.recorder.resize(*size)

    @property
    def size(self) -> tuple[int, int]:
        """Current PTY size (cols, rows)."""
        return self._size

    def recent_output(self, limit: int) -> bytes:
        """The last ``limit`` bytes of output or fewer, starting where a terminal can start.

        Starting mid-stream could mean starting inside an escape sequence or a UTF-8
        character. The best start is just after a newline; with none in the window (a
        progress bar redrawn with carriage returns, a full-screen program that only moves
        the cursor), a carriage return or an escape sequence's first byte will do.
        """
        tail = bytes(self._replay[-limit:])
        if len(self._replay) > len(tail) or len(self._replay) >= REPLAY_BYTES:
            cut = tail.find(b"\n")
            if cut >= 0:
                return tail[cut + 1 :]
            starts = [i for i in (tail.find(b"\r"), tail.find(b"\x1b")) if i >= 0]
            return tail[min(starts) :] if starts else b""
        return tail

    def redraw(self) -> None:
        """Ask the foreground program to repaint (SIGWINCH)."""
        if self._proc is not None:
            self._proc.redraw()

    # -- data --

    def notify_host(self, message: bytes) -> None:
        """Show a notice in the host's own attached terminals only."""
        for viewer in list(self._viewers.values()):
            if viewer.paces:
                viewer.send(message)

    def broadcast(self, message: bytes) -> None:
        """Show every viewer a notice (not part of the command's output or replay)."""
        for viewer in list(self._viewers.values()):
            viewer.send(message)

    def input(self, data: bytes, who: str = "host") -> None:
        """Keystrokes from a viewer with the keyboard (``who``: "host" or a key fingerprint)."""
        if self._proc is not None:
            if self.recorder is not None:
                self.recorder.input(data, who)
            self._proc.write(data)

    def _output(self, data: bytes) -> None:
        if self.recorder is not None:
            self.recorder.output(data)
        self.screen.feed(data)
        self._replay += data
        if len(self._replay) > REPLAY_BYTES:
            del self._replay[: len(self._replay) - REPLAY_BYTES]
        # Whether some viewer can take more now (then the PTY need not wait): the same test
        # as _must_wait, made here from the backlogs this loop reads anyway.
        ready = False
        for viewer in list(self._viewers.values()):
            viewer.send(data)
            backlog = viewer.backlog()
            if viewer.paces:
                ready = True
                if backlog > PACE_HIGH_WATER_BYTES:
                    self._pacing_blocked.add(viewer.viewer_id)
            elif backlog > VIEWER_BACKLOG_LIMIT_BYTES:
                log.info("viewer %s fell %d bytes behind; cut off", viewer.viewer_id, backlog)
                self.detach(viewer.viewer_id)
                viewer.cut_off(CUT_OFF_MESSAGE)
            elif backlog <= FOLLOW_HIGH_WATER_BYTES and viewer.viewer_id not in self._stalled:
                ready = True
        if ready and not self._pacing_blocked:
            return
        if self._proc is not None and self._must_wait():
            self._proc.pause_output()
            if not self._pacing_blocked and self._stall_timer is None:
                self._stall_timer = asyncio.get_running_loop().call_later(
                    JOINER_STALL_S, self._joiners_stalled
                )

    def _must_wait(self) -> bool:
        """Whether reading the PTY now would outrun every viewer."""
        if self._pacing_blocked:
            return True
        viewers = self._viewers.values()
        if any(v.paces for v in viewers):
            return False  # the host's terminal keeps up: the PTY goes at its pace
        followed = [v for v in viewers if v.viewer_id not in self._stalled]
        return bool(followed) and all(v.backlog() > FOLLOW_HIGH_WATER_BYTES for v in followed)

    def _joiners_stalled(self) -> None:
        self._stall_timer = None
        for viewer in self._viewers.values():
            if not viewer.paces and viewer.backlog() > FOLLOW_HIGH_WATER_BYTES:
                log.info("viewer %s made no progress; no longer waited for", viewer.viewer_id)
                self._stalled.add(viewer.viewer_id)
        self._maybe_resume()

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def drained(self, viewer_id: str) -> None:
        """A viewer's backlog fell below its low-water mark: it can take more."""
        self._pacing_blocked.discard(viewer_id)
        self._stalled.discard(viewer_id)
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if self._proc is not None and not self._must_wait():
            self._cancel_stall_timer()
            self._proc.resume_output()
