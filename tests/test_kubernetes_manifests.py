"""deploy/kubernetes: every object valid against Kubernetes' own schemas (strict: no unknown
field), the pieces wired to each other, uptermd's arguments accepted by uptermd, and the
Redis and Sentinel configurations accepted by the real servers."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import wait_for
from tests.relay.clusterkit import REDIS
from tests.relay.test_websocket import free_port, wait_listening
from upterm.relay.main import main as uptermd_main

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
#: The oldest Kubernetes still maintained when this was written, and the newest schemas.
VERSIONS = ("1.31.0", "1.37.0")


def objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    return docs


def one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_kustomization_names_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert [i["name"] for i in kustomization["images"]] == ["uptermd"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_for_kubernetes(version: str) -> None:
    kinds = []
    for obj in objects():
        kubernetes_validate.validate(obj, version, strict=True)
        kinds.append(obj["kind"])
    for kind in (
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "StatefulSet",
        "ConfigMap",
    ):
        assert kind in kinds, kind


def test_a_broken_object_is_caught() -> None:
    """The validator is not a formality: an unknown field and a wrong type are refused."""
    bad = one("Deployment", "uptermd")
    bad = {**bad, "spec": {**bad["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)
    worse = one("Service", "uptermd-ssh")
    worse = {**worse, "spec": {**worse["spec"], "ports": [{"port": "twenty-two"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worse, VERSIONS[0], strict=True)


def uptermd_container() -> dict[str, Any]:
    spec = one("Deployment", "uptermd")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return container


def test_uptermd_takes_its_arguments_and_environment() -> None:
    """The container's arguments and ConfigMap variables, as Kubernetes expands them, parse
    as uptermd's own command line (click, the real option set)."""
    container = uptermd_container()
    config = one("ConfigMap", "uptermd-config")["data"]
    assert {e["configMapRef"]["name"] for e in container["envFrom"]} == {"uptermd-config"}
    env = {"POD_IP": "10.1.2.3"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    assert "--cluster-advertise=10.1.2.3:2223" in args
    old = {k: os.environ.get(k) for k in config}
    try:
        os.environ.update(config)
        ctx = uptermd_main.make_context("uptermd", list(args))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    params = ctx.params
    assert params["routing"] == "redis"
    assert params["redis_url"] == config["UPTERMD_REDIS_URL"]
    assert params["node_addr"] == config["UPTERMD_NODE_ADDR"]
    assert params["lease_ttl"] == config["UPTERMD_LEASE_TTL"]
    assert params["private_key"] == ("/etc/uptermd/keys/ssh_host_ed25519_key",)


def test_the_pieces_refer_to_each_other() -> None:
    deployment = one("Deployment", "uptermd")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = uptermd_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    assert ports["ssh"] == int(args["ssh-addr"].rpartition(":")[2])
    assert ports["websocket"] == int(args["ws-addr"].rpartition(":")[2])
    assert ports["cluster"] == int(args["cluster-addr"].rpartition(":")[2])
    assert ports["metrics"] == int(args["metric-addr"].rpartition(":")[2])
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    # The key the Secret holds is the one uptermd is told to use, read-only.
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    (mount,) = container["volumeMounts"]
    assert volume["secret"]["secretName"] == "uptermd-keys" and mount["readOnly"] is True
    assert args["private-key"].startswith(mount["mountPath"] + "/")
    # Never root, nothing writable, no capabilities.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The drain fits in the grace period.
    drain = float(args["drain-delay"].rstrip("s")) + float(args["drain-timeout"].rstrip("s"))
    assert drain < pod["terminationGracePeriodSeconds"]
    for name in ("uptermd-ssh", "uptermd-websocket"):
        svc = one("Service", name)["spec"]
        assert svc["selector"].items() <= labels.items()
        assert all(p["targetPort"] in ports for p in svc["ports"])
    assert one("Service", "uptermd-ssh")["spec"]["externalTrafficPolicy"] == "Local"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        sel = one(kind, "uptermd")["spec"]
        sel = sel.get("selector") or sel["podSelector"]
        assert sel["matchLabels"].items() <= labels.items()
    hpa = one("HorizontalPodAutoscaler", "uptermd")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "uptermd",
    }
    assert hpa["minReplicas"] >= 2
    # Only uptermd pods reach the cluster port.
    rules = one("NetworkPolicy", "uptermd")["spec"]["ingress"]
    open_ports = {p["port"] for r in rules if "from" not in r for p in r["ports"]}
    assert "cluster" not in open_ports and {"ssh", "websocket"} <= open_ports
    (peer_rule,) = [r for r in rules if "from" in r]
    assert [p["port"] for p in peer_rule["ports"]] == ["cluster"]
    # The registry URL names the Sentinel Service and the service Sentinel monitors.
    url = one("ConfigMap", "uptermd-config")["data"]["UPTERMD_REDIS_URL"]
    m = re.fullmatch(r"redis\+sentinel://([\w-]+):(\d+)/(\w+)", url)
    assert m is not None, url
    sentinel_svc = one("Service", m.group(1))["spec"]
    assert [p["port"] for p in sentinel_svc["ports"]] == [int(m.group(2))]
    conf = one("ConfigMap", "uptermd-redis")["data"]["sentinel.conf"]
    assert f"sentinel monitor {m.group(3)} " in conf


def test_the_redis_and_sentinel_configurations_run(tmp_path: Path) -> None:
    """The ConfigMap's redis.conf and sentinel.conf, with the cluster's names replaced by
    loopback addresses, started by this machine's Redis 7.0 (the image's major version)."""
    data = one("ConfigMap", "uptermd-redis")["data"]
    port, sport = free_port(), free_port()
    redis_conf = tmp_path / "redis.conf"
    redis_conf.write_text(
        data["redis.conf"].replace("port 6379", f"port {port}").replace("ANNOUNCE", "127.0.0.1")
        + f"bind 127.0.0.1\ndir {tmp_path}\n"
    )
    sentinel_conf = tmp_path / "sentinel.conf"
    sentinel_conf.write_text(
        data["sentinel.conf"]
        .replace("port 26379", f"port {sport}")
        .replace("ANNOUNCE", "127.0.0.1")
        .replace("uptermd-redis-0.uptermd-redis 6379 2", f"127.0.0.1 {port} 1")
        + f"bind 127.0.0.1\ndir {tmp_path}\n"
    )
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [REDIS, str(redis_conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        wait_listening(port, procs[-1])
        procs.append(
            subprocess.Popen(
                ["redis-sentinel", str(sentinel_conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_listening(sport, procs[-1])

        def sees_master() -> bool:
            out = subprocess.run(
                ["redis-cli", "-p", str(sport), "sentinel", "get-master-addr-by-name", "uptermd"],
                capture_output=True,
                text=True,
            )
            return out.stdout.split() == ["127.0.0.1", str(port)]

        # Its start takes 1-7 s here, once over 10 (the configuration names hosts that only
        # exist in the cluster): a bound to wait for, not a figure.
        wait_for(sees_master, 30, what="Sentinel to watch the master")
        policy = subprocess.run(
            ["redis-cli", "-p", str(port), "config", "get", "maxmemory-policy"],
            capture_output=True,
            text=True,
        )
        assert policy.stdout.split() == ["maxmemory-policy", "noeviction"]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
