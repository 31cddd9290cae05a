"""`validate`/`run` open a local data source and check its columns before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.params.preprocess import PreprocessParams
from pipeline.cli import main
from pipeline.data_check import check_data_source
from pipeline.errors import ConfigError

GOOD = {"input": "What is 2 + 2?", "output": "4", "license": "cc-by-4.0"}


def study(tmp_path: Path, data: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"study: t\nmodel: Qwen/Qwen3-0.6B\ndata: {data}\n"
                    "runs:\n  bf16: {recipe: bf16, backend: emulated}\n")
    return path


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_a_wrong_column_is_one_line_exit_2_and_starts_nothing(tmp_path: Path, capsys):
    (tmp_path / "rows.jsonl").write_text("not json\n" + json.dumps(GOOD) + "\n")
    config = study(tmp_path, "{source: ./rows.jsonl, output_column: answer}")
    code, err = run_cli(capsys, "run", "-c", str(config), "--root", str(tmp_path / "runs"))
    assert code == 2 and err == (f"error: data.output_column: column 'answer' is not in {tmp_path}/rows.jsonl "
                                 "(its first rows have: input, license, output)\n")
    assert not (tmp_path / "runs").exists()
    code, err = run_cli(capsys, "validate", "-c", str(config), "--set", "data.output_column=output")
    assert code == 0 and err == ""


def test_a_local_path_that_is_not_here_stops_run_but_not_a_cluster_render(tmp_path: Path, capsys):
    config = study(tmp_path, "{source: ./gone.jsonl}")
    code, err = run_cli(capsys, "run", "-c", str(config), "--root", str(tmp_path / "runs"))
    assert code == 2 and err == f"error: data.source: no such file or directory: {tmp_path}/gone.jsonl\n"
    # On a cluster the path may name the cluster's filesystem: render writes its files.
    code, err = run_cli(capsys, "render", "--cluster", "slurm", "-c", str(config), "-o", str(tmp_path / "out"),
                        "--root", str(tmp_path / "runs"))
    assert code == 0, err


def params(source: Path | str, **changes: object) -> PreprocessParams:
    return PreprocessParams(source=str(source), tokenizer="t", **changes)


def test_json_array_parquet_and_saved_dataset_sources(tmp_path: Path):
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([GOOD, GOOD], indent=2))
    check_data_source(params(array), must_exist=True)
    with pytest.raises(ConfigError, match=r"data.messages_column: column 'messages' is not in .*rows.json "
                                          r"\(its first rows have: input, license, output\)"):
        check_data_source(params(array, messages_column="messages"), must_exist=True)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q"], "output": ["a"]}), tmp_path / "rows.parquet")
    with pytest.raises(ConfigError, match="data.input_column: column 'input' is not in .*rows.parquet "
                                          r"\(its first rows have: output, question\)"):
        check_data_source(params(tmp_path / "rows.parquet"), must_exist=True)
    check_data_source(params(tmp_path / "rows.parquet", input_column="question"), must_exist=True)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="fake.parquet: not a readable parquet file"):
        check_data_source(params(tmp_path / "fake.parquet"), must_exist=True)

    saved = tmp_path / "saved"
    (saved / "train").mkdir(parents=True)
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    (saved / "train" / "dataset_info.json").write_text(json.dumps({"features": {"input": {}, "output": {}}}))
    check_data_source(params(saved), must_exist=True)
    with pytest.raises(ConfigError, match=r"data.split: .*saved has no split 'test' \(splits: train\)"):
        check_data_source(params(saved, split="test"), must_exist=True)


def test_unreadable_sources_are_named(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="empty.jsonl is empty"):
        check_data_source(params(tmp_path / "empty.jsonl"), must_exist=True)
    (tmp_path / "prose.jsonl").write_text("no JSON\nhere at all\n")
    with pytest.raises(ConfigError, match="prose.jsonl: none of its first 100 lines is a JSON object"):
        check_data_source(params(tmp_path / "prose.jsonl"), must_exist=True)
    (tmp_path / "rows.csv").write_text("input,output\n")
    with pytest.raises(ConfigError, match="rows.csv: unsupported file type '.csv'"):
        check_data_source(params(tmp_path / "rows.csv"), must_exist=True)
    with pytest.raises(ConfigError, match="data.source: no file matches"):
        check_data_source(params(tmp_path / "part-*.jsonl"), must_exist=True)
    check_data_source(params(tmp_path / "part-*.jsonl"), must_exist=False)
    check_data_source(params("nvidia/OpenScience"), must_exist=True)  # a hub id: not looked up here
