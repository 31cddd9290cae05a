"""Where a study reports: the TrackingRef its stages carry. Nothing here talks to MLflow: the
experiment and the parent run are made where the study runs (contract.tracking), so planning,
rendering and submitting need no server.

Default store: a sqlite file under the artifact root (WAL mode, so several stages can log at
once), made by the first stage or driver that uses it; `MLFLOW_TRACKING_URI` (or `tracking.uri`
in the config) selects a server instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from contract.spec import TrackingRef

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def resolve_tracking_uri(root: Path, configured: str | None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{(Path(root).resolve() / DB_FILE)}"


def study_tracking(config: Any, root: Path, run_id: str, settle_s: float, uri: str | None = None) -> TrackingRef:
    """The study's tracking as the stages see it; `uri` overrides the configured one (k8s)."""
    uri = uri or resolve_tracking_uri(root, config.tracking.uri)
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(root).resolve() / ARTIFACTS_DIR).as_uri()
    return TrackingRef(tracking_uri=uri, experiment=config.tracking.experiment or config.study,
                       run_key=run_id, artifact_location=artifact_location, settle_s=settle_s)
