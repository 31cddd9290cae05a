"""The k8s backend against the real one-node cluster (k8s/dev-cluster/): its rendered objects are
accepted by the real API server through its own server-side apply, its Jobs run in the real
`cpu` image pulled by digest from the local registry, order themselves through the markers on a
PVC, and `status`/`logs` read the real API."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.backends.base import StageState
from pipeline.backends.k8s import K8sBackend
from pipeline.backends.k8s_api import KubeApi
from pipeline.layout import RunLayout
from pipeline.prepare import prepare_run
from stages.contract import read_marker
from tests.k8s.dev_cluster import START_TIMEOUT_S, DevCluster, wait_for
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
