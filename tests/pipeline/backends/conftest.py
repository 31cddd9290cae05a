"""A real one-node Slurm for the slurm backend's tests, started once per session by
`slurm/start-test-cluster.sh` (apt install on the first call, then ~10 s; ~1 s when up) and
stopped at the session's end when the tests started it and no other test session still uses
it (slurm_test_cluster.py); a cluster someone started by hand is left running."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.pipeline.backends.slurm_test_cluster import ClusterError, SlurmTestCluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start (or find) the test cluster; yields its partition. In CI (CI=1) it must start."""
    if os.geteuid() != 0 or (shutil.which("apt-get") is None and shutil.which("slurmctld") is None):
        reason = "the Slurm test cluster needs root and apt-get (or Slurm installed)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the Slurm tests")
        pytest.skip(reason)
    cluster = SlurmTestCluster.default()
    try:
        os.environ["SLURM_CONF"] = cluster.take()
    except ClusterError as error:
        cluster.give_back()
        pytest.fail(str(error))
    yield "debug"
    cluster.give_back()


@pytest.fixture(scope="session")
def nemorun_home(tmp_path_factory) -> Path:
    """NeMo-Run's own records (NEMORUN_HOME: experiments, its job index) in a session folder, set
    before anything imports nemo_run (it reads the variable once). In CI the extra must be there."""
    import importlib.util

    if importlib.util.find_spec("nemo_run") is None:
        reason = "the nemo-run extra is not installed (pip install -e '.[nemo]')"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the NeMo-Run tests")
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("nemorun-home")
    os.environ["NEMORUN_HOME"] = str(home)
    return home

