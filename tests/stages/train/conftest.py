"""Fixtures of the train stage tests: a tiny tokenized dataset, stage specs, process state."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from train_testlib import BASE_PARAMS, write_token_dataset

from tests.spec_files import write_spec_file


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_dataset(tmp_path_factory.mktemp("preprocess"))


@pytest.fixture
def make_spec(tmp_path: Path, data_dir: Path) -> Callable[..., Path]:
    """make_spec(name, **params) -> path of a spec.json for a train stage under tmp_path."""

    def make(name: str = "train", inputs: dict[str, Path] | None = None, **params: Any) -> Path:
        return write_spec_file(tmp_path / name, "train", {**BASE_PARAMS, **params},
                               {"data": data_dir, **(inputs or {})})

    return make


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """run_stage installs signal handlers and the stage turns on deterministic algorithms:
    process-wide settings that belong to the stage's own process, not to pytest's."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    torch.use_deterministic_algorithms(deterministic)
