"""The keys a host logs in to the relay with: -i (with passphrase), ssh-agent, or ephemeral."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PtyClient, RelayProc, UserEnv, wait_for
from tests.e2e.test_cli_e2e import headless

pytestmark = pytest.mark.e2e


def fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True)
    return out.stdout.split()[1]


def registered_with(user_env: UserEnv) -> list[str]:
    log = (user_env.root / "uptermd.log").read_text()
    return re.findall(r"registered by \S+ \(user '[^']*', key (SHA256:\S+),", log)


def share(
    user_env: UserEnv, relay: RelayProc, *flags: str, name: str
) -> subprocess.CompletedProcess:
    return headless(
        user_env,
        "host",
        "--detach",
        "--accept",
        "--skip-host-key-check",
        "--server",
        relay.url,
        "--name",
        name,
        *flags,
        "--",
        "true",
    )


def test_encrypted_key_asks_for_its_passphrase(
    user_env: UserEnv, relay: RelayProc, tmp_path
) -> None:
    key = tmp_path / "id_secret"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "hunter2", "-f", str(key)], check=True
    )
    host = PtyClient(
        [
            *("upterm", "host", "--accept", "--skip-host-key-check", "--server", relay.url),
            *("-i", str(key), "--", "bash", "--norc"),
        ],
        user_env.env,
    )
    host.expect(f"Enter passphrase for key '{key}': ".encode())
    host.type("wrong\r")
    host.expect(b"Enter passphrase for key", timeout=10)
    host.seen = b""
    host.expect(b"Enter passphrase")  # asked again after a wrong answer
    host.type("hunter2\r")
    host.expect(b"sends a ~).")
    assert registered_with(user_env)[-1] == fingerprint(key.with_suffix(".pub"))
    host.type("exit\r")
    assert host.wait() == 0
    host.close()
    # Without a terminal to ask, an encrypted -i key is a one-line error.
    out = share(user_env, relay, "-i", str(key), name="nope")
    assert out.returncode == 2
    assert "is encrypted and there is no terminal to ask for its passphrase" in out.stderr


def test_agent_keys_then_default_files_then_ephemeral(
    user_env: UserEnv, relay: RelayProc, tmp_path
) -> None:
    # No agent, no ~/.ssh keys: an ephemeral key that is nobody's file.
    assert share(user_env, relay, name="eph").returncode == 0
    # A default key file.
    ssh_dir = Path(user_env.env["HOME"]) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_dir / "id_ed25519")],
        check=True,
    )
    assert share(user_env, relay, name="file").returncode == 0
    # An agent holding another key.
    agent_key = tmp_path / "agent_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(agent_key)], check=True
    )
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, what="ssh-agent")
        env = {**user_env.env, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(agent_key)], env=env, check=True)
        out = subprocess.run(
            [
                *("upterm", "host", "--detach", "--accept", "--skip-host-key-check"),
                *("--server", relay.url, "--name", "agent", "--", "true"),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
    finally:
        agent.terminate()
    used = registered_with(user_env)
    assert len(used) == 3
    assert used[0] not in (
        fingerprint(ssh_dir / "id_ed25519.pub"),
        fingerprint(agent_key.with_suffix(".pub")),
    )
    assert used[1] == fingerprint(ssh_dir / "id_ed25519.pub")
    assert used[2] == fingerprint(agent_key.with_suffix(".pub"))  # the agent's key goes first


def test_cert_authority_line_trusts_the_relay_without_a_prompt(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path
) -> None:
    from tests.conftest import start_relay
    from tests.e2e.test_cli_e2e import Joiner

    relay = start_relay(user_env, None, "--hostname", "127.0.0.1")
    try:
        relay_pub = (relay.state_dir / "ssh_host_ed25519_key.pub").read_text().strip()
        known = tmp_path / "known_hosts"
        known.write_text(f"@cert-authority 127.0.0.1,[127.0.0.1]:* {relay_pub}\n")
        # Headless and without --skip-host-key-check: only the CA line can make this work.
        out = headless(
            user_env,
            "host",
            "--detach",
            "--accept",
            "--name",
            "ca",
            "--server",
            relay.url,
            "--known-hosts",
            str(known),
            "--",
            "bash",
            "--norc",
            "--noprofile",
        )
        assert out.returncode == 0, out.stderr
        assert known.read_text().count("\n") == 1  # nothing was added
        info = __import__("json").loads(
            headless(user_env, "session", "info", "ca", "-o", "json").stdout
        )
        joiner = Joiner(info, joiner_key)  # guest certificates signed by the CA key pass
        joiner.expect(b"$ ")
        joiner.close()
        # With the CA line gone and no terminal, the unknown relay is refused, not trusted.
        known.write_text("")
        out = headless(
            user_env,
            "host",
            "--accept",
            "--server",
            relay.url,
            "--known-hosts",
            str(known),
            "--",
            "true",
        )
        assert out.returncode == 1
        assert "host key for [127.0.0.1]:" in out.stderr
        assert "is not known" in out.stderr
    finally:
        relay.proc.terminate()
        relay.proc.wait(10)
