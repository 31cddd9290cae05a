"""The files of a NeMo-Run run, as text: one shell script per stage and `experiment.py`, the
run.Experiment that runs them. Pure: no NeMo-Run import, no network, the same bytes for the
same plan. `submit` runs the very file `render` writes.

Each stage's script (`<stage>.sh`, a run.Script's inline body) puts the stage's spec in place
(it carries the spec), passes the upstream gate (stage_gate.py: waits for every upstream's
`_SUCCESS` of its fingerprint; on an upstream's `_FAILED` it stops with UPSTREAM_FAILED_EXIT)
and runs the contract's launch command with its output in stage.log. On Slurm the executor's
own `dependencies` order the jobs and the gate only places the spec; the local executor has no
dependencies (it would even run a dependent after its upstream failed), so there the gate orders
the DAG.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from contract.launch import Rendezvous, StageLaunch
from pipeline.backends.nemo_settings import NemoRunSettings
from pipeline.backends.slurm_script import RDZV_PORT_BASE, SPEC_HEREDOC
from pipeline.backends.stage_gate import ATTEMPT_ENV, Upstream, gate_script, run_script
from pipeline.errors import ConfigError
from pipeline.graph import Stage
from pipeline.layout import RunLayout
from pipeline.plan import RunPlan

PROJECT_DIR = Path(__file__).resolve().parents[2]
EXPERIMENT_FILE = "experiment.py"
# NeMo-Run's Slurm executor rewrites every "/nemo_run" in a bare-metal job's scripts (its
# in-container run dir); a path holding it would be changed behind our back.
NEMO_RUNDIR = "/nemo_run"
# Unset on every executor but read by the scripts: a multi-node stage's node index on Slurm.
NODE_INDEX = {"local": "FASTER_QAT_NODE_INDEX", "slurm": "SLURM_NODEID"}
UNIQUE = {"local": "$$", "slurm": "$SLURM_JOB_ID-${SLURM_NODEID:-0}"}


def stage_script(plan: RunPlan, stage: Stage, layout: RunLayout, settings: NemoRunSettings) -> str:
    """The body of the stage's run.Script (bash; NeMo-Run adds the shebang)."""
    executor = settings.executor
    spec_json = plan.specs[stage.name].to_json()
    fingerprint = plan.fingerprints[stage.name]
    resources = stage.resources
    if executor == "local" and resources.nodes > 1:
        raise ConfigError(f"nemo_run: stage {stage.name} asks for {resources.nodes} nodes "
                          f"(resources.{stage.kind}.nodes); the local executor runs one")
    # Slurm orders the jobs itself: its gate has no upstream to wait for, only the spec to place.
    upstreams = [] if settings.has_dependencies else [
        Upstream(up, str(layout.stage_dir(up)), plan.fingerprints[up]) for up in stage.dependencies]
    write_spec = f"cat > \"$TMP_SPEC\" <<'{SPEC_HEREDOC}'\n{spec_json.rstrip()}\n{SPEC_HEREDOC}"
    python = settings.python
    launch = StageLaunch(stage.kind, str(layout.spec_path(stage.name)), nodes=resources.nodes,
                         processes_per_node=resources.processes_per_node, python=python)
    command = launch.shell(Rendezvous(endpoint="$MASTER_ADDR:$MASTER_PORT", run_id="$SLURM_JOB_ID"))
    q = shlex.quote
    lines = [f"# stage {stage.name} ({stage.kind}) of run {layout.run_id}, on NeMo-Run's {executor} executor;",
             "# written by pipeline/backends/nemo_render.py",
             "export PYTHONUNBUFFERED=1",
             *(f"export {name}={q(value)}" for name, value in sorted(settings.env.items()))]
    if settings.venv:
        lines.append(f"source {q(str(Path(settings.venv) / 'bin' / 'activate'))}")
    lines.append(f"cd {q(settings.workdir or str(PROJECT_DIR))}")
    if executor == "slurm" and resources.nodes > 1:
        lines += ['export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
                  f"export MASTER_PORT=$(( {RDZV_PORT_BASE} + SLURM_JOB_ID % 20000 ))"]
    lines += ["", "# 1. the spec, and the upstream gate", "(",
              gate_script(stage.name, str(layout.stage_dir(stage.name)), fingerprint, upstreams,
                          settings.poll_seconds, write_spec, UNIQUE[executor], NODE_INDEX[executor], q(python)).rstrip(),
              ") || exit $?", "", "# 2. the stage",
              run_script(str(layout.stage_dir(stage.name)), command, NODE_INDEX[executor], q(python)).rstrip()]
    text = "\n".join(lines) + "\n"
    if executor == "slurm" and NEMO_RUNDIR in text:
        raise ConfigError(f"nemo_run: a path of stage {stage.name} holds '{NEMO_RUNDIR}', which NeMo-Run's "
                          "Slurm executor rewrites in scripts; move the artifact root, workdir or python")
    return text


def _slurm_time(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def _executor_call(stage: Stage, settings: NemoRunSettings) -> str:
    if settings.executor == "local":
        return "local()"
    res = stage.resources
    return (f"slurm(nodes={res.nodes}, gpus_per_node={res.gpus_per_node}, cpus={res.cpus}, "
            f"memory={int(res.memory_gb * 1024)!r}, time_limit={_slurm_time(res.time_limit_min)!r})")


def _slurm_executor_def(settings: NemoRunSettings) -> str:
    slurm = settings.slurm
    assert slurm is not None
    return f'''

def slurm(*, nodes: int, gpus_per_node: int, cpus: int, memory: int, time_limit: str) -> run.SlurmExecutor:
    """One stage's sbatch job (memory in MiB). The stages run from the shared filesystem, so
    nothing is packaged; sbatch runs here, through a LocalTunnel (this is the login node)."""
    return run.SlurmExecutor(
        account={slurm.account!r},
        partition={slurm.partition!r},
        qos={slurm.qos!r},
        exclusive={slurm.exclusive or None!r},
        additional_parameters={dict(sorted(slurm.additional_parameters.items())) or None!r},
        nodes=nodes,
        ntasks_per_node=1,
        gpus_per_node=gpus_per_node or None,
        cpus_per_task=cpus,
        mem=f"{{memory}}M",
        time=time_limit,
        job_name_prefix=f"{{RUN_ID}}.",
        tunnel=run.LocalTunnel(job_dir=""),
        packager=run.Packager(),
        poll_estimated_start_time=False,
    )
'''


_LOCAL_EXECUTOR_DEF = '''

def local() -> run.LocalExecutor:
    """A process on this machine; it waits at its gate until its upstreams succeed."""
    return run.LocalExecutor()
'''


def experiment_script(plan: RunPlan, names: list[str], layout: RunLayout, settings: NemoRunSettings) -> str:
    """`experiment.py`: the run as one run.Experiment named after it, a task per stage in `names`."""
    executor = settings.executor
    slurm = executor == "slurm"
    adds = []
    for name in names:
        stage = plan.graph[name]
        dependencies = [up for up in stage.dependencies if up in names] if settings.has_dependencies else []
        after = f", dependencies={dependencies!r}" if dependencies else ""
        adds.append(f"    exp.add(stage({name!r}, attempt), executor={_executor_call(stage, settings)}, "
                    f"name={name!r}{after})")
    ordering = ("Slurm orders them (sbatch --dependency=afterok), as NeMo-Run's SlurmExecutor does"
                if slurm else "all start at once and each waits at its gate for its upstreams' _SUCCESS "
                "(NeMo-Run's LocalExecutor has no dependencies); keep this process running")
    default_executor = "slurm(nodes=1, gpus_per_node=0, cpus=1, memory=1024, time_limit='00:10:00')" if slurm \
        else "local()"
    executor_def = _slurm_executor_def(settings) if slurm else _LOCAL_EXECUTOR_DEF
    stop_on_signal = "" if slurm else '''
        # The local tasks live as long as this process: SIGTERM (`python -m pipeline cancel`)
        # cancels them through NeMo-Run first.
        def cancel_all(signum: int, frame: object) -> None:
            for job in exp.jobs:
                exp.cancel(job.id)
            os._exit(128 + signum)

        signal.signal(signal.SIGTERM, cancel_all)
        signal.signal(signal.SIGINT, cancel_all)'''
    return f'''#!/usr/bin/env python3
"""Run {layout.run_id!r} as one NeMo-Run experiment: {len(names)} stage(s), each a run.Script of <stage>.sh.

Executor: {executor}. The tasks {ordering}.
Written by pipeline/backends/nemo_render.py (`python -m pipeline render --cluster nemo-run`);
`python -m pipeline submit --cluster nemo-run` runs this same file. By hand, where the artifact
root is reachable:  python experiment.py   then   python -m pipeline status {layout.run_id} --root {layout.root}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import time
from pathlib import Path

import nemo_run as run
from nemo_run.config import get_nemorun_home

HERE = Path(__file__).resolve().parent
RUN_ID = {layout.run_id!r}
RUN_DIR = Path({str(layout.run_dir)!r})
EXECUTOR = {executor!r}
ATTEMPT_ENV = {ATTEMPT_ENV!r}  # which submission a stage's _FAILED belongs to (see stage_gate.py)
{executor_def}

def stage(name: str, attempt: str) -> run.Script:
    return run.Script(inline=(HERE / f"{{name}}.sh").read_text(), env={{ATTEMPT_ENV: attempt}})


def add_stages(exp: run.Experiment, attempt: str) -> None:
{chr(10).join(adds)}


def record(exp_id: str, attempt: str, launched: bool) -> None:
    """jobs.json in the run dir: where `python -m pipeline status/logs/cancel` find this experiment."""
    jobs = {{"backend": "nemo-run", "executor": EXECUTOR, "experiment_id": exp_id,
            "experiment_dir": os.path.join(get_nemorun_home(), "experiments", RUN_ID, exp_id),
            "driver_pid": os.getpid(), "attempt": attempt, "launched": launched, "submitted_at": time.time(),
            "stages": {{name: {{"task": name}} for name in {names!r}}}}}
    temporary = RUN_DIR / f".jobs.json.{{os.getpid()}}"
    temporary.write_text(json.dumps(jobs, indent=2) + "\\n")
    os.replace(temporary, RUN_DIR / "jobs.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--id", help="experiment id, RUN_ID_<suffix> (default: RUN_ID_<time in ns>)")
    parser.add_argument("--attempt", help="this submission's token (default: the id's suffix)")
    args = parser.parse_args()
    exp_id = args.id or f"{{RUN_ID}}_{{time.time_ns()}}"
    attempt = args.attempt or exp_id.rpartition("_")[2]
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    if (HERE / "run.json").is_file():  # rendered beside its run.json: publish the run's record
        shutil.copyfile(HERE / "run.json", RUN_DIR / ".run.json.tmp")
        os.replace(RUN_DIR / ".run.json.tmp", RUN_DIR / "run.json")
    with run.Experiment(RUN_ID, id=exp_id, executor={default_executor}, clean_mode=True,
                        enable_goodbye_message=False, skip_status_at_exit=True) as exp:
        add_stages(exp, attempt)
        record(exp_id, attempt, launched=False){stop_on_signal}
        try:
            exp.run(detach={slurm!r})
        except BaseException:  # nothing stays half submitted: cancel what was launched
            for job in exp.jobs:
                if job.launched:
                    exp.cancel(job.id)
            raise
        record(exp_id, attempt, launched=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
'''


def rendered_files(plan: RunPlan, names: list[str], layout: RunLayout,
                   settings: NemoRunSettings) -> dict[str, str]:
    """File name -> text: `<stage>.sh` for each of `names`, then `experiment.py`."""
    files = {f"{name}.sh": stage_script(plan, plan.graph[name], layout, settings) for name in names}
    files[EXPERIMENT_FILE] = experiment_script(plan, names, layout, settings)
    return files

