"""Generated source rows through the preprocess stage's row handling, in-process: any line
(not UTF-8, not JSON, not an object, mistyped or missing columns, lone surrogates, deep
nesting) is a usable row or a bad row named by file and line; nothing reaches a traceback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from preprocess_helpers import failure, run_preprocess

from contract.markers import SUCCESS_MARKER
from stages.data import read_data_manifest
from stages.preprocess.chat import OK, ChatColumns, ConversationEncoder
from stages.preprocess.json_rows import BadRows, read_json_rows
from stages.preprocess.rows import row_problem
from stages.runtime import StageInputError
from tests.fuzz import SPECIAL_TEXT, TEXT, TIME_LIMIT, VALUES, deep, examples

QUESTION, ANSWER = "What is 2 + 2?", "It is 4."
LOG = logging.getLogger("fuzz-rows")
TURN = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", ""]),
                           "content": st.one_of(TEXT, st.just(ANSWER))}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), VALUES, max_size=3),
    VALUES,
)
COLUMN_VALUE = st.one_of(st.just(QUESTION), st.just(ANSWER), TEXT, SPECIAL_TEXT, VALUES)


@st.composite
def json_row(draw) -> dict:
    row = {}
    for name in ("input", "output", "messages", "extra"):
        if draw(st.integers(0, 4)):  # now and then the column is missing
            row[name] = draw(st.lists(TURN, max_size=3) if name == "messages" else COLUMN_VALUE)
    return row


@st.composite
def source_line(draw) -> bytes:
    kind = draw(st.integers(0, 15))  # 11..15: a usable row
    if kind <= 4:
        text = json.dumps(draw(json_row()), ensure_ascii=draw(st.booleans()), allow_nan=True)
    elif kind == 5:
        text = json.dumps(draw(VALUES), allow_nan=True)  # JSON, but not an object
    elif kind == 6:
        text = draw(st.one_of(TEXT, SPECIAL_TEXT))  # not JSON (mostly)
    elif kind == 7:
        return draw(st.binary(min_size=1, max_size=20)).replace(b"\n", b"") + b"\n"  # any bytes
    elif kind == 8:
        text = '{"input": "q", "output": "\\ud800 lone"}'  # a lone surrogate escape
    elif kind == 9:
        text = deep(draw(st.sampled_from([10, 3000, 100_000])))
    elif kind == 10:
        text = draw(st.sampled_from(["", "   ", "\t", "\ufeff"]))  # blank lines are not rows
    else:
        text = json.dumps({"input": QUESTION, "output": ANSWER})
    return text.replace("\n", " ").encode("utf-8", "surrogatepass") + b"\n"


def columns_for(messages: bool) -> ChatColumns:
    return ChatColumns(messages_column="messages") if messages else ChatColumns()


def read(path: Path, columns: ChatColumns, mode: str, tmp: Path):
    bad = BadRows(mode, LOG)
    return read_json_rows(path, columns, bad, tmp / f"{mode}.arrow"), bad


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-rows")


@TIME_LIMIT
@settings(max_examples=examples(500))
@given(lines=st.lists(source_line(), max_size=12), messages=st.booleans())
def test_every_line_is_a_usable_row_or_a_bad_row_named_by_line(workdir: Path, lines: list[bytes], messages: bool) -> None:
    path = workdir / "rows.jsonl"
    path.write_bytes(b"".join(lines))
    columns = columns_for(messages)
    texts = [line.decode("utf-8", "replace") for line in lines]
    texts[:1] = [text.removeprefix("\ufeff") for text in texts[:1]]  # a BOM opens a file, nowhere else
    non_blank = [n for n, text in enumerate(texts, 1) if text.strip()]
    try:
        skipped, bad = read(path, columns, "skip", workdir)
    except StageInputError as error:  # the whole source is unusable: empty, or a column no row has
        message = str(error)
        event("source refused")
        assert "\n" not in message and message.startswith(f"source: {path}")
        assert ("is empty" in message) == (not non_blank)
        return
    assert skipped.rows + bad.count == len(non_blank)
    event(f"{min(skipped.rows, 3)}+ usable, {min(bad.count, 3)}+ bad")
    kept = pa.ipc.open_stream(str(skipped.arrow_path)).read_all().to_pylist()
    assert len(kept) == skipped.rows == len(skipped.positions)
    for position, row in zip(skipped.positions, kept):
        assert position in non_blank and row_problem(row, columns) is None
        source = json.loads(texts[position - 1])
        if messages:  # turns keep their role and content only
            assert row == {"messages": [{"role": t["role"], "content": t["content"]} for t in source["messages"]]}
        else:
            assert row == {"input": source["input"], "output": source["output"]}
    first_bad = next((n for n in non_blank if n not in set(skipped.positions)), None)
    try:
        strict, strict_bad = read(path, columns, "error", workdir)
    except StageInputError as error:
        assert first_bad is not None and "\n" not in str(error)
        assert str(error).startswith(f"source: {path}: line {first_bad}: ")
    else:
        assert first_bad is None and strict.rows == skipped.rows and strict_bad.count == 0


@TIME_LIMIT
@settings(max_examples=examples(500))
@given(batch=st.lists(st.tuples(COLUMN_VALUE, COLUMN_VALUE, st.lists(TURN, max_size=3) | VALUES), min_size=1, max_size=8),
       messages=st.booleans(), seq_len=st.sampled_from([8, 32, 512]), truncate=st.booleans())
def test_any_typed_values_get_a_status_from_the_encoder(tokenizer, batch, messages, seq_len, truncate) -> None:
    """Parquet and hub datasets hand the encoder whatever types their columns hold."""
    columns = columns_for(messages)
    rows = {"input": [b[0] for b in batch], "output": [b[1] for b in batch], "messages": [b[2] for b in batch]}
    out = ConversationEncoder(tokenizer, columns, seq_len, truncate)(rows, list(range(len(batch))))
    for index, status in enumerate(out["status"]):
        problem = row_problem({name: rows[name][index] for name in columns.required()}, columns)
        if problem is not None:
            assert status == f"bad: {problem}" and "\n" not in status
        else:
            assert status == OK or status.startswith(("bad: no assistant tokens", "dropped: "))
        if status == OK:
            assert len(out["input_ids"][index]) <= seq_len and any(label != -100 for label in out["labels"][index])


@TIME_LIMIT
@settings(max_examples=examples(40))
@given(lines=st.lists(source_line(), min_size=1, max_size=8), skip=st.integers(0, 3).map(bool))
def test_the_stage_succeeds_or_fails_in_one_line_leaving_no_half_written_output(tmp_path_factory, lines, skip) -> None:
    work = tmp_path_factory.mktemp("stage")
    source = work / "rows.jsonl"
    source.write_bytes(b"".join(lines))
    code, out = run_preprocess(work / "stage", source=str(source), on_bad_row="skip" if skip else "error",
                               seq_len=64, val_fraction=0.0)
    assert code in (0, 2)
    event(f"exit {code}: {failure(out).split(': ')[-1][:40] if code else 'ok'}")
    assert not (out / ".preprocess-cache").exists()
    if code == 2:
        assert "\n" not in failure(out) and not (out / SUCCESS_MARKER).exists()
        assert not (out / "train").exists() and not (out / "data_manifest.json").exists()
    else:
        manifest = read_data_manifest(out)
        assert manifest["rows_in"] == manifest["rows_out"] + manifest["skipped"] + manifest["dropped"]
