"""Helpers of the train stage tests (a uniquely named module: every test folder has a conftest)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from contract.markers import mark_succeeded
from contract.tracking import StageTracker

REPO = Path(__file__).resolve().parents[3]
TINY_MODEL = REPO / "fixtures" / "models" / "tiny-qwen3"
SEQ_LEN = 32


def write_token_dataset(data_dir: Path, n_train: int = 48, n_val: int = 8, seq_len: int = SEQ_LEN) -> Path:
    """A preprocess-format output: train/ and val/ with int32 input_ids, labels, position_ids.

    Rows are counting sequences (start + stride * t mod 200), so a model can learn them in a few
    steps; the first quarter of each row is a "prompt" with labels -100.
    """
    import datasets

    def rows(n: int, offset: int) -> dict[str, list[list[int]]]:
        ids, labels, positions = [], [], []
        for i in range(n):
            start, stride = (7 * (i + offset)) % 200, 1 + (i + offset) % 3
            row = [10 + (start + stride * t) % 200 for t in range(seq_len)]
            prompt = seq_len // 4
            ids.append(row)
            labels.append([-100] * prompt + row[prompt:])
            positions.append(list(range(seq_len)))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    features = datasets.Features(
        {name: datasets.Sequence(datasets.Value("int32")) for name in ("input_ids", "labels", "position_ids")}
    )
    datasets.Dataset.from_dict(rows(n_train, 0), features=features).save_to_disk(str(data_dir / "train"))
    datasets.Dataset.from_dict(rows(n_val, 1000), features=features).save_to_disk(str(data_dir / "val"))
    mark_succeeded(data_dir, "data-fingerprint")  # the upstream must have succeeded
    return data_dir


# Smoke settings: fp32 for bit-exact CPU comparisons, 4 sequences a step in 2 micro-batches.
BASE_PARAMS: dict[str, Any] = {
    "model": str(TINY_MODEL),
    "dtype": "float32",
    "recipe": "bf16",
    "backend": "emulated",
    "global_batch": 4,
    "micro_batch": 2,
    "steps": 6,
    "lr": 3e-3,
    "warmup_steps": 1,
    "val_batches": 2,
    "device": "cpu",
    "calib_batches": 0,
}


def metric_rows(stage_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def losses(stage_dir: Path) -> list[float]:
    return [row["loss"] for row in metric_rows(stage_dir)]


def preempt_after(monkeypatch: pytest.MonkeyPatch, run_name: str, after_step: int,
                  deliveries: int = 1) -> Callable[[], None]:
    """A real SIGUSR1 to this process right after `after_step` of run `run_name` is logged (Slurm's
    preemption), `deliveries` times in a row; returns what stops it."""
    log_metrics = StageTracker.log_metrics

    def log_then_signal(self, metrics, step=None):
        log_metrics(self, metrics, step)
        if step == after_step and self.run_name == run_name:
            for _ in range(deliveries):
                os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(StageTracker, "log_metrics", log_then_signal)
    return lambda: monkeypatch.setattr(StageTracker, "log_metrics", log_metrics)
