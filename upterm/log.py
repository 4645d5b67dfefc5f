"""Logging set-up shared by the daemon and the relay: plain lines, context via adapters."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(debug: bool, log_file: Path | None = None) -> None:
    """Log to stderr under systemd (journald adds time stamps) or when no file is given."""
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler
    if log_file is not None and not os.environ.get("JOURNAL_STREAM"):
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else _FORMAT
        handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # asyncssh logs every packet-level event at INFO; keep its noise out unless debugging.
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if debug else logging.WARNING)
