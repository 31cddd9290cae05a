"""`submit --cluster k8s` against an HTTP-level fake of the API server (127.0.0.1, in-process)
that records every request and answers like the API server for the calls the backend makes."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from pipeline.backends.base import StageState
from pipeline.backends.k8s import K8sBackend
from pipeline.cli import _watch, main
from pipeline.layout import RunLayout
from pipeline.run_record import read_record


class FakeApiServer:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.objects: dict[str, dict] = {}  # path -> object
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None: ...

            def _answer(self, code: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _record(self) -> tuple[str, dict, dict | None]:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = yaml.safe_load(raw) if raw else None
                fake.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                      "content_type": self.headers.get("Content-Type"), "body": body})
                return url.path, parse_qs(url.query), body

            def do_PATCH(self) -> None:
                path, _, body = self._record()
                created = path not in fake.objects
                fake.objects[path] = {**body, "status": fake.objects.get(path, {}).get("status", {})}
                self._answer(201 if created else 200, fake.objects[path])

            def do_GET(self) -> None:
                path, query, _ = self._record()
                if path.endswith("/log"):
                    text = f"log of {path.split('/')[-2]} container {query['container'][0]}\n".encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                if path in fake.objects:
                    return self._answer(200, fake.objects[path])
                selector = dict(part.split("=") for part in query.get("labelSelector", [""])[0].split(",") if part)
                if path.endswith(("/jobs", "/pods")):
                    items = [o for p, o in fake.objects.items() if p.startswith(path + "/")
                             and selector.items() <= o["metadata"].get("labels", {}).items()]
                    return self._answer(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items})
                self._answer(404, {"kind": "Status", "status": "Failure", "message": f"{path} not found",
                                   "code": 404})

            def do_DELETE(self) -> None:
                path, _, _ = self._record()
                fake.objects.pop(path, None)
                self._answer(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "t0ken"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}))
        return path


@pytest.fixture
def api(tmp_path, monkeypatch):
    fake = FakeApiServer()
    monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def submit(tmp_path: Path, *extra: str) -> int:
    return main(["submit", "--cluster", "k8s", "-c", "smoke", "--root", str(tmp_path / "runs"),
                 "--set", "k8s.tracking_uri=null", "--set", "k8s.namespace=study", *extra])


def test_submit_server_side_applies_every_object_and_records_the_jobs(tmp_path, api):
    assert submit(tmp_path) == 0
    first = api.requests[0]
    applies = [r for r in api.requests if r["method"] != "GET"]
    assert (first["method"], first["path"]) == ("GET", "/apis/batch/v1/namespaces/study/jobs")
    assert first["query"]["labelSelector"] == ["faster-qat/run=smoke"]
    assert {r["method"] for r in applies} == {"PATCH"}
    assert {r["content_type"] for r in applies} == {"application/apply-patch+yaml"}
    assert all(r["query"] == {"fieldManager": ["faster-qat"], "force": ["true"]} for r in applies)
    paths = [r["path"] for r in applies]
    assert paths[:2] == ["/api/v1/namespaces/study/persistentvolumeclaims/faster-qat-artifacts",
                         "/api/v1/namespaces/study/configmaps/smoke-specs"]
    assert "/apis/batch/v1/namespaces/study/jobs/smoke-train-fp8" in paths
    assert len(paths) == 2 + 28
    job = next(r["body"] for r in applies if r["path"].endswith("/jobs/smoke-report"))
    assert job["kind"] == "Job" and job["metadata"]["labels"]["faster-qat/stage"] == "report"
    spec = json.loads(next(r["body"] for r in applies if r["path"].endswith("/smoke-specs"))["data"]["report.json"])
    assert spec["output_dir"] == "/artifacts/smoke/report" and spec["tracking"] is None
    jobs = RunLayout(tmp_path / "runs", "smoke").read_jobs()
    assert jobs["namespace"] == "study" and jobs["stages"]["report"]["job_id"] == "smoke-report"


def test_status_and_cancel_read_jobs_by_run_label(tmp_path, api):
    assert submit(tmp_path) == 0
    base = "/apis/batch/v1/namespaces/study/jobs/"
    api.objects[base + "smoke-preprocess"]["status"] = {
        "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:01:00Z",
        "conditions": [{"type": "Complete", "status": "True"}]}
    api.objects[base + "smoke-report"]["status"] = {
        "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}
    api.objects["/api/v1/namespaces/study/pods/smoke-eval-base-x"] = {
        "metadata": {"name": "smoke-eval-base-x", "labels": {"faster-qat/run": "smoke", "faster-qat/stage": "eval-base"}},
        "status": {"initContainerStatuses": [{"name": "wait-upstream", "state": {"running": {}}}]}}
    layout = RunLayout(tmp_path / "runs", "smoke")
    record = read_record(layout)
    backend = K8sBackend.for_record(record)
    states = {s.name: s for s in backend.status(layout, record)}
    assert states["preprocess"].state == StageState.SUCCEEDED
    assert states["preprocess"].finished_at - states["preprocess"].started_at == 60
    assert (states["report"].state, states["report"].note) == (StageState.BLOCKED, "an upstream stage failed")
    assert (states["eval-base"].state, states["eval-base"].note) == (StageState.PENDING, "waiting for upstream stages")
    api.requests.clear()
    stopped = backend.cancel(layout, record)
    assert "preprocess" not in stopped and "report" not in stopped and len(stopped) == 26
    deletes = [r for r in api.requests if r["method"] == "DELETE"]
    assert len(deletes) == 26 and deletes[0]["body"]["propagationPolicy"] == "Background"


def test_a_second_submit_changes_nothing_and_a_resubmission_replaces_failed_jobs(tmp_path, api, capsys):
    assert submit(tmp_path) == 0
    api.requests.clear()
    assert submit(tmp_path) == 0  # the same Jobs (fingerprints) exist: nothing is applied
    assert "nothing changed" in capsys.readouterr().out
    assert {r["method"] for r in api.requests} == {"GET"}
    api.objects["/apis/batch/v1/namespaces/study/jobs/smoke-report"]["status"] = {
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    assert submit(tmp_path) == 1  # one failed, the others still run: refused, nothing changed
    assert "still has active Jobs" in capsys.readouterr().err
    for path, obj in api.objects.items():
        if "/jobs/" in path:
            obj["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    api.requests.clear()
    assert submit(tmp_path) == 0
    methods = [r["method"] for r in api.requests]
    assert methods.count("DELETE") == 28 and methods.index("PATCH") > max(
        i for i, m in enumerate(methods) if m == "DELETE")


def test_submit_makes_no_mlflow_run_and_no_local_store(tmp_path, api):
    """The parent run is made where the study runs (by the first stage): submitting needs no
    MLflow, even with a sqlite tracking.uri, and writes no mlflow.db."""
    code = main(["submit", "--cluster", "k8s", "-c", "smoke", "--root", str(tmp_path / "runs"),
                 "--set", "tracking.uri=sqlite:///" + str(tmp_path / "x.db"), "--set", "k8s.namespace=study"])
    assert code == 0
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "runs" / "mlflow.db").exists()
    spec = json.loads(api.objects["/api/v1/namespaces/study/configmaps/smoke-specs"]["data"]["train-bf16.json"])
    assert spec["tracking"]["tracking_uri"] == "http://mlflow.faster-qat.svc.cluster.local:5000"


def test_logs_come_from_the_stage_container_once_it_started(tmp_path, api):
    assert submit(tmp_path) == 0
    layout = RunLayout(tmp_path / "runs", "smoke")
    record = read_record(layout)
    backend = K8sBackend.for_record(record)
    api.objects["/api/v1/namespaces/study/pods/smoke-train-fp8-abc"] = {
        "metadata": {"name": "smoke-train-fp8-abc", "labels": {"faster-qat/run": "smoke", "faster-qat/stage": "train-fp8"}},
        "status": {"containerStatuses": [{"name": "stage", "state": {"running": {}}}]}}
    assert backend.logs(layout, record, "train-fp8") == "log of smoke-train-fp8-abc container stage\n"
    assert backend.logs(layout, record, "report").startswith("(no log yet at ")  # no pod yet


def test_watch_shows_states_until_every_stage_finished(tmp_path, api, capsys):
    assert submit(tmp_path) == 0
    layout = RunLayout(tmp_path / "runs", "smoke")

    def finish_all() -> None:
        time.sleep(0.5)
        for path, obj in list(api.objects.items()):
            if "/jobs/" in path:
                obj["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}

    threading.Thread(target=finish_all).start()
    assert _watch(K8sBackend.for_record(read_record(layout)), layout, interval_s=0.1) == 0
    out = capsys.readouterr().out
    assert "smoke: all 28 stages succeeded" in out
    assert "queued" in out and "succeeded" in out  # the transitions, one line each (not a TTY)
