"""Row planning (best-fit decreasing) and the exact layout of packed and padded rows."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from stages.preprocess.packing import TokenTable, plan_rows, write_rows

PAD = 0


def table_of(conversations: list[tuple[list[int], list[int]]]) -> TokenTable:
    ids = pa.chunked_array([pa.array([c[0] for c in conversations], pa.list_(pa.int32()))])
    labels = pa.chunked_array([pa.array([c[1] for c in conversations], pa.list_(pa.int32()))])
    return TokenTable.from_arrow(ids, labels)


def test_best_fit_decreasing_fills_rows():
    # 5 then 4 open two rows; 3 fills the first exactly; 2 goes to the second.
    assert plan_rows(np.array([5, 3, 4, 2]), seq_len=8, pack=True) == [[0, 1], [2, 3]]
    assert plan_rows(np.array([5, 3, 4, 2]), seq_len=8, pack=False) == [[0], [1], [2], [3]]
    assert plan_rows(np.array([8, 8]), seq_len=8, pack=True) == [[0], [1]]


def test_packed_row_layout(tmp_path: Path):
    table = table_of([
        ([11, 12, 13], [-100, 12, 13]),
        ([21, 22], [-100, 22]),
        ([31, 32, 33, 34], [-100, -100, 33, 34]),
    ])
    members = np.array([2, 0, 1])  # positions in the plan -> conversations in the table
    write_rows(table, members, [[1, 2], [0]], seq_len=6, pad_id=PAD, path=tmp_path / "rows.arrow", desc="t")
    rows = datasets.Dataset.from_file(str(tmp_path / "rows.arrow"))
    assert rows["input_ids"] == [[11, 12, 13, 21, 22, PAD], [31, 32, 33, 34, PAD, PAD]]
    assert rows["labels"] == [[-100, 12, 13, -100, 22, -100], [-100, -100, 33, 34, -100, -100]]
    # Positions restart at each conversation and at the padding.
    assert rows["position_ids"] == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]


def test_sliced_arrow_columns_are_read_from_their_offset():
    full = pa.array([[1, 2], [3, 4, 5], [6]], pa.list_(pa.int32()))
    table = TokenTable.from_arrow(pa.chunked_array([full.slice(1)]), pa.chunked_array([full.slice(1)]))
    assert table.offsets.tolist() == [0, 3, 4] and table.input_ids.tolist() == [3, 4, 5, 6]
