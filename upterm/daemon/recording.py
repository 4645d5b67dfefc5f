"""Recording a session as asciicast v2 (what ``asciinema play`` plays).

One JSON header line, then one JSON event per line: ``[seconds, "o", text]`` for output,
``[seconds, "r", "COLSxROWS"]`` for resizes and, with input recording, ``[seconds, "i", text]``
preceded by a marker ``[seconds, "m", "typed by WHO"]`` whenever the typist changes (who is
"host" or a joiner's key fingerprint). Text is decoded incrementally, so a character split
across two reads is not mangled.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from upterm.errors import UsageError

log = logging.getLogger(__name__)

#: Flush to disk at least this often, so a crash loses little.
FLUSH_INTERVAL_S = 1.0


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
    ) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot record to {path}: {exc.strerror}") from exc
        self._file: IO[str] | None = os.fdopen(fd, "w", encoding="utf-8")
        self._clock = clock
        self._start = clock()
        self._last_flush = self._start
        self.record_input = record_input
        self._out = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._in = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._typist: str | None = None
        header = {
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": int(time.time()),
            "env": {k: env[k] for k in ("TERM", "SHELL") if k in env},
        }
        self._write(header)

    def _write(self, item: object) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(item, ensure_ascii=False) + "\n")
            now = self._clock()
            if now - self._last_flush >= FLUSH_INTERVAL_S:
                self._file.flush()
                self._last_flush = now
        except OSError as exc:
            log.error("recording stopped: %s", exc)
            self._file = None

    def _event(self, kind: str, text: str) -> None:
        if text:
            self._write([round(self._clock() - self._start, 6), kind, text])

    def marker(self, text: str) -> None:
        """A marker event (asciinema shows it as a chapter): a transfer, a forward."""
        self._event("m", text)

    def output(self, data: bytes) -> None:
        """What the session showed."""
        self._event("o", self._out.decode(data))

    def input(self, data: bytes, who: str) -> None:
        """What someone typed (only with input recording)."""
        if not self.record_input:
            return
        if who != self._typist:
            self._typist = who
            self._event("m", f"typed by {who}")
        self._event("i", self._in.decode(data))

    def resize(self, cols: int, rows: int) -> None:
        """The shared terminal changed size."""
        self._event("r", f"{cols}x{rows}")

    def close(self) -> None:
        """Flush and close the file."""
        self._event("o", self._out.decode(b"", final=True))
        if self._file is not None:
            self._file.close()
            self._file = None
