"""Slurm backend: the whole DAG queued at once with sbatch, ordered by afterok dependencies.

- `submit` writes one batch script per stage to `<run>/slurm/` and sbatches them in
  topological order; cached stages are not submitted and impose no dependency. If Slurm
  rejects a job, the ones queued before it are cancelled: nothing is left half submitted.
- `render` writes the same scripts plus `submit.sh` and `run.json` to a folder, for reading or
  submitting by hand; pure: each script carries its stage's spec and writes it when it starts,
  and `submit.sh` puts run.json and jobs.json into the run dir.
- `status` polls every job of the run in one `squeue` call (and one `sacct` call for jobs
  squeue no longer knows); markers decide succeeded/failed. A job pending with reason
  DependencyNeverSatisfied (an upstream failed or was cancelled) is reported blocked.
- `cancel` scancels every job of the run still queued or running, in one call.
Job ids live in `<run>/jobs.json`, so status/logs/cancel work from a new shell.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.files import write_atomic
from pipeline.backends.base import Backend, StageState, StageStatus
from pipeline.backends.slurm_script import batch_script, submit_script
from pipeline.backends.slurm_settings import SlurmSettings
from pipeline.errors import BackendError
from pipeline.graph import Stage
from pipeline.layout import RunLayout
from pipeline.plan import RunPlan
from pipeline.prepare import PreparedRun, run_record
from pipeline.run_record import RunRecord, write_record

SCRIPTS_DIR = "slurm"
PROJECT_DIR = Path(__file__).resolve().parents[2]

_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING"}
_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "PREEMPTED"}
_NEVER = ("DependencyNeverSatisfied",)


@dataclass(frozen=True)
class JobState:
    state: str  # Slurm's state name, e.g. PENDING, RUNNING, FAILED, CANCELLED
    reason: str
    started_at: float | None = None
    ended_at: float | None = None


def run_command(argv: list[str], what: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """Run a Slurm client; a missing command or a timeout becomes a one-line BackendError."""
    if shutil.which(argv[0]) is None:
        raise BackendError(f"{what}: '{argv[0]}' not found on PATH; run this on a Slurm login node "
                           "(or set slurm.sbatch to its full path)")
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BackendError(f"{what}: `{argv[0]}` did not answer in {timeout_s:.0f} s") from None


def slurm_error(process: subprocess.CompletedProcess) -> str:
    """Slurm's own reason, one line: the last `error:` line of its stderr."""
    lines = [line.strip() for line in (process.stderr or process.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines or [f"exit {process.returncode}"]
    return errors[-1]


def queue_states(job_ids: list[str]) -> dict[str, JobState]:
    """Slurm's view of these jobs in one squeue call, plus one sacct call for those squeue has
    forgotten (sacct may be disabled: then they are simply absent)."""
    if not job_ids:
        return {}
    found: dict[str, JobState] = {}
    listing = run_command(["squeue", "--states=all", f"--jobs={','.join(job_ids)}", "--noheader",
                           "--format=%i|%T|%r|%S|%e"], "squeue")
    if listing.returncode == 0:
        found.update(_parse_states(listing.stdout))
    elif "Invalid job id" not in listing.stderr:  # every id forgotten is no error; the rest is
        raise BackendError(f"squeue: {slurm_error(listing)}")
    missing = [job for job in job_ids if job not in found]
    if missing and shutil.which("sacct"):
        accounting = run_command(["sacct", f"--jobs={','.join(missing)}", "--parsable2", "--noheader",
                                  "--format=JobID,State,Reason,Start,End"], "sacct")
        if accounting.returncode == 0:
            found.update({k: v for k, v in _parse_states(accounting.stdout).items() if k in missing})
    return found


def _parse_states(text: str) -> dict[str, JobState]:
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or "." in parts[0]:  # job steps (123.batch) are not jobs
            continue
        # sacct writes "CANCELLED by 0"; squeue never adds anything after the state name.
        times = [_timestamp(part) for part in (parts[3:5] if len(parts) >= 5 else ("", ""))]
        states[parts[0]] = JobState(parts[1].split()[0] if parts[1] else "UNKNOWN", parts[2], *times)
    return states


def _timestamp(text: str) -> float | None:
    """Slurm's local-time `2026-11-23T23:49:01` as epoch seconds; None for N/A, Unknown, None."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


class SlurmBackend(Backend[SlurmSettings]):
    name = "slurm"
    Settings = SlurmSettings
    renderable = True

    def pulls_images(self) -> bool:
        return self.settings.container is not None

    def render(self, plan: RunPlan, layout: RunLayout, output_dir: Path) -> list[Path]:
        """`<stage>.sbatch` for every stage, `submit.sh` and `run.json`; submits nothing."""
        return write_rendered(plan, plan.names, self.settings, layout, output_dir, record=None)

    def apply(self, prepared: PreparedRun, lock_fd: int) -> str:
        layout = prepared.layout
        settings = self.settings
        run_command([settings.sbatch, "--version"], "submit")  # a missing sbatch fails before anything
        self._refuse_live_jobs(layout)
        folder = layout.run_dir / SCRIPTS_DIR
        write_rendered(prepared.plan, prepared.to_run, settings, layout, folder, prepared.record)
        stages: dict[str, Any] = {name: {"state": "cached"} for name in prepared.cached}
        job_ids: dict[str, str] = {}
        try:
            for name in prepared.to_run:
                upstream = [up for up in prepared.graph[name].dependencies if up in job_ids]
                argv = [settings.sbatch, "--parsable"]
                if upstream:
                    argv.append("--dependency=afterok:" + ":".join(job_ids[up] for up in upstream))
                script = folder / f"{name}.sbatch"
                process = run_command([*argv, str(script)], f"submit {name}")
                if process.returncode != 0:
                    undone = f"; cancelled the {len(job_ids)} job(s) queued before it" if job_ids else ""
                    raise BackendError(f"sbatch rejected stage {name}: {slurm_error(process)}{undone}")
                job_ids[name] = process.stdout.strip().split(";")[0]
                # Recorded as it goes, so even a killed submit leaves ids `cancel` can find.
                stages[name] = {"job_id": job_ids[name], "script": str(script)}
                layout.write_jobs({"backend": self.name, "submitted_at": time.time(), "stages": stages})
        except BaseException:  # rejected, or interrupted: nothing stays half submitted
            _scancel(list(job_ids.values()))
            layout.jobs_file.unlink(missing_ok=True)
            raise
        first, last = job_ids[prepared.to_run[0]], job_ids[prepared.to_run[-1]]
        return f"slurm jobs {first}..{last}; scripts in {folder}"

    def live_states(self, layout: RunLayout, record: RunRecord) -> dict[str, StageStatus]:
        jobs = layout.read_jobs().get("stages", {})
        live = queue_states([job["job_id"] for job in jobs.values() if job.get("job_id")])
        found: dict[str, StageStatus] = {}
        for name, info in record.stages.items():
            job = jobs.get(name, {})
            job_id = job.get("job_id", "")
            job_state = live.get(job_id)
            state, note = _job_state(job, job_state)
            started = job_state.started_at if job_state and state != StageState.QUEUED else None
            ended = job_state.ended_at if job_state and state.finished else None
            if started and ended and ended <= started:  # a pending job cancelled: it never ran
                started = ended = None
            found[name] = StageStatus(name, info.kind, state, note, job_id, started, ended)
        return found

    def cancel(self, layout: RunLayout, record: RunRecord) -> list[str]:
        """scancel every job of the run that Slurm still holds (blocked ones included)."""
        # A stage whose marker is written is done even while its job is still exiting.
        open_stages = [status for status in self.status(layout, record) if status.job_id
                       and status.state in (StageState.RUNNING, StageState.QUEUED,
                                            StageState.PENDING, StageState.BLOCKED)]
        live = queue_states([status.job_id for status in open_stages])
        stopped = [status.name for status in open_stages
                   if status.job_id in live and live[status.job_id].state in _RUNNING | _QUEUED]
        _scancel([status.job_id for status in open_stages if status.name in stopped])
        jobs = layout.read_jobs()
        for name in stopped:  # so status tells "cancelled by you" from "blocked by Slurm"
            jobs["stages"][name]["state"] = "cancelled"
        layout.write_jobs(jobs)
        return stopped

    def logs(self, layout: RunLayout, record: RunRecord, stage: str) -> str:
        path = layout.log_path(stage)
        if path.exists():
            return path.read_text(errors="replace")
        job = layout.read_jobs().get("stages", {}).get(stage, {}).get("job_id")
        return f"(no log yet at {path}{f'; slurm job {job} has not started' if job else ''})"

    def _refuse_live_jobs(self, layout: RunLayout) -> None:
        jobs = layout.read_jobs()
        if jobs.get("backend") != self.name:
            return
        ids = [job["job_id"] for job in jobs.get("stages", {}).values() if job.get("job_id")]
        live = [job for job, state in queue_states(ids).items() if state.state in _RUNNING | _QUEUED]
        if live:
            raise BackendError(f"run {layout.run_id} still has slurm jobs queued or running "
                               f"({', '.join(sorted(live, key=int))}); "
                               f"`python -m pipeline cancel {layout.run_id}` first")


def write_rendered(plan: RunPlan, names: list[str], settings: SlurmSettings, layout: RunLayout,
                   folder: Path, record: RunRecord | None) -> list[Path]:
    """The batch script of each named stage (carrying its spec), `submit.sh` that queues them in
    order and `run.json` (`record`, or one without timestamps: rendering is deterministic)."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    scripts = []
    for name in names:
        path = folder / f"{name}.sbatch"
        write_atomic(path, stage_script(plan.graph[name], layout, settings, plan.image_refs[plan.graph[name].image],
                                        plan.specs[name].to_json()))
        scripts.append(path)
    order = [(name, f"{name}.sbatch", [up for up in plan.graph[name].dependencies if up in names])
             for name in names]
    submit = folder / "submit.sh"
    write_atomic(submit, submit_script(stages=order, run_dir=layout.run_dir, sbatch=settings.sbatch))
    submit.chmod(0o755)
    run_json = folder / "run.json"
    write_record(run_json, record or run_record(plan, "slurm", settings.model_dump(mode="json"), created_at=None))
    return [*scripts, submit, run_json]


def stage_script(stage: Stage, layout: RunLayout, settings: SlurmSettings, image_ref: str, spec_json: str) -> str:
    placement = settings.placement(stage.kind)
    resources = stage.resources
    container = settings.container
    return batch_script(
        job_name=f"{layout.run_id}-{stage.name}",
        log_path=layout.log_path(stage.name),
        stage_dir=layout.stage_dir(stage.name),
        kind=stage.kind,
        spec_path=layout.spec_path(stage.name),
        partition=placement.partition,
        account=placement.account,
        qos=placement.qos,
        time_limit_min=resources.time_limit_min,
        nodes=resources.nodes,
        gpus_per_node=resources.gpus_per_node,
        cpus_per_task=resources.cpus,
        memory_gb=resources.memory_gb,
        exclusive=bool(placement.exclusive),
        extra_sbatch=placement.extra_sbatch,
        container_image=image_ref if container else None,
        container_mounts=container.mounts if container else (),
        container_workdir=container.workdir if container else None,
        python=settings.python,
        venv=settings.venv,
        workdir=settings.workdir or (None if container else str(PROJECT_DIR)),
        env=settings.env,
        requeue=settings.requeue,
        signal_before_s=settings.signal_before_s,
        spec_json=spec_json,
    )


def _job_state(job: dict[str, Any], live: JobState | None) -> tuple[StageState, str]:
    """A stage's state from Slurm's record of its job (its marker, if any, is read by the base)."""
    if job.get("state") == "cached":
        return StageState.CACHED, ""
    if not job.get("job_id"):
        return StageState.PENDING, "not submitted"
    if live is None:
        return StageState.INTERRUPTED, "Slurm no longer knows the job and it left no marker"
    if live.state == "CANCELLED" and job.get("state") == "cancelled":
        return StageState.CANCELLED, "cancelled by `python -m pipeline cancel`"
    if live.reason.startswith(_NEVER) or (live.state == "CANCELLED" and live.reason.startswith("Dependency")):
        return StageState.BLOCKED, "an upstream stage did not succeed"
    if live.state == "PENDING":
        if live.reason == "Dependency":
            return StageState.PENDING, "waits for upstream stages"
        return StageState.QUEUED, live.reason
    if live.state in _QUEUED:
        return StageState.QUEUED, live.state.lower()
    if live.state in _RUNNING:
        return StageState.RUNNING, ""
    if live.state == "CANCELLED":
        return StageState.CANCELLED, "cancelled in Slurm"
    # COMPLETED/FAILED/TIMEOUT/OUT_OF_MEMORY/NODE_FAIL... without a marker of this fingerprint.
    return StageState.FAILED, f"ended {live.state} without a marker; see its stage.log"


def _scancel(job_ids: list[str]) -> list[str]:
    if job_ids:
        process = run_command(["scancel", *job_ids], "scancel")
        if process.returncode != 0:
            raise BackendError(f"scancel {' '.join(job_ids)}: {slurm_error(process)}")
    return job_ids
