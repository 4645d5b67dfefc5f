"""upterm benchmarks: figures users feel, each beside a baseline measured in the same run.

    python -m bench.run [--quick] [--json FILE] [--upstream-bin DIR]

Baselines: a stock OpenSSH sshd started here on loopback with its own config (latency, join
time, one joiner's throughput), reading the same PTY locally (throughput), the same command
with no joiner but the one typing it (a cat with many joiners watching; their screens are
computed afterwards, see bench/final_screen.py), and plain SSH to the same relay (SSH over
WebSocket: a joiner through `upterm proxy`, a host with a ws:// tunnel, or both). Everything
runs on 127.0.0.1 in processes this runner starts and stops. Printed as a table; --json
writes the figures and the machine they were measured on. These are measurements, not tests:
nothing here passes or fails on timing.

With --upstream-bin DIR (upstream's Go `upterm` and `uptermd`, built by hand), the same run
also measures upstream's host and relay for every figure that applies (echo latency, one
joiner's throughput and the relay's CPU per MiB, join time, relay and host memory per idle
session), each printed as a row "..., vs upstream" whose baseline is upstream's figure (the
ratio reads ours/upstream), and the mixed pairings (our host on their relay, their host on
ours) beside it, so a difference can be traced to the host or the relay. See bench/upstream.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncssh

from bench.fds import readable
from bench.final_screen import Screen, final_screen, screen_of, shorten_runs
from bench.upstream import Upstream, UpstreamHost, missing, pss_kib

VENV_BIN = Path(sys.executable).parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class Figure:
    """One measured figure, its baseline and their ratio."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.baseline:
            return None
        return self.value / self.baseline


@dataclass
class Report:
    """All figures of one run and the machine they were measured on."""

    machine: dict[str, str]
    figures: list[Figure] = field(default_factory=list)
    name_width: int = 46  # wider with the upstream rows' longer names

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        print(format_row(figure, self.name_width), flush=True)


def machine_info() -> dict[str, str]:
    """Cores, CPU model, Python and library versions."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import cryptography

    import upterm

    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return {
        "upterm": f"{upterm.__version__} ({commit})" if commit else upterm.__version__,
        "cores": str(os.cpu_count()),
        "cpu": model or platform.processor(),
        "python": platform.python_version(),
        "asyncssh": asyncssh.__version__,
        "cryptography": cryptography.__version__,
        "openssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def format_row(f: Figure, name_width: int = 46) -> str:
    ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
    base = f"{f.baseline:.3f} ({f.baseline_name})" if f.baseline is not None else ""
    return f"{f.name:<{name_width}} {f.value:>10.3f} {f.unit:<6} {base:<28} {ratio:>7}  {f.target}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- the world the benchmarks run in ------------------------------------------------------


class World:
    """A private user environment, an uptermd, a stock sshd, and a joiner key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("home", "run", "state"):
            (root / sub).mkdir(mode=0o700)
        self.env = {
            "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "HOME": str(root / "home"),
            "XDG_RUNTIME_DIR": str(root / "run"),
            "XDG_STATE_HOME": str(root / "state"),
            "UPTERM_LOCAL_RELAY_ADDR": "127.0.0.1:0",
            "TERM": "xterm",
            "LANG": "C.UTF-8",
            "PS1": "$ ",
        }
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.procs.append(proc)
        return proc

    def start_relay(self, name: str = "relay", *extra: str) -> tuple[subprocess.Popen[bytes], int]:
        addr = self.root / f"{name}.addr"
        proc = self.spawn(
            [
                str(VENV_BIN / "uptermd"),
                "--ssh-addr",
                "127.0.0.1:0",
                "--state-dir",
                str(self.root / name),
                "--addr-file",
                str(addr),
                *extra,
            ]
        )
        deadline = time.monotonic() + 15
        while not addr.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("uptermd did not start")
            time.sleep(0.02)
        return proc, int(addr.read_text().strip().rsplit(":", 1)[1])

    def start_sshd(self) -> int:
        """A stock OpenSSH server on loopback, its own config, our key authorized."""
        sshd_dir = self.root / "sshd"
        sshd_dir.mkdir()
        host_key = sshd_dir / "host_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True
        )
        authorized = sshd_dir / "authorized_keys"
        authorized.write_bytes(self.key.export_public_key())
        port = free_port()
        config = sshd_dir / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {authorized}\nPidFile {sshd_dir / 'pid'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin yes\nPrintMotd no\n"
            "PrintLastLog no\nUseDNS no\nSubsystem sftp internal-sftp\n"
        )
        with contextlib.suppress(OSError):  # sshd wants its privilege-separation dir
            Path("/run/sshd").mkdir(exist_ok=True)
        self.spawn([SSHD, "-D", "-e", "-f", str(config)])
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return port
            if time.monotonic() > deadline:
                raise RuntimeError("sshd did not start")
            time.sleep(0.05)

    def upterm(self, *args: str) -> str:
        out = subprocess.run(
            [str(VENV_BIN / "upterm"), *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return out.stdout

    def host(
        self, name: str, server: str, *command: str, flags: tuple[str, ...] = ()
    ) -> dict[str, object]:
        self.upterm(
            "host", "--detach", "--accept", "--quiet", "--skip-host-key-check",
            "--known-hosts", str(self.root / "known_hosts"), "--server", server,
            "--name", name, *flags, "--", *command,
        )  # fmt: skip
        info: dict[str, object] = json.loads(self.upterm("session", "info", name, "-o", "json"))
        return info

    def daemon_pid(self) -> int:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if b"upterm.daemon" in (entry / "cmdline").read_bytes() and (
                    f"XDG_RUNTIME_DIR={self.env['XDG_RUNTIME_DIR']}".encode()
                    in (entry / "environ").read_bytes()
                ):
                    return int(entry.name)
        raise RuntimeError("no daemon")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            pid = self.daemon_pid()
            os.kill(pid, 15)
            time.sleep(0.5)
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


@contextlib.contextmanager
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="ub-", dir="/tmp"))
    w = World(root)
    try:
        yield w
    finally:
        w.close()
        shutil.rmtree(root, ignore_errors=True)


class SshJoiner:
    """A real OpenSSH ``ssh -tt`` joiner on pipes, as users join (and as the sshd baseline).

    Reads only keep a short tail and a count of flood bytes: a 64 MiB run must not spend its
    time copying what it read. A joiner made with ``record`` also keeps every chunk it read,
    as it came (no copy), for its screen to be computed afterwards.
    """

    def __init__(self, argv: list[str], record: bool = False) -> None:
        self.proc = subprocess.Popen(
            [*argv[:1], "-tt", *argv[1:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, bufsize=0,
        )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.tail = b""
        self.flood = 0  # FLOOD_BYTE seen since the last reset
        self.done_at: float | None = None
        self.record: list[bytes] | None = [] if record else None

    def type(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)

    def feed(self, chunk: bytes) -> None:
        if self.record is not None:
            self.record.append(chunk)
        self.flood += chunk.count(FLOOD_BYTE)
        self.tail = (self.tail[-64:] + chunk)[-4096:]

    def read_until(self, marker: bytes, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while marker not in self.tail:
            left = deadline - time.monotonic()
            if left <= 0 or not readable([self.fd], left):
                raise TimeoutError(f"{marker!r} not seen")
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                raise EOFError(f"ssh ended before {marker!r}")
            self.feed(chunk)

    def read_match(self, pattern: re.Pattern[bytes], limit_s: float) -> re.Match[bytes]:
        """Read until ``pattern`` matches what was read since the tail was last emptied."""
        deadline = time.monotonic() + limit_s
        while (m := pattern.search(self.tail)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not readable([self.fd], left):
                raise TimeoutError(f"{pattern.pattern!r} not seen")
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                raise EOFError(f"ssh ended before {pattern.pattern!r}")
            self.feed(chunk)
        return m

    def settle(self, marker: bytes = b"$ ") -> None:
        """Wait for the prompt, then drain whatever else arrives (the replay, a repaint)."""
        self.read_until(marker, 15)
        while readable([self.fd], 0.3):
            self.feed(os.read(self.fd, 1 << 20))
        self.tail = b""

    def reset(self) -> None:
        self.tail, self.flood, self.done_at = b"", 0, None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


KEY: list[asyncssh.SSHKey] = []
#: In the notice a joiner that fell behind gets once it has caught up (see upterm.daemon.sshd).
SKIP_NOTICE = b"output skipped"
#: The flood is this byte, written as an octal escape so the echoed command has none.
FLOOD_BYTE = b"x"
FLOOD_END = b"END-2"


def flood_command(size: int) -> bytes:
    """Shell line that writes ``size`` flood bytes, then a marker not in its own echo.

    The marker gets a line of its own: a joiner that skipped ahead catches up from a line
    start, and the flood is one long line.
    """
    return f"head -c {size} /dev/zero | tr '\\0' '\\170'; echo; echo END-$((1+1))\r".encode()


#: The timed cat's end: its duration in microseconds, as the shell measured it.
CAT_TIME = re.compile(rb"DUR-(\d+)-US")
#: The PTY's size, as ``stty size`` gives it (rows, then columns).
STTY_SIZE = re.compile(rb"SIZE (\d+) (\d+)\r\n")


def timed_cat_command(size: int) -> bytes:
    """Shell line that writes ``size`` flood bytes and times itself on the host's PTY.

    The time is of the command (until its last byte is written to the PTY, which holds only
    a few KiB), not of its output reaching anyone. Its marker, ``CAT_TIME``, is not in the
    echo of the line: there, a ``$`` follows ``DUR-``.
    """
    return (
        f"start=$(date +%s%N); head -c {size} /dev/zero | tr '\\0' '\\170'; "
        "end=$(date +%s%N); echo; echo DUR-$(( (end-start)/1000 ))-US\r"
    ).encode()


def human_size(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


# --- figures ------------------------------------------------------------------------------


def echo_latency_ms(argv: list[str], n: int) -> list[float]:
    """Type one byte, wait for its echo, n times (cooked-mode `cat`: the kernel echoes)."""
    j = SshJoiner(argv)
    try:
        time.sleep(0.5)
        j.type(b"w")
        j.settle(b"w")  # connected and echoing, the replay drained
        samples = []
        for i in range(n + 20):
            ch = bytes([97 + i % 26])
            j.tail = b""
            start = time.perf_counter()
            j.type(ch)
            j.read_until(ch, 5)
            if i >= 20:  # warm-up
                samples.append((time.perf_counter() - start) * 1000)
        return samples
    finally:
        j.close()


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def flood(joiners: list[SshJoiner], size: int, limit_s: float = 600) -> list[float]:
    """The first joiner types the flood command; every joiner reads until the end marker.

    Returns each joiner's rate of flood bytes actually received (MiB/s, Enter to its end
    marker): a joiner that skipped ahead is credited only with what it got.
    """
    for j in joiners:
        j.reset()
    by_fd = {j.fd: j for j in joiners}
    waiting = set(by_fd)
    start = time.perf_counter()
    joiners[0].type(flood_command(size))
    deadline = time.monotonic() + limit_s
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError("the flood did not reach every joiner")
        for fd in readable(list(waiting), 1):
            j = by_fd[fd]
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError("a joiner's ssh ended during the flood")
            j.feed(chunk)
            if FLOOD_END in j.tail:
                j.done_at = time.perf_counter()
                waiting.discard(fd)
    return [j.flood / (1 << 20) / ((j.done_at or start) - start) for j in joiners]


def timed_cat(
    typist: SshJoiner,
    watchers: list[SshJoiner],
    size: int,
    linger_s: float = 0.0,
    limit_s: float = 600,
) -> int:
    """The typist types the timed cat; every joiner's output is read as it comes, as a
    terminal reads all it is sent, and kept by those that record. Reading goes on for
    ``linger_s`` after the cat's time reached the typist. Returns that time (µs).

    Nothing but the read and the keeping is done per chunk while the cat runs: the screens
    are computed afterwards (bench.final_screen).
    """
    by_fd = {j.fd: j for j in (typist, *watchers)}
    typist.tail = b""
    typist.type(timed_cat_command(size))
    deadline = time.monotonic() + limit_s
    took: int | None = None
    until = deadline
    while (left := until - time.monotonic()) > 0:
        for fd in readable(list(by_fd), min(left, 1)):
            # A pipe holds 64 KiB: a larger buffer would be a fresh mapping at each read.
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError("a joiner's ssh ended during the cat")
            j = by_fd[fd]
            if j.record is not None:
                j.record.append(chunk)
            if j is typist and took is None:
                typist.tail = (typist.tail[-64:] + chunk)[-4096:]
                if m := CAT_TIME.search(typist.tail):
                    took = int(m[1])
                    until = time.monotonic() + linger_s
    if took is None:
        raise TimeoutError("the cat's time did not reach the typist")
    return took


@dataclass
class Watched:
    """The timed cat alone and watched, and the joiners' screens after it."""

    alone_s: float  # the typist alone (median)
    watched_s: float  # every joiner watching
    joiners: int  # the typist included
    size: tuple[int, int]  # the PTY's columns and rows, every joiner's too
    equal: int  # joiners whose screen is the reference's (a late joiner's)
    equal_but_notices: int  # ... once upterm's own notice lines are left out
    skipped: int  # joiners told they skipped ahead
    unskipped_equal: int  # of the joiners that did not, those whose screen is the reference's
    reference_right: bool  # whether the reference is the screen the cat's output makes
    right: int  # joiners whose screen is the one the cat's output makes


def watched_cat(argv: list[str], n: int, size: int, rounds: int) -> Watched:
    """The timed cat on a session of its own: typed by a joiner alone (``rounds`` times), then
    once with ``n - 1`` more watching; each joiner's screen 1 s after it ended, against the
    screen a joiner that joins then is given (the session's replay of its current screen).

    Every joiner records all it reads from its join on (a screen depends on all of it); the
    newcomers' connections are warmed up by a smaller cat first, as the typist's was. The
    reference is itself checked against the joiners that got every byte (none skipped), and
    against the screen the cat's output makes (known: it starts at a line's start, and the
    shell prints a line, the time's line and its prompt after it).
    """
    typist = SshJoiner(argv, record=True)
    joiners = [typist]
    try:
        typist.settle()
        typist.type(b"stty size | sed 's/^/SIZE /'\r")
        m = typist.read_match(STTY_SIZE, 15)
        cols, rows = int(m[2]), int(m[1])
        warm = min(size, 8 << 20)
        timed_cat(typist, [], warm)
        alone = statistics.median(timed_cat(typist, [], size) for _ in range(rounds))
        watchers = joined(argv, n - 1, record=True)
        joiners += watchers
        timed_cat(typist, watchers, warm)
        watched = timed_cat(typist, watchers, size, linger_s=1.0)
        late = SshJoiner(argv, record=True)
        joiners.append(late)
        late.settle()
    finally:
        for j in joiners:
            j.close()
    # Offline: nothing runs now but this.
    assert late.record is not None
    reference = screen_of(late.record, cols, rows, FLOOD_BYTE)
    right = screen_of([FLOOD_BYTE * size, b"\r\nDUR-%d-US\r\n$ " % watched], cols, rows, FLOOD_BYTE)
    screens: list[tuple[Screen, bool]] = []
    for j in joiners[:-1]:
        assert j.record is not None
        data = shorten_runs(j.record, cols, rows, FLOOD_BYTE)
        j.record = None  # up to the whole cat: let it go before the next
        screens.append((final_screen(data, cols, rows), SKIP_NOTICE in data))
    return Watched(
        alone_s=alone / 1e6,
        watched_s=watched / 1e6,
        joiners=n,
        size=(cols, rows),
        equal=sum(s == reference for s, _ in screens),
        equal_but_notices=sum(s.equal_but_notices(reference) for s, _ in screens),
        skipped=sum(skipped for _, skipped in screens),
        unskipped_equal=sum(s == reference for s, skipped in screens if not skipped),
        reference_right=reference == right,
        right=sum(s == right for s, _ in screens),
    )


def paired_floods(
    relay_pid: int, joiners: list[SshJoiner], size: int, rounds: int
) -> list[tuple[float, float]]:
    """Flood each joiner alone (each on a session of its own), in turn, ``rounds`` times
    over, so that drift on a shared machine falls on all of them alike.

    Returns, per joiner, its median rate (MiB/s) and uptermd's CPU per MiB it received (ms).
    """
    for j in joiners:  # warm-up, as for the one-joiner figure
        flood([j], min(size, 8 << 20))
    rates: list[list[float]] = [[] for _ in joiners]
    cpu = [0.0] * len(joiners)
    got = [0.0] * len(joiners)
    for _ in range(rounds):
        for i, j in enumerate(joiners):
            before = cpu_seconds(relay_pid)
            (rate,) = flood([j], size)
            cpu[i] += cpu_seconds(relay_pid) - before
            got[i] += j.flood / (1 << 20)
            rates[i].append(rate)
    return [(statistics.median(r), c / g * 1000) for r, c, g in zip(rates, cpu, got, strict=True)]


def prompt_joiner(argv: list[str]) -> SshJoiner:
    """One joiner at its shell's prompt: a host that replays no prompt on joining (upstream
    replays its last few writes) is asked for a fresh one."""
    j = SshJoiner(argv)
    try:
        j.read_until(b"$ ", 5)
    except TimeoutError:
        j.type(b"\r")
    j.settle()
    return j


def one_joiner_rate(argv: list[str], relay_pid: int | None, size: int) -> tuple[float, float]:
    """A fresh joiner, warmed up as the one-joiner figure's, then one flood of ``size``: its
    rate (MiB/s) and the relay's CPU per MiB it received (ms; 0 without a relay)."""
    j = prompt_joiner(argv)
    try:
        flood([j], min(size, 8 << 20))
        before = cpu_seconds(relay_pid) if relay_pid else 0.0
        (rate,) = flood([j], size)
        cpu = cpu_seconds(relay_pid) - before if relay_pid else 0.0
        return rate, cpu / (j.flood / (1 << 20)) * 1000
    finally:
        j.close()


def joined(argv: list[str], n: int, record: bool = False) -> list[SshJoiner]:
    joiners = [SshJoiner(argv, record) for _ in range(n)]
    for j in joiners:
        j.settle()
    return joiners


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc: its threads' time on a CPU in
    nanoseconds (schedstat) where the kernel keeps it, else clock ticks (stat).

    Ticks come at 100 a second: a quick run's 1 MiB flood, some 10 ms of uptermd's CPU,
    read as 0 or 1 tick. Per-thread times leave out threads that have ended; the relays here
    keep theirs (asyncio's executor threads, Go's runtime threads)."""
    total, seen = 0, False
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
                seen = True
    if seen:
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def host_terminal_latency_ms(w: World, n: int) -> list[float]:
    """The host's own attached terminal: a keystroke over the admin socket to its echo
    (in a session of its own, running cat)."""
    from upterm.ctl.client import AdminClient

    client = await AdminClient.connect(Path(w.env["XDG_RUNTIME_DIR"]) / "upterm" / "daemon.sock")
    try:
        reply = await client.request(
            "create", argv=["cat"], env=w.env, cwd="/", term="xterm", cols=80, rows=24,
            server=None, authorized_keys=[], accept=True, known_hosts=None, name="own",
        )  # fmt: skip
    finally:
        await client.aclose()
    return await attached_latency_ms(w, reply["session"]["sessionId"], n)


async def attached_latency_ms(w: World, session: str, n: int) -> list[float]:
    """A terminal attached to ``session`` (running cat): a keystroke over the admin socket
    to its echo, ``n`` times after 20 to warm up."""
    from upterm.ctl.client import AdminClient

    client = await AdminClient.connect(Path(w.env["XDG_RUNTIME_DIR"]) / "upterm" / "daemon.sock")
    got: asyncio.Queue[bytes] = asyncio.Queue()
    client.on_stream = lambda f: (
        got.put_nowait(f.get("data", b"")) if f["type"] == "output" else None
    )
    attach = await client.request("attach", session=session, cols=80, rows=24)
    stream = attach["stream"]
    await asyncio.sleep(0.3)  # the replay of what the session showed before
    while not got.empty():
        got.get_nowait()
    samples = []
    for i in range(n + 20):
        ch = bytes([97 + i % 26])
        start = time.perf_counter()
        client.send({"type": "input", "stream": stream, "data": ch})
        seen = b""
        while ch not in seen:
            seen += await asyncio.wait_for(got.get(), 10)
        if i >= 20:
            samples.append((time.perf_counter() - start) * 1000)
    client.send({"type": "detach", "stream": stream})
    await client.aclose()
    return samples


def local_pty_echo_ms(n: int) -> list[float]:
    """Baseline: the same keystroke into a local PTY running cat, echoed by the kernel."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        os.execvp("cat", ["cat"])
    samples = []
    for i in range(n + 20):
        ch = bytes([97 + i % 26])
        start = time.perf_counter()
        os.write(fd, ch)
        seen = b""
        while ch not in seen:
            seen += os.read(fd, 1024)
        if i >= 20:
            samples.append((time.perf_counter() - start) * 1000)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(fd)
    return samples


def local_pty_mib_s(size: int) -> float:
    """The same output read straight from a local PTY."""
    import pty

    start = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        os.execvp("sh", ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x"])
    total = 0
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        total += len(chunk)
    os.waitpid(pid, 0)
    os.close(fd)
    return size / (1 << 20) / (time.perf_counter() - start)


def join_time_ms(argv: list[str], n: int) -> list[float]:
    """OpenSSH `ssh ... -tt` start to its first byte of output."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        assert proc.stdout is not None
        proc.stdout.read(1)
        samples.append((time.perf_counter() - start) * 1000)
        proc.kill()
        proc.wait()
    return samples


#: Quotas off, for the capacity figures (one key, one address, thousands of sessions).
NO_QUOTAS = (
    "--max-sessions", "0", "--max-sessions-per-key", "0", "--max-sessions-per-source", "0",
    "--penalty-exempt", "127.0.0.0/8",
)  # fmt: skip


async def relay_idle_sessions(
    relay_pid: int, port: int, n: int, idle_s: float
) -> tuple[float, float]:
    """uptermd's RSS growth per idle registered session (legacy registrations, each its
    own host connection, as real hosts; from 64 loopback addresses in turn), and its CPU
    while they sit idle (its keepalive probes and their answers), in % of one core.

    Upstream's uptermd answers the same registration. (A host that also forwards its
    session, as real hosts do next, adds under a tenth to either relay's figure.)"""
    from upterm import sshcompat, wire

    before = rss_kib(relay_pid)
    conns = []
    for i in range(n):
        conn = await asyncssh.connect(
            "127.0.0.1", port, client_version="upterm-host-client", username="bench",
            client_keys=[KEY[0]], known_hosts=None, agent_path=None, config=None,
            local_addr=(f"127.0.2.{1 + i % 64}", 0),
        )  # fmt: skip
        req = wire.CreateSessionRequest(
            host_user="bench", host_public_keys=(KEY[0].export_public_key(),)
        )
        reply = await sshcompat.global_request(conn, wire.CREATE_SESSION_REQUEST, req.encode())
        assert reply.ok, reply.payload
        conns.append(conn)
    await asyncio.sleep(0.5)
    after = rss_kib(relay_pid)
    cpu0 = cpu_seconds(relay_pid)
    await asyncio.sleep(idle_s)
    idle_cpu = (cpu_seconds(relay_pid) - cpu0) / idle_s * 100
    for conn in conns:
        conn.close()
    return (after - before) / n, idle_cpu


async def preauth_held(port: int, sources: int, attempts: int) -> tuple[int, int]:
    """Idle connections (they never send a byte) from ``sources`` loopback addresses in turn,
    against a relay with its default pre-auth caps: how many were held when the first was
    refused, and how many were held in all."""
    held: list[socket.socket] = []
    first_refusal = 0
    try:
        for i in range(attempts):
            sock = socket.socket()
            sock.bind((f"127.0.3.{1 + i % sources}", 0))
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", port))
                line = sock.recv(256)
            except OSError:
                line = b""
            if line.startswith(b"SSH-2.0-"):
                held.append(sock)
                continue
            sock.close()
            if not first_refusal:
                first_refusal = len(held)
        # No refusal at all: every attempt was held (reported as such).
        return first_refusal or len(held), len(held)
    finally:
        for sock in held:
            sock.close()


def daemon_memory_per_session_kib(w: World, server: str, n: int) -> float:
    w.host("m0", server, "sleep", "3600")
    pid = w.daemon_pid()
    before = rss_kib(pid)
    for i in range(1, n + 1):
        w.host(f"m{i}", server, "sleep", "3600")
    time.sleep(0.5)
    return (rss_kib(pid) - before) / n


def wakeups(pid: int) -> int:
    """Times a process went to sleep so far (voluntary context switches): each is followed
    by a wakeup. Preemptions (the other kind) say more about the machine's load."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def idle_wakeups_per_s(pid: int, seconds: float) -> float:
    before = wakeups(pid)
    time.sleep(seconds)
    return (wakeups(pid) - before) / seconds


# --- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does: full, or tiny for the smoke run."""

    latency_samples: int
    flood_bytes: int  # one joiner
    cat_bytes: int  # the timed cat, alone and with many joiners watching
    many_joiners: int  # watching the cat, the one typing it included
    join_samples: int
    relay_sessions: tuple[int, ...]
    daemon_sessions: int
    idle_s: float  # full: longer than KEEPALIVE_INTERVAL_S, so keepalives fall inside
    ws_bytes: int  # each WebSocket pairing (quick: enough for a few CPU clock ticks)
    ws_rounds: int  # floods per pairing for the WebSocket throughput figures
    upstream_hosts: int  # upstream `upterm host` processes for the host memory figure


FULL = Sizes(500, 64 << 20, 64 << 20, 20, 20, (1000, 5000, 10000), 100, 60.0, 64 << 20, 3, 10)
QUICK = Sizes(50, 1 << 20, 1 << 20, 4, 5, (50,), 10, 2.0, 4 << 20, 1, 3)

#: The pairings measured beside ours with --upstream-bin: upstream's host on its relay (the
#: baseline of every "vs upstream" row), and the two mixed ones.
UPSTREAM = "upstream"
OURS_ON_THEIRS = "our host, upstream relay"
THEIRS_ON_OURS = "upstream host, our relay"


@dataclass
class Leg:
    """One session shared one of the upstream ways: how a joiner joins it, the pid of the
    relay it goes through, and the upstream host (if the host is upstream's)."""

    argv: list[str]
    relay_pid: int
    host: UpstreamHost | None = None


def add_many_joiner_figures(
    report: Report,
    w: World,
    server: str,
    to_relay: Callable[[dict[str, object]], list[str]],
    sizes: Sizes,
) -> None:
    """Many joiners, as users feel them: the host's command is not held back (a cat
    typed by one joiner, timed by the shell, with every joiner watching against the
    typist alone), and every joiner's screen is right 1 s after it ended (the host's
    screen: what a joiner joining then is shown). On a session of its own."""
    n, cat = sizes.many_joiners, human_size(sizes.cat_bytes)
    many_info = w.host("many", server, "bash", "--norc", "--noprofile")
    seen = watched_cat(to_relay(many_info), n, sizes.cat_bytes, 3)
    w.upterm("session", "stop", "many")
    report.add(Figure(
        f"time of a {cat} cat, {n} joiners watching", seen.watched_s * 1000, "ms",
        seen.alone_s * 1000, "typist alone", "<= 1.5x typist alone",
    ))  # fmt: skip
    # The reference checked: against the joiners that got every byte (if any), and against
    # the screen the cat's output makes.
    unskipped = n - seen.skipped
    note = f"all ({seen.size[0]}x{seen.size[1]}); host's (late joiner's) = cat's: "
    note += "yes" if seen.reference_right else f"no (cat's: {seen.right} joiners)"
    if unskipped:
        note += f"; = {seen.unskipped_equal} of {unskipped} unskipped"
    if seen.equal_but_notices:
        note += f"; {seen.equal_but_notices} more but for notices"
    report.add(Figure(
        "joiners showing the host's screen 1 s after", seen.equal, f"of {n}", target=note,
    ))  # fmt: skip
    report.add(Figure(
        f"joiners that skipped ahead ({n} watching)", seen.skipped, f"of {n}",
        target="figure (one behind skips to the current screen)",
    ))  # fmt: skip


async def run(quick: bool, upstream_bin: Path | None = None, only: str | None = None) -> Report:
    sizes = QUICK if quick else FULL
    report = Report(machine_info(), name_width=46 if upstream_bin is None else 54)
    print(json.dumps(report.machine, indent=2))
    print(
        f"{'figure':<{report.name_width}} {'value':>10} {'unit':<6} {'baseline':<28}"
        f" {'ratio':>7}  target"
    )
    KEY.append(asyncssh.generate_private_key("ssh-ed25519"))
    with world() as w, contextlib.ExitStack() as stack:
        w.key = KEY[0]
        # Quotas off and loopback exempt from penalties: every host and joiner here is on
        # 127.0.0.1, and the daemon figure hosts a hundred sessions from it. The same relay
        # also serves SSH over WebSocket, for the WebSocket figures beside plain SSH.
        ws_port = free_port()
        relay, port = w.start_relay("relay", *NO_QUOTAS, "--ws-addr", f"127.0.0.1:{ws_port}")
        sshd_port = w.start_sshd()
        server = f"ssh://127.0.0.1:{port}"
        user = os.environ.get("USER") or "root"
        key_file = w.root / "joiner"
        key_file.write_bytes(KEY[0].export_private_key())
        key_file.chmod(0o600)
        ssh = [
            "ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", str(key_file),
        ]  # fmt: skip
        to_sshd = [*ssh, "-p", str(sshd_port), f"{user}@127.0.0.1"]

        def via(relay_port: int, token: object) -> list[str]:
            return [*ssh, "-p", str(relay_port), f"{token}@127.0.0.1"]

        def to_relay(info: dict[str, object]) -> list[str]:
            return via(port, info["sshUser"])

        if only == "many":
            add_many_joiner_figures(report, w, server, to_relay, sizes)
            return report

        up: Upstream | None = None
        if upstream_bin is not None:
            up = Upstream(upstream_bin, w.root / "upstream", w.env, key_file)
            stack.callback(up.close)
            up_relay, up_port = up.start_relay("relay")

        @contextlib.contextmanager
        def upstream_legs(name: str, *command: str) -> Iterator[dict[str, Leg]]:
            """``command`` shared three more ways: upstream's host on upstream's relay, our
            host on upstream's relay, upstream's host on our relay; stopped afterwards (the
            daemon's figures count its sessions)."""
            assert up is not None
            hosts = len(up.hosts)
            try:
                theirs, token = up.host(up_port, *command)
                theirs_here, here_token = up.host(port, *command)
                ours_there = w.host(name, f"ssh://127.0.0.1:{up_port}", *command)
                yield {
                    UPSTREAM: Leg(via(up_port, token), up_relay.pid, theirs),
                    OURS_ON_THEIRS: Leg(via(up_port, ours_there["sshUser"]), up_relay.pid),
                    THEIRS_ON_OURS: Leg(via(port, here_token), relay.pid, theirs_here),
                }
            finally:
                for host in up.hosts[hosts:]:
                    up.stop(host)
                with contextlib.suppress(RuntimeError):
                    w.upterm("session", "stop", name)

        def over_ws(info: dict[str, object]) -> list[str]:
            """The WebSocket join line, as the card prints it for a host on a ws:// relay
            (with this venv's upterm: the joiners run with the caller's PATH)."""
            token = info["sshUser"]
            proxy = f"{VENV_BIN / 'upterm'} proxy ws://{token}@127.0.0.1:{ws_port}"
            return [*ssh, "-o", f"ProxyCommand={proxy}", f"{token}@127.0.0.1"]

        # The end-to-end join line as printed, with a config file: `-J` starts a second
        # ssh for the jump, which reads the same file.
        config = w.root / "ssh_config"
        config.write_text(
            f"Host *\n  IdentityFile {key_file}\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        )

        def end_to_end(info: dict[str, object]) -> list[str]:
            return ["ssh", "-F", str(config), *shlex.split(str(info["e2eCommand"]))[1:]]

        # Keystroke echo: OpenSSH joiners on both sides, the same `cat` in cooked mode.
        info = lat_info = w.host("lat", server, "cat")
        relay_lat = echo_latency_ms(to_relay(info), sizes.latency_samples)
        sshd_lat = echo_latency_ms([*to_sshd, "cat"], sizes.latency_samples)
        for p, target in ((50, "<= 2x sshd, <= upstream; <= 1.5 ms"), (99, "<= 5 ms")):
            report.add(Figure(
                f"echo latency via uptermd, p{p}", pct(relay_lat, p), "ms",
                pct(sshd_lat, p), "OpenSSH sshd", target,
            ))  # fmt: skip
        e2e_lat = echo_latency_ms(end_to_end(info), sizes.latency_samples)
        report.add(Figure(
            "echo latency, end-to-end join, p50", pct(e2e_lat, 50), "ms",
            pct(sshd_lat, 50), "OpenSSH sshd", "(the relay only splices)",
        ))  # fmt: skip

        own = await host_terminal_latency_ms(w, sizes.latency_samples)
        local = local_pty_echo_ms(sizes.latency_samples)
        report.add(Figure(
            "echo latency, host terminal via daemon, p50", pct(own, 50), "ms",
            pct(local, 50), "local PTY", "p50 <= 0.5 ms",
        ))  # fmt: skip
        if up is not None:
            # The same `cat` and joiner settings through upstream's host and relay, and the
            # mixed pairings; then upstream's own host terminal, as the daemon's above.
            with upstream_legs("lat-up", "cat") as up_legs:
                lats = {
                    what: echo_latency_ms(leg.argv, sizes.latency_samples)
                    for what, leg in up_legs.items()
                }
                up_cat = up_legs[UPSTREAM].host
                assert up_cat is not None
                up_own = up_cat.terminal_echo_ms(sizes.latency_samples)
            for p, target in ((50, "<= upstream"), (99, "figure")):
                report.add(Figure(
                    f"echo latency via uptermd, p{p}, vs upstream", pct(relay_lat, p), "ms",
                    pct(lats[UPSTREAM], p), UPSTREAM, target,
                ))  # fmt: skip
            for what in (OURS_ON_THEIRS, THEIRS_ON_OURS):
                report.add(Figure(
                    f"echo latency, {what}, p50", pct(lats[what], 50), "ms",
                    pct(lats[UPSTREAM], 50), UPSTREAM, "(host or relay?)",
                ))  # fmt: skip
            report.add(Figure(
                "echo latency, host terminal, p50, vs upstream", pct(own, 50), "ms",
                pct(up_own, 50), UPSTREAM, "figure",
            ))  # fmt: skip

        # Throughput to one joiner, and uptermd's CPU for it.
        info = w.host("tp", server, "bash", "--norc", "--noprofile")
        (one,) = joined(to_relay(info), 1)
        # Not measured: the first bulk transfer on a fresh connection runs slower while
        # socket buffers and windows grow; every figure below is of a warmed-up joiner.
        flood([one], min(sizes.flood_bytes, 8 << 20))
        cpu_before = cpu_seconds(relay.pid)
        (rate,) = flood([one], sizes.flood_bytes)
        relay_cpu = cpu_seconds(relay.pid) - cpu_before
        mib = sizes.flood_bytes >> 20 or sizes.flood_bytes / (1 << 20)
        report.add(Figure(
            f"output throughput to 1 joiner ({mib:g} MiB)", rate, "MiB/s",
            local_pty_mib_s(sizes.flood_bytes), "local PTY read", ">= 0.8x local",
        ))  # fmt: skip
        relay_cpu_mib = relay_cpu / (one.flood / (1 << 20)) * 1000
        report.add(Figure(
            "uptermd CPU per relayed MiB", relay_cpu_mib, "ms",
            target="<= upstream; trend over releases",
        ))  # fmt: skip
        # The same flood through a direct sshd (its shell at the same prompt): a fresh
        # joiner, warmed up the same way.
        sshd_shell = "env PS1='$ ' bash --norc --noprofile"
        sshd_rate, _ = one_joiner_rate([*to_sshd, sshd_shell], None, sizes.flood_bytes)
        report.add(Figure(
            f"throughput to 1 joiner ({mib:g} MiB), vs sshd", rate, "MiB/s",
            sshd_rate, "OpenSSH sshd", ">= sshd",
        ))  # fmt: skip
        if up is not None:
            with upstream_legs("tp-up", "bash", "--norc", "--noprofile") as up_legs:
                tps = {
                    what: one_joiner_rate(leg.argv, leg.relay_pid, sizes.flood_bytes)
                    for what, leg in up_legs.items()
                }
            up_rate, up_cpu = tps[UPSTREAM]
            report.add(Figure(
                f"throughput to 1 joiner ({mib:g} MiB), vs upstream", rate, "MiB/s",
                up_rate, UPSTREAM, ">= upstream",
            ))  # fmt: skip
            for what in (OURS_ON_THEIRS, THEIRS_ON_OURS):
                report.add(Figure(
                    f"throughput, {what}", tps[what][0], "MiB/s", up_rate, UPSTREAM,
                    "(host or relay?)",
                ))  # fmt: skip
            report.add(Figure(
                "uptermd CPU per relayed MiB, vs upstream", relay_cpu_mib, "ms", up_cpu,
                UPSTREAM, "<= upstream",
            ))  # fmt: skip
            for what in (OURS_ON_THEIRS, THEIRS_ON_OURS):
                report.add(Figure(
                    f"relay CPU per MiB, {what}", tps[what][1], "ms", up_cpu, UPSTREAM,
                    "(host or relay?)",
                ))  # fmt: skip
        (e2e,) = joined(end_to_end(info), 1)
        flood([e2e], min(sizes.flood_bytes, 8 << 20))  # warm-up, as above
        cpu_before = cpu_seconds(relay.pid)
        (e2e_rate,) = flood([e2e], sizes.flood_bytes)
        e2e_cpu = cpu_seconds(relay.pid) - cpu_before
        e2e.close()
        report.add(Figure(
            f"output throughput, end-to-end join ({mib:g} MiB)", e2e_rate, "MiB/s",
            rate, "relay join", "(the relay only splices)",
        ))  # fmt: skip
        report.add(Figure(
            "uptermd CPU per spliced MiB (end-to-end)",
            e2e_cpu / (e2e.flood / (1 << 20)) * 1000, "ms", relay_cpu_mib, "relay join",
            "figure",
        ))  # fmt: skip

        add_many_joiner_figures(report, w, server, to_relay, sizes)

        # Slow-joiner isolation: one live joiner alone, then with a second joiner stopped
        # (SIGSTOP: its ssh keeps the connection and reads nothing). One live joiner is
        # followed and never skips, so its rate is steady; the full flood size amortises
        # the windows and buffers the stopped joiner fills before it counts as stalled.
        start = time.perf_counter()
        (before,) = flood([one], sizes.flood_bytes)
        unheld = time.perf_counter() - start
        stopped = SshJoiner(to_relay(info))
        stopped.settle()
        os.kill(stopped.proc.pid, signal.SIGSTOP)
        try:
            start = time.perf_counter()
            (after,) = flood([one], sizes.flood_bytes)
            held = time.perf_counter() - start
        finally:
            os.kill(stopped.proc.pid, signal.SIGCONT)
        stopped.read_until(FLOOD_END, 60)  # it caught up (skipping ahead), not cut off
        report.add(Figure(
            "live joiner's throughput, another one stopped", after, "MiB/s", before,
            "none stopped", ">= 0.9x",
        ))  # fmt: skip
        report.add(Figure(
            "time to end of output with a stopped joiner", held * 1000, "ms", unheld * 1000,
            "none stopped", "no joiner holds the PTY back",
        ))  # fmt: skip
        for j in (one, stopped):
            j.close()

        n_join = sizes.join_samples
        ours = join_time_ms(["ssh", "-tt", *to_relay(info)[1:]], n_join)
        # sshd's shell prints its first byte when it starts, as the shared session does.
        theirs = join_time_ms(["ssh", "-tt", *to_sshd[1:], "echo ready; cat"], n_join)
        report.add(Figure(
            "join time, ssh start to first byte (median)", statistics.median(ours), "ms",
            statistics.median(theirs), "OpenSSH sshd", "<= 1.3x sshd, <= upstream",
        ))  # fmt: skip
        if up is not None:
            # The shells of the throughput figures' kind, on sessions of their own.
            with upstream_legs("join-up", "bash", "--norc", "--noprofile") as up_legs:
                joins = {
                    what: statistics.median(join_time_ms(["ssh", "-tt", *leg.argv[1:]], n_join))
                    for what, leg in up_legs.items()
                }
            report.add(Figure(
                "join time (median), vs upstream", statistics.median(ours), "ms",
                joins[UPSTREAM], UPSTREAM, "<= upstream",
            ))  # fmt: skip
            for what in (OURS_ON_THEIRS, THEIRS_ON_OURS):
                report.add(Figure(
                    f"join time, {what} (median)", joins[what], "ms", joins[UPSTREAM],
                    UPSTREAM, "(host or relay?)",
                ))  # fmt: skip

        # SSH over WebSocket, each beside plain SSH on the same relay. A joiner over
        # WebSocket is OpenSSH with `upterm proxy` as its ProxyCommand (one more process and
        # one more hop each way); a host over WebSocket carries its tunnel in the same
        # framing. Join time first, right beside the SSH joins above, on the same session.
        ws_join = join_time_ms(["ssh", "-tt", *over_ws(info)[1:]], n_join)
        report.add(Figure(
            "join time, joiner over WebSocket (median)", statistics.median(ws_join), "ms",
            statistics.median(ours), "SSH joiner", "<= 1.3x SSH",
        ))  # fmt: skip
        ssh_lat = echo_latency_ms(to_relay(lat_info), sizes.latency_samples)
        ws_lat = echo_latency_ms(over_ws(lat_info), sizes.latency_samples)
        for p in (50, 99):
            report.add(Figure(
                f"echo latency, joiner over WebSocket, p{p}", pct(ws_lat, p), "ms",
                pct(ssh_lat, p), "SSH joiner", "<= 1.2x SSH",
            ))  # fmt: skip
        # Throughput: each pairing on a session of its own, one joiner each (a joiner that
        # does not read would hold its session's flood back until it counts as stalled).
        bash = ("bash", "--norc", "--noprofile")
        ws_server = f"ws://127.0.0.1:{ws_port}"
        pairings = {  # name: (host's relay URL, how its joiner joins)
            "tp-ssh": (server, to_relay),
            "tp-ws-joiner": (server, over_ws),
            "tp-ws-host": (ws_server, to_relay),
            "tp-ws-both": (ws_server, over_ws),
        }
        legs = []
        for name, (url, join) in pairings.items():
            leg_info = w.host(name, url, *bash)
            if url == ws_server:  # the card's line is the one over_ws builds
                assert f"ws://{leg_info['sshUser']}@127.0.0.1:{ws_port}" in str(
                    leg_info["sshCommand"]
                ), leg_info["sshCommand"]
            legs.extend(joined(join(leg_info), 1))
        results = paired_floods(relay.pid, legs, sizes.ws_bytes, sizes.ws_rounds)
        mib = sizes.ws_bytes >> 20
        for j in legs:
            j.close()
        for name in pairings:
            w.upterm("session", "stop", name)
        (ssh_rate, ssh_cpu), ws_joiner, ws_host, ws_both = results
        for what, (ws_rate, ws_cpu) in (("joiner", ws_joiner), ("host", ws_host)):
            report.add(Figure(
                f"throughput, {what} over WebSocket ({mib:g} MiB)", ws_rate, "MiB/s",
                ssh_rate, "SSH host and joiner", ">= 0.8x SSH",
            ))  # fmt: skip
            report.add(Figure(
                f"uptermd CPU per relayed MiB, {what} over WS", ws_cpu, "ms", ssh_cpu,
                "SSH host and joiner", "figure",
            ))  # fmt: skip
        report.add(Figure(
            f"throughput, host and joiner over WS ({mib:g} MiB)", ws_both[0], "MiB/s",
            ssh_rate, "SSH host and joiner", ">= 0.8x SSH",
        ))  # fmt: skip

        for n_mem in sizes.relay_sessions:
            # A fresh uptermd each time: memory freed by an earlier run would be reused.
            fresh, fresh_port = w.start_relay(f"relay-{n_mem}", *NO_QUOTAS)
            # Longer than --host-keepalive (9 s), so every host's probe falls inside.
            per_session, idle_cpu = await relay_idle_sessions(
                fresh.pid, fresh_port, n_mem, 2.0 if quick else 20.0
            )
            report.add(Figure(
                f"uptermd memory per idle session ({n_mem})", per_session, "KiB",
                target="<= 40 KiB, <= upstream",
            ))  # fmt: skip
            report.add(Figure(
                f"uptermd CPU with {n_mem} idle sessions", idle_cpu, "% core",
                target="figure (keepalive probes)",
            ))  # fmt: skip
            fresh.terminate()
            fresh.wait(10)
            if up is not None:
                # The same registrations (their uptermd answers ours), on a fresh one too.
                fresh, fresh_port = up.start_relay(f"relay-{n_mem}")
                up_per_session, up_idle_cpu = await relay_idle_sessions(
                    fresh.pid, fresh_port, n_mem, 2.0 if quick else 20.0
                )
                report.add(Figure(
                    f"uptermd memory per idle session ({n_mem}), vs upstream", per_session,
                    "KiB", up_per_session, UPSTREAM, "<= upstream",
                ))  # fmt: skip
                report.add(Figure(
                    f"uptermd CPU with {n_mem} idle sessions, vs upstream", idle_cpu, "% core",
                    up_idle_cpu, UPSTREAM, "figure (theirs probes no host)",
                ))  # fmt: skip
                fresh.terminate()
                fresh.wait(10)
        # Defaults (--max-startups 100:30:1000, 32 per source): attempts from 64 addresses.
        fresh, fresh_port = w.start_relay("relay-preauth")
        attempts = 1500 if not quick else 400
        first, held = await preauth_held(fresh_port, 64, attempts)
        report.add(Figure(
            "pre-auth connections held at the first refusal", first, "conns",
            target="start of random early drop (100)",
        ))  # fmt: skip
        report.add(Figure(
            f"pre-auth connections held of {attempts} attempts", held, "conns",
            target="<= full (1000)",
        ))  # fmt: skip
        fresh.terminate()
        fresh.wait(10)
        n_daemon = sizes.daemon_sessions
        daemon_kib = daemon_memory_per_session_kib(w, server, n_daemon)
        report.add(Figure(
            f"daemon memory per idle session ({n_daemon})", daemon_kib, "KiB",
            target="<= 200 KiB",
        ))  # fmt: skip
        if up is not None:
            # Each upstream session is a `upterm host` process of its own (the shared
            # command, as ours, not counted): its RSS, and its PSS (its share of the pages
            # the processes share, such as the binary's), median of a few.
            hosts = [up.host(up_port, "sleep", "3600")[0] for _ in range(sizes.upstream_hosts)]
            await asyncio.sleep(0.5)
            up_rss = statistics.median(rss_kib(h.pid) for h in hosts)
            up_pss = statistics.median(pss_kib(h.pid) for h in hosts)
            for h in hosts:
                up.stop(h)
            report.add(Figure(
                "host memory per idle session, vs upstream RSS", daemon_kib, "KiB", up_rss,
                "upstream host RSS", "figure",
            ))  # fmt: skip
            report.add(Figure(
                "host memory per idle session, vs upstream PSS", daemon_kib, "KiB", up_pss,
                "upstream host PSS", "figure",
            ))  # fmt: skip
        # Every session's tunnel sends a keepalive each KEEPALIVE_INTERVAL_S and reads its
        # answer: that is the floor; anything above it would be idle work.
        from upterm.daemon.tunnel import KEEPALIVE_INTERVAL_S

        sessions = n_daemon + 4  # with the ones the earlier figures left running
        report.add(Figure(
            f"daemon idle wakeups ({sessions} sessions)",
            idle_wakeups_per_s(w.daemon_pid(), sizes.idle_s), "per s",
            2 * sessions / KEEPALIVE_INTERVAL_S, "keepalives", "keepalives only",
        ))  # fmt: skip
    return report


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--upstream-bin", type=Path, metavar="DIR",
        help="upstream's Go binaries (upterm, uptermd): measure them beside ours",
    )  # fmt: skip
    parser.add_argument("--only", choices=["many"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream_bin is not None and (problem := missing(args.upstream_bin)):
        parser.error(problem)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report = asyncio.run(run(args.quick, args.upstream_bin, args.only))
    if args.json:
        data = {"machine": report.machine, "figures": [
            {**asdict(f), "ratio": f.ratio} for f in report.figures
        ]}  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    del soft


if __name__ == "__main__":
    main()
