"""The batch script text: what a user reads in `<stage>.sbatch` (no cluster needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from contract.launch import StageLaunch
from pipeline.backends.slurm_script import batch_script, enroot_image_ref, submit_script

ROOT = Path("/lustre/runs")


def script(**options: object) -> str:
    stage_dir = ROOT / "study" / "train-fp8"
    return batch_script(job_name="study-train-fp8", log_path=stage_dir / "stage.log", stage_dir=stage_dir,
                        kind="train", spec_path=stage_dir / "spec.json", **options)


def directives(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_resources_and_placement_become_sbatch_directives():
    text = script(partition="batch", account="llm", qos="high", time_limit_min=720, nodes=1,
                  gpus_per_node=8, cpus_per_task=64, memory_gb=1024, exclusive=True,
                  extra_sbatch=["--constraint=b200"])
    assert directives(text) == [
        "--job-name=study-train-fp8",
        "--output=/lustre/runs/study/train-fp8/stage.log",
        "--open-mode=append",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=64",
        "--mem=1048576M",
        "--time=720",
        "--partition=batch",
        "--account=llm",
        "--qos=high",
        "--gpus-per-node=8",
        "--exclusive",
        "--requeue",
        "--signal=B:USR1@120",
        "--constraint=b200",
    ]
    assert "export NCCL_DEBUG=WARN" in text and "export NCCL_NVLS_ENABLE=0" in text


def test_a_misspelt_option_fails_at_the_call():
    with pytest.raises(TypeError, match="unexpected keyword argument 'gpus'"):
        script(gpus=8)


def test_single_process_stage_runs_the_stage_module_under_srun():
    text = script(python="/opt/venv/bin/python", workdir="/lustre/faster-qat")
    assert ("srun --ntasks-per-node=1 --kill-on-bad-exit=1 /opt/venv/bin/python -m stages.train "
            "--spec /lustre/runs/study/train-fp8/spec.json &") in text
    assert "cd /lustre/faster-qat" in text
    assert "torch.distributed.run" not in text


def test_multi_node_stage_runs_torchrun_with_c10d_rendezvous_on_the_first_node():
    text = script(nodes=2, gpus_per_node=8, signal_before_s=180)
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in text
    assert ('python -m torch.distributed.run --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d '
            '"--rdzv-id=$SLURM_JOB_ID" "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT" '
            '--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=160 '
            '-m stages.train --spec /lustre/runs/study/train-fp8/spec.json') in text
    assert "--signal=B:USR1@180" in directives(text)


def test_container_mode_runs_the_pinned_image_with_the_artifact_root_mounted():
    ref = "ghcr.io/acme/faster-qat-train@sha256:" + "a" * 64
    text = script(container_image=ref, container_mounts=["/lustre/hf:/root/.cache/huggingface"],
                  container_workdir="/workspace/faster-qat", venv="/ignored/venv")
    # '#' starts a comment in bash, so the enroot-style reference is quoted.
    assert (f"'--container-image=ghcr.io#acme/faster-qat-train@sha256:{'a' * 64}' "
            "--container-mounts=/lustre/runs:/lustre/runs,/lustre/hf:/root/.cache/huggingface "
            "--container-workdir=/workspace/faster-qat python -m stages.train") in text
    assert "activate" not in text  # the image brings its own Python


def test_bare_metal_mode_activates_the_venv():
    text = script(venv="/opt/venvs/fq")
    assert "source /opt/venvs/fq/bin/activate" in text
    assert "--container-image" not in text


@pytest.mark.parametrize(("ref", "enroot"), [
    ("nvcr.io/nvidia/pytorch:25.01-py3", "nvcr.io#nvidia/pytorch:25.01-py3"),
    ("localhost:5000/fq@sha256:ab", "localhost:5000#fq@sha256:ab"),
    ("ubuntu:24.04", "ubuntu:24.04"),
    ("library/ubuntu@sha256:ab", "library/ubuntu@sha256:ab"),
    ("/lustre/images/fq.sqsh", "/lustre/images/fq.sqsh"),
])
def test_image_references_are_spelt_as_enroot_expects(ref, enroot):
    assert enroot_image_ref(ref) == enroot


def test_without_requeue_there_is_no_trap():
    text = script(requeue=False)
    assert "--no-requeue" in directives(text)
    assert "trap" not in text and "scontrol requeue" not in text


def test_scripts_are_valid_bash(tmp_path):
    for name, text in {"single": script(), "multi": script(nodes=4, gpus_per_node=8),
                       "container": script(container_image="img@sha256:00")}.items():
        path = tmp_path / f"{name}.sbatch"
        path.write_text(text)
        checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, (name, checked.stderr)
    submit = submit_script(stages=[("a", "a.sbatch", []), ("b", "b.sbatch", ["a"])], run_dir=Path("/x/run"))
    assert 'JOB_1=$(sbatch --parsable --dependency=afterok:$JOB_0 "$HERE"/b.sbatch)' in submit
    (tmp_path / "submit.sh").write_text(submit)
    assert subprocess.run(["bash", "-n", str(tmp_path / "submit.sh")]).returncode == 0


def test_stage_command_is_the_plain_module_for_one_process():
    assert StageLaunch("probe", "/r/s/spec.json").shell() == "python -m stages.probe --spec /r/s/spec.json"


def test_squeue_and_sacct_lines_parse_to_job_states():
    from pipeline.backends.slurm import _parse_states

    text = ("12|PENDING|DependencyNeverSatisfied|N/A|N/A\n"
            "13|CANCELLED by 0|None|2026-11-23T23:49:01|2026-11-23T23:49:31\n"
            "13.batch|CANCELLED|None|2026-11-23T23:49:01|2026-11-23T23:49:31\n")
    states = _parse_states(text)
    assert sorted(states) == ["12", "13"]
    assert (states["12"].state, states["12"].reason, states["12"].started_at) == (
        "PENDING", "DependencyNeverSatisfied", None)
    assert states["13"].state == "CANCELLED"
    assert states["13"].ended_at - states["13"].started_at == 30


def test_render_is_pure_and_deterministic_without_mlflow(tmp_path):
    """No MLFLOW_TRACKING_URI, no server, no sbatch: render exits 0, writes -o DIR only (no runs/,
    no mlflow.db), the same bytes twice, and each script carries its spec with the recipe by value."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    repo = Path(__file__).resolve().parents[3]
    rendered = []
    for attempt in ("first", "second"):
        result = subprocess.run([sys.executable, "-m", "pipeline", "render", "--cluster", "slurm", "-c", "smoke",
                                 "--root", str(tmp_path / "runs"), "-o", str(tmp_path / attempt)],
                                capture_output=True, text=True, cwd=repo, timeout=120, env=env, check=False)
        assert result.returncode == 0, result.stderr
        rendered.append({p.name: p.read_bytes() for p in sorted((tmp_path / attempt).iterdir())})
    assert rendered[0] == rendered[1]
    assert {"submit.sh", "run.json", "train-bf16.sbatch", "report.sbatch"} <= set(rendered[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "second"]
    assert b'"fast_accumulation"' in rendered[0]["train-fp8.sbatch"]  # the recipe itself, not its name
