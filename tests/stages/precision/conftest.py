"""Fixtures for the precision tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def token_batch() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
