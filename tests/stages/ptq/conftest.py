"""Fixtures for the ptq tests: the tiny dataset (session scoped: written once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stages.ptq.quant_testkit import write_token_dataset


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_dataset(tmp_path_factory.mktemp("preprocess"))
