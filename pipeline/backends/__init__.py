"""Execution backends, by the name the CLI's --cluster takes."""

from __future__ import annotations

from pipeline.backends.base import Backend
from pipeline.backends.k8s import K8sBackend
from pipeline.backends.local import LocalBackend
from pipeline.backends.slurm import SlurmBackend

CLUSTERS: dict[str, type[Backend]] = {
    "local": LocalBackend,
    "k8s": K8sBackend,
    "slurm": SlurmBackend,
}


def backend_for(cluster: str) -> type[Backend]:
    return CLUSTERS[cluster]


def renderable_clusters() -> list[str]:
    """Clusters whose jobs can be written to files for a user to read or submit by hand."""
    return [name for name, backend in CLUSTERS.items() if hasattr(backend, "render")]
