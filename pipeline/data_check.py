"""Look into a local data source before anything starts (torch-free, and no `datasets`).

`validate`, `run` and `submit` open the source the preprocess stage will read, when it is on
this machine, and check that the configured columns exist in its first rows: a wrong column
name is one line and exit 2 here, not a failed stage later. JSON lines and JSON arrays are
read by hand, parquet's schema through pyarrow (when installed), a saved dataset's features
from its dataset_info.json. Hub ids are not looked up (no network here).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

from contract.params.preprocess import PreprocessParams
from pipeline.errors import ConfigError

FIRST_ROWS = 100
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_LOCAL_PREFIXES = ("/", "./", "../", "~")


def check_data_source(data: PreprocessParams, must_exist: bool) -> None:
    """Raise ConfigError when the local source lacks a configured column or cannot be read.

    `must_exist`: the stages run on this machine, so a local path that is not here is an
    error; on a cluster the path may name the cluster's filesystem, and only what exists
    here is checked.
    """
    columns = _required_columns(data)
    for path in _local_files(data.source, must_exist):
        if path.is_dir():
            found, what = _saved_dataset_columns(path, data.split), f"{path} (split {data.split})"
        else:
            found, what = _file_columns(path), str(path)
        if found is None:
            continue  # nothing here says which columns there are (e.g. no pyarrow)
        for field_name, column in columns:
            if column not in found:
                shown = ", ".join(sorted(found)[:12]) or "none"
                raise ConfigError(
                    f"data.{field_name}: column '{column}' is not in {what} (its first rows have: {shown})"
                )


def _required_columns(data: PreprocessParams) -> list[tuple[str, str]]:
    if data.messages_column:
        return [("messages_column", data.messages_column)]
    return [("input_column", data.input_column), ("output_column", data.output_column)]


def _local_files(source: str, must_exist: bool) -> list[Path]:
    """The first local file (or saved dataset dir) the source names; [] for a hub id."""
    try:
        path = Path(source).expanduser()
        if any(char in source for char in "*?["):
            matches = sorted(glob.glob(str(path)))
            if not matches and must_exist:
                raise ConfigError(f"data.source: no file matches {source}")
            return [Path(matches[0])] if matches else []
        if path.is_file() or (path.is_dir() and _is_saved_dataset(path)):
            return [path]
        if path.exists():
            return []  # a folder of data files: `datasets` decides which it reads
    except (OSError, ValueError) as error:  # a NUL byte, a name too long, no permission
        raise ConfigError(f"data.source: {source}: {error}") from None
    if must_exist and (source.startswith(_LOCAL_PREFIXES) or path.suffix in DATA_SUFFIXES):
        raise ConfigError(f"data.source: no such file or directory: {source}")
    return []


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _file_columns(path: Path) -> set[str] | None:
    if path.suffix == ".parquet":
        return _parquet_columns(path)
    if path.suffix not in DATA_SUFFIXES:
        raise ConfigError(f"data.source: {path}: unsupported file type '{path.suffix}'; "
                          "use .jsonl, .json or .parquet")
    rows = _first_json_rows(path)
    if not rows:
        raise ConfigError(f"data.source: {path}: none of its first {FIRST_ROWS} lines is a JSON object")
    return {str(key) for row in rows for key in row}


def _first_json_rows(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open("rb") as handle:
            head = handle.read(4096).lstrip(b" \t\r\n\xef\xbb\xbf")
            if path.suffix == ".json" and head.startswith(b"["):
                handle.seek(0)
                items = json.loads(handle.read().decode("utf-8-sig"))
                return [item for item in items[:FIRST_ROWS] if isinstance(item, dict)]
            handle.seek(0)
            rows, seen = [], 0
            for line in handle:
                if not line.strip():
                    continue
                seen += 1
                if seen > FIRST_ROWS:
                    break
                row = _json_object(line)
                if row is not None:
                    rows.append(row)
            if seen == 0:
                raise ConfigError(f"data.source: {path} is empty (no JSON lines)")
            return rows
    except OSError as error:
        raise ConfigError(f"data.source: {path}: cannot read: {error}") from None
    except (ValueError, RecursionError) as error:  # a JSON array that is not JSON
        raise ConfigError(f"data.source: {path}: not a JSON array of rows: {str(error)[:200]}") from None


def _json_object(line: bytes) -> dict[str, Any] | None:
    """The row of one JSON line; None for a line that is not one (the stage names those)."""
    try:
        row = json.loads(line.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def _parquet_columns(path: Path) -> set[str] | None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None  # no pyarrow on this machine: the preprocess stage checks the columns
    try:
        return set(pq.read_schema(str(path)).names)
    except Exception as error:  # ArrowInvalid and friends: not a parquet file
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"data.source: {path}: not a readable parquet file: {text[:200]}") from None


def _saved_dataset_columns(path: Path, split: str) -> set[str] | None:
    """Columns of a `Dataset.save_to_disk` folder (or one split of a DatasetDict's)."""
    if (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits", [])
        if split not in splits:
            raise ConfigError(f"data.split: {path} has no split '{split}' (splits: {', '.join(map(str, splits))})")
        path = path / split
    info = path / "dataset_info.json"
    if not info.is_file():
        return None
    features = _read_json(info).get("features")
    return {str(name) for name in features} if isinstance(features, dict) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.source: {path}: unreadable: {str(error)[:200]}") from None
    return value if isinstance(value, dict) else {}
