"""Execution backends, by the name the CLI's --cluster takes."""

from __future__ import annotations

from pipeline.backends.base import Backend
from pipeline.backends.k8s import K8sBackend
from pipeline.backends.local import LocalBackend
from pipeline.backends.nemo import (
    NemoRunBackend,  # imports nemo_run only inside its methods
)
from pipeline.backends.slurm import SlurmBackend
from pipeline.errors import ConfigError

CLUSTERS: dict[str, type[Backend]] = {
    "local": LocalBackend,
    "k8s": K8sBackend,
    "slurm": SlurmBackend,
    "nemo-run": NemoRunBackend,
}


def backend_for(cluster: str) -> type[Backend]:
    try:
        return CLUSTERS[cluster]
    except KeyError:
        raise ConfigError(f"cluster '{cluster}' is not one of {', '.join(sorted(CLUSTERS))}") from None


def renderable_clusters() -> list[str]:
    """Clusters whose jobs can be written to files for a user to read or submit by hand."""
    return sorted(name for name, backend in CLUSTERS.items() if backend.renderable)
