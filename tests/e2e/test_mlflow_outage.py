"""A real `mlflow server` stops in the middle of a run and comes back: the stages keep working,
buffer what they log, and `python -m pipeline sync` delivers it: nothing lost, nothing twice."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from contract.tracking import (
    experiment_id_of,
    parent_run_id_of,
    pending_event_count,
    read_events,
    sync_stage_events,
)
from pipeline.cli import main
from pipeline.layout import RunLayout
from pipeline.run_record import read_record

REPO = Path(__file__).resolve().parents[2]
STAGES = ("source", "a", "b", "c", "d", "join")


def test_tracking_server_outage_mid_run_then_sync(tmp_path, mlflow_server):
    server = mlflow_server
    server.start()
    root = tmp_path / "runs"
    driver = subprocess.Popen(
        [sys.executable, "-m", "tests.pipeline.probe_dag", str(root), "--sleep", "3",
         "--metric-every", "0.25", "--tracking-uri", server.uri],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    layout = RunLayout(root, "probe")
    events = layout.stage_dir("source") / "tracking" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (events.exists() and len(read_events(layout.stage_dir("source"))) > 4):
        time.sleep(0.1)
    server.stop()  # mid-run: the source stage is logging, the fan-out has not started
    out, _ = driver.communicate(timeout=300)
    assert "join=succeeded" in out and out.count("=succeeded") == 6, out
    pending = {name: pending_event_count(layout.stage_dir(name)) for name in STAGES}
    assert pending["join"] > 0 and pending["a"] > 0, pending

    server.start()
    ref = read_record(layout).tracking
    for name in STAGES:  # each buffered event is sent exactly once
        assert sync_stage_events(layout.stage_dir(name), ref) == pending[name]
    assert main(["sync", "probe", "--root", str(root)]) == 0
    assert all(sync_stage_events(layout.stage_dir(name), ref) == 0 for name in STAGES)

    client = MlflowClient(tracking_uri=server.uri)
    parent = parent_run_id_of(client, ref)
    nested = client.search_runs([experiment_id_of(client, ref)], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["stage"] for r in nested) == sorted(STAGES)
    for mlflow_run in nested:
        stage = mlflow_run.data.tags["stage"]
        logged = [e for e in read_events(layout.stage_dir(stage))
                  if e["type"] == "metrics" and "elapsed_s" in e["metrics"]]
        history = client.get_metric_history(mlflow_run.info.run_id, "elapsed_s")
        assert len(history) == len(logged) >= 10, stage  # each logged value once
        assert mlflow_run.info.status == "FINISHED"
        assert "stage.log" in [a.path for a in client.list_artifacts(mlflow_run.info.run_id)]
