"""The k8s backend against the real one-node cluster (k8s/dev-cluster/): its objects go through
the real API server's server-side apply, admission, quota and RBAC; its Jobs run in the real
stage images pulled by digest from the local registry, order themselves through the markers on
the artifact volume, and `status`, `logs`, `cancel` read the real API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from contract.markers import read_marker
from contract.spec import TrackingRef
from pipeline.backends.base import StageState
from pipeline.backends.k8s import K8sBackend
from pipeline.backends.k8s_render import RUN_LABEL
from pipeline.backends.k8s_settings import K8sSettings
from pipeline.cli import main
from pipeline.errors import BackendError
from pipeline.layout import RunLayout
from pipeline.plan import RunPlan, plan_graph
from pipeline.run_record import read_record
from tests.k8s.dev_cluster import (
    REPO,
    START_TIMEOUT_S,
    DevCluster,
    bind_artifact_volume,
    wait_for,
)
from tests.pipeline.probe_dag import RUN_ID, fan_out_graph
from tests.smoke import TRIMMED_OUT, assert_same_losses, smoke_slice

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 1800)  # the first test may build the cluster and the image
MOUNT = "/artifacts"
PROBE_STAGES = ["source", "a", "b", "c", "d", "join"]


@pytest.fixture
def artifact_root(k8s_cluster: DevCluster, k8s_namespace: str, tmp_path) -> Path:
    """The artifact PVC's storage: a hostPath PV pre-bound to the claim the backend renders."""
    root = tmp_path / "pvc"
    root.mkdir()
    root.chmod(0o777)  # stage pods run as uid 1000; hostPath volumes are not chowned to fsGroup
    volume = bind_artifact_volume(k8s_cluster, k8s_namespace, root)
    yield root
    k8s_cluster.kubectl("delete", "pv", volume, "--wait=false", check=False)


@pytest.fixture
def kubeconfig(k8s_cluster: DevCluster, monkeypatch) -> Path:
    """The admin kubeconfig, where the k8s backend looks for it."""
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    return k8s_cluster.kubeconfig


def probe_plan(image: str, fail: str | None = None, sleep_s: float = 0.0,
               tracking: TrackingRef | None = None) -> RunPlan:
    return plan_graph(fan_out_graph(sleep_s=sleep_s, fail=fail), RUN_ID, Path(MOUNT), {"cpu": image}, tracking, "k8s")


# The node has 2 CPUs and a pod waiting for its upstreams holds its request: stages ask for a
# tenth of a CPU, so the run's six pods fit at once whatever order the scheduler takes them in.
CPU_REQUEST = "100m"


def k8s_backend(namespace: str, **settings) -> K8sBackend:
    return K8sBackend(K8sSettings(namespace=namespace, poll_seconds=1, cpu_request=CPU_REQUEST,
                                  **{"tracking_uri": None, **settings}))


def finished_states(layout: RunLayout, timeout_s: float) -> dict[str, tuple[StageState, str]]:
    """`status`, as the CLI reads it (the backend of run.json), until every stage has finished."""
    record = read_record(layout)
    backend = K8sBackend.for_record(record)

    def done():
        statuses = backend.status(layout, record)
        if all(s.state.finished for s in statuses):
            return {s.name: (s.state, s.note) for s in statuses}
        return None

    return wait_for(done, timeout_s, "every stage to finish", every_s=2)


def run_objects(cluster: DevCluster, namespace: str) -> dict[str, list[str]]:
    """Names of what the run left in its namespace, by kind."""
    found = {}
    for kind in ("jobs", "configmaps", "persistentvolumeclaims", "services"):
        listed = cluster.kubectl("-n", namespace, "get", kind, "-l", f"{RUN_LABEL}={RUN_ID}", "-o", "json").stdout
        found[kind] = sorted(item["metadata"]["name"] for item in json.loads(listed)["items"])
    return found


def test_a_probe_dag_runs_in_dag_order_and_a_second_submit_changes_nothing(
        k8s_cluster, k8s_namespace, cluster_cpu_image, artifact_root, kubeconfig, tmp_path):
    started = time.time()
    layout = RunLayout(tmp_path / "submitter", RUN_ID)
    plan = probe_plan(cluster_cpu_image)
    line = k8s_backend(k8s_namespace).submit(plan, layout, None)
    assert line.startswith(f"{RUN_ID}: submitted 6 stage(s): 6 Job(s) in namespace {k8s_namespace}")

    states = finished_states(layout, 600)
    assert states == dict.fromkeys(PROBE_STAGES, (StageState.SUCCEEDED, ""))
    run_dir = artifact_root / RUN_ID
    assert (run_dir / "join" / "output.txt").read_text() == "sourceasourcebsourcecsourcedjoin"
    finished = {name: read_marker(run_dir / name).finished_at for name in states}
    assert all(finished[branch] > finished["source"] for branch in "abcd")
    assert finished["join"] > max(finished[branch] for branch in "abcd") > started

    backend = K8sBackend.for_record(read_record(layout))
    log = backend.logs(layout, read_record(layout), "join")  # the stage container's log, through the API
    assert "stages.probe --spec /artifacts/probe/join/spec.json" in log
    image_id = k8s_cluster.kubectl("-n", k8s_namespace, "get", "pods", "-l", "faster-qat/stage=join", "-o",
                                   "jsonpath={.items[0].status.containerStatuses[0].imageID}").stdout
    repository, digest = cluster_cpu_image.split(":dev@")
    assert image_id == f"{repository}@{digest}"  # what ran is the locked digest
    job = json.loads(k8s_cluster.kubectl("-n", k8s_namespace, "get", "job", f"{RUN_ID}-join", "-o", "json",
                                         "--show-managed-fields").stdout)
    managers = {(entry["manager"], entry["operation"]) for entry in job["metadata"]["managedFields"]}
    assert ("faster-qat", "Apply") in managers  # server-side apply, under our field manager

    uids = {name: k8s_cluster.get("job", f"{RUN_ID}-{name}", k8s_namespace)["metadata"]["uid"]
            for name in PROBE_STAGES}
    again = k8s_backend(k8s_namespace).submit(plan, layout, None)
    assert "nothing changed" in again
    assert {name: k8s_cluster.get("job", f"{RUN_ID}-{name}", k8s_namespace)["metadata"]["uid"]
            for name in PROBE_STAGES} == uids
    assert len(run_objects(k8s_cluster, k8s_namespace)["jobs"]) == 6


def test_a_failed_stage_stops_its_dependents_through_pod_failure_policy(
        k8s_cluster, k8s_namespace, cluster_cpu_image, artifact_root, kubeconfig, tmp_path, capsys):
    submitter = tmp_path / "submitter"
    layout = RunLayout(submitter, RUN_ID)
    k8s_backend(k8s_namespace).submit(probe_plan(cluster_cpu_image, fail="source"), layout, None)
    states = finished_states(layout, 600)  # the dependents read as blocked as soon as source failed
    assert states["source"] == (StageState.FAILED, "source: RuntimeError: probe asked to fail")  # its own line

    def failure_reasons():
        jobs = json.loads(k8s_cluster.kubectl("-n", k8s_namespace, "get", "jobs", "-o", "json").stdout)["items"]
        reasons = {job["metadata"]["name"].removeprefix(f"{RUN_ID}-"): c["reason"] for job in jobs
                   for c in job.get("status", {}).get("conditions", []) if c["type"] == "Failed"}
        return reasons if len(reasons) == len(PROBE_STAGES) else None

    reasons = wait_for(failure_reasons, 120, "every Job to fail")
    assert reasons.pop("source") == "BackoffLimitExceeded"
    assert reasons == dict.fromkeys(["a", "b", "c", "d", "join"], "PodFailurePolicy")  # FailJob: no retry
    states = finished_states(layout, 10)
    for name in ("a", "b", "c", "d", "join"):
        assert states[name] == (StageState.BLOCKED, "an upstream stage failed"), name
        marker = read_marker(artifact_root / RUN_ID / name)
        assert marker.exit_code == 42 and "upstream" in marker.error

    capsys.readouterr()
    assert main(["status", RUN_ID, "--root", str(submitter)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"source\s.*failed", table) and re.search(r"join\s.*blocked", table)


def test_cancel_deletes_the_running_jobs(k8s_cluster, k8s_namespace, cluster_cpu_image, artifact_root,
                                         kubeconfig, tmp_path, capsys):
    submitter = tmp_path / "submitter"
    layout = RunLayout(submitter, RUN_ID)
    k8s_backend(k8s_namespace).submit(probe_plan(cluster_cpu_image, sleep_s=600), layout, None)
    record = read_record(layout)
    backend = K8sBackend.for_record(record)
    wait_for(lambda: {s.name: s.state for s in backend.status(layout, record)}["source"] == StageState.RUNNING,
             300, "the source stage to run")

    capsys.readouterr()
    assert main(["cancel", RUN_ID, "--root", str(submitter)]) == 0
    said = capsys.readouterr().out.strip()
    assert said.startswith(f"{RUN_ID}: cancelled ") and set(said.split(": cancelled ")[1].split(", ")) == set(PROBE_STAGES)
    wait_for(lambda: not run_objects(k8s_cluster, k8s_namespace)["jobs"], 120, "the Jobs to go")
    assert finished_states(layout, 10) == dict.fromkeys(PROBE_STAGES, (StageState.CANCELLED, "cancelled"))
    assert read_marker(artifact_root / RUN_ID / "source") is None


def test_an_image_that_cannot_be_pulled_fails_the_stage_with_the_registry_s_reason(
        k8s_cluster, k8s_namespace, cluster_cpu_image, artifact_root, kubeconfig, tmp_path):
    repository = cluster_cpu_image.split("@")[0]
    wrong = f"{repository}@sha256:{'0' * 64}"
    layout = RunLayout(tmp_path / "submitter", RUN_ID)
    k8s_backend(k8s_namespace).submit(probe_plan(wrong), layout, None)
    states = finished_states(layout, 300)
    state, note = states["source"]
    assert state == StageState.FAILED
    assert re.match(r"(ErrImagePull|ImagePullBackOff): image .*@sha256:0{64} cannot be pulled", note), note


# ---- bad input: one line, a non-zero exit, nothing applied, nothing written -----------------------


def unreachable(cluster: DevCluster, tmp_path: Path) -> Path:
    text = cluster.kubeconfig.read_text()
    path = tmp_path / "unreachable.kubeconfig"
    path.write_text(text.replace(cluster.server, "https://127.0.0.1:9"))  # nothing listens on port 9
    return path


def refused(cluster: DevCluster, tmp_path: Path) -> Path:
    """A kubeconfig whose user the API server does not know: a token it never issued."""
    config = json.loads(cluster.kubectl("config", "view", "--raw", "-o", "json").stdout)
    config["users"] = [{"name": "stranger", "user": {"token": "not-a-token-this-cluster-issued"}}]
    for context in config["contexts"]:
        context["context"]["user"] = "stranger"
    path = tmp_path / "refused.kubeconfig"
    path.write_text(json.dumps(config))
    return path


BAD_KUBECONFIGS = {
    "missing": (lambda cluster, tmp: tmp / "no-such.kubeconfig", r"k8s: no cluster credentials: .*"),
    "unreachable": (unreachable, r"k8s: GET /api/v1/namespaces/\S+: .*(Connection refused|MaxRetryError).*"),
    "refused": (refused, r"k8s: GET /api/v1/namespaces/\S+: 401: Unauthorized"),
}


@pytest.mark.parametrize("case", sorted(BAD_KUBECONFIGS))
def test_a_kubeconfig_that_is_missing_unreachable_or_refused_is_one_line(k8s_cluster, k8s_namespace,
                                                                        cluster_cpu_image, tmp_path, monkeypatch,
                                                                        case):
    make, expected = BAD_KUBECONFIGS[case]
    monkeypatch.setenv("KUBECONFIG", str(make(k8s_cluster, tmp_path)))
    layout = RunLayout(tmp_path / "submitter", RUN_ID)
    with pytest.raises(BackendError) as refusal:
        k8s_backend(k8s_namespace).submit(probe_plan(cluster_cpu_image), layout, None)
    message = str(refusal.value)
    assert "\n" not in message and re.fullmatch(expected, message), message
    assert not layout.run_file.exists()
    assert run_objects(k8s_cluster, k8s_namespace) == {"jobs": [], "configmaps": [], "persistentvolumeclaims": [],
                                                       "services": []}


def test_a_namespace_that_does_not_exist_is_one_line_from_the_cli(k8s_cluster, kubeconfig, tmp_path, capsys):
    submitter = tmp_path / "submitter"
    code = main(["submit", "--cluster", "k8s", "-c", "smoke", "--root", str(submitter),
                 "--set", "k8s.namespace=no-such-namespace", "--set", "k8s.tracking_uri=null",
                 "--set", f"k8s.host_mounts=[{REPO / 'fixtures'}]"])
    error = capsys.readouterr().err.strip()
    assert code == 1
    assert error == ("error: k8s: namespace no-such-namespace does not exist: create it (kubectl create namespace "
                     "no-such-namespace), set k8s.namespace, or set k8s.create_namespace: true")
    assert not (submitter / "smoke" / "run.json").exists()


def test_a_quota_refusal_mid_way_takes_back_what_the_submission_made(k8s_cluster, k8s_namespace,
                                                                    cluster_cpu_image, kubeconfig, tmp_path):
    """The namespace admits 3 Jobs: the 4th of the probe's 6 is refused by the ResourceQuota
    admission; the claim, the specs ConfigMap and the first 3 Jobs are deleted again."""
    k8s_cluster.apply(f"""
apiVersion: v1
kind: ResourceQuota
metadata: {{name: three-jobs, namespace: {k8s_namespace}}}
spec: {{hard: {{count/jobs.batch: "3"}}}}
""")
    wait_for(lambda: k8s_cluster.get("resourcequota", "three-jobs", k8s_namespace).get("status", {}).get("hard"),
             30, "the quota controller to count the namespace")
    layout = RunLayout(tmp_path / "submitter", RUN_ID)
    with pytest.raises(BackendError) as refusal:
        k8s_backend(k8s_namespace).submit(probe_plan(cluster_cpu_image), layout, None)
    message = str(refusal.value)
    assert "\n" not in message and "403" in message and "exceeded quota: three-jobs" in message, message
    assert not layout.run_file.exists()

    def all_gone():
        return run_objects(k8s_cluster, k8s_namespace) == {
            "jobs": [], "configmaps": [], "persistentvolumeclaims": [], "services": []}
    wait_for(all_gone, 60, "the refused submission's objects to be deleted")


# ---- RBAC: the submitter's Role is enough; the stage pods' identity can do nothing ----------------


def token_kubeconfig(cluster: DevCluster, namespace: str, account: str, path: Path) -> Path:
    token = cluster.kubectl("-n", namespace, "create", "token", account, "--duration=1h").stdout.strip()
    config = json.loads(cluster.kubectl("config", "view", "--raw", "-o", "json").stdout)
    config["users"] = [{"name": account, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = account
        context["context"]["namespace"] = namespace
    path.write_text(json.dumps(config))
    return path


def test_the_submitter_role_can_run_a_study_and_the_stage_pods_identity_is_refused(
        k8s_cluster, k8s_namespace, cluster_cpu_image, artifact_root, tmp_path, monkeypatch):
    rbac = (REPO / "k8s" / "rbac.yaml").read_text().replace("namespace: faster-qat", f"namespace: {k8s_namespace}")
    k8s_cluster.kubectl("apply", "--server-side", "-f", "-", input_text=rbac)
    submitter_config = token_kubeconfig(k8s_cluster, k8s_namespace, "faster-qat-submitter",
                                        tmp_path / "submitter.kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(submitter_config))
    layout = RunLayout(tmp_path / "submitter", RUN_ID)
    k8s_backend(k8s_namespace).submit(probe_plan(cluster_cpu_image), layout, None)  # Namespace read: 403, skipped
    assert set(finished_states(layout, 600).values()) == {(StageState.SUCCEEDED, "")}

    # Stage pods run as the namespace's default ServiceAccount, without its token mounted: even
    # with that token in hand, the API refuses what a stage could try.
    stage_config = token_kubeconfig(k8s_cluster, k8s_namespace, "default", tmp_path / "stage.kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(stage_config))
    pod_layout = RunLayout(tmp_path / "pod", RUN_ID)
    with pytest.raises(BackendError) as refusal:
        k8s_backend(k8s_namespace).submit(probe_plan(cluster_cpu_image), pod_layout, None)
    assert re.fullmatch(rf'k8s: GET /\S+: 403: \S+ is forbidden: User "system:serviceaccount:{k8s_namespace}:default" '
                        r'cannot (get|list) resource .*',
                        str(refusal.value)), str(refusal.value)
    assert not pod_layout.run_file.exists()
    pod = k8s_cluster.get("pod", k8s_cluster.kubectl("-n", k8s_namespace, "get", "pods", "-l",
                                                     "faster-qat/stage=join", "-o", "name").stdout.strip()
                          .removeprefix("pod/"), k8s_namespace)
    assert pod["spec"]["automountServiceAccountToken"] is False


# ---- MLflow: the stages' runs reach the in-cluster server of k8s/ ---------------------------------


@pytest.fixture(scope="module")
def cluster_mlflow(k8s_cluster: DevCluster, cluster_cpu_image: str, tmp_path_factory):
    """k8s/ applied as a user applies it (`kubectl apply -k`), through an overlay that only swaps
    MLflow's image for the cpu image (it holds mlflow; ghcr.io is not reachable) and lowers its
    CPU request (the node has 2 CPUs and every stage pod asks 1); its PVC bound to a hostPath PV.
    Yields the submitter's URI: `kubectl port-forward svc/mlflow`, as k8s/README.md says."""
    work = tmp_path_factory.mktemp("mlflow")
    base, overlay, data = work / "base", work / "dev", work / "data"
    for folder in (base, overlay, data):
        folder.mkdir()
    data.chmod(0o777)  # the server runs as uid 1000
    for manifest in (REPO / "k8s").glob("*.yaml"):
        (base / manifest.name).write_text(manifest.read_text())
    repository, digest = cluster_cpu_image.split(":dev@")[0], cluster_cpu_image.split("@")[1]
    (overlay / "kustomization.yaml").write_text(f"""apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../base]
images: [{{name: ghcr.io/mlflow/mlflow, newName: {repository}, digest: {digest}}}]
patches:
  - target: {{kind: Deployment, name: mlflow}}
    patch: '[{{"op": "replace", "path": "/spec/template/spec/containers/0/resources/requests/cpu", "value": "250m"}}]'
""")
    k8s_cluster.kubectl("delete", "namespace", "faster-qat", "--ignore-not-found", "--wait=true", "--timeout=120s")
    k8s_cluster.kubectl("delete", "pv", "mlflow-data-dev", "--ignore-not-found")
    k8s_cluster.apply(f"""
apiVersion: v1
kind: PersistentVolume
metadata: {{name: mlflow-data-dev}}
spec:
  capacity: {{storage: 50Gi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {{path: {data}, type: Directory}}
  claimRef: {{namespace: faster-qat, name: mlflow-data}}
""")
    k8s_cluster.kubectl("apply", "--server-side", "-k", str(overlay))
    k8s_cluster.kubectl("-n", "faster-qat", "rollout", "status", "deployment/mlflow", "--timeout=300s")
    forward = subprocess.Popen([str(k8s_cluster.bin_dir / "kubectl"), f"--kubeconfig={k8s_cluster.kubeconfig}",
                                "-n", "faster-qat", "port-forward", "svc/mlflow", ":5000"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = forward.stdout.readline()  # "Forwarding from 127.0.0.1:NNNNN -> 5000"
    match = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 5000", first)
    assert match, first
    try:
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        forward.terminate()
        forward.wait(timeout=10)
        k8s_cluster.kubectl("delete", "namespace", "faster-qat", "--wait=false", check=False)
        k8s_cluster.kubectl("delete", "pv", "mlflow-data-dev", "--wait=false", check=False)


def test_the_stages_make_the_parent_run_and_their_own_in_the_in_cluster_mlflow(
        k8s_cluster, k8s_namespace, cluster_cpu_image, cluster_mlflow, artifact_root, kubeconfig, tmp_path):
    """Pods reach MLflow at http://mlflow.faster-qat.svc.cluster.local:5000 (CoreDNS + kube-proxy),
    the default of k8s.tracking_uri; the first stage makes the experiment and the parent run."""
    from mlflow.tracking import MlflowClient

    in_cluster = K8sSettings().tracking_uri
    tracking = TrackingRef(tracking_uri=in_cluster, experiment=f"probe-{k8s_namespace}", run_key=RUN_ID, settle_s=1.0)
    layout = RunLayout(tmp_path / "submitter", RUN_ID)
    k8s_backend(k8s_namespace, tracking_uri=in_cluster).submit(probe_plan(cluster_cpu_image, tracking=tracking),
                                                               layout, None)
    states = finished_states(layout, 600)
    assert set(states.values()) == {(StageState.SUCCEEDED, "")}

    client = MlflowClient(tracking_uri=cluster_mlflow)  # the same server, through the port-forward
    experiment = client.get_experiment_by_name(f"probe-{k8s_namespace}")
    parents = client.search_runs([experiment.experiment_id], f"tags.`faster_qat.run_key` = '{RUN_ID}'")
    assert len(parents) == 1  # six stages raced to make it; one won
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(run.data.tags.get("stage") for run in runs) == sorted(states)
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.tags.get("image") for run in runs} == {cluster_cpu_image}


# ---- the smoke study on the cluster, through `submit` and through `kubectl apply` ----------------

SMOKE_ON_CLUSTER = os.environ.get("FASTER_QAT_SLOW_TESTS") or os.environ.get("FASTER_QAT_K8S_SMOKE")


def smoke_overrides(namespace: str, cpu_image: str, train_image: str) -> list[str]:
    """The profile's model, data and task files are on this machine: pods see them through a
    read-only hostPath at the same path (k8s.host_mounts), as a shared filesystem would give."""

    overrides = [f"images.refs.cpu={cpu_image}", f"images.refs.train={train_image}", f"k8s.namespace={namespace}",
                 f"k8s.host_mounts=[{REPO / 'fixtures'}]", "k8s.tracking_uri=null", "k8s.poll_seconds=2",
                 f"k8s.cpu_request={CPU_REQUEST}"]
    return [*(arg for override in overrides for arg in ("--set", override)), *smoke_slice(TRIMMED_OUT)[0]]


@pytest.mark.skipif(not SMOKE_ON_CLUSTER, reason="needs the 6 GB train image (~15 min to build and push cold): "
                    "FASTER_QAT_K8S_SMOKE=1 (or FASTER_QAT_SLOW_TESTS=1 for all 28 stages)")
def test_the_smoke_study_completes_through_submit(k8s_cluster, k8s_namespace, cluster_cpu_image, cluster_train_image,
                                                 artifact_root, kubeconfig, tmp_path, smoke_root):
    submitter = tmp_path / "submitter"
    assert main(["submit", "--cluster", "k8s", "-c", "smoke", "--root", str(submitter),
                 *smoke_overrides(k8s_namespace, cluster_cpu_image, cluster_train_image)]) == 0
    states = finished_states(RunLayout(submitter, "smoke"), 1800)
    assert len(states) == smoke_slice(TRIMMED_OUT)[1]
    assert set(states.values()) == {(StageState.SUCCEEDED, "")}, states
    assert_same_losses(artifact_root, smoke_root)


@pytest.mark.skipif(not SMOKE_ON_CLUSTER, reason="needs the 6 GB train image (~15 min to build and push cold): "
                    "FASTER_QAT_K8S_SMOKE=1 (or FASTER_QAT_SLOW_TESTS=1 for all 28 stages)")
def test_the_smoke_study_completes_through_kubectl_apply_of_render(k8s_cluster, k8s_namespace, cluster_cpu_image,
                                                                  cluster_train_image, artifact_root, tmp_path,
                                                                  smoke_root):
    out = tmp_path / "rendered"
    assert main(["render", "--cluster", "k8s", "-c", "smoke", "-o", str(out),
                 *smoke_overrides(k8s_namespace, cluster_cpu_image, cluster_train_image)]) == 0
    k8s_cluster.kubectl("apply", "--server-side", "-f", str(out / "smoke.yaml"))

    def jobs_finished():
        jobs = json.loads(k8s_cluster.kubectl("-n", k8s_namespace, "get", "jobs", "-l", f"{RUN_LABEL}=smoke",
                                              "-o", "json").stdout)["items"]
        conditions = {job["metadata"]["name"]: {c["type"] for c in job.get("status", {}).get("conditions", [])
                                                if c["status"] == "True"} for job in jobs}
        return conditions if all({"Complete", "Failed"} & found for found in conditions.values()) else None

    conditions = wait_for(jobs_finished, 1800, "every Job to finish", every_s=3)
    assert len(conditions) == smoke_slice(TRIMMED_OUT)[1]
    assert all("Complete" in found for found in conditions.values()), conditions
    assert_same_losses(artifact_root, smoke_root)


def test_submit_from_the_cli_makes_no_mlflow_store_and_cancel_stops_it(k8s_cluster, k8s_namespace, artifact_root,
                                                                       kubeconfig, tmp_path, capsys):
    """The parent MLflow run is made where the study runs: submitting needs no MLflow, even with a
    sqlite tracking.uri, and the specs name the in-cluster server (k8s.tracking_uri's default)."""
    submitter = tmp_path / "runs"
    assert main(["submit", "--cluster", "k8s", "-c", "smoke", "--root", str(submitter),
                 "--set", f"tracking.uri=sqlite:///{tmp_path / 'x.db'}", "--set", f"k8s.namespace={k8s_namespace}",
                 "--set", f"k8s.host_mounts=[{REPO / 'fixtures'}]", "--set", f"k8s.cpu_request={CPU_REQUEST}"]) == 0
    assert not (tmp_path / "x.db").exists() and not list(submitter.rglob("mlflow.db"))
    configmap = k8s_cluster.get("configmap", "smoke-specs", k8s_namespace)
    spec = json.loads(configmap["data"]["train-bf16.json"])
    assert spec["tracking"]["tracking_uri"] == "http://mlflow.faster-qat.svc.cluster.local:5000"

    capsys.readouterr()
    assert main(["cancel", "smoke", "--root", str(submitter)]) == 0
    assert capsys.readouterr().out.startswith("smoke: cancelled ")
    wait_for(lambda: not json.loads(k8s_cluster.kubectl("-n", k8s_namespace, "get", "jobs", "-o", "json").stdout)
             ["items"], 120, "the smoke Jobs to be deleted")
