"""Fixtures shared across test folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.smoke import SMOKE_STAGES, pipeline_cli


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """The README's smoke study, run once locally per test session: the artifact root."""
    root = tmp_path_factory.mktemp("smoke") / "runs"
    result = pipeline_cli("run", "-c", "smoke", "--root", str(root), "--plain")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"smoke: all {SMOKE_STAGES} stages succeeded" in result.stdout
    return root
