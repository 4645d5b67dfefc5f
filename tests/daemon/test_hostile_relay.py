"""A relay is not trusted with file names or terminal text: a hostile answer is refused."""

from __future__ import annotations

import asyncssh
import pytest

from upterm import sshcompat, wire
from upterm.daemon.knownhosts import RelayTrust
from upterm.daemon.tunnel import RelayURL, Tunnel
from upterm.errors import RelayPermissionDenied, RelayUnreachable
from upterm.keys import Ed25519Key

pytestmark = pytest.mark.timeout(30)


async def _relay_and_tunnel(factory, tmp_path) -> tuple[asyncssh.SSHAcceptor, Tunnel]:
    """A fake relay on a loopback port, and a host's tunnel to it (trusting it on first use)."""
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_factory=factory,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
    )
    port = server.sockets[0].getsockname()[1]
    tunnel = Tunnel(
        RelayURL("ssh", "127.0.0.1", port),
        RelayTrust(name=f"[127.0.0.1]:{port}", known_hosts=tmp_path / "kh", accept_new=True),
        Ed25519Key.generate(),
        wire.new_session_secret(),
        on_state=lambda state: None,
    )
    return server, tunnel


class _EvilRelay(asyncssh.SSHServer):
    def __init__(self, answer: wire.CreateSessionResponse) -> None:
        self._answer = answer

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        async def reply(_payload: bytes) -> sshcompat.GlobalReply:
            return sshcompat.GlobalReply(True, self._answer.encode())

        sshcompat.install_global_request_handler(conn, wire.CREATE_SESSION_REQUEST, reply)

    def begin_auth(self, username: str) -> bool:
        return False


@pytest.mark.parametrize(
    "answer",
    [
        wire.CreateSessionResponse("../../docker", "127.0.0.1:1", ""),
        wire.CreateSessionResponse("/etc/passwd", "127.0.0.1:1", ""),
        wire.CreateSessionResponse("abc", "127.0.0.1:1", "xyz:MTI3"),
        wire.CreateSessionResponse("abc\x1b]52;c;", "127.0.0.1:1", ""),
        wire.CreateSessionResponse("abc", "\x1b[2J", ""),
    ],
)
async def test_hostile_registration_answers_are_refused(answer, tmp_path) -> None:
    server, tunnel = await _relay_and_tunnel(lambda: _EvilRelay(answer), tmp_path)
    with pytest.raises(RelayUnreachable, match="answered nonsense"):
        await tunnel.connect([])
    server.close()


class _RefusingRelay(asyncssh.SSHServer):
    """Refuses every registration with a reason full of terminal escapes."""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        async def refuse(_payload: bytes) -> sshcompat.GlobalReply:
            return sshcompat.GlobalReply(False, HOSTILE_TEXT.encode())

        sshcompat.install_global_request_handler(conn, wire.CREATE_SESSION_REQUEST, refuse)

    def begin_auth(self, username: str) -> bool:
        return False


#: Sets the window title, clears the screen, rings the bell, rewrites the line.
HOSTILE_TEXT = "no\x1b]0;pwned\x07\x1b[2J\x9b31m\r\nfake prompt $ \u2028x"


async def test_a_relays_refusal_text_reaches_the_host_without_control_characters(
    tmp_path,
) -> None:
    server, tunnel = await _relay_and_tunnel(_RefusingRelay, tmp_path)
    with pytest.raises(RelayPermissionDenied) as info:
        await tunnel.connect([])
    server.close()
    message = str(info.value)
    assert "refused the session: no?]0;pwned??[2J?31m??fake prompt $ ?x" in message
    assert all(ch.isprintable() for ch in message), repr(message)


class _UpstreamLikeRelay(asyncssh.SSHServer):
    """Registers sessions as upstream's uptermd does (the derived id) and knows none of our
    requests: upstream's relay carries no end-to-end joins."""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        async def reply(payload: bytes) -> sshcompat.GlobalReply:
            req = wire.CreateSessionRequest.decode(payload)
            key = wire.parse_public_key_line(req.host_public_keys[0])
            assert key is not None
            sid = wire.derive_session_id(key.blob, req.session_secret)
            return sshcompat.GlobalReply(
                True, wire.CreateSessionResponse(sid, "127.0.0.1:22", "").encode()
            )

        sshcompat.install_global_request_handler(conn, wire.CREATE_SESSION_REQUEST, reply)

    def begin_auth(self, username: str) -> bool:
        return False


async def test_a_relay_without_our_requests_is_known_to_carry_no_end_to_end_joins(
    tmp_path,
) -> None:
    """The host learns in the registration's round trip whether the relay is ours; with
    upstream's, the join card leaves out the end-to-end line that relay would refuse."""
    server, tunnel = await _relay_and_tunnel(_UpstreamLikeRelay, tmp_path)
    reg = await tunnel.connect([])
    assert reg.reconnect_supported and not reg.e2e_supported
    tunnel.close()
    server.close()
