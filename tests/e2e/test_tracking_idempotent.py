"""The parent run and a stage's run are made where the study runs, found or made by key: a create
whose response is lost and retried, or pods of one stage attempt racing, leave one run that every
one of them logs to. Against a real `mlflow server`, behind a proxy that can drop a response."""

from __future__ import annotations

import http.client
import multiprocessing
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from contract.spec import TrackingRef
from contract.tracking import (
    RUN_KEY_TAG,
    STAGE_KEY_TAG,
    experiment_id_of,
    get_or_create_run,
    parent_run_id_of,
)
from tests.e2e.mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` for this file (each test has its own experiment): it starts slowly."""
    folder = tmp_path_factory.mktemp("mlflow")
    with MlflowServer(folder / "mlflow.db", folder / "artifacts") as server:
        yield server


class DroppingProxy:
    """Forwards every request to the server. Of the calls to runs/create, the first `refuse` get
    a 503 without reaching the server; the next `drop` reach it (the run is made), then the
    connection closes without an answer (a lost response)."""

    def __init__(self, upstream_port: int, drop: int = 0, refuse: int = 0, hold: bool = False) -> None:
        self.creates_seen = 0  # creates the client sent
        # With `hold`, the first create waits at the proxy until `release` is set (a slow racer).
        self.create_arrived, self.release = threading.Event(), threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None: ...

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                is_create = self.command == "POST" and self.path.endswith("/runs/create")
                if is_create:
                    proxy.creates_seen += 1
                    if hold and proxy.creates_seen == 1:
                        proxy.create_arrived.set()
                        proxy.release.wait(timeout=120)
                    if proxy.creates_seen <= refuse:
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                payload = answer.read()
                if is_create and proxy.creates_seen <= refuse + drop:
                    self.close_connection = True
                    self.connection.close()  # the run exists; its id never reaches the client
                    return
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def runs_with(client: MlflowClient, ref: TrackingRef, tag: str, key: str) -> list:
    """Every run of the key, deleted ones included."""
    experiment = experiment_id_of(client, ref)
    return client.search_runs([experiment], filter_string=f"tags.`{tag}` = '{key}'",
                              run_view_type=ViewType.ALL)


@pytest.mark.parametrize("retries", ["0", "3"])
def test_a_lost_create_response_leaves_exactly_one_parent_run(mlflow_server, monkeypatch, retries):
    """Even with MLflow's own HTTP retries on (3), the create goes out once; the key finds the run
    it made. One run in all, deleted ones counted, and the same one is found again later."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    proxy = DroppingProxy(mlflow_server.port, drop=1)
    ref = TrackingRef(tracking_uri=proxy.uri, experiment=f"lost-answer-{retries}", run_key="run-1")
    parent = parent_run_id_of(MlflowClient(tracking_uri=proxy.uri), ref)
    assert proxy.creates_seen == 1
    direct = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = runs_with(direct, ref, RUN_KEY_TAG, "run-1")
    assert [(run.info.run_id, run.info.lifecycle_stage) for run in runs] == [(parent, "active")]
    assert parent_run_id_of(direct, ref) == parent


def test_a_create_refused_before_the_server_is_sent_again_and_leaves_one_run(mlflow_server):
    """A 503 from in front of the server (nothing made): the key finds nothing, the create goes
    out again and makes the one run."""
    proxy = DroppingProxy(mlflow_server.port, refuse=1)
    ref = TrackingRef(tracking_uri=proxy.uri, experiment="refused-create", run_key="run-1")
    client = MlflowClient(tracking_uri=proxy.uri)
    experiment = experiment_id_of(client, ref)
    stage_run = get_or_create_run(client, experiment, STAGE_KEY_TAG, "run-1/train/a", "train", {"stage": "train"})
    assert proxy.creates_seen == 2
    runs = runs_with(MlflowClient(tracking_uri=mlflow_server.uri), ref, STAGE_KEY_TAG, "run-1/train/a")
    assert [(run.info.run_id, run.info.lifecycle_stage) for run in runs] == [(stage_run, "active")]


def test_a_claimed_run_deleted_by_a_user_is_replaced_once(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    ref = TrackingRef(tracking_uri=mlflow_server.uri, experiment="deleted-by-user", run_key="run-1")
    experiment = experiment_id_of(client, ref)
    first = get_or_create_run(client, experiment, STAGE_KEY_TAG, "run-1/eval/a", "eval", {})
    client.delete_run(first)
    second = get_or_create_run(client, experiment, STAGE_KEY_TAG, "run-1/eval/a", "eval", {})
    assert second != first
    assert get_or_create_run(client, experiment, STAGE_KEY_TAG, "run-1/eval/a", "eval", {}) == second
    runs = runs_with(client, ref, STAGE_KEY_TAG, "run-1/eval/a")
    assert sorted((run.info.run_id, run.info.lifecycle_stage) for run in runs) == sorted(
        [(first, "deleted"), (second, "active")])


def test_a_slow_racer_whose_run_looks_older_still_uses_the_run_already_in_use(mlflow_server):
    """Racer B searches (nothing), stamps its run's start time and is held on the way to the server;
    racer A makes, claims and logs to its run; then B's create lands with the EARLIER start time
    (as with a clock behind). "Keep the earliest" would make B delete A's run under A; the claim
    makes B use A's run and delete its own."""
    proxy = DroppingProxy(mlflow_server.port, hold=True)
    ref = TrackingRef(tracking_uri=mlflow_server.uri, experiment="slow-racer", run_key="run-1")
    direct = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = experiment_id_of(direct, ref)
    key = "run-1/train/attempt-a"
    slow: list[str] = []
    racer_b = threading.Thread(target=lambda: slow.append(get_or_create_run(
        MlflowClient(tracking_uri=proxy.uri), experiment, STAGE_KEY_TAG, key, "train", {"stage": "train"})))
    racer_b.start()
    assert proxy.create_arrived.wait(timeout=120)
    run_a = get_or_create_run(direct, experiment, STAGE_KEY_TAG, key, "train", {"stage": "train"})
    direct.log_metric(run_a, "racer", 0.0)
    proxy.release.set()
    racer_b.join(timeout=120)
    assert slow == [run_a]
    runs = {run.info.run_id: run for run in runs_with(direct, ref, STAGE_KEY_TAG, key)}
    assert len(runs) == 2 and runs[run_a].info.lifecycle_stage == "active"
    (run_b,) = set(runs) - {run_a}
    assert runs[run_b].info.start_time < runs[run_a].info.start_time  # B's run looked older
    assert runs[run_b].info.lifecycle_stage == "deleted"
    direct.log_metric(run_a, "racer", 1.0)  # A's run is still open for logging
    assert [m.value for m in direct.get_metric_history(run_a, "racer")] == [0.0, 1.0]


RACERS = 3


def _race(uri: str, index: int, barrier, results) -> None:
    client = MlflowClient(tracking_uri=uri)
    ref = TrackingRef(tracking_uri=uri, experiment="racing", run_key="run-1")
    experiment = experiment_id_of(client, ref)
    barrier.wait()
    run_id = get_or_create_run(client, experiment, STAGE_KEY_TAG, "run-1/train/attempt-a", "train",
                               {"stage": "train"})
    client.log_metric(run_id, "racer", index, step=index)
    results.put(run_id)


def test_pods_of_one_stage_attempt_racing_all_log_to_one_run(mlflow_server):
    ref = TrackingRef(tracking_uri=mlflow_server.uri, experiment="racing", run_key="run-1")
    experiment_id_of(MlflowClient(tracking_uri=mlflow_server.uri), ref)  # all see the experiment
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(RACERS), context.Queue()
    racers = [context.Process(target=_race, args=(mlflow_server.uri, index, barrier, results))
              for index in range(RACERS)]
    for racer in racers:
        racer.start()
    chosen = [results.get(timeout=120) for _ in racers]
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = runs_with(client, ref, STAGE_KEY_TAG, "run-1/train/attempt-a")
    active = [run for run in runs if run.info.lifecycle_stage == "active"]
    assert len(set(chosen)) == 1 and [run.info.run_id for run in active] == chosen[:1]
    history = client.get_metric_history(chosen[0], "racer")
    assert sorted(metric.value for metric in history) == [float(index) for index in range(RACERS)]
    # The runs that lost the race (if the racers made more than one) are deleted and empty.
    for run in runs:
        if run.info.run_id != chosen[0]:
            assert run.info.lifecycle_stage == "deleted" and not run.data.metrics
