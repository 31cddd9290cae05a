"""What the k8s backend relies on, on the real one-node cluster of k8s/dev-cluster/: the Job
controller's podFailurePolicy and Indexed completions, pulls by digest from the local registry
(and the error a wrong digest gives), volumes and env as stage pods use them, Services by DNS
name, and RBAC refusing a ServiceAccount what its Role does not grant."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import pytest

from tests.k8s.dev_cluster import (
    START_TIMEOUT_S,
    DevCluster,
    bind_artifact_volume,
    wait_for,
)

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 600)  # the first test may wait for a cold build


def _condition(job: dict, kind: str) -> dict | None:
    return next((c for c in job.get("status", {}).get("conditions", [])
                 if c["type"] == kind and c["status"] == "True"), None)


def _finished(cluster: DevCluster, job: str, namespace: str, timeout_s: float = 90) -> dict:
    return wait_for(lambda: (lambda j: j if _condition(j, "Complete") or _condition(j, "Failed") else None)(
        cluster.get("job", job, namespace)), timeout_s, f"Job {job} to finish")


def _pods(cluster: DevCluster, namespace: str, selector: str) -> list[dict]:
    return json.loads(cluster.kubectl("-n", namespace, "get", "pods", "-l", selector, "-o", "json").stdout)["items"]


def test_an_init_container_exit_code_fails_the_job_through_pod_failure_policy(k8s_cluster, k8s_namespace):
    k8s_cluster.apply(f"""
apiVersion: batch/v1
kind: Job
metadata: {{name: gated, namespace: {k8s_namespace}}}
spec:
  backoffLimit: 6   # without the policy, the Job would retry six times
  podFailurePolicy:
    rules:
      - action: FailJob
        onExitCodes: {{containerName: wait-upstream, operator: In, values: [42]}}
  template:
    spec:
      restartPolicy: Never
      initContainers:
        - {{name: wait-upstream, image: "{k8s_cluster.busybox}", command: [sh, -c, "echo upstream failed; exit 42"]}}
      containers:
        - {{name: stage, image: "{k8s_cluster.busybox}", command: [sh, -c, "echo must not run"]}}
""")
    job = _finished(k8s_cluster, "gated", k8s_namespace)
    failed = _condition(job, "Failed")
    assert failed is not None and failed["reason"] == "PodFailurePolicy"
    assert "wait-upstream" in failed["message"] and "42" in failed["message"]
    assert job["status"]["failed"] == 1  # FailJob at once: no retry
    [pod] = _pods(k8s_cluster, k8s_namespace, "job-name=gated")
    [init] = pod["status"]["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 42
    [stage] = pod["status"]["containerStatuses"]
    assert "terminated" not in stage["state"] and "running" not in stage["state"]
    assert k8s_cluster.logs(pod["metadata"]["name"], k8s_namespace, "wait-upstream") == "upstream failed\n"


def test_an_indexed_job_runs_each_index_once(k8s_cluster, k8s_namespace):
    k8s_cluster.apply(f"""
apiVersion: batch/v1
kind: Job
metadata: {{name: ranks, namespace: {k8s_namespace}}}
spec:
  completions: 3
  parallelism: 3
  completionMode: Indexed
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      subdomain: ranks
      containers:
        - name: rank
          image: "{k8s_cluster.busybox}"
          command: [sh, -c, 'echo "rank $JOB_COMPLETION_INDEX of $(hostname)"']
""")
    job = _finished(k8s_cluster, "ranks", k8s_namespace)
    assert _condition(job, "Complete") is not None
    assert job["status"]["succeeded"] == 3 and job["status"]["completedIndexes"] == "0-2"
    pods = _pods(k8s_cluster, k8s_namespace, "job-name=ranks")
    logs = sorted(k8s_cluster.logs(p["metadata"]["name"], k8s_namespace) for p in pods)
    assert logs == [f"rank {i} of ranks-{i}\n" for i in range(3)]  # Indexed pods' hostnames


def test_a_pod_pulls_its_image_by_digest_from_the_local_registry(k8s_cluster, k8s_namespace):
    repository, digest = k8s_cluster.busybox.split("@")
    assert repository == f"{k8s_cluster.registry}/faster-qat/busybox"
    k8s_cluster.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: pinned, namespace: {k8s_namespace}}}
spec:
  restartPolicy: Never
  containers: [{{name: main, image: "{k8s_cluster.busybox}", imagePullPolicy: Always, command: [echo, pulled]}}]
""")
    pod = wait_for(lambda: (lambda p: p if p["status"].get("phase") == "Succeeded" else None)(
        k8s_cluster.get("pod", "pinned", k8s_namespace)), 60, "pod pinned to succeed")
    [status] = pod["status"]["containerStatuses"]
    assert status["imageID"] == f"{repository}@{digest}"
    assert status["state"]["terminated"]["exitCode"] == 0
    assert k8s_cluster.logs("pinned", k8s_namespace) == "pulled\n"


def test_a_wrong_digest_is_a_pull_error_the_api_reports(k8s_cluster, k8s_namespace):
    missing = f"{k8s_cluster.registry}/faster-qat/busybox@sha256:{'0' * 64}"
    k8s_cluster.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: unpullable, namespace: {k8s_namespace}}}
spec:
  restartPolicy: Never
  containers: [{{name: main, image: "{missing}", command: [echo, never]}}]
""")

    def waiting() -> dict | None:
        statuses = k8s_cluster.get("pod", "unpullable", k8s_namespace)["status"].get("containerStatuses", [])
        state = statuses[0]["state"].get("waiting", {}) if statuses else {}
        return state if state.get("reason") in ("ErrImagePull", "ImagePullBackOff") else None

    state = wait_for(waiting, 60, "a pull error on pod unpullable")
    if state["reason"] == "ImagePullBackOff":  # the message of the pull itself is in the event
        events = json.loads(k8s_cluster.kubectl("-n", k8s_namespace, "get", "events", "-o", "json",
                                                "--field-selector=involvedObject.name=unpullable").stdout)["items"]
        state = {"message": " ".join(e["message"] for e in events if e["reason"] == "Failed")}
    assert f"{'0' * 64}" in state["message"] and "not found" in state["message"]
    assert k8s_cluster.get("pod", "unpullable", k8s_namespace)["status"]["phase"] == "Pending"


def test_stage_pod_volumes_and_env_work_as_rendered(k8s_cluster, k8s_namespace, tmp_path):
    """A PVC bound to a hostPath PV (the artifact root), a ConfigMap (the specs), an emptyDir in
    memory (/dev/shm), env from fieldRef and secretKeyRef, as k8s_render writes them."""
    root = tmp_path / "artifacts"
    root.mkdir(mode=0o777)
    root.chmod(0o777)  # the pod runs as uid 1000: hostPath volumes are not chowned to fsGroup
    volume = bind_artifact_volume(k8s_cluster, k8s_namespace, root)
    k8s_cluster.apply(f"""
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: faster-qat-artifacts, namespace: {k8s_namespace}}}
spec:
  accessModes: [ReadWriteMany]
  resources: {{requests: {{storage: 1Ti}}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: specs, namespace: {k8s_namespace}}}
data: {{stage.json: '{{"stage": "probe"}}'}}
---
apiVersion: v1
kind: Secret
metadata: {{name: tokens, namespace: {k8s_namespace}}}
stringData: {{hf: secret-value}}
---
apiVersion: v1
kind: Pod
metadata: {{name: stage, namespace: {k8s_namespace}}}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext: {{runAsNonRoot: true, runAsUser: 1000, runAsGroup: 1000, fsGroup: 1000,
                     seccompProfile: {{type: RuntimeDefault}}}}
  containers:
    - name: stage
      image: "{k8s_cluster.busybox}"
      command: [sh, -c, 'cat /specs/stage.json > /artifacts/out.txt && echo " $POD $HF_TOKEN $(id -u)" >> /artifacts/out.txt && df -P /dev/shm | tail -1 | grep -q tmpfs']
      env:
        - {{name: POD, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
        - {{name: HF_TOKEN, valueFrom: {{secretKeyRef: {{name: tokens, key: hf}}}}}}
      securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
      volumeMounts:
        - {{name: artifacts, mountPath: /artifacts}}
        - {{name: specs, mountPath: /specs, readOnly: true}}
        - {{name: shm, mountPath: /dev/shm}}
  volumes:
    - {{name: artifacts, persistentVolumeClaim: {{claimName: faster-qat-artifacts}}}}
    - {{name: specs, configMap: {{name: specs}}}}
    - {{name: shm, emptyDir: {{medium: Memory, sizeLimit: 64Mi}}}}
""")
    try:
        pod = wait_for(lambda: (lambda p: p if p["status"].get("phase") in ("Succeeded", "Failed") else None)(
            k8s_cluster.get("pod", "stage", k8s_namespace)), 60, "pod stage to finish")
        assert pod["status"]["phase"] == "Succeeded", pod["status"]
        assert (root / "out.txt").read_text() == '{"stage": "probe"} stage secret-value 1000\n'
        claim = k8s_cluster.get("pvc", "faster-qat-artifacts", k8s_namespace)
        assert claim["status"]["phase"] == "Bound" and claim["spec"]["volumeName"] == volume
    finally:
        k8s_cluster.kubectl("delete", "pv", volume, "--wait=false", check=False)


def test_a_pod_reaches_a_service_by_its_dns_name(k8s_cluster, k8s_namespace):
    """kube-proxy (iptables) routes the Service's cluster IP; CoreDNS answers its name."""
    k8s_cluster.apply(f"""
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {k8s_namespace}, labels: {{app: web}}}}
spec:
  containers:
    - name: web
      image: "{k8s_cluster.busybox}"
      command: [sh, -c, 'mkdir -p /tmp/w && echo served-by-web > /tmp/w/index.html && exec httpd -f -p 8080 -h /tmp/w']
      readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {k8s_namespace}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {k8s_namespace}}}
spec:
  restartPolicy: Never
  containers:
    - name: client
      image: "{k8s_cluster.busybox}"
      # busybox's static wget crashes resolving names; nc speaks the HTTP itself.
      command: [sh, -c, 'until nslookup web.{k8s_namespace}.svc.cluster.local >/dev/null; do sleep 1; done;
        until printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 3 web.{k8s_namespace}.svc.cluster.local 80 > /tmp/r 2>/dev/null
        && grep -q served-by-web /tmp/r; do sleep 1; done; tail -1 /tmp/r']
""")
    pod = wait_for(lambda: (lambda p: p if p["status"].get("phase") in ("Succeeded", "Failed") else None)(
        k8s_cluster.get("pod", "client", k8s_namespace)), 90, "pod client to finish")
    assert pod["status"]["phase"] == "Succeeded"
    assert k8s_cluster.logs("client", k8s_namespace) == "served-by-web\n"


def test_rbac_refuses_a_service_account_what_its_role_does_not_grant(k8s_cluster, k8s_namespace):
    k8s_cluster.apply(f"""
apiVersion: v1
kind: ServiceAccount
metadata: {{name: stage, namespace: {k8s_namespace}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: read-pods, namespace: {k8s_namespace}}}
rules: [{{apiGroups: [""], resources: [pods], verbs: [get, list]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: stage-reads-pods, namespace: {k8s_namespace}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-pods}}
subjects: [{{kind: ServiceAccount, name: stage, namespace: {k8s_namespace}}}]
""")
    token = k8s_cluster.kubectl("-n", k8s_namespace, "create", "token", "stage", "--duration=10m").stdout.strip()
    context = ssl.create_default_context(cafile=str(k8s_cluster.ca))

    def call(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(f"{k8s_cluster.server}{path}", method=method,
                                         data=json.dumps(body).encode() if body else None,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    status, pods = call("GET", f"/api/v1/namespaces/{k8s_namespace}/pods")
    assert status == 200 and pods["kind"] == "PodList"  # the token authenticates; the Role grants this
    status, refused = call("GET", f"/api/v1/namespaces/{k8s_namespace}/secrets")
    assert status == 403 and refused["reason"] == "Forbidden"
    assert refused["message"] == (f'secrets is forbidden: User "system:serviceaccount:{k8s_namespace}:stage" '
                                  f'cannot list resource "secrets" in API group "" in the namespace "{k8s_namespace}"')
    status, refused = call("POST", f"/apis/batch/v1/namespaces/{k8s_namespace}/jobs",
                           {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "escape"}})
    assert status == 403
    status, refused = call("GET", "/api/v1/namespaces/default/pods")  # a namespaced Role: nowhere else
    assert status == 403
