"""Fixtures shared across test folders, and how the suite spreads over pytest-xdist's workers.

The suite runs on two workers (pyproject's addopts: `-n auto --maxprocesses 2`): much of it
waits on clusters, servers and stage processes. Tests that drive one machine-wide thing run on
one worker, one after another: those of the dev Kubernetes cluster and the Docker engine's
images, and those of the Slurm test cluster (MACHINE_WIDE_PATHS). `-n 0` runs everything in
one process.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from tests.smoke import SMOKE_STAGES, pipeline_cli

# The machine-wide fixtures, defined once: a fixture imported into two conftests is two fixtures,
# each of which would start (or find) its engine or cluster.
pytest_plugins = ["tests.docker_engine", "tests.k8s.dev_cluster", "tests.k8s.stage_images"]

MACHINE_WIDE_PATHS = {
    "tests/k8s/": "k8s-and-docker",
    "tests/pipeline/images/": "k8s-and-docker",
    "tests/pipeline/backends/test_k8s_cluster.py": "k8s-and-docker",
    "tests/pipeline/backends/test_slurm_cluster.py": "slurm",
    "tests/pipeline/backends/test_slurm_smoke.py": "slurm",
    "tests/pipeline/backends/test_nemo_slurm.py": "slurm",
}
# The fixtures that take one of them: a test using one must live under its group's paths.
MACHINE_WIDE_FIXTURES = {"k8s_cluster": "k8s-and-docker", "docker_client": "k8s-and-docker",
                         "slurm_cluster": "slurm"}


def machine_wide_group(nodeid: str) -> str | None:
    return next((group for prefix, group in MACHINE_WIDE_PATHS.items() if nodeid.startswith(prefix)), None)


class MachineWideGroups(LoadScopeScheduling):
    """Each machine-wide group is one unit of work (one worker); every other test is its own."""

    def _split_scope(self, nodeid: str) -> str:
        return machine_wide_group(nodeid) or nodeid


def pytest_xdist_make_scheduler(config, log) -> LoadScopeScheduling:
    # Not xdist's own `loadgroup`: with pytest 9.2 its renamed test ids do not take effect.
    return MachineWideGroups(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    # The tests that compare against the local smoke study go last, so that a worker which reaches
    # one has other work behind it, not a wait for the study the other worker is running.
    items.sort(key=lambda item: "smoke_root" in item.fixturenames)


def pytest_runtest_setup(item) -> None:
    for name in item.fixturenames:
        group = MACHINE_WIDE_FIXTURES.get(name)
        if group and machine_wide_group(item.nodeid) != group:
            pytest.fail(f"{item.nodeid} uses {name}: put it under one of the paths of group '{group}' in "
                        "tests/conftest.py's MACHINE_WIDE_PATHS (it would race the tests of that group)")


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder every worker of this test session sees (the session's base temp when alone)."""
    base = tmp_path_factory.getbasetemp()
    if base.name.startswith("popen-gw"):  # an xdist worker's own base: its parent is the session's
        base = base.parent
    return base / name


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """The README's smoke study, run once locally per test session (the first worker that needs
    it runs it, the others wait for it): the artifact root. Tests only read it."""
    folder = shared_dir(tmp_path_factory, "smoke")
    folder.mkdir(exist_ok=True)
    root = folder / "runs"
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            result = pipeline_cli("run", "-c", "smoke", "--root", str(root), "--plain")
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
            assert f"smoke: all {SMOKE_STAGES} stages succeeded" in result.stdout
            (folder / "done").touch()
    return root
