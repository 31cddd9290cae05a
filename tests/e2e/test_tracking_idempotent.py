"""The parent run and a stage's run are made where the study runs, found or made by key: a create
whose response is lost and retried, or two pods of one stage attempt racing, leave one run. Against
a real `mlflow server`, behind a proxy that can drop a response."""

from __future__ import annotations

import http.client
import multiprocessing
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.tracking import MlflowClient

from contract.spec import TrackingRef
from contract.tracking import (
    STAGE_KEY_TAG,
    experiment_id_of,
    get_or_create_run,
    parent_run_id_of,
)


class DroppingProxy:
    """Forwards every request to the server; for the first `drop` calls to runs/create it lets
    the server make the run, then closes the connection without answering (a lost response)."""

    def __init__(self, upstream_port: int, drop: int) -> None:
        self.creates_seen = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None: ...

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                payload = answer.read()
                if self.command == "POST" and self.path.endswith("/runs/create"):
                    proxy.creates_seen += 1
                    if proxy.creates_seen <= drop:
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


def active_runs_with(client: MlflowClient, ref: TrackingRef, tag: str, key: str) -> list:
    experiment = experiment_id_of(client, ref)
    return client.search_runs([experiment], filter_string=f"tags.`{tag}` = '{key}'")


@pytest.mark.parametrize("retries", ["0", "3"])
def test_a_lost_create_response_then_a_retry_leaves_one_parent_run(mlflow_server, monkeypatch, retries):
    """With MLflow's own HTTP retries (3) the server sees two creates; without (0) the call fails
    and the key finds the run: either way one run, and the same one is found again later."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    mlflow_server.start()
    proxy = DroppingProxy(mlflow_server.port, drop=1)
    ref = TrackingRef(tracking_uri=proxy.uri, experiment="idempotent", run_key="run-1", settle_s=0.2)
    client = MlflowClient(tracking_uri=proxy.uri)
    parent = parent_run_id_of(client, ref)
    assert proxy.creates_seen >= 1
    direct = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = direct.search_runs([experiment_id_of(direct, ref)], filter_string="tags.`faster_qat.run_key` = 'run-1'")
    assert [run.info.run_id for run in runs] == [parent]
    assert parent_run_id_of(direct, ref) == parent


def _race(uri: str, barrier, results) -> None:
    client = MlflowClient(tracking_uri=uri)
    ref = TrackingRef(tracking_uri=uri, experiment="racing", run_key="run-1", settle_s=1.0)
    experiment = experiment_id_of(client, ref)
    barrier.wait()
    results.put(get_or_create_run(client, experiment, STAGE_KEY_TAG, "run-1/train/attempt-a", "train",
                                  {"stage": "train"}, ref.settle_s))


def test_two_pods_of_one_stage_attempt_racing_leave_one_run(mlflow_server):
    mlflow_server.start()
    ref = TrackingRef(tracking_uri=mlflow_server.uri, experiment="racing", run_key="run-1")
    experiment_id_of(MlflowClient(tracking_uri=mlflow_server.uri), ref)  # both see the experiment
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    racers = [context.Process(target=_race, args=(mlflow_server.uri, barrier, results)) for _ in range(2)]
    for racer in racers:
        racer.start()
    chosen = {results.get(timeout=120) for _ in racers}
    for racer in racers:
        racer.join(timeout=60)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    survivors = active_runs_with(client, ref, STAGE_KEY_TAG, "run-1/train/attempt-a")
    assert len(chosen) == 1 and [run.info.run_id for run in survivors] == list(chosen)
