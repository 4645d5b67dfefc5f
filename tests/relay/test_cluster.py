"""uptermd nodes sharing sessions through Redis: real redis-server, real nodes, real ssh.

Every node of a cluster here shares one state directory, hence the cluster key (the
relay's ed25519 key: hosts pin it, it signs guest and hop certificates).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import SSH_OPTS, VENV_BIN, PtyClient, RelayProc, UserEnv, wait_for
from tests.e2e.test_cli_e2e import Joiner, headless
from tests.e2e.test_reconnect_e2e import host, info
from tests.relay.clusterkit import (
    Balancer,
    RedisServer,
    balancer,
    member_addrs,
    metric,
    ready,
    redis_cluster,
    sentinel_set,
    session_owner,
    start_node,
    stop,
    tcp_proxy,
    wait_owner,
)
from tests.relay.test_websocket import free_port
from upterm import wire
from upterm.keys import Ed25519Key
from upterm.relay.cluster import LeaseHeld, RedisRegistry, SessionRecord
from upterm.relay.hop import build_hop_certificate


def ed25519_private(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_ssh_private_key(path.read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def nodes(user_env: UserEnv, redis: RedisServer) -> Iterator[list[RelayProc]]:
    state = user_env.root / "cluster-state"
    started: list[RelayProc] = []
    try:
        for _ in range(3):
            started.append(start_node(user_env, redis.url, state))
        yield started
    finally:
        for node in started:
            stop(node.proc)


def via(line: str, a: RelayProc, c: RelayProc) -> str:
    """The printed line with node A's address replaced by node C's (same token)."""
    return line.replace(f"127.0.0.1:{a.port}", f"127.0.0.1:{c.port}").replace(
        f"-p {a.port}", f"-p {c.port}"
    )


def joiner_config(tmp_path: Path, key: Path) -> Path:
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host *\n"
        f"    IdentityFile {key}\n"
        "    IdentitiesOnly yes\n"
        "    UserKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking no\n"
        "    LogLevel ERROR\n"
    )
    return config


def test_a_joiner_on_any_node_reaches_a_host_on_another(
    user_env: UserEnv, redis: RedisServer, nodes: list[RelayProc], joiner_key: Path, tmp_path: Path
) -> None:
    a, _b, c = nodes
    first = host(user_env, a.url, "cl")
    gen, owner = wait_owner(redis, first["sessionId"])
    assert gen >= 1 and owner
    # Relay mode, entering at C: C authenticates the joiner, hops to A, A to the host.
    moved = dict(first, sshCommand=via(first["sshCommand"], a, c))
    assert moved["sshCommand"] != first["sshCommand"]
    joiner = Joiner(moved, joiner_key)
    joiner.expect(b"$ ")
    joiner.type("echo hop-$((6*7))\r")
    joiner.expect(b"hop-42")
    # The host sees the joiner's own address and client, not node C's.
    clients = info(user_env, "cl")["clients"]
    assert clients and all("OpenSSH" in cl["version"] for cl in clients), clients
    joiner.close()

    # End to end, entering at C: the splice goes through the hop; the host's key is pinned.
    config = joiner_config(tmp_path, joiner_key)
    argv = shlex.split(via(first["e2eCommand"], a, c))
    assert argv[0] == "ssh" and f"127.0.0.1:{c.port}" in argv[2]
    e2e = PtyClient([argv[0], "-F", str(config), *argv[1:], "-tt"], user_env.env)
    e2e.expect(b"$ ")
    e2e.type("echo e2e-$((5*5))\r")
    e2e.expect(b"e2e-25")
    modes = {cl.get("mode") for cl in info(user_env, "cl")["clients"]}
    assert "e2e" in modes, modes
    e2e.close()

    # File transfer through the hop: listing asks nobody; a download asks the host, who has
    # no terminal attached here, so it is refused (never allowed).
    sftp_line = first["sftpCommand"].replace(f"-P {a.port}", f"-P {c.port}")
    assert sftp_line != first["sftpCommand"]
    argv = shlex.split(sftp_line)
    (Path(user_env.env["HOME"]) / "hop.txt").write_text("far away\n")
    files = subprocess.run(
        [argv[0], "-F", str(config), "-b", "-", *argv[1:]],
        input=f"pwd\nls\nget hop.txt {tmp_path}/x\n",
        capture_output=True, text=True, timeout=60, env=user_env.env,
    )  # fmt: skip
    assert f"Remote working directory: {user_env.env['HOME']}" in files.stdout, files.stderr
    assert "hop.txt" in files.stdout and files.returncode != 0
    assert "download ~/hop.txt refused: nobody could answer" in files.stderr, files.stderr
    assert not (tmp_path / "x").exists()


def ssh_stderr(port: int, user: str, key: Path) -> tuple[int, str]:
    """A plain OpenSSH join that shows the relay's banner (LogLevel INFO): exit, stderr."""
    out = subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-i",
            str(key),
            "-p",
            str(port),
            f"{user}@127.0.0.1",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return out.returncode, out.stderr


def test_a_session_nobody_registered_is_refused_on_every_node(
    nodes: list[RelayProc], joiner_key: Path
) -> None:
    for node in nodes:
        code, err = ssh_stderr(node.port, "AAAAAAAAAAAAAAAAAAAA", joiner_key)
        assert code == 255
        assert "no host is connected for session AAAAAAAAAAAAAAAAAAAA" in err


async def _hop(
    port: int,
    user: str,
    key: asyncssh.SSHKey,
    cert: bytes | None,
    during: Callable[[], Any] = lambda: None,
) -> str:
    """Knock on a node's cluster listener as a node would; what happened (``during`` runs
    while the shell is open)."""
    keys: list[Any] = [(key, asyncssh.import_certificate(cert))] if cert else [key]
    try:
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            username=user,
            client_keys=keys,
            known_hosts=None,
            agent_path=None,
            config=None,
            preferred_auth="publickey",
        ) as conn:
            proc = await conn.create_process(term_type="xterm", encoding=None)
            seen = b""
            while b"$ " not in seen:
                seen += await asyncio.wait_for(proc.stdout.read(4096), 15)
            proc.stdin.write(b"echo hop-in-$((8*8))\r")
            while b"hop-in-64" not in seen:
                seen += await asyncio.wait_for(proc.stdout.read(4096), 15)
            await asyncio.to_thread(during)
            return "shell"
    except asyncssh.PermissionDenied:
        return "denied"


def test_only_a_certificate_from_the_cluster_key_for_the_held_generation_gets_in(
    user_env: UserEnv, redis: RedisServer, nodes: list[RelayProc], joiner_key: Path
) -> None:
    """The cluster listener is not a way around joiner authentication: forged, self-signed,
    stale and wrong-key certificates and plain keys are all refused; the real thing works."""
    a = nodes[0]
    first = host(user_env, a.url, "sec", "--authorized-keys", f"{joiner_key}.pub")
    sid, user = first["sessionId"], first["sshUser"]
    gen, owner = wait_owner(redis, sid)
    port = member_addrs(redis)[owner]
    cluster = ed25519_private(a.state_dir / "ssh_host_ed25519_key")
    joiner_line = Path(f"{joiner_key}.pub").read_text()
    auth = wire.AuthRequest("SSH-2.0-OpenSSH_9.9", "198.51.100.7:4242", joiner_line.encode(), "")
    hop_key = ed25519.Ed25519PrivateKey.generate()
    hop_ssh = asyncssh.import_private_key(Ed25519Key(hop_key).private_openssh())
    cluster_ssh = asyncssh.import_private_key(Ed25519Key(cluster).private_openssh())
    now = int(time.time())

    def cert(
        signer: ed25519.Ed25519PrivateKey, certified: ed25519.Ed25519PrivateKey, **kw: Any
    ) -> bytes:
        args: dict[str, Any] = {
            "principal": user,
            "auth": auth,
            "generation": gen,
            "from_node": "test",
            "to_node": owner,
            "now": now,
        }
        args.update(kw)
        return build_hop_certificate(signer, certified.public_key(), **args)

    other = ed25519.Ed25519PrivateKey.generate()
    stranger = wire.AuthRequest(
        "SSH-2.0-OpenSSH_9.9",
        "198.51.100.7:4242",
        Ed25519Key(other).public_line() + b"\n",
        "",
    )
    attempts = {
        "forged (another signer)": (hop_ssh, cert(other, hop_key)),
        "self-signed by the cluster key": (cluster_ssh, cert(cluster, cluster)),
        "stale generation": (hop_ssh, cert(cluster, hop_key, generation=gen - 1)),
        "newer generation": (hop_ssh, cert(cluster, hop_key, generation=gen + 1)),
        "a joiner key the host does not allow": (hop_ssh, cert(cluster, hop_key, auth=stranger)),
        "expired": (hop_ssh, cert(cluster, hop_key, now=now - 600)),
        "another user (token)": (hop_ssh, cert(cluster, hop_key, principal=user + "x")),
        "meant for another node": (hop_ssh, cert(cluster, hop_key, to_node="elsewhere")),
    }
    for what, (key, line) in attempts.items():
        assert asyncio.run(_hop(port, user, key, line)) == "denied", what
    joiner_ssh = asyncssh.read_private_key(str(joiner_key))
    assert asyncio.run(_hop(port, user, joiner_ssh, None)) == "denied", "a plain joiner key"
    # The real thing: signed by the cluster key, for the held generation, an allowed joiner.
    joined: list[dict[str, Any]] = []
    real = asyncio.run(
        _hop(
            port,
            user,
            hop_ssh,
            cert(cluster, hop_key),
            lambda: joined.extend(info(user_env, "sec")["clients"]),
        )
    )
    assert real == "shell"
    # The host is told what the entry node vouched for: the joiner's address and client.
    assert [(c["addr"], c["version"]) for c in joined] == [
        ("198.51.100.7:4242", "SSH-2.0-OpenSSH_9.9")
    ]
    log = (user_env.root / "uptermd.log").read_text()
    assert "refused a hop" in log


def test_two_nodes_racing_for_one_session_id_never_both_win(redis: RedisServer) -> None:
    async def race() -> None:
        nodes = [
            RedisRegistry(redis.url, node_id=f"n{i}", member_addr=f"127.0.0.1:{i}", ttl_s=5)
            for i in range(2)
        ]
        for node in nodes:
            await node.start()
        lost: list[str] = []
        try:
            for round_ in range(50):
                sid = f"race{round_}"
                results = await asyncio.gather(
                    *(n.claim(SessionRecord(sid, 1, n.node_id), lost.append) for n in nodes),
                    return_exceptions=True,
                )
                winners = [n for n, r in zip(nodes, results, strict=True) if r is None]
                assert len(winners) == 1, results
                losers = [r for r in results if r is not None]
                assert isinstance(losers[0], LeaseHeld)
                found = await nodes[0].lookup(sid)
                assert found is not None and found.node_id == winners[0].node_id
                loser = nodes[1 - nodes.index(winners[0])]
                # The loser's writes are fenced off: it cannot update or release the winner's.
                assert not await loser.release(sid, 1)
                assert (await nodes[0].lookup(sid)) == found
                # A newer generation takes over; the old one can no longer come back.
                await loser.claim(SessionRecord(sid, 2, loser.node_id), lost.append)
                with pytest.raises(LeaseHeld):
                    await winners[0].claim(SessionRecord(sid, 1, winners[0].node_id), lost.append)
                old = SessionRecord(sid, 1, winners[0].node_id, host_user="stale")
                assert not await winners[0].update(old)
                # Released, the session leaves a tombstone: the old generation cannot
                # bring it back, a newer one may.
                assert await loser.release(sid, 2)
                assert await nodes[0].lookup(sid) is None
                with pytest.raises(LeaseHeld):
                    await winners[0].claim(SessionRecord(sid, 2, winners[0].node_id), lost.append)
                await loser.claim(SessionRecord(sid, 3, loser.node_id), lost.append)
                owner = await nodes[0].lookup(sid)
                assert owner is not None and (owner.generation, owner.node_id) == (3, loser.node_id)
            # Each superseded winner notices at its next renewal, and only those.
            assert not lost
            await asyncio.gather(*(n.renew_due(everything=True) for n in nodes))
            assert len(lost) == 50 and all("superseded by generation 3" in w for w in lost)
        finally:
            for node in nodes:
                await node.close()

    asyncio.run(race())


def rejoin_within(line_info: dict, key: Path, seconds: float, marker: str) -> float:
    """Join with the same line until the shell answers; how long it took."""
    t0 = time.monotonic()
    while True:
        joiner = Joiner(line_info, key)
        try:
            joiner.expect(b"$ ", timeout=5)
            joiner.type(f"echo {marker}-$MARK\r")
            joiner.expect(f"{marker}-kept".encode(), timeout=5)
            return time.monotonic() - t0
        except AssertionError:
            assert time.monotonic() - t0 < seconds, joiner.proc.stderr and joiner.seen
        finally:
            joiner.close()
        time.sleep(0.2)


@pytest.fixture
def fronted(
    user_env: UserEnv, redis: RedisServer
) -> Iterator[tuple[Balancer, list[RelayProc], list[int]]]:
    """Three nodes behind one address (HAProxy checking /ready), tokens naming it."""
    lb_port = free_port()
    state = user_env.root / "cluster-state"
    started: list[RelayProc] = []
    metrics = [free_port() for _ in range(3)]
    lb: Balancer | None = None
    try:
        for m in metrics:
            started.append(
                start_node(
                    user_env,
                    redis.url,
                    state,
                    "--node-addr",
                    f"127.0.0.1:{lb_port}",
                    "--metric-addr",
                    f"127.0.0.1:{m}",
                )
            )
        lb = balancer(
            user_env.root, [(n.port, m) for n, m in zip(started, metrics, strict=True)], lb_port
        )
        yield lb, started, metrics
    finally:
        if lb is not None:
            lb.stop()
        for node in started:
            stop(node.proc)


def test_a_dead_nodes_host_redials_to_another_and_the_same_line_works_within_10s(
    user_env: UserEnv,
    redis: RedisServer,
    fronted: tuple[Balancer, list[RelayProc], list[int]],
    joiner_key: Path,
) -> None:
    lb, (a, _b, _c), metrics = fronted
    first = host(user_env, f"ssh://127.0.0.1:{lb.port}", "fo")
    assert first["sshCommand"].endswith(f"@127.0.0.1 -p {lb.port}")
    gen, owner = wait_owner(redis, first["sessionId"])
    assert metric(metrics[0], "uptermd_sessions") == 1  # A took it (balance first)
    joiner = Joiner(first, joiner_key)
    joiner.expect(b"$ ")
    joiner.type("export MARK=kept; echo set-$((2+3))\r")
    joiner.expect(b"set-5")

    a.proc.kill()  # kill -9: no drain, no goodbye
    t0 = time.monotonic()
    assert joiner.proc.wait(15) == 255
    took = rejoin_within(first, joiner_key, 10 - (time.monotonic() - t0), "back")
    elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    now = info(user_env, "fo")
    assert now["sessionId"] == first["sessionId"] and now["sshCommand"] == first["sshCommand"]
    gen2, owner2 = wait_owner(redis, first["sessionId"])
    assert gen2 > gen and owner2 != owner
    print(f"failover: joiner back in {elapsed:.2f} s after kill -9 (rejoin loop {took:.2f} s)")


def test_redis_flushall_and_restart_lose_nothing_a_user_sees(
    user_env: UserEnv, redis: RedisServer, nodes: list[RelayProc], joiner_key: Path
) -> None:
    a, _b, c = nodes
    first = host(user_env, a.url, "fl")
    sid = first["sessionId"]
    gen, owner = wait_owner(redis, sid)
    through_c = dict(first, sshCommand=via(first["sshCommand"], a, c))
    joiner = Joiner(through_c, joiner_key)  # a hop, kept open throughout
    joiner.expect(b"$ ")
    joiner.type("export MARK=kept; echo set-$((3+4))\r")
    joiner.expect(b"set-7")

    assert redis.command("FLUSHALL").startswith(b"+OK")
    assert session_owner(redis, sid) is None
    assert wait_owner(redis, sid, 5) == (gen, owner)  # A put it back at its next renewal
    rejoin_within(through_c, joiner_key, 10, "after-flush")

    redis.kill()  # everything in it is gone (no persistence)
    redis.start()  # the same port, empty
    assert wait_owner(redis, sid, 5) == (gen, owner)
    rejoin_within(through_c, joiner_key, 10, "after-restart")
    # The joiner that was there all along never noticed.
    joiner.type("echo still-$MARK\r")
    joiner.expect(b"still-kept")
    joiner.close()
    assert info(user_env, "fl")["reconnects"] == 0


def test_registry_down_fails_closed_and_everything_comes_back_by_itself(
    user_env: UserEnv, redis: RedisServer, nodes: list[RelayProc], joiner_key: Path
) -> None:
    a = nodes[0]
    first = host(user_env, a.url, "down")
    sid = first["sessionId"]
    joiner = Joiner(first, joiner_key)
    joiner.expect(b"$ ")
    joiner.type("export MARK=kept; echo set-$((4+4))\r")
    joiner.expect(b"set-8")
    redis.kill()
    t0 = time.monotonic()
    # Within the lease (3 s here) the node lets go: the joiner is told, the host redials.
    joiner.proc.wait(10)
    dropped = time.monotonic() - t0
    assert joiner.proc.stderr is not None
    assert b"moved to another relay node" in joiner.proc.stderr.read()
    assert dropped < 3.0, dropped
    wait_for(lambda: info(user_env, "down")["relayState"] == "reconnecting", what="redial")
    # No node registers anything meanwhile, and says why.
    out = headless(
        user_env,
        "host",
        "--detach",
        "--accept",
        "--name",
        "new",
        "--server",
        a.url,
        "--skip-host-key-check",
        "--known-hosts",
        str(Path(user_env.env["HOME"]) / "known_hosts"),
        "--",
        "true",
    )
    print("REFUSED", out.returncode, out.stdout, out.stderr)
    assert out.returncode != 0
    assert "cannot reach its session registry" in out.stderr
    time.sleep(4)
    redis.start()
    wait_for(lambda: info(user_env, "down")["relayState"] == "connected", 45, what="re-registered")
    assert wait_owner(redis, sid)[0] > 1
    rejoin_within(first, joiner_key, 10, "again")


def test_a_node_cut_off_from_redis_lets_go_before_anyone_else_may_serve(
    user_env: UserEnv, redis: RedisServer, joiner_key: Path
) -> None:
    """Node A reaches Redis through a proxy we freeze (its packets go nowhere); clients still
    reach A. A must stop serving before its lease could be granted elsewhere, leave the load
    balancer (its /ready fails), and the session comes back on B with the same line."""
    cut = tcp_proxy(user_env.root, redis.port)
    lb_port = free_port()
    state = user_env.root / "cluster-state"
    metrics = [free_port() for _ in range(2)]
    urls = [f"redis://127.0.0.1:{cut.port}", redis.url]
    started = [
        start_node(
            user_env,
            url,
            state,
            "--node-addr",
            f"127.0.0.1:{lb_port}",
            "--metric-addr",
            f"127.0.0.1:{m}",
        )
        for url, m in zip(urls, metrics, strict=True)
    ]
    lb = balancer(
        user_env.root, [(n.port, m) for n, m in zip(started, metrics, strict=True)], lb_port
    )
    a = started[0]
    try:
        first = host(user_env, f"ssh://127.0.0.1:{lb.port}", "cut")
        sid = first["sessionId"]
        gen, owner = wait_owner(redis, sid)
        assert metric(metrics[0], "uptermd_sessions") == 1
        joiner = Joiner(first, joiner_key)
        joiner.expect(b"$ ")
        joiner.type("export MARK=kept; echo set-$((5+5))\r")
        joiner.expect(b"set-10")

        os.kill(cut.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        joiner.proc.wait(10)
        dropped = time.monotonic() - t0
        # Its last renewal was at most a third of the TTL (1 s) before the cut: it let go
        # before the 3 s lease could expire in Redis.
        assert dropped < 3.0, dropped
        took = rejoin_within(first, joiner_key, 10, "on-b")
        gen2, owner2 = wait_owner(redis, sid)
        assert gen2 > gen and owner2 != owner
        # A, still reachable, serves nobody: it cannot look the session up.
        code, err = ssh_stderr(a.port, first["sshUser"], joiner_key)
        assert code == 255 and "can't look up sessions right now" in err, err
        print(f"partition: A let go after {dropped:.2f} s; back on B {took:.2f} s later")

        os.kill(cut.proc.pid, signal.SIGCONT)
        # Healed: A carries joiners to B like any other node.
        assert metric(metrics[0], 'uptermd_lease_events_total{event="lost"}') == 1
        wait_for(lambda: ready(metrics[0]), 10, what="A to be ready again")
        direct = dict(
            first, sshCommand=first["sshCommand"].replace(f"-p {lb.port}", f"-p {a.port}")
        )
        rejoin_within(direct, joiner_key, 10, "via-a")
        assert metric(metrics[0], "uptermd_sessions") == 0
    finally:
        os.kill(cut.proc.pid, signal.SIGCONT)
        lb.stop()
        cut.stop()
        for node in started:
            stop(node.proc)


def test_a_sentinel_failover_that_loses_the_last_write_cannot_give_the_session_back(
    tmp_path: Path,
) -> None:
    """The newest registration (generation 2, node B) reaches the master but not the
    replica, the master dies, Sentinel promotes the replica: the registry says generation 1,
    node A, again. A's next renewal even succeeds. The fencing token settles it: B's renewal
    finds an older generation and claims the session back, after which A's renewal finds
    generation 2 and A lets go (and would refuse any hop for generation 1 meanwhile, since
    hops carry the generation they were routed by)."""
    sset = sentinel_set(tmp_path)

    async def scenario() -> None:
        a_lost: list[str] = []
        b_lost: list[str] = []
        # A long TTL: nothing renews behind the test's back; every renewal here is explicit.
        a, b = (
            RedisRegistry(sset.url, node_id=n, member_addr=f"127.0.0.1:{i}", ttl_s=60)
            for i, n in enumerate(("node-a", "node-b"))
        )
        await a.start()
        await b.start()
        try:
            await a.claim(SessionRecord("sid", 1, "node-a"), a_lost.append)
            wait_for(
                lambda: session_owner(sset.replica, "sid") == (1, "node-a"), 5, what="replication"
            )
            sset.freeze_replication()
            await b.claim(SessionRecord("sid", 2, "node-b"), b_lost.append)
            assert session_owner(sset.master, "sid") == (2, "node-b")
            sset.master.kill()
            sset.lose_replication()
            wait_for(lambda: sset.master_port() == sset.replica.port, 20, what="Sentinel failover")
            # The write is lost: the promoted replica names the old owner.
            assert session_owner(sset.replica, "sid") == (1, "node-a")
            assert (await a.lookup("sid")) == SessionRecord("sid", 1, "node-a")
            # A renews first and succeeds: alone, the registry cannot tell it is stale.
            await a.renew_due(everything=True)
            assert not a_lost and a.holds("sid", 1)
            # B renews: an older generation sits there, so B claims it back.
            await b.renew_due(everything=True)
            assert not b_lost and b.holds("sid", 2)
            assert session_owner(sset.replica, "sid") == (2, "node-b")
            # A's next renewal sees generation 2: A lets go and no longer holds anything.
            await a.renew_due(everything=True)
            assert a_lost == ["superseded by generation 2"]
            assert not a.holds("sid", 1)
            assert b.stats.reclaims == 1
        finally:
            await a.close(release=False)
            await b.close(release=False)

    try:
        asyncio.run(scenario())
    finally:
        sset.stop()


def test_nodes_on_sentinel_ride_out_a_failover(
    user_env: UserEnv, tmp_path: Path, joiner_key: Path
) -> None:
    """--redis-url redis+sentinel://…: the nodes find the master through Sentinel and find
    the new one after a failover, with the session and its line intact."""
    sset = sentinel_set(tmp_path)
    state = user_env.root / "cluster-state"
    started: list[RelayProc] = []
    try:
        # The lease must outlast the failover (Sentinel's down-after plus the promotion),
        # as --lease-ttl's default of 30 s outlasts a default Sentinel's.
        started = [start_node(user_env, sset.url, state, ttl="15s") for _ in range(2)]
        a, b = started
        first = host(user_env, a.url, "sen")
        through_b = dict(first, sshCommand=via(first["sshCommand"], a, b))
        joiner = Joiner(through_b, joiner_key)
        joiner.expect(b"$ ")
        joiner.type("export MARK=kept; echo set-$((6+6))\r")
        joiner.expect(b"set-12")
        wait_for(
            lambda: session_owner(sset.replica, first["sessionId"]) is not None,
            5,
            what="replication",
        )
        sset.master.kill()
        wait_for(lambda: sset.master_port() == sset.replica.port, 20, what="Sentinel failover")
        rejoin_within(through_b, joiner_key, 10, "after-failover")
        joiner.type("echo still-$MARK\r")
        joiner.expect(b"still-kept")
        joiner.close()
        assert info(user_env, "sen")["reconnects"] == 0
    finally:
        for node in started:
            stop(node.proc)
        sset.stop()


def test_a_drained_node_hands_its_hosts_to_the_others(
    user_env: UserEnv,
    redis: RedisServer,
    fronted: tuple[Balancer, list[RelayProc], list[int]],
    joiner_key: Path,
) -> None:
    """SIGTERM (a rolling upgrade, a scale-in): the node's hosts are told to reconnect, come
    back on another node under the same session id, and the same line joins the same shell."""
    lb, (a, _b, _c), metrics = fronted
    first = host(user_env, f"ssh://127.0.0.1:{lb.port}", "dr")
    gen, owner = wait_owner(redis, first["sessionId"])
    assert metric(metrics[0], "uptermd_sessions") == 1
    joiner = Joiner(first, joiner_key)
    joiner.expect(b"$ ")
    joiner.type("export MARK=kept; echo set-$((7+7))\r")
    joiner.expect(b"set-14")
    t0 = time.monotonic()
    a.proc.terminate()
    assert joiner.proc.wait(15) != 0
    assert joiner.proc.stderr is not None
    assert b"run the same ssh command again" in joiner.proc.stderr.read()
    took = rejoin_within(first, joiner_key, 10, "moved")
    assert a.proc.wait(15) == 0
    gen2, owner2 = wait_owner(redis, first["sessionId"])
    assert gen2 > gen and owner2 != owner
    now = info(user_env, "dr")
    assert now["sshCommand"] == first["sshCommand"] and now["reconnects"] == 1
    print(f"drain: joiner back {time.monotonic() - t0:.2f} s after SIGTERM ({took:.2f} s loop)")


def test_invites_work_through_any_node(
    user_env: UserEnv, nodes: list[RelayProc], joiner_key: Path, tmp_path: Path
) -> None:
    """The invite codes a host declares reach the registry, so the node a guest enters at
    knows them; the host still decides (one use here)."""
    a, _b, c = nodes
    member = joiner_key
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    host(
        user_env,
        a.url,
        "inv",
        "--authorized-keys",
        f"{member}.pub",
        "--force-command",
        "bash --norc -c 'echo inside-$((6*6))'",
    )
    out = headless(user_env, "session", "invite", "inv", "--uses", "1", "-o", "json")
    assert out.returncode == 0, out.stderr
    code_line = json.loads(out.stdout)["sshCommand"]
    line = via(code_line, a, c)
    user = shlex.split(line)[1].partition("@")[0]
    # Not a member, but invited: in once, through node C.
    seen = subprocess.run(
        [*shlex.split(line), "-i", str(stranger), *SSH_OPTS, "-o", "BatchMode=yes", "-tt"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert seen.returncode == 0 and "inside-36" in seen.stdout, seen
    code, err = ssh_stderr(c.port, user, stranger)
    assert code != 0 and "no longer valid" in err, err
    # A code the host never declared stops at C.
    forged = user.split("+")[0] + "+AAAAAAAAAAAA" + ":" + user.split(":", 1)[1]
    code, err = ssh_stderr(c.port, forged, stranger)
    assert code == 255 and "invite" in err, err


def test_nodes_on_a_redis_cluster_share_sessions_across_its_shards(
    user_env: UserEnv, tmp_path: Path, joiner_key: Path
) -> None:
    """--redis-url redis+cluster://…: each session's key hashes by its id ({SESSIONID}), every
    script touches that key alone, so registrations spread over the shards and work there."""
    shards = redis_cluster(tmp_path)
    state = user_env.root / "cluster-state"
    started: list[RelayProc] = []
    try:
        started = [start_node(user_env, shards.url, state) for _ in range(2)]
        a, b = started
        first = host(user_env, a.url, "rc")
        through_b = dict(first, sshCommand=via(first["sshCommand"], a, b))
        joiner = Joiner(through_b, joiner_key)
        joiner.expect(b"$ ")
        joiner.type("echo sharded-$((3*11))\r")
        joiner.expect(b"sharded-33")
        joiner.close()

        async def spread() -> list[int]:
            nodes = [
                RedisRegistry(shards.url, node_id=n, member_addr="127.0.0.1:1", ttl_s=3)
                for n in ("x", "y")
            ]
            for node in nodes:
                await node.start()
            try:
                results = await asyncio.gather(
                    *(
                        n.claim(SessionRecord(f"s{i}", 1, n.node_id), lambda _w: None)
                        for i in range(60)
                        for n in nodes
                    ),
                    return_exceptions=True,
                )
                # For every id exactly one of the two racing nodes won, on whatever shard.
                assert sum(r is None for r in results) == 60, results
                assert all(r is None or isinstance(r, LeaseHeld) for r in results)
                wins = [sum(r is None for r in results[k::2]) for k in range(2)]
                await asyncio.gather(*(n.renew_due(everything=True) for n in nodes))
                assert [n.stats.renewals for n in nodes] == wins
                assert [n.stats.losses for n in nodes] == [0, 0]
                return shards.keys_per_server("uptermd:{s*}")
            finally:
                for node in nodes:
                    await node.close()

        per_shard = asyncio.run(spread())
        assert sum(per_shard) == 60 and all(n > 0 for n in per_shard), per_shard
    finally:
        for node in started:
            stop(node.proc)
        shards.stop()


def test_a_joiner_over_websocket_on_another_node(
    user_env: UserEnv, redis: RedisServer, joiner_key: Path
) -> None:
    """The WebSocket door of a node that does not own the session lets the token through to
    SSH authentication (the session may live elsewhere), which then hops as for SSH."""
    state = user_env.root / "cluster-state"
    ws = free_port()
    started: list[RelayProc] = []
    try:
        started = [
            start_node(user_env, redis.url, state),
            start_node(user_env, redis.url, state, "--ws-addr", f"127.0.0.1:{ws}"),
        ]
        a, _b = started
        first = host(user_env, a.url, "wsc")
        token = first["sshUser"]
        proxy = f"{VENV_BIN}/upterm proxy ws://{token}@127.0.0.1:{ws}"
        line = f"ssh -o ProxyCommand='{proxy}' {token}@127.0.0.1"
        joiner = Joiner(dict(first, sshCommand=line), joiner_key)
        joiner.expect(b"$ ")
        joiner.type("echo via-ws-$((2*21))\r")
        joiner.expect(b"via-ws-42")
        joiner.close()
    finally:
        for node in started:
            stop(node.proc)


def test_draining_an_entry_node_tells_the_joiners_it_carries(
    user_env: UserEnv, nodes: list[RelayProc], joiner_key: Path
) -> None:
    """A joiner carried from C to the owner A is told at once when C drains (not cut when
    C's drain time runs out), and comes back in through another node."""
    a, b, c = nodes
    first = host(user_env, a.url, "ent")
    joiner = Joiner(dict(first, sshCommand=via(first["sshCommand"], a, c)), joiner_key)
    joiner.expect(b"$ ")
    joiner.type("export MARK=kept; echo set-$((9+9))\r")
    joiner.expect(b"set-18")
    t0 = time.monotonic()
    c.proc.terminate()
    joiner.proc.wait(10)
    told = time.monotonic() - t0
    assert joiner.proc.stderr is not None
    assert b"run the same ssh command again" in joiner.proc.stderr.read()
    assert told < 5, told  # the drain's settle, not its 10 s timeout
    assert c.proc.wait(15) == 0
    rejoin_within(dict(first, sshCommand=via(first["sshCommand"], a, b)), joiner_key, 10, "b")


async def test_a_flood_of_unknown_sessions_costs_a_bystander_nothing(
    tmp_path: Path, redis: RedisServer
) -> None:
    """Every joiner login naming a session this node does not hold costs a registry lookup
    (one HMGET, bounded by the pre-auth caps like the SSH handshake before it). A flood of
    them from one source leaves a bystander's session on the same node as it was."""
    from tests.relay import attackkit as kit
    from tests.relay.test_relay_attacks import verdict

    relay = kit.start_relay(
        tmp_path / "relay",
        "--routing", "redis", "--redis-url", redis.url, "--cluster-addr", "127.0.0.1:0",
    )  # fmt: skip
    bystander = await kit.Bystander.start(relay.port, tmp_path / "bystander")
    try:
        out = await kit.run_attack(
            "wrong_keys",
            relay,
            bystander,
            tmp_path / "attacker",
            label="unknown-session flood on a cluster node",
            src="127.0.0.2",
            token="ZZZZZZZZZZZZZZZZZZZZ",
            parallel=8,
            settle_s=3,
        )
        unknown = kit.metric(out.metrics, "uptermd_auth_failures_total", reason="unknown-session")
        lookups = kit.metric(out.metrics, "uptermd_registry_seconds_count", op="lookup")
        print(f"unknown-session refusals {unknown:.0f}, registry lookups {lookups:.0f}")
        verdict(
            out,
            (out.done.get("logged_in", 0) == 0, "a login to an unknown session succeeded"),
            (unknown >= 20, f"only {unknown:.0f} unknown-session logins were tried"),
            (lookups >= unknown, "the flood did not reach the registry"),
        )
    finally:
        await bystander.close()
        relay.stop()
