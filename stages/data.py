"""Read what the `preprocess` stage wrote: splits, the data manifest, deterministic micro-batches.

The train and eval stages use only this module, so the on-disk layout stays private to
`stages.preprocess`. A split is a `datasets` folder whose rows are exactly `seq_len` tokens:
  input_ids     int32 token ids
  labels        int32, = input_ids on assistant tokens, -100 elsewhere (HF convention: the
                model shifts them; -100 also on padding)
  position_ids  int32, restart at 0 at each packed conversation start and at the padding
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from stages.runtime import StageInputError

DATA_MANIFEST = "data_manifest.json"
COLUMNS = ["input_ids", "labels", "position_ids"]


def load_split(data_dir: Path, split: str) -> datasets.Dataset:
    """The `split` ("train" or "val") of a preprocess output dir, formatted as torch tensors
    (`datasets` hands integer columns to torch as int64, what embeddings and the loss take)."""
    path = Path(data_dir) / split
    if not (path / "state.json").exists():
        raise StageInputError(f"data: {path} is not a preprocessed split; run the preprocess stage first")
    dataset = datasets.load_from_disk(str(path))
    missing = [name for name in COLUMNS if name not in dataset.column_names]
    if missing:
        raise StageInputError(f"data: {path} lacks columns {missing}; rerun the preprocess stage")
    return dataset.with_format("torch", columns=COLUMNS)


def read_data_manifest(data_dir: Path) -> dict[str, Any]:
    """The preprocess summary: token counts, split sizes, seq_len, tokenizer_hash, ..."""
    path = Path(data_dir) / DATA_MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StageInputError(f"data: {path} is missing; run the preprocess stage first") from None
    except json.JSONDecodeError as error:
        raise StageInputError(f"data: {path}: invalid JSON ({error.msg} at line {error.lineno})") from None


def global_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation seeded by (seed, epoch), the same in every process."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def iter_batches(
    dataset: datasets.Dataset,
    micro_batch: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this rank's micro-batches of one epoch, each a dict of [micro_batch, seq_len] tensors.

    Order: the epoch's rows are `global_order(len(dataset), seed, epoch)`, cut into rounds of
    `micro_batch * world` rows; in round r, rank k takes rows [k * micro_batch, (k+1) * micro_batch)
    of the round. So the rounds are the same whatever `world` is, and a global batch of
    `G = micro_batch * world * accumulation` rows is always `order[s*G : (s+1)*G]`: a 1-process run
    with micro_batch m*w sees the same global batches as a w-process run with micro_batch m (and a
    1-process run with micro_batch m and w-times the accumulation sees them too).
    The last incomplete round is dropped so every rank yields the same number of batches.
    `start` skips this rank's first `start` micro-batches (resume from a checkpoint).
    """
    if micro_batch < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(
            f"iter_batches: need micro_batch >= 1 and 0 <= rank < world, got {micro_batch}, {rank}, {world}"
        )
    order = global_order(len(dataset), seed, epoch)
    round_size = micro_batch * world
    rounds = len(order) // round_size
    for round_index in range(start, rounds):
        first = round_index * round_size + rank * micro_batch
        indices = order[first : first + micro_batch].tolist()
        batch = dataset[indices]
        yield {name: batch[name] for name in COLUMNS}


def batches_per_epoch(dataset: datasets.Dataset, micro_batch: int, world: int = 1) -> int:
    """How many micro-batches each rank gets from `iter_batches` in one epoch."""
    return len(dataset) // (micro_batch * world)
