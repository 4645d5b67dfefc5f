"""Connections not yet logged in share one turn per pass of the event loop (gate.PreauthTurns).

A real GatedListener on loopback; behind it, a consumer that spends a millisecond on every
message of a connection that has not logged in (a key exchange step costs the relay about
that) and echoes a logged-in connection's bytes at once. Twenty strangers keep sending;
a logged-in peer's round trips must wait behind one turn, not behind all twenty.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from typing import Any

import pytest

from upterm.relay.gate import GateConfig, GatedListener
from upterm.relay.policy import PenaltyKind, Refusal

pytestmark = pytest.mark.timeout(60)

STRANGERS = 20
STEP_S = 0.001


class OpenDoor:
    """A guard that admits everyone (the caps are not what this test is about)."""

    def admit(self, addr: str, now: float) -> Refusal | None:
        return None

    def left_preauth(self, addr: str) -> None:
        pass

    def penalize(self, addr: str, kind: PenaltyKind, now: float) -> None:
        pass

    def refused(self, addr: str, refusal: Refusal) -> None:
        pass

    def accept_error(self, name: str) -> None:
        pass

    def connection_opened(self) -> None:
        pass

    def connection_closed(self, duration_s: float) -> None:
        pass


class Consumer(asyncio.Protocol):
    """Logs in on a first byte ``L``; before that each message costs STEP_S of CPU."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        gate = self.transport.get_extra_info("upterm_gate")
        if gate.authenticated:
            self.transport.write(data)
            return
        if data.startswith(b"L"):
            gate.auth_completed()
            self.transport.write(b"in")
            return
        end = time.perf_counter() + STEP_S
        while time.perf_counter() < end:
            pass
        self.transport.write(b"k")


#: The peers, in a process of their own (in this one they would share its GIL with the
#: loop under test): STRANGERS connections that send their next message as soon as the last
#: was answered, then one that logs in and times 200 round trips.
CLIENTS = r"""
import json, socket, sys, threading, time
port, strangers = int(sys.argv[1]), int(sys.argv[2])
stop = threading.Event()
def flood():
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(strangers)]
    for s in socks:
        s.settimeout(5)
        s.sendall(b"x")
    try:
        while not stop.is_set():
            for s in socks:
                if s.recv(4096):
                    s.sendall(b"x")
    except OSError:
        pass
t = threading.Thread(target=flood, daemon=True)
t.start()
time.sleep(0.3)
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(5)
s.sendall(b"L")
assert s.recv(16) == b"in"
times = []
for _ in range(200):
    t0 = time.perf_counter()
    s.sendall(b"e")
    assert s.recv(16) == b"e"
    times.append(time.perf_counter() - t0)
    time.sleep(0.002)
stop.set()
print(json.dumps(times))
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shared-turn", "per-connection"])
async def test_strangers_wait_behind_one_turn(shared: bool) -> None:
    listener = GatedListener("127.0.0.1", 0, OpenDoor(), GateConfig())
    if not shared:
        listener.turns = None  # type: ignore[assignment]  # each its own turn, as before
    await listener.create_server(lambda host, port: Consumer(), "127.0.0.1", 0)
    port = listener.get_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENTS, str(port), str(STRANGERS), stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        listener.close()
    assert proc.returncode == 0
    times: list[float] = json.loads(out)
    times.sort()
    p50, p99 = statistics.median(times), times[int(len(times) * 0.99) - 1]
    kind = "shared turn" if shared else "per-connection turns"
    print(f"{kind}: logged-in round trip p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
    if shared:
        # One turn (about a millisecond, plus the piece that crosses it) per pass.
        assert p99 < 6 * STEP_S, (p50, p99)
    else:
        # The baseline this is measured against: every stranger's step in front.
        assert p50 > STRANGERS * STEP_S / 4, (p50, p99)


class Breaking(Consumer):
    """A consumer that a message saying ``boom`` breaks (raises), before login."""

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"boom"):
            raise RuntimeError("broken by its input")
        super().data_received(data)


async def test_input_that_raises_in_a_turn_ends_that_connection_only() -> None:
    listener = GatedListener("127.0.0.1", 0, OpenDoor(), GateConfig())
    await listener.create_server(lambda host, port: Breaking(), "127.0.0.1", 0)
    port = listener.get_port()
    loop = asyncio.get_running_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
    try:
        bad = await asyncio.open_connection("127.0.0.1", port)
        others = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
        await asyncio.sleep(0.1)
        # All in one pass: the breaking one is first in the turn, the others behind it.
        bad[1].write(b"boom")
        for _, w in others:
            w.write(b"x")
        for r, _ in others:
            assert await asyncio.wait_for(r.readexactly(1), 2) == b"k"
        assert await asyncio.wait_for(bad[0].read(), 2) == b""  # closed, at once
        assert errors == []  # handled in the turn, not escaped to the loop
    finally:
        listener.close()


async def test_strangers_waiting_for_their_turn_hold_little() -> None:
    """Fifty connections that send 1 MiB each before logging in, while their turns come
    slowly: each has at most a read and 16 KiB waiting at the relay; the rest waits in
    their own socket buffers (the kernel's, bounded by TCP)."""
    gates: list[Any] = []

    class Keeping(Consumer):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            gates.append(transport.get_extra_info("upterm_gate"))

    listener = GatedListener("127.0.0.1", 0, OpenDoor(), GateConfig())
    await listener.create_server(lambda host, port: Keeping(), "127.0.0.1", 0)
    port = listener.get_port()
    try:
        writers = [(await asyncio.open_connection("127.0.0.1", port))[1] for _ in range(50)]
        for w in writers:
            w.write(b"x" * (1 << 20))
        peak = 0
        for _ in range(40):
            await asyncio.sleep(0.025)
            peak = max(peak, sum(g._backlog_bytes for g in gates))
        print(f"50 strangers sending 1 MiB each: peak backlog {peak / 1024:.0f} KiB in all")
        assert len(gates) == 50
        assert peak <= 50 * 32 * 1024, peak  # 16 KiB high water + one 16 KiB read each
        for w in writers:
            w.close()
    finally:
        listener.close()
