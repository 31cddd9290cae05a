"""Fixtures shared by the preprocess tests."""

from __future__ import annotations

import pytest
from preprocess_helpers import FIXTURE_TOKENIZER


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
