"""The README's first command end to end: the whole smoke study on CPU, the report, a cached
rerun, and the MLflow UI (a real server, a real headless browser) showing the runs."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from contract.tracking import experiment_id_of, parent_run_id_of
from pipeline.layout import RunLayout
from pipeline.run_record import read_record
from tests.e2e.browser import chromium, render
from tests.e2e.mlflow_server import MlflowServer
from tests.smoke import pipeline_cli as pipeline
from tests.smoke import report_rows

RUNS = ("qat-nvfp4", "bf16", "fp8", "mxfp8", "nv4f-mx8b", "qad-nvfp4", "int8-int4")


def test_the_study_table_compares_every_run_to_bf16(smoke_root):
    rows = report_rows(smoke_root)
    for run in RUNS:
        row = rows[(run, "trained")]
        assert float(row["step_time_s"]) > 0 and float(row["val_loss"]) > 0, row
        assert row["backend"] in ("emulated", "torchao")
        assert 0 <= float(row["accuracy_mmlu_tiny"]) <= 1  # lm-eval ran on the deployed model
    assert float(rows[("bf16", "trained")]["step_time_vs_baseline"]) == 1.0
    assert float(rows[("bf16", "trained")]["val_loss_vs_baseline"]) == 1.0
    assert rows[("nv4f-mx8b", "trained")]["inference_format"] == "nvfp4"
    assert rows[("mxfp8", "trained")]["inference_format"] == "mxfp8"
    assert rows[("int8-int4", "trained")]["inference_format"] == "int8_int4"  # torchao's quantized checkpoint
    assert ("qat-nvfp4", "ptq") in rows and ("base", "base") in rows
    # Training lowers the loss: every trained run beats the random-init base model.
    base = float(rows[("base", "base")]["val_loss"])
    assert all(float(rows[(run, "trained")]["val_loss"]) < base for run in RUNS)
    for plot in ("loss_curves.png", "step_time.png", "val_loss_vs_step_time.png"):
        assert (smoke_root / "smoke" / "report" / "plots" / plot).stat().st_size > 10_000


def test_report_command_prints_the_same_table(smoke_root):
    result = pipeline("report", "smoke", "--root", str(smoke_root))
    assert result.returncode == 0
    assert result.stdout.strip() == (smoke_root / "smoke" / "report" / "report.md").read_text().strip()


def test_a_cached_rerun_runs_nothing(smoke_root):
    result = pipeline("run", "-c", "smoke", "--root", str(smoke_root), "--plain")
    assert result.returncode == 0
    assert "smoke: all 28 stages already succeeded (cached)" in result.stdout


def test_mlflow_holds_every_stage_and_the_ui_shows_the_study(smoke_root, tmp_path):
    ref = read_record(RunLayout(smoke_root, "smoke")).tracking
    client = MlflowClient(tracking_uri=ref.tracking_uri)
    experiment, parent_id = experiment_id_of(client, ref), parent_run_id_of(client, ref)
    parent = client.get_run(parent_id)
    assert "| nv4f-mx8b |" in parent.data.tags["mlflow.note.content"]
    nested = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len({r.data.tags["stage"] for r in nested}) == 28
    train_bf16 = next(r for r in nested if r.data.tags["stage"] == "train-bf16")
    assert train_bf16.data.tags["recipe"] == "bf16" and "loss" in train_bf16.data.metrics
    assert len(client.get_metric_history(train_bf16.info.run_id, "loss")) == 6

    if chromium() is None:
        pytest.skip("chromium is not installed: apt-get install chromium (CI installs it)")
    server = MlflowServer(smoke_root / "mlflow.db", tmp_path / "artifacts")
    server.start()
    try:
        shots = smoke_root / "screenshots"
        shots.mkdir(exist_ok=True)
        runs_dom = render(f"{server.uri}/#/experiments/{experiment}/runs", shots / "runs.png")
        assert "smoke" in runs_dom
        parent_dom = render(f"{server.uri}/#/experiments/{experiment}/runs/{parent_id}",
                            shots / "parent.png")
        assert "nv4f-mx8b" in parent_dom and "qat-nvfp4" in parent_dom
        train_ids = [r.info.run_id for r in nested if r.data.tags["stage"].startswith("train-")]
        compare = (f"{server.uri}/#/compare-runs?runs={json.dumps(train_ids)}"
                   f"&experiments={json.dumps([experiment])}")
        compare_dom = render(compare, shots / "compare.png")
        assert "train-bf16" in compare_dom and "train-nv4f-mx8b" in compare_dom
        for shot in ("runs.png", "parent.png", "compare.png"):
            assert (shots / shot).stat().st_size > 20_000
    finally:
        server.stop()
