"""The preprocess stage end to end through stages.runtime: outputs, determinism, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from preprocess_helpers import FIXTURE_DATA, REPO, failure, run_preprocess, write_jsonl

from contract.markers import SUCCESS_MARKER, read_marker
from stages.data import load_split, read_data_manifest

GOOD = {"input": "What is 2 + 2?", "output": "<think>\nsum\n</think>\n\nIt is 4."}


def questions(tokenizer, out_dir: Path, split: str) -> list[str]:
    """The user turns inside a split's rows, decoded back to text."""
    found = []
    for row in load_split(out_dir, split)["input_ids"]:
        found += re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", tokenizer.decode(row.tolist()), re.S)
    return found


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    code, out = run_preprocess(tmp_path_factory.mktemp("packed") / "stage", source=str(FIXTURE_DATA), num_proc=2)
    assert code == 0
    return out


def test_stage_writes_fixed_length_splits_and_a_manifest(packed: Path, tokenizer):
    assert read_marker(packed).state == "succeeded"
    manifest = read_data_manifest(packed)
    summary = json.loads((packed / "manifest.json").read_text())["summary"]  # what the runtime logged
    assert {key: summary[key] for key in manifest} == manifest
    assert manifest["rows_in"] == 400 and manifest["rows_out"] == 400
    assert (manifest["train_conversations"], manifest["val_conversations"]) == (360, 40)
    assert manifest["truncated"] > 0 and manifest["dropped"] == 0 and manifest["skipped"] == 0
    assert 0.8 < manifest["packing_efficiency"] <= 1.0
    train, val = load_split(packed, "train"), load_split(packed, "val")
    assert (len(train), len(val)) == (manifest["train_rows"], manifest["val_rows"])
    batch = train[:8]
    assert batch["input_ids"].shape == (8, 512)
    assert (batch["labels"] != -100).sum() > 0
    restarts = int((train[:]["position_ids"] == 0).sum())
    assert restarts >= manifest["train_conversations"]  # one per conversation (+ one per padded tail)
    assert manifest["tokenizer_hash"] and manifest["vocab_size"] == len(tokenizer)
    assert not (packed / ".preprocess-cache").exists()


def test_no_conversation_in_both_splits(packed: Path, tokenizer):
    train, val = questions(tokenizer, packed, "train"), questions(tokenizer, packed, "val")
    assert len(train) == 360 and len(val) == 40  # every conversation starts inside some row
    assert not set(train) & set(val)


def test_two_runs_give_identical_outputs(packed: Path, tmp_path: Path):
    code, again = run_preprocess(tmp_path / "stage", source=str(FIXTURE_DATA), num_proc=1)
    assert code == 0
    for split in ("train", "val"):
        assert load_split(again, split)[:]["input_ids"].equal(load_split(packed, split)[:]["input_ids"])
        assert load_split(again, split)[:]["labels"].equal(load_split(packed, split)[:]["labels"])
    first, second = read_data_manifest(packed), read_data_manifest(again)
    assert first == second


def test_padding_mode_puts_one_conversation_per_row(tmp_path: Path):
    code, out = run_preprocess(tmp_path / "stage", source=str(FIXTURE_DATA), pack=False, truncate=False, max_rows=50)
    assert code == 0
    manifest = read_data_manifest(out)
    assert manifest["rows_out"] + manifest["dropped"] == 50 and manifest["dropped"] > 0
    assert manifest["train_rows"] == manifest["train_conversations"]
    for row in load_split(out, "train"):
        starts = (row["position_ids"] == 0).nonzero().flatten().tolist()
        assert starts[0] == 0 and len(starts) <= 2  # the conversation, then maybe its padding


@pytest.mark.parametrize(
    ("rows", "params", "message"),
    [
        ([{"question": "q", "output": "a"}], {}, "has no column 'input'"),
        ([GOOD, {"input": "q", "output": "  "}], {}, "bad.jsonl: line 2: empty output"),
        ([{"input": "q " * 600, "output": "a"}, GOOD], {}, "line 1: no assistant tokens after truncation"),
        ([GOOD, GOOD | {"output": 4}], {}, "bad.jsonl: line 2: output is a number (4), not a string"),
        ([GOOD, [1, 2]], {}, "bad.jsonl: line 2: not a JSON object but an array ([1, 2])"),
    ],
)
def test_bad_rows_fail_with_one_line_naming_file_and_row(tmp_path: Path, rows, params, message):
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, out = run_preprocess(tmp_path / "stage", source=str(source), **params)
    assert code == 2 and message in failure(out)
    assert not (out / SUCCESS_MARKER).exists()
    assert not (out / ".preprocess-cache").exists()  # no intermediate files left behind


def test_bad_rows_are_counted_when_skipped(tmp_path: Path):
    source = write_jsonl(tmp_path / "rows.jsonl", [GOOD, {"input": "q", "output": ""}, GOOD | {"input": "3 + 3?"}])
    with source.open("ab") as handle:
        handle.write(b'{"input": "caf\xe9", "output": "x"}\n')  # Latin-1, not UTF-8
    code, out = run_preprocess(tmp_path / "stage", source=str(source), on_bad_row="skip")
    assert code == 0
    manifest = read_data_manifest(out)
    assert (manifest["rows_in"], manifest["rows_out"], manifest["skipped"]) == (4, 2, 2)


def test_a_line_that_is_not_json_is_a_bad_row_named_by_file_and_line(tmp_path: Path):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps(GOOD) + "\n\n" + '{"input": "q", "output": "trailing comma",}\n'
                      + json.dumps(GOOD | {"input": "3 + 3?"}) + "\n")
    code, out = run_preprocess(tmp_path / "stage", source=str(source))
    assert code == 2
    assert failure(out).endswith("rows.jsonl: line 3: not JSON (Expecting property name enclosed in double "
                                 "quotes at column 43); fix the row or set on_bad_row: skip")
    code, out = run_preprocess(tmp_path / "skipped", source=str(source), on_bad_row="skip")
    assert code == 0
    manifest = read_data_manifest(out)
    assert (manifest["rows_in"], manifest["rows_out"], manifest["skipped"]) == (3, 2, 1)


def test_a_lone_surrogate_escape_is_a_bad_row(tmp_path: Path):
    source = tmp_path / "rows.jsonl"
    source.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD | {"output": "\ud800"}) + "\n")  # ASCII escapes
    code, out = run_preprocess(tmp_path / "stage", source=str(source))
    assert code == 2 and "line 2: output is not valid Unicode (a lone surrogate \\ud800)" in failure(out)


def test_a_column_no_row_has_is_named_even_when_bad_rows_are_skipped(tmp_path: Path):
    source = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}] * 3)
    code, out = run_preprocess(tmp_path / "stage", source=str(source), on_bad_row="skip")
    assert code == 2 and failure(out).endswith("rows.jsonl has no column 'input' in any row; "
                                               "set input_column/output_column or messages_column")


def test_a_json_array_file_is_read_as_rows_named_by_item(tmp_path: Path):
    source = tmp_path / "rows.json"
    source.write_text(json.dumps([GOOD, GOOD | {"input": "5 + 5?"}, GOOD | {"output": None}], indent=2))
    code, out = run_preprocess(tmp_path / "stage", source=str(source))
    assert code == 2 and "rows.json: item 3: output is null, not a string" in failure(out)
    code, out = run_preprocess(tmp_path / "skipped", source=str(source), on_bad_row="skip", val_fraction=0.0)
    assert code == 0 and read_data_manifest(out)["rows_out"] == 2


def test_non_utf8_line_is_named(tmp_path: Path):
    source = tmp_path / "latin.jsonl"
    source.write_bytes(json.dumps(GOOD).encode() + b'\n{"input": "caf\xe9", "output": "x"}\n')
    code, out = run_preprocess(tmp_path / "stage", source=str(source))
    assert code == 2 and "latin.jsonl: line 2: not UTF-8" in failure(out)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("empty.jsonl", "is empty"),
        ("missing/rows.jsonl", "no such file or directory"),
    ],
)
def test_unusable_source_fails(tmp_path: Path, source: str, message: str):
    (tmp_path / "empty.jsonl").write_text("\n")
    code, out = run_preprocess(tmp_path / "stage", source=str(tmp_path / source))
    assert code == 2 and message in failure(out)


def test_invalid_params_name_the_field(tmp_path: Path):
    code, out = run_preprocess(tmp_path / "stage", source=str(FIXTURE_DATA), seq_len=2)
    assert code == 2 and failure(out).startswith("preprocess: params.seq_len:")


@pytest.mark.slow  # a fresh interpreter importing transformers: ~10 s on 2 cores
def test_module_entry_point_runs_the_stage(tmp_path: Path):
    from tests.spec_files import write_spec_file

    spec = write_spec_file(tmp_path / "s", "preprocess", {"source": str(FIXTURE_DATA), "seq_len": 256, "max_rows": 20,
                                                          "tokenizer": str(REPO / "fixtures" / "tokenizer")})
    done = subprocess.run([sys.executable, "-m", "stages.preprocess", "--spec", str(spec)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_data_manifest(tmp_path / "s")["rows_out"] == 20


def test_parquet_source_with_a_messages_column(tmp_path: Path, tokenizer):
    import datasets

    chats = [[{"role": "user", "content": f"Element {n}?"}, {"role": "assistant", "content": f"Number {n}."}]
             for n in range(10)]
    datasets.Dataset.from_dict({"messages": chats}).to_parquet(str(tmp_path / "chats.parquet"))
    code, out = run_preprocess(tmp_path / "stage", source=str(tmp_path / "chats.parquet"),
                               messages_column="messages", seq_len=64, pack=False, val_fraction=0.2)
    assert code == 0
    manifest = read_data_manifest(out)
    assert (manifest["train_rows"], manifest["val_rows"]) == (8, 2)
    row = load_split(out, "val")[0]
    trained = row["input_ids"][row["labels"] != -100].tolist()
    assert tokenizer.decode(trained).startswith("<think>\n\n</think>\n\nNumber ")


def test_glob_of_files_names_the_file_of_a_bad_row(tmp_path: Path):
    write_jsonl(tmp_path / "part-0.jsonl", [GOOD, GOOD | {"input": "1 + 1?"}])
    write_jsonl(tmp_path / "part-1.jsonl", [GOOD | {"input": "5 + 5?"}, {"input": "q", "output": ""}])
    code, out = run_preprocess(tmp_path / "stage", source=str(tmp_path / "part-*.jsonl"))
    assert code == 2 and "part-1.jsonl: line 2: empty output" in failure(out)


def test_no_validation_split(tmp_path: Path):
    code, out = run_preprocess(tmp_path / "stage", source=str(FIXTURE_DATA), max_rows=30, val_fraction=0.0)
    assert code == 0
    assert read_data_manifest(out)["val_rows"] == 0 and len(load_split(out, "val")) == 0
    assert read_data_manifest(out)["train_conversations"] == 30
