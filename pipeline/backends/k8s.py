"""Kubernetes backend: the run as plain Jobs that order themselves through markers.

`render` writes the objects for `kubectl apply -f`; `submit` applies the same objects with
server-side apply and returns. `status`, `logs` and `cancel` find the run's Jobs and Pods by the
label `faster-qat/run=<run_id>`, in the namespace recorded in run.json.

MLflow: pods report to `k8s.tracking_uri` (the in-cluster service of k8s/mlflow.yaml). The
submitter creates the parent run through MLFLOW_TRACKING_URI / tracking.uri, which must reach the
same server (e.g. `kubectl -n faster-qat port-forward svc/mlflow 5000:5000`). A local store there
(the sqlite default) is refused with one line, before anything is applied; unreachable, the
submit stops with one line too. `k8s.tracking_uri: null` runs without MLflow.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.backends.base import Backend, StageState, StageStatus, failure_note, marker_states
from pipeline.backends.k8s_api import KubeApi
from pipeline.backends.k8s_render import (
    RUN_LABEL,
    STAGE_CONTAINER,
    STAGE_LABEL,
    WAIT_CONTAINER,
    render_objects,
    to_yaml,
)
from pipeline.backends.k8s_settings import K8sSettings
from pipeline.errors import BackendError, ConfigError
from pipeline.graph import Graph
from pipeline.layout import RunLayout
from pipeline.prepare import PreparedRun, prepare_run
from stages.contract import StageSpec, TrackingRef, write_atomic


def settings_from_snapshot(config_snapshot: dict[str, Any]) -> K8sSettings:
    return K8sSettings.model_validate(config_snapshot.get("k8s") or {})


def new_attempt() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def pod_tracking(ref: TrackingRef | None, settings: K8sSettings) -> TrackingRef | None:
    """The parent run as pods reach it: same ids, the in-cluster URI."""
    if settings.tracking_uri is None or ref is None:
        return None
    if not ref.tracking_uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(
            f"k8s: the parent MLflow run would live in {ref.tracking_uri}, which pods cannot reach: "
            "set MLFLOW_TRACKING_URI (or tracking.uri) to the cluster's MLflow, e.g. after "
            f"`kubectl -n {settings.namespace} port-forward svc/mlflow 5000:5000` use "
            "http://127.0.0.1:5000, or set k8s.tracking_uri: null to run without MLflow")
    return ref.model_copy(update={"tracking_uri": settings.tracking_uri})


def pod_specs(prepared: PreparedRun, settings: K8sSettings) -> dict[str, StageSpec]:
    """Specs as pods see them: paths under the volume's mount path, MLflow's in-cluster URI.
    The local spec.json records are rewritten to match."""
    mount = Path(settings.artifacts.mount_path)
    run_dir = mount / prepared.layout.run_id
    tracking = pod_tracking(prepared.tracking, settings)
    specs: dict[str, StageSpec] = {}
    for name, spec in prepared.specs.items():
        stage = prepared.graph[name]
        specs[name] = spec.model_copy(update={
            "output_dir": run_dir / name,
            "inputs": {role: run_dir / up for role, up in stage.upstream.items()},
            "tracking": tracking,
        })
        write_atomic(prepared.layout.spec_path(name), specs[name].model_dump_json(indent=2) + "\n")
    return specs


class K8sBackend(Backend):
    name = "k8s"

    def __init__(self, api: KubeApi | None = None, poll_s: float = 2.0) -> None:
        self.api = api or KubeApi()
        self.poll_s = poll_s

    # ---- render / submit --------------------------------------------------------------------
    def render(self, graph: Graph, layout: RunLayout, image_refs: dict[str, str], loaded: Any,
               output_dir: Path) -> list[Path]:
        objects = self.prepare_objects(graph, layout, image_refs, loaded.config)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / f"{layout.run_id}.yaml"
        write_atomic(path, to_yaml(objects))
        return [path]

    def prepare_objects(self, graph: Graph, layout: RunLayout, image_refs: dict[str, str],
                        config: Any, attempt: str | None = None) -> list[dict[str, Any]]:
        """Prepare the run (specs, parent run) and return its objects; nothing is applied."""
        from pipeline.tracking import open_parent_run, resolve_tracking_uri

        settings = config.k8s or K8sSettings()
        open_tracking = None
        if settings.tracking_uri is not None:
            uri = resolve_tracking_uri(layout.root, config.tracking.uri)
            pod_tracking(TrackingRef(tracking_uri=uri, experiment_id="0", parent_run_id="0"), settings)
            experiment = config.tracking.experiment or config.study
            open_tracking = lambda lay: open_parent_run(lay, uri, experiment)  # noqa: E731
        prepared = prepare_run(graph, layout, image_refs, self.name, open_tracking,
                               config.model_dump(mode="json"), Path(settings.artifacts.mount_path))
        return render_objects(graph, pod_specs(prepared, settings), prepared.fingerprints,
                              image_refs, settings, attempt or new_attempt())

    def submit(self, prepared: PreparedRun) -> str:
        layout = prepared.layout
        run = layout.read_run()
        settings = settings_from_snapshot(run.get("config", {}))
        image_refs = {stage.image: run["stages"][stage.name]["image"] for stage in prepared.graph}
        objects = render_objects(prepared.graph, pod_specs(prepared, settings), prepared.fingerprints,
                                 image_refs, settings, new_attempt())
        self._clear_finished_jobs(layout.run_id, settings.namespace)
        for obj in objects:
            self.api.apply(obj)
        jobs = [obj for obj in objects if obj["kind"] == "Job"]
        layout.write_jobs({"backend": self.name, "namespace": settings.namespace, "submitted_at": time.time(),
                           "stages": {o["metadata"]["labels"][STAGE_LABEL]: {"job_id": o["metadata"]["name"]}
                                      for o in jobs}})
        return (f"{len(jobs)} Job(s) in namespace {settings.namespace} "
                f"(kubectl -n {settings.namespace} get jobs -l {RUN_LABEL}={layout.run_id})")

    def _clear_finished_jobs(self, run_id: str, namespace: str) -> None:
        """Jobs are immutable and a finished one never reruns: a resubmission deletes the run's
        finished Jobs first, and refuses while any still runs."""
        existing = self.api.list("batch/v1", "Job", namespace, f"{RUN_LABEL}={run_id}")
        active = [job["metadata"]["name"] for job in existing if not _finished(job)]
        if active:
            raise BackendError(f"k8s: run {run_id} still has active Jobs ({', '.join(sorted(active))}): "
                               f"wait, or `python -m pipeline cancel {run_id}` first")
        for job in existing:
            self.api.delete("batch/v1", "Job", namespace, job["metadata"]["name"])
        deadline = time.time() + 120
        for job in existing:
            while self.api.get("batch/v1", "Job", namespace, job["metadata"]["name"]) is not None:
                if time.time() > deadline:
                    raise BackendError(f"k8s: old Job {job['metadata']['name']} is still being deleted; retry")
                time.sleep(self.poll_s)

    # ---- status / logs / cancel --------------------------------------------------------------
    def status(self, layout: RunLayout) -> list[StageStatus]:
        run = layout.read_run()
        namespace = self._namespace(layout, run)
        selector = f"{RUN_LABEL}={layout.run_id}"
        jobs = {j["metadata"]["labels"].get(STAGE_LABEL): j
                for j in self.api.list("batch/v1", "Job", namespace, selector)}
        pods: dict[str, list[dict[str, Any]]] = {}
        for pod in self.api.list("v1", "Pod", namespace, selector):
            pods.setdefault(pod["metadata"]["labels"].get(STAGE_LABEL), []).append(pod)
        markers = marker_states(layout, {n: info["fingerprint"] for n, info in run["stages"].items()})
        statuses = []
        for name, info in run["stages"].items():
            job = jobs.get(name)
            state, note = job_state(job, pods.get(name, []))
            if job is None and markers.get(name) is not None:
                state, note = markers[name], ""
            if state == StageState.FAILED and not note:
                note = failure_note(layout, name)
            status = (job or {}).get("status", {})
            statuses.append(StageStatus(name, info["kind"], state, note,
                                        (job or {}).get("metadata", {}).get("name", ""),
                                        _timestamp(status.get("startTime")),
                                        _timestamp(status.get("completionTime"))))
        return statuses

    def logs(self, layout: RunLayout, stage: str) -> str:
        namespace = self._namespace(layout, layout.read_run())
        pods = self.api.list("v1", "Pod", namespace, f"{RUN_LABEL}={layout.run_id},{STAGE_LABEL}={stage}")
        if not pods:
            return super().logs(layout, stage)
        pods.sort(key=lambda p: (p["metadata"].get("annotations", {}).get(
            "batch.kubernetes.io/job-completion-index", "0"), p["metadata"].get("creationTimestamp", "")))
        pod = pods[-1] if len(pods) > 1 and not _is_indexed(pods) else pods[0]
        started = any(c.get("name") == STAGE_CONTAINER and "waiting" not in c.get("state", {"waiting": 1})
                      for c in pod.get("status", {}).get("containerStatuses", []))
        container = STAGE_CONTAINER if started else WAIT_CONTAINER
        return self.api.pod_log(namespace, pod["metadata"]["name"], container)

    def cancel(self, layout: RunLayout) -> list[str]:
        namespace = self._namespace(layout, layout.read_run())
        stopped = []
        for job in self.api.list("batch/v1", "Job", namespace, f"{RUN_LABEL}={layout.run_id}"):
            if not _finished(job):
                self.api.delete("batch/v1", "Job", namespace, job["metadata"]["name"])
                stopped.append(job["metadata"]["labels"].get(STAGE_LABEL, job["metadata"]["name"]))
        return stopped

    def _namespace(self, layout: RunLayout, run: dict[str, Any]) -> str:
        return layout.read_jobs().get("namespace") or settings_from_snapshot(run.get("config", {})).namespace


def job_state(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> tuple[StageState, str]:
    """A stage's state from its Job and pods."""
    if job is None:
        return StageState.PENDING, "no Job (not submitted, or deleted after ttlSecondsAfterFinished)"
    conditions = {c["type"]: c for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"}
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        return StageState.SUCCEEDED, ""
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed:
        if failed.get("reason") == "PodFailurePolicy":
            return StageState.BLOCKED, "an upstream stage failed"
        return StageState.FAILED, f"{failed.get('reason', '')}: {failed.get('message', '')}".strip(": ")
    if job.get("spec", {}).get("suspend"):
        return StageState.QUEUED, "suspended (waiting for queue admission)"
    for pod in pods:
        for container in pod.get("status", {}).get("containerStatuses", []):
            if container.get("name") == STAGE_CONTAINER and "running" in container.get("state", {}):
                return StageState.RUNNING, ""
    for pod in pods:
        for container in pod.get("status", {}).get("initContainerStatuses", []):
            if container.get("name") == WAIT_CONTAINER and "running" in container.get("state", {}):
                return StageState.PENDING, "waiting for upstream stages"
    return StageState.QUEUED, ""


def _finished(job: dict[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in job.get("status", {}).get("conditions", []))


def _is_indexed(pods: list[dict[str, Any]]) -> bool:
    return any("batch.kubernetes.io/job-completion-index" in p["metadata"].get("annotations", {}) for p in pods)


def _timestamp(value: str | None) -> float | None:
    if not value:
        return None
    import calendar

    return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))
