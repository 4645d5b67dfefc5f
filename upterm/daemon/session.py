"""A shared terminal: one command on a PTY and every viewer attached to it.

Output fans out to each viewer without letting one stall another. The PTY is read as fast
as the fastest viewer takes it, never faster than every viewer can carry:

- A viewer that *paces* (the host's own attached terminal) pauses the PTY while its socket
  drains, as a real terminal would.
- With no such terminal attached, the PTY follows the fastest SSH joiner: it pauses while
  every joiner has a full send buffer, and reads on as soon as one drains. A joiner that
  makes no progress for ``JOINER_STALL_S`` stops counting (until it drains again), so a
  stopped joiner holds the command back for at most that long, once.
- Joiners slower than the pace skip ahead (see ``sshd.SKIP_AHEAD_BYTES``), and all of them
  during a flood with FLOOD_VIEWERS or more terminals watching: while the output streams
  on they get the current screen ten times a second instead of the stream, then a clean
  screen and live output once it calms (``sshd.GuestSession._frame``); a viewer whose
  backlog still grows past ``VIEWER_BACKLOG_LIMIT_BYTES`` is cut off with a message.

Following the fastest joiner matters for throughput: a session nobody watches locally would
otherwise read the PTY far faster than any SSH path carries it and every joiner would skip.
The PTY size is the smallest of the attached terminals whose viewers may type (a viewer
does not shrink it for everyone), recomputed whenever one joins, resizes, changes role or
leaves.

Every terminal shows the same screen (:mod:`upterm.termstate` follows the output's state):

- A newcomer gets a clean screen, the normal screen's recent output, the alternate screen's
  if a program is on it, then every mode the program set; a SIGWINCH makes it repaint.
- Terminal queries in the output go to one viewer (the host's terminal, else one typist);
  the others get the output without them, so exactly one answer reaches the program.
- Notices (someone joined, you are a viewer now) never write over the program: on a shell
  line they go above it and the line is written again below; otherwise they wait, shown in
  the terminal's title meanwhile, until the program is back on the normal screen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from upterm.daemon.pty import READ_BATCH_BYTES, PtyProcess
from upterm.daemon.recording import Recorder
from upterm.termstate import (
    MAX_LINE,
    SANE_MODES,
    TerminalState,
    addresses_cursor,
    line_redrawable,
    strip_spans,
)

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
#: This many full PTY reads in a row make a flood (see Session._output) ...
FLOOD_READS = 4
#: ... which puts every joiner on frames at once when this many terminals watch (fewer are
#: streamed to, each skipping ahead only when it falls behind).
FLOOD_VIEWERS = 4
#: Recent output replayed to a new viewer so it does not start on a blank screen.
REPLAY_BYTES = 64 * 1024
CUT_OFF_MESSAGE = b"\r\nupterm: you fell too far behind the session's output; disconnected.\r\n"
#: A sequence cut at the end of a read is shown anyway if its end has not come by then.
PARTIAL_HOLD_S = 0.05
#: Notices kept for a viewer while they cannot be shown (the oldest are dropped, counted).
MAX_HELD_NOTICES = 16
#: Clears a terminal's screen and homes its cursor, modes at their start (before a replay).
_CLEAN_SCREEN = SANE_MODES + b"\x1b[H\x1b[2J"
#: Makes the scroll region the whole screen, the cursor where it was.
_WHOLE_REGION = b"\x1b7\x1b[r\x1b8"
#: Text whose column is its offset in the line (every byte one cell wide, no control).
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F))
#: xterm's title stack: keep the terminal's title while ours shows a waiting notice.
_PUSH_TITLE = b"\x1b[22;2t"
_POP_TITLE = b"\x1b[23;2t"


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

    #: When anyone last typed into any session of this daemon (monotonic): file transfers
    #: yield to a terminal in use (upterm.daemon.transfer).
    last_input_at: float = 0.0

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
        #: What the output has set on its terminal: given to newcomers, taken from leavers.
        self.screen = TerminalState()
        #: Recent output of each screen (normal, alternate), and whether it lost its start.
        self._logs = (bytearray(), bytearray())
        self._trimmed = [False, False]
        #: Bytes ever logged per screen, and where (in those) the run of plain text holding
        #: each log's first byte began, and whether at a line's start (after a CR): a
        #: replay that starts inside a long line starts in the right column.
        self._logged = [0, 0]
        self._plain_start = [0, 0]
        self._plain_at_col0 = [True, True]
        #: Output bytes ever shown (joiners skipping ahead watch it grow), and full PTY
        #: reads in a row (a command writing faster than the output is handed out).
        self.output_bytes = 0
        self._full_reads = 0
        #: What each screen's current line (since its last newline) was written with.
        self._lines = (bytearray(), bytearray())
        self._partial_timer: asyncio.TimerHandle | None = None
        #: Notices waiting for a moment they can be shown without covering the program.
        self._held: dict[str, list[str]] = {}
        self._dropped: dict[str, int] = {}
        #: Viewers whose title shows a waiting notice (their own title pushed).
        self._titled: set[str] = set()
        #: Whether the normal screen's last output addressed the cursor (see _show).
        self._addressed = False
        #: Viewers told their terminal is smaller than the shared one.
        self._told_small: set[str] = set()
        #: Said to joiners after their terminal is given back when the session ends.
        self.farewell = b""
        #: Viewers whose size does not count (those who cannot type), with the size they
        #: last asked for, kept in case they may type later.
        self._unsized: dict[str, tuple[int, int]] = {}
        self._pacing_blocked: set[str] = set()
        #: Joiners that made no progress within JOINER_STALL_S: not followed until drained.
        self._stalled: set[str] = set()
        self._stall_timer: asyncio.TimerHandle | None = None
        #: Set by the manager when the session is recorded.
        self.recorder: Recorder | None = None
        #: Held for want of moderators (see set_moderation_hold).
        self.moderation_held = False
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
        if self.moderation_held:
            self._proc.pause_output()

    def set_moderation_hold(self, held: bool) -> None:
        """Hold the session for want of moderators: no input reaches the command, and its
        output stays unread (it blocks once the PTY buffer fills) until released. Takes
        effect now, before anything else the event loop does."""
        self.moderation_held = held
        if self._proc is None:
            return
        if held:
            self._proc.pause_output()
        else:
            self._maybe_resume()

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
        if self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None
        self._held.clear()
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
        catch_up = self.catch_up(REPLAY_BYTES)
        if catch_up:
            viewer.send(catch_up)
        before = self._size
        self.resize(viewer.viewer_id, cols, rows)
        if self._size == before and self._proc is not None:
            # No size change means no SIGWINCH from the kernel: nudge the program so a
            # full-screen one repaints for the newcomer.
            self._proc.redraw()
        self._tell_small()
        self._maybe_resume()  # a newcomer can take output: the PTY need not wait

    def catch_up(self, limit: int) -> bytes:
        """What brings a terminal to show what the program's terminal shows now.

        A clean screen, the normal screen's last ``limit`` bytes of output, the alternate
        screen's if a program is on it (so the screen under it is right when it leaves),
        then every mode, character set, scroll region and title the program set. Nothing
        before the first output (the host's own terminal keeps what upterm printed).
        """
        term = self.screen
        normal = self._clean_tail(0, limit)
        if not normal and not term.alternate and not self._logs[0]:
            return b""
        out = bytearray(_CLEAN_SCREEN)
        out += normal
        if term.alternate:
            out += b"\x1b[?1049h\x1b[H\x1b[2J"
            out += self._clean_tail(1, limit)
        out += term.modes_sequence()
        return bytes(out)

    def detach(self, viewer_id: str) -> None:
        """Remove a viewer; the PTY size is recomputed without it."""
        self._viewers.pop(viewer_id, None)
        self._unsized.pop(viewer_id, None)
        self._held.pop(viewer_id, None)
        self._dropped.pop(viewer_id, None)
        self._titled.discard(viewer_id)
        self._told_small.discard(viewer_id)
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
        else:
            self._sizes[viewer_id] = (cols, rows)
            self._apply_size()
        self._tell_small()

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
            if self.screen.region is not None:
                # A real terminal makes its scroll region whole when it changes size; the
                # viewers' terminals did not change, so they are told (a region set for a
                # small joiner must not stay on the host's terminal after it left).
                self.screen.resized()
                for viewer in list(self._viewers.values()):
                    viewer.send(_WHOLE_REGION)
                # Newcomers are replayed the region being set: the reset goes with it.
                for i, screen_log in enumerate(self._logs):
                    if screen_log:
                        screen_log += _WHOLE_REGION
                        self._logged[i] += len(_WHOLE_REGION)
        self._tell_small()

    def _tell_small(self) -> None:
        """Tell each viewer smaller than the shared terminal, once, what to do about it."""
        cols, rows = self._size
        for viewer_id in list(self._viewers):
            size = self._sizes.get(viewer_id) or self._unsized.get(viewer_id)
            if size is None or viewer_id in self._told_small:
                continue
            if size[0] < cols or size[1] < rows:
                self._told_small.add(viewer_id)
                fix = "make your window larger"
                if (
                    self._size_policy != "smallest"
                    and self._pinned is None
                    and viewer_id not in self._unsized
                ):
                    fix += " (or the host can share with --size-policy smallest)"
                self.notice(
                    [viewer_id],
                    f"your terminal ({size[0]}x{size[1]}) is smaller than the shared one "
                    f"({cols}x{rows}): full-screen programs will look wrong; {fix}",
                )

    @property
    def viewer_count(self) -> int:
        """Terminals attached now (the host's and joiners')."""
        return len(self._viewers)

    @property
    def size(self) -> tuple[int, int]:
        """Current PTY size (cols, rows)."""
        return self._size

    def recent_output(self, limit: int) -> bytes:
        """The last ``limit`` bytes of output to the screen shown now, from a clean start."""
        return self._clean_tail(1 if self.screen.alternate else 0, limit)

    def _clean_tail(self, screen: int, limit: int) -> bytes:
        """The last ``limit`` bytes of a screen's output or fewer, starting where a terminal
        can start.

        Starting mid-stream could mean starting inside an escape sequence or a UTF-8
        character. The best start is just after a newline; with none in the window (a
        progress bar redrawn with carriage returns, a full-screen program that only moves
        the cursor), a carriage return or an escape sequence's first byte will do.
        """
        log = self._logs[screen]
        tail = bytes(log[-limit:])
        if len(log) > len(tail) or self._trimmed[screen]:
            cut = tail.find(b"\n")
            if cut >= 0:
                return self._long_line_start(screen, log, tail, cut) or tail[cut + 1 :]
            within = self._long_line_start(screen, log, tail, len(tail))  # still going on
            if within:
                return within
            starts = [i for i in (tail.find(b"\r"), tail.find(b"\x1b")) if i >= 0]
            return tail[min(starts) :] if starts else b""
        return tail

    @staticmethod
    def _plain_run(data: bytes | bytearray) -> tuple[int, bool] | None:
        """Where the run of plain text at the end of ``data`` starts, and whether that is a
        line's start (after a CR, or CR LF); None when ``data`` is all plain text."""
        start = len(data.rstrip(_PRINTABLE_ASCII))
        if start == 0:
            return None
        last = data[start - 1]
        return start, last == 13 or (last == 10 and start >= 2 and data[start - 2] == 13)

    def _long_line_start(self, screen: int, log: bytearray, tail: bytes, cut: int) -> bytes:
        """The tail from inside the line it begins in, when that line alone fills the screen
        (``cat`` of a file without newlines, a 64 MiB flood): starting after its newline
        would show none of it. Only for plain text from a line's start, whose column is its
        offset modulo the width: the tail then starts at a column 0, and wraps as it did.
        b"" when this does not apply."""
        cols, rows = self._size
        head = tail[:cut].removesuffix(b"\r")  # a CR just before the newline moves nothing
        if len(head) < cols * rows or head.translate(None, _PRINTABLE_ASCII):
            return b""
        log_start = self._logged[screen] - len(log)
        plain = self._plain_run(log[: len(log) - len(tail)])
        if plain is not None:
            start, at_col0 = log_start + plain[0], plain[1]
        else:
            start, at_col0 = self._plain_start[screen], self._plain_at_col0[screen]
        if not at_col0:
            return b""
        first = self._logged[screen] - len(tail)  # where the tail begins, in all output
        return tail[(start - first) % cols :]

    def redraw(self) -> None:
        """Ask the foreground program to repaint (SIGWINCH)."""
        if self._proc is not None:
            self._proc.redraw()

    # -- data --

    def notify_host(self, text: str, *, urgent: bool = False) -> None:
        """Show a notice in the host's own attached terminals only."""
        self.notice([v.viewer_id for v in self._viewers.values() if v.paces], text, urgent=urgent)

    @property
    def viewer_ids(self) -> list[str]:
        """Every attached terminal, the host's and the joiners'."""
        return list(self._viewers)

    def tell_joiners(self, text: str) -> None:
        """A notice for every joiner's terminal (not the host's)."""
        self.notice([k for k, v in self._viewers.items() if not v.paces], text)

    def broadcast(self, text: str) -> None:
        """Say something to everyone as the session ends: a notice on the host's terminals,
        and to each joiner once its terminal is given back (a notice there could be lost on
        a full-screen program's screen)."""
        self.notify_host(text)
        self.farewell = f"\r\nupterm: {text}.\r\n".encode()

    def notice(self, viewer_ids: Iterable[str], text: str, *, urgent: bool = False) -> None:
        """Tell viewers something without covering what the program shows.

        On a shell line (nothing but text and colours since the last newline, narrower than
        the screen) the notice is written above the line, which is written again below it.
        Otherwise (a full-screen program, a line drawn with cursor moves) it waits until the
        program is back on such a line, shown in the terminal's title meanwhile. ``urgent``
        (the host must answer) rings the bell too.
        """
        for viewer_id in viewer_ids:
            viewer = self._viewers.get(viewer_id)
            if viewer is None:
                continue
            held = self._held.setdefault(viewer_id, [])
            held.append(text)
            if len(held) > MAX_HELD_NOTICES:
                del held[0]
                self._dropped[viewer_id] = self._dropped.get(viewer_id, 0) + 1
            if self._notice_fits(viewer_id):
                self._show_notices(viewer_id, viewer, urgent)
                continue
            out = bytearray(b"\x07" if urgent else b"")
            if viewer_id not in self._titled:
                self._titled.add(viewer_id)
                out += _PUSH_TITLE
            out += b"\x1b]2;[upterm: " + text.encode() + b"]\x07"
            viewer.send(bytes(out))

    def title_notice(self, viewer_id: str, text: str) -> bytes:
        """Bytes that show ``text`` in a viewer's title (its own title kept on the
        terminal's stack), for a passing state that must not add a line to the screen."""
        out = bytearray()
        if viewer_id not in self._titled:
            self._titled.add(viewer_id)
            out += _PUSH_TITLE
        out += b"\x1b]2;[upterm: " + text.encode() + b"]\x07"
        return bytes(out)

    def title_restored(self, viewer_id: str) -> bytes:
        """Bytes that give a viewer its title back after :meth:`title_notice` (b"" while
        notices still wait there)."""
        if viewer_id not in self._titled or viewer_id in self._held:
            return b""
        self._titled.discard(viewer_id)
        title = self.screen.title
        return _POP_TITLE + (b"\x1b]2;" + title + b"\x07" if title is not None else b"")

    def _notice_fits(self, viewer_id: str) -> bool:
        """Whether a notice can be shown now on this viewer without covering the program."""
        term = self.screen
        if term.alternate or not term.region_whole(self._size[1]):
            return False
        if self._addressed and not (self._proc is not None and self._proc.foreground_is_shell()):
            return False  # a program draws on the normal screen (top); a shell's prompt is fine
        cols = self._size[0]
        size = self._sizes.get(viewer_id) or self._unsized.get(viewer_id)
        if size is not None:
            cols = min(cols, size[0])
        return line_redrawable(bytes(self._lines[0]), cols)

    def _show_notices(self, viewer_id: str, viewer: Viewer, urgent: bool = False) -> None:
        texts = self._held.pop(viewer_id, [])
        dropped = self._dropped.pop(viewer_id, 0)
        out = bytearray(b"\x07" if urgent else b"")
        if viewer_id in self._titled:
            self._titled.discard(viewer_id)
            out += _POP_TITLE
            if self.screen.title is not None:
                out += b"\x1b]2;" + self.screen.title + b"\x07"
        if dropped:
            texts.insert(0, f"{dropped} earlier notices not shown")
        for text in texts:
            out += b"\r\x1b[2K\x1b[0m[upterm: " + text.encode() + b"]\r\n"
        out += self._lines[0]
        viewer.send(bytes(out))

    def _show_held(self) -> None:
        for viewer_id in list(self._held):
            viewer = self._viewers.get(viewer_id)
            if viewer is None:
                self._held.pop(viewer_id, None)
            elif self._notice_fits(viewer_id):
                self._show_notices(viewer_id, viewer)

    def input(self, data: bytes, who: str = "host") -> None:
        """Keystrokes from a viewer with the keyboard (``who``: "host" or a key fingerprint)."""
        Session.last_input_at = time.monotonic()
        if self.moderation_held:
            return  # a moderated session without its moderators takes no input, anyone's
        proc = self._proc
        if proc is not None:
            if self.recorder is None:
                proc.write(data)
                return
            # Asked before and after the write: a program turning echo off for a password
            # (bash's read -s prints its prompt first) can do so in between, and what it
            # then reads unechoed must not be recorded as ordinary typing.
            secret = proc.reading_secret()
            proc.write(data)
            self.recorder.input(data, who, secret=secret or proc.reading_secret())

    def _answerer(self) -> str | None:
        """The one viewer shown terminal queries: the host's terminal, else the first typist."""
        typist = None
        for viewer_id, viewer in self._viewers.items():
            if viewer.paces:
                return viewer_id
            if typist is None and viewer_id not in self._unsized:
                typist = viewer_id
        return typist

    def _output(self, data: bytes) -> None:
        self.output_bytes += len(data)
        # Full reads one after another: the command writes faster than the output is handed
        # out. With many terminals watching, joiners then take the screen now and then
        # instead of the stream (the daemon would otherwise encrypt the flood once per
        # joiner, and hold the command back doing it).
        self._full_reads = self._full_reads + 1 if len(data) >= READ_BATCH_BYTES else 0
        if self._full_reads == FLOOD_READS and len(self._viewers) >= FLOOD_VIEWERS:
            for viewer in list(self._viewers.values()):
                skip = getattr(viewer, "skip_ahead", None)
                if skip is not None:
                    skip()
        if self.recorder is not None:
            self.recorder.output(data)
        shown = self.screen.feed(data)
        if shown:
            self._show(shown)
        if self.screen.holding and self._partial_timer is None:
            self._partial_timer = asyncio.get_running_loop().call_later(
                PARTIAL_HOLD_S, self._flush_partial
            )

    def _flush_partial(self) -> None:
        self._partial_timer = None
        held = self.screen.flush()
        if held:
            self._show(held)

    def _log(self, screen: int, data: bytes) -> None:
        """Keep output shown on a screen: its recent bytes, and its current line's."""
        if not data:
            return
        log_ = self._logs[screen]
        log_ += data
        self._logged[screen] += len(data)
        excess = len(log_) - REPLAY_BYTES
        if excess > 0:
            removed = log_[:excess]
            plain = self._plain_run(removed)
            if plain is not None:
                self._plain_start[screen] = self._logged[screen] - len(log_) + plain[0]
                self._plain_at_col0[screen] = plain[1]
            del log_[:excess]
            self._trimmed[screen] = True
        line = self._lines[screen]
        newline = data.rfind(b"\n")
        if newline >= 0:
            line[:] = data[newline + 1 : newline + 1 + MAX_LINE]
        elif len(line) < MAX_LINE:
            line += data[: MAX_LINE - len(line)]

    def _note_addressing(self, normal: bytes, addressed: bool) -> None:
        """A program drawing with cursor addressing on the normal screen (top) holds notices
        until plain lines come again (a shell's prompt after it exits)."""
        if addressed:
            self._addressed = True
        elif b"\n" in normal:
            self._addressed = False

    def _show(self, data: bytes) -> None:
        """Show a read of output to every viewer (queries to one) and keep it for newcomers."""
        term = self.screen
        shown = data
        answerer = None
        if term.queries:
            shown = strip_spans(data, term.queries)
            answerer = self._answerer()
            if answerer is None and term.answers and self._proc is not None:
                self._proc.write(b"".join(term.answers))  # nobody can answer: we do
        if term.switches:
            switches = term.switches
            if term.queries:
                switches = [
                    (_after_strip(a, term.queries), _after_strip(b, term.queries), on)
                    for a, b, on in switches
                ]
            screen = 0 if switches[0][2] else 1
            pos = 0
            for start, end, on in switches:
                self._log(screen, shown[pos:start])
                if screen == 0:
                    self._note_addressing(shown[pos:start], addresses_cursor(shown[pos:start]))
                screen = 1 if on else 0
                if on:  # a new alternate screen: nothing before it is on it
                    self._logs[1].clear()
                    self._lines[1].clear()
                    self._trimmed[1] = False
                    self._plain_start[1] = self._logged[1]
                    self._plain_at_col0[1] = True  # the switch homes the cursor
                pos = end
            self._log(screen, shown[pos:])
            if screen == 0:
                self._note_addressing(shown[pos:], addresses_cursor(shown[pos:]))
        else:
            self._log(1 if term.alternate else 0, shown)
            if not term.alternate:
                self._note_addressing(shown, term.addressed)
        # Whether some viewer can take more now (then the PTY need not wait): the same test
        # as _must_wait, made here from the backlogs this loop reads anyway.
        ready = False
        for viewer in list(self._viewers.values()):
            viewer.send(data if viewer.viewer_id == answerer else shown)
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
        if self._held:
            self._show_held()
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
        if self._pacing_blocked or self.moderation_held:
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


def _after_strip(offset: int, spans: list[tuple[int, int]]) -> int:
    """Where ``offset`` lands once ``spans`` (before it, not overlapping it) are removed."""
    return offset - sum(end - start for start, end in spans if end <= offset)
