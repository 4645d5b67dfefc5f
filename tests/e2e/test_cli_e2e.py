"""The upterm command as people and scripts use it: real binaries, no terminal where CI has none."""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SSH_OPTS, RelayProc, Tmux, UserEnv, make_key, ssh_join_command, wait_for

pytestmark = pytest.mark.e2e


def headless(
    user_env: UserEnv, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run upterm with no terminal at all: stdin /dev/null, output to pipes, no setsid tty."""
    return subprocess.run(
        ["upterm", *args],
        env=user_env.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,  # no controlling terminal either
    )


def host_detached(user_env: UserEnv, name: str, *extra: str) -> dict:
    out = headless(
        user_env, "host", "--detach", "--accept", "--name", name, *extra, "--", "bash", "--norc"
    )
    assert out.returncode == 0, out.stderr
    assert f"Attach: upterm session attach {name}" in out.stdout
    info = json.loads(headless(user_env, "session", "info", name, "-o", "json").stdout)
    assert info["name"] == name
    assert info["sshCommand"] in out.stdout
    return info


class Joiner:
    """An OpenSSH joiner that stays connected until closed."""

    @staticmethod
    def ssh_args(info: dict, key: Path) -> list[str]:
        """ssh's arguments (without "ssh") to join the session described by ``info``."""
        return shlex.split(ssh_join_command(info["sshCommand"], key))[1:]

    def __init__(self, info: dict, key: Path) -> None:
        self.proc = subprocess.Popen(
            ["ssh", *self.ssh_args(info, key), "-tt"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.seen = bytearray()

    def type(self, text: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def expect(self, marker: bytes, timeout: float = 15) -> bytes:
        assert self.proc.stdout
        deadline = time.monotonic() + timeout
        start = 0
        while marker not in self.seen[start:]:
            start = max(0, len(self.seen) - len(marker))  # search only what is new
            left = deadline - time.monotonic()
            assert left > 0, f"{marker!r} not seen; got {bytes(self.seen[-300:])!r}"
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    tail = bytes(self.seen[-300:])
                    assert marker in self.seen, f"ssh ended before {marker!r}: {tail!r}"
                self.seen += chunk
        return bytes(self.seen)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_headless_ci_flow(user_env: UserEnv, joiner_key: Path) -> None:
    """What the GitHub Action does, with no TTY anywhere: host detached, wait for a joiner to
    come and go, then stop."""
    info = host_detached(user_env, "ci")
    assert info["clientCount"] == 0

    waiter = subprocess.Popen(
        ["upterm", "session", "wait", "ci", "--timeout", "60s"],
        env=user_env.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    joiner = Joiner(info, joiner_key)
    joiner.expect(b"$ ")
    joiner.type("echo ci-$((40+2))\r")
    joiner.expect(b"ci-42")
    wait_for(
        lambda: (
            json.loads(headless(user_env, "session", "info", "ci", "-o", "json").stdout)[
                "clientCount"
            ]
            == 1
        ),
        what="the joiner to be listed",
    )
    assert waiter.poll() is None, "wait returned while a joiner was still connected"
    joiner.close()
    _, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0
    assert err == "upterm: the last joiner left\n"

    assert headless(user_env, "session", "stop", "ci").returncode == 0
    wait_for(
        lambda: headless(user_env, "session", "list", "-o", "json").stdout.strip() == "[]",
        what="the stopped session to go away",
    )


def test_wait_timeout_exits_124(user_env: UserEnv) -> None:
    host_detached(user_env, "lonely")
    started = time.monotonic()
    out = headless(user_env, "session", "wait", "lonely", "--timeout", "1s")
    assert out.returncode == 124
    assert out.stderr == "upterm: timed out after 1s\n"
    assert 0.9 < time.monotonic() - started < 10
    bad = headless(user_env, "session", "wait", "lonely", "--timeout", "soon")
    assert bad.returncode == 2
    assert bad.stderr == "upterm: cannot read duration 'soon'; use e.g. 90s, 30m or 1h30m\n"


def test_names_templates_and_quiet_prompt_helper(user_env: UserEnv) -> None:
    info = host_detached(user_env, "web.1")
    sock = info["adminSocket"]
    # Inside the session (as its shell sees it): the template fills JSON fields.
    env = {**user_env.env, "UPTERM_ADMIN_SOCKET": sock}
    out = subprocess.run(
        ["upterm", "session", "current", "-o", "template=[{name} {clientCount}] "],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert (out.returncode, out.stdout) == (0, "[web.1 0] ")
    # The same answer through the full client (the prompt's fast path must agree with it).
    full = headless(user_env, "session", "info", "web.1", "-o", "template=[{name} {clientCount}] ")
    assert full.stdout == out.stdout
    # Outside any session, for PS1: nothing at all, status 0.
    quiet = headless(user_env, "session", "current", "-q", "-o", "template={name}")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    # A stale socket (session gone) is also quiet with -q.
    stale = subprocess.run(
        ["upterm", "session", "current", "-q"],
        env={**user_env.env, "UPTERM_ADMIN_SOCKET": "/nonexistent.sock"},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert (stale.returncode, stale.stdout) == (0, "")
    bad = subprocess.run(
        ["upterm", "session", "current", "-o", "template={nope}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("upterm: unknown field {nope} in the template; fields: ")
    # JSON keys as upstream, plus ours.
    data = json.loads(headless(user_env, "session", "info", info["sessionId"], "-o", "json").stdout)
    for key in ("sessionId", "clientCount", "host", "command", "forceCommand", "name"):
        assert key in data
    assert data["command"] == "bash --norc"
    # Aliases as upstream: se, i, ls.
    assert headless(user_env, "se", "i", "web.1", "-o", "template={name}").stdout == "web.1"
    assert "web.1" in headless(user_env, "se", "ls").stdout
    # list takes templates too (a line per session); values print as JSON does.
    listed = headless(user_env, "session", "list", "-o", "template={name} {accepting}")
    assert (listed.returncode, listed.stdout) == (0, "web.1 true\n")
    # Names are unique.
    dup = headless(user_env, "host", "--detach", "--accept", "--name", "web.1", "--", "true")
    assert dup.returncode == 2
    assert dup.stderr.startswith("upterm: a session named 'web.1' is already running;")
    bad_name = headless(user_env, "host", "--accept", "--name", "-x", "--", "true")
    assert bad_name.returncode == 2


def test_session_not_found_and_daemon_not_running(user_env: UserEnv) -> None:
    out = headless(user_env, "session", "stop", "nope")
    assert out.returncode == 1
    assert out.stderr == (
        "upterm: the upterm daemon is not running; start it with 'upterm daemon'\n"
    )
    host_detached(user_env, "x")
    out = headless(user_env, "session", "info", "nope")
    assert out.returncode == 1
    assert out.stderr == "upterm: no session 'nope'; 'upterm session list' shows them\n"


def test_daemon_that_cannot_start_is_one_line(user_env: UserEnv) -> None:
    env = {**user_env.env, "XDG_STATE_HOME": "/dev/null/state"}
    out = subprocess.run(
        ["upterm", "host", "--accept", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("upterm: cannot start the upterm daemon: /dev/null/state/")
    assert out.stderr.count("\n") == 1


def test_ssh_config_stanza_joins(user_env: UserEnv, joiner_key: Path, tmp_path: Path) -> None:
    info = host_detached(user_env, "pair")
    stanza = headless(user_env, "session", "ssh-config", "pair").stdout
    assert "Host pair\n" in stanza
    assert f"    User {info['sshUser']}\n" in stanza
    known = [ln[2:] for ln in stanza.splitlines() if ln.startswith("# [127.0.0.1]:")]
    assert len(known) == 1
    # Use it as a joiner would: the stanza as ssh config, the relay key pinned from it.
    (tmp_path / "config").write_text(stanza + "\n")
    (tmp_path / "known_hosts").write_text(known[0] + "\n")
    proc = subprocess.Popen(
        [
            "ssh",
            "-F",
            str(tmp_path / "config"),
            "-i",
            str(joiner_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-tt",
            "pair",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    joiner = Joiner.__new__(Joiner)
    joiner.proc, joiner.seen = proc, bytearray()
    joiner.expect(b"$ ")
    joiner.type("echo cfg-$((3*3))\r")
    joiner.expect(b"cfg-9")
    joiner.close()


def test_config_file_env_and_flag_precedence(user_env: UserEnv, relay: RelayProc) -> None:
    path = Path(headless(user_env, "config", "path").stdout.strip())
    assert path == Path(user_env.env["XDG_CONFIG_HOME"]) / "upterm" / "config.toml"
    assert "# server = " in headless(user_env, "config", "view").stdout
    edited = subprocess.run(
        ["upterm", "config", "edit"],
        env={**user_env.env, "EDITOR": "true"},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert edited.returncode == 0 and "is valid" in edited.stdout
    assert path.stat().st_mode & 0o777 == 0o600

    # File: an unreachable relay and --accept.
    path.write_text('[host]\nserver = "ssh://127.0.0.1:1"\naccept = true\n')
    out = headless(user_env, "host", "--", "true")
    assert out.returncode == 1
    assert out.stderr.startswith("upterm: cannot reach the relay at ssh://127.0.0.1:1:")
    # Environment beats the file.
    env = {**user_env.env, "UPTERM_SERVER": relay.url}
    known = Path(user_env.env["HOME"]) / "kh"
    out = subprocess.run(
        [
            "upterm",
            "host",
            "--detach",
            "--skip-host-key-check",
            "--known-hosts",
            str(known),
            "--",
            "true",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert f"Host:               {relay.url}" in out.stdout
    # A flag beats the environment.
    env["UPTERM_SERVER"] = "ssh://127.0.0.1:1"
    out = subprocess.run(
        [
            "upterm",
            "host",
            "--detach",
            "--server",
            relay.url,
            "--known-hosts",
            str(known),
            "--",
            "true",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    # A broken file is one line naming it.
    path.write_text("[host]\nservr = 1\n")
    out = headless(user_env, "session", "list")
    assert out.returncode == 2
    assert out.stderr == (
        f"upterm: {path}: unknown setting 'servr'; known: accept, authorized-keys, "
        "keepalive, known-hosts, server\n"
    )


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(user_env: UserEnv, shell: str) -> None:
    out = headless(user_env, "completion", shell)
    assert out.returncode == 0
    assert "_UPTERM_COMPLETE" in out.stdout
    if shell == "bash":
        check = subprocess.run(["bash", "-n"], input=out.stdout, text=True, capture_output=True)
        assert check.returncode == 0, check.stderr
        # And it completes for real.
        words = subprocess.run(
            ["upterm"],
            env={
                **user_env.env,
                "_UPTERM_COMPLETE": "bash_complete",
                "COMP_WORDS": "upterm se",
                "COMP_CWORD": "1",
            },
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert "plain,session" in words.stdout


def test_every_command_has_help_with_examples(user_env: UserEnv) -> None:
    for args in (
        ["host"],
        ["session"],
        ["session", "current"],
        ["session", "list"],
        ["session", "info"],
        ["session", "attach"],
        ["session", "stop"],
        ["session", "wait"],
        ["session", "ssh-config"],
        ["config"],
        ["version"],
        ["completion"],
    ):
        out = headless(user_env, *args, "--help")
        assert out.returncode == 0, args
        assert "Examples:" in out.stdout, args


def test_host_key_changed_is_refused(user_env: UserEnv, relay: RelayProc, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    other = make_key(tmp_path / "other")
    known.write_text(f"[127.0.0.1]:{relay.port} " + (tmp_path / "other.pub").read_text())
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
    assert out.stderr.count("\n") == 1
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in out.stderr
    assert f"{known}:1" in out.stderr
    assert other.exists()


REFUSING_RELAY = """
import asyncio, asyncssh, sys
class S(asyncssh.SSHServer):
    def begin_auth(self, u): return True
    def public_key_auth_supported(self): return True
    def validate_public_key(self, u, k): return False
async def main():
    srv = await asyncssh.listen("127.0.0.1", 0, server_factory=S,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        server_version="uptermd-9.9.9")
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_relay_refusing_the_host_is_one_line(user_env: UserEnv, tmp_path: Path) -> None:
    relay = subprocess.Popen(
        [sys.executable, "-c", REFUSING_RELAY], stdout=subprocess.PIPE, text=True
    )
    try:
        assert relay.stdout
        port = relay.stdout.readline().strip()
        out = headless(
            user_env,
            "host",
            "--accept",
            "--server",
            f"ssh://127.0.0.1:{port}",
            "--known-hosts",
            str(tmp_path / "kh"),
            "--skip-host-key-check",
            "--",
            "true",
        )
        assert out.returncode == 1
        assert out.stderr == (
            f"upterm: ssh://127.0.0.1:{port}: Permission denied (publickey); the relay "
            "refused this host\n"
        )
    finally:
        relay.kill()


def test_detach_and_attach_again(tmux: Tmux, user_env: UserEnv) -> None:
    pane = tmux.panes[0]
    tmux.send(pane, "upterm host --accept --name t1 -- bash --norc --noprofile; echo host-rc=$?")
    tmux.wait_text(pane, "sends a ~).\n$ ")
    tmux.send(pane, "echo first-$((1+1))")
    tmux.wait_text(pane, "first-2")
    # Enter, then ~. : detach. The session goes on.
    tmux.send(pane, "~.", enter=False)
    tmux.wait_text(pane, "host-rc=0")
    screen = tmux.screen(pane)
    assert "[detached; 'upterm session attach t1' to return]" in screen
    assert "t1" in headless(user_env, "session", "list").stdout
    # ~~ sends one ~ ; Ctrl-C reaches the command, not upterm.
    tmux.send(pane, "clear; upterm session attach t1; echo attach-rc=$?")
    tmux.wait_text(pane, "first-2")
    tmux.send(pane, "sleep 300")
    time.sleep(0.5)
    tmux._tmux("send-keys", "-t", pane, "C-c")
    tmux.send(pane, "~~echo tilde-$((2*21))")
    tmux.wait_text(pane, "~echo: command not found")
    tmux.send(pane, "exit 5")
    tmux.wait_text(pane, "attach-rc=5")


def test_closing_the_terminal_without_detaching_ends_the_session(
    tmux: Tmux, user_env: UserEnv
) -> None:
    pane = tmux.panes[0]
    tmux.send(pane, "upterm host --accept --name gone -- bash --norc --noprofile")
    tmux.wait_text(pane, "sends a ~).\n$ ")
    assert "gone" in headless(user_env, "session", "list").stdout
    tmux._tmux("kill-pane", "-t", pane)
    wait_for(
        lambda: "gone" not in headless(user_env, "session", "list").stdout,
        what="the session to end with its terminal",
    )


def test_admin_socket_inside_tmux_with_update_environment(
    tmux: Tmux, user_env: UserEnv, tmp_path: Path
) -> None:
    """A tmux server started outside the session, attached from inside it: with
    update-environment, new windows know the session."""
    conf = tmp_path / "tmux.conf"
    conf.write_text('set-option -ga update-environment " UPTERM_ADMIN_SOCKET"\n')
    inner = ["tmux", "-L", f"{tmux.socket}-in", "-f", str(conf)]
    subprocess.run([*inner, "new-session", "-d", "-s", "work"], env=user_env.env, check=True)
    try:
        pane = tmux.panes[0]
        tmux.send(pane, "upterm host --accept --name tm -- bash --norc --noprofile")
        tmux.wait_text(pane, "sends a ~).\n$ ")
        tmux.send(pane, f"clear; {shlex.join(inner)} attach -t work")
        time.sleep(1)
        out_file = tmp_path / "current.txt"
        subprocess.run(
            [
                *inner,
                "new-window",
                "-t",
                "work",
                f"upterm session current -o template={{name}} > {out_file}",
            ],
            env=user_env.env,
            check=True,
        )
        wait_for(lambda: out_file.exists() and out_file.read_text() == "tm", what="tm in window")
    finally:
        subprocess.run([*inner, "kill-server"], env=user_env.env, check=False)


def test_sigterm_to_daemon_ends_sessions_cleanly(user_env: UserEnv, joiner_key: Path) -> None:
    info = host_detached(user_env, "term")
    joiner = Joiner(info, joiner_key)
    joiner.expect(b"$ ")
    pid = json.loads(headless(user_env, "session", "info", "term", "-o", "json").stdout)["pid"]
    # This user environment's daemon: other tests (or other runs) may have theirs.
    runtime = f"XDG_RUNTIME_DIR={user_env.env['XDG_RUNTIME_DIR']}\0".encode()
    candidates = subprocess.run(
        ["pgrep", "-f", "upterm.daemon"], capture_output=True, text=True
    ).stdout.split()
    (daemon_pid,) = [
        int(p)
        for p in candidates
        if Path(f"/proc/{p}/environ").exists()
        and runtime in Path(f"/proc/{p}/environ").read_bytes()
    ]
    os.kill(daemon_pid, signal.SIGTERM)
    joiner.expect(b"upterm: the host's upterm daemon is shutting down; this session ends now.")
    assert joiner.proc.wait(15) == 129  # bash ended by SIGHUP: 128 + 1
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), what="the command to end")
    wait_for(lambda: not Path(f"/proc/{daemon_pid}").exists(), what="the daemon to exit")
    assert not (user_env.runtime / "daemon.sock").exists()
    assert not Path(info["adminSocket"]).exists()
    assert SSH_OPTS  # joiners use the shared options


def test_nested_session_sees_the_inner_socket(user_env: UserEnv) -> None:
    outer = host_detached(user_env, "outer")
    # `upterm host` run from inside the outer session's shell inherits its variables.
    env = {
        **user_env.env,
        "UPTERM_ADMIN_SOCKET": outer["adminSocket"],
        "UPTERM_SESSION_NAME": "outer",
    }
    out = subprocess.run(
        ["upterm", "host", "--detach", "--accept", "--name", "inner", "--", "sleep", "300"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    inner = json.loads(headless(user_env, "session", "info", "inner", "-o", "json").stdout)
    environ = Path(f"/proc/{inner['pid']}/environ").read_bytes().split(b"\0")
    assert f"UPTERM_ADMIN_SOCKET={inner['adminSocket']}".encode() in environ
    assert b"UPTERM_SESSION_NAME=inner" in environ
    assert inner["adminSocket"] != outer["adminSocket"]
    # And `session list` from inside the inner session marks it, not the outer one.
    listed = subprocess.run(
        ["upterm", "session", "list"],
        env={**user_env.env, "UPTERM_ADMIN_SOCKET": inner["adminSocket"]},
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    marked = [line for line in listed.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "inner" in marked[0]


def test_ctrl_c_or_a_closed_terminal_at_the_accept_prompt_discards_the_session(
    user_env: UserEnv,
) -> None:
    from tests.conftest import PtyClient

    def listed() -> list:
        return json.loads(headless(user_env, "session", "list", "-o", "json").stdout)

    host = PtyClient(["upterm", "host", "--", "bash", "--norc"], user_env.env)
    host.expect(b"Accept connections? [y/n]")
    assert len(listed()) == 1  # created, waiting for the answer
    host.type("\x03")
    host.expect(b"upterm: cancelled; the session was discarded")
    assert host.wait() == 130
    wait_for(lambda: listed() == [], what="the unaccepted session to go")
    # The terminal closing at the prompt (SIGHUP to the client) discards it too.
    again = PtyClient(["upterm", "host", "--", "bash", "--norc"], user_env.env)
    again.expect(b"Accept connections? [y/n]")
    again.close()
    wait_for(lambda: listed() == [], what="the unaccepted session to go")


def test_session_names_and_ids_complete_in_bash_zsh_and_fish(user_env: UserEnv) -> None:
    info = host_detached(user_env, "web.9")

    def complete(shell: str, words: str, cword: int | str) -> str:
        env = {
            **user_env.env,
            "_UPTERM_COMPLETE": f"{shell}_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
        }
        out = subprocess.run(["upterm"], env=env, capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "plain,web.9" in complete("bash", "upterm session attach we", 3).splitlines()
    sid = info["sessionId"]
    assert f"plain,{sid}" in complete("bash", f"upterm session stop {sid[:4]}", 3).splitlines()
    assert "web.9" in complete("zsh", "upterm session kick w", 3).splitlines()
    # fish passes the word being completed itself, not its index.
    assert any(
        line.startswith("plain,web.9")
        for line in complete("fish", "upterm se i w", "w").splitlines()
    )
