"""Control-plane side of MLflow: the study's experiment and the pipeline run's parent run.

Default store: a sqlite file under the artifact root (WAL mode, so several stages can log at
once); `MLFLOW_TRACKING_URI` (or `tracking.uri` in the config) selects a server instead.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from pipeline.errors import BackendError
from pipeline.layout import RunLayout
from stages.contract import TrackingRef

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# A study trains models: MLflow's "model training" kind, not its GenAI default (MLflow 3.17's UI
# also takes the kind from the link `pipeline report` prints: stages/report/mlflow_view.py).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def resolve_tracking_uri(root: Path, configured: str | None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{(Path(root).resolve() / DB_FILE)}"


def open_parent_run(layout: RunLayout, tracking_uri: str, experiment: str) -> TrackingRef:
    """Create (or reuse, for a rerun of the same run id) the parent run of this pipeline run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        _prepare_sqlite(Path(tracking_uri.removeprefix("sqlite:///")))
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
            if EXPERIMENT_KIND[0] not in found.tags:
                client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
        else:
            artifact_location = None
            if tracking_uri.startswith("sqlite:///"):
                artifact_location = (layout.root.resolve() / ARTIFACTS_DIR).as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=artifact_location,
                                                     tags=dict([EXPERIMENT_KIND]))
        previous = layout.read_run().get("tracking") if layout.run_file.exists() else None
        if (
            previous
            and previous["tracking_uri"] == tracking_uri
            and previous["experiment_id"] == experiment_id
        ):
            client.update_run(previous["parent_run_id"], status="RUNNING")
            return TrackingRef(**previous)
        run = client.create_run(
            experiment_id,
            run_name=layout.run_id,
            tags={"pipeline.run_id": layout.run_id, "pipeline.root": str(layout.root.resolve())},
        )
    except mlflow.exceptions.MlflowException as error:
        raise BackendError(f"MLflow at {tracking_uri}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # connection refused, DNS, TLS...
        raise BackendError(
            f"MLflow at {tracking_uri} is unreachable ({type(error).__name__}); start it or "
            "unset MLFLOW_TRACKING_URI to use the embedded store"
        ) from None
    return TrackingRef(
        tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=run.info.run_id
    )


def close_parent_run(ref: TrackingRef, status: str) -> None:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=ref.tracking_uri).set_terminated(ref.parent_run_id, status=status)
    except Exception as error:  # the run's own results are on disk; say so and go on
        print(f"warning: could not close MLflow parent run: {type(error).__name__}: {error}")


def _prepare_sqlite(path: Path) -> None:
    """WAL lets readers and one writer work at once; a busy writer waits instead of failing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=30) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
