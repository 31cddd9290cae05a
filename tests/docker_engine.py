"""A real Docker engine for the image and k8s tests, as session fixtures: installed (apt docker.io)
and started (dockerd) when missing. Without one the tests skip with the reason, except under CI
(CI set), where they fail: CI must run them. Registered once, in tests/conftest.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.pipeline.images.base_image import ensure_base_image


def _ping():
    import docker

    try:
        client = docker.from_env(timeout=120)
        client.ping()
        return client
    except Exception:
        return None


def _install_docker() -> str | None:
    if shutil.which("dockerd"):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "dockerd is not installed and this user cannot apt-get install docker.io"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "docker.io"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def docker_client():
    client = _ping()
    started = None
    if client is None:
        reason = _install_docker()
        if reason is None:
            state = Path(tempfile.mkdtemp(prefix="dockerd-"))
            log = state / "dockerd.log"
            # No bridge or iptables: these machines have neither; containers run --network none.
            # Its own pid file and exec root: a dockerd killed earlier leaves
            # /var/run/docker/containerd/containerd.pid behind, and once that pid belongs to
            # another process the next dockerd waits for a containerd that never answers.
            started = subprocess.Popen(["dockerd", "--iptables=false", "--bridge=none",
                                        f"--pidfile={state / 'docker.pid'}", f"--exec-root={state / 'exec'}"],
                                       stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                       start_new_session=True)
            deadline = time.time() + 60
            while client is None and time.time() < deadline and started.poll() is None:
                time.sleep(0.5)
                client = _ping()
            if client is None:
                last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
                how = "exited" if started.poll() is not None else "did not answer within 60 s"
                reason = f"dockerd {how}: {last[0][:300]} (log: {log})"
                started.kill()
                started.wait(timeout=30)
                started = None
        if client is None:
            if os.environ.get("CI"):
                pytest.fail(f"no Docker engine: {reason}")
            pytest.skip(f"no Docker engine: {reason}")
    yield client
    if started is not None:
        started.terminate()
        started.wait(timeout=30)


@pytest.fixture(scope="session")
def base_image(docker_client) -> str:
    """A local base image (this interpreter + pydantic), made offline with `docker import`."""
    return ensure_base_image(docker_client)
