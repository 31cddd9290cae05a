"""The shell scripts a stage pod runs: the init container is the upstream gate (stage_gate.py,
the same gate NeMo-Run tasks run), the main container runs the stage command. The spec comes
from the run's ConfigMap, mounted at SPECS_MOUNT; `$HOSTNAME` tells a Job's pods apart and
`$JOB_COMPLETION_INDEX` is a multi-node stage's node index.
"""

from __future__ import annotations

import shlex

from contract.launch import Rendezvous, StageLaunch
from pipeline.backends.stage_gate import ATTEMPT_ENV, Upstream, gate_script, run_script

__all__ = ["ATTEMPT_ENV", "SPECS_MOUNT", "Upstream", "main_script", "spec_key", "stage_command", "wait_script"]

SPECS_MOUNT = "/etc/faster-qat/specs"


def spec_key(stage: str) -> str:
    return f"{stage}.json"


def wait_script(stage: str, stage_dir: str, fingerprint: str, upstreams: list[Upstream], poll_seconds: int) -> str:
    copy_spec = f'cp {shlex.quote(SPECS_MOUNT + "/" + spec_key(stage))} "$TMP_SPEC"'
    return gate_script(stage, stage_dir, fingerprint, upstreams, poll_seconds, copy_spec, "$HOSTNAME")


def stage_command(kind: str, spec_path: str, nodes: int, processes_per_node: int, master_port: int) -> str:
    """The contract's launch command for one pod (a node of a multi-node stage: static ranks
    from the Indexed Job's completion index, node 0 as the rendezvous)."""
    launch = StageLaunch(kind, spec_path, nodes=nodes, processes_per_node=processes_per_node)
    return launch.shell(Rendezvous(endpoint=f"$MASTER_ADDR:{master_port}", node_rank="$JOB_COMPLETION_INDEX"))


def main_script(stage_dir: str, command: str) -> str:
    return run_script(stage_dir, command, message_file="/dev/termination-log")
