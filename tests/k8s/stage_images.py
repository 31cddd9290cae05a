"""The real `cpu` stage image in the dev cluster's registry, pinned by the registry's digest,
made the way a user makes it:

    python -m pipeline images build cpu --base <debian base> --network host
    python -m pipeline images push cpu
    python -m pipeline images lock cpu --lock-file <tmp>

The base is k8s/dev-cluster/debian-base.sh's (debootstrap + `docker import`: no public registry
is reachable); the build's `pip install` reaches the package index through the host network.
Docker's layer cache and the registry's blobs make every session after the first cheap.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.image_lock import read_lock
from tests.k8s.dev_cluster import REPO, DevCluster

DEBIAN_BASE = REPO / "k8s" / "dev-cluster" / "debian-base.sh"


def refs_for(registry: str) -> list[str]:
    return ["--set", f"images.refs.cpu={registry}/faster-qat/cpu:dev",
            "--set", f"images.refs.train={registry}/faster-qat/train:dev"]


def build_push_lock_cpu(registry: str, lock_file: Path) -> str:
    base = subprocess.run([str(DEBIAN_BASE)], capture_output=True, text=True, timeout=1800)
    if base.returncode != 0:
        pytest.fail(f"{DEBIAN_BASE} failed: {base.stderr.strip()[-2000:]}")
    refs = refs_for(registry)
    assert main(["images", "build", "cpu", "-c", "smoke", *refs, "--base", base.stdout.strip(),
                 "--network", "host"]) == 0
    assert main(["images", "push", "cpu", "-c", "smoke", *refs]) == 0
    assert main(["images", "lock", "cpu", "-c", "smoke", *refs, "--lock-file", str(lock_file)]) == 0
    entry = read_lock(lock_file).images["cpu"]
    assert entry.pinned_by == "registry-digest"
    return entry.ref


@pytest.fixture(scope="session")
def cluster_cpu_image(k8s_cluster: DevCluster, docker_client, tmp_path_factory) -> str:
    """`registry/faster-qat/cpu:dev@sha256:...` (the registry's manifest digest)."""
    return build_push_lock_cpu(k8s_cluster.registry, tmp_path_factory.mktemp("lock") / "lock.yaml")
