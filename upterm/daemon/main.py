"""The daemon's lifecycle: one instance per user, control socket, clean shutdown."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import sys
from typing import IO

from upterm import __version__, log, paths
from upterm.daemon.admin import AdminServer
from upterm.daemon.localrelay import DEFAULT_LOCAL_RELAY_ADDR, LocalRelay
from upterm.daemon.manager import Manager
from upterm.errors import UptermError
from upterm.service import Notifier, activated_sockets, tune_allocator

logger = logging.getLogger(__name__)

#: Exit status when another daemon of this user already runs (not an error for callers).
ALREADY_RUNNING_EXIT = 0


class AlreadyRunning(UptermError):
    """Another daemon holds the lock."""


class Daemon:
    """Serves the control socket until SIGTERM/SIGINT, then stops every session."""

    def __init__(self, local_relay_addr: str) -> None:
        self._local_relay_addr = local_relay_addr
        self._lock_file: IO[str] | None = None
        self._notifier = Notifier()

    def _acquire_lock(self) -> None:
        run_dir = paths.ensure_private_dir(paths.runtime_dir())
        fh = open(run_dir / paths.DAEMON_LOCK_NAME, "w")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise AlreadyRunning("another upterm daemon is already running for this user") from None
        self._lock_file = fh

    async def serve(self) -> None:
        """Run the daemon."""
        self._acquire_lock()
        local_relay = LocalRelay(self._local_relay_addr, paths.state_dir() / "relay")
        manager = Manager(local_relay, on_change=lambda: self._notifier.status(status_of(manager)))
        # Under upterm.socket, systemd created the control socket and hands it to us.
        inherited = activated_sockets()
        admin = AdminServer(
            paths.daemon_socket_path(),
            manager.dispatch,
            sock=inherited[0] if inherited else None,
        )
        await admin.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        logger.info(
            "upterm daemon %s ready on %s%s",
            __version__,
            admin.path,
            " (socket activated)" if inherited else "",
        )
        self._notifier.ready(status_of(manager))
        try:
            await stop.wait()
        finally:
            self._notifier.stopping()
            logger.info("stopping: hanging up %d sessions", len(manager.sessions))
            admin.close()
            await manager.stop_all()
            await local_relay.close()


def status_of(manager: Manager) -> str:
    """The STATUS= line: sessions and joiners."""
    sessions = len(manager.sessions)
    clients = sum(len(h.clients) for h in manager.sessions.values())
    return f"{sessions} session{'s' * (sessions != 1)}, {clients} joiner{'s' * (clients != 1)}"


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m upterm.daemon``."""
    parser = argparse.ArgumentParser(prog="upterm daemon", description="Run the upterm daemon.")
    parser.add_argument(
        "--local-relay-addr",
        default=os.environ.get("UPTERM_LOCAL_RELAY_ADDR", DEFAULT_LOCAL_RELAY_ADDR),
        help="where the built-in relay listens when no --server is given",
    )
    parser.add_argument("--debug", action="store_true", default=bool(os.environ.get("DEBUG")))
    parser.add_argument("--log-file", action="store_true", help="log to the state dir, not stderr")
    args = parser.parse_args(argv)
    log.setup(args.debug, paths.state_dir() / "daemon.log" if args.log_file else None)
    tune_allocator()
    try:
        asyncio.run(Daemon(args.local_relay_addr).serve())
    except AlreadyRunning as exc:
        print(f"upterm daemon: {exc}", file=sys.stderr)
        sys.exit(ALREADY_RUNNING_EXIT)
    except UptermError as exc:
        print(f"upterm daemon: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
