"""SSH clients other than OpenSSH join, through the relay and end to end.

Each client is the real program from Debian's packages, on a real PTY, joining a real
session; what it shows is read from its screen model.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import PtyClient, UserEnv
from tests.e2e.test_host_features_e2e import detached

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def relay_port(info: dict) -> int:
    port = urlsplit(str(info["host"])).port
    assert port is not None
    return port


def dropbear_key(key: Path) -> Path:
    """The joiner's OpenSSH key in Dropbear's own format."""
    out = key.with_suffix(".dropbear")
    subprocess.run(
        ["dropbearconvert", "openssh", "dropbear", str(key), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def putty_key(key: Path) -> Path:
    """The joiner's OpenSSH key in PuTTY's format."""
    out = key.with_suffix(".ppk")
    subprocess.run(["puttygen", str(key), "-O", "private", "-o", str(out)], check=True)
    return out


def fingerprint(public_key_file: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key_file)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.split()[1]


def relay_fingerprint(user_env: UserEnv) -> str:
    """The built-in relay's host key, as plink -hostkey takes it."""
    state = Path(user_env.env["XDG_STATE_HOME"]) / "upterm" / "relay"
    return fingerprint(state / "ssh_host_ed25519_key.pub")


def session_fingerprint(info: dict, tmp: Path) -> str:
    """The session's own host key (the end-to-end hop), from its info."""
    line = tmp / "session_key.pub"
    line.write_text(str(info["hostKey"]) + "\n")
    return fingerprint(line)


def shared_shell_works(joiner: PtyClient, marker: str) -> None:
    joiner.expect(b"$ ", timeout=30)
    joiner.type(f"echo {marker}-$((40+2))\r")
    joiner.expect(f"{marker}-42".encode())


def test_dropbear_joins_through_the_relay(user_env: UserEnv, joiner_key: Path) -> None:
    """dbclient sends a guessed key-exchange packet whose host key guess is not ours: it
    must be ignored, not processed (it was: "Key exchange not in progress")."""
    info = detached(user_env, "dbrelay")
    joiner = PtyClient(
        [
            "dbclient", "-y", "-i", str(dropbear_key(joiner_key)),
            "-p", str(relay_port(info)), f"{info['sshUser']}@127.0.0.1",
        ],
        user_env.env,
    )  # fmt: skip
    shared_shell_works(joiner, "dbclient-relay")
    joiner.close()


def test_dropbear_joins_end_to_end(user_env: UserEnv, joiner_key: Path) -> None:
    """Dropbear's multi-hop form: the relay hop forwards to the host's own server, which
    sees the joiner's key itself (the host's inner server gets the guess too)."""
    info = detached(user_env, "dbe2e")
    token = info["sshUser"]
    # Multi-hop runs dbclient again for the first hop, by the path it was started with.
    joiner = PtyClient(
        [
            str(shutil.which("dbclient")), "-y", "-i", str(dropbear_key(joiner_key)),
            f"{token}@127.0.0.1/{relay_port(info)},{token}@upterm",
        ],
        user_env.env,
    )  # fmt: skip
    shared_shell_works(joiner, "dbclient-e2e")
    joiner.close()


def plink(user_env: UserEnv, key: Path, *args: str) -> PtyClient:
    return PtyClient(["plink", "-batch", "-ssh", "-i", str(putty_key(key)), *args], user_env.env)


def test_putty_plink_joins_through_the_relay(user_env: UserEnv, joiner_key: Path) -> None:
    info = detached(user_env, "plinkrelay")
    joiner = plink(
        user_env,
        joiner_key,
        "-hostkey", relay_fingerprint(user_env), "-P", str(relay_port(info)), "-t",
        f"{info['sshUser']}@127.0.0.1",
    )  # fmt: skip
    shared_shell_works(joiner, "plink-relay")
    joiner.close()


def test_putty_plink_joins_end_to_end(user_env: UserEnv, joiner_key: Path, tmp_path) -> None:
    """The end-to-end hop through a proxy command (PuTTY has no -J): the session's own key
    is pinned with -hostkey, as the printed line pins it for OpenSSH."""
    info = detached(user_env, "plinke2e")
    token = info["sshUser"]
    hop = shlex.join(
        [
            "plink", "-batch", "-ssh", "-i", str(putty_key(joiner_key)),
            "-hostkey", relay_fingerprint(user_env), "-P", str(relay_port(info)),
            "-nc", "upterm:22", f"{token}@127.0.0.1",
        ]
    )  # fmt: skip
    joiner = plink(
        user_env,
        joiner_key,
        "-proxycmd", hop, "-hostkey", session_fingerprint(info, tmp_path), "-t",
        f"{token}@upterm",
    )  # fmt: skip
    shared_shell_works(joiner, "plink-e2e")
    joiner.close()


def test_commands_and_file_transfers_are_refused_with_the_reason(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path
) -> None:
    """`ssh TOKEN@relay CMD` reaches a shared terminal that runs no commands, and scp and
    sftp one with --no-sftp: each says so (through the relay and end to end), instead of
    "upstream unavailable"."""
    from tests.conftest import SSH_OPTS
    from tests.e2e.test_cli_e2e import Joiner

    info = detached(user_env, "noexec", "--no-sftp")
    ssh = ["ssh", *Joiner.ssh_args(info, joiner_key), "-o", "BatchMode=yes"]
    target = tmp_path / "should-not-exist"
    out = subprocess.run([*ssh, "touch", str(target)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "runs no commands" in out.stderr and "upstream unavailable" not in out.stderr
    port, token = str(relay_port(info)), str(info["sshUser"])
    # The token has a colon, which scp and sftp read as the end of a host name: -o User.
    opts = [
        *SSH_OPTS,
        "-i",
        str(joiner_key),
        "-o",
        "BatchMode=yes",
        "-P",
        port,
        "-o",
        f"User={token}",
    ]
    sftp = subprocess.run(
        ["sftp", *opts, "-b", "-", "127.0.0.1"],
        input="ls\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert sftp.returncode != 0, sftp.stderr
    assert "file transfer is disabled for this session" in sftp.stderr
    (tmp_path / "file").write_text("x")
    scp = subprocess.run(
        ["scp", *opts, str(tmp_path / "file"), "127.0.0.1:/tmp/x"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert scp.returncode != 0, scp.stderr
    assert "file transfer is disabled for this session" in scp.stderr
    legacy = subprocess.run(
        ["scp", "-O", *opts, str(tmp_path / "file"), "127.0.0.1:/tmp/x"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert legacy.returncode != 0 and "use scp without -O" in legacy.stderr, legacy.stderr
    # End to end: the host's own server says it.
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host *\n  IdentityFile {joiner_key}\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  BatchMode yes\n"
    )
    e2e = subprocess.run(
        ["ssh", "-F", str(config), *shlex.split(str(info["e2eCommand"]))[1:], "touch", str(target)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert e2e.returncode == 1 and "runs no commands" in e2e.stderr, e2e.stderr
    assert not target.exists()


def test_rsa_keys_sign_with_sha2_and_sha1_is_not_offered(user_env: UserEnv, tmp_path: Path) -> None:
    """The relay does not advertise ssh-rsa (SHA-1) signatures, so OpenSSH made to use only
    them finds no mutual algorithm and never signs; the same RSA key with rsa-sha2-512 gets
    in. (A client that signs with ssh-rsa anyway is refused with a banner: see
    tests/daemon/test_inner_server.py.)"""
    rsa = tmp_path / "rsa"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True
    )
    info = detached(user_env, "sha1")
    base = [
        "ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-i", str(rsa), "-p", str(relay_port(info)), f"{info['sshUser']}@127.0.0.1",
    ]  # fmt: skip
    sha1 = subprocess.run(
        [*base[:1], "-v", "-o", "PubkeyAcceptedAlgorithms=ssh-rsa", *base[1:], "-T"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert sha1.returncode == 255
    assert "no mutual signature algorithm" in sha1.stderr, sha1.stderr[-1500:]
    sha2 = PtyClient(
        [*base[:1], "-o", "PubkeyAcceptedAlgorithms=rsa-sha2-512", *base[1:], "-tt"], user_env.env
    )
    shared_shell_works(sha2, "rsa-sha2")
    sha2.close()


@pytest.mark.parametrize(
    ("algorithms", "host_key_type"),
    [
        ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256"),
        ("rsa-sha2-512", "ssh-rsa"),
        ("rsa-sha2-256", "ssh-rsa"),
        # Go's order, ECDSA first: ed25519 is used all the same (the key the line pins).
        ("ecdsa-sha2-nistp256,ssh-ed25519", "ssh-ed25519"),
    ],
)
def test_clients_limited_to_one_host_key_type_join_in_both_modes(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path, algorithms: str, host_key_type: str
) -> None:
    """FIPS-mode OpenSSH and old libraries take only RSA or ECDSA host keys: both hops offer
    those too, the relay's kept in its state directory, the session's pinned by the
    end-to-end stanza of `upterm session ssh-config`. Every key is checked strictly."""
    from tests.e2e.test_cli_e2e import headless

    info = detached(user_env, "fips")
    port = relay_port(info)
    state = Path(user_env.env["XDG_STATE_HOME"]) / "upterm" / "relay"
    known = tmp_path / "known_hosts"
    relay_key = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}.get(host_key_type, "ecdsa")
    known.write_text(f"[127.0.0.1]:{port} {(state / f'ssh_host_{relay_key}_key.pub').read_text()}")
    stanza = headless(user_env, "session", "ssh-config", "fips").stdout
    assert len(info["hostKeys"]) == 3 and "Host fips-e2e\n" in stanza
    config = tmp_path / "ssh_config"
    # Host * comes last: the stanza's settings win, these fill in (for the jump too).
    config.write_text(
        stanza + f"\nHost *\n  IdentityFile {joiner_key}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n"
        f"  HostKeyAlgorithms {algorithms}\n"
    )
    for alias in ("fips", "fips-e2e"):
        joiner = PtyClient(["ssh", "-F", str(config), "-v", alias], user_env.env)
        shared_shell_works(joiner, alias.replace("-", ""))
        joiner.close()
        used = {
            line.split(b"Server host key: ")[1].split()[0].decode()
            for line in joiner.seen.splitlines()
            if b"Server host key: " in line
        }
        assert used == {host_key_type}, (alias, used)
