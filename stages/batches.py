"""Which rows each process reads at each step, from the preprocess output.

The order is a pure function of (seed, step): step s uses global rows [s*G, (s+1)*G) of an
endless stream of seeded permutations (one per epoch), and rank r reads micro-batch
a*W + r of them at accumulation step a. So the data position of a checkpoint is just the
step, 1 and N processes see the same global batches, and a resumed run reads exactly what
an uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.data import global_order
from stages.runtime import StageInputError

COLUMNS = ("input_ids", "labels", "position_ids")  # as stages.data.COLUMNS
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE_INDEX where masked; aligned with input_ids
    position_ids: torch.Tensor  # [B, T] int64
    # Whether a row holds several sequences (its positions restart), found where the rows are
    # read, on the host: stages.hf_model.causal_lm_logits says why.
    packed: bool

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.labels, self.position_ids)), self.packed)

    def pin_memory(self) -> Batch:
        """In page-locked memory, so `to(cuda)` copies without blocking the host until the GPU has
        finished the work queued before the copy (a copy from pageable memory does)."""
        return Batch(*(t.pin_memory() for t in (self.input_ids, self.labels, self.position_ids)), self.packed)

    @property
    def label_tokens(self) -> int:
        """Tokens that carry a loss: labels shifted by one, as the LM predicts the next token."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


class TokenSplit:
    """One split (`train` or `val`) of a preprocess output dir (read by stages.data): fixed-length
    token rows, fetched by index so the order is ours (TrainOrder), not an iterator's."""

    def __init__(self, data_dir: Path, split: str) -> None:
        from stages.data import (
            load_split,  # the data helper owns the on-disk layout and its checks
        )

        dataset = load_split(Path(data_dir), split)
        if len(dataset) == 0:
            raise StageInputError(f"inputs.data: {Path(data_dir) / split} has no rows")
        self.path = Path(data_dir) / split
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, indices: list[int]) -> Batch:
        picked = self.dataset[indices]
        if any(isinstance(picked[c], list) for c in COLUMNS):  # ragged rows come back as lists
            raise StageInputError(f"inputs.data: {self.path}: rows are not all the same length")
        input_ids, labels, position_ids = (torch.as_tensor(picked[c]).long() for c in COLUMNS)
        return Batch(input_ids, labels, position_ids, packed=bool(sequence_breaks(position_ids).any()))


def sequence_breaks(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True where a row's next sequence begins (its positions do not go on by 1);
    its cumulative sum along T numbers each token's sequence, as transformers does."""
    return torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1


@dataclass(frozen=True)
class StepPlan:
    """How a global batch is cut: micro_batch * world_size * accum_steps == global_batch."""

    global_batch: int
    micro_batch: int
    world_size: int

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    def check(self) -> None:
        per_round = self.micro_batch * self.world_size
        if self.global_batch % per_round:
            raise StageInputError(
                f"params.global_batch: {self.global_batch} is not a multiple of micro_batch "
                f"({self.micro_batch}) x world_size ({self.world_size}) = {per_round}"
            )


class TrainOrder:
    """Seeded, epoch-wise shuffled, endless row order over the train split."""

    def __init__(self, n_rows: int, seed: int) -> None:
        self.n_rows = n_rows
        self.seed = seed
        self._epoch = -1
        self._perm: list[int] = []

    def row(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, self.n_rows)
        if epoch != self._epoch:
            self._perm = global_order(self.n_rows, self.seed, epoch)
            self._epoch = epoch
        return self._perm[offset]

    def micro_batches(self, step: int, plan: StepPlan, rank: int) -> list[list[int]]:
        """Row indices of this rank's micro-batches at `step` (0-based), in accumulation order."""
        base = step * plan.global_batch
        out = []
        for accum in range(plan.accum_steps):
            start = base + (accum * plan.world_size + rank) * plan.micro_batch
            out.append([self.row(i) for i in range(start, start + plan.micro_batch)])
        return out


def validation_batches(
    split: TokenSplit, micro_batch: int, rank: int, world_size: int, cap: int | None
) -> Iterator[Batch]:
    """The val split in order, micro-batch i on rank i % world_size; at most `cap` micro-batches
    over all ranks, so 1 and N processes score the same rows.

    Every rank runs the same number of forwards (FSDP's all-gathers are collective), so up to
    world_size - 1 trailing micro-batches are left out.
    """
    n_batches = (len(split) + micro_batch - 1) // micro_batch
    if cap is not None:
        n_batches = min(n_batches, cap)
    per_rank = n_batches // world_size
    if per_rank == 0:
        raise StageInputError(
            f"inputs.data: {split.path}: {n_batches} val micro-batches (params.val_batches cap "
            f"{cap}) is fewer than one per process ({world_size})"
        )
    for index in range(rank, per_rank * world_size, world_size):
        start = index * micro_batch
        yield split.rows(list(range(start, min(start + micro_batch, len(split)))))


class StepBatches:
    """A rank's micro-batches of a step, read on the host ahead of time: `prefetch(step)` while the
    GPU still runs the previous step, `take(step)` at the step's start. The GPU waits on the host
    between steps (each step ends in a sync: its loss and gradient norm are read); reading the
    rows there (datasets indexing, tensor conversion) would add that time to every step."""

    def __init__(self, split: TokenSplit, order: TrainOrder, plan: StepPlan, rank: int, pin: bool) -> None:
        self.split, self.order, self.plan, self.rank, self.pin = split, order, plan, rank, pin
        self._ahead: tuple[int, list[Batch]] | None = None

    def _read(self, step: int) -> list[Batch]:
        batches = [self.split.rows(rows) for rows in self.order.micro_batches(step, self.plan, self.rank)]
        return [b.pin_memory() for b in batches] if self.pin else batches

    def prefetch(self, step: int) -> None:
        self._ahead = (step, self._read(step))

    def take(self, step: int) -> list[Batch]:
        """The host batches of `step`, prefetched or read now."""
        ahead, self._ahead = self._ahead, None
        return ahead[1] if ahead is not None and ahead[0] == step else self._read(step)
