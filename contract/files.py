"""Files both planes write and check: atomic writes, and the content records of a stage's outputs.

A stage's outputs are recorded in its `_SUCCESS` as (relative path, size, mtime, xxh3-128 hash).
Checking them is cheap by default, as make and rsync do: a file whose size and mtime are the
recorded ones is taken as unchanged, one whose mtime moved (a copy, a restore) is hashed and
must match. `verify_outputs(..., full=True)` hashes everything (`python -m pipeline verify`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import xxhash
from pydantic import BaseModel, ConfigDict

_CHUNK = 8 << 20


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(content, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any, sort_keys: bool = True) -> None:
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=sort_keys, default=str) + "\n")


def hash_file(path: Path) -> str:
    """xxh3-128 of the file's bytes, streamed (about 10 GB/s: a 16 GB checkpoint in seconds)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FileRecord(BaseModel):
    """One output file as `_SUCCESS` records it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str  # relative to the stage dir, '/'-separated
    size: int
    mtime_ns: int
    xxh3: str


def record_files(root: Path, paths: Iterable[Path]) -> list[FileRecord]:
    records = []
    for path in sorted(paths):
        stat = path.stat()
        records.append(FileRecord(path=path.relative_to(root).as_posix(), size=stat.st_size,
                                  mtime_ns=stat.st_mtime_ns, xxh3=hash_file(path)))
    return records


def check_file(root: Path, record: FileRecord, full: bool = False) -> str | None:
    """None when the file is as recorded, else why not (one line)."""
    path = root / record.path
    try:
        stat = path.stat()
    except FileNotFoundError:
        return f"{record.path} is missing"
    if not path.is_file():
        return f"{record.path} is not a file"
    if stat.st_size != record.size:
        return f"{record.path} has {stat.st_size} bytes, {record.size} were recorded"
    if full or stat.st_mtime_ns != record.mtime_ns:
        if hash_file(path) != record.xxh3:
            return f"{record.path} changed (content hash differs)"
    return None


def verify_outputs(root: Path, records: Iterable[FileRecord], full: bool = False) -> str | None:
    """The first recorded output that does not verify, as one line; None when all do."""
    for record in records:
        problem = check_file(root, record, full)
        if problem:
            return problem
    return None
