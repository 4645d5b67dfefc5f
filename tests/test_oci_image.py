"""The uptermd OCI image: built here by packaging/oci/build-image.sh (debootstrap, buildah; no
base image), then run with podman: a host and a joiner meet through the relay in a container,
and two containers form a cluster on a Redis server on loopback."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import UserEnv, wait_for
from tests.e2e.test_cli_e2e import Joiner
from tests.e2e.test_reconnect_e2e import host
from tests.relay.clusterkit import RedisServer, ready
from tests.relay.test_websocket import free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/uptermd:0.1.0"

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        os.getuid() != 0, reason="debootstrap and buildah's storage need root (CI runs as root)"
    ),
]


def podman_argv() -> list[str]:
    """podman, told how to run here: a host with cgroup v1 mounted beside v2 ("hybrid", as in
    this CI sandbox) needs runc and cgroupfs, since crun refuses hybrid hosts."""
    argv = ["podman"]
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        argv += ["--runtime", "runc", "--cgroup-manager", "cgroupfs"]
    return argv


def limits() -> list[str]:
    """podman's default limits are above what an unprivileged sandbox may grant: ask for
    what this process has."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


def sh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> Iterator[Path]:
    out = ROOT / "dist" / "uptermd-0.1.0.oci.tar"
    built = sh(str(ROOT / "packaging" / "oci" / "build-image.sh"), str(out), timeout=840)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    yield out


class Container:
    def __init__(self, name: str, *args: str, volumes: tuple[str, ...] = ()) -> None:
        self.name = name
        vols = [v for vol in volumes for v in ("-v", vol)]
        started = sh(
            *podman_argv(), "run", "-d", "--name", name, "--network", "host", *limits(), *vols,
            IMAGE, *args,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr

    def logs(self) -> str:
        out = sh(*podman_argv(), "logs", self.name)
        return out.stdout + out.stderr

    def stop(self) -> int:
        sh(*podman_argv(), "stop", "-t", "15", self.name, timeout=60)
        state = sh(*podman_argv(), "inspect", self.name, "--format", "{{.State.ExitCode}}")
        sh(*podman_argv(), "rm", "-f", self.name, timeout=60)
        return int(state.stdout.strip() or -1)


def test_the_image_is_debian_and_ours_alone(image: Path) -> None:
    assert image.stat().st_size > 10 << 20
    inspect = sh("buildah", "inspect", "--type", "image", IMAGE)
    assert inspect.returncode == 0, inspect.stderr
    data = json.loads(inspect.stdout)
    config = data["OCIv1"]["config"]
    assert config["Entrypoint"] == ["/usr/bin/uptermd"]
    assert config["User"] == "999:999"  # never root
    assert set(config["ExposedPorts"]) == {"2222/tcp", "8080/tcp", "9100/tcp"}
    assert data["OCIv1"]["rootfs"]["diff_ids"] and len(data["OCIv1"]["rootfs"]["diff_ids"]) == 1
    # From scratch: one layer, one history entry, nothing pulled from a registry.
    assert len(data["OCIv1"]["history"]) == 1
    checks = sh(
        *podman_argv(), "run", "--rm", *limits(), "--entrypoint", "/bin/sh", IMAGE, "-c",
        "grep PRETTY_NAME /etc/os-release; python3 -W ignore -c 'import redis, websockets, "
        "asyncssh; print(asyncssh.__version__)'; ls /var/lib/apt/lists | wc -l; id -un",
    )  # fmt: skip
    assert checks.returncode == 0, checks.stderr
    lines = checks.stdout.splitlines()
    assert "Debian GNU/Linux 12" in lines[0]
    assert lines[1].startswith("2.")  # Debian's asyncssh
    assert lines[2] == "0"  # no package lists left behind
    assert lines[3] == "uptermd"


def test_a_host_and_a_joiner_meet_through_the_relay_in_a_container(
    image: Path, user_env: UserEnv, joiner_key: Path
) -> None:
    port, metrics = free_port(), free_port()
    relay = Container(
        "uptermd-test-single",
        "--ssh-addr", f"127.0.0.1:{port}", "--metric-addr", f"127.0.0.1:{metrics}",
    )  # fmt: skip
    try:
        wait_for(lambda: ready(metrics), 30, what="the relay in its container")
        first = host(user_env, f"ssh://127.0.0.1:{port}", "oci")
        joiner = Joiner(first, joiner_key)
        joiner.expect(b"$ ")
        joiner.type("echo boxed-$((9*9))\r")
        joiner.expect(b"boxed-81")
        joiner.close()
    finally:
        assert relay.stop() == 0, relay.logs()  # SIGTERM drains and exits 0


def test_two_containers_form_a_cluster(
    image: Path, user_env: UserEnv, joiner_key: Path, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    keys = tmp_path / "keys"
    keys.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "cluster_key")],
        check=True,
    )
    # The shared cluster key, readable by the image's user only (as a Kubernetes Secret).
    os.chown(keys / "cluster_key", 999, 999)
    nodes: list[Container] = []
    ports: list[int] = []
    try:
        for name in ("uptermd-test-a", "uptermd-test-b"):
            port, metrics, cluster = free_port(), free_port(), free_port()
            nodes.append(
                Container(
                    name,
                    "--ssh-addr",
                    f"127.0.0.1:{port}",
                    "--metric-addr",
                    f"127.0.0.1:{metrics}",
                    "--routing",
                    "redis",
                    "--redis-url",
                    redis.url,
                    "--cluster-addr",
                    f"127.0.0.1:{cluster}",
                    "--private-key",
                    "/keys/cluster_key",
                    volumes=(f"{keys}:/keys:ro",),
                )
            )
            wait_for(lambda m=metrics: ready(m), 30, what=f"{name} to be ready")
            ports.append(port)
        first = host(user_env, f"ssh://127.0.0.1:{ports[0]}", "oci-cl")
        line = first["sshCommand"].replace(f"-p {ports[0]}", f"-p {ports[1]}")
        joiner = Joiner(dict(first, sshCommand=line), joiner_key)
        joiner.expect(b"$ ")
        joiner.type("echo hopped-$((8*9))\r")
        joiner.expect(b"hopped-72")
        joiner.close()
    finally:
        for node in nodes:
            node.stop()
        redis.stop()
        shutil.rmtree(keys, ignore_errors=True)
