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

import shlex
from collections.abc import Sequence
from pathlib import Path

from stages.contract import FAILED_MARKER, SUCCESS_MARKER

NCCL_ENV = {"NCCL_DEBUG": "WARN", "NCCL_NVLS_ENABLE": "0"}  # NVLink multicast stays off
RDZV_PORT_BASE = 20000
# torchrun forwards these to its workers (SIGUSR1 = checkpoint, then stop).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def stage_command(
    *, kind: str, spec_path: Path, python: str = "python", nodes: int = 1, processes_per_node: int = 1,
    shutdown_timeout_s: int = 100,
) -> str:
    """The command every backend runs for a stage, with torchrun for multi-process stages."""
    module = ["-m", f"stages.{kind}", "--spec", str(spec_path)]
    if nodes == 1 and processes_per_node == 1:
        return shlex.join([python, *module])
    launcher = [
        python, "-m", "torch.distributed.run",
        f"--nnodes={nodes}", f"--nproc-per-node={processes_per_node}",
        "--rdzv-backend=c10d", "--rdzv-id=$SLURM_JOB_ID", "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT",
        f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={shutdown_timeout_s}",
    ]
    # $SLURM_JOB_ID/$MASTER_* stay unquoted for the shell of the batch script to expand.
    return " ".join(_quote_keeping_vars(part) for part in [*launcher, *module])


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
) -> str:
    """One stage's batch script. Container mode when `container_image` is set, else bare metal."""
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
    command = stage_command(kind=kind, spec_path=spec_path, python=python, nodes=nodes,
                            processes_per_node=max(1, gpus_per_node),
                            shutdown_timeout_s=max(10, signal_before_s - 20))
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


def submit_script(*, stages: Sequence[tuple[str, Path, Sequence[str]]], jobs_file: Path,
                  sbatch: str = "sbatch") -> str:
    """`submit.sh`: sbatch each (stage, script, upstream stages) in order, wiring afterok
    dependencies from the job ids it gets; cancels what it queued if one is rejected; writes
    the run's jobs.json so `python -m pipeline status/logs/cancel` work afterwards."""
    variables = {name: f"JOB_{index}" for index, (name, _, _) in enumerate(stages)}
    lines = ["#!/bin/bash", "# Queue the run's stages in order; written by pipeline/backends/slurm_script.py",
             "set -euo pipefail", "submitted=()",
             'rollback() { [[ ${#submitted[@]} -gt 0 ]] && scancel "${submitted[@]}"; '
             'echo "submit.sh: a job was rejected; cancelled ${#submitted[@]} queued job(s)" >&2; }',
             "trap rollback ERR", ""]
    for name, script, upstream in stages:
        dependency = ""
        if upstream:
            dependency = " --dependency=afterok:" + ":".join(f"${variables[u]}" for u in upstream)
        var = variables[name]
        lines += [f"{var}=$({shlex.quote(sbatch)} --parsable{dependency} {shlex.quote(str(script))})",
                  f"{var}=${{{var}%%;*}}",  # --parsable prints `id[;cluster]`
                  f'submitted+=("${var}"); echo "{name}: job ${var}"']
    entries = ", ".join(f'"{name}": {{"job_id": "${variables[name]}", "script": "{script}"}}'
                        for name, script, _ in stages)
    lines += ["", "trap - ERR", f"cat > {shlex.quote(str(jobs_file))} <<EOF",
              f'{{"backend": "slurm", "stages": {{{entries}}}}}', "EOF"]
    return "\n".join(lines) + "\n"


def _quote_keeping_vars(part: str) -> str:
    return f'"{part}"' if "$" in part else shlex.quote(part)
