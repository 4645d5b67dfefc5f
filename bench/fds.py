"""Waiting for readable descriptors without select(2)'s FD_SETSIZE: after the capacity
figures the runner holds thousands of sockets, and later descriptors pass 1024."""

from __future__ import annotations

import select
from collections.abc import Iterable


def readable(fds: Iterable[int], timeout_s: float) -> list[int]:
    """The descriptors of ``fds`` readable (or closed) within ``timeout_s`` seconds."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0.0, timeout_s) * 1000)]
