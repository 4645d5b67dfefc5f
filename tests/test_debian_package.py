"""The Debian packages: built with dpkg-buildpackage, lintian-clean, installed with apt, and
the installed programs (on Debian's own Python and libraries) host and serve a session."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SSH_OPTS, UserEnv, make_key, wait_for

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.getuid() != 0, reason="installs packages with apt: needs root (CI)"),
]


def sh(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def installed() -> object:
    built = sh(str(ROOT / "packaging" / "build-deb.sh"))
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    debs = sorted(str(p) for p in (ROOT / "dist").glob("*.deb"))
    assert [Path(d).name for d in debs] == ["upterm_0.1.0_all.deb", "uptermd_0.1.0_all.deb"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = sh("apt-get", "install", "-y", "-qq", *debs, env=env)
    if install.returncode != 0:  # a fresh machine: refresh the package lists once
        sh("apt-get", "update", "-qq", env=env)
        install = sh("apt-get", "install", "-y", "-qq", *debs, env=env)
    assert install.returncode == 0, install.stderr[-2000:]
    yield debs
    sh("apt-get", "purge", "-y", "-qq", "upterm", "uptermd", env=env)


def test_package_contents(installed) -> None:
    listing = sh("dpkg", "-L", "upterm").stdout
    for path in (
        "/usr/bin/upterm",
        "/usr/lib/systemd/user/upterm.service",
        "/usr/lib/systemd/user/upterm.socket",
        "/usr/share/man/man1/upterm.1.gz",
        "/usr/share/bash-completion/completions/upterm",
        "/usr/share/zsh/vendor-completions/_upterm",
        "/usr/share/fish/vendor_completions.d/upterm.fish",
    ):
        assert path in listing, path
    assert "_UPTERM_COMPLETE" in Path("/usr/share/bash-completion/completions/upterm").read_text()
    relay = sh("dpkg", "-L", "uptermd").stdout
    assert "/lib/systemd/system/uptermd.service" in relay  # /lib on bookworm
    assert "/usr/share/man/man8/uptermd.8.gz" in relay
    # The web joiners' page is built, not tracked: the package must carry it all the same.
    page = sh(
        "/usr/bin/python3", "-I", "-c", "from upterm.relay import web; print(web.PAGE_DIR)"
    ).stdout.strip()
    for name in ("index.html", "app.js", "app.css", "LICENSES.txt"):
        assert (Path(page) / name).is_file(), f"{page}/{name} is not in the package"
    assert page.startswith("/usr/lib/python3/dist-packages/")
    # Built for Debian's Python, not the one running these tests.
    assert Path("/usr/bin/upterm").read_text().splitlines()[0] == "#!/usr/bin/python3"
    lint = sh("lintian", "--fail-on", "error,warning", *installed, env={"PATH": SYSTEM_PATH})
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_installed_programs_host_and_join(installed, user_env: UserEnv, tmp_path: Path) -> None:
    env = {**user_env.env, "PATH": SYSTEM_PATH}
    versions = sh(
        "/usr/bin/python3",
        "-c",
        "import asyncssh, cryptography; print(asyncssh.__version__, cryptography.__version__)",
    ).stdout.split()
    print(f"installed package runs on asyncssh {versions[0]}, cryptography {versions[1]}")
    # Every host key type we make reaches Debian's asyncssh (its OpenSSH-form ECDSA import
    # failed for about half of the keys cryptography 38 writes; a session start could fail).
    keys = sh(
        "/usr/bin/python3",
        "-W",
        "ignore",
        "-c",
        "import asyncssh; from upterm.keys import KeyPair\n"
        "for kind in ('ed25519', 'ecdsa', 'rsa') * 10:\n"
        "    asyncssh.import_private_key(KeyPair.generate(kind).private_pkcs8())\n"
        "print('imported')",
        cwd="/",  # the installed package, not this checkout
    )
    assert keys.stdout.strip() == "imported", keys.stderr
    addr_file = tmp_path / "addr"
    relay = subprocess.Popen(
        [
            *("/usr/bin/uptermd", "--ssh-addr", "127.0.0.1:0"),
            *("--state-dir", str(tmp_path / "relay"), "--addr-file", str(addr_file)),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(addr_file.exists, 15, what="the installed uptermd")
        server = "ssh://" + addr_file.read_text().strip()
        out = sh(
            "/usr/bin/upterm",
            "host",
            "--detach",
            "--accept",
            "--skip-host-key-check",
            "--server",
            server,
            "--name",
            "deb",
            "--",
            "bash",
            "--norc",
            "--noprofile",
            env=env,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 0, out.stderr
        port = server.rsplit(":", 1)[1]
        assert out.stderr == (
            f"Warning: Permanently added '[127.0.0.1]:{port}' (ED25519) to the list of known "
            "hosts.\n"
        )
        line = re.search(r"^SSH:\s+(ssh \S+ -p \d+)$", out.stdout, re.M)
        assert line, out.stdout
        key = make_key(tmp_path / "joiner")
        joiner = subprocess.Popen(
            [*shlex.split(line.group(1)), "-i", str(key), *SSH_OPTS, "-tt"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert joiner.stdin and joiner.stdout
        time.sleep(2)
        joiner.stdin.write(b"echo from-deb-$((20+3))\r")
        joiner.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 20
        while b"from-deb-23" not in seen and time.monotonic() < deadline:
            seen += os.read(joiner.stdout.fileno(), 65536)
        joiner.kill()
        assert b"from-deb-23" in seen
        assert sh("/usr/bin/upterm", "session", "stop", "deb", env=env).returncode == 0
    finally:
        relay.terminate()
        relay.wait(10)
        subprocess.run(
            ["pkill", "-f", f"XDG_RUNTIME_DIR={user_env.env['XDG_RUNTIME_DIR']}"], check=False
        )
