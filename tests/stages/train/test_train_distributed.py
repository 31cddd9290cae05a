"""Two processes (torchrun, gloo, FSDP2 on CPU) follow the one-process loss curve.

Tolerance: relative 1e-5 on losses, absolute 1e-5 on weights. Both runs are fp32 and see the
same global batches (batches.py), and the loss is normalised by the global label-token count,
so they compute the same mathematical step; they differ only in float summation order (two
partial gradients summed by a reduce-scatter instead of one accumulation), ~1e-7 relative,
which AdamW's normalised update carries into the weights at about that size.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_testlib import REPO, losses, metric_rows

from contract.markers import SUCCESS_MARKER, read_marker
from stages.runtime import run_stage
from stages.train.core import run


def torchrun(spec: Path, nproc: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "stages.train", "--spec", str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_one(make_spec) -> None:
    single = make_spec("single", steps=4)
    assert run_stage(single, run) == 0

    double = make_spec("double", steps=4, checkpoint_every=2)
    result = torchrun(double, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    out = double.parent
    assert read_marker(out).state == "succeeded"
    assert losses(out) == pytest.approx(losses(single.parent), rel=1e-5)
    assert metric_rows(out)[-1]["val_loss"] == pytest.approx(metric_rows(single.parent)[-1]["val_loss"], rel=1e-5)
    summary_world = [r for r in (out / "manifest.json").read_text().splitlines() if "world_size" in r]
    assert summary_world == ['    "world_size": 2']

    # The full state dict was gathered from the shards on rank 0 into a plain HF checkpoint.
    one, two = _weights(single.parent / "model"), _weights(out / "model")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5

    # DCP checkpoints are resharded on load: the 2-process step-2 checkpoint resumes on 1 process.
    for name in (SUCCESS_MARKER, "manifest.json"):
        (out / name).unlink()

    shutil.rmtree(out / "checkpoints" / "step-4")
    assert run_stage(double, run) == 0
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3, 4]
    assert losses(out) == pytest.approx(losses(single.parent), rel=1e-5)


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_both_ranks_at_the_same_step(make_spec) -> None:
    """Slurm preemption of a multi-process run: every rank finishes its step, one checkpoint is
    written collectively, no marker, and the stage exits non-zero so it is requeued."""
    import time

    spec = make_spec("preempted", steps=400, val_batches=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "stages.train", "--spec", str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = spec.parent / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output[-3000:]
    out = spec.parent
    assert read_marker(out) is None
    (checkpoint,) = (out / "checkpoints").iterdir()
    done = [r["step"] for r in metric_rows(out)]
    assert checkpoint.name == f"step-{done[-1]}" and 2 <= done[-1] < 400
    assert sorted(p.name for p in checkpoint.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]


@pytest.mark.slow
def test_fp32_master_weights_with_bf16_compute_agree_across_world_sizes(make_spec) -> None:
    """FSDP2 mixed precision runs on one process too, so 1 and 2 processes compute alike.
    Tolerance 1e-4: bf16 matmuls round partial sums differently when the batch is split."""
    single = make_spec("mixed-single", steps=3, compute_dtype="bfloat16")
    assert run_stage(single, run) == 0
    double = make_spec("mixed-double", steps=3, compute_dtype="bfloat16")
    result = torchrun(double, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(double.parent) == pytest.approx(losses(single.parent), rel=1e-4)
    fp32 = make_spec("fp32", steps=3)
    assert run_stage(fp32, run) == 0
    assert losses(single.parent) != losses(fp32.parent)  # bf16 compute really ran
    assert losses(single.parent) == pytest.approx(losses(fp32.parent), rel=1e-3)
    # The checkpoint holds the float32 master weights.
    assert {v.dtype for v in _weights(single.parent / "model").values()} == {torch.float32}
