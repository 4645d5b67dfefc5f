"""The built-in local relay: a supervised ``uptermd`` for machines with no relay configured.

The daemon starts ``uptermd`` as a child process on the configured loopback address (default
``127.0.0.1:2222``) with a persistent key in its own state directory (0700, the key 0600), and
hosts pin exactly that key. "With the built-in relay, that is you" has to stay true, so:

- A listener is used only if it proves, in a real SSH key exchange, that it holds our key.
  An address held by anything else (another user's uptermd, anything with an uptermd-like
  banner) is never used: ours starts on a free port of the same host instead, with a
  warning, and the join line shows that port. A banner proves nothing; a key exchange
  signed by our key does. (Reaching another user's relay on purpose is ``--server``, where
  its key goes through known_hosts.)
- The child's pid is kept in the state directory, so a daemon that starts after a crash
  stops the relay its predecessor left behind and starts its own (see :meth:`_stop_orphan`).
- The child is supervised: if it dies, it is restarted on the same address with backoff,
  without waiting for a new session; sessions on it redial by themselves (see ``tunnel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from upterm import wire
from upterm.errors import ConfigError, RelayUnreachable, UptermError
from upterm.keys import EXTRA_KEY_TYPES, Ed25519Key, load_or_create_host_key, load_or_create_key

log = logging.getLogger(__name__)

DEFAULT_LOCAL_RELAY_ADDR = "127.0.0.1:2222"
START_TIMEOUT_S = 15
HOST_KEY_NAME = "ssh_host_ed25519_key"
#: Where the running child's pid is kept, for the daemon that comes after a crash.
PID_FILE_NAME = "uptermd.pid"
#: How long a key exchange with whatever holds our address may take before we give up on it.
PROBE_TIMEOUT_S = 5
#: How long a stopped relay (ours or an orphan) gets to exit before SIGKILL.
STOP_TIMEOUT_S = 5
#: Restart backoff for a child that died: BASE * 2**attempt, capped.
RESTART_BASE_DELAY_S = 0.25
RESTART_MAX_DELAY_S = 30.0
#: A child that stayed up this long resets the restart backoff.
RESTART_RESET_AFTER_S = 60.0
_POLL_S = 0.05


@dataclass(frozen=True)
class LocalRelayInfo:
    """Where the built-in relay listens, and its key (always ours), which hosts pin."""

    host: str
    port: int
    pinned_key: bytes


def restart_delay_s(attempt: int) -> float:
    """Delay before restart number ``attempt`` (0-based) of a child that died."""
    return float(min(RESTART_MAX_DELAY_S, RESTART_BASE_DELAY_S * 2**attempt))


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"the built-in relay address {addr!r} must be host:port, e.g. 127.0.0.1:2222; "
            "fix UPTERM_LOCAL_RELAY_ADDR or --local-relay-addr"
        )
    return host.strip("[]"), int(port)


def _join_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serves_key(host: str, port: int, key: Ed25519Key) -> bool:
    """Whether the SSH server at ``host:port`` holds ``key``'s private half.

    A full connection with the host key pinned: the key exchange only completes if the
    server signed it with that key. Any failure counts as "no" (fail closed); the exception
    type alone would prove nothing, since a server may send any disconnect reason before
    the key exchange. Authentication uses a throwaway key, which our relay accepts from a
    host (it is started without an allow-list).
    """
    pinned = asyncssh.import_public_key(key.public_line())
    try:
        conn = await asyncio.wait_for(
            asyncssh.connect(
                host,
                port,
                known_hosts=([pinned], [], []),
                server_host_key_algs=["ssh-ed25519"],
                client_version=wire.HOST_CLIENT_VERSION[len("SSH-2.0-") :],
                username=getpass.getuser(),
                client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                agent_path=None,
                config=None,
                gss_host=None,
                preferred_auth="publickey",
            ),
            PROBE_TIMEOUT_S,
        )
    except (OSError, TimeoutError, ValueError, asyncssh.Error) as exc:
        log.debug("%s does not prove it holds our relay key: %s", _join_addr(host, port), exc)
        return False
    conn.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(conn.wait_closed(), PROBE_TIMEOUT_S)
    return True


class LocalRelay:
    """Starts ``uptermd`` on demand, keeps it running, and never hands out a stranger's."""

    def __init__(self, addr: str, state_dir: Path) -> None:
        self._addr = addr
        self._dir = state_dir
        self._key_path = state_dir / HOST_KEY_NAME
        self._extra_key_paths = {kind: state_dir / name for kind, name in EXTRA_KEY_TYPES.items()}
        self._pid_file = state_dir / PID_FILE_NAME
        self._log_path = state_dir / "uptermd.log"
        # Where ours last listened: restarts go back there, so redialling sessions find it.
        self._bound: tuple[str, int] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._info: LocalRelayInfo | None = None
        self._lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The pid of our running ``uptermd`` child, if any."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def _running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def ensure(self) -> LocalRelayInfo:
        """Return our running relay, starting it if needed (raises RelayUnreachable)."""
        async with self._lock:
            if not (self._running() and self._info):
                self._info = await self._start()
            if self._supervisor is None or self._supervisor.done():
                self._supervisor = asyncio.ensure_future(self._supervise())
            return self._info

    async def _supervise(self) -> None:
        """Restart our child whenever it dies, on the same address, with backoff."""
        attempt = 0
        while True:
            # Under the lock: mid-start, _proc may be an attempt that is about to be stopped.
            async with self._lock:
                proc = self._proc
            if proc is not None:
                up_since = time.monotonic()
                status = await proc.wait()
                if self._proc is not None and self._proc is not proc:
                    continue  # ensure() got there first and started a new one
                if time.monotonic() - up_since >= RESTART_RESET_AFTER_S:
                    attempt = 0
                log.warning(
                    "the built-in relay (pid %d) exited with status %d; restarting it",
                    proc.pid,
                    status,
                )
            await asyncio.sleep(restart_delay_s(attempt))
            attempt += 1
            async with self._lock:
                if self._running():
                    continue
                try:
                    self._info = await self._start()
                except (UptermError, OSError) as exc:
                    log.warning("the built-in relay did not restart: %s; trying again", exc)

    async def _start(self) -> LocalRelayInfo:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = load_or_create_host_key(self._key_path)
        # Beside it, ECDSA and RSA keys for joiners limited to those (RSA takes a moment).
        await asyncio.to_thread(
            lambda: [load_or_create_key(p, kind) for kind, p in self._extra_key_paths.items()]
        )
        await self._stop_orphan()
        host, port = self._bound or _split_addr(self._addr)
        bound = await self._spawn(host, port)
        if bound is None and port != 0:
            # The address is taken. Whoever holds it is not a relay we can stop (the orphan,
            # if any, is gone by now): never use it, whatever it says it is; a relay that
            # does hold our key (started by hand?) is left alone too.
            if await serves_key(host, port, key):
                holder = "a relay with this user's key that this daemon did not start"
            else:
                holder = "another process (not a relay with this user's key)"
            bound = await self._spawn(host, 0)
            if bound is not None:
                log.warning(
                    "%s is held by %s: not using it; the built-in relay listens on %s instead%s",
                    _join_addr(host, port),
                    holder,
                    _join_addr(*bound),
                    # They pinned our key, so they fail closed there rather than follow.
                    " (sessions hosted before stay disconnected)" if self._bound else "",
                )
        if bound is None:
            raise RelayUnreachable(
                f"the built-in relay could not start on {_join_addr(host, port)} (see "
                f"{self._log_path}); set UPTERM_LOCAL_RELAY_ADDR to a free address or pass "
                "--server"
            )
        self._bound = bound
        log.info("built-in relay (pid %s) listening on %s", self.pid, _join_addr(*bound))
        return LocalRelayInfo(bound[0], bound[1], key.public.blob)

    async def _spawn(self, host: str, port: int) -> tuple[str, int] | None:
        """Start ``uptermd`` on ``host:port``; where it listens, or None if it could not."""
        addr_file = self._dir / "addr"
        with contextlib.suppress(FileNotFoundError):
            addr_file.unlink()
        with self._log_path.open("ab") as log_fh:
            # Its own session: a Ctrl-C in the terminal that started the daemon is not for it.
            # The command line is what _is_our_relay() recognises an orphan by.
            self._proc = proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "upterm.relay",
                "--ssh-addr",
                _join_addr(host, port),
                "--private-key",
                str(self._key_path),
                *(arg for p in self._extra_key_paths.values() for arg in ("--private-key", str(p))),
                "--addr-file",
                str(addr_file),
                # Browsers join a --web session through its page, on a loopback port of its
                # own (the card shows the link; any free port, as it is declared anew).
                "--ws-addr",
                _join_addr(host, 0),
                # Every joiner of a loopback relay comes from this machine's loopback
                # address: penalising it would lock every local user out at once. The
                # pre-auth caps still hold.
                "--penalty-exempt",
                "127.0.0.0/8",
                "--penalty-exempt",
                "::1",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fh,
                stderr=log_fh,
                start_new_session=True,
            )
        try:
            tmp = self._pid_file.with_name(PID_FILE_NAME + ".tmp")
            tmp.write_text(f"{proc.pid}\n")
            tmp.replace(self._pid_file)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and proc.returncode is None:
                if addr_file.exists():
                    bound_host, _, bound_port = addr_file.read_text().strip().rpartition(":")
                    return bound_host, int(bound_port)
                await asyncio.sleep(_POLL_S)
        except BaseException:
            await self._stop_proc()
            raise
        await self._stop_proc()
        return None

    async def _stop_orphan(self) -> None:
        """Stop the relay a crashed daemon of ours left running, as the pid file names it.

        Replace rather than reuse: a process that is not our child cannot be supervised
        (no exit status to wait for, and its pid may be reused), it may run an older upterm
        after an upgrade, and nothing is lost by stopping it, since the sessions it carried
        ended with the daemon that hosted them. Only a process of this uid whose command
        line is ``-m upterm.relay`` with this key file is touched; anything else the pid
        file may name by now (pid reuse) is left alone.
        """
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if self._proc is not None and self._proc.pid == pid and self._proc.returncode is None:
            return
        if not self._is_our_relay(pid):
            return
        log.warning("stopping the built-in relay (pid %d) an earlier daemon left running", pid)
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not self._is_our_relay(pid):
                    return
                await asyncio.sleep(_POLL_S)
        log.warning("the old built-in relay (pid %d) did not exit", pid)

    def _is_our_relay(self, pid: int) -> bool:
        # A zombie has an empty command line: it no longer listens, so it counts as gone.
        try:
            proc_dir = Path(f"/proc/{pid}")
            owner = proc_dir.stat().st_uid
            argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (
            owner == os.getuid() and b"upterm.relay" in argv and os.fsencode(self._key_path) in argv
        )

    async def _stop_proc(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            if proc.returncode is None:
                proc.kill()
        return await proc.wait()

    async def close(self) -> None:
        """Stop our relay (sessions using it end with it) and its supervision."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        async with self._lock:
            had_child = self._proc is not None
            await self._stop_proc()
            if had_child:
                # A clean stop leaves no orphan to look for.
                with contextlib.suppress(FileNotFoundError):
                    self._pid_file.unlink()
