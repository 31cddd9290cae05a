"""What the report puts in MLflow: the same metric names on every row's stage run, and a saved
view of the runs page in the format MLflow 3.17's UI reads."""

from __future__ import annotations

import json

import pytest

from stages.report import mlflow_view
from stages.report.rows import Settings, build_study
from tests.stages.report.report_fixtures import small_study


@pytest.fixture
def study(tmp_path):
    inputs, tags = small_study(tmp_path)
    return build_study(inputs, tags, Settings(baseline="bf16", skip_first_steps=1))


def test_each_row_lands_on_the_stage_run_it_stands_for(study):
    stages = {"eval-base", "eval-ptq-qat", "train-bf16", "eval-bf16", "train-qat", "eval-qat"}
    where = {row.key: mlflow_view.row_stage(row, stages) for row in study.rows}
    assert where[("base", "base")] == "eval-base"
    assert where[("qat", "ptq")] == "eval-ptq-qat"
    assert where[("bf16", "trained")] == "train-bf16"
    assert where[("fp8", "trained")] is None  # none of its stages is an input here


def test_every_row_uses_the_same_names_for_what_it_has(study):
    rows = {row.key: mlflow_view.comparison_metrics(row) for row in study.rows}
    fp8, base = rows[("fp8", "trained")], rows[("base", "base")]
    assert fp8["study/val_loss_deployed_vs_baseline_pct"] == pytest.approx(1.0)
    assert fp8["study_n/step_time_steps"] == 3.0
    assert fp8["study/accuracy_mmlu_tiny"] == 0.5 and fp8["study_n/accuracy_mmlu_tiny_questions"] == 6.0
    assert fp8["study_ci/val_loss_deployed_low"] < fp8["study/val_loss_deployed"] < fp8["study_ci/val_loss_deployed_high"]
    assert "study/step_time_s" not in base  # the base model was not trained
    assert set(base) < set(fp8)


def test_yes_no_facts_are_tags_and_the_chart_view_holds_only_numbers(study):
    metric_names = {name for row in study.rows for name in mlflow_view.comparison_metrics(row)}
    assert not {name for name in metric_names if "comparable" in name or "within_noise" in name}
    tags = {row.key: mlflow_view.comparison_tags(row) for row in study.rows}
    assert tags[("fp8", "trained")] == {"study.step_time_comparable": "false",
                                        "study.val_loss_deployed_within_noise": "false"}
    assert tags[("int4", "trained")]["study.val_loss_deployed_within_noise"] == "true"
    assert tags[("bf16", "trained")] == {"study.step_time_comparable": "true"}  # no difference to itself
    assert set(tags[("base", "base")]) == {"study.val_loss_deployed_within_noise"}  # not trained: no step time


def test_the_saved_view_lists_this_runs_stages_sorted_with_the_comparison_columns(study):
    state = mlflow_view.view_state("abc123", ["mmlu_tiny"])
    assert state["searchFilter"] == "tags.`mlflow.parentRunId` = 'abc123'"
    assert state["orderByKey"] == "metrics.`study/val_loss_deployed`" and state["orderByAsc"] is True
    assert state["selectedColumns"][:5] == [
        "metrics.`study/val_loss_deployed`", "metrics.`study/val_loss_deployed_vs_baseline_pct`",
        "metrics.`study/step_time_vs_baseline`", "metrics.`study/step_time_s`", "metrics.`study/accuracy_mmlu_tiny`"]
    assert state["selectedColumns"][5:7] == [
        "tags.`study.step_time_comparable`", "tags.`study.val_loss_deployed_within_noise`"]
    assert state["columnOrder"] == state["selectedColumns"] and set(state["columnWidths"]) == set(state["selectedColumns"])
    view_id, key, value = mlflow_view.saved_view("Study t: compare runs", state)
    envelope = json.loads(value)
    assert key == f"mlflow.sharedViewState.{view_id}" and envelope["name"] == "Study t: compare runs"
    assert json.loads(envelope["state"]) == state and isinstance(envelope["createdAt"], int)
    assert mlflow_view.saved_view("other name", state)[0] == view_id  # the id follows the state
    assert mlflow_view.view_route("7", view_id) == (
        f"/experiments/7/runs?viewStateShareKey={view_id}&workflowType=machine_learning&compareRunsMode=TABLE")
