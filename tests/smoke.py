"""Running the CLI the way a user does, for the end-to-end tests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE_STAGES = 28
# Runs left out when a backend test runs the smoke study with only its QAT baseline and bf16
# runs (11 stages); FASTER_QAT_SLOW_TESTS=1 runs all 28 stages there too.
TRIMMED_OUT = ("fp8", "mxfp8", "nv4f-mx8b", "qad-nvfp4", "int8-int4")
# And with its bf16 run alone (6 stages: preprocess, the base model's eval, train, export, eval,
# report): every stage kind but PTQ, for a backend whose ordering the probe DAG tests already.
BF16_ONLY_OUT = (*TRIMMED_OUT, "qat-nvfp4")


def smoke_slice(left_out: tuple[str, ...]) -> tuple[list[str], int]:
    """(`--set` arguments, stage count) of the smoke study without the runs `left_out`;
    FASTER_QAT_SLOW_TESTS=1: the whole study."""
    if os.environ.get("FASTER_QAT_SLOW_TESTS"):
        return [], SMOKE_STAGES
    return [arg for run in left_out for arg in ("--set", f"runs.{run}.enabled=false")], \
        {TRIMMED_OUT: 11, BF16_ONLY_OUT: 6}[left_out]


def pipeline_cli(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def report_rows(root: Path, run_id: str = "smoke") -> dict[tuple[str, str], dict[str, str]]:
    """The study table the report stage wrote, keyed by (run, phase)."""
    with (root / run_id / "report" / "report.csv").open() as handle:
        return {(row["run"], row["phase"]): row for row in csv.DictReader(handle)}


def assert_same_losses(root: Path, smoke_root: Path, run_id: str = "smoke") -> None:
    """The study table under `root` has the local run's losses (seeded and deterministic on CPU),
    for every (run, phase) it holds."""
    import math

    found, local = report_rows(root, run_id), report_rows(smoke_root)
    assert found and set(found) <= set(local), (sorted(found), sorted(local))
    for key, row in found.items():
        for column in ("val_loss", "train_val_loss"):
            if row[column]:
                assert math.isclose(float(row[column]), float(local[key][column]), rel_tol=1e-9), (key, column)
