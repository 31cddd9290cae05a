"""Read the preprocess stage's source rows: local files (checked line by line), a saved dataset
dir, or a hub dataset, into one `datasets.Dataset` that remembers which file each row came from
(so a bad row is reported as `file: row N`)."""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from contract.params.preprocess import PreprocessParams
from stages.runtime import StageInputError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
LINE_FORMATS = {".jsonl", ".json"}  # read as JSON lines; checked for UTF-8 before loading


@dataclass
class SourceRows:
    """The rows to preprocess and where each came from."""

    dataset: datasets.Dataset
    # (display name, index of its first row in `dataset`), in row order.
    parts: list[tuple[str, int]] = field(default_factory=list)
    skipped_lines: int = 0  # lines dropped before loading (not UTF-8, with on_bad_row=skip)

    def where(self, index: int) -> str:
        """`file: row N` (1-based within that file) for a row index of `dataset`."""
        name, start = self.parts[0]
        for part_name, part_start in self.parts:
            if part_start > index:
                break
            name, start = part_name, part_start
        return f"{name}: row {index - start + 1}"


def load_source(params: PreprocessParams, cache_dir: Path, log: logging.Logger) -> SourceRows:
    files = _local_files(params.source)
    if files is None:
        rows = _load_remote_or_dir(params, cache_dir)
    else:
        rows = _load_files(files, params, cache_dir, log)
    if params.max_rows is not None and len(rows.dataset) > params.max_rows:
        rows.dataset = rows.dataset.select(range(params.max_rows))
    if len(rows.dataset) == 0:
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
    parts, pieces, skipped = [], [], 0
    start = 0
    for path in files:
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise StageInputError(
                f"source: {path}: unsupported file type '{path.suffix}'; use .jsonl, .json or .parquet"
            )
        load_path = path
        if path.suffix in LINE_FORMATS:
            load_path, bad_lines = _checked_json_lines(path, params, cache_dir)
            skipped += bad_lines
            if bad_lines:
                log.warning("%s: skipped %d line(s) that are not UTF-8", path, bad_lines)
        elif path.stat().st_size == 0:
            raise StageInputError(f"source: {path} is empty")
        try:
            piece = datasets.load_dataset(
                builder, data_files=str(load_path), split="train", cache_dir=str(cache_dir / "load")
            )
        except Exception as error:  # pyarrow/datasets parse errors: name the file
            raise StageInputError(f"source: {path}: cannot be read as {builder}: {_first_line(error)}") from None
        parts.append((str(path), start))
        pieces.append(piece)
        start += len(piece)
    dataset = pieces[0] if len(pieces) == 1 else _concatenate(pieces, files)
    return SourceRows(dataset=dataset, parts=parts, skipped_lines=skipped)


def _checked_json_lines(path: Path, params: PreprocessParams, cache_dir: Path) -> tuple[Path, int]:
    """Check every line decodes as UTF-8 (pyarrow's error would name neither file nor line).

    Returns the path to load and the number of lines skipped; when lines are skipped the
    good lines are copied into the stage's cache dir and that copy is loaded.
    """
    bad: list[int] = []
    non_blank = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                if params.on_bad_row == "error":
                    raise StageInputError(
                        f"source: {path}: line {number}: not UTF-8 ({error.reason} at byte {error.start}); "
                        "fix the file or set on_bad_row: skip"
                    ) from None
                bad.append(number)
                continue
            non_blank += bool(text.strip())
    if non_blank == 0:
        raise StageInputError(f"source: {path} is empty (no JSON lines)")
    if not bad:
        return path, 0
    clean = cache_dir / "clean" / f"{len(list((cache_dir / 'clean').glob('*')))}-{path.name}"
    clean.parent.mkdir(parents=True, exist_ok=True)
    skip = set(bad)
    with path.open("rb") as source, clean.open("wb") as target:
        for number, line in enumerate(source, start=1):
            if number not in skip:
                target.write(line)
    return clean, len(bad)


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
        else:  # a hub name, or a folder of data files
            dataset = datasets.load_dataset(params.source, data_files=params.data_files, split=params.split)
    except KeyError:
        raise StageInputError(f"split: {params.source} has no split '{params.split}'") from None
    except Exception as error:
        raise StageInputError(f"source: cannot load {params.source}: {_first_line(error)}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise StageInputError(f"source: {params.source} did not give one split; set split")
    return SourceRows(dataset=dataset, parts=[(params.source, 0)])


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
