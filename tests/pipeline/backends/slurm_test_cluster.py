"""The one-node Slurm the tests run on (slurm/start-test-cluster.sh), shared by the test
sessions of this machine and stopped by the last of them, when tests started it.

A session takes a lease (a file named by its pid under `<state dir>/test-sessions/`) before it
starts or finds the cluster, and gives it back at its end. Whoever finds the daemons down and
starts them marks the cluster as the tests' own (`started-by-tests`); the session that gives
back the last live lease of such a cluster stops it (`start-test-cluster.sh --stop`). A cluster
that was up before any test session (started by hand) is left running. One file lock orders
all of this between sessions.

    cluster = SlurmTestCluster.default()
    conf = cluster.take()      # SLURM_CONF of the running cluster
    ...
    cluster.give_back()        # stops it when this session was its last user and tests started it
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.processes import process_alive

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "slurm" / "start-test-cluster.sh"
DEFAULT_STATE_DIR = "/var/tmp/faster-qat-slurm"  # as the script's FQ_SLURM_DIR default
START_TIMEOUT_S = 900  # the first call installs packages


class ClusterError(RuntimeError):
    pass


def controller_running() -> bool:
    return subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0


@dataclass
class SlurmTestCluster:
    state_dir: Path
    session: int  # this test session's pid

    @classmethod
    def default(cls) -> SlurmTestCluster:
        return cls(Path(os.environ.get("FQ_SLURM_DIR", DEFAULT_STATE_DIR)), os.getpid())

    @property
    def marker(self) -> Path:
        return self.state_dir / "started-by-tests"

    @property
    def leases(self) -> Path:
        return self.state_dir / "test-sessions"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "test-sessions.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def take(self) -> str:
        """Start (or find) the cluster and hold a lease on it; returns its SLURM_CONF."""
        with self._locked():
            was_up = controller_running()
            self.leases.mkdir(exist_ok=True)
            (self.leases / str(self.session)).touch()
            try:
                started = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=START_TIMEOUT_S,
                                         env={**os.environ, "FQ_SLURM_DIR": str(self.state_dir)})
            finally:
                if not was_up and controller_running():
                    self.marker.touch()  # ours to stop, even when the start failed halfway
            if started.returncode != 0:
                raise ClusterError(f"{SCRIPT} failed: {started.stderr.strip()[-2000:]}")
        for line in started.stdout.splitlines():  # `export SLURM_CONF=...`
            if line.startswith("export SLURM_CONF="):
                return line.removeprefix("export SLURM_CONF=")
        raise ClusterError(f"{SCRIPT} printed no SLURM_CONF: {started.stdout[-500:]}")

    def users(self) -> list[int]:
        """Sessions holding a lease that still run (a killed session's lease is dropped)."""
        found = []
        for lease in self.leases.glob("*") if self.leases.exists() else []:
            pid = int(lease.name)
            if process_alive(pid):
                found.append(pid)
            else:
                lease.unlink(missing_ok=True)
        return sorted(found)

    def give_back(self) -> bool:
        """Drop this session's lease; stop the cluster when tests started it and nobody else
        holds one. True when it was stopped."""
        with self._locked():
            (self.leases / str(self.session)).unlink(missing_ok=True)
            if self.users() or not self.marker.exists():
                return False
            stopped = subprocess.run([str(SCRIPT), "--stop"], capture_output=True, text=True, timeout=120,
                                     env={**os.environ, "FQ_SLURM_DIR": str(self.state_dir)})
            if stopped.returncode != 0:
                raise ClusterError(f"{SCRIPT} --stop failed: {stopped.stderr.strip()[-2000:]}")
            self.marker.unlink()
            return True
