"""Kubernetes backend: the run as plain Jobs that order themselves through markers.

`render` writes the objects for `kubectl apply -f` (pure: the same config gives the same bytes;
the stage specs travel in a ConfigMap, the parent MLflow run is made by the first stage that
reports); `submit` applies the same objects with server-side apply and returns. `status`, `logs`
and `cancel` find the run's Jobs and Pods by the label `faster-qat/run=<run_id>`, in the
namespace recorded in run.json.

MLflow: pods report to `k8s.tracking_uri` (the in-cluster service of k8s/mlflow.yaml) and make
the experiment and parent run there themselves; `k8s.tracking_uri: null` runs without MLflow.

Attempts: a resubmitted run may still hold an upstream's `_FAILED` from the last attempt on the
volume; each submission carries an attempt token (see k8s_commands). `submit` makes a fresh one;
`render` writes `k8s.attempt` (default "1"): bump it to apply a run again after a failure.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from contract.files import write_atomic
from contract.spec import TrackingRef
from pipeline.backends.base import Backend, StageState, StageStatus
from pipeline.backends.k8s_api import ApiError, KubeApi
from pipeline.backends.k8s_render import (
    FINGERPRINT_ANNOTATION,
    RUN_LABEL,
    STAGE_CONTAINER,
    STAGE_LABEL,
    WAIT_CONTAINER,
    render_objects,
    to_yaml,
)
from pipeline.backends.k8s_settings import K8sSettings
from pipeline.errors import BackendError
from pipeline.layout import RunLayout
from pipeline.plan import RunPlan
from pipeline.prepare import PreparedRun
from pipeline.run_record import RunRecord

# Kinds a submission may find already there (shared by runs, or holding data): taken back on a
# refusal only when this submission created them.
KEPT_KINDS = ("Namespace", "PersistentVolumeClaim")
# Container waiting reasons that no retry fixes: a digest that is not in the registry, a bad name.
IMAGE_PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")


def new_attempt() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


class K8sBackend(Backend[K8sSettings]):
    name = "k8s"
    Settings = K8sSettings
    renderable = True
    writes_local_specs = False  # the specs travel in the run's ConfigMap

    def __init__(self, settings: K8sSettings, api: KubeApi | None = None, poll_s: float = 2.0) -> None:
        super().__init__(settings)
        self.api = api or KubeApi()
        self.poll_s = poll_s

    @property
    def k8s(self) -> K8sSettings:
        assert isinstance(self.settings, K8sSettings)
        return self.settings

    # ---- planning -----------------------------------------------------------------------------
    def stage_root(self, layout: RunLayout) -> Path:
        return Path(self.k8s.artifacts.mount_path)

    def tracking(self, config: Any, layout: RunLayout) -> TrackingRef | None:
        from pipeline.tracking import study_tracking

        if self.k8s.tracking_uri is None:
            return None
        return study_tracking(config, layout.root, layout.run_id, settle_s=1.0, uri=self.k8s.tracking_uri)

    def pulls_images(self) -> bool:
        return True

    # ---- render / submit ----------------------------------------------------------------------
    def objects(self, plan: RunPlan, names: list[str], attempt: str) -> list[dict[str, Any]]:
        specs = {name: plan.specs[name] for name in names}
        return render_objects(plan.graph, specs, plan.fingerprints, plan.image_refs, self.k8s, attempt)

    def render(self, plan: RunPlan, layout: RunLayout, output_dir: Path) -> list[Path]:
        path = output_dir / f"{plan.run_id}.yaml"
        write_atomic(path, to_yaml(self.objects(plan, plan.names, self.k8s.attempt)))
        return [path]

    def submit(self, plan: RunPlan, layout: RunLayout, config_yaml: str | None) -> str:
        self.check_reachable()
        return super().submit(plan, layout, config_yaml)

    def check_reachable(self) -> None:
        """Credentials, the API server and the namespace, before anything is written or applied."""
        namespace = self.k8s.namespace
        try:
            found = self.api.get("v1", "Namespace", None, namespace)
        except ApiError as error:
            if error.status != 403:  # a submitter bound only in its namespace may not read Namespaces
                raise
            return
        if found is None and not self.k8s.create_namespace:
            raise BackendError(f"k8s: namespace {namespace} does not exist: create it (kubectl create namespace "
                               f"{namespace}), set k8s.namespace, or set k8s.create_namespace: true")

    def apply(self, prepared: PreparedRun, lock_fd: int) -> str:
        layout, namespace = prepared.layout, self.k8s.namespace
        objects = self.objects(prepared.plan, prepared.to_run, new_attempt())
        jobs = [obj for obj in objects if obj["kind"] == "Job"]
        existing = self._run_jobs(layout.run_id)
        if self._same_jobs_exist(existing, jobs):
            return (f"{layout.run_id}: its {len(jobs)} Job(s) of these fingerprints are already in namespace "
                    f"{namespace}; nothing changed (`python -m pipeline status {layout.run_id}`)")
        self._clear_finished_jobs(layout.run_id, existing)
        made: list[dict[str, Any]] = []  # what this submission created, to take back on a refusal
        try:
            for obj in objects:
                meta = obj["metadata"]
                existed = obj["kind"] in KEPT_KINDS and \
                    self.api.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"]) is not None
                self.api.apply(obj)
                if not existed:
                    made.append(obj)
        except BaseException:  # nothing stays half applied: a quota or admission refusal mid-way
            for obj in reversed(made):
                meta = obj["metadata"]
                self.api.delete(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
            raise
        layout.write_jobs({"backend": self.name, "namespace": namespace, "submitted_at": time.time(),
                           "stages": {o["metadata"]["labels"][STAGE_LABEL]: {"job_id": o["metadata"]["name"]}
                                      for o in jobs}})
        return (f"{len(jobs)} Job(s) in namespace {namespace} "
                f"(kubectl -n {namespace} get jobs -l {RUN_LABEL}={layout.run_id})")

    def _run_jobs(self, run_id: str) -> list[dict[str, Any]]:
        return self.api.list("batch/v1", "Job", self.k8s.namespace, f"{RUN_LABEL}={run_id}")

    def _same_jobs_exist(self, existing_jobs: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> bool:
        """The run's Jobs, of the same fingerprints, exist and none failed: a second submit is a no-op."""
        existing = {job["metadata"]["name"]: job for job in existing_jobs}
        for job in jobs:
            found = existing.get(job["metadata"]["name"])
            if found is None or _failed(found):
                return False
            ours = job["metadata"]["annotations"][FINGERPRINT_ANNOTATION]
            if found["metadata"].get("annotations", {}).get(FINGERPRINT_ANNOTATION) != ours:
                return False
        return bool(jobs)

    def _clear_finished_jobs(self, run_id: str, existing: list[dict[str, Any]]) -> None:
        """Jobs are immutable and a finished one never reruns: a resubmission deletes the run's
        finished Jobs first, and refuses while any still runs."""
        namespace = self.k8s.namespace
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

    # ---- status / logs / cancel -----------------------------------------------------------------
    def _namespace(self, layout: RunLayout) -> str:
        return layout.read_jobs().get("namespace") or self.k8s.namespace

    def live_states(self, layout: RunLayout, record: RunRecord) -> dict[str, StageStatus]:
        namespace = self._namespace(layout)
        selector = f"{RUN_LABEL}={layout.run_id}"
        jobs = {j["metadata"]["labels"].get(STAGE_LABEL): j
                for j in self.api.list("batch/v1", "Job", namespace, selector)}
        pods: dict[str, list[dict[str, Any]]] = {}
        for pod in self.api.list("v1", "Pod", namespace, selector):
            pods.setdefault(pod["metadata"]["labels"].get(STAGE_LABEL), []).append(pod)
        cancelled = set(layout.read_jobs().get("cancelled", []))
        found = {}
        for name, info in record.stages.items():
            job = jobs.get(name)
            state, note = job_state(job, pods.get(name, []))
            if job is None and name in cancelled:
                state, note = StageState.CANCELLED, "cancelled"
            status = (job or {}).get("status", {})
            found[name] = StageStatus(name, info.kind, state, note, (job or {}).get("metadata", {}).get("name", ""),
                                      _timestamp(status.get("startTime")), _timestamp(status.get("completionTime")))
        return found

    def logs(self, layout: RunLayout, record: RunRecord, stage: str) -> str:
        namespace = self._namespace(layout)
        pods = self.api.list("v1", "Pod", namespace, f"{RUN_LABEL}={layout.run_id},{STAGE_LABEL}={stage}")
        if not pods:
            return super().logs(layout, record, stage)
        pods.sort(key=lambda p: (p["metadata"].get("annotations", {}).get(
            "batch.kubernetes.io/job-completion-index", "0"), p["metadata"].get("creationTimestamp", "")))
        pod = pods[-1] if len(pods) > 1 and not _is_indexed(pods) else pods[0]
        started = any(c.get("name") == STAGE_CONTAINER and "waiting" not in c.get("state", {"waiting": 1})
                      for c in pod.get("status", {}).get("containerStatuses", []))
        container = STAGE_CONTAINER if started else WAIT_CONTAINER
        return self.api.pod_log(namespace, pod["metadata"]["name"], container)

    def cancel(self, layout: RunLayout, record: RunRecord) -> list[str]:
        namespace = self._namespace(layout)
        stopped = []
        for job in self.api.list("batch/v1", "Job", namespace, f"{RUN_LABEL}={layout.run_id}"):
            if not _finished(job):
                self.api.delete("batch/v1", "Job", namespace, job["metadata"]["name"])
                stopped.append(job["metadata"]["labels"].get(STAGE_LABEL, job["metadata"]["name"]))
        if stopped:  # `status` says cancelled, not "no Job", until the run is submitted again
            jobs = layout.read_jobs()
            layout.write_jobs({**jobs, "cancelled": sorted(set(jobs.get("cancelled", [])) | set(stopped))})
        return stopped


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
        said = _termination_message(pods)  # the stage's own one line, from its marker
        return StageState.FAILED, said or f"{failed.get('reason', '')}: {failed.get('message', '')}".strip(": ")
    if job.get("spec", {}).get("suspend"):
        return StageState.QUEUED, "suspended (waiting for queue admission)"
    for pod in pods:
        status = pod.get("status", {})
        for container in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
            waiting = container.get("state", {}).get("waiting", {})
            if waiting.get("reason") in IMAGE_PULL_FAILURES:
                return StageState.FAILED, (f"{waiting['reason']}: image {container.get('image', '')} cannot be "
                                           f"pulled: {waiting.get('message', '')}".strip(": ")[:400])
    for pod in pods:
        for container in pod.get("status", {}).get("containerStatuses", []):
            if container.get("name") == STAGE_CONTAINER and "running" in container.get("state", {}):
                return StageState.RUNNING, ""
    for pod in pods:
        for container in pod.get("status", {}).get("initContainerStatuses", []):
            if container.get("name") == WAIT_CONTAINER and "running" in container.get("state", {}):
                return StageState.PENDING, "waiting for upstream stages"
    return StageState.QUEUED, ""


def _termination_message(pods: list[dict[str, Any]]) -> str:
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True):
        for container in pod.get("status", {}).get("containerStatuses", []):
            message = container.get("state", {}).get("terminated", {}).get("message", "")
            if container.get("name") == STAGE_CONTAINER and message.strip():
                return message.strip().splitlines()[0]
    return ""


def _failed(job: dict[str, Any]) -> bool:
    return any(c.get("type") == "Failed" and c.get("status") == "True"
               for c in job.get("status", {}).get("conditions", []))


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
