"""The text of a stage's Slurm batch script, and of a `submit.sh` that queues a whole run.

`batch_script` is one plain function: its keyword parameters are the valid options, so a
misspelt option fails at the call. Dependencies are not in the script (job ids are known
only at submission): `sbatch --dependency=afterok:...` adds them on the command line, the
same way in `submit.sh` and in the backend's `submit`.

The script runs the stage command under `srun` (one task per node): single-process stages
run `python -m stages.<kind> --spec FILE`; multi-process stages run torchrun with a c10d
rendezvous on the first node of the allocation. On SIGUSR1 (sent `signal_before_s` before
the time limit, or by a preemption) the script forwards it to the stage, which checkpoints
and stops, then requeues the job unless the stage already wrote a marker.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from contract.launch import Rendezvous, StageLaunch
from contract.markers import FAILED_MARKER, SUCCESS_MARKER
from pipeline.backends.job_shell import place_spec

NCCL_ENV = {"NCCL_DEBUG": "WARN", "NCCL_NVLS_ENABLE": "0"}  # NVLink multicast stays off
RDZV_PORT_BASE = 20000
SPEC_HEREDOC = "FASTER_QAT_SPEC_EOF"


def enroot_image_ref(ref: str) -> str:
    """A docker-style reference as pyxis/enroot spell it: `registry#repo[:tag][@digest]`."""
    if ref.startswith(("/", "./")) or "#" in ref:  # a squashfs file, or already enroot-style
        return ref
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return f"{first}#{rest}"
    return ref


def batch_script(
    *,
    job_name: str,
    log_path: Path,
    stage_dir: Path,
    kind: str,
    spec_path: Path,
    partition: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    time_limit_min: int = 60,
    nodes: int = 1,
    gpus_per_node: int = 0,
    cpus_per_task: int = 1,
    memory_gb: float = 4.0,
    exclusive: bool = False,
    extra_sbatch: Sequence[str] = (),
    container_image: str | None = None,
    container_mounts: Sequence[str] = (),
    container_workdir: str | None = None,
    python: str = "python",
    venv: str | None = None,
    workdir: str | None = None,
    env: dict[str, str] | None = None,
    requeue: bool = True,
    signal_before_s: int = 120,
    spec_json: str | None = None,
) -> str:
    """One stage's batch script. Container mode when `container_image` is set, else bare metal.
    With `spec_json` the script carries the stage's spec and writes it to `spec_path` first, so
    the rendered files alone run the stage (nothing is prepared on the cluster beforehand)."""
    directives = [
        f"--job-name={job_name}",
        f"--output={log_path}",
        "--open-mode=append",  # a requeued job appends to the same stage.log
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={cpus_per_task}",
        f"--mem={int(memory_gb * 1024)}M",
        f"--time={time_limit_min}",
    ]
    directives += [f"--{name}={value}" for name, value in
                   (("partition", partition), ("account", account), ("qos", qos)) if value]
    if gpus_per_node:
        directives.append(f"--gpus-per-node={gpus_per_node}")
    if exclusive:
        directives.append("--exclusive")
    if requeue:
        directives += ["--requeue", f"--signal=B:USR1@{signal_before_s}"]
    else:
        directives.append("--no-requeue")
    directives += list(extra_sbatch)

    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    setup: list[str] = []
    if container_image:
        mounts = [f"{stage_dir.parent.parent}:{stage_dir.parent.parent}", *container_mounts]
        srun += [f"--container-image={enroot_image_ref(container_image)}",
                 f"--container-mounts={','.join(mounts)}"]
        if container_workdir:
            srun.append(f"--container-workdir={container_workdir}")
    else:
        if venv:
            setup.append(f"source {shlex.quote(str(Path(venv) / 'bin' / 'activate'))}")
        if workdir:
            setup.append(f"cd {shlex.quote(workdir)}")
    launch = StageLaunch(kind, str(spec_path), nodes=nodes, processes_per_node=max(1, gpus_per_node),
                         python=python, shutdown_timeout_s=max(10, signal_before_s - 20))
    command = launch.shell(Rendezvous(endpoint="$MASTER_ADDR:$MASTER_PORT", run_id="$SLURM_JOB_ID"))
    exports = {"PYTHONUNBUFFERED": "1", **NCCL_ENV, **(env or {})}
    markers = " || ".join(f"-e {shlex.quote(str(stage_dir / m))}" for m in (SUCCESS_MARKER, FAILED_MARKER))
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "",
             f"# stage {stage_dir.name} ({kind}), written by pipeline/backends/slurm_script.py",
             "set -uo pipefail",
             *(f"export {name}={shlex.quote(value)}" for name, value in exports.items()),
             *setup,
             'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
             f"export MASTER_PORT=$(( {RDZV_PORT_BASE} + SLURM_JOB_ID % 20000 ))",
             'echo "== job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST '
             'at $(date -Is)"',
             ""]
    if spec_json is not None:
        fingerprint = json.loads(spec_json)["fingerprint"]
        heredoc = f"cat > \"$TMP_SPEC\" <<'{SPEC_HEREDOC}'\n{spec_json.rstrip()}\n{SPEC_HEREDOC}"
        lines += [*place_spec(str(stage_dir), fingerprint, heredoc, "$SLURM_JOB_ID"), ""]
    lines += _signal_handling(srun, command, markers, requeue)
    return "\n".join(lines) + "\n"


def _signal_handling(srun: list[str], command: str, markers: str, requeue: bool) -> list[str]:
    run_step = f"{shlex.join(srun)} {command} &"
    if not requeue:
        return [run_step, "wait $!"]
    return [
        "# SIGUSR1 (time limit near, or preemption): the stage checkpoints and stops; then requeue.",
        "preempted=0",
        'on_usr1() { preempted=1; echo "== SIGUSR1: asking the stage to checkpoint"; '
        'kill -USR1 "$step" 2>/dev/null; }',
        "trap on_usr1 USR1",
        run_step,
        "step=$!",
        "# `wait` returns early when a trapped signal arrives: wait again until the step is gone.",
        'while :; do wait "$step"; status=$?; kill -0 "$step" 2>/dev/null || break; done',
        f"if [[ $preempted == 1 ]] && ! [[ {markers} ]]; then",
        '  echo "== requeueing job $SLURM_JOB_ID to resume from its checkpoint"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'exit "$status"',
    ]


def submit_script(*, stages: Sequence[tuple[str, str, Sequence[str]]], run_dir: Path,
                  sbatch: str = "sbatch") -> str:
    """`submit.sh`: sbatch each (stage, script file name beside submit.sh, upstream stages) in
    order, wiring afterok dependencies from the job ids it gets; cancels what it queued if one is
    rejected; puts the run's record (run.json beside it) and jobs.json in the run dir, so
    `python -m pipeline status/logs/cancel` work afterwards."""
    q = shlex.quote
    variables = {name: f"JOB_{index}" for index, (name, _, _) in enumerate(stages)}
    lines = ["#!/bin/bash", "# Queue the run's stages in order; written by pipeline/backends/slurm_script.py",
             "set -euo pipefail", 'HERE="$(cd "$(dirname "$0")" && pwd)"', f"RUN_DIR={q(str(run_dir))}",
             'mkdir -p "$RUN_DIR" && cp "$HERE/run.json" "$RUN_DIR/.run.json.$$" && mv -f "$RUN_DIR/.run.json.$$" "$RUN_DIR/run.json"',
             "submitted=()",
             'rollback() { [[ ${#submitted[@]} -gt 0 ]] && scancel "${submitted[@]}"; '
             'echo "submit.sh: a job was rejected; cancelled ${#submitted[@]} queued job(s)" >&2; }',
             "trap rollback ERR", ""]
    for name, script, upstream in stages:
        dependency = ""
        if upstream:
            dependency = " --dependency=afterok:" + ":".join(f"${variables[u]}" for u in upstream)
        var = variables[name]
        lines += [f'mkdir -p "$RUN_DIR"/{q(name)}',  # Slurm opens the stage's log there
                  f'{var}=$({q(sbatch)} --parsable{dependency} "$HERE"/{q(script)})',
                  f"{var}=${{{var}%%;*}}",  # --parsable prints `id[;cluster]`
                  f'submitted+=("${var}"); echo "{name}: job ${var}"']
    entries = ", ".join(f'"{name}": {{"job_id": "${variables[name]}", "script": "$HERE/{script}"}}'
                        for name, script, _ in stages)
    lines += ["", "trap - ERR", 'cat > "$RUN_DIR/jobs.json" <<EOF',
              f'{{"backend": "slurm", "stages": {{{entries}}}}}', "EOF"]
    return "\n".join(lines) + "\n"
