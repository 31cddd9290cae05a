"""The README's first command end to end: the whole smoke study on CPU, the report, a cached
rerun, and the MLflow UI (a real server, a real headless browser) comparing the runs."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from contract.tracking import experiment_id_of, parent_run_id_of
from pipeline.layout import RunLayout
from pipeline.run_record import read_record
from stages.report.mlflow_view import WORKFLOW_PARAM
from tests.e2e.browser import chromium, render
from tests.e2e.mlflow_server import MlflowServer
from tests.smoke import pipeline_cli as pipeline
from tests.smoke import report_rows

RUNS = ("qat-nvfp4", "bf16", "fp8", "mxfp8", "nv4f-mx8b", "qad-nvfp4", "int8-int4")


def test_the_study_table_compares_every_run_to_bf16_with_sample_sizes_and_intervals(smoke_root):
    rows = report_rows(smoke_root)
    bf16 = rows[("bf16", "trained")]
    for run in RUNS:
        row = rows[(run, "trained")]
        assert float(row["step_time_s"]) > 0 and row["step_time_steps"] == "5"  # 6 steps, 1 of warm-up
        assert float(row["step_time_low"]) <= float(row["step_time_s"]) <= float(row["step_time_high"])
        assert float(row["val_loss_low"]) < float(row["val_loss"]) < float(row["val_loss_high"]), row
        assert int(row["val_tokens"]) > 500 and int(row["val_sequences"]) == 16
        assert row["backend"] in ("emulated", "torchao")
        assert 0 <= float(row["accuracy_mmlu_tiny"]) <= 1 and row["accuracy_mmlu_tiny_n"] == "6"  # lm-eval ran
        # The local driver recorded who shared the CPU: a ratio compares only runs that ran alone.
        assert row["timing"] in ("exclusive", "shared"), row["timing_note"]
        assert row["step_time_comparable"] == str(row["timing"] == bf16["timing"] == "exclusive")
        if run != "bf16":
            low, pct, high = (float(row[f"val_loss_vs_baseline_pct{s}"]) for s in ("_low", "", "_high"))
            assert low <= pct <= high and row["val_loss_within_noise"] == str(low <= 0 <= high)
    assert float(bf16["step_time_vs_baseline"]) == 1.0 and bf16["val_loss_vs_baseline_pct"] == ""
    assert rows[("nv4f-mx8b", "trained")]["inference_format"] == "nvfp4"
    assert rows[("mxfp8", "trained")]["inference_format"] == "mxfp8"
    assert rows[("int8-int4", "trained")]["inference_format"] == "int8_int4"  # torchao's quantized checkpoint
    assert ("qat-nvfp4", "ptq") in rows and ("base", "base") in rows
    # Training lowers the loss: every trained run beats the random-init base model.
    base = float(rows[("base", "base")]["val_loss"])
    assert all(float(rows[(run, "trained")]["val_loss"]) < base for run in RUNS)
    report_dir = smoke_root / "smoke" / "report"
    for plot in ("loss_curves.png", "step_time.png", "val_loss_vs_step_time.png"):
        assert (report_dir / "plots" / plot).stat().st_size > 10_000
    page = (report_dir / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3  # the plots inside the page: readable offline
    assert "<td>nv4f-mx8b</td>" in page and "torch</td><td>2.13.0" in page


def test_report_command_prints_the_table_the_page_and_the_mlflow_link(smoke_root):
    result = pipeline("report", "smoke", "--root", str(smoke_root))
    assert result.returncode == 0
    table = (smoke_root / "smoke" / "report" / "report.md").read_text()
    assert result.stdout.startswith(table)
    view = json.loads((smoke_root / "smoke" / "report" / "mlflow_view.json").read_text())
    assert f"One-page report: {smoke_root / 'smoke' / 'report' / 'report.html'}" in result.stdout
    assert f"http://127.0.0.1:5000/#{view['route']}" in result.stdout


def test_a_cached_rerun_runs_nothing(smoke_root):
    result = pipeline("run", "-c", "smoke", "--root", str(smoke_root), "--plain")
    assert result.returncode == 0
    assert "smoke: all 28 stages already succeeded (cached)" in result.stdout


def test_mlflow_holds_every_stage_and_the_ui_compares_the_runs(smoke_root, tmp_path):
    ref = read_record(RunLayout(smoke_root, "smoke")).tracking
    client = MlflowClient(tracking_uri=ref.tracking_uri)
    experiment_id, parent_id = experiment_id_of(client, ref), parent_run_id_of(client, ref)
    parent = client.get_run(parent_id)
    assert "| nv4f-mx8b |" in parent.data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(parent_id, "report")} >= {
        "report/report.md", "report/report.html", "report/report.csv"}
    nested = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_stage = {r.data.tags["stage"]: r for r in nested}
    assert len(by_stage) == 28
    train_bf16 = by_stage["train-bf16"]
    assert train_bf16.data.tags["recipe"] == "bf16" and "loss" in train_bf16.data.metrics
    assert len(client.get_metric_history(train_bf16.info.run_id, "loss")) == 6
    # Each row of the table sits on its stage run, under the same names everywhere.
    rows = report_rows(smoke_root)
    for run_name in RUNS:
        metrics = by_stage[f"train-{run_name}"].data.metrics
        assert metrics["study/val_loss_deployed"] == pytest.approx(float(rows[(run_name, "trained")]["val_loss"]))
        assert metrics["study/step_time_s"] > 0 and metrics["study_n/step_time_steps"] == 5
        assert metrics["study_n/accuracy_mmlu_tiny_questions"] == 6
    assert "study/val_loss_deployed" in by_stage["eval-base"].data.metrics
    # Its yes/no facts are tags (a column), not metrics (an all-zero chart in the chart view).
    for run_name in RUNS:
        row, tags = rows[(run_name, "trained")], by_stage[f"train-{run_name}"].data.tags
        assert tags["study.step_time_comparable"] == row["step_time_comparable"].lower()
        assert parent.data.tags[f"study.{run_name}.trained.step_time_comparable"] == row["step_time_comparable"].lower()
        if run_name != "bf16":
            assert tags["study.val_loss_deployed_within_noise"] == row["val_loss_within_noise"].lower()
    assert not {name for run in nested for name in run.data.metrics if "comparable" in name or "within_noise" in name}
    experiment = client.get_experiment(experiment_id)
    view = json.loads((smoke_root / "smoke" / "report" / "mlflow_view.json").read_text())
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"mlflow.sharedViewState.{view['view_id']}" in experiment.tags

    if chromium() is None:
        pytest.skip("chromium is not installed: apt-get install chromium (CI installs it)")
    server = MlflowServer(smoke_root / "mlflow.db", tmp_path / "artifacts")
    server.start()
    try:
        shots = smoke_root / "screenshots"
        shots.mkdir(exist_ok=True)
        # The link `pipeline report` prints: model-training view, the stage runs listed flat,
        # sorted by deployed val loss, the comparison columns chosen.
        # (the grid renders only the columns in view: a wide window holds all five)
        runs_dom = render(f"{server.uri}/#{view['route']}", shots / "runs.png", window=(2600, 1000),
                          wait_for="study/accuracy_mmlu_tiny")
        for column in ("study/val_loss_deployed", "study/val_loss_deployed_vs_baseline_pct",
                       "study/step_time_vs_baseline", "study/step_time_s", "study/accuracy_mmlu_tiny",
                       "study.step_time_comparable"):
            assert column in runs_dom, column
        assert ">Model registry<" in runs_dom and ">Training runs<" not in runs_dom  # the model-training view
        assert "train-bf16" in runs_dom and "eval-base" in runs_dom and f"<strong>{len(nested)}</strong> matching runs" in runs_dom
        # The same view compared (the runs page's chart view): one chart per comparison metric.
        chart_titles = tuple(f">{metric}<" for metric in ("study/val_loss_deployed", "study/step_time_s",
                                                           "study/step_time_vs_baseline", "study/accuracy_mmlu_tiny"))
        charts_dom = render(f"{server.uri}/#{view['route'].replace('compareRunsMode=TABLE', 'compareRunsMode=CHART')}",
                            shots / "compare.png", window=(1600, 2400), wait_for=chart_titles)
        for title in chart_titles:
            assert title in charts_dom, title  # one chart per comparison metric
        assert ">study/step_time_comparable<" not in charts_dom  # a yes/no fact is no chart
        # Why the report prints a link: MLflow 3.17 picks the view in the browser (the URL's
        # workflowType, else the browser's last switch, else GenAI) and reads no experiment tag
        # for it (stages/report/mlflow_view.py), so the plain URL opens the GenAI view.
        plain_dom = render(f"{server.uri}/#/experiments/{experiment_id}/runs", shots / "plain.png", wait_for="smoke")
        assert ">Training runs<" in plain_dom and ">Model registry<" not in plain_dom
        parent_dom = render(f"{server.uri}/#/experiments/{experiment_id}/runs/{parent_id}"
                            f"?{WORKFLOW_PARAM}", shots / "parent.png")
        assert "nv4f-mx8b" in parent_dom and "qat-nvfp4" in parent_dom
        for shot in ("runs.png", "compare.png", "parent.png", "plain.png"):
            assert (shots / shot).stat().st_size > 20_000
    finally:
        server.stop()

