"""What stages.runtime refuses before a stage's work starts, and how stages read upstreams
they do not trust (regressions found by tests/stages/test_fuzz_specs.py)."""

from __future__ import annotations

import json
from pathlib import Path

from contract.markers import mark_succeeded, read_marker
from contract.spec import StageSpec, write_spec
from stages.probe.core import run as probe
from stages.report.core import run as report
from stages.runtime import run_stage

# Valid params of each kind used here: what is refused must be the spec's shape, not its params.
PARAMS = {"probe": {}, "train": {"recipe": "bf16"}}


def spec(tmp_path: Path, kind: str, inputs: dict[str, Path] | None = None) -> Path:
    params = PARAMS[kind] if kind in PARAMS else {
        "study": "s", "inputs": {role: {"run": "x", "phase": "trained"} for role in inputs or {}}}
    return write_spec(StageSpec(run_id="r", stage="s", kind=kind, fingerprint="f" * 16,
                                output_dir=tmp_path / "out", inputs=inputs or {}, params=params))


def test_a_spec_of_another_kind_is_refused_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    path = spec(tmp_path, "train")
    assert run_stage(path, probe) == 2  # `python -m stages.probe` would have marked train done
    assert capsys.readouterr().err == (f"error: {path}: spec.kind is 'train' but this is stages.probe; "
                                       "run `python -m stages.train`\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["spec.json"]


def test_an_invalid_spec_names_its_field(tmp_path: Path, capsys) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"run_id": 1, "stage": "s", "kind": "probe", "fingerprint": "f",
                                "output_dir": str(tmp_path / "out")}))
    assert run_stage(path, probe) == 2
    line = f"{path}: invalid stage spec: run_id: Input should be a valid string"
    assert capsys.readouterr().err == f"error: {line}\n"
    # The stage dir is known: the failure is marked there, for status to show (and nothing else).
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_FAILED"]
    marker = read_marker(tmp_path / "out")
    assert (marker.state, marker.exit_code, marker.error) == ("failed", 2, line)


def test_upstreams_without_the_files_their_readers_need_are_one_line_errors(tmp_path: Path) -> None:
    upstream = tmp_path / "train-x"
    upstream.mkdir()
    mark_succeeded(upstream, "up")  # marked done, but holds nothing
    assert run_stage(spec(tmp_path / "p", "probe", {"in": upstream}), probe) == 2
    assert read_marker(tmp_path / "p" / "out").error == f"s: inputs: {upstream}/output.txt: unreadable " \
        f"([Errno 2] No such file or directory: '{upstream}/output.txt')"
    assert run_stage(spec(tmp_path / "r", "report", {"train-x": upstream}), report) == 2
    assert read_marker(tmp_path / "r" / "out").error.startswith(
        f"s: inputs.train-x: {upstream}/spec.json: not a stage spec ([Errno 2] No such file")
    write_spec(StageSpec(run_id="r", stage="train-x", kind="train", fingerprint="u", output_dir=upstream,
                         params=PARAMS["train"]))
    (upstream / "manifest.json").write_text('{"summary": "no mapping"}')
    assert run_stage(spec(tmp_path / "r2", "report", {"train-x": upstream}), report) == 2
    assert read_marker(tmp_path / "r2" / "out").error == f"s: inputs: {upstream}/manifest.json: its summary is not a mapping"


def test_a_data_input_whose_split_is_not_a_saved_dataset_is_a_one_line_error(tmp_path: Path) -> None:
    import pytest

    from stages.data import load_split
    from stages.runtime import StageInputError

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "state.json").write_text("[]")  # found by the spec fuzz: datasets raised
    with pytest.raises(StageInputError, match=r"^data: .*/train is not a readable preprocessed split \("):
        load_split(tmp_path, "train")


def test_a_spec_with_a_relative_output_dir_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    """Found by the long spec fuzz: the stage wrote `_FAILED` and tracking files into its cwd."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"run_id": "r", "stage": "s", "kind": "probe", "fingerprint": "f", "output_dir": "out"}))
    assert run_stage(path, probe) == 2
    assert capsys.readouterr().err == f"error: {path}: invalid stage spec: output_dir: 'out' is not an absolute path\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]
