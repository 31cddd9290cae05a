from __future__ import annotations

import pytest

from tests.e2e.mlflow_server import MlflowServer


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` (not started yet); stopped, with all its processes, at teardown."""
    server = MlflowServer(tmp_path / "mlflow.db", tmp_path / "artifacts")
    yield server
    server.stop()
