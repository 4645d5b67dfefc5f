"""Every way into the relay, allowed and refused: real asyncssh hosts, real OpenSSH joiners."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh
import pytest

from tests.conftest import SSH_OPTS, make_key, start_shell
from tests.relay.test_relay_public import inproc_relay
from upterm import sshcompat, wire
from upterm.daemon.knownhosts import RelayTrust
from upterm.daemon.session import Session
from upterm.daemon.sshd import GuestPolicy
from upterm.daemon.tunnel import RelayURL, Tunnel
from upterm.errors import RelayPermissionDenied
from upterm.keys import Ed25519Key
from upterm.relay.server import Relay

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def relay():
    # 127.0.0.1 is exempt from penalties, which would end this file's many refused joins
    # early; they are tested from other loopback addresses in test_relay_public.py.
    async with inproc_relay() as r:
        yield r


class Hosted:
    """A host registered on the relay with a shell on a PTY."""

    def __init__(self, tunnel: Tunnel, session: Session, reg: wire.CreateSessionResponse) -> None:
        self.tunnel = tunnel
        self.session = session
        self.reg = reg


async def host_session(
    relay: Relay,
    tmp_path: Path,
    authorized: list[wire.PublicKey] | None = None,
    e2e_only: bool = False,
):
    trust = RelayTrust(name=f"[127.0.0.1]:{relay.port}", known_hosts=tmp_path / "kh")
    tunnel = Tunnel(
        RelayURL("ssh", "127.0.0.1", relay.port),
        trust,
        Ed25519Key.generate(),
        wire.new_session_secret(),
        on_state=lambda state: None,
    )
    reg = await tunnel.connect(authorized or [])
    session = start_shell(tmp_path)
    accepting = asyncio.Event()
    accepting.set()
    policy = GuestPolicy(
        session,
        tunnel.relay_key_blob,
        frozenset(k.blob for k in authorized or []),
        accepting,
        on_join=lambda c: None,
        on_leave=lambda c: None,
        e2e_only=e2e_only,
    )
    await tunnel.serve(policy)
    return tunnel, session, reg


async def ssh_join(
    port: int, user: str, key: Path, typed: bytes, expect: bytes | None = None
) -> tuple[int, bytes, bytes]:
    """Join with OpenSSH, type ``typed`` once the prompt shows, wait for ``expect`` or the end."""
    proc = await asyncio.create_subprocess_exec(
        "ssh",
        "-tt",
        # First -o wins: INFO so the relay's user-auth banner is printed.
        "-o",
        "LogLevel=INFO",
        *SSH_OPTS,
        "-o",
        "BatchMode=yes",
        "-i",
        str(key),
        "-p",
        str(port),
        f"{user}@127.0.0.1",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    out = bytearray()

    async def read_until(marker: bytes) -> bool:
        while marker not in out:
            chunk = await proc.stdout.read(4096)
            if not chunk:
                return False
            out.extend(chunk)
        return True

    async def session() -> None:
        if typed and await read_until(b"$ "):
            proc.stdin.write(typed)
            await proc.stdin.drain()
            if expect is not None:
                await read_until(expect)
                return
        out.extend(await proc.stdout.read())

    await asyncio.wait_for(session(), 30)
    if proc.returncode is None and expect is not None:
        proc.terminate()
    err = await proc.stderr.read()
    rc = await asyncio.wait_for(proc.wait(), 10)
    return rc, bytes(out), err


async def test_unknown_token_refused_with_banner_and_others_undisturbed(relay, tmp_path) -> None:
    key = make_key(tmp_path / "j")
    tunnel, _session, reg = await host_session(relay, tmp_path)
    rc, _, err = await ssh_join(relay.port, "AAAAAAAAAAAAAAAAAAAA", key, b"")
    assert rc == 255
    assert b"upterm: no host is connected for session AAAAAAAAAAAAAAAAAAAA" in err
    assert b"Permission denied (publickey)" in err
    for hostile in ("../../etc/passwd", "x" * 600, "sid:!!notbase64", "a b"):
        rc, _, err = await ssh_join(relay.port, hostile, key, b"")
        assert rc == 255 and b"Permission denied" in err, hostile
    # A token naming another node is never dialled: refused like an unknown session.
    foreign = wire.encode_token(reg.session_id, "10.1.2.3:22")
    rc, _, err = await ssh_join(relay.port, foreign, key, b"")
    assert rc == 255 and b"no host is connected" in err
    # The real session still works.
    rc, out, _ = await ssh_join(relay.port, reg.token, key, b"echo ok-$((3*4)); exit 7\r")
    assert b"ok-12" in out
    assert rc == 7
    tunnel.close()


async def test_relay_refuses_keys_the_host_did_not_authorize(relay, tmp_path) -> None:
    good, bad = make_key(tmp_path / "good"), make_key(tmp_path / "bad")
    good_pub = wire.parse_public_key_line((tmp_path / "good.pub").read_text())
    tunnel, session, reg = await host_session(relay, tmp_path, [good_pub])
    rc, _, err = await ssh_join(relay.port, reg.token, bad, b"")
    assert rc == 255 and b"Permission denied (publickey)" in err
    # The joiner is told why, naming the key it tried, once.
    bad_fp = wire.parse_public_key_line((tmp_path / "bad.pub").read_text())
    assert bad_fp is not None
    said = f"upterm: session {reg.session_id} does not let in key {bad_fp.fingerprint};"
    assert err.count(said.encode()) == 1, err
    rc, out, _ = await ssh_join(relay.port, reg.token, good, b"echo in-$((2+3))\r", b"in-5")
    assert b"in-5" in out
    session.hangup()
    tunnel.close()


async def _raw_host(relay: Relay) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        relay.port,
        client_version="upterm-host-client",
        username="mallory",
        client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        known_hosts=None,
        agent_path=None,
        config=None,
    )


async def test_another_host_cannot_forward_or_cancel_a_session(relay, tmp_path) -> None:
    key = make_key(tmp_path / "j")
    tunnel, session, reg = await host_session(relay, tmp_path)
    async with await _raw_host(relay) as mallory:
        with pytest.raises((asyncssh.ChannelListenError, ValueError)):
            await mallory.create_unix_server(lambda: None, reg.session_id)
        # asyncssh will not send a cancel for a forward it does not hold; send it raw. The
        # relay treats it as the protocol violation it is: refused, or the peer dropped.
        try:
            reply = await sshcompat.global_request(
                mallory,
                wire.CANCEL_STREAMLOCAL_FORWARD_REQUEST,
                wire.ssh_string(reg.session_id.encode()),
            )
            assert not reply.ok
        except asyncssh.ConnectionLost:
            pass
    assert relay.table.get(reg.session_id) is not None
    _, out, _ = await ssh_join(relay.port, reg.token, key, b"echo still-$((9*9))\r", b"still-81")
    assert b"still-81" in out
    session.hangup()
    tunnel.close()


async def test_malformed_registration_is_refused_and_connection_survives(relay) -> None:
    async with await _raw_host(relay) as host:
        reply = await sshcompat.global_request(host, wire.CREATE_SESSION_REQUEST, b"\xff\xff\xff")
        assert not reply.ok
        assert reply.payload.startswith(b"malformed create-session request")
        bad_proof = wire.CreateSessionRequest(
            host_user="m",
            host_public_keys=(Ed25519Key.generate().public.authorized_key_line(),),
            session_secret=bytes(16),
            generation=1,
            host_key_proof=b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x40" + bytes(64),
        )
        reply = await sshcompat.global_request(
            host, wire.CREATE_SESSION_REQUEST, bad_proof.encode()
        )
        assert (reply.ok, reply.payload) == (False, b"upterm: session proof refused: bad signature")
        # Legacy registration (no proof) still works on the same connection: random id.
        legacy = wire.CreateSessionRequest(
            host_user="m", host_public_keys=(Ed25519Key.generate().public.authorized_key_line(),)
        )
        reply = await sshcompat.global_request(host, wire.CREATE_SESSION_REQUEST, legacy.encode())
        assert reply.ok
        resp = wire.CreateSessionResponse.decode(reply.payload)
        assert len(resp.session_id) == 20 and resp.session_id.isalnum()
        assert resp.ssh_user == wire.encode_token(resp.session_id, relay.node_addr)
        assert resp.session_key_redial is True


async def test_joiners_cannot_create_sessions(relay, tmp_path) -> None:
    """A joiner banner cannot register: it never gets past auth without a live session, and a
    joiner of a live session that sends create-session is refused."""
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            relay.port,
            username="AAAAAAAAAAAAAAAAAAAA",
            client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            known_hosts=None,
            agent_path=None,
            config=None,
        )
    tunnel, session, reg = await host_session(relay, tmp_path)
    async with asyncssh.connect(
        "127.0.0.1",
        relay.port,
        username=reg.token,
        client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        known_hosts=None,
        agent_path=None,
        config=None,
    ) as joiner:
        legacy = wire.CreateSessionRequest(
            host_user="m", host_public_keys=(Ed25519Key.generate().public.authorized_key_line(),)
        )
        reply = await sshcompat.global_request(joiner, wire.CREATE_SESSION_REQUEST, legacy.encode())
        assert (reply.ok, reply.payload) == (False, b"only hosts may create sessions")
    assert len(relay.table) == 1
    session.hangup()
    tunnel.close()


async def test_proven_session_id_is_derived_and_replayed_proof_is_useless(relay, tmp_path) -> None:
    key = Ed25519Key.generate()
    secret = wire.new_session_secret()
    tunnel = Tunnel(
        RelayURL("ssh", "127.0.0.1", relay.port),
        RelayTrust(name="r", pinned=relay.identity.key.public.blob),
        key,
        secret,
        on_state=lambda state: None,
    )
    reg = await tunnel.connect([])
    assert reg.session_id == wire.derive_session_id(key.public.blob, secret)
    assert reg.reconnect_supported and reg.e2e_supported  # our relay: -J works
    # The same proof sent on another connection does not verify (it binds the session id H).
    async with await _raw_host(relay) as other:
        stolen = wire.CreateSessionRequest(
            host_user="m",
            host_public_keys=(key.public.authorized_key_line(),),
            session_secret=secret,
            generation=2,
            host_key_proof=wire.sign_proof(key.private, wire.proof_payload(b"H" * 32, secret, 2)),
        )
        reply = await sshcompat.global_request(other, wire.CREATE_SESSION_REQUEST, stolen.encode())
        assert reply.payload == b"upterm: session proof refused: bad signature"
    tunnel.close()


async def test_changed_relay_key_is_refused(relay, tmp_path) -> None:
    tunnel = Tunnel(
        RelayURL("ssh", "127.0.0.1", relay.port),
        RelayTrust(name="r", pinned=Ed25519Key.generate().public.blob),
        Ed25519Key.generate(),
        wire.new_session_secret(),
        on_state=lambda state: None,
    )
    from upterm.errors import HostKeyChanged

    with pytest.raises(HostKeyChanged):
        await tunnel.connect([])


async def test_superseded_registration_is_refused(relay, tmp_path) -> None:
    key, secret = Ed25519Key.generate(), wire.new_session_secret()

    def make() -> Tunnel:
        return Tunnel(
            RelayURL("ssh", "127.0.0.1", relay.port),
            RelayTrust(name="r", pinned=relay.identity.key.public.blob),
            key,
            secret,
            on_state=lambda state: None,
        )

    first, second = make(), make()
    await first.connect([])
    # A second process with the same key and secret at the same generation: refused.
    with pytest.raises(RelayPermissionDenied, match="superseded by a newer registration"):
        await second.connect([])
    first.close()
    second.close()


async def test_one_host_connection_cannot_grow_the_relay_without_bound(relay) -> None:
    async with await _raw_host(relay) as host:
        replies = []
        for _ in range(10):
            req = wire.CreateSessionRequest(
                host_user="m",
                host_public_keys=(Ed25519Key.generate().public.authorized_key_line(),),
            )
            replies.append(
                await sshcompat.global_request(host, wire.CREATE_SESSION_REQUEST, req.encode())
            )
        assert [r.ok for r in replies] == [True] * 8 + [False] * 2
        assert replies[-1].payload == (b"upterm: too many sessions on one connection (at most 8)")
        many_keys = wire.CreateSessionRequest(
            host_user="m",
            host_public_keys=(Ed25519Key.generate().public.authorized_key_line(),),
            client_authorized_keys=(b"ssh-ed25519 AAAA",) * 2000,
        )
    async with await _raw_host(relay) as other:
        reply = await sshcompat.global_request(
            other, wire.CREATE_SESSION_REQUEST, many_keys.encode()
        )
        assert reply.payload == b"failed to create session: too many authorized keys"
