"""Config loading and validation: profiles, overrides, and one-line errors for bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.loader import load_config, profile_names
from pipeline.study import build_study_graph

PROFILES = ("smoke", "h100", "qwen3-8b-b200")


def test_every_profile_validates_and_builds_the_seed_flow():
    assert set(PROFILES) <= set(profile_names())
    for profile in PROFILES:
        graph = build_study_graph(load_config(profile).config)
        names = graph.names
        assert names[0] == "preprocess" and names[-1] == "report"
        # the seed's baseline chain and the four SFT chains
        for stage in ("eval-base", "ptq-qat-nvfp4", "eval-ptq-qat-nvfp4", "train-qat-nvfp4",
                      "export-qat-nvfp4", "eval-qat-nvfp4"):
            assert stage in graph, (profile, stage)
        for run in ("bf16", "fp8", "mxfp8", "nv4f-mx8b"):
            assert graph[f"train-{run}"].upstream == {"data": "preprocess"}
            assert graph[f"export-{run}"].upstream == {"model": f"train-{run}", "data": "preprocess"}
            assert graph[f"eval-{run}"].upstream == {"data": "preprocess", "model": f"export-{run}"}
        assert graph["train-qat-nvfp4"].upstream == {"data": "preprocess", "model": "ptq-qat-nvfp4"}


def test_study_scale_profile_has_the_seed_settings():
    config = load_config("qwen3-8b-b200").config
    train = config.train_params("bf16")
    assert (train.global_batch, train.micro_batch, train.lr, train.steps, train.val_every) == (512, 1, 1e-5, 200, 50)
    assert config.data.seq_len == 4096 and config.data.val_fraction == 0.1
    assert config.model == "Qwen/Qwen3-8B" and config.data.source == "nvidia/OpenScience"
    assert config.resources["train"].gpus_per_node == 8
    assert {run: (r.recipe.name, r.backend) for run, r in config.runs.items() if r.enabled} == {
        "qat-nvfp4": ("nvfp4_qat", "modelopt"), "bf16": ("bf16", "te"), "fp8": ("fp8_delayed", "te"),
        "mxfp8": ("mxfp8", "te"), "nv4f-mx8b": ("nv4f_mx8b", "te")}


def test_overrides_change_one_run_and_add_or_drop_runs():
    loaded = load_config("smoke", ["runs.fp8.train.lr=0.5", "runs.mxfp8.enabled=false",
                                   "runs.extra.recipe=fp8_delayed", "runs.extra.backend=emulated"])
    config = loaded.config
    assert config.train_params("fp8").lr == 0.5
    assert config.train_params("bf16").lr == 3e-3
    graph = build_study_graph(config)
    assert "train-mxfp8" not in graph and "train-extra" in graph
    assert graph["train-extra"].params.recipe.name == "fp8_delayed"


def test_relative_paths_resolve_against_the_config_file():
    config = load_config("smoke").config
    repo = Path(__file__).resolve().parents[2]
    assert config.model == str(repo / "fixtures/models/tiny-qwen3")
    assert config.data.tokenizer == config.model


def test_init_from_another_run_orders_the_graph():
    config = load_config("smoke", ["runs.qat-nvfp4.init_from=bf16", "runs.qat-nvfp4.ptq=false"]).config
    graph = build_study_graph(config)
    assert graph["train-qat-nvfp4"].upstream == {"data": "preprocess", "model": "train-bf16"}
    assert graph.names.index("train-bf16") < graph.names.index("train-qat-nvfp4")


BASE = """\
study: t
model: Qwen/Qwen3-0.6B
data:
  source: nvidia/OpenScience
runs:
  bf16: {recipe: bf16, backend: emulated}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# (yaml text or None for BASE, overrides, expected fragment of the one-line error)
BAD_INPUTS = [
    ("study: t\nmodel: m\ndata: {source: s}\nruns: {bf16: {recipe: bf16, backend: emulated}}\nbogus: 1\n",
     [], "study.yaml:5: bogus: unknown key"),
    (None, ["train.lr=fast"], "--set train.lr=fast: train.lr: Input should be a valid number"),
    (None, ["train.steps=-3"], "train.steps: Input should be greater than or equal to 1"),
    (None, ["runs.bf16.recipe=fp9"], "runs.bf16.recipe: "),
    (None, ["runs.bf16.backend=cuda"], "runs.bf16.backend: Input should be 'emulated', 'te', 'modelopt', 'torchao' or 'scaled_mm'"),
    # A pairing of recipe and backend that no machine runs: refused before anything starts.
    (None, ["runs.bf16.recipe=mxfp8", "runs.bf16.backend=torchao"], "runs.bf16.backend: recipe mxfp8: backend torchao runs "
     "only int4/int8 fprop QAT recipes (int weight, int or bf16 activation, bf16 backward); choose backend emulated or te"),
    (None, ["runs.bf16.recipe=fp8_delayed", "runs.bf16.backend=scaled_mm"], "runs.bf16.backend: recipe fp8_delayed: "
     "backend scaled_mm needs per-tensor FP8 current scaling on all six operands; choose backend emulated"),
    (None, ["runs.bf16.recipe=mxfp8", "runs.bf16.backend=modelopt"], "recipe mxfp8: backend modelopt runs only fake-quantized"),
    (None, ["runs.bf16.recipe=int4_weight_only", "runs.bf16.backend=te"], "recipe int4_weight_only: backend te has no int4 "
     "training; choose backend torchao"),
    (None, ["runs.bf16.recipe=int4_weight_only"], "recipe int4_weight_only: backend emulated does not implement int4 fake quant"),
    (None, ["runs.Bad_Name.recipe=bf16", "runs.Bad_Name.backend=emulated"], "run name 'Bad_Name' must be a DNS-1123 label"),
    (None, ["runs.a-very-long-run-name-that-is-too-long.recipe=bf16",
            "runs.a-very-long-run-name-that-is-too-long.backend=emulated"], "at most 24 characters"),
    (None, ["runs.bf16.init_from=ghost"], "runs.bf16.init_from: 'ghost' is not 'base' or an enabled run"),
    (None, ["runs.bf16.init_from=fp8", "runs.fp8.recipe=fp8", "runs.fp8.backend=emulated",
            "runs.fp8.init_from=bf16"], "dependency cycle: train-bf16 -> train-fp8 -> train-bf16"),
    (None, ["runs.bf16.init_from=bf16"], "dependency cycle: train-bf16 -> train-bf16"),
    (None, ["runs.bf16.enabled=false"], "runs: no enabled run" ),
    (None, ["study=Study_1"], "study: 'Study_1' must be a DNS-1123 label"),
    (None, ["runs.bf16.train.global_batch=5", "runs.bf16.train.micro_batch=2"], "runs.bf16.train: "),
    (None, ["runs.bf16.train.nonsense=1"], "runs.bf16.train: nonsense: unknown key"),
    (None, ["resources.gpu.cpus=2"], "resources: unknown stage kind 'gpu'"),
    (None, ["resources.train.gpus_per_node=-1"], "resources.train.gpus_per_node: Input should be greater than or equal to 0"),
    (None, ["images.strict=true"], "images: refs.cpu: 'faster-qat-cpu:dev' has no @sha256: digest"),
    (None, ["images.stages.train=gpu"], "stages.train: image 'gpu' is not a key of refs"),
    (None, ["data.seq_len=4"], "data.seq_len: Input should be greater than or equal to 8"),
    (None, ["runs.bf16.evaluate=true", "runs.bf16.export=false"], "runs.bf16.evaluate: needs export: true"),
    (None, ["train=3"], "train: Input should be a valid dictionary"),
    (None, ["noequals"], "--set noequals: expected key.path=value"),
    (None, ["runs..x=1"], "empty part in key path"),
    (None, ["study.name=x"], "--set study.name=x: 'study' is not a mapping"),
    ("study: t\nstudy: u\n", [], "study.yaml:2: duplicate key 'study'"),
    ("study: t\n  model: [\n", [], "study.yaml:2: invalid YAML"),
    ("", [], "study.yaml: empty config"),
    ("- a\n- b\n", [], "study.yaml:1: the config must be a mapping"),
    ("study: t\nmodel: m\nruns: {bf16: {recipe: bf16, backend: emulated}}\n", [], "data: required field is missing"),
]


@pytest.mark.parametrize("text,overrides,expected", BAD_INPUTS, ids=[case[2][:40] for case in BAD_INPUTS])
def test_bad_config_is_one_line_exit_2_and_starts_nothing(tmp_path, capsys, text, overrides, expected):
    path = write(tmp_path, BASE if text is None else text)
    args = ["run", "-c", str(path), "--root", str(tmp_path / "runs")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert expected in err, err
    assert not (tmp_path / "runs").exists()


def test_unknown_profile_and_missing_file(capsys, tmp_path):
    assert main(["validate", "-c", "nope"]) == 2
    assert "-c nope: not a file and not a profile; profiles: h100, qwen3-8b-b200, smoke" in capsys.readouterr().err
    assert main(["validate", "-c", str(tmp_path / "gone.yaml")]) == 2
    assert "gone.yaml: config file not found" in capsys.readouterr().err


def test_bad_cli_usage_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", "--cluster", "mars", "-c", "smoke"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'mars'" in err


def test_config_help_describes_every_field(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for line in ("train.lr (float, default 0.0001): Peak learning rate",
                 "runs.<name>.recipe (recipe name | YAML path | mapping, required): Precision recipe",
                 "resources.<kind>.gpus_per_node (int, default 0)",
                 "data.seq_len (int, default 4096)"):
        assert line in out, line
