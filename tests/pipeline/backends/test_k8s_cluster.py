"""The k8s backend against the real one-node cluster (k8s/dev-cluster/): its rendered objects are
accepted by the real API server through its own server-side apply, its Jobs run in the real
`cpu` image pulled by digest from the local registry, order themselves through the markers on a
PVC, and `status`/`logs` read the real API."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.backends.base import StageState
from pipeline.backends.k8s import K8sBackend
from pipeline.backends.k8s_api import KubeApi
from pipeline.layout import RunLayout
from pipeline.prepare import prepare_run
from stages.contract import read_marker
from tests.k8s.dev_cluster import REPO, START_TIMEOUT_S, DevCluster, wait_for
from tests.pipeline.probe_dag import fan_out_graph

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 1800)  # the first test may build the cluster and the image
MOUNT = "/artifacts"


@pytest.fixture
def artifact_root(k8s_cluster: DevCluster, k8s_namespace: str, tmp_path):
    """The artifact PVC's storage: a hostPath PV pre-bound to the claim the backend renders."""
    root = tmp_path / "pvc"
    root.mkdir()
    root.chmod(0o777)  # stage pods run as uid 1000; hostPath volumes are not chowned to fsGroup
    volume = f"artifacts-{k8s_namespace}"
    k8s_cluster.apply(f"""
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {volume}}}
spec:
  capacity: {{storage: 2Ti}}
  accessModes: [ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {{path: {root}, type: Directory}}
  claimRef: {{namespace: {k8s_namespace}, name: faster-qat-artifacts}}
""")
    yield root
    k8s_cluster.kubectl("delete", "pv", volume, "--wait=false", check=False)


def submit_probe(cluster: DevCluster, namespace: str, image: str, submitter: Path, monkeypatch,
                 fail: str | None = None) -> tuple[K8sBackend, RunLayout]:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    graph = fan_out_graph(fail=fail)
    layout = RunLayout(submitter, "probe")
    settings = {"namespace": namespace, "tracking_uri": None, "poll_seconds": 1}
    prepared = prepare_run(graph, layout, {"cpu": image}, "k8s", None, {"k8s": settings}, Path(MOUNT))
    backend = K8sBackend(api=KubeApi())
    backend.submit(prepared)
    return backend, layout


def finished_states(backend: K8sBackend, layout: RunLayout, timeout_s: float) -> dict[str, tuple[StageState, str]]:
    def done():
        statuses = backend.status(layout)
        if all(s.state in (StageState.SUCCEEDED, StageState.FAILED, StageState.BLOCKED) for s in statuses):
            return {s.name: (s.state, s.note) for s in statuses}
        return None

    return wait_for(done, timeout_s, "every stage to finish", every_s=2)


def test_a_probe_dag_runs_on_the_cluster_in_dag_order(k8s_cluster, k8s_namespace, cluster_cpu_image,
                                                     artifact_root, tmp_path, monkeypatch):
    started = time.time()
    backend, layout = submit_probe(k8s_cluster, k8s_namespace, cluster_cpu_image, tmp_path / "submitter",
                                   monkeypatch)
    states = finished_states(backend, layout, 600)
    assert states == dict.fromkeys(["source", "a", "b", "c", "d", "join"], (StageState.SUCCEEDED, ""))
    run_dir = artifact_root / "probe"
    assert (run_dir / "join" / "output.txt").read_text() == "sourceasourcebsourcecsourcedjoin"
    finished = {name: read_marker(run_dir / name).finished_at for name in states}
    assert all(finished[branch] > finished["source"] for branch in "abcd")
    assert finished["join"] > max(finished[branch] for branch in "abcd") > started
    log = backend.logs(layout, "join")  # the stage container's log, through the API
    assert "stages.probe --spec /artifacts/probe/join/spec.json" in log
    pod = k8s_cluster.kubectl("-n", k8s_namespace, "get", "pods", "-l", "faster-qat/stage=join", "-o",
                              "jsonpath={.items[0].status.containerStatuses[0].imageID}").stdout
    assert pod == cluster_cpu_image.split(":dev@")[0] + "@" + cluster_cpu_image.split("@")[1]


def test_a_failed_stage_stops_its_dependents_through_pod_failure_policy(k8s_cluster, k8s_namespace,
                                                                        cluster_cpu_image, artifact_root,
                                                                        tmp_path, monkeypatch):
    backend, layout = submit_probe(k8s_cluster, k8s_namespace, cluster_cpu_image, tmp_path / "submitter",
                                   monkeypatch, fail="source")
    states = finished_states(backend, layout, 600)
    assert states["source"][0] == StageState.FAILED
    assert states["source"][1].startswith("BackoffLimitExceeded")
    for name in ("a", "b", "c", "d", "join"):
        assert states[name] == (StageState.BLOCKED, "an upstream stage failed"), name
        marker = read_marker(artifact_root / "probe" / name)
        assert marker.exit_code == 42 and "upstream" in marker.error
    assert read_marker(artifact_root / "probe" / "source").error == "source: RuntimeError: probe asked to fail"


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


def test_stages_report_to_the_in_cluster_mlflow_through_its_service(k8s_cluster, k8s_namespace, cluster_cpu_image,
                                                                   cluster_mlflow, artifact_root, tmp_path,
                                                                   monkeypatch):
    """Pods reach MLflow at http://mlflow.faster-qat.svc.cluster.local:5000 (CoreDNS + kube-proxy);
    the submitter made the parent run through the port-forward to the same server."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import open_parent_run

    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    graph = fan_out_graph()
    layout = RunLayout(tmp_path / "submitter", "probe")
    settings = {"namespace": k8s_namespace, "poll_seconds": 1}  # tracking_uri: the in-cluster default
    prepared = prepare_run(graph, layout, {"cpu": cluster_cpu_image}, "k8s",
                           lambda lay: open_parent_run(lay, cluster_mlflow, "probe-on-k8s"), {"k8s": settings},
                           Path(MOUNT))
    backend = K8sBackend(api=KubeApi())
    backend.submit(prepared)
    states = finished_states(backend, layout, 600)
    assert set(states.values()) == {(StageState.SUCCEEDED, "")}
    client = MlflowClient(tracking_uri=cluster_mlflow)
    runs = client.search_runs([prepared.tracking.experiment_id],
                              f"tags.mlflow.parentRunId = '{prepared.tracking.parent_run_id}'")
    assert sorted(run.data.tags.get("stage") for run in runs) == sorted(states)
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.tags.get("image") for run in runs} == {cluster_cpu_image}


@pytest.mark.skipif(not os.environ.get("FASTER_QAT_SLOW_TESTS"),
                    reason="the train image is 6 GB (~15 min to build and push cold): FASTER_QAT_SLOW_TESTS=1")
def test_the_smoke_study_completes_on_the_cluster(k8s_cluster, k8s_namespace, cluster_cpu_image,
                                                 cluster_train_image, artifact_root, tmp_path, smoke_root,
                                                 monkeypatch):
    """`python -m pipeline submit --cluster k8s -c smoke`: all 28 stages in their images, pulled
    by digest, to Complete, with the local run's numbers.

    The profile's model, data and task files are paths on the submitter's disk, which pods do not
    have: the study runs from a copy of them on the artifact volume, and the volume is mounted in
    the pods at its path on this machine (k8s.artifacts.mount_path), as a shared filesystem is."""
    from pipeline.cli import main
    from tests.smoke import SMOKE_STAGES, report_rows

    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    fixtures = artifact_root / "fixtures"
    for name in ("models", "openscience", "mmlu_tiny", "recipes"):
        shutil.copytree(REPO / "fixtures" / name, fixtures / name)
    profile = (REPO / "pipeline" / "profiles" / "smoke.yaml").read_text()
    config = tmp_path / "smoke-on-k8s.yaml"
    config.write_text(profile.replace("../../fixtures", str(fixtures)))
    submitter = tmp_path / "submitter"
    assert main(["submit", "--cluster", "k8s", "-c", str(config), "--root", str(submitter),
                 "--set", f"images.refs.cpu={cluster_cpu_image}", "--set", f"images.refs.train={cluster_train_image}",
                 "--set", f"k8s.namespace={k8s_namespace}", "--set", f"k8s.artifacts.mount_path={artifact_root}",
                 "--set", "k8s.tracking_uri=null", "--set", "k8s.poll_seconds=2"]) == 0
    states = finished_states(K8sBackend(api=KubeApi()), RunLayout(submitter, "smoke"), 1800)
    assert len(states) == SMOKE_STAGES
    assert set(states.values()) == {(StageState.SUCCEEDED, "")}, states
    on_cluster, local = report_rows(artifact_root), report_rows(smoke_root)
    assert set(on_cluster) == set(local)
    for key, row in on_cluster.items():  # seeded, deterministic on CPU
        assert float(row["val_loss"]) == pytest.approx(float(local[key]["val_loss"]), rel=1e-9), key
