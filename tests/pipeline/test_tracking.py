"""MLflow tracking of a pipeline run: the parent run and nested stage runs made where the study
runs (found or made by key, never twice), concurrent sqlite writers, and buffering when the
tracking server is unreachable."""

from __future__ import annotations

import json
import socket

import pytest
from mlflow.tracking import MlflowClient

from contract.tracking import (
    RUN_KEY_TAG,
    StageTracker,
    experiment_id_of,
    parent_run_id_of,
    pending_event_count,
    stage_run_id,
    sync_stage_events,
)
from pipeline.layout import RunLayout
from pipeline.run_record import read_record
from pipeline.sync import sync_run
from tests.pipeline.probe_dag import drive, fan_out_graph, tracking_to


def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def nested_runs(client: MlflowClient, ref) -> list:
    experiment = client.get_experiment_by_name(ref.experiment).experiment_id
    parent = parent_run_id_of(client, ref)
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_four_stages_log_at_once_to_the_embedded_store_without_lock_errors(tmp_path):
    ref = tracking_to(sqlite_uri(tmp_path))
    states = drive(fan_out_graph(sleep_s=0.5), tmp_path, max_parallel=4, tracking=ref)
    assert set(states.values()) == {"succeeded"}
    layout = RunLayout(tmp_path, "probe")
    client = MlflowClient(tracking_uri=ref.tracking_uri)
    by_stage = {run.data.tags["stage"]: run for run in nested_runs(client, ref)}
    assert sorted(by_stage) == ["a", "b", "c", "d", "join", "source"]
    for name, run in by_stage.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["kind"] == "probe"
        assert run.data.tags["cluster"] == "local"
        assert run.data.tags["image"] == "faster-qat-cpu:dev"
        assert len(run.data.tags["fingerprint"]) == 64 and run.data.tags["host"]
        assert run.data.params["payload"] == name
        assert run.info.run_id == stage_run_id(layout.stage_dir(name))
        assert pending_event_count(layout.stage_dir(name)) == 0
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "stage.log" in artifacts
    assert by_stage["join"].data.metrics["chars"] == len("sourceasourcebsourcecsourcedjoin")
    parent = client.get_run(parent_run_id_of(client, ref))
    assert parent.info.run_name == "probe" and parent.info.status == "FINISHED"


def test_a_rerun_of_the_same_run_id_reuses_the_parent_run(tmp_path):
    ref = tracking_to(sqlite_uri(tmp_path))
    drive(fan_out_graph(), tmp_path, tracking=ref)
    drive(fan_out_graph(payloads={"a": "A"}), tmp_path, tracking=ref)
    client = MlflowClient(tracking_uri=ref.tracking_uri)
    experiment = client.get_experiment_by_name(ref.experiment).experiment_id
    parents = client.search_runs([experiment], filter_string=f"tags.`{RUN_KEY_TAG}` = 'probe'")
    assert len(parents) == 1
    # The rerun made new nested runs for the stages it ran (a and join) beside the first six.
    assert sorted(r.data.tags["stage"] for r in nested_runs(client, ref)) == sorted(
        ["source", "a", "b", "c", "d", "join", "a", "join"])


@pytest.fixture
def refused_port():
    """A port bound but not listening, for the test's length: a connection to it is refused at
    once, and no other process can take it meanwhile (a port closed after a bind could be
    reused by a server that accepts and never answers: a 250 s test once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_stages_keep_working_when_mlflow_is_unreachable_and_sync_is_idempotent(tmp_path, refused_port):
    good = tracking_to(sqlite_uri(tmp_path))
    dead = good.model_copy(update={"tracking_uri": f"http://127.0.0.1:{refused_port}"})
    states = drive(fan_out_graph(), tmp_path, tracking=dead)
    assert set(states.values()) == {"succeeded"}
    layout = RunLayout(tmp_path, "probe")
    pending = {name: pending_event_count(layout.stage_dir(name)) for name in ("source", "join")}
    assert all(count > 0 for count in pending.values())
    # The server comes back (here: the same store through its sqlite URI).
    record = read_record(layout)
    layout.run_file.write_text(record.model_copy(update={"tracking": good}).model_dump_json())
    assert sync_run(layout, read_record(layout)) == 0
    for name in ("source", "a", "b", "c", "d", "join"):
        stage_dir = layout.stage_dir(name)
        assert pending_event_count(stage_dir) == 0
        assert sync_stage_events(stage_dir, good) == 0  # nothing left: sends nothing twice
    client = MlflowClient(tracking_uri=good.tracking_uri)
    nested = nested_runs(client, good)
    assert len(nested) == 6
    join = next(r for r in nested if r.data.tags["stage"] == "join")
    events = [json.loads(line) for line in
              (layout.stage_dir("join") / "tracking" / "events.jsonl").read_text().splitlines()]
    logged = [e for e in events if e["type"] == "metrics" and "chars" in e["metrics"]]
    history = client.get_metric_history(join.info.run_id, "chars")
    # The stage's own value and the summary's; MLflow stores a (value, step, time) once.
    assert len(history) == len({(e["ts"], e["metrics"]["chars"]) for e in logged}) >= 1
    assert events[0]["type"] == "create_run" and events[-1] == {"type": "end", "status": "FINISHED"}


def test_the_report_logs_to_other_stage_runs_and_tags_the_study_experiment(tmp_path):
    ref = tracking_to(sqlite_uri(tmp_path))
    drive(fan_out_graph(), tmp_path, tracking=ref)
    layout = RunLayout(tmp_path, "probe")
    client = MlflowClient(tracking_uri=ref.tracking_uri)
    experiment = experiment_id_of(client, ref)
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"

    summary = StageTracker(layout.stage_dir("summary"), ref, "summary")
    summary.start({"stage": "summary"})
    assert summary.mlflow_ids() == (experiment, parent_run_id_of(client, ref))
    summary.set_experiment_tags({"mlflow.sharedViewState.abc": '{"name": "compare"}'})
    summary.log_stage_metrics("a", {"study.val_loss_deployed": 6.5})
    summary.set_stage_tags("a", {"study.step_time_comparable": "false"})
    summary.log_stage_metrics("late", {"study.val_loss_deployed": 7.5})  # that stage has no run yet
    summary.set_stage_tags("late", {"study.step_time_comparable": "true"})

    assert client.get_experiment(experiment).tags["mlflow.sharedViewState.abc"] == '{"name": "compare"}'
    a = client.get_run(stage_run_id(layout.stage_dir("a"))).data
    assert a.metrics["study.val_loss_deployed"] == 6.5 and a.tags["study.step_time_comparable"] == "false"
    assert "study.step_time_comparable" not in client.get_run(stage_run_id(layout.stage_dir("summary"))).data.tags
    assert pending_event_count(layout.stage_dir("summary")) == 2  # waits, in order, for its target
    late = StageTracker(layout.stage_dir("late"), ref, "late")
    late.start({"stage": "late"})
    assert sync_stage_events(layout.stage_dir("summary"), ref) == 2
    late_run = client.get_run(stage_run_id(layout.stage_dir("late"))).data
    assert late_run.metrics["study.val_loss_deployed"] == 7.5 and late_run.tags["study.step_time_comparable"] == "true"
