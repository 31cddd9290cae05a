"""Kubernetes settings of a study (`k8s:` in the config): where the Jobs run and what they mount.

Only what the cluster needs beyond `resources` (which every backend shares) lives here. Values
that become Kubernetes fields are checked with Kubernetes' own rules (quantities, names), so a
bad value fails at `validate`/`render`, before anything is applied.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Kubernetes' resource.Quantity grammar (decimal/binary SI suffixes or an exponent).
QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[mkMGTPE]|([eE][-+]?\d+))?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")

# Environment variables a stage may take from a Secret; anything else is a typo.
SECRET_ENV = {
    "HF_TOKEN": "Hugging Face token (gated models, private datasets)",
    "MLFLOW_TRACKING_USERNAME": "MLflow basic-auth user",
    "MLFLOW_TRACKING_PASSWORD": "MLflow basic-auth password",
    "MLFLOW_TRACKING_TOKEN": "MLflow bearer token",
    "AWS_ACCESS_KEY_ID": "S3 artifact store key id (MLflow artifacts)",
    "AWS_SECRET_ACCESS_KEY": "S3 artifact store secret key",
}


def check_quantity(value: str) -> str:
    if not QUANTITY.match(value):
        raise ValueError(f"'{value}' is not a Kubernetes quantity (e.g. 500Gi, 250m, 2)")
    return value


def check_subdomain(value: str) -> str:
    if len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
        raise ValueError(f"'{value}' is not a DNS-1123 name (lowercase letters, digits, '-', '.')")
    return value


class SecretRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secret: str = Field(description="Name of the Secret in the run's namespace.")
    key: str = Field(description="Key inside the Secret.")
    optional: bool = Field(False, description="true: the pod starts even if the Secret is missing.")

    _secret = field_validator("secret")(classmethod(lambda cls, v: check_subdomain(v)))

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not SECRET_KEY.match(value) or len(value) > 253:
            raise ValueError(f"'{value}' is not a valid Secret key (letters, digits, '-', '_', '.')")
        return value


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="Taint key, e.g. nvidia.com/gpu.")
    operator: Literal["Exists", "Equal"] = Field("Exists", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; empty matches all."
    )


class NodeRequirement(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="Node label key, e.g. nvidia.com/gpu.product.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field("In", description="Match.")
    values: list[str] = Field(default_factory=list, description="Label values (In/NotIn).")


class ArtifactVolume(BaseModel):
    model_config = ConfigDict(extra="forbid")

    claim: str = Field("faster-qat-artifacts", description="PersistentVolumeClaim of the artifact root.")
    create: bool = Field(True, description="Render the claim (false: use an existing claim).")
    size: str = Field("1Ti", description="Requested storage when the claim is created.")
    storage_class: str | None = Field(None, description="StorageClass (default: the cluster's).")
    access_mode: Literal["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"] = Field(
        "ReadWriteMany", description="Every stage mounts the claim: ReadWriteMany across nodes."
    )
    mount_path: str = Field("/artifacts", description="Where pods mount the artifact root.")

    _claim = field_validator("claim")(classmethod(lambda cls, v: check_subdomain(v)))
    _size = field_validator("size")(classmethod(lambda cls, v: check_quantity(v)))

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or value.rstrip("/") == "" or " " in value:
            raise ValueError(f"'{value}' must be an absolute path other than /, without spaces")
        return value.rstrip("/")


class K8sSettings(BaseModel):
    """Where and how the study's Jobs run on Kubernetes (`--cluster k8s`)."""

    model_config = ConfigDict(extra="forbid")

    namespace: str = Field("faster-qat", description="Namespace of every rendered object.")
    create_namespace: bool = Field(False, description="Render the Namespace object too.")
    artifacts: ArtifactVolume = Field(default_factory=ArtifactVolume, description="Artifact root PVC.")
    tracking_uri: str | None = Field(
        "http://mlflow.faster-qat.svc.cluster.local:5000",
        description="MLflow as pods reach it (k8s/mlflow.yaml); the stages make the experiment and "
        "the parent run there. null: no MLflow; stages keep their events on the volume.",
    )
    service_account: str | None = Field(None, description="ServiceAccount of stage pods (default SA).")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    gpu_node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector of GPU stages, e.g. {nvidia.com/gpu.product: B200}."
    )
    gpu_node_affinity: list[NodeRequirement] = Field(
        default_factory=list, description="Required node affinity terms of GPU stages (all must hold)."
    )
    gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="Tolerations of GPU stages.",
    )
    run_as_user: int = Field(1000, ge=1, description="UID of stage containers (non-root).")
    run_as_group: int = Field(1000, ge=0, description="GID of stage containers.")
    fs_group: int = Field(1000, ge=0, description="Group that owns the mounted volumes.")
    backoff_limit: int = Field(
        0, ge=0, description="Retries of a failed stage pod (evictions/preemptions never count)."
    )
    ttl_seconds_after_finished: int = Field(
        7 * 24 * 3600, ge=0, description="Finished Jobs are deleted after this (markers stay)."
    )
    queue_slack_min: int = Field(
        60, ge=0, description="Added to each Job's deadline for time spent queued."
    )
    queue_name: str | None = Field(None, description="Kueue LocalQueue (gang admission); none: no Kueue.")
    poll_seconds: int = Field(15, ge=1, le=600, description="How often a waiting stage looks at upstream markers.")
    cpu_request: str | None = Field(
        None, description="CPU request of every stage container (a quantity, e.g. 100m); its limit stays "
        "resources.<kind>.cpus. Pods wait for their upstreams scheduled, holding their requests: on a node "
        "narrower than the DAG, a small request keeps waiting pods from starving running ones. "
        "null: request resources.<kind>.cpus.")
    init_cpu: str = Field("250m", description="CPU of the waiting init container.")
    init_memory: str = Field("256Mi", description="Memory of the waiting init container.")
    master_port: int = Field(29500, ge=1, le=65535, description="torchrun rendezvous port (multi-node).")
    secrets: dict[str, SecretRef] = Field(
        default_factory=dict,
        description=f"Env var -> Secret key, only as secretKeyRef; env vars: {', '.join(SECRET_ENV)}.",
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every object.")
    host_mounts: list[str] = Field(
        default_factory=list,
        description="Node paths mounted read-only into stage pods at the same path (hostPath): a shared "
        "filesystem every node has (/lustre/models), for local models, tokenizers, data and task "
        "folders a study reads. A local input outside these is refused at render.",
    )
    attempt: str = Field(
        "1", pattern=r"^[A-Za-z0-9._-]{1,63}$",
        description="render only: the attempt token of the rendered Jobs (submit makes a fresh one). "
        "Bump it to apply a rendered run again after a failure: a stage trusts an upstream's _FAILED "
        "only from the same attempt.",
    )

    _namespace = field_validator("namespace")(classmethod(lambda cls, v: _label(v)))
    _quantities = field_validator("init_cpu", "init_memory")(classmethod(lambda cls, v: check_quantity(v)))

    @field_validator("cpu_request")
    @classmethod
    def _cpu_request(cls, value: str | None) -> str | None:
        return None if value is None else check_quantity(value)

    @field_validator("secrets")
    @classmethod
    def _known_env(cls, value: dict[str, SecretRef]) -> dict[str, SecretRef]:
        for env in value:
            if env not in SECRET_ENV:
                raise ValueError(f"unknown secret env '{env}'; known: {', '.join(SECRET_ENV)}")
        return value

    @field_validator("labels", "gpu_node_selector")
    @classmethod
    def _label_map(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not LABEL_KEY.match(key) or len(key.split("/")[-1]) > 63:
                raise ValueError(f"'{key}' is not a valid label key")
            if item and (len(item) > 63 or not re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", item)):
                raise ValueError(f"{key}: '{item}' is not a valid label value")
        return value

    @field_validator("host_mounts")
    @classmethod
    def _absolute_mounts(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path.startswith("/") or path.rstrip("/") == "":
                raise ValueError(f"'{path}' must be an absolute path other than /")
        return [path.rstrip("/") for path in paths]

    @field_validator("tracking_uri")
    @classmethod
    def _remote(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://", "databricks")):
            raise ValueError(f"'{value}': pods need an MLflow server URI (http[s]://...), not a local store")
        return value


def _label(value: str) -> str:
    if len(value) > 63 or not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", value):
        raise ValueError(f"'{value}' is not a DNS-1123 label (lowercase letters, digits, '-', at most 63)")
    return value
