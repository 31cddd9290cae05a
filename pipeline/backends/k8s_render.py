"""Kubernetes objects of one run, as plain dicts: one `batch/v1` Job per stage plus what the run
needs (Namespace, artifact PVC, a ConfigMap of stage specs, headless Services for multi-node).

Order without a controller: every pod first runs `wait-upstream` (see k8s_commands), which
exits UPSTREAM_FAILED_EXIT when an upstream failed; the Job's podFailurePolicy turns that exit
into FailJob at once, and the waiter's `_FAILED` marker stops the stages after it in turn.
"""

from __future__ import annotations

from typing import Any

import yaml

from contract.markers import UPSTREAM_FAILED_EXIT
from contract.spec import StageSpec, is_dns1123_label
from pipeline.backends.k8s_commands import (
    ATTEMPT_ENV,
    SPECS_MOUNT,
    Upstream,
    main_script,
    spec_key,
    stage_command,
    wait_script,
)
from pipeline.backends.k8s_settings import K8sSettings
from pipeline.errors import ConfigError
from pipeline.graph import Graph, Stage
from pipeline.resources import Resources

APP = "faster-qat"
MANAGER = "faster-qat-pipeline"
RUN_LABEL = "faster-qat/run"
STAGE_LABEL = "faster-qat/stage"
FINGERPRINT_ANNOTATION = "faster-qat/fingerprint"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
WAIT_CONTAINER = "wait-upstream"
STAGE_CONTAINER = "stage"
CONFIGMAP_LIMIT = 1024 * 1024


def job_name(run_id: str, stage: str) -> str:
    return f"{run_id}-{stage}"


def specs_configmap_name(run_id: str) -> str:
    return f"{run_id}-specs"


def run_labels(run_id: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/instance": run_id,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": APP,
        "app.kubernetes.io/managed-by": MANAGER,
        RUN_LABEL: run_id,
    }


def render_objects(
    graph: Graph,
    specs: dict[str, StageSpec],
    fingerprints: dict[str, str],
    image_refs: dict[str, str],
    settings: K8sSettings,
    attempt: str,
) -> list[dict[str, Any]]:
    """Every object the run needs, in the order to apply them; ConfigError on bad input."""
    if not specs:
        return []
    run_id = next(iter(specs.values())).run_id
    check_names(graph, list(specs), run_id)
    check_local_inputs(specs, settings)
    objects: list[dict[str, Any]] = []
    if settings.create_namespace:
        objects.append({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": settings.namespace,
                                     "labels": {"app.kubernetes.io/part-of": APP, **settings.labels}}})
    if settings.artifacts.create:
        objects.append(_claim(run_id, settings))
    objects.append(_specs_configmap(run_id, specs, settings))
    deadlines = deadlines_s(graph, settings.queue_slack_min)
    for name, spec in specs.items():
        stage = graph[name]
        if stage.resources.nodes > 1:
            objects.append(_headless_service(run_id, stage, settings))
    for name, spec in specs.items():
        objects.append(_job(graph[name], spec, fingerprints, image_refs, settings, attempt, deadlines[name]))
    return objects


def check_names(graph: Graph, stages: list[str], run_id: str) -> None:
    if not is_dns1123_label(run_id):
        raise ConfigError(f"run id '{run_id}' must be a DNS-1123 label (lowercase letters, digits, '-')")
    for name in stages:
        job = job_name(run_id, name)
        nodes = graph[name].resources.nodes
        longest = job if nodes == 1 else f"{job}-{nodes - 1}"  # pod hostnames of an Indexed Job
        if len(longest) > 63:
            raise ConfigError(
                f"k8s: Job name '{longest}' is {len(longest)} characters (at most 63): "
                f"shorten the run id '{run_id}' (--run-id) or the stage name '{name}'"
            )
        if nodes > 1 and not job[0].isalpha():
            raise ConfigError(f"k8s: multi-node stage '{name}' needs a Service named '{job}', which "
                              "must start with a letter: choose a run id that starts with one")


def check_local_inputs(specs: dict[str, StageSpec], settings: K8sSettings) -> None:
    """Pods see the artifact volume and the host mounts, not the submitter's disk: a stage reading
    a local path elsewhere would fail on the cluster, so it is refused here, in one line."""
    seen = [settings.artifacts.mount_path, *settings.host_mounts]
    for name, spec in specs.items():
        for found in spec.params.external_inputs():
            inside = any(found.location == root or found.location.startswith(root + "/") for root in seen)
            if found.is_local and not inside:
                raise ConfigError(
                    f"k8s: stage {name} reads params.{found.field} = {found.location} from this machine, which "
                    "pods cannot see: put it on a shared filesystem and list it in k8s.host_mounts, copy it "
                    "onto the artifact volume, or give a Hugging Face id")


def deadlines_s(graph: Graph, slack_min: int) -> dict[str, int]:
    """A Job starts when submitted but waits for its upstreams, so its deadline is its own limit
    plus the longest chain of upstream limits (each with queue slack)."""
    deadlines: dict[str, int] = {}
    for stage in graph:
        before = max((deadlines[up] for up in stage.dependencies), default=0)
        deadlines[stage.name] = before + (stage.resources.time_limit_min + slack_min) * 60
    return deadlines


def quantity_mi(gib: float, field: str) -> str:
    mebibytes = round(gib * 1024)
    if mebibytes < 1:
        raise ConfigError(f"{field}: {gib} GiB is below 1Mi, the smallest quantity a pod may ask for")
    return f"{mebibytes}Mi"


def _claim(run_id: str, settings: K8sSettings) -> dict[str, Any]:
    volume = settings.artifacts
    spec: dict[str, Any] = {"accessModes": [volume.access_mode],
                            "resources": {"requests": {"storage": volume.size}}}
    if volume.storage_class:
        spec["storageClassName"] = volume.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": volume.claim, "namespace": settings.namespace,
                         "labels": {"app.kubernetes.io/name": APP, "app.kubernetes.io/part-of": APP,
                                    "app.kubernetes.io/component": "artifacts",
                                    "app.kubernetes.io/managed-by": MANAGER, **settings.labels}},
            "spec": spec}


def _specs_configmap(run_id: str, specs: dict[str, StageSpec], settings: K8sSettings) -> dict[str, Any]:
    data = {spec_key(name): spec.model_dump_json(indent=2) + "\n" for name, spec in specs.items()}
    size = sum(len(key) + len(value.encode()) for key, value in data.items())
    if size > CONFIGMAP_LIMIT:
        raise ConfigError(f"k8s: the stage specs of run '{run_id}' take {size} bytes, more than a "
                          "ConfigMap holds (1 MiB): shorten params or split the study")
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": specs_configmap_name(run_id), "namespace": settings.namespace,
                         "labels": {**run_labels(run_id, "specs"), **settings.labels}},
            "data": data}


def _headless_service(run_id: str, stage: Stage, settings: K8sSettings) -> dict[str, Any]:
    name = job_name(run_id, stage.name)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": settings.namespace,
                         "labels": {**run_labels(run_id, stage.kind), STAGE_LABEL: stage.name,
                                    **settings.labels}},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {RUN_LABEL: run_id, STAGE_LABEL: stage.name},
                     "ports": [{"name": "rendezvous", "port": settings.master_port,
                                "targetPort": settings.master_port, "protocol": "TCP"}]}}


def _job(stage: Stage, spec: StageSpec, fingerprints: dict[str, str],
         image_refs: dict[str, str], settings: K8sSettings, attempt: str, deadline_s: int) -> dict[str, Any]:
    run_id = spec.run_id
    name = job_name(run_id, stage.name)
    res = stage.resources
    labels = {**run_labels(run_id, stage.kind), STAGE_LABEL: stage.name, **settings.labels}
    job_labels = {**labels, **({QUEUE_LABEL: settings.queue_name} if settings.queue_name else {})}
    mount = settings.artifacts.mount_path
    stage_dir = str(spec.output_dir)
    spec_path = f"{stage_dir}/spec.json"
    upstreams = [Upstream(up, graph_stage_dir(spec, up, mount), fingerprints[up])
                 for up in stage.dependencies]
    image = image_refs[stage.image]
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"},
           {"name": "HF_HOME", "value": f"{mount}/.cache/huggingface"},
           {"name": ATTEMPT_ENV, "value": attempt}]
    if res.nodes > 1:
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
        env += [{"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},
                {"name": "MASTER_PORT", "value": str(settings.master_port)}]
    if res.gpus_per_node:
        env.append({"name": "NCCL_NVLS_ENABLE", "value": "0"})
    secret_env = [{"name": env_name, "valueFrom": {"secretKeyRef": {
        "name": ref.secret, "key": ref.key, **({"optional": True} if ref.optional else {})}}}
        for env_name, ref in sorted(settings.secrets.items())]
    mounts = [{"name": "artifacts", "mountPath": mount}, {"name": "specs", "mountPath": SPECS_MOUNT, "readOnly": True},
              *({"name": f"host-{index}", "mountPath": path, "readOnly": True}
                for index, path in enumerate(settings.host_mounts))]
    container_security = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    init_resources = {"cpu": settings.init_cpu, "memory": settings.init_memory}
    wait = {"name": WAIT_CONTAINER, "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", wait_script(stage.name, stage_dir, spec.fingerprint, upstreams, settings.poll_seconds)],
            "env": [e for e in env if e["name"] in (ATTEMPT_ENV, "JOB_COMPLETION_INDEX")],
            "resources": {"requests": init_resources, "limits": init_resources},
            "securityContext": container_security, "volumeMounts": mounts}
    command = stage_command(stage.kind, spec_path, res.nodes, res.processes_per_node, settings.master_port)
    main = {"name": STAGE_CONTAINER, "image": image, "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", main_script(stage_dir, command)],
            "env": env + secret_env,
            "resources": _resources(stage.kind, res, settings),
            "securityContext": container_security,
            "volumeMounts": mounts + [{"name": "shm", "mountPath": "/dev/shm"}]}
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": settings.run_as_user,
                            "runAsGroup": settings.run_as_group, "fsGroup": settings.fs_group,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [wait],
        "containers": [main],
        "volumes": [
            {"name": "artifacts", "persistentVolumeClaim": {"claimName": settings.artifacts.claim}},
            {"name": "specs", "configMap": {"name": specs_configmap_name(run_id)}},
            {"name": "shm", "emptyDir": {"medium": "Memory",
                                         "sizeLimit": quantity_mi(res.shm_gb, f"resources.{stage.kind}.shm_gb")}},
            *({"name": f"host-{index}", "hostPath": {"path": path, "type": "Directory"}}
              for index, path in enumerate(settings.host_mounts)),
        ],
    }
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if res.gpus_per_node:
        if settings.gpu_node_selector:
            pod["nodeSelector"] = dict(settings.gpu_node_selector)
        if settings.gpu_node_affinity:
            pod["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    r.model_dump(exclude_defaults=False, exclude={"values"} if not r.values else set())
                    for r in settings.gpu_node_affinity]}]}}}
        if settings.gpu_tolerations:
            pod["tolerations"] = [t.model_dump(exclude_none=True) for t in settings.gpu_tolerations]
    job_spec: dict[str, Any] = {
        "backoffLimit": settings.backoff_limit,
        "activeDeadlineSeconds": deadline_s,
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "completions": res.nodes,
        "parallelism": res.nodes,
        "completionMode": "Indexed" if res.nodes > 1 else "NonIndexed",
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": WAIT_CONTAINER, "operator": "In",
                                                  "values": [UPSTREAM_FAILED_EXIT]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if res.nodes > 1:
        pod["subdomain"] = name
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": settings.namespace, "labels": job_labels,
                         "annotations": {FINGERPRINT_ANNOTATION: spec.fingerprint}},
            "spec": job_spec}


def graph_stage_dir(spec: StageSpec, stage: str, mount: str) -> str:
    return f"{mount}/{spec.run_id}/{stage}"


def _resources(kind: str, res: Resources, settings: K8sSettings) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(res.cpus), "memory": quantity_mi(res.memory_gb, f"resources.{kind}.memory_gb")}
    if res.gpus_per_node:
        amounts[settings.gpu_resource] = str(res.gpus_per_node)
    requests = {**amounts, **({"cpu": settings.cpu_request} if settings.cpu_request else {})}
    return {"requests": requests, "limits": dict(amounts)}


class _Dumper(yaml.SafeDumper):
    """Readable YAML: scripts as literal blocks, no anchors for shared sub-objects."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=False)
