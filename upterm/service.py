"""Process setup shared by the daemon and uptermd: the allocator, sd_notify and socket
activation.

READY=1 once the program serves, STATUS= lines, WATCHDOG=1 at half of ``WATCHDOG_USEC``
sent from the event loop (so a stalled loop misses it and systemd restarts us), STOPPING=1
on shutdown. Outside systemd (no ``NOTIFY_SOCKET``) every call is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import sdnotify

#: glibc allocator settings for a process that moves a stream of bytes through Python
#: (see :func:`tune_allocator`): keep this much free memory at the top of the heap ...
MALLOC_TRIM_THRESHOLD_BYTES = 8 << 20
#: ... grow the heap by this much more than asked ...
MALLOC_TOP_PAD_BYTES = 2 << 20
#: ... and serve blocks below this from the heap, not from mmap.
MALLOC_MMAP_THRESHOLD_BYTES = 1 << 20
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_allocator() -> bool:
    """Stop glibc from returning the heap's top to the kernel after every burst.

    Every read of a command's output and every SSH packet is a new bytes object of tens of
    KiB, freed soon after. With glibc's defaults the heap's top is trimmed and grown back
    again and again, and each new page costs a fault and a zeroing: half the daemon's CPU
    during a flood (13.6 -> 6.8 ms per MiB; uptermd 7.3 -> 5.5). Bounded: at most
    MALLOC_TRIM_THRESHOLD_BYTES stay held. Returns False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = (
            (_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES),
            (_M_TOP_PAD, MALLOC_TOP_PAD_BYTES),
            (_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES),
        )
        return all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError):
        return False


#: First file descriptor systemd passes (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3


class Notifier:
    """sd_notify for one program."""

    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier()
        self._status = ""
        self._watchdog: asyncio.Task[None] | None = None

    def send(self, message: str) -> None:
        """Send one notification (no-op outside systemd)."""
        if self._enabled:
            self._sd.notify(message)

    def ready(self, status: str) -> None:
        """We serve: READY=1 with a first status, and start the watchdog if asked."""
        self._status = status
        self.send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")
        interval = watchdog_interval_s()
        if interval is not None and self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._pet(interval))

    def status(self, status: str) -> None:
        """Update STATUS= when it changed."""
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    async def _pet(self, interval_s: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    def stopping(self) -> None:
        """We are shutting down."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.send("STOPPING=1\nSTATUS=stopping")


def watchdog_interval_s() -> float | None:
    """Half of ``WATCHDOG_USEC`` if the watchdog is for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    with contextlib.suppress(ValueError):
        value = int(usec)
        if value > 0:
            return value / 2 / 1_000_000
    return None


def activated_sockets() -> list[socket.socket]:
    """Listening sockets systemd passed us (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]
