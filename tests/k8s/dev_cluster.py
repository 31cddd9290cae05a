"""The real one-node Kubernetes cluster of k8s/dev-cluster/, as a pytest session fixture.

    def test_something(k8s_cluster):
        k8s_cluster.kubectl("apply", "-f", "-", input_text=manifest)
        os.environ["KUBECONFIG"] = str(k8s_cluster.kubeconfig)   # what the k8s backend reads
        image = k8s_cluster.busybox   # 127.0.0.1:35000/faster-qat/busybox@sha256:... in its registry

`cluster.py start` builds the binaries when the cache lacks them (a cold build takes a quarter
of an hour on 2 cores; `.ci/run` does it before the tests), then starts, or reuses, the cluster.
A cluster the session started is stopped at its end (~4 s); one that was already up (started
by hand with `k8s/dev-cluster/cluster.py start`, for a quick edit-test loop) is left up. Without root or the Debian packages it needs, the tests skip with the reason;
under CI (CI set) they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.registry import busybox_image

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "k8s" / "dev-cluster" / "cluster.py"
# Debian packages the node and the registry need: command -> package.
PACKAGES = {"containerd": "containerd", "runc": "runc", "/usr/lib/cni/bridge": "containernetworking-plugins",
            "docker-registry": "docker-registry", "iptables": "iptables", "openssl": "openssl"}
START_TIMEOUT_S = 3600  # a cold build included


@dataclass(frozen=True)
class DevCluster:
    kubeconfig: Path
    server: str
    registry: str  # host:port of the registry the node pulls from (plain HTTP, 127.0.0.1)
    node: str
    node_ip: str
    bin_dir: Path
    ca: Path
    busybox: str  # a small image in the registry, by digest

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
                              input=input_text, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()[-1000:]}")
        return done

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        return json.loads(self.kubectl("-n", namespace, "get", kind, name, "-o", "json").stdout)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "--server-side", "--field-manager=faster-qat-tests", "-f", "-", input_text=manifest)

    def logs(self, pod: str, namespace: str, container: str | None = None) -> str:
        return self.kubectl("-n", namespace, "logs", pod, *([f"-c={container}"] if container else [])).stdout


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    deadline = time.time() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def bind_artifact_volume(cluster: DevCluster, namespace: str, root: Path) -> str:
    """A hostPath PV at `root`, pre-bound to the artifact claim the k8s backend renders in
    `namespace`; returns the PV's name (delete it after the test)."""
    volume = f"artifacts-{namespace}"
    cluster.apply(f"""
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {volume}}}
spec:
  capacity: {{storage: 2Ti}}
  accessModes: [ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {{path: {root}, type: Directory}}
  claimRef: {{namespace: {namespace}, name: faster-qat-artifacts}}
""")
    return volume


def _missing_packages() -> list[str]:
    return sorted({package for command, package in PACKAGES.items()
                   if not (Path(command).exists() if command.startswith("/") else shutil.which(command))})


def _install(packages: list[str]) -> str | None:
    if not packages:
        return None
    if shutil.which("apt-get") is None:
        return f"missing Debian packages {', '.join(packages)} and no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the dev Kubernetes cluster must start in CI: {reason}")
    pytest.skip(f"no dev Kubernetes cluster: {reason}")


def start_dev_cluster() -> DevCluster:
    if os.geteuid() != 0:
        _unavailable("it needs root (kubelet, containerd, pod networking)")
    info = subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "info"], capture_output=True, text=True)
    built = info.returncode == 0 and (Path(json.loads(info.stdout)["bin"]) / "kube").exists()
    if not built and shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists():
        _unavailable("it is built from the Kubernetes Go modules and there is no go command")
    reason = _install(_missing_packages())
    if reason:
        _unavailable(reason)
    env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/usr/local/go/bin"}
    try:
        done = subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True,
                              timeout=START_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{CLUSTER_SCRIPT} start took more than {START_TIMEOUT_S} s")
    if done.returncode != 0:
        pytest.fail(f"{CLUSTER_SCRIPT} start failed: {(done.stderr or done.stdout).strip()[-3000:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return DevCluster(kubeconfig=Path(info["kubeconfig"]), server=info["server"], registry=info["registry"],
                      node=info["node"], node_ip=info["node_ip"], bin_dir=Path(info["bin"]), ca=Path(info["ca"]),
                      busybox=busybox_image(info["registry"]))


def _running() -> bool:
    return subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[DevCluster]:
    """The dev cluster (started, or reused when it runs already); a cluster this session started
    is stopped at its end, so no test leaves a process behind."""
    was_running = _running()
    cluster = start_dev_cluster()
    yield cluster
    if not was_running:
        subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def k8s_namespace(k8s_cluster: DevCluster) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) after the test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    k8s_cluster.kubectl("create", "namespace", name)
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
