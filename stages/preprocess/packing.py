"""Lay tokenized conversations into rows of exactly `seq_len` tokens, packed or padded.

A row holds one or more whole conversations (best-fit decreasing when packing, one per row
otherwise), then padding. `position_ids` restart at 0 at every conversation start and at the
start of the padding, so a varlen attention kernel (flash-attention reads the restarts) keeps
conversations apart; padding and non-assistant tokens carry label -100.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from stages.preprocess.chat import IGNORE_INDEX

ROW_COLUMNS = ("input_ids", "labels", "position_ids")
ROWS_PER_BATCH = 512


@dataclass
class TokenTable:
    """Flat views of tokenized conversations: conversation k is values[offsets[k]:offsets[k+1]]."""

    offsets: np.ndarray  # int64, len = conversations + 1
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32

    @classmethod
    def from_arrow(cls, input_ids: pa.ChunkedArray, labels: pa.ChunkedArray) -> TokenTable:
        ids, labs = input_ids.combine_chunks(), labels.combine_chunks()
        offsets = ids.offsets.to_numpy().astype(np.int64)
        return cls(
            offsets=offsets - offsets[0],  # a sliced list array starts past 0
            input_ids=ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
            labels=labs.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
        )

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def plan_rows(lengths: np.ndarray, seq_len: int, pack: bool) -> list[list[int]]:
    """Which conversations (indices into `lengths`) go in each row, in row order."""
    if not pack:
        return [[index] for index in range(len(lengths))]
    # Best-fit decreasing: longest first, each into the fullest row it still fits in.
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row)
    for index in order.tolist():
        size = int(lengths[index])
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            space, row = free.pop(slot)
        else:
            space, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(index)
        if space - size > 0:
            bisect.insort(free, (space - size, row))
    return rows


def write_rows(
    table: TokenTable, members: np.ndarray, plan: list[list[int]], seq_len: int, pad_id: int, path: Path, desc: str
) -> None:
    """Write the planned rows as an Arrow IPC stream (what `datasets.Dataset.from_file` reads).

    `plan` holds positions into `members`, which maps them to conversations of `table`.
    """
    schema = pa.schema([(name, pa.list_(pa.int32())) for name in ROW_COLUMNS])
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for first in tqdm(range(0, len(plan), ROWS_PER_BATCH), desc=desc, unit="batch", leave=False):
            chunk = plan[first : first + ROWS_PER_BATCH]
            ids = np.full((len(chunk), seq_len), pad_id, dtype=np.int32)
            labels = np.full((len(chunk), seq_len), IGNORE_INDEX, dtype=np.int32)
            positions = np.zeros((len(chunk), seq_len), dtype=np.int32)
            for row, conversations in enumerate(chunk):
                cursor = 0
                for position in conversations:
                    conversation = int(members[position])
                    begin, end = table.offsets[conversation], table.offsets[conversation + 1]
                    size = int(end - begin)
                    ids[row, cursor : cursor + size] = table.input_ids[begin:end]
                    labels[row, cursor : cursor + size] = table.labels[begin:end]
                    positions[row, cursor : cursor + size] = np.arange(size, dtype=np.int32)
                    cursor += size
                positions[row, cursor:] = np.arange(seq_len - cursor, dtype=np.int32)
            flat_offsets = pa.array(np.arange(len(chunk) + 1, dtype=np.int32) * seq_len)
            arrays = [pa.ListArray.from_arrays(flat_offsets, pa.array(block.ravel()))
                      for block in (ids, labels, positions)]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
