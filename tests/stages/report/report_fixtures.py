"""Stage folders as the train and eval stages leave them, for the report's tests."""

from __future__ import annotations

import json
from pathlib import Path

from contract.files import write_json_atomic
from contract.spec import MANIFEST_FILE

T0 = 1_800_000_000.0  # a wall-clock origin for the steps' end times
LOSS_SUMS = [10.0, 12.0, 9.0, 11.0, 30.0, 14.0]  # nats per validation sequence
TOKENS = [5, 6, 5, 5, 10, 7]


def stage(root: Path, name: str, summary: dict) -> Path:
    stage_dir = root / name
    write_json_atomic(stage_dir / MANIFEST_FILE, {"stage": name, "summary": summary})
    return stage_dir


def train_stage(root: Path, name: str, step_times: list[float], shared_with: list[dict] | None = None,
                start: float = T0, backend: str = "emulated", kd_loss: bool = False) -> Path:
    """A train stage whose steps ran back to back from `start`, with a local-driver sharing record."""
    rows, now = [], start
    for i, seconds in enumerate(step_times):
        now += seconds
        row = {"step": i + 1, "loss": 7.0 - 0.1 * i, "step_time_s": seconds, "ended_at": now}
        if kd_loss:
            row |= {"ce_loss": 7.2 - 0.1 * i, "kd_loss": 0.02 - 0.001 * i}
        if i == len(step_times) - 1:
            row["val_loss"] = 6.9
        rows.append(row)
    record = {"source": "local driver", "device": "cpu", "window": [start, now], "exclusive": not shared_with,
              "shared_with": shared_with or [], "note": ""}
    stage_dir = stage(root, name, {"backend": backend, "val_loss": 6.9, "device_sharing": record,
                                   "versions": {"python": "3.11", "torch": "2.13.0"}})
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return stage_dir


def eval_stage(root: Path, name: str, loss_sums: list[float], precision: str = "bf16",
               correct: int | None = None, questions: int = 6) -> Path:
    summary = {"val_loss": sum(loss_sums) / sum(TOKENS), "val_tokens": sum(TOKENS), "val_sequences": len(loss_sums),
               "precision": precision, "versions": {"python": "3.11", "torch": "2.13.0"}}
    if correct is not None:
        summary |= {"acc_mmlu_tiny": correct / questions, "questions_mmlu_tiny": questions}
    stage_dir = stage(root, name, summary)
    write_json_atomic(stage_dir / "val_sequences.json",
                      {"unit": "nats", "rows": list(range(len(loss_sums))), "loss_sum": loss_sums, "tokens": TOKENS})
    return stage_dir


def small_study(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, str]]]:
    """base -> PTQ of qat; bf16 (baseline, alone), fp8 (shared the CPU with train-bf16 while it
    timed), int4 (shared only during its first, warm-up step), qat (QAD, after PTQ)."""
    bf16_end = T0 + 9.0 + 2.0 + 2.1 + 1.9
    inputs = {
        "eval-base": eval_stage(root, "eval-base", [x * 1.2 for x in LOSS_SUMS], correct=1),
        "eval-ptq-qat": eval_stage(root, "eval-ptq-qat", [x * 1.1 for x in LOSS_SUMS], "nvfp4", correct=2),
        "train-bf16": train_stage(root, "train-bf16", [9.0, 2.0, 2.1, 1.9]),
        "eval-bf16": eval_stage(root, "eval-bf16", LOSS_SUMS, correct=3),
        "train-fp8": train_stage(root, "train-fp8", [9.0, 1.0, 1.1, 0.9], start=T0,
                                 shared_with=[{"stage": "train-bf16", "kind": "train", "on": "cpu cores",
                                               "from": T0, "until": bf16_end}]),
        "eval-fp8": eval_stage(root, "eval-fp8", [x * 1.01 for x in LOSS_SUMS], "fp8", correct=3),
        "train-int4": train_stage(root, "train-int4", [5.0, 3.0, 3.2, 2.8], start=bf16_end,
                                  shared_with=[{"stage": "eval-bf16", "kind": "eval", "on": "cpu cores",
                                                "from": bf16_end, "until": bf16_end + 4.0}]),
        "eval-int4": eval_stage(root, "eval-int4", [x * (1.02 if i % 2 else 0.98) for i, x in enumerate(LOSS_SUMS)],
                                "int4-fake-quant", correct=2),
        "train-qat": train_stage(root, "train-qat", [9.0, 4.0, 4.2, 3.8], start=bf16_end + 20, kd_loss=True),
        "eval-qat": eval_stage(root, "eval-qat", [x * 1.03 for x in LOSS_SUMS], "nvfp4", correct=2),
    }
    # What the study graph tells the report of each input (contract.params.ReportInput).
    tags = {role: {"run": role.split("-")[-1], "phase": "trained", "recipe": role.split("-")[-1],
                   "inference_format": role.split("-")[-1]} for role in inputs}
    tags["eval-base"] = {"run": "base", "phase": "base", "recipe": "bf16", "inference_format": "bf16"}
    tags["eval-ptq-qat"] = {"run": "qat", "recipe": "nvfp4_qat", "phase": "ptq", "inference_format": "nvfp4"}
    for role in ("train-qat", "eval-qat"):
        tags[role] = {"run": "qat", "phase": "trained", "recipe": "nvfp4_qat", "backend": "emulated",
                      "inference_format": "nvfp4"}
    for role in ("train-int4", "eval-int4"):
        tags[role] = {"run": "int4", "phase": "trained", "recipe": "my_int4.yaml", "backend": "torchao",
                      "inference_format": "int4"}
    return inputs, tags
