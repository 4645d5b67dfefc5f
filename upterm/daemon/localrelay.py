"""The built-in local relay: a supervised ``uptermd`` for machines with no relay configured.

The daemon starts ``uptermd`` as a child process on the configured loopback address (default
``127.0.0.1:2222``) with a persistent key in its own state directory, and pins that key
directly. If the address is already served by another user's uptermd, that relay is used
like any remote one (its key goes through known_hosts), so two users of one machine can
host and join each other at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from upterm.errors import RelayUnreachable
from upterm.keys import load_or_create_host_key

log = logging.getLogger(__name__)

DEFAULT_LOCAL_RELAY_ADDR = "127.0.0.1:2222"
START_TIMEOUT_S = 15
HOST_KEY_NAME = "ssh_host_ed25519_key"


@dataclass(frozen=True)
class LocalRelayInfo:
    """Where the built-in relay listens and, if it is ours, its pinned key."""

    host: str
    port: int
    pinned_key: bytes | None


class LocalRelay:
    """Starts ``uptermd`` on demand and restarts it if it dies."""

    def __init__(self, addr: str, state_dir: Path) -> None:
        self._addr = addr
        self._dir = state_dir
        self._proc: asyncio.subprocess.Process | None = None
        self._info: LocalRelayInfo | None = None
        self._lock = asyncio.Lock()

    async def ensure(self) -> LocalRelayInfo:
        """Return a running relay, starting ours if needed."""
        async with self._lock:
            if self._proc is not None and self._proc.returncode is None and self._info:
                return self._info
            self._info = await self._start()
            return self._info

    async def _start(self) -> LocalRelayInfo:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = load_or_create_host_key(self._dir / HOST_KEY_NAME)
        addr_file = self._dir / "addr"
        with contextlib.suppress(FileNotFoundError):
            addr_file.unlink()
        log_path = self._dir / "uptermd.log"
        with log_path.open("ab") as log_fh:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "upterm.relay",
                "--ssh-addr",
                self._addr,
                "--private-key",
                str(self._dir / HOST_KEY_NAME),
                "--addr-file",
                str(addr_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fh,
                stderr=log_fh,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if addr_file.exists():
                host, _, port = addr_file.read_text().strip().rpartition(":")
                log.info("built-in relay listening on %s:%s", host, port)
                return LocalRelayInfo(host, int(port), key.public.blob)
            if self._proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        status = await self._stop_proc()
        host, _, port = self._addr.rpartition(":")
        if status is not None and await self._is_uptermd(host, int(port)):
            log.info("using the uptermd another process already runs on %s", self._addr)
            return LocalRelayInfo(host, int(port), None)
        raise RelayUnreachable(
            f"the built-in relay could not start on {self._addr} (see {log_path}); set "
            "UPTERM_LOCAL_RELAY_ADDR to a free address or pass --server"
        )

    async def _stop_proc(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            if proc.returncode is None:
                proc.kill()
        return await proc.wait()

    @staticmethod
    async def _is_uptermd(host: str, port: int) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
        except (OSError, TimeoutError):
            return False
        try:
            line = await asyncio.wait_for(reader.readline(), 2)
        except (OSError, TimeoutError):
            line = b""
        finally:
            writer.close()
        return line.startswith(b"SSH-2.0-uptermd-")

    async def close(self) -> None:
        """Stop our relay (sessions using it end with it)."""
        await self._stop_proc()
