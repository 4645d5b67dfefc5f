"""End-to-end joins: through the relay's byte splice, the relay sees only ciphertext."""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

import pytest

from tests.conftest import SSH_OPTS, make_key
from tests.relay.test_relay_security import host_session, relay  # noqa: F401 - fixture
from upterm import wire
from upterm.relay.server import Relay

pytestmark = pytest.mark.timeout(60)
SECRET = b"TOPSECRET-"


async def join(
    r: Relay, token: str, key: Path, *, e2e: bool, pin: str | None = None, n: int = 42
) -> tuple[int, bytes, bytes]:
    """Join with OpenSSH, type a secret, return (status, output, errors)."""
    ssh = ["ssh", "-tt", *SSH_OPTS, "-o", "BatchMode=yes", "-i", str(key)]
    if e2e:
        # What `ssh -J TOKEN@relay TOKEN@upterm` does, with the jump's key given explicitly
        # (command-line options do not reach -J's own ssh).
        jump = shlex.join([*ssh[2:], "-p", str(r.port), "-W", "%h:%p", f"{token}@127.0.0.1"])
        args = [
            *ssh[:2],
            "-o",
            f"ProxyCommand=ssh {jump}",
            "-o",
            f"KnownHostsCommand=/bin/echo upterm {pin}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-i",
            str(key),
            f"{token}@upterm",
        ]
    else:
        args = [*ssh, "-p", str(r.port), f"{token}@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    out = bytearray()

    async def until(marker: bytes) -> bool:
        while marker not in out:
            chunk = await proc.stdout.read(4096)
            if not chunk:
                return False
            out.extend(chunk)
        return True

    if await asyncio.wait_for(until(b"$ "), 20):
        # A sum the replay of an earlier join cannot already contain.
        proc.stdin.write(b"echo " + SECRET + f"$(({n - 2}+2))\r".encode())
        await asyncio.wait_for(until(SECRET + str(n).encode()), 20)
        proc.terminate()
    err = await proc.stderr.read()
    return await proc.wait(), bytes(out), err


def _host_key_line(tunnel) -> str:
    return tunnel.session_key.authorized_key_line().decode().strip()


async def test_e2e_join_shows_the_relay_only_ciphertext(relay, tmp_path) -> None:  # noqa: F811
    seen: dict[str, bytearray] = {"relay": bytearray(), "splice": bytearray()}
    relay.observer = lambda mode, data: seen[mode].extend(data)
    key = make_key(tmp_path / "j")
    tunnel, session, reg = await host_session(relay, tmp_path)

    _, out, err = await join(relay, reg.token, key, e2e=True, pin=_host_key_line(tunnel))
    assert SECRET + b"42" in out, err
    assert len(seen["splice"]) > 1000  # the whole inner SSH session went through the splice
    assert SECRET not in seen["splice"]  # ... and the relay could not read any of it
    assert seen["relay"] == b""

    # For contrast: a relay-mode join hands the relay the keystrokes in the clear.
    _, out, _ = await join(relay, reg.token, key, e2e=False, n=51)
    assert SECRET + b"51" in out
    assert SECRET in seen["relay"]
    session.hangup()
    tunnel.close()


async def test_e2e_join_refuses_a_wrong_host_key(relay, tmp_path) -> None:  # noqa: F811
    key = make_key(tmp_path / "j")
    tunnel, session, reg = await host_session(relay, tmp_path)
    impostor = make_key(tmp_path / "impostor")
    pin = (tmp_path / "impostor.pub").read_text().split(" ")[0:2]
    status, _, err = await join(relay, reg.token, key, e2e=True, pin=" ".join(pin))
    assert status == 255
    assert b"Host key verification failed" in err
    assert impostor.exists()
    session.hangup()
    tunnel.close()


async def test_e2e_only_refuses_relay_joins_and_checks_keys_at_the_host(relay, tmp_path) -> None:  # noqa: F811
    good, bad = make_key(tmp_path / "good"), make_key(tmp_path / "bad")
    good_pub = wire.parse_public_key_line((tmp_path / "good.pub").read_text())
    tunnel, session, reg = await host_session(relay, tmp_path, [good_pub], e2e_only=True)
    status, _, err = await join(relay, reg.token, good, e2e=False)
    assert status == 1
    assert err.strip().startswith(b"upterm: this session takes end-to-end joins only")
    status, out, _ = await join(relay, reg.token, good, e2e=True, pin=_host_key_line(tunnel))
    assert SECRET + b"42" in out
    # A key the session does not authorize: the relay, which holds the session's authorized
    # keys, refuses it the jump at its door.
    status, _, err = await join(relay, reg.token, bad, e2e=True, pin=_host_key_line(tunnel))
    assert status == 255 and b"Permission denied" in err
    session.hangup()
    tunnel.close()
