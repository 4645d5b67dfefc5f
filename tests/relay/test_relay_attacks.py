"""uptermd in public: no client can hurt another (issue 13).

Each test attacks a real ``uptermd`` subprocess from another process and other loopback
addresses (127.0.0.2, ...), while a bystander's session on the same relay (host and joiner in
this process, from 127.0.0.1) is measured: its keystroke echo latency before and during the
attack (p99 during under 50 ms and within 3x of max(before p99, 5 ms)), and a new joiner (the
real OpenSSH client, BatchMode) must get into the bystander's session during the attack. The
harness, and why the figures are taken as they are, is in ``attackkit``. ``pytest -s`` prints
the figures; every assertion message carries them too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tests.relay import attackkit as kit
from upterm import sshcompat, wire

pytestmark = pytest.mark.timeout(60)


class Arena:
    """A relay under attack and its bystander, torn down after the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.relay: kit.RelayUnderTest | None = None
        self.bystander: kit.Bystander | None = None

    @property
    def workdir(self) -> Path:
        return self.root / "attacker"

    async def open(
        self, *flags: str, soft_nofile: int = 1024, hard_nofile: int | None = None
    ) -> tuple[kit.RelayUnderTest, kit.Bystander]:
        self.relay = kit.start_relay(
            self.root / "relay", *flags, soft_nofile=soft_nofile, hard_nofile=hard_nofile
        )
        self.bystander = await kit.Bystander.start(self.relay.port, self.root / "bystander")
        return self.relay, self.bystander

    async def close(self) -> None:
        if self.bystander is not None:
            await self.bystander.close()
        if self.relay is not None:
            self.relay.stop()


@pytest.fixture
async def arena(tmp_path: Path) -> AsyncIterator[Arena]:
    a = Arena(tmp_path)
    try:
        yield a
    finally:
        await a.close()


def verdict(out: kit.Outcome, *checks: tuple[bool, str], join: bool = True) -> None:
    """Print the figures; fail with all of them if the bystander or any check suffered."""
    report = out.report()
    print("\n" + report)
    failures = [what for ok, what in checks if not ok]
    if not out.relay_alive:
        failures.append("the relay died")
    if not out.attacker_alive_throughout:
        failures.append("the attacker died before the measurement ended (no attack to measure)")
    if not out.bystander_ok:
        failures.append("the bystander's echo suffered")
    if join and out.join_s is None:
        failures.append("the new joiner did not get in during the attack")
    assert not failures, "; ".join(failures) + "\n" + report


def mib(samples: kit.Samples, name: str = "process_resident_memory_bytes") -> float:
    return kit.metric(samples, name) / (1 << 20)


# ---------------------------------------------------------------------------------------------
# 1. Tiny packets


@pytest.mark.parametrize(
    "variant",
    [
        # The host never answers the relay's channel open: the relay holds what comes.
        pytest.param({"live": False}, id="waiting-channel"),
        # A real shell host (cat on a PTY, echoing): every byte crosses the relay twice.
        pytest.param({"live": True}, id="live-shell"),
        # A real host that answers the relay's channel opens a second late (a slow link):
        # the relay holds the flood, then passes it all on while the bystander types.
        pytest.param({"live": True, "host_delay_s": 1.0}, id="late-host"),
    ],
)
async def test_tiny_packet_flood(arena: Arena, variant: dict[str, Any]) -> None:
    relay, bystander = await arena.open()
    out = await kit.run_attack(
        "tiny_flood",
        relay,
        bystander,
        arena.workdir,
        label="tiny-packet flood " + ", ".join(f"{k}={v}" for k, v in variant.items()),
        src="127.0.0.2",
        connections=1,
        channels=4,
        **variant,
    )
    print(
        f"relay RSS {mib(out.metrics_before):.1f} MiB before, {mib(out.metrics):.1f} MiB during "
        f"({out.done.get('packets', 0)} one-byte packets written by the attacker)"
    )
    checks = [
        (out.done.get("channels") == 4, "the attacker did not get its 4 channels"),
        # The flood really ran: thousands of one-byte packets, not a trickle.
        (out.done.get("packets", 0) >= 5000, "the attacker sent fewer than 5000 packets"),
    ]
    if variant["live"]:
        # The flood reached the attacker's shell and came back: the relay passed it on.
        checks.append((out.done.get("echoed_bytes", 0) > 0, "nothing came back from the host"))
    if "host_delay_s" in variant:
        # The host let the held flood through while the bystander was being measured.
        answered = out.done.get("host_answered_after_ready_s")
        window_s = len(out.during.samples) * kit.PERIOD_S
        checks.append(
            (
                answered is not None and 0 < answered < window_s,
                f"the host answered {answered} s after the attack began, not within the "
                f"{window_s:.1f} s the bystander was measured",
            )
        )
    verdict(out, *checks)


# ---------------------------------------------------------------------------------------------
# 2. Idle sockets


async def test_thousands_of_idle_sockets(arena: Arena) -> None:
    # A short handshake deadline, so the ones admitted are also timed out while we watch.
    relay, bystander = await arena.open(
        "--handshake-timeout", "1s", "--per-source-max-startups", "16"
    )
    out = await kit.run_attack(
        "idle_sockets",
        relay,
        bystander,
        arena.workdir,
        label="3000 idle sockets from 3 sources",
        first_src=2,
        srcs=3,
        total=3000,
    )
    refused = kit.metric(out.metrics, "uptermd_refusals_total", reason="per-source-startups")
    penalty = kit.metric(out.metrics, "uptermd_refusals_total", reason="penalty")
    timeouts = kit.metric(out.metrics, "uptermd_refusals_total", reason="handshake-timeout")
    fds_before = kit.metric(out.metrics_before, "uptermd_open_fds")
    fds = kit.metric(out.metrics, "uptermd_open_fds")
    max_fds = kit.metric(out.metrics, "uptermd_max_fds")
    # What an attacker can make the relay hold: 16 unauthenticated connections per source,
    # plus a little (the new joiner, the metrics scrape, sockets closing).
    fd_bound = fds_before + 3 * 16 + 16
    print(
        f"refusals: per-source-startups {refused:.0f}, penalty {penalty:.0f}, "
        f"handshake-timeout {timeouts:.0f}; relay fds {fds_before:.0f} before, {fds:.0f} "
        f"during (bound {fd_bound:.0f}, limit {max_fds:.0f})"
    )
    verdict(
        out,
        (out.done.get("opened", 0) >= 3000, "the attacker did not open 3000 sockets"),
        (out.done.get("bursts", 0) >= 2, "fewer than two bursts during the measurement"),
        (refused + penalty > 0, "no refusal (per-source-startups or penalty) was counted"),
        (timeouts > 0, "no connection was closed at the handshake deadline"),
        (fds <= fd_bound, f"the relay held {fds:.0f} descriptors (bound {fd_bound:.0f})"),
        # Started at soft 1024 as under systemd: the relay raised it to the hard limit.
        (max_fds > 1024, f"the relay did not raise its descriptor limit ({max_fds:.0f})"),
    )


# ---------------------------------------------------------------------------------------------
# 3. Wrong keys


async def test_wrong_key_flood_is_penalised(arena: Arena) -> None:
    relay, bystander = await arena.open()
    parallel = 4
    out = await kit.run_attack(
        "wrong_keys",
        relay,
        bystander,
        arena.workdir,
        label="wrong-key flood",
        src="127.0.0.2",
        token=bystander.token,
        parallel=parallel,
    )
    failures = out.done.get("auth_failures", 0)
    active = kit.metric(out.metrics, "uptermd_penalties_active")
    penalty = kit.metric(out.metrics, "uptermd_refusals_total", reason="penalty")
    bad_key = kit.metric(out.metrics, "uptermd_auth_failures_total", reason="bad-key")
    print(
        f"attacker: {failures} failed logins, then {out.done.get('refused', 0)} refused at "
        f"once; relay: penalties_active {active:.0f}, refusals{{penalty}} {penalty:.0f}, "
        f"auth_failures{{bad-key}} {bad_key:.0f}; said: {out.done.get('refusal_text')!r}"
    )
    verdict(
        out,
        (out.done.get("logged_in", 0) == 0, "a wrong key logged in"),
        # authfail is 5 s, refusal from 15 s: refused after the third failure, but attempts
        # already admitted may fail too (one per worker, and one more while the relay has yet
        # to see a failed connection close).
        (0 < failures <= 3 + 2 * parallel, f"{failures} failed logins before the refusals"),
        (out.done.get("refused", 0) > 0, "the source was never refused at once"),
        ("refused" in str(out.done.get("refusal_text")), "no refusal line for the source"),
        (active >= 1, "uptermd_penalties_active is not >= 1"),
        (penalty > 0, 'no uptermd_refusals_total{reason="penalty"}'),
    )


async def test_handshake_flood_from_many_addresses(arena: Arena) -> None:
    """Key exchanges are the dearest thing a stranger can ask of the relay, and 4096 source
    addresses each trying once stay under every per-source penalty: only the shared pre-auth
    turn (gate.PreauthTurns, which asyncssh's own tasks resume in too) and a key exchange
    no stranger can make costly (sshcompat.server_kex_algs) keep them from the bystander's
    keystrokes. The attacker picks the dearest the relay offers (NIST P-384)."""
    relay, bystander = await arena.open()
    out = await kit.run_attack(
        "wrong_keys",
        relay,
        bystander,
        arena.workdir,
        label="handshake flood from 4096 addresses (ecdh-sha2-nistp384)",
        src="127.1.0.0",
        token=bystander.token,
        parallel=12,
        settle_s=2,
        spread=4096,
        kex="ecdh-sha2-nistp384",
    )
    failures = out.done.get("auth_failures", 0)
    seconds = out.done.get("seconds", 0)
    penalty = kit.metric(out.metrics, "uptermd_refusals_total", reason="penalty")
    bad_key = kit.metric(out.metrics, "uptermd_auth_failures_total", reason="bad-key")
    print(
        f"attacker: {failures} failed logins in {seconds:.1f} s "
        f"({failures / max(seconds, 1e-9):.0f}/s), {out.done.get('refused', 0)} refused; "
        f"relay: auth_failures{{bad-key}} {bad_key:.0f}, refusals{{penalty}} {penalty:.0f}"
    )
    verdict(
        out,
        (out.done.get("logged_in", 0) == 0, "a wrong key logged in"),
        # The flood really ran: hundreds of full key exchanges, not stopped by penalties.
        (failures >= 300, f"only {failures} key exchanges were completed"),
        (bad_key >= 300, f"the relay saw only {bad_key:.0f} failed logins"),
    )


async def test_the_relay_offers_no_key_exchange_a_stranger_can_make_costly(
    arena: Arena,
) -> None:
    """RSA key exchange (a new RSA key per login), group exchange (the client picks an
    8192-bit group) and the large fixed groups cost the relay 2-10x a curve's handshake:
    the relay's KEXINIT offers none of them (nor SHA-1 or GSS ones); curves still work."""
    relay, _ = await arena.open()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", relay.port, local_addr=("127.0.5.1", 0)
    )

    def ssh_string(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    lists = [b"curve25519-sha256", b"ssh-ed25519", *[b"aes128-ctr"] * 2,
             *[b"hmac-sha2-256"] * 2, *[b"none"] * 2, b"", b""]  # fmt: skip
    payload = bytes([20]) + bytes(16) + b"".join(map(ssh_string, lists)) + bytes(5)
    pad = 8 - (len(payload) + 5) % 8 + 8
    writer.write(b"SSH-2.0-probe\r\n")
    writer.write((len(payload) + pad + 1).to_bytes(4, "big") + bytes([pad]) + payload + bytes(pad))
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"SSH-2.0-")
    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 10), "big")
    packet = await reader.readexactly(size)
    kexinit = packet[1 : size - packet[0]]
    assert kexinit[0] == 20
    offered = sshcompat._name_lists(kexinit)[0].decode().split(",")
    writer.close()
    print("offered:", offered)
    for costly in ("rsa", "group-exchange", "group15", "group16", "group17", "group18",
                   "-sha1", "gss-"):  # fmt: skip
        assert not [name for name in offered if costly in name], (costly, offered)
    assert {"curve25519-sha256", "ecdh-sha2-nistp256", "diffie-hellman-group14-sha256"} <= set(
        offered
    )
    for i, kex in enumerate(("curve25519-sha256", "mlkem768x25519-sha256")):
        with pytest.raises(asyncssh.PermissionDenied):  # past the key exchange: no session
            await kit.ssh_connect(relay.port, f"127.0.5.{i + 2}", "x" * 20, kex_algs=[kex])


# ---------------------------------------------------------------------------------------------
# 4. Channel and request churn


async def test_channel_and_request_churn(arena: Arena) -> None:
    relay, bystander = await arena.open()
    out = await kit.run_attack(
        "channel_churn",
        relay,
        bystander,
        arena.workdir,
        label="channel and keepalive churn",
        src="127.0.0.2",
        limit=16,
    )
    d = out.done
    sent = d.get("keepalives_sent", 0)
    answered = d.get("keepalives_answered", 0)
    dropped = kit.metric(out.metrics, "uptermd_refusals_total", reason="global-requests")
    print(
        f"channels: 17th while 16 open: {d.get('over_limit')!r}; after closing them "
        f"{d.get('opened_after_close')} opened one by one; {d.get('churned', 0)} opened and "
        f"closed during the attack. keepalives: {sent} sent, {answered} answered, requester "
        f"disconnected: {d.get('requester_disconnected')} (refusals{{global-requests}} "
        f"{dropped:.0f})"
    )
    verdict(
        out,
        ("too many open channels" in str(d.get("over_limit")), "17th open channel not refused"),
        (d.get("opened_after_close") == 17, "closed channels still counted against the cap"),
        # More than the cap: the count of open channels went down as they closed.
        (d.get("churned", 0) > 16, "no more than 16 channels churned"),
        (d.get("churn_conn_alive") is True, "the churning joiner was dropped"),
        (sent >= 5000, "fewer than 5000 keepalives sent"),
        # Every request answered, or the attacker dropped for it: never left hanging.
        (
            answered == sent or (d.get("requester_disconnected") is True and dropped > 0),
            "keepalives neither all answered nor the sender dropped",
        ),
    )


# ---------------------------------------------------------------------------------------------
# 5. Registration churn


async def _register(port: int, src: str, n: int) -> list[bool | bytes]:
    conn = await kit.ssh_connect(port, src, "mallory", host=True)
    try:
        out: list[bool | bytes] = []
        for _ in range(n):
            reply = await sshcompat.global_request(
                conn, wire.CREATE_SESSION_REQUEST, kit._legacy_request()
            )
            out.append(True if reply.ok else reply.payload)
        return out
    finally:
        conn.close()


async def test_host_registration_churn(arena: Arena) -> None:
    relay, bystander = await arena.open()
    out = await kit.run_attack(
        "register_loop",
        relay,
        bystander,
        arena.workdir,
        label="host registration churn",
        src="127.0.0.2",
        parallel=3,
        burst=200,
    )
    d = out.done
    # Afterwards nothing the attacker registered may stay: its connections are all gone.
    deadline = time.monotonic() + 5
    while True:
        after = await relay.metrics()
        sessions = kit.metric(after, "uptermd_sessions")
        if sessions <= 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    # And nothing may stay counted: the same source registers again, up to the per-connection
    # cap (8), which it could not if its earlier sessions still counted (20 per source).
    again = await _register(relay.port, "127.0.0.2", 8)
    print(
        f"attacker: {d.get('registered', 0)} registered and closed, {d.get('refused', 0)} "
        f"refused; {d.get('bursts', 0)} bursts of 200 create-session without waiting (dropped: "
        f"{d.get('burst_disconnected')}); sessions after: {sessions:.0f} (the bystander's is 1); "
        f"8 new registrations from 127.0.0.2: {again}"
    )
    verdict(
        out,
        (d.get("registered", 0) >= 20, "fewer than 20 registrations in the loop"),
        (d.get("bursts", 0) >= 1, "no burst of create-session requests"),
        (sessions == 1, f"{sessions:.0f} sessions registered after the attack (want 1)"),
        (again == [True] * 8, f"registrations counted after their connection went: {again}"),
    )


# ---------------------------------------------------------------------------------------------
# 6. Out of descriptors


async def test_out_of_descriptors(arena: Arena) -> None:
    limit = 96
    # soft = hard: the relay cannot raise it.
    relay, bystander = await arena.open(soft_nofile=limit, hard_nofile=limit)
    out = await kit.run_attack(
        "fd_flood",
        relay,
        bystander,
        arena.workdir,
        label=f"descriptor exhaustion (limit {limit})",
        join=False,  # nobody new gets in while accept() fails: after the flood, below
        scrape=False,  # nor does a scrape
        until=lambda: "EMFILE" in relay.log_text(),
        first_src=2,
        srcs=12,
        per_src=40,
    )
    # The flood is over: a new joiner gets in, the counters say what happened.
    join_s: float | None = None
    join_error = ""
    try:
        join_s = await kit.openssh_join(relay.port, bystander.token, bystander.key)
    except AssertionError as exc:
        join_error = str(exc)
    after = await relay.metrics()
    emfile = kit.metric(after, "uptermd_accept_errors_total", errno="EMFILE")
    max_fds = kit.metric(after, "uptermd_max_fds")
    fds = kit.metric(after, "uptermd_open_fds")
    base = kit.metric(out.metrics_before, "uptermd_open_fds")
    print(
        f"relay limit {max_fds:.0f}; accept_errors{{EMFILE}} {emfile:.0f}; fds {base:.0f} "
        f"before, {fds:.0f} after the flood; new joiner after the flood: "
        + (f"in after {join_s:.2f} s" if join_s is not None else join_error)
    )
    verdict(
        out,
        (max_fds == limit, f"the relay's limit is {max_fds:.0f}, not {limit}"),
        (emfile > 0, 'no uptermd_accept_errors_total{errno="EMFILE"}'),
        (join_s is not None, f"no new joiner after the flood: {join_error}"),
        (fds <= base + 16, f"{fds:.0f} descriptors open after the flood (before: {base:.0f})"),
        join=False,
    )
