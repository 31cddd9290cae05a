"""The one launch command: how a stage process starts, on every backend.

After NeMo-Run's Launcher: a backend says how many nodes and processes a stage has and how the
nodes meet; this module says what runs. One process: `python -m stages.<kind> --spec FILE`.
Several: torchrun with the same signal handling everywhere (SIGUSR1 too, so a stage checkpoints
on Slurm's warning, a pod's SIGTERM or a Ctrl-C alike) and a shutdown grace period.

`argv` returns the list a subprocess runs; `shell` returns the same command as one shell word
list for scripts (Slurm batch scripts, pod commands), where `$VARS` of the rendezvous are left
for the script's shell to expand.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from contract.kinds import stage_module

# torchrun forwards these to its workers (SIGUSR1 = checkpoint, then stop).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 100


@dataclass(frozen=True)
class Rendezvous:
    """How the nodes of a multi-node stage find each other (ignored for one node).

    With `node_rank` the ranks are static (k8s Indexed Jobs: `$JOB_COMPLETION_INDEX`); without,
    torchrun's c10d rendezvous assigns them (Slurm)."""

    endpoint: str  # host:port of node 0, e.g. "$MASTER_ADDR:$MASTER_PORT"
    run_id: str = "stage"  # c10d rendezvous id, e.g. "$SLURM_JOB_ID"
    node_rank: str | None = None


@dataclass(frozen=True)
class StageLaunch:
    kind: str
    spec_path: str
    nodes: int = 1
    processes_per_node: int = 1
    python: str = "python"
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        return self.nodes > 1 or self.processes_per_node > 1

    @property
    def module(self) -> str:
        """What `python -m` runs (the local driver's fork server runs it in a forked child)."""
        return stage_module(self.kind)

    @property
    def module_args(self) -> list[str]:
        return ["--spec", str(self.spec_path)]

    def argv(self, rendezvous: Rendezvous | None = None) -> list[str]:
        stage = ["-m", self.module, *self.module_args]
        if not self.distributed:
            return [self.python, *stage]
        torchrun = [self.python, "-m", "torch.distributed.run",
                    f"--nnodes={self.nodes}", f"--nproc-per-node={self.processes_per_node}"]
        if self.nodes == 1:
            torchrun.append("--standalone")
        elif rendezvous is None:
            raise ValueError(f"a {self.nodes}-node stage needs a rendezvous")
        elif rendezvous.node_rank is not None:
            host, _, port = rendezvous.endpoint.rpartition(":")
            torchrun += [f"--node-rank={rendezvous.node_rank}", f"--master-addr={host}", f"--master-port={port}"]
        else:
            torchrun += ["--rdzv-backend=c10d", f"--rdzv-id={rendezvous.run_id}",
                         f"--rdzv-endpoint={rendezvous.endpoint}"]
        torchrun += [f"--signals-to-handle={FORWARDED_SIGNALS}", f"--shutdown-timeout={self.shutdown_timeout_s}"]
        return [*torchrun, *stage]

    def shell(self, rendezvous: Rendezvous | None = None) -> str:
        """The command as shell text; `$NAME` parts stay expandable (double-quoted)."""
        return " ".join(_quote_keeping_vars(part) for part in self.argv(rendezvous))


def _quote_keeping_vars(part: str) -> str:
    return f'"{part}"' if "$" in part else shlex.quote(part)
