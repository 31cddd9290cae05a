"""stages.data: reading splits and the deterministic, rank-sharded micro-batch order."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from stages.data import batches_per_epoch, iter_batches, load_split, read_data_manifest
from stages.runtime import StageInputError

SEQ = 4


@pytest.fixture
def rows() -> datasets.Dataset:
    """20 rows whose first token is the row number, so batches say which rows they hold."""
    data = {
        "input_ids": [[row] * SEQ for row in range(20)],
        "labels": [[row] * SEQ for row in range(20)],
        "position_ids": [list(range(SEQ)) for _ in range(20)],
    }
    return datasets.Dataset.from_dict(data).with_format("torch")


def row_ids(batches) -> list[list[int]]:
    return [batch["input_ids"][:, 0].tolist() for batch in batches]


def test_one_and_two_processes_see_the_same_global_batches(rows):
    single = row_ids(iter_batches(rows, micro_batch=4, seed=7, epoch=0))
    rank0 = row_ids(iter_batches(rows, micro_batch=2, seed=7, epoch=0, rank=0, world=2))
    rank1 = row_ids(iter_batches(rows, micro_batch=2, seed=7, epoch=0, rank=1, world=2))
    assert len(single) == len(rank0) == len(rank1) == 5 == batches_per_epoch(rows, 2, world=2)
    for whole, first, second in zip(single, rank0, rank1):
        assert whole == first + second  # disjoint halves of the same global batch
    seen = [row for batch in single for row in batch]
    assert sorted(seen) == list(range(20))  # one epoch visits every row once


def test_order_depends_on_seed_and_epoch_only(rows):
    first = row_ids(iter_batches(rows, 4, seed=7, epoch=0))
    assert row_ids(iter_batches(rows, 4, seed=7, epoch=0)) == first
    assert row_ids(iter_batches(rows, 4, seed=7, epoch=1)) != first
    assert row_ids(iter_batches(rows, 4, seed=8, epoch=0)) != first
    assert row_ids(iter_batches(rows, 4, seed=7, epoch=0, start=3)) == first[3:]  # resume


def test_batches_are_stacked_tensors_and_incomplete_rounds_dropped(rows):
    batches = list(iter_batches(rows, micro_batch=3, seed=0, epoch=0, rank=1, world=2))
    assert len(batches) == 3  # 20 // (3 * 2)
    assert batches[0]["labels"].shape == (3, SEQ) and batches[0]["labels"].dtype == torch.int64
    with pytest.raises(ValueError, match="rank"):
        next(iter_batches(rows, micro_batch=2, seed=0, epoch=0, rank=2, world=2))


def test_missing_outputs_are_one_line_errors(tmp_path: Path):
    with pytest.raises(StageInputError, match="not a preprocessed split"):
        load_split(tmp_path, "train")
    with pytest.raises(StageInputError, match="data_manifest.json is missing"):
        read_data_manifest(tmp_path)
