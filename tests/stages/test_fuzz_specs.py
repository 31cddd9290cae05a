"""Generated spec.json files handed to each stage kind, in-process through stages.runtime (and
a few through `python -m stages.<kind>`): an unreadable spec exits 2 and writes nothing; a
readable one with bad params or broken upstream outputs exits 2 (42: an upstream that did not
succeed) with one line and a `_FAILED` marker, and never a `_SUCCESS` or a half output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from contract.markers import (
    FAILED_MARKER,
    SUCCESS_MARKER,
    UPSTREAM_FAILED_EXIT,
    mark_succeeded,
    read_marker,
)
from contract.params import STAGE_PARAMS
from stages.runtime import run_stage
from tests.fuzz import (
    SPECIAL_TEXT,
    TEXT,
    TIME_LIMIT,
    VALUES,
    examples,
    schema_paths,
    tree,
    values_for,
)

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = str(REPO / "fixtures" / "tokenizer")
# What each kind's spec carries: the contract's params model of the kind (contract.params).
PARAMS = STAGE_PARAMS
# Valid starting points, so that edits reach past parameter validation into the stage's work.
BASE_PARAMS: dict[str, dict[str, Any]] = {
    "preprocess": {"source": "/nonexistent/rows.jsonl", "tokenizer": TOKENIZER, "seq_len": 64},
    "train": {"device": "cpu", "dtype": "float32", "global_batch": 2, "micro_batch": 1, "steps": 1,
              "recipe": "bf16"},
    "eval": {"device": "cpu", "dtype": "float32", "recipe": "bf16"},
    "export": {},
    "ptq": {"device": "cpu", "dtype": "float32", "recipe": "nvfp4_qat", "backend": "emulated"},
    "report": {"study": "fuzz"},  # + a row for each input (see params_for)
    "probe": {},
}
# Fields that name a model, tokenizer or dataset: a hub id would be looked up on the network
# (~45 s to fail here), which is no input handling; they stay local paths.
LOCATIONS = ("model", "teacher_model", "tokenizer", "source", "lm_eval_task_dir")


def work_of(kind: str):
    module = __import__(f"stages.{kind}.core", fromlist=["run"])
    return module.run


def local_only(params: Any) -> Any:
    if isinstance(params, dict):
        return {key: (f"/nonexistent/{value}" if key in LOCATIONS and isinstance(value, str)
                      and not value.startswith("/") else local_only(value)) for key, value in params.items()}
    return params


@st.composite
def params_for(draw, kind: str, roles: list[str]) -> dict[str, Any]:
    params = json.loads(json.dumps(BASE_PARAMS[kind]))
    if kind == "report":  # the row each input fills, as the study graph gives it
        params["inputs"] = {role: {"run": role.split("-")[-1], "phase": "trained"} for role in roles}
    paths = schema_paths(PARAMS[kind])
    for _ in range(draw(st.integers(0, 3))):
        path, annotation = draw(st.sampled_from(paths))
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[path[-1]] = draw(values_for(annotation))
    if draw(st.integers(0, 9)) == 0:
        params[draw(st.one_of(TEXT, SPECIAL_TEXT))] = draw(VALUES)
    if kind == "probe":  # a probe sleeps as long as it is told: keep it short
        for key in ("sleep_s", "metric_every_s"):
            if not isinstance(params.get(key), (int, float)) or not 0 <= params[key] <= 0.05:
                params.pop(key, None)
    return local_only(params)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-specs")
    (path / "cwd").mkdir()
    for name in ("done-empty", "done-junk"):
        (path / name).mkdir()
        mark_succeeded(path / name, "upstream")
    junk = path / "done-junk"
    for name in ("spec.json", "data_manifest.json", "metrics.jsonl", "manifest.json", "precision.json"):
        (junk / name).write_text("{not json")
    for name in ("train", "val", "model", "export"):
        (junk / name).mkdir()
        (junk / name / "state.json").write_text("[]")
        (junk / name / "config.json").write_text('{"model_type": "nope"}')
    (path / "failed").mkdir()
    (path / "failed" / FAILED_MARKER).write_text(json.dumps(
        {"state": "failed", "fingerprint": "x", "finished_at": 0, "host": "h", "error": "boom", "exit_code": 1}))
    return path


@st.composite
def spec_json(draw, workdir: Path, counter: list[int]) -> tuple[str, str, Path]:
    """(work kind, spec text, output dir): the spec names a kind; the module that runs it may differ."""
    counter[0] += 1
    out = workdir / "out" / str(counter[0])
    kind = draw(st.sampled_from(sorted(PARAMS)))
    runner = kind if draw(st.integers(0, 9)) else draw(st.sampled_from(sorted(PARAMS)))
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return runner, draw(st.one_of(TEXT, SPECIAL_TEXT, st.just('{"a": ' + "1" * 5000 + "}"))), out
    upstream = st.sampled_from(["done-empty", "done-junk", "failed", "missing"]).map(lambda name: str(workdir / name))
    inputs = draw(st.dictionaries(st.sampled_from(["data", "model", "teacher", "eval-x", "train-y"]), upstream,
                                  max_size=2))
    spec: dict[str, Any] = {
        "run_id": "fuzz", "stage": kind, "kind": kind, "fingerprint": "f" * 16, "output_dir": str(out),
        "inputs": inputs, "params": draw(params_for(kind, sorted(inputs))), "tags": {},
    }
    if shape == 1:  # a field of the wrong type or an unknown one
        spec[draw(st.sampled_from([*spec, "extra", "tracking"]))] = draw(VALUES)
    if shape == 3:  # a relative output dir or input: relative to where the stage happens to start
        spec[draw(st.sampled_from(["output_dir", "inputs"]))] = draw(st.sampled_from(["out", {"data": "data"}]))
    text = json.dumps(spec, allow_nan=True)
    if shape == 2 and isinstance(spec["params"], dict):  # a number beyond Python's int/str limit
        text = text.replace('"params": {', '"params": {"huge": ' + "9" * 5000 + ", ", 1)
    return runner, text, out


COUNTER = [0]


@TIME_LIMIT
@settings(max_examples=examples(600))
@given(data=st.data())
def test_any_spec_ends_in_one_line_and_no_half_written_output(workdir: Path, data, capsys, monkeypatch) -> None:
    runner, text, out = data.draw(spec_json(workdir, COUNTER))
    monkeypatch.chdir(workdir / "cwd")  # a relative path in a spec must not land here
    spec_path = workdir / "specs" / f"{COUNTER[0]}.json"
    spec_path.parent.mkdir(exist_ok=True)
    spec_path.write_text(text, encoding="utf-8", errors="surrogatepass")
    before = {name: tree(workdir / name) for name in ("done-empty", "done-junk", "failed")}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = run_stage(spec_path, work_of(runner))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    err = capsys.readouterr().err
    marker = read_marker(out)
    # Which examples got past the spec and its params into the stage's own reading of its inputs.
    refused = code == 2 and (marker is None or "invalid stage spec" in err or ": params" in (marker.error or ""))
    event(f"{runner}: exit {code}{' (spec or params refused)' if refused else ''}")
    if code == 0:
        assert marker is not None and marker.state == "succeeded"
        assert json.loads(text)["kind"] == runner  # a spec runs only in the module of its kind
    else:
        assert code in (2, UPSTREAM_FAILED_EXIT) or (runner == "probe" and '"fail": true' in text and code == 1), err
        assert "Traceback" not in err or code == 1, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err
        assert not (out / SUCCESS_MARKER).exists()
        if marker is None:  # the spec itself was unreadable: nothing written at all
            assert not out.exists()
        else:
            assert marker.state == "failed" and "\n" not in (marker.error or "")
            assert marker.exit_code == code
    assert {name: tree(workdir / name) for name in before} == before  # upstream outputs untouched
    assert tree(workdir / "cwd") == {}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["probe", "preprocess"])
def test_the_module_entry_point_refuses_a_bad_spec_in_one_line(tmp_path: Path, kind: str) -> None:
    """The real `python -m stages.<kind>`: a spec that is not JSON, and one with bad params."""
    (tmp_path / "garbage.json").write_text("{not json")
    bad_params = {"run_id": "r", "stage": "s", "kind": kind, "fingerprint": "f", "output_dir": str(tmp_path / "out"),
                  "params": {"seq_len": "long", "sleep_s": -1}}
    (tmp_path / "bad.json").write_text(json.dumps(bad_params))
    for spec, written in (("garbage.json", False), ("bad.json", True)):
        done = subprocess.run([sys.executable, "-m", f"stages.{kind}", "--spec", str(tmp_path / spec)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
        assert "Traceback" not in done.stderr
        assert (tmp_path / "out").exists() == written
