"""The train stage end to end on CPU, one process: outputs, resume after a signal, QAD, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_testlib import TINY_MODEL, losses, metric_rows, preempt_after

from contract.markers import read_marker
from contract.tracking import read_events
from stages.batches import TokenSplit
from stages.losses import cross_entropy_sum
from stages.runtime import run_stage
from stages.train.core import run


def _val_loss_of(model_dir: Path, data_dir: Path, rows: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = TokenSplit(data_dir, "val").rows(list(range(rows)))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    return (cross_entropy_sum(logits, batch.labels) / batch.label_tokens).item()


def test_sft_trains_and_writes_a_plain_hf_checkpoint(make_spec, data_dir: Path, monkeypatch) -> None:
    for placer in ("PIPELINE_PLACEMENTS", "SLURM_JOB_ID", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(placer, raising=False)
    spec = make_spec("sft", val_every=3)
    assert run_stage(spec, run) == 0
    out = spec.parent
    assert read_marker(out).state == "succeeded"

    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["loss"] == pytest.approx(7.99, abs=0.05)  # ln(vocab 2944) = 7.99: an untrained model
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert [r["lr"] for r in rows[:2]] == pytest.approx([3e-3, 3e-3])  # warmup 1 step, then cosine
    assert rows[-1]["lr"] < rows[1]["lr"]
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert "mfu" not in rows[0]  # no peak FLOPs known for a CPU

    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["train_loss"] == rows[-1]["loss"]
    assert summary["val_loss"] == rows[-1]["val_loss"]
    assert (summary["backend"], summary["recipe"], summary["world_size"], summary["steps"]) == ("emulated", "bf16", 1, 6)
    assert summary["mean_step_time_s"] == pytest.approx(sum(r["step_time_s"] for r in rows[2:]) / 4)
    # Each step's wall-clock end, and what the stage knows of who shared its CPU: started by
    # hand (no local driver, Slurm or Kubernetes), it claims nothing.
    ends = [r["ended_at"] for r in rows]
    assert ends == sorted(ends) and ends[-1] - ends[0] >= sum(r["step_time_s"] for r in rows[1:])
    sharing = summary["device_sharing"]
    assert (sharing["source"], sharing["exclusive"], sharing["device"]) == ("none", None, "cpu")
    assert sharing["window"] == pytest.approx([ends[0] - rows[0]["step_time_s"], ends[-1]])
    assert summary["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]

    # The saved checkpoint is the trained model: reloading it reproduces the final val loss
    # (val_batches=2 micro-batches of 2 rows = the first 4 val rows).
    model_dir = out / "model"
    assert _val_loss_of(model_dir, data_dir, rows=4) == pytest.approx(summary["val_loss"], rel=1e-5)
    assert _val_loss_of(TINY_MODEL, data_dir, rows=4) > summary["val_loss"] + 0.3
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert (model_dir / "tokenizer.json").exists()
    precision = json.loads((model_dir / "precision.json").read_text())
    assert (precision["backend"], precision["recipe"]["name"], precision["method"]) == ("emulated", "bf16", "sft")
    assert precision["files"]["quantizer_state"] is None  # bf16: nothing but HF weights

    logged = [e for e in read_events(out) if e["type"] == "metrics" and e["step"] == 6]
    assert logged[0]["metrics"]["loss"] == rows[-1]["loss"]
    tags = {k: v for e in read_events(out) if e["type"] == "tags" for k, v in e["tags"].items()}
    assert (tags["backend"], tags["recipe"], tags["method"], tags["world_size"]) == ("emulated", "bf16", "sft", "1")


# fp8_delayed: the resumed run must scale from the amax history the checkpoint kept.
@pytest.mark.parametrize("recipe", ["bf16", "fp8_delayed"])
def test_signal_checkpoints_and_the_resumed_run_continues_the_same_curve(make_spec, monkeypatch, recipe: str) -> None:
    reference = make_spec("straight", recipe=recipe)
    assert run_stage(reference, run) == 0

    # Slurm's preemption signal after step 3, delivered twice as Slurm delivers it (to the stage
    # and through its wrapper shell): one request.
    stop_preempting = preempt_after(monkeypatch, "preempted", after_step=3, deliveries=2)
    spec = make_spec("preempted", checkpoint_every=2, keep_checkpoints=2, recipe=recipe)
    assert run_stage(spec, run) == 143  # interrupted: no marker, resumable
    out = spec.parent
    assert read_marker(out) is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3]

    stop_preempting()
    assert run_stage(spec, run) == 0
    # fp32 on CPU with deterministic kernels: the resumed curve is the uninterrupted one, exactly.
    assert losses(out) == losses(reference.parent)
    assert metric_rows(out)[-1]["val_loss"] == metric_rows(reference.parent)[-1]["val_loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]  # keep 2
    # A second start of a finished stage does nothing (the runtime's marker check).
    assert run_stage(spec, run) == 0


def test_qad_with_the_student_as_its_own_teacher_has_zero_kl(make_spec) -> None:
    spec = make_spec("qad-self", method="qad", steps=1, qad={"kd_weight": 1.0, "temperature": 2.0})
    assert run_stage(spec, run) == 0
    (row,) = metric_rows(spec.parent)
    # Same weights, same precision: KL is 0 and so is the gradient (up to float noise; a plain
    # SFT step's gradient norm here is ~1.7). ce_loss is still reported for comparison.
    assert row["kd_loss"] == pytest.approx(0.0, abs=1e-7)
    assert row["loss"] == row["kd_loss"]
    assert row["grad_norm"] < 1e-6
    assert row["ce_loss"] == pytest.approx(7.99, abs=0.05)


def test_qad_mixes_kl_and_cross_entropy_with_a_different_teacher(make_spec) -> None:
    teacher = make_spec("teacher", steps=4)
    assert run_stage(teacher, run) == 0
    spec = make_spec("qad", inputs={"teacher": teacher.parent}, method="qad", steps=4, qad={"kd_weight": 0.5})
    assert run_stage(spec, run) == 0
    rows = metric_rows(spec.parent)
    for row in rows:
        assert row["loss"] == pytest.approx(0.5 * row["kd_loss"] + 0.5 * row["ce_loss"], rel=1e-9)
    assert rows[0]["kd_loss"] > 5e-3  # 4 SFT steps apart
    assert rows[-1]["kd_loss"] < rows[0]["kd_loss"]  # the student moves towards the teacher


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"global_batch": 6, "micro_batch": 4}, "train: params: global_batch (6) must be a multiple of micro_batch (4)"),
        ({"recipe": "fp3"}, "train: params.recipe: recipe fp3: no such built-in recipe"),
        ({"betas": [0.9]}, "train: params.betas.1: required field is missing"),
        ({"device": "cuda"}, "train: params.device: cuda requested but no CUDA device"),
        ({"model": "/nonexistent/model"}, "train: params.model: /nonexistent/model is not a Hugging Face model dir (no config.json)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(make_spec, capsys, params: dict, message: str) -> None:
    if params.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    spec = make_spec("train", **params)
    assert run_stage(spec, run) == 2
    marker = read_marker(spec.parent)
    assert marker.state == "failed" and marker.error.startswith(message), marker.error
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")


def test_activation_checkpointing_recomputes_the_same_step(make_spec) -> None:
    plain, recomputed = make_spec("plain", steps=2), make_spec("recomputed", steps=2, activation_checkpointing=True)
    assert run_stage(plain, run) == 0 and run_stage(recomputed, run) == 0
    assert losses(recomputed.parent) == losses(plain.parent)
    assert [r["grad_norm"] for r in metric_rows(recomputed.parent)] == [r["grad_norm"] for r in metric_rows(plain.parent)]


def test_missing_val_split_is_one_line_error(make_spec, tmp_path: Path, data_dir: Path) -> None:
    import shutil

    from contract.markers import mark_succeeded

    partial = tmp_path / "partial-data"
    shutil.copytree(data_dir / "train", partial / "train")
    mark_succeeded(partial, "data")
    spec = make_spec("train", inputs={"data": partial})
    assert run_stage(spec, run) == 2
    assert read_marker(spec.parent).error == f"train: data: {partial / 'val'} is not a preprocessed split; run the preprocess stage first"
