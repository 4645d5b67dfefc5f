"""A harness for attacking a real ``uptermd`` while a bystander's session is measured.

Three processes take part, so that no one's CPU sits in another's event loop:

- the relay: a real ``uptermd`` subprocess, started with the soft RLIMIT_NOFILE at 1024 as
  systemd would (it raises it to the hard limit itself, unless told it cannot), with
  ``--penalty-exempt 127.0.0.1`` and a ``--metric-addr`` to read its counters from;
- the test: the bystander's host (an in-process Tunnel + Session with bash on a real PTY,
  always from 127.0.0.1) and its joiner (an in-process asyncssh client with a PTY) that types
  a letter, then a backspace, ..., one key at a time, and times each echo
  (:meth:`Bystander.measure`);
- the attacker: ``python -m tests.relay.attackkit ATTACK PARAMS`` (see :class:`Attacker`),
  connecting from other loopback addresses (127.0.0.2, ...: Linux routes all of 127/8 to
  ``lo``), which the relay does not exempt from anything.

The attacker process runs under SCHED_IDLE (nice 19 where that is refused): on the internet
an attacker's CPU is its own, not the relay machine's; here the three share two cores, and
without it the kernel would give the attacker's busy loop as much time as the relay, which
would measure the scheduler, not the relay. It still gets every cycle the relay and the test
leave idle, which is plenty: the relay itself is the bottleneck of every flood here.

The attacker speaks JSON lines on stdout: ``{"event": "ready", ...}`` once the attack runs
at full intensity, ``{"event": "done", ...}`` with its figures once told to stop (its stdin
closes, which also happens if the test dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import itertools
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncssh
from asyncssh.constants import MSG_REQUEST_SUCCESS

from upterm import sshcompat, wire
from upterm.keys import Ed25519Key

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: The bystander's measurement: keystrokes, and one due every so often (see Bystander.measure).
SAMPLES = 100
PERIOD_S = 0.015
#: What the bystander must keep to: p99 echo latency during an attack under this, and ...
ECHO_P99_LIMIT_S = 0.050
#: ... within this factor of its p99 before the attack, ...
ECHO_RATIO_LIMIT = 3.0
#: ... taking the before-p99 as at least this. On loopback an unloaded echo takes a
#: millisecond or two, and three times that is within the noise of one scheduler tick or one
#: garbage collection in the test process: the ratio would measure noise, not the relay.
ECHO_BASE_FLOOR_S = 0.005

SSH_OPTS = [
    "-F",
    "/dev/null",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "IdentitiesOnly=yes",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "BatchMode=yes",
]

MSG_CHANNEL_OPEN = 90
PR_SET_PDEATHSIG = 1
#: How the relay is started (a list, so a profiling wrapper can stand in for it by hand).
UPTERMD = [str(VENV_BIN / "uptermd")]


# ---------------------------------------------------------------------------------------------
# Figures


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, linearly interpolated between ranks."""
    if not samples:
        return math.inf
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Latency:
    """Echo latencies of one run of samples (seconds)."""

    samples: tuple[float, ...]

    @property
    def p50(self) -> float:
        return percentile(self.samples, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 0.99)

    @property
    def worst(self) -> float:
        return max(self.samples) if self.samples else math.inf

    def __str__(self) -> str:
        return (
            f"p50 {self.p50 * 1000:.2f} ms, p99 {self.p99 * 1000:.2f} ms, "
            f"max {self.worst * 1000:.2f} ms (n={len(self.samples)})"
        )


def judge(name: str, before: Latency, during: Latency) -> tuple[bool, str]:
    """Whether the bystander kept to the bars, and the figures as one line."""
    base = max(before.p99, ECHO_BASE_FLOOR_S)
    ratio = during.p99 / base
    ok = during.p99 < ECHO_P99_LIMIT_S and ratio <= ECHO_RATIO_LIMIT
    line = (
        f"[{name}] bystander echo before: {before}; during: {during}; "
        f"p99 ratio {ratio:.2f} against max(before p99, {ECHO_BASE_FLOOR_S * 1000:.0f} ms) "
        f"(limits: p99 < {ECHO_P99_LIMIT_S * 1000:.0f} ms, ratio <= {ECHO_RATIO_LIMIT:g})"
    )
    return ok, line


# ---------------------------------------------------------------------------------------------
# The relay under attack


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def parse_metrics(text: str) -> Samples:
    """name -> labels -> value from the Prometheus text format (names as on the wire)."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, rest = series.partition("{")
        labels: set[tuple[str, str]] = set()
        if rest:
            for part in rest.rstrip("}").split(","):
                if "=" in part:
                    k, _, v = part.partition("=")
                    labels.add((k.strip(), v.strip().strip('"')))
        out.setdefault(name, {})[frozenset(labels)] = float(value)
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s series whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for k, v in samples.get(name, {}).items() if want <= k)


@dataclass
class RelayUnderTest:
    """A running ``uptermd`` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    metric_port: int
    log_path: Path
    root: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self, timeout_s: float = 5.0) -> Samples:
        """Read /metrics (blocking: call through asyncio.to_thread from a loop)."""
        url = f"http://127.0.0.1:{self.metric_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return parse_metrics(resp.read().decode())

    async def metrics(self, timeout_s: float = 5.0) -> Samples:
        return await asyncio.to_thread(self.scrape, timeout_s)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (drain), then SIGKILL if it hangs; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_relay(
    root: Path,
    *extra: str,
    soft_nofile: int = 1024,
    hard_nofile: int | None = None,
    timeout_s: float = 15.0,
) -> RelayUnderTest:
    """Start ``uptermd`` on 127.0.0.1 with RLIMIT_NOFILE soft ``soft_nofile`` (as systemd).

    ``hard_nofile`` None keeps the current hard limit (the relay raises its soft limit to
    it); a value lowers the hard limit too, so the relay cannot raise it.
    """
    root.mkdir(parents=True, exist_ok=True)
    addr_file = root / f"relay-{uuid.uuid4().hex[:6]}.addr"
    log_path = root / "uptermd.log"
    metric_port = free_port()
    _, current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = current_hard if hard_nofile is None else hard_nofile

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft_nofile, hard))
        # Should this test process die, the relay goes too (SIGTERM: it drains and exits).
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    env = {
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(root),
        "XDG_STATE_HOME": str(root / "state"),
        "XDG_RUNTIME_DIR": str(root),
        "LANG": "C.UTF-8",
    }
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                *UPTERMD,
                "--ssh-addr",
                "127.0.0.1:0",
                "--state-dir",
                str(root / "relay-state"),
                "--addr-file",
                str(addr_file),
                "--metric-addr",
                f"127.0.0.1:{metric_port}",
                # The bystander always comes from 127.0.0.1; attackers from elsewhere in 127/8.
                "--penalty-exempt",
                "127.0.0.1",
                *extra,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            preexec_fn=limit_fds,  # setrlimit only, before exec
        )
    deadline = time.monotonic() + timeout_s
    while not addr_file.exists() and proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"uptermd did not listen in {timeout_s} s")
        time.sleep(0.02)
    if proc.poll() is not None:
        raise AssertionError(f"uptermd exited {proc.returncode}: {log_path.read_text()}")
    _, _, port = addr_file.read_text().strip().rpartition(":")
    relay = RelayUnderTest(proc, int(port), metric_port, log_path, root)
    while True:  # the metrics endpoint comes up just after the SSH listener
        try:
            relay.scrape(1.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    return relay


# ---------------------------------------------------------------------------------------------
# Hosting a shell (the bystander's host in the test; a live attacker's host elsewhere)


def make_key(path: Path) -> Path:
    """An ed25519 key pair written by ssh-keygen (so OpenSSH and asyncssh can both use it)."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path


def public_key(path: Path) -> wire.PublicKey:
    key = wire.parse_public_key_line(Path(f"{path}.pub").read_text())
    assert key is not None
    return key


@dataclass
class Hosted:
    """A session registered on the relay with a command on a PTY, served to joiners."""

    tunnel: Any
    session: Any
    token: str
    session_id: str

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session.hangup()
        with contextlib.suppress(Exception):
            self.tunnel.close()


async def host_shell(
    port: int,
    root: Path,
    argv: Sequence[str] = ("bash", "--norc", "--noprofile"),
    authorized: Sequence[wire.PublicKey] = (),
) -> Hosted:
    """Register a session on the relay at 127.0.0.1:``port`` and serve ``argv`` on a PTY.

    The same pieces the daemon uses: Tunnel (outer connection, create-session, forward),
    Session (the command on a PTY) and the inner SSH server's GuestPolicy.
    """
    from upterm.daemon.knownhosts import RelayTrust
    from upterm.daemon.session import Session
    from upterm.daemon.sshd import GuestPolicy
    from upterm.daemon.tunnel import RelayURL, Tunnel

    root.mkdir(parents=True, exist_ok=True)
    trust = RelayTrust(name=f"[127.0.0.1]:{port}", known_hosts=root / "known_hosts")
    tunnel = Tunnel(
        RelayURL("ssh", "127.0.0.1", port),
        trust,
        Ed25519Key.generate(),
        wire.new_session_secret(),
        on_state=lambda state: None,
    )
    reg = await tunnel.connect(list(authorized))
    session = Session(
        list(argv),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PS1": "$ ", "TERM": "xterm"},
        cwd=str(root),
        cols=80,
        rows=24,
    )
    session.start()
    accepting = asyncio.Event()
    accepting.set()
    policy = GuestPolicy(
        session,
        tunnel.relay_key_blob,
        frozenset(k.blob for k in authorized),
        accepting,
        on_join=lambda c: None,
        on_leave=lambda c: None,
    )
    await tunnel.serve(policy)
    return Hosted(tunnel, session, reg.token, reg.session_id)


# ---------------------------------------------------------------------------------------------
# The bystander


class _Probe(asyncssh.SSHClientSession[bytes]):
    """The bystander joiner's terminal: collects what the host's shell prints."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.changed = asyncio.Event()
        self.closed = False

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.buf += data
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()


class Bystander:
    """A session on the relay (bash on a PTY) and a joiner whose echo latency is measured."""

    def __init__(self, hosted: Hosted, key: Path, conn: Any, chan: Any, probe: _Probe) -> None:
        self.hosted = hosted
        self.key = key
        self._conn = conn
        self._chan = chan
        self._probe = probe
        self._letters = "abcdefghijklmnopqrstuvwxyz"
        self._turn = 0

    @property
    def token(self) -> str:
        return self.hosted.token

    @classmethod
    async def start(cls, port: int, root: Path) -> Bystander:
        """Host the session (only the bystander's key may join) and join it."""
        root.mkdir(parents=True, exist_ok=True)
        key = make_key(root / "bystander")
        hosted = await host_shell(port, root / "host", authorized=[public_key(key)])
        conn = await asyncio.wait_for(
            asyncssh.connect(
                "127.0.0.1",
                port,
                username=hosted.token,
                client_keys=[str(key)],
                known_hosts=None,
                agent_path=None,
                config=None,
            ),
            15,
        )
        chan, probe = await conn.create_session(
            _Probe, term_type="xterm", term_size=(80, 24), encoding=None
        )
        self = cls(hosted, key, conn, chan, cast(_Probe, probe))
        await self._wait_for(b"$ ", 15)
        await self._settle()
        return self

    async def _wait_for(self, marker: bytes, timeout_s: float, start: int = 0) -> None:
        probe = self._probe
        deadline = time.monotonic() + timeout_s
        while marker not in probe.buf[start:]:
            if probe.closed:
                raise AssertionError(f"bystander channel closed; last output {probe.buf[-200:]!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{marker!r} not seen; last output {probe.buf[-200:]!r}")
            probe.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(probe.changed.wait(), left)

    async def _settle(self, quiet_s: float = 0.1) -> None:
        while True:
            n = len(self._probe.buf)
            await asyncio.sleep(quiet_s)
            if len(self._probe.buf) == n:
                return

    async def keystroke(
        self, key: bytes, echo: bytes, since: float | None = None, timeout_s: float = 2.0
    ) -> float:
        """Type ``key`` and wait for ``echo``; returns the latency.

        The latency is counted from ``since`` when given (the moment the key was due, if
        the previous one kept us from typing it on time), else from when it was typed.
        """
        probe = self._probe
        probe.buf.clear()
        t0 = time.perf_counter()
        self._chan.write(key)
        try:
            await self._wait_for(echo, timeout_s)
        except TimeoutError:
            return timeout_s
        return time.perf_counter() - (t0 if since is None else min(since, t0))

    async def measure(self, n: int = SAMPLES, period_s: float = PERIOD_S) -> Latency:
        """``n`` keystrokes, one due every ``period_s``: a letter, then a backspace erasing
        it (bash echoes the letter, then backspace, space, backspace), and so on.

        Like a person typing at a steady pace: a key that could not be typed on time because
        the previous one was still waiting for its echo counts its latency from when it was
        due. Otherwise one stall of the relay would cost one sample however long it lasted
        (the keys a person would have typed meanwhile would never be sampled) and p99 would
        not see it. With 100 samples p99 lies between the two slowest: one stray hiccup of a
        shared machine does not decide it alone, a stall of the relay does.
        """
        samples = []
        start = time.perf_counter()
        for k in range(n):
            if k % 2 == 0:
                letter = self._letters[self._turn % len(self._letters)].encode()
                self._turn += 1
                key, echo = letter, letter
            else:
                key, echo = b"\x7f", b"\x08"
            due = start + k * period_s
            now = time.perf_counter()
            if now < due:
                await asyncio.sleep(due - now)
                samples.append(await self.keystroke(key, echo))
            else:
                samples.append(await self.keystroke(key, echo, since=due))
        if n % 2:  # leave the line empty
            await self.keystroke(b"\x7f", b"\x08")
        return Latency(tuple(samples))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()
        self.hosted.close()


async def openssh_join(port: int, token: str, key: Path, timeout_s: float = 20.0) -> float:
    """Join with the real OpenSSH client (BatchMode) from 127.0.0.1 and run a command.

    Returns how long it took to see the command's output; raises AssertionError saying what
    went wrong (with ssh's own words) if it did not get in.
    """
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "ssh",
        "-tt",
        *SSH_OPTS,
        "-o",
        f"ConnectTimeout={int(timeout_s)}",
        "-i",
        str(key),
        "-p",
        str(port),
        f"{token}@127.0.0.1",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    out = bytearray()

    async def read_until(marker: bytes) -> bool:
        assert proc.stdout
        while marker not in out:
            chunk = await proc.stdout.read(4096)
            if not chunk:
                return False
            out.extend(chunk)
        return True

    async def session() -> float | None:
        assert proc.stdin
        if not await read_until(b"$ "):
            return None
        proc.stdin.write(b"echo joined-$((6*7))\r")
        await proc.stdin.drain()
        if not await read_until(b"joined-42"):
            return None
        took = time.monotonic() - t0
        proc.stdin.write(b"\x15")  # leave the shared shell as we found it
        await proc.stdin.drain()
        return took

    took: float | None = None
    try:
        took = await asyncio.wait_for(session(), timeout_s)
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if took is None:
        err = await proc.stderr.read()
        raise AssertionError(
            f"new OpenSSH joiner did not get in within {timeout_s} s: "
            f"stderr {err[-400:]!r}, stdout {bytes(out[-200:])!r}"
        )
    return took


# ---------------------------------------------------------------------------------------------
# The attacker process (test side)


class Attacker:
    """An attack running in its own process; see the module docstring."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, err_path: Path) -> None:
        self.proc = proc
        self.name = name
        self.err_path = err_path
        self.ready: dict[str, Any] = {}
        self.done: dict[str, Any] = {}

    @classmethod
    async def start(
        cls, name: str, workdir: Path, ready_timeout_s: float = 30.0, **params: Any
    ) -> Attacker:
        """Start attack ``name`` with ``params`` (its keyword arguments) and wait until it
        runs at full intensity."""
        workdir.mkdir(parents=True, exist_ok=True)
        params["root"] = str(workdir)
        err_path = workdir / f"attacker-{name}-{uuid.uuid4().hex[:4]}.err"
        with open(err_path, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.relay.attackkit",
                name,
                json.dumps(params),
                cwd=str(REPO),
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                # 64 KiB lines: figures are small, but never let one overrun the reader.
                limit=1 << 20,
            )
        self = cls(proc, name, err_path)
        self.ready = await self._event("ready", ready_timeout_s)
        return self

    async def _event(self, want: str, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(left, 0.01))
            except TimeoutError:
                raise AssertionError(
                    f"attacker {self.name}: no {want!r} within {timeout_s} s; "
                    f"stderr: {self.stderr()[-2000:]}"
                ) from None
            if not line:
                raise AssertionError(
                    f"attacker {self.name} exited ({await self.proc.wait()}) before {want!r}; "
                    f"stderr: {self.stderr()[-2000:]}"
                )
            msg = json.loads(line)
            if msg.get("event") == want:
                return dict(msg)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.returncode is None

    async def stop(self, timeout_s: float = 20.0) -> dict[str, Any]:
        """Tell it to stop (close its stdin) and return its figures."""
        assert self.proc.stdin is not None
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.done = await self._event("done", timeout_s)
        finally:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
            if self.proc.returncode is None:
                self.kill()
                await self.proc.wait()
        return self.done

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


@dataclass
class Outcome:
    """What one attack did to the bystander, and what the attacker and the relay said."""

    name: str
    before: Latency
    during: Latency
    ready: dict[str, Any]
    done: dict[str, Any]
    #: /metrics read just before the attack, and during it ({} when not read).
    metrics_before: Samples
    metrics: Samples
    #: Seconds the new OpenSSH joiner took to get in during the attack (None: not tried).
    join_s: float | None
    join_error: str
    attacker_alive_throughout: bool
    relay_alive: bool

    @property
    def bystander_ok(self) -> bool:
        return judge(self.name, self.before, self.during)[0]

    def report(self) -> str:
        """The figures, for the log (pytest -s) and every assertion message."""
        lines = [judge(self.name, self.before, self.during)[1]]
        if self.join_s is not None:
            lines.append(f"[{self.name}] new OpenSSH joiner got in after {self.join_s:.2f} s")
        elif self.join_error:
            lines.append(f"[{self.name}] new OpenSSH joiner: {self.join_error}")
        figures = {k: v for k, v in self.done.items() if k != "event"}
        lines.append(f"[{self.name}] attacker: {json.dumps(figures, default=str)[:1500]}")
        if not self.attacker_alive_throughout:
            lines.append(f"[{self.name}] the attacker died during the measurement")
        if not self.relay_alive:
            lines.append(f"[{self.name}] THE RELAY DIED")
        return "\n".join(lines)


async def run_attack(
    name: str,
    relay: RelayUnderTest,
    bystander: Bystander,
    workdir: Path,
    *,
    label: str | None = None,
    join: bool = True,
    scrape: bool = True,
    until: Callable[[], bool] | None = None,
    samples: int = SAMPLES,
    period_s: float = PERIOD_S,
    **params: Any,
) -> Outcome:
    """Measure the bystander, start attack ``name``, measure again while it runs, have a new
    OpenSSH joiner get in (``join``), read /metrics (``scrape``), then stop the attacker.

    ``until``: wait (up to 15 s) for this to hold before measuring during the attack.
    """
    before = await bystander.measure(samples, period_s)
    metrics_before = await relay.metrics()
    attacker = await Attacker.start(name, workdir, port=relay.port, **params)
    join_s: float | None = None
    join_error = ""
    metrics: Samples = {}
    try:
        if until is not None:
            deadline = time.monotonic() + 15
            while not until():
                if time.monotonic() > deadline:
                    raise AssertionError(f"[{label or name}] the attack never took hold")
                await asyncio.sleep(0.02)
        during = await bystander.measure(samples, period_s)
        if join:
            try:
                join_s = await openssh_join(relay.port, bystander.token, bystander.key)
            except AssertionError as exc:
                join_error = str(exc)
        if scrape:
            metrics = await relay.metrics()
        alive = attacker.alive()
        done = await attacker.stop()
    finally:
        attacker.kill()
    return Outcome(
        label or name,
        before,
        during,
        attacker.ready,
        done,
        metrics_before,
        metrics,
        join_s,
        join_error,
        alive,
        relay.alive(),
    )


# ---------------------------------------------------------------------------------------------
# The attacker process (attacker side): each attack is an async function of (ctx, **params)


@dataclass
class AttackContext:
    """What every attack gets: when to stop, how to report, where to keep files."""

    stop: asyncio.Event
    root: Path
    figures: dict[str, Any] = field(default_factory=dict)

    def emit(self, event: str, **data: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
        sys.stdout.flush()

    def count(self, name: str, n: int = 1) -> None:
        self.figures[name] = self.figures.get(name, 0) + n


def sources(first: int, count: int) -> list[str]:
    """``count`` loopback addresses from 127.0.0.``first`` on."""
    return [f"127.0.0.{first + i}" for i in range(count)]


async def ssh_connect(
    port: int, src: str, username: str, key: Any = None, host: bool = False, **kw: Any
) -> asyncssh.SSHClientConnection:
    """An asyncssh client from ``src``; as a host (its banner) when ``host``."""
    if host:
        kw["client_version"] = wire.HOST_CLIENT_VERSION[len("SSH-2.0-") :]
    return await asyncssh.connect(
        "127.0.0.1",
        port,
        local_addr=(src, 0),
        username=username,
        client_keys=[key or asyncssh.generate_private_key("ssh-ed25519")],
        known_hosts=None,
        agent_path=None,
        config=None,
        **kw,
    )


def _ignore_channel_opens(conn: asyncssh.SSHClientConnection) -> None:
    """Never answer the relay's channel opens (neither confirm nor refuse)."""
    table = dict(type(conn)._packet_handlers)
    table[MSG_CHANNEL_OPEN] = lambda self, pkttype, pktid, packet: None
    conn._packet_handlers = table


def _delay_channel_opens(
    conn: asyncssh.SSHClientConnection, delay_s: float, answered: Callable[[], None]
) -> None:
    """Answer the relay's channel opens only after ``delay_s`` (a host on a slow link)."""
    table = dict(type(conn)._packet_handlers)
    original = table[MSG_CHANNEL_OPEN]
    loop = asyncio.get_running_loop()

    def answer(self: Any, pkttype: int, pktid: int, packet: Any) -> None:
        answered()
        original(self, pkttype, pktid, packet)

    def later(self: Any, pkttype: int, pktid: int, packet: Any) -> None:
        loop.call_later(delay_s, answer, self, pkttype, pktid, packet)

    table[MSG_CHANNEL_OPEN] = later
    conn._packet_handlers = table


def _legacy_request(authorized: Sequence[bytes] = ()) -> bytes:
    return wire.CreateSessionRequest(
        host_user="mallory",
        host_public_keys=(Ed25519Key.generate().public.authorized_key_line(),),
        client_authorized_keys=tuple(authorized),
    ).encode()


async def silent_host(port: int, src: str) -> tuple[asyncssh.SSHClientConnection, str]:
    """A host that registers and forwards a session, then never answers a channel open."""
    conn = await ssh_connect(port, src, "mallory", host=True)
    _ignore_channel_opens(conn)
    reply = await sshcompat.global_request(conn, wire.CREATE_SESSION_REQUEST, _legacy_request())
    assert reply.ok, reply.payload
    resp = wire.CreateSessionResponse.decode(reply.payload)
    fwd = await sshcompat.global_request(
        conn, wire.STREAMLOCAL_FORWARD_REQUEST, wire.ssh_string(resp.session_id.encode())
    )
    assert fwd.ok, fwd.payload
    return conn, resp.ssh_user


class _Flooder(asyncssh.SSHClientSession[bytes]):
    """A channel that is written to as fast as its window and buffers allow."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.received = 0
        self.closed = False

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.received += len(data)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()


async def _flood_channel(ctx: AttackContext, conn: Any, chan: Any, flooder: _Flooder) -> None:
    """Write 1-byte packets until told to stop (one packet per write while the window allows)."""
    batch = 64
    while not ctx.stop.is_set() and not flooder.closed:
        if chan.get_write_buffer_size() > 0 or conn._transport is None:
            # The relay's window is shut (or the socket's buffer full): wait for it.
            ctx.count("stalls")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flooder.writable.wait(), 0.05)
            await asyncio.sleep(0.005)
            continue
        try:
            for _ in range(batch):
                chan.write(b"x")
        except (OSError, asyncssh.Error):
            break
        ctx.count("packets", batch)
        transport = conn._transport
        if transport is not None and transport.get_write_buffer_size() > 1 << 20:
            await asyncio.sleep(0.002)
        else:
            await asyncio.sleep(0)


async def attack_tiny_flood(
    ctx: AttackContext,
    port: int,
    src: str,
    connections: int = 1,
    channels: int = 4,
    live: bool = False,
    host_delay_s: float = 0.0,
) -> None:
    """Authenticated joiners writing 1-byte packets on session channels, as fast as they can.

    Not ``live``: the session's host (from ``src``) never answers the relay's channel opens,
    so the relay must hold what the joiner sends. ``live``: the host is a real shell session
    (``cat`` on a PTY, echoing), so every byte goes through the relay both ways; with
    ``host_delay_s`` that host answers the relay's channel opens only that late, so the relay
    holds the flood meanwhile and then passes it all on.
    """
    if live:
        hosted = await host_shell(
            port,
            ctx.root / "live-host",
            argv=("sh", "-c", "stty -icanon; exec cat >/dev/null"),
        )
        token = hosted.token
        if host_delay_s:

            def answered() -> None:
                if "ready_at" in ctx.figures and "host_answered_after_ready_s" not in ctx.figures:
                    late = time.monotonic() - ctx.figures["ready_at"]
                    ctx.figures["host_answered_after_ready_s"] = round(late, 3)

            _delay_channel_opens(hosted.tunnel._conn, host_delay_s, answered)
    else:
        _host, token = await silent_host(port, src)
    chans: list[tuple[asyncssh.SSHClientConnection, Any, _Flooder]] = []
    for _ in range(connections):
        conn = await ssh_connect(port, src, token)
        for _ in range(channels):
            chan, flooder = await conn.create_session(
                _Flooder, term_type="xterm", term_size=(80, 24), encoding=None
            )
            chans.append((conn, chan, cast(_Flooder, flooder)))
    ctx.figures["channels"] = len(chans)
    tasks = [asyncio.ensure_future(_flood_channel(ctx, *c)) for c in chans]
    await asyncio.sleep(0.3)  # a running start: the relay is busy before the test measures
    ctx.figures["ready_at"] = time.monotonic()
    ctx.emit("ready", channels=len(chans), packets=ctx.figures.get("packets", 0))
    await ctx.stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    del ctx.figures["ready_at"]
    ctx.figures["echoed_bytes"] = sum(f.received for _, _, f in chans)
    ctx.figures["closed_channels"] = sum(1 for _, _, f in chans if f.closed)


async def attack_idle_sockets(
    ctx: AttackContext,
    port: int,
    first_src: int = 2,
    srcs: int = 3,
    total: int = 3000,
    burst_every_s: float = 0.4,
) -> None:
    """``total`` TCP connections from ``srcs`` addresses that never send a byte, in bursts.

    Each burst opens, as fast as it can, as many as it takes to have ``total`` open again;
    the relay may refuse them (a line of text, then close) or time them out, and the attacker
    keeps every socket the relay leaves open. The attack is "ready" once the first burst is
    on its way, so the test measures while the relay takes thousands at once, and again
    every ``burst_every_s``.
    """
    addrs = sources(first_src, srcs)
    socks: dict[int, socket.socket] = {}
    loop = asyncio.get_running_loop()
    said = bytearray()

    def open_one(i: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((addrs[i % len(addrs)], 0))
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            ctx.count("connect_errors")
            return
        socks[s.fileno()] = s
        ctx.count("opened")
        loop.add_reader(s.fileno(), readable, s)

    def readable(s: socket.socket) -> None:
        try:
            data = s.recv(512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if len(said) < 4096:
                said.extend(data)
            ctx.count("lines_from_relay", data.count(b"\n"))
            return
        loop.remove_reader(s.fileno())
        socks.pop(s.fileno(), None)
        s.close()
        ctx.count("closed_by_relay")

    i = 0
    while not ctx.stop.is_set():
        ctx.count("bursts")
        for _ in range(total - len(socks)):
            open_one(i)
            i += 1
        ctx.figures["most_open"] = max(ctx.figures.get("most_open", 0), len(socks))
        if ctx.figures["bursts"] == 1:
            ctx.emit("ready", open=len(socks))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stop.wait(), burst_every_s)
    ctx.figures["open_at_end"] = len(socks)
    ctx.figures["relay_said"] = bytes(said[:200]).decode("ascii", "replace")
    for s in socks.values():
        loop.remove_reader(s.fileno())
        s.close()


async def attack_wrong_keys(
    ctx: AttackContext,
    port: int,
    src: str,
    token: str,
    parallel: int = 4,
    settle_s: float = 20,
    spread: int = 1,
    kex: str | None = None,
) -> None:
    """Log in to ``token`` with keys the session does not allow, again and again (ready once
    refused at once, or after ``settle_s``); each attempt from the next of ``spread``
    addresses counted up from ``src`` (a botnet that no per-source penalty catches), with
    the key exchange ``kex`` when given (the attacker picks the costliest offered)."""
    options = {"kex_algs": [kex]} if kex else {}
    first_refusal: list[float] = []
    t0 = time.monotonic()
    base = ipaddress.IPv4Address(src)
    attempts = itertools.count()

    async def one() -> None:
        addr = str(base + next(attempts) % spread)
        try:
            conn = await asyncio.wait_for(ssh_connect(port, addr, token, **options), 10)
        except asyncssh.PermissionDenied:
            ctx.count("auth_failures")
        except (OSError, asyncssh.Error, TimeoutError):
            # Refused before SSH (penalty): the relay wrote its line and closed.
            ctx.count("refused")
            if not first_refusal:
                first_refusal.append(time.monotonic() - t0)
        else:
            ctx.count("logged_in")
            conn.close()

    async def worker() -> None:
        while not ctx.stop.is_set():
            await one()

    workers = [asyncio.ensure_future(worker()) for _ in range(parallel)]
    while not ctx.figures.get("refused") and time.monotonic() - t0 < settle_s:
        await asyncio.sleep(0.05)
    ctx.emit("ready", **ctx.figures)
    await ctx.stop.wait()
    await asyncio.gather(*workers, return_exceptions=True)
    ctx.figures["first_refusal_after_s"] = first_refusal[0] if first_refusal else None
    ctx.figures["refusal_text"] = await _refusal_text(port, src)


async def _refusal_text(port: int, src: str) -> str:
    """What the relay says to a raw TCP connection from ``src`` (its first bytes)."""
    with contextlib.suppress(Exception):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)), 5
        )
        try:
            data = await asyncio.wait_for(reader.read(300), 5)
        finally:
            writer.close()
        return data.decode("ascii", "replace")
    return ""


async def attack_channel_churn(
    ctx: AttackContext, port: int, src: str, limit: int = 16, keepalives: int = 20000
) -> None:
    """An authenticated joiner opening and closing channels, and flooding global requests.

    First proves the relay counts *open* channels: ``limit`` open, the next refused, all
    closed, then ``limit + 1`` more (one at a time) all succeed. Then churns channels as fast
    as it can, while another connection sends want-reply keepalives without awaiting them.
    """
    _host, token = await silent_host(port, src)
    conn = await ssh_connect(port, src, token)
    held = []
    for _ in range(limit):
        chan, _ = await conn.create_session(asyncssh.SSHClientSession)
        held.append(chan)
    over_limit = ""
    try:
        chan, _ = await conn.create_session(asyncssh.SSHClientSession)
        held.append(chan)
    except asyncssh.ChannelOpenError as exc:
        over_limit = exc.reason
    for chan in held:
        chan.close()
        await chan.wait_closed()
    after_close = 0
    for _ in range(limit + 1):
        chan, _ = await conn.create_session(asyncssh.SSHClientSession)
        after_close += 1
        chan.close()
        await chan.wait_closed()
    ctx.figures.update(over_limit=over_limit, opened_after_close=after_close)

    requester = await ssh_connect(port, src, token)

    async def churn() -> None:
        while not ctx.stop.is_set():
            try:
                chan, _ = await conn.create_session(asyncssh.SSHClientSession)
            except asyncssh.ChannelOpenError:
                ctx.count("churn_refused")
                continue
            except (OSError, asyncssh.Error):
                ctx.count("churn_errors")
                return
            chan.close()
            ctx.count("churned")
            await chan.wait_closed()

    answers = {"ok": 0, "failed": 0}

    def answered(fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            answers["failed"] += 1
        else:
            answers["ok"] += 1

    async def flood_requests() -> None:
        sent = 0
        while not ctx.stop.is_set() and sent < keepalives:
            if requester._transport is None:
                break
            for _ in range(100):
                fut = asyncio.ensure_future(
                    requester._make_global_request(b"keepalive@openssh.com", b"")
                )
                fut.add_done_callback(answered)
            sent += 100
            await asyncio.sleep(0)
        ctx.figures["keepalives_sent"] = sent

    churners = [asyncio.ensure_future(churn()) for _ in range(4)]
    flood = asyncio.ensure_future(flood_requests())
    await asyncio.sleep(0.3)
    ctx.emit("ready", **ctx.figures)
    await ctx.stop.wait()
    await asyncio.gather(*churners, flood, return_exceptions=True)
    # Every request sent is answered (or the connection dropped) before long.
    deadline = time.monotonic() + 10
    sent = ctx.figures.get("keepalives_sent", 0)
    while answers["ok"] + answers["failed"] < sent and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    ctx.figures["keepalives_answered"] = answers["ok"]
    ctx.figures["keepalives_failed"] = answers["failed"]
    ctx.figures["requester_disconnected"] = requester._transport is None
    ctx.figures["churn_conn_alive"] = conn._transport is not None


async def attack_register_loop(
    ctx: AttackContext, port: int, src: str, parallel: int = 3, burst: int = 200
) -> None:
    """Hosts registering in a loop (connect, create-session, disconnect), plus one host
    connection that sends ``burst`` create-session requests without awaiting the answers."""

    async def loop_once() -> None:
        while not ctx.stop.is_set():
            try:
                conn = await ssh_connect(port, src, "mallory", host=True)
            except (OSError, asyncssh.Error):
                ctx.count("connect_failed")
                await asyncio.sleep(0.01)
                continue
            try:
                reply = await sshcompat.global_request(
                    conn, wire.CREATE_SESSION_REQUEST, _legacy_request()
                )
                ctx.count("registered" if reply.ok else "refused")
            except (OSError, asyncssh.Error):
                ctx.count("lost")
            conn.close()
            await conn.wait_closed()

    async def burst_once() -> None:
        conn = await ssh_connect(port, src, "mallory", host=True)
        futs = [
            asyncio.ensure_future(
                conn._make_global_request(wire.CREATE_SESSION_REQUEST.encode(), _legacy_request())
            )
            for _ in range(burst)
        ]
        done = await asyncio.gather(*futs, return_exceptions=True)
        ok = sum(1 for d in done if isinstance(d, tuple) and d[0] == MSG_REQUEST_SUCCESS)
        ctx.figures["burst_ok"] = ctx.figures.get("burst_ok", 0) + ok
        ctx.figures["burst_disconnected"] = conn._transport is None
        conn.close()

    loops = [asyncio.ensure_future(loop_once()) for _ in range(parallel)]
    await burst_once()
    await asyncio.sleep(0.3)
    ctx.emit("ready", **ctx.figures)

    async def bursts() -> None:
        while not ctx.stop.is_set():
            with contextlib.suppress(Exception):
                await burst_once()
            ctx.count("bursts")

    b = asyncio.ensure_future(bursts())
    await ctx.stop.wait()
    await asyncio.gather(*loops, b, return_exceptions=True)


async def attack_fd_flood(
    ctx: AttackContext, port: int, first_src: int = 2, srcs: int = 12, per_src: int = 40
) -> None:
    """Hold as many connections open as the relay will accept, from ``srcs`` addresses."""
    await attack_idle_sockets(ctx, port, first_src=first_src, srcs=srcs, total=srcs * per_src)


ATTACKS: dict[str, Callable[..., Awaitable[None]]] = {
    "tiny_flood": attack_tiny_flood,
    "idle_sockets": attack_idle_sockets,
    "wrong_keys": attack_wrong_keys,
    "channel_churn": attack_channel_churn,
    "register_loop": attack_register_loop,
    "fd_flood": attack_fd_flood,
}


def _attacker_main(name: str, params_json: str) -> None:
    # See the module docstring: the attacker's CPU is not the relay machine's.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    params = json.loads(params_json)
    root = Path(params.pop("root"))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        ctx = AttackContext(asyncio.Event(), root)

        def watch_stdin() -> None:
            with contextlib.suppress(Exception):
                sys.stdin.buffer.read()
            loop.call_soon_threadsafe(ctx.stop.set)

        threading.Thread(target=watch_stdin, daemon=True).start()
        loop.add_signal_handler(signal.SIGTERM, ctx.stop.set)
        t0 = time.monotonic()
        try:
            await ATTACKS[name](ctx, **params)
        except Exception as exc:
            ctx.figures["error"] = repr(exc)
            ctx.emit("failed", error=repr(exc))
            raise
        ctx.figures["seconds"] = round(time.monotonic() - t0, 3)
        ctx.emit("done", **ctx.figures)

    asyncio.run(run())


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ATTACKS:
        sys.exit(f"usage: python -m tests.relay.attackkit {{{','.join(ATTACKS)}}} PARAMS_JSON")
    _attacker_main(sys.argv[1], sys.argv[2])
    # Leave without waiting for sockets and threads: the attack is over.
    sys.stdout.flush()
    os._exit(0)
