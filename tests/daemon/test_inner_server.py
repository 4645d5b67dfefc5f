"""The host's inner SSH server trusts only certificates from the relay key it pinned.

Real asyncssh on both ends over loopback: the client plays a relay presenting guest
certificates, honest and forged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import asyncssh
import pytest

from tests.conftest import SSH_OPTS, start_shell
from upterm import wire
from upterm.daemon.session import ClientInfo
from upterm.daemon.sshd import PTY_REQUIRED_MESSAGE, GuestPolicy, InnerServer
from upterm.keys import Ed25519Key

pytestmark = pytest.mark.timeout(30)


class Host:
    def __init__(self, policy: GuestPolicy, acceptor: asyncssh.SSHAcceptor) -> None:
        self.policy = policy
        self.acceptor = acceptor
        self.joined: list[ClientInfo] = []

    @property
    def port(self) -> int:
        return int(self.acceptor.sockets[0].getsockname()[1])


@pytest.fixture
async def host(tmp_path):
    relay_key = Ed25519Key.generate()
    session = start_shell(tmp_path)
    accepting = asyncio.Event()
    accepting.set()
    joined: list[ClientInfo] = []
    policy = GuestPolicy(
        session,
        relay_key.public.blob,
        frozenset(),
        accepting,
        on_join=joined.append,
        on_leave=lambda cid: None,
    )
    acceptor = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=lambda: InnerServer(policy),
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        encoding=None,
        line_editor=False,
    )
    h = Host(policy, acceptor)
    h.joined = joined
    h.relay_key = relay_key  # type: ignore[attr-defined]
    yield h
    session.hangup()
    acceptor.close()


def cert_line(
    signer: Ed25519Key, principal: str, joiner: Ed25519Key, now: int | None, key_id: bytes
) -> bytes:
    auth = wire.AuthRequest(
        client_version="SSH-2.0-OpenSSH_9.9",
        remote_addr="192.0.2.7:50000",
        authorized_key=joiner.public.authorized_key_line(),
        local_addr="127.0.0.1:2222",
    )
    return wire.build_guest_certificate(
        signer.private, principal, key_id, auth, now or int(time.time())
    )


def cert_for(signer: Ed25519Key, principal: str, joiner: Ed25519Key, now: int | None = None):
    # asyncssh clients only load UTF-8 key ids; the raw-bytes case is tested with OpenSSH.
    line = cert_line(signer, principal, joiner, now, b"relay-hop")
    return asyncssh.import_private_key(signer.private_openssh()), asyncssh.import_certificate(line)


async def connect_as(host: Host, signer: Ed25519Key, principal: str = "tok", **kw):
    key, cert = cert_for(signer, principal, Ed25519Key.generate(), **kw)
    return await asyncssh.connect(
        "127.0.0.1",
        host.port,
        username=principal,
        client_keys=[(key, cert)],
        known_hosts=None,
        agent_path=None,
        config=None,
    )


async def test_pinned_relay_certificate_gets_a_shared_pty(host: Host) -> None:
    conn = await connect_as(host, host.relay_key)  # type: ignore[attr-defined]
    async with conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
        proc.stdin.write(b"echo inner-$((7*6))\r")
        out = b""
        while b"inner-42" not in out:
            out += await asyncio.wait_for(proc.stdout.read(4096), 10)
        proc.close()
    assert host.joined and host.joined[0].addr == "192.0.2.7:50000"
    assert host.joined[0].version == "SSH-2.0-OpenSSH_9.9"


async def test_self_signed_or_foreign_certificates_are_refused(host: Host) -> None:
    # A forged certificate: valid in itself, signed by a key the host never pinned, claiming
    # to vouch for the one key the host authorized (known to all from a forge's .keys).
    victim = Ed25519Key.generate()
    host.policy.authorized = frozenset({victim.public.blob})
    forger = Ed25519Key.generate()
    line = cert_line(forger, "tok", victim, None, b"forged")
    # The certificate is refused; the client then proves the forger's own key, which the
    # host does not authorize: it is told so, and gets nothing else.
    async with asyncssh.connect(
        "127.0.0.1",
        host.port,
        username="tok",
        client_keys=[
            (
                asyncssh.import_private_key(forger.private_openssh()),
                asyncssh.import_certificate(line),
            )
        ],
        known_hosts=None,
        agent_path=None,
        config=None,
    ) as conn:
        assert "is not allowed in this session" in await refusal(conn)
    assert host.joined == []
    assert [r.fingerprint for r in host.policy.refusals] == [forger.public.fingerprint]


async def test_wrong_principal_or_expired_certificate_is_refused(host: Host) -> None:
    key, cert = cert_for(host.relay_key, "someone-else", Ed25519Key.generate())  # type: ignore[attr-defined]
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            host.port,
            username="tok",
            client_keys=[(key, cert)],
            known_hosts=None,
            agent_path=None,
            config=None,
        )
    with pytest.raises(asyncssh.PermissionDenied):
        await connect_as(host, host.relay_key, now=int(time.time()) - 3600)  # type: ignore[attr-defined]


async def test_bare_key_is_refused(host: Host) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            host.port,
            username="tok",
            client_keys=[asyncssh.import_private_key(host.relay_key.private_openssh())],  # type: ignore[attr-defined]
            known_hosts=None,
            agent_path=None,
            config=None,
        )


async def refusal(conn: asyncssh.SSHClientConnection) -> str:
    """What a refused joiner is told on its terminal (it must exit 1 and join nothing)."""
    proc = await conn.run(term_type="xterm", term_size=(80, 24))
    assert proc.exit_status == 1
    return str(proc.stderr)


async def test_joiner_key_not_authorized_is_refused_with_the_reason(host: Host) -> None:
    host.policy.authorized = frozenset({Ed25519Key.generate().public.blob})
    async with await connect_as(host, host.relay_key) as conn:  # type: ignore[attr-defined]
        told = await refusal(conn)
        # Then the host closes the connection: a refused joiner keeps nothing open.
        await asyncio.wait_for(conn.wait_closed(), 5)
    assert "is not allowed in this session; ask the host to authorize it" in told
    assert host.joined == [] and len(host.policy.refusals) == 1


async def test_session_without_pty_is_told_and_exits_1(host: Host) -> None:
    async with await connect_as(host, host.relay_key) as conn:  # type: ignore[attr-defined]
        result = await asyncio.wait_for(conn.run(encoding=None, stdin=asyncssh.DEVNULL), 10)
    assert result.exit_status == 1
    assert result.stdout == PTY_REQUIRED_MESSAGE


async def test_exec_and_subsystem_requests_are_refused_with_the_reason(
    host: Host, tmp_path
) -> None:
    target = tmp_path / "should-not-exist"
    async with await connect_as(host, host.relay_key) as conn:  # type: ignore[attr-defined]
        proc = await conn.run(f"touch {target}", term_type="xterm")
        assert proc.exit_status == 1
        assert "runs no commands" in str(proc.stderr) and "plain ssh" in str(proc.stderr)
        host.policy.sftp = False  # --no-sftp
        sftp = await conn.run(subsystem="sftp")
        assert sftp.exit_status == 1
        assert "file transfer is disabled for this session" in str(sftp.stderr)
        other = await conn.run(subsystem="netconf")
        assert other.exit_status == 1 and "has no netconf subsystem" in str(other.stderr)
    assert not target.exists()


async def test_go_style_raw_key_id_is_accepted(host: Host, tmp_path) -> None:
    """The Go relay puts the raw exchange hash (not UTF-8) in the key id; asyncssh's own
    parser refuses that, ours must not. OpenSSH presents such a certificate unchanged."""
    relay_key: Ed25519Key = host.relay_key  # type: ignore[attr-defined]
    key_file = tmp_path / "relay"
    key_file.write_bytes(relay_key.private_openssh())
    key_file.chmod(0o600)
    cert_file = tmp_path / "relay-cert.pub"
    cert_file.write_bytes(
        cert_line(relay_key, "tok", Ed25519Key.generate(), None, bytes(range(128, 160)))
    )
    proc = await asyncio.create_subprocess_exec(
        "ssh",
        "-tt",
        *SSH_OPTS,
        "-o",
        "BatchMode=yes",
        "-i",
        str(key_file),
        "-o",
        f"CertificateFile={cert_file}",
        "-p",
        str(host.port),
        "tok@127.0.0.1",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout
    out = b""
    while b"$ " not in out:
        out += await asyncio.wait_for(proc.stdout.read(4096), 10)
    proc.stdin.write(b"echo raw-$((8*8))\r")
    while b"raw-64" not in out:
        out += await asyncio.wait_for(proc.stdout.read(4096), 10)
    proc.terminate()
    await proc.wait()
    assert host.joined


async def test_joiner_closing_its_input_leaves_with_status_0(host: Host) -> None:
    async with await connect_as(host, host.relay_key) as conn:  # type: ignore[attr-defined]
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
        await asyncio.wait_for(proc.stdout.read(2), 10)  # attached: the prompt arrives
        proc.stdin.write_eof()
        result = await asyncio.wait_for(proc.wait(check=False), 10)
    assert result.exit_status == 0
    # The shared command is unaffected.
    assert not host.policy.session.exited.done()


async def test_bare_key_is_an_end_to_end_joiner_unless_it_is_the_relays(host: Host) -> None:
    joiner_key = asyncssh.generate_private_key("ssh-ed25519")
    async with asyncssh.connect(
        "127.0.0.1",
        host.port,
        username="tok",
        client_keys=[joiner_key],
        known_hosts=None,
        agent_path=None,
        config=None,
    ) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
        await asyncio.wait_for(proc.stdout.read(2), 10)
        proc.close()
    assert host.joined[-1].mode == "e2e"
    assert host.joined[-1].addr == "[end-to-end]"
    # With e2e-only, relay certificates are refused, with the line that works.
    host.policy.e2e_only = True
    host.policy.e2e_line = lambda user: f"ssh -J {user}@relay {user}@upterm"
    joined = len(host.joined)
    async with await connect_as(host, host.relay_key) as conn:  # type: ignore[attr-defined]
        told = await refusal(conn)
    assert "end-to-end joins only; join with:\r\n  ssh -J tok@relay tok@upterm" in told
    assert len(host.joined) == joined


async def test_two_channels_one_joiner_leaves_once(host: Host) -> None:
    left: list[str] = []
    host.policy.on_leave = left.append
    async with await connect_as(host, host.relay_key) as conn:  # type: ignore[attr-defined]
        first = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
        second = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
        await asyncio.wait_for(second.stdout.read(2), 10)
        first.close()
        await asyncio.sleep(0.3)
        assert left == []  # still here on the other channel
        second.close()
        await asyncio.sleep(0.3)
    assert len(left) == 1


async def test_forced_command_pty_is_released_when_its_joiner_leaves(host: Host) -> None:
    def ptys() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{fd}") == "/dev/ptmx"
        return count

    host.policy.force_command = ("sleep", "600")
    before = ptys()
    for _ in range(3):
        async with await connect_as(host, host.relay_key) as conn:  # type: ignore[attr-defined]
            proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
            await asyncio.sleep(0.3)
            assert ptys() == before + 1
            proc.close()
    deadline = time.monotonic() + 10
    while ptys() != before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert ptys() == before


async def test_a_flood_of_window_changes_resizes_the_shared_terminal_a_few_times(
    host: Host,
) -> None:
    session = host.policy.session
    applied: list[tuple[int, int]] = []
    real_resize = session.resize

    def recording_resize(viewer_id: str, cols: int, rows: int) -> None:
        applied.append((cols, rows))
        real_resize(viewer_id, cols, rows)

    session.resize = recording_resize  # type: ignore[method-assign]
    conn = await connect_as(host, host.relay_key)  # type: ignore[attr-defined]
    async with conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
        proc.stdin.write(b"echo ready-$((2*2))\r")
        out = b""
        while b"ready-4" not in out:
            out += await asyncio.wait_for(proc.stdout.read(4096), 10)
        applied.clear()
        start = time.monotonic()
        for i in range(300):  # a joiner dragging its window, or a hostile one
            proc.change_terminal_size(40 + i % 50, 10 + i % 20)
        await asyncio.sleep(0.5)
        elapsed = time.monotonic() - start
        # At most one per interval (plus the first and the trailing one), and the last
        # size the joiner asked for is the one that stays.
        assert 1 <= len(applied) <= elapsed / 0.1 + 3, (len(applied), elapsed)
        assert applied[-1] == (40 + 299 % 50, 10 + 299 % 20)
        assert session.size == applied[-1]
        proc.close()


class _ForgedSignatures(asyncssh.SSHClient):
    """A client that offers a real public key but cannot sign with it (it holds another)."""

    def __init__(self, shown: asyncssh.SSHKey) -> None:
        self._shown = shown
        self._tried = False

    async def public_key_auth_requested(self):  # type: ignore[override]
        if self._tried:
            return None
        self._tried = True
        impostor = asyncssh.generate_private_key("ssh-ed25519")
        pair = asyncssh.load_keypairs([impostor])[0]
        # The request names the victim's key; the signature is the impostor's.
        pair.public_data = self._shown.public_data
        return pair


async def test_the_host_is_asked_only_about_a_key_the_joiner_proved_it_holds(
    host: Host,
) -> None:
    """A key query, or a signed request whose signature is not the key's, must not ask the
    host, spend an invite or say whether the key would be let in."""
    asked: list[ClientInfo] = []
    host.policy.approve = True
    host.policy.on_pending = asked.append
    victim = asyncssh.generate_private_key("ssh-ed25519")
    host.policy.authorized = frozenset({bytes(victim.public_data)})
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            host.port,
            username="tok",
            client_factory=lambda: _ForgedSignatures(victim),
            known_hosts=None,
            agent_path=None,
            config=None,
        )
    await asyncio.sleep(0.2)
    assert asked == [] and host.policy.pending == {}


class _BannerClient(asyncssh.SSHClient):
    def __init__(self) -> None:
        self.banners: list[str] = []

    def auth_banner_received(self, msg: str, lang: str) -> None:
        self.banners.append(msg)


async def test_sha1_rsa_signatures_are_refused_with_a_banner(host: Host) -> None:
    """A client that signs with ssh-rsa (SHA-1) although it is not advertised is refused,
    as current OpenSSH refuses it, and told why; rsa-sha2-256 from the same key gets in."""
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    client = _BannerClient()
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1",
            host.port,
            username="tok",
            client_factory=lambda: client,
            client_keys=[rsa],
            signature_algs=["ssh-rsa"],
            known_hosts=None,
            agent_path=None,
            config=None,
        )
    assert any("signed with SHA-1 (ssh-rsa), which is refused" in b for b in client.banners)
    async with asyncssh.connect(
        "127.0.0.1",
        host.port,
        username="tok",
        client_keys=[rsa],
        signature_algs=["rsa-sha2-256"],
        known_hosts=None,
        agent_path=None,
        config=None,
    ) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
        await asyncio.wait_for(proc.stdout.read(2), 10)
        proc.close()
