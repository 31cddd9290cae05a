"""Generated study configs and `--set` pairs at every path of the schema: each ends in a valid
config or one line with exit 2, and `run` with a bad one writes nothing (see tests/fuzz.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.params import ExportParams, TrainParams
from pipeline.config import StudyConfig
from pipeline.resources import Resources
from tests.fuzz import (
    ARGV_TEXT,
    SPECIAL_TEXT,
    TEXT,
    TIME_LIMIT,
    assert_clean_ending,
    deep,
    examples,
    run_cli,
    schema_paths,
    surrogate_safe,
    tree,
    values_for,
)

BASE: dict[str, Any] = {
    "study": "fuzz",
    "model": "Qwen/Qwen3-0.6B",
    "data": {"source": "./rows.jsonl", "seq_len": 64},
    "runs": {"bf16": {"recipe": "bf16", "backend": "emulated"},
             "fp8": {"recipe": "fp8", "backend": "emulated", "init_from": "bf16"}},
}
ROWS = '{"input": "What is 2 + 2?", "output": "4"}\n'

# Every field of the study, and the per-run overrides that merge into the stages' own models.
PATHS = schema_paths(StudyConfig) + [
    (("runs", "*", "train", *path), annotation) for path, annotation in schema_paths(TrainParams)
] + [
    (("runs", "*", "export_overrides", *path), annotation) for path, annotation in schema_paths(ExportParams)
] + [
    (("runs", "*", "resources", *path), annotation) for path, annotation in schema_paths(Resources)
]
RUN_NAMES = st.sampled_from(["bf16", "fp8", "new-run", "Bad_Name", "x" * 30, ""])
KINDS = st.sampled_from(["train", "preprocess", "eval", "gpu", "*"])


@st.composite
def schema_edit(draw) -> tuple[tuple[str, ...], Any]:
    path, annotation = draw(st.sampled_from(PATHS))
    concrete = tuple(draw(KINDS if path[:1] == ("resources",) else RUN_NAMES) if part == "*" else part
                     for part in path)
    return concrete, draw(values_for(annotation))


def apply_edit(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = config
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


# Text-level damage a YAML file can carry beyond what a generated mapping dumps to.
YAML_DAMAGE = st.sampled_from([
    "a: &x [*x]\n",                                        # a recursive alias (the case)
    "description: &x {a: *x}\n",
    "x0: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nx1: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "x2: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nx3: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "x4: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n",      # "billion laughs"
    "study: again\n",                                      # a duplicate key
    "runs: {bf16: {recipe: bf16, backend: emulated}, bf16: {recipe: fp8, backend: emulated}}\n",
    f"description: {deep(400)}\n",                          # deeper than PyYAML can recurse
    f"runs: {{bf16: {{train: {{lr: {deep(40)}}}}}}}\n",
    "? [complex, key]\n: 1\n",                             # an unhashable key
    "study: !!python/object/apply:os.system [echo]\n",
    "study: !!binary aGVsbG8=\n",
    "<<: {study: merged}\n",
    "\tstudy: tab\n",
    "study: 'unterminated\n",
    "%YAML 1.1\n---\nstudy: two\n---\nstudy: docs\n",
    "study: \x07bell\n",
    "123: number-key\n",
    "null: null-key\n",
    "- a list\n",
])


@st.composite
def config_text(draw) -> bytes:
    config = json.loads(json.dumps(BASE))
    for path, value in draw(st.lists(schema_edit(), max_size=4)):
        apply_edit(config, path, value)
    text = yaml.safe_dump(config, allow_unicode=True, sort_keys=False)
    how = draw(st.sampled_from(["plain", "prepend", "append", "replace", "garbage", "bytes"]))
    if how == "prepend":
        text = draw(YAML_DAMAGE) + text
    elif how == "append":
        text = text + draw(YAML_DAMAGE)
    elif how == "replace":
        text = draw(YAML_DAMAGE)
    elif how == "garbage":
        text = draw(st.one_of(TEXT, SPECIAL_TEXT))
    data = surrogate_safe(text)
    if how == "bytes":
        data = draw(st.binary(max_size=64)) + data
    return data


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-config")
    (path / "rows.jsonl").write_text(ROWS)
    return path


def check_validate_then_run(workdir: Path, config: Path, sets: list[str], also_run: bool) -> None:
    args = [item for pair in sets for item in ("--set", pair)]
    outcome = run_cli(["validate", "-c", str(config), *args])
    assert_clean_ending(outcome)
    if outcome.code == 0 or not also_run:
        return  # a valid config: `run` would start the study, which is no fuzz case
    root = workdir / "runs"
    before = tree(workdir)
    ran = run_cli(["run", "-c", str(config), *args, "--root", str(root), "--plain"])
    prog = "error: python -m pipeline "
    if outcome.err.startswith(f"{prog}validate: "):  # argparse's own: `run` has other options to name
        assert_clean_ending(ran, allowed=(2,))
    else:
        assert (ran.code, ran.err) == (outcome.code, outcome.err)  # run validates first, the same way
    assert not root.exists() and tree(workdir) == before  # and writes nothing


@TIME_LIMIT
@settings(max_examples=examples(800))
@given(text=config_text(), also_run=st.integers(0, 3).map(lambda n: n == 0))
def test_generated_config_files_end_valid_or_in_one_line(workdir: Path, text: bytes, also_run: bool) -> None:
    config = workdir / "study.yaml"
    config.write_bytes(text)
    check_validate_then_run(workdir, config, [], also_run)


@st.composite
def set_pair(draw) -> str:
    path, value = draw(schema_edit())
    key = ".".join(path)
    if draw(st.booleans()):
        shown = draw(st.one_of(TEXT, SPECIAL_TEXT, st.sampled_from(["&x [*x]", deep(400), "{a: *b}"])))
    else:
        shown = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).removesuffix("\n...\n").strip()
    if draw(st.integers(0, 9)) == 0:  # now and then a key that is not a path at all
        key = draw(st.one_of(TEXT, SPECIAL_TEXT, st.just(key + "..x")))
    return f"{key}={shown}" if draw(st.integers(0, 19)) else key


@TIME_LIMIT
@settings(max_examples=examples(1000))
@given(sets=st.lists(set_pair(), min_size=1, max_size=3), also_run=st.integers(0, 3).map(lambda n: n == 0))
def test_set_pairs_at_every_path_end_valid_or_in_one_line(workdir: Path, sets: list[str], also_run: bool) -> None:
    config = workdir / "base.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump(BASE, sort_keys=False))
    check_validate_then_run(workdir, config, [pair for pair in sets if "\x00" not in pair], also_run)


FREE_TEXT_FIELDS = ["description", "data.system_prompt", "data.input_column", "tracking.experiment",
                    "report.baseline_run", "eval.lm_eval_tasks", "runs.bf16.recipe", "model", "--run-id"]


@TIME_LIMIT
@settings(max_examples=examples(15))
@given(field=st.sampled_from(FREE_TEXT_FIELDS), value=ARGV_TEXT)
def test_free_text_reaches_the_written_specs_or_is_refused_in_one_line(workdir: Path, field: str, value: str) -> None:
    """Valid configs get as far as writing specs and job scripts (render writes, starts nothing):
    whatever text a field holds must serialise there, or be refused before anything is written."""
    config = workdir / "base.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump(BASE, sort_keys=False))
    root, output = workdir / "render-root", workdir / "render-out"
    option = ["--run-id", value] if field == "--run-id" else ["--set", f"{field}={value}"]
    before = tree(workdir)
    outcome = run_cli(["render", "--cluster", "slurm", "-c", str(config), *option, "--root", str(root), "-o", str(output)])
    assert_clean_ending(outcome)
    if outcome.code == 2:
        assert tree(workdir) == before
