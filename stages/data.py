"""Read what the `preprocess` stage wrote: splits, the data manifest, the seeded row order.

The train and eval stages use only this module, so the on-disk layout stays private to
`stages.preprocess`. A split is a `datasets` folder whose rows are exactly `seq_len` tokens:
  input_ids     int32 token ids
  labels        int32, = input_ids on assistant tokens, -100 elsewhere (HF convention: the
                model shifts them; -100 also on padding)
  position_ids  int32, restart at 0 at each packed conversation start and at the padding
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stages.runtime import StageInputError

if TYPE_CHECKING:
    import datasets

DATA_MANIFEST = "data_manifest.json"
COLUMNS = ["input_ids", "labels", "position_ids"]


def load_split(data_dir: Path, split: str) -> datasets.Dataset:
    """The `split` ("train" or "val") of a preprocess output dir, formatted as torch tensors
    (`datasets` hands integer columns to torch as int64, what embeddings and the loss take)."""
    path = Path(data_dir) / split
    if not (path / "state.json").exists():
        raise StageInputError(f"data: {path} is not a preprocessed split; run the preprocess stage first")
    import datasets  # with pandas and pyarrow ~0.7 s: paid only by a stage that reads a split

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # a state.json that is not the one `save_to_disk` writes, missing arrow files
        text = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise StageInputError(f"data: {path} is not a readable preprocessed split ({text}); "
                              "rerun the preprocess stage") from None
    if not isinstance(dataset, datasets.Dataset):
        raise StageInputError(f"data: {path} holds several splits, not one; rerun the preprocess stage")
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


def global_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation seeded by (seed, epoch), the same in every
    process (the train stage cuts global batches from it: stages.batches.TrainOrder)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()
