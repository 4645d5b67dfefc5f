"""Recording a session as asciicast v2 (what ``asciinema play`` plays).

One JSON header line, then one JSON event per line: ``[seconds, "o", text]`` for output,
``[seconds, "r", "COLSxROWS"]`` for resizes, and markers ``[seconds, "m", text]`` for who
typed, file transfers and forwards. Text is decoded incrementally, so a character split
across two reads is not mangled.

What people type is kept as little as it can be:

- by default only who typed and how much: a marker "WHO typed N bytes" for each burst of
  typing (one typist, pauses under BURST_GAP_S);
- with input recording, the keystrokes themselves (``[seconds, "i", text]``), each typist's
  preceded by a marker "typed by WHO";
- never while the terminal reads a line with echo off (a password, a passphrase: getpass,
  ``read -s``, sudo, ssh), whatever the flags: then only a marker "WHO typed with echo off
  (not recorded)". Line editors and full-screen programs (readline, vim) also turn echo
  off, but with line editing, and echo what they show themselves; their keystrokes are
  kept as above. A program that reads a secret that way too (sudo with ``pwfeedback``) is
  not told apart: its keystrokes are recorded with input recording on.

Events are written as whole lines (``os.write`` of what a second collected): if the disk
fills, the file is cut back to its last whole event, so it still plays, and the failure
is reported (``on_failure``) instead of the recording stopping silently.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from upterm.errors import UsageError

log = logging.getLogger(__name__)

#: Write to disk at least this often, so a crash loses little.
FLUSH_INTERVAL_S = 1.0
#: ... or once this much waits.
FLUSH_BYTES = 256 * 1024
#: Keystrokes of one typist closer together than this are one burst of typing.
BURST_GAP_S = 1.0


class Recorder:
    """Writes one session's asciicast file."""

    def __init__(
        self,
        path: Path,
        *,
        cols: int,
        rows: int,
        env: dict[str, str],
        record_input: bool,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot record to {path}: {exc.strerror}") from exc
        self.path = path
        self._clock = clock
        self._start = clock()
        self._last_flush = self._start
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        #: Bytes of whole events on disk: where the file is cut back to if a write fails.
        self._good = 0
        #: Why the recording stopped (a write failed), or "".
        self.failed = ""
        self.on_failure = on_failure
        self.record_input = record_input
        self._out = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._in = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._typist: str | None = None
        #: The burst of typing not yet recorded: who, how many bytes, its last keystroke.
        self._burst: tuple[str, int, float] | None = None
        #: Who typed while echo was off, once told (told again when it changes).
        self._hidden: str | None = None
        self._last_time = 0.0
        header = {
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": int(time.time()),
            "env": {k: env[k] for k in ("TERM", "SHELL") if k in env},
        }
        self._write(header)
        self.flush()
        if self.failed:
            os.close(self._fd)
            raise UsageError(f"cannot record to {path}: {self.failed}")

    # -- writing --

    def _write(self, item: object) -> None:
        if self.failed:
            return
        line = (json.dumps(item, ensure_ascii=False) + "\n").encode()
        self._pending.append(line)
        self._pending_bytes += len(line)
        now = self._clock()
        if now - self._last_flush >= FLUSH_INTERVAL_S or self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            # What a burst left is written within the interval even if nothing follows
            # (and a full disk is noticed then, not at the next keystroke).
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no event loop (a tool replaying events): written at close
            self._timer = loop.call_later(FLUSH_INTERVAL_S, self.flush)

    def flush(self) -> None:
        """Write what waits, as whole events; on failure cut back to the last whole one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._last_flush = self._clock()
        if self.failed or not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, memoryview(data)[done:])
        except OSError as exc:
            self.failed = exc.strerror or str(exc)
            # Keep the whole events that made it; cut the one the disk cut.
            self._good += data.rfind(b"\n", 0, done) + 1
            try:
                os.ftruncate(self._fd, self._good)
                os.lseek(self._fd, self._good, os.SEEK_SET)
            except OSError:
                pass
            log.error("recording %s stopped: %s", self.path, self.failed)
            if self.on_failure is not None:
                self.on_failure(self.failed)
            return
        self._good += len(data)

    def _event(self, kind: str, text: str) -> None:
        if text:
            # Never earlier than the event before (a burst's marker is written late).
            self._last_time = max(self._last_time, round(self._clock() - self._start, 6))
            self._write([self._last_time, kind, text])

    # -- events --

    def marker(self, text: str) -> None:
        """A marker event (asciinema shows it as a chapter): a transfer, a forward."""
        self._end_burst()
        self._event("m", text)

    def output(self, data: bytes) -> None:
        """What the session showed."""
        if self._burst is not None and self._clock() - self._burst[2] > BURST_GAP_S:
            self._end_burst()
        self._event("o", self._out.decode(data))

    def input(self, data: bytes, who: str, secret: bool = False) -> None:
        """What someone typed; ``secret``: the terminal reads it without echo (a password)."""
        now = self._clock()
        if secret:
            self._end_burst()
            if self._hidden != who:
                self._hidden = who
                self._typist = None
                self._event("m", f"{who} typed with echo off (not recorded)")
            return
        self._hidden = None
        if self.record_input:
            if who != self._typist:
                self._typist = who
                self._event("m", f"typed by {who}")
            self._event("i", self._in.decode(data))
            return
        burst = self._burst
        if burst is not None and (burst[0] != who or now - burst[2] > BURST_GAP_S):
            self._end_burst()
            burst = None
        self._burst = (who, (burst[1] if burst else 0) + len(data), now)

    def _end_burst(self) -> None:
        burst, self._burst = self._burst, None
        if burst is not None:
            self._event("m", f"{burst[0]} typed {burst[1]} bytes")

    def resize(self, cols: int, rows: int) -> None:
        """The shared terminal changed size."""
        self._event("r", f"{cols}x{rows}")

    def close(self) -> None:
        """Write what is left and close the file."""
        self._end_burst()
        self._event("o", self._out.decode(b"", final=True))
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
