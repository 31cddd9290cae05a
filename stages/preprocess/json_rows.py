"""Read a local .jsonl/.json source by hand, line by line, into an Arrow file of usable rows.

`datasets`' JSON loader fails a whole file on one line that is not JSON ("An error occurred
while generating the dataset", no file, no line) and infers column types from the rows, so
a row whose output is the integer 4 either breaks the load or reaches the encoder as a
number. Here every line is decoded and checked on its own: a line that is not UTF-8, not
JSON, not an object, or whose configured columns are missing or of the wrong type is a bad
row, named by file and line; with `on_bad_row: skip` it is counted and logged, otherwise the
stage stops with that one line. Only the configured columns of the usable rows are written,
with one schema, so loading them cannot fail.

A .json file whose first character is `[` holds one JSON array of rows (what `datasets`
reads too); its rows are named by item number.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.preprocess.rows import ChatColumns, describe, row_problem
from stages.runtime import StageInputError

BATCH_ROWS = 8192
LOGGED_BAD_ROWS = 20  # the first ones by file and line; then one count


@dataclass
class BadRows:
    """Bad rows seen so far (all files of a source), and what to do with the next one."""

    on_bad_row: str  # "error" or "skip"
    log: logging.Logger
    count: int = 0

    def add(self, where: str, reason: str) -> None:
        if self.on_bad_row == "error":
            raise StageInputError(f"source: {where}: {reason}; fix the row or set on_bad_row: skip")
        self.count += 1
        if self.count <= LOGGED_BAD_ROWS:
            self.log.warning("skipped %s: %s", where, reason)
        elif self.count == LOGGED_BAD_ROWS + 1:
            self.log.warning("... more bad rows skipped (counted in the manifest)")


@dataclass
class JsonRows:
    """Usable rows of one file, written to `arrow_path`, and the line (or item) of each."""

    arrow_path: Path
    rows: int = 0
    positions: array = field(default_factory=lambda: array("q"))
    unit: str = "line"  # "line" for JSON lines, "item" for a JSON array


def arrow_schema(columns: ChatColumns) -> pa.Schema:
    if columns.messages_column:
        turn = pa.struct([("role", pa.string()), ("content", pa.string())])
        return pa.schema([(columns.messages_column, pa.list_(turn))])
    return pa.schema([(columns.input_column, pa.string()), (columns.output_column, pa.string())])


def read_json_rows(
    path: Path, columns: ChatColumns, bad: BadRows, arrow_path: Path, max_rows: int | None = None
) -> JsonRows:
    """Check every row of `path`, write the usable ones (at most `max_rows`) to `arrow_path`."""
    result = JsonRows(arrow_path=arrow_path, unit="item" if _is_array(path) else "line")
    rows = _array_items(path) if result.unit == "item" else _json_lines(path)
    present = dict.fromkeys(columns.required(), False)
    schema = arrow_schema(columns)
    batch: dict[str, list[Any]] = {name: [] for name in schema.names}
    arrow_path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for position, row, reason in rows:
            if max_rows is not None and result.rows >= max_rows:
                break
            if reason is None:
                for name in present:
                    present[name] = present[name] or name in row
                reason = row_problem(row, columns)
            if reason is not None:
                bad.add(f"{path}: {result.unit} {position}", reason)
                continue
            for name in schema.names:
                batch[name].append(_keep(row[name], columns))
            result.positions.append(position)
            result.rows += 1
            if len(batch[schema.names[0]]) >= BATCH_ROWS:
                writer.write_batch(pa.record_batch(batch, schema=schema))
                batch = {name: [] for name in schema.names}
        if batch[schema.names[0]]:
            writer.write_batch(pa.record_batch(batch, schema=schema))
    never = [name for name, seen in present.items() if not seen]
    if never and (result.rows or bad.count):  # rows, but none with this column: a config mistake
        raise StageInputError(
            f"source: {path} has no column {never[0]!r} in any row; "
            "set input_column/output_column or messages_column"
        )
    return result


def _keep(value: Any, columns: ChatColumns) -> Any:
    """The value as the Arrow schema holds it (turns keep only role and content)."""
    if columns.messages_column:
        return [{"role": turn["role"], "content": turn["content"]} for turn in value]
    return value


def _is_array(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(4096), b""):
            stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")  # whitespace and a UTF-8 BOM
            if stripped:
                return stripped.startswith(b"[")
    return False


Row = tuple[int, Any, "str | None"]  # (line or item number, row, why it is bad or None)


def _json_lines(path: Path) -> Iterator[Row]:
    non_blank = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                non_blank += 1
                yield number, None, f"not UTF-8 ({error.reason} at byte {error.start})"
                continue
            text = text.removeprefix("\ufeff") if number == 1 else text
            if not text.strip():
                continue
            non_blank += 1
            yield number, *_parse(text)
    if non_blank == 0:
        raise StageInputError(f"source: {path} is empty (no JSON lines)")


def _parse(text: str) -> tuple[Any, str | None]:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"not JSON ({error.msg} at column {error.colno})"
    except RecursionError:
        return None, "not JSON (nested too deeply)"
    if not isinstance(row, dict):
        return None, f"not a JSON object but {describe(row)}"
    return row, None


def _array_items(path: Path) -> Iterator[Row]:
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise StageInputError(f"source: {path}: not UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise StageInputError(
            f"source: {path}: line {error.lineno}: not JSON ({error.msg}); a .json file holds one "
            "array of rows or JSON lines"
        ) from None
    except RecursionError:
        raise StageInputError(f"source: {path}: not JSON (nested too deeply)") from None
    if not items:
        raise StageInputError(f"source: {path} is empty (an empty JSON array)")
    for number, item in enumerate(items, start=1):
        if isinstance(item, dict):
            yield number, item, None
        else:
            yield number, None, f"not a JSON object but {describe(item)}"
