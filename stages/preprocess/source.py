"""Read the preprocess stage's source rows: local files (JSON read and checked row by row,
parquet through `datasets`), a saved dataset dir, or a hub dataset, into one `datasets.Dataset`
that remembers where each row came from (so a bad row is reported as `file: line N`)."""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from contract.params.preprocess import PreprocessParams
from stages.preprocess.json_rows import BadRows, read_json_rows
from stages.preprocess.rows import ChatColumns
from stages.runtime import StageInputError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
LINE_FORMATS = {".jsonl", ".json"}  # read and checked row by row here, not by `datasets`


@dataclass
class SourceRows:
    """The rows to preprocess and where each came from."""

    dataset: datasets.Dataset
    # (display name, index of its first row in `dataset`, what a position counts), in row order.
    parts: list[tuple[str, int, str]] = field(default_factory=list)
    # Position of each row in its part (1-based line, item or row number); None: index + 1.
    positions: np.ndarray | None = None
    skipped_lines: int = 0  # bad rows dropped before `dataset` (JSON sources, on_bad_row=skip)

    def where(self, index: int) -> str:
        """`file: line N` (or `item N`, `row N`) for a row index of `dataset`."""
        name, start, unit = self.parts[0]
        for part in self.parts:
            if part[1] > index:
                break
            name, start, unit = part
        position = int(self.positions[index]) if self.positions is not None else index - start + 1
        return f"{name}: {unit} {position}"


def columns_of(params: PreprocessParams) -> ChatColumns:
    return ChatColumns(params.input_column, params.output_column, params.messages_column, params.system_prompt)


def load_source(params: PreprocessParams, cache_dir: Path, log: logging.Logger) -> SourceRows:
    files = _local_files(params.source)
    if files is None:
        rows = _load_remote_or_dir(params, cache_dir)
    else:
        rows = _load_files(files, params, cache_dir, log)
    if params.max_rows is not None and len(rows.dataset) > params.max_rows:
        rows.dataset = rows.dataset.select(range(params.max_rows))
    if len(rows.dataset) == 0:
        if rows.skipped_lines:
            raise StageInputError(f"source: {params.source}: no usable rows ({rows.skipped_lines} bad)")
        raise StageInputError(f"source: {params.source} has no rows; point source at a non-empty dataset")
    return rows


def _local_files(source: str) -> list[Path] | None:
    """The data files a local source names; None when the source is a hub name or a dataset dir."""
    path = Path(source).expanduser()
    if any(char in source for char in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path)))
        if not matches:
            raise StageInputError(f"source: no file matches {source}")
        return matches
    if path.is_file():
        return [path]
    if path.exists():
        return None  # a directory: a saved dataset or a folder of data files
    looks_local = source.startswith(("/", "./", "../", "~")) or path.suffix in FILE_BUILDERS
    if looks_local:
        raise StageInputError(f"source: no such file or directory: {source}")
    return None


def _load_files(files: list[Path], params: PreprocessParams, cache_dir: Path, log: logging.Logger) -> SourceRows:
    parts: list[tuple[str, int, str]] = []
    pieces: list[datasets.Dataset] = []
    positions: list[np.ndarray] = []
    bad = BadRows(params.on_bad_row, log)
    start = 0
    for number, path in enumerate(files):
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise StageInputError(
                f"source: {path}: unsupported file type '{path.suffix}'; use .jsonl, .json or .parquet"
            )
        left = None if params.max_rows is None else params.max_rows - start
        if left == 0:
            break
        if path.suffix in LINE_FORMATS:
            read = read_json_rows(path, columns_of(params), bad, cache_dir / "rows" / f"{number}.arrow", left)
            piece = datasets.Dataset.from_file(str(read.arrow_path))
            unit, where = read.unit, np.frombuffer(read.positions, dtype=np.int64) if read.rows else np.zeros(0, np.int64)
        else:
            piece = _load_parquet(path, cache_dir)
            unit, where = "row", np.arange(1, len(piece) + 1, dtype=np.int64)
        parts.append((str(path), start, unit))
        pieces.append(piece)
        positions.append(where)
        start += len(piece)
    dataset = pieces[0] if len(pieces) == 1 else _concatenate(pieces, files)
    return SourceRows(dataset=dataset, parts=parts, positions=np.concatenate(positions), skipped_lines=bad.count)


def _load_parquet(path: Path, cache_dir: Path) -> datasets.Dataset:
    if path.stat().st_size == 0:
        raise StageInputError(f"source: {path} is empty")
    try:
        return datasets.load_dataset(
            "parquet", data_files=str(path), split="train", cache_dir=str(cache_dir / "load")
        )
    except Exception as error:  # pyarrow/datasets parse errors: name the file
        raise StageInputError(f"source: {path}: cannot be read as parquet: {_first_line(error)}") from None


def _concatenate(pieces: list[datasets.Dataset], files: list[Path]) -> datasets.Dataset:
    try:
        return datasets.concatenate_datasets(pieces)
    except ValueError as error:
        raise StageInputError(
            f"source: files {files[0]} ... {files[-1]} have different columns: {_first_line(error)}"
        ) from None


def _load_remote_or_dir(params: PreprocessParams, cache_dir: Path) -> SourceRows:
    path = Path(params.source).expanduser()
    try:
        if path.is_dir() and (path / "state.json").exists():  # written by Dataset.save_to_disk
            dataset = datasets.load_from_disk(str(path))
        elif path.is_dir() and (path / "dataset_dict.json").exists():
            dataset = datasets.load_from_disk(str(path))[params.split]
        else:  # a hub name (at source_revision), or a folder of data files
            # Offline (HF_HUB_OFFLINE), datasets falls back to its newest cached copy whatever the
            # revision: pin with network access, or hand the stage a local copy.
            dataset = datasets.load_dataset(params.source, data_files=params.data_files, split=params.split,
                                            revision=params.source_revision)
    except KeyError:
        raise StageInputError(f"split: {params.source} has no split '{params.split}'") from None
    except Exception as error:
        at = f" at revision {params.source_revision}" if params.source_revision else ""
        raise StageInputError(f"source: cannot load {params.source}{at}: {_first_line(error)}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise StageInputError(f"source: {params.source} did not give one split; set split")
    return SourceRows(dataset=dataset, parts=[(params.source, 0, "row")])


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
