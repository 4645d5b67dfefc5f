"""The client matrix, library clients and OpenSSH's connection sharing: each joins a real
session through the relay and end to end, types into the shared shell and reads the answer.

(Dropbear, PuTTY and host key types are in test_clients_e2e.py; the printed line itself in
test_e2e_join_e2e.py.)
"""

from __future__ import annotations

import asyncio
import base64
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import asyncssh
import paramiko
import pytest

from tests.conftest import PtyClient, UserEnv
from tests.e2e.test_clients_e2e import relay_port, shared_shell_works
from tests.e2e.test_host_features_e2e import detached, session_info

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def relay_key_line(user_env: UserEnv) -> str:
    state = Path(user_env.env["XDG_STATE_HOME"]) / "upterm" / "relay"
    return (state / "ssh_host_ed25519_key.pub").read_text().strip()


# -- paramiko ---------------------------------------------------------------------------


def _paramiko_client(host: str, port: int, key_line: str) -> paramiko.SSHClient:
    """A client that trusts exactly one key for host:port and refuses any other."""
    client = paramiko.SSHClient()
    kind, blob = key_line.split()[:2]
    name = host if port == 22 else f"[{host}]:{port}"
    client.get_host_keys().add(
        name, kind, paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
    )
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def _paramiko_types(chan: paramiko.Channel, marker: str) -> None:
    seen = b""

    def until(needle: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 30
        while needle not in seen:
            assert time.monotonic() < deadline, seen[-500:]
            if chan.recv_ready():
                seen += chan.recv(65536)
            else:
                time.sleep(0.02)

    until(b"$ ")
    chan.send(f"echo {marker}-$((40+2))\r".encode())
    until(f"{marker}-42".encode())


@pytest.mark.parametrize("mode", ["relay", "e2e"])
def test_paramiko_joins(user_env: UserEnv, joiner_key: Path, mode: str) -> None:
    """paramiko from PyPI, with strict host keys: through the relay, and end to end over a
    direct-tcpip channel of the relay connection (paramiko's ProxyJump)."""
    info = detached(user_env, f"pm{mode}")
    token, port = str(info["sshUser"]), relay_port(info)
    pkey = paramiko.Ed25519Key.from_private_key_file(str(joiner_key))
    relay = _paramiko_client("127.0.0.1", port, relay_key_line(user_env))
    relay.connect(
        "127.0.0.1", port, username=token, pkey=pkey, look_for_keys=False, allow_agent=False
    )
    inner = None
    try:
        if mode == "relay":
            chan = relay.invoke_shell(term="xterm", width=80, height=24)
        else:
            transport = relay.get_transport()
            assert transport is not None
            hop = transport.open_channel("direct-tcpip", ("upterm", 22), ("127.0.0.1", 0))
            inner = _paramiko_client("upterm", 22, str(info["hostKey"]))
            inner.connect(
                "upterm", 22, username=token, pkey=pkey, sock=hop,
                look_for_keys=False, allow_agent=False,
            )  # fmt: skip
            chan = inner.invoke_shell(term="xterm", width=80, height=24)
        _paramiko_types(chan, f"paramiko-{mode}")
        listed = session_info(user_env)
        modes = {c.get("mode") for c in listed["clients"]}
        assert modes == {"e2e" if mode == "e2e" else "relay"}, listed["clients"]
        assert all("paramiko" in c["version"] for c in listed["clients"])
    finally:
        if inner is not None:
            inner.close()
        relay.close()


# -- asyncssh ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["relay", "e2e"])
async def test_asyncssh_joins(user_env: UserEnv, joiner_key: Path, mode: str) -> None:
    """asyncssh as a joiner: known hosts pinned on each hop, end to end through ``tunnel=``."""
    info = await asyncio.to_thread(detached, user_env, f"as{mode}")
    token, port = str(info["sshUser"]), relay_port(info)
    relay_key = asyncssh.import_public_key(relay_key_line(user_env))
    key = asyncssh.read_private_key(str(joiner_key))
    common = {"username": token, "client_keys": [key], "agent_path": None, "config": None}
    async with asyncssh.connect(
        "127.0.0.1", port, known_hosts=([relay_key], [], []), **common
    ) as relay:
        target = relay
        inner = None
        if mode == "e2e":
            host_key = asyncssh.import_public_key(str(info["hostKey"]))
            inner = await asyncssh.connect(
                "upterm", tunnel=relay, known_hosts=([host_key], [], []), **common
            )
            target = inner
        try:
            proc = await target.create_process(term_type="xterm", term_size=(80, 24))
            seen = b""

            async def until(needle: bytes) -> None:
                nonlocal seen
                while needle not in seen:
                    seen += (await asyncio.wait_for(proc.stdout.read(65536), 30)).encode()

            await until(b"$ ")
            proc.stdin.write(f"echo asyncssh-{mode}-$((40+2))\r")
            await until(f"asyncssh-{mode}-42".encode())
            proc.close()
        finally:
            if inner is not None:
                inner.close()


# -- OpenSSH connection sharing ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["relay", "e2e"])
def test_openssh_control_master_shares_one_connection(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path, mode: str
) -> None:
    """`ControlMaster auto` in the joiner's config: the first `ssh` becomes the master, a
    second one joins over it (no new connection to the relay), both type into the shell."""
    info = detached(user_env, f"cm{mode}")
    token, port = str(info["sshUser"]), relay_port(info)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {relay_key_line(user_env)}\nupterm {info['hostKey']}\n")
    # Short: a control socket path is limited to 108 bytes.
    control = Path("/tmp") / f"cm-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host *\n"
        f"  IdentityFile {joiner_key}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n"
        f"  ControlMaster auto\n  ControlPath {control}-%C\n  ControlPersist 30\n"
    )
    if mode == "relay":
        target = ["-p", str(port), f"{token}@127.0.0.1"]
    else:
        target = ["-J", f"{token}@127.0.0.1:{port}", f"{token}@upterm"]
    first = PtyClient(["ssh", "-F", str(config), "-tt", *target], user_env.env)
    shared_shell_works(first, f"master-{mode}")
    second = PtyClient(["ssh", "-F", str(config), "-tt", *target], user_env.env)
    shared_shell_works(second, f"shared-{mode}")
    check = subprocess.run(
        ["ssh", "-F", str(config), "-O", "check", *target],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert check.returncode == 0 and "Master running" in check.stderr, check.stderr
    listed = session_info(user_env)
    # Two terminals, one SSH connection: the session counts one client with two channels.
    assert len(listed["clients"]) == 1, listed["clients"]
    for joiner in (second, first):
        joiner.close()
    subprocess.run(
        ["ssh", "-F", str(config), "-O", "exit", *target], capture_output=True, timeout=10
    )


def test_openssh_proxyjump_from_config_with_pinned_key(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path
) -> None:
    """A hand-written config as a regular would keep it: the relay as a jump host under its
    own alias, the session under another, keys pinned in known_hosts."""
    info = detached(user_env, "pj")
    token, port = str(info["sshUser"]), relay_port(info)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {relay_key_line(user_env)}\npair {info['hostKey']}\n")
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host relay\n  HostName 127.0.0.1\n  Port " + str(port) + f"\n  User {token}\n"
        f"Host pair\n  HostName upterm\n  HostKeyAlias pair\n  User {token}\n"
        "  ProxyJump relay\n"
        f"Host *\n  IdentityFile {joiner_key}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n"
    )
    joiner = PtyClient(["ssh", "-F", str(config), "-tt", "pair"], user_env.env)
    shared_shell_works(joiner, "proxyjump")
    joiner.close()
    assert shlex.split(str(info["e2eCommand"]))[1] == "-J"


# -- OpenSSH 10 -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def openssh10() -> Path:
    """OpenSSH 10's client, built from Debian 13's source by scripts/openssh10.sh (the set-up
    builds it; here it is built if missing, so the test never depends on a prior step)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "openssh10.sh"
    out = subprocess.run([str(script)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["relay", "e2e"])
def test_openssh10_joins_and_hides_keystroke_timing(
    user_env: UserEnv, joiner_key: Path, tmp_path: Path, openssh10: Path, mode: str
) -> None:
    """OpenSSH 10 (ML-KEM key exchange by default) joins both ways, and its keystroke-timing
    chaff is on: both hops advertise ping@openssh.com and answer the pings, which a client
    sends only to servers that do (it reports how many it sent)."""
    version = subprocess.run([str(openssh10), "-V"], capture_output=True, text=True).stderr
    assert version.startswith("OpenSSH_10."), version
    info = detached(user_env, f"os10{mode}")
    token, port = str(info["sshUser"]), relay_port(info)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {relay_key_line(user_env)}\nupterm {info['hostKey']}\n")
    config = tmp_path / "ssh_config"
    # Debug logs for the joining connection only (-v would reach the jump too, on stderr).
    config.write_text(
        f"Host {'127.0.0.1' if mode == 'relay' else 'upterm'}\n  LogLevel DEBUG3\n"
        "Host *\n"
        f"  IdentityFile {joiner_key}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n"
        "  ObscureKeystrokeTiming interval:20\n"
    )
    if mode == "relay":
        target = ["-p", str(port), f"{token}@127.0.0.1"]
    else:
        target = ["-J", f"{token}@127.0.0.1:{port}", f"{token}@upterm"]
    log = tmp_path / "ssh.log"
    joiner = PtyClient(
        [str(openssh10), "-F", str(config), "-E", str(log), "-tt", *target], user_env.env
    )
    shared_shell_works(joiner, f"openssh10-{mode}")
    # Type as a person does, then pause: chaff runs while typing and for 1.0-3.1 s (random)
    # after the last key, then the client logs that it stopped. Wait for that line rather
    # than a fixed pause, which the random tail outlasts about one run in a hundred.
    for ch in "echo typed-slowly":
        joiner.type(ch)
        time.sleep(0.05)
    deadline = time.monotonic() + 15
    while "obfuscate_keystroke_timing: stopping:" not in log.read_text():
        assert time.monotonic() < deadline, "the client never stopped its keystroke chaff"
        time.sleep(0.1)
    joiner.type("\r")
    joiner.expect(b"\rtyped-slowly\r\n")
    text = log.read_text()
    # Its default, post-quantum key exchange, on every hop it made.
    kex = {
        line.split("kex: algorithm: ")[1]
        for line in text.splitlines()
        if "kex: algorithm: " in line
    }
    assert kex == {"mlkem768x25519-sha256"}, kex
    sent = [
        int(line.rsplit("(", 1)[1].split()[0])
        for line in text.splitlines()
        if "obfuscate_keystroke_timing: stopping:" in line
    ]
    print(f"OpenSSH 10 joins ({mode}): key exchange {sorted(kex)}, chaff packets sent {sent}")
    assert sent and max(sent) > 0, [ln for ln in text.splitlines() if "obfuscate" in ln]
    joiner.close()
