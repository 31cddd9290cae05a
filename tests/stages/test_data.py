"""stages.data: reading the preprocess output and the seeded row order training cuts batches from."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from stages.batches import StepPlan, TrainOrder
from stages.data import global_order, load_split, read_data_manifest
from stages.runtime import StageInputError


def test_the_epoch_order_is_a_seeded_permutation():
    order = global_order(20, seed=7, epoch=0)
    assert sorted(order) == list(range(20))
    assert global_order(20, seed=7, epoch=0) == order
    assert global_order(20, seed=7, epoch=1) != order
    assert global_order(20, seed=8, epoch=0) != order


def test_training_walks_the_epoch_orders_in_turn():
    order = TrainOrder(n_rows=10, seed=3)
    plan = StepPlan(global_batch=5, micro_batch=5, world_size=1)
    rows = [row for step in range(4) for batch in order.micro_batches(step, plan, 0) for row in batch]
    assert rows == global_order(10, 3, 0) + global_order(10, 3, 1)


def test_a_saved_split_loads_as_int64_tensors(tmp_path: Path):
    data = {"input_ids": [[1, 2, 3, 4]] * 3, "labels": [[-100, 2, 3, 4]] * 3,
            "position_ids": [[0, 1, 2, 3]] * 3}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "train"))
    split = load_split(tmp_path, "train")
    assert split[0]["labels"].dtype == torch.int64
    assert split[0]["labels"].tolist() == [-100, 2, 3, 4]


def test_missing_outputs_are_one_line_errors(tmp_path: Path):
    with pytest.raises(StageInputError, match="not a preprocessed split"):
        load_split(tmp_path, "train")
    with pytest.raises(StageInputError, match="data_manifest.json is missing"):
        read_data_manifest(tmp_path)
