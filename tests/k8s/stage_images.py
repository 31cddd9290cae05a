"""The real stage images in the dev cluster's registry, pinned by the registry's digest,
made the way a user makes it:

    python -m pipeline images build cpu --base <debian base> --network host
    python -m pipeline images push cpu
    python -m pipeline images lock cpu --lock-file <tmp>

The base is k8s/dev-cluster/debian-base.sh's (debootstrap + `docker import`: no public registry
is reachable); the build's `pip install` reaches the package index through the host network.
The `train` image the same way, on that base plus torch (k8s/dev-cluster/torch-base/).
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
TORCH_BASE = REPO / "k8s" / "dev-cluster" / "torch-base"
TORCH_VERSION = "2.13.0"  # what CI installs (.ci/run)


def refs_for(registry: str) -> list[str]:
    return ["--set", f"images.refs.cpu={registry}/faster-qat/cpu:dev",
            "--set", f"images.refs.train={registry}/faster-qat/train:dev"]


def debian_base() -> str:
    base = subprocess.run([str(DEBIAN_BASE)], capture_output=True, text=True, timeout=1800)
    if base.returncode != 0:
        pytest.fail(f"{DEBIAN_BASE} failed: {base.stderr.strip()[-2000:]}")
    return base.stdout.strip()


def torch_base(docker_client) -> str:
    """debian base + torch: the stand-in for the train image's NGC base (5 GB; built once)."""
    tag = f"faster-qat-torch-base:{TORCH_VERSION}"
    built = subprocess.run(["docker", "build", "-q", "--network", "host", "--build-arg", f"BASE={debian_base()}",
                            "--build-arg", f"TORCH_VERSION={TORCH_VERSION}", "-t", tag, str(TORCH_BASE)],
                           capture_output=True, text=True, timeout=3600)
    if built.returncode != 0:
        pytest.fail(f"docker build {TORCH_BASE} failed: {built.stderr.strip()[-2000:]}")
    return tag


def build_push_lock(name: str, base: str, registry: str, lock_file: Path) -> str:
    refs = refs_for(registry)
    assert main(["images", "build", name, "-c", "smoke", *refs, "--base", base, "--network", "host"]) == 0
    assert main(["images", "push", name, "-c", "smoke", *refs]) == 0
    assert main(["images", "lock", name, "-c", "smoke", *refs, "--lock-file", str(lock_file)]) == 0
    entry = read_lock(lock_file).images[name]
    assert entry.pinned_by == "registry-digest"
    return entry.ref


@pytest.fixture(scope="session")
def cluster_cpu_image(k8s_cluster: DevCluster, docker_client, tmp_path_factory) -> str:
    """`registry/faster-qat/cpu:dev@sha256:...` (the registry's manifest digest)."""
    return build_push_lock("cpu", debian_base(), k8s_cluster.registry, tmp_path_factory.mktemp("lock") / "lock.yaml")


@pytest.fixture(scope="session")
def cluster_train_image(k8s_cluster: DevCluster, docker_client, tmp_path_factory) -> str:
    """The train image (torch, ModelOpt, torchao, lm-eval) by its registry digest: ~6 GB; the
    first build and push take ~15 min on 2 cores."""
    return build_push_lock("train", torch_base(docker_client), k8s_cluster.registry,
                           tmp_path_factory.mktemp("lock") / "lock.yaml")
