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
    # The base model is pinned to a commit, and so is its tokenizer (the model's, at the same commit).
    assert config.model_revision == "b968826d9c46dd6066d109eabc6255188de91218"
    assert config.data.tokenizer == "Qwen/Qwen3-8B" and config.data.tokenizer_revision == config.model_revision
    graph = build_study_graph(config)
    assert {graph[name].params.model_revision for name in ("eval-base", "ptq-qat-nvfp4", "train-bf16")} == {
        config.model_revision}
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


def test_the_graph_takes_the_params_the_config_built_and_one_value_per_recipe():
    config = load_config("smoke").config
    graph = build_study_graph(config)
    assert graph["export-fp8"].params is config.export_params("fp8")  # validated once, with the config
    assert graph["train-fp8"].params.lr == config.train_params("fp8").lr
    # A built-in recipe is read once: eval-base's bf16 is the very value the bf16 run holds.
    assert graph["eval-base"].params.recipe is config.runs["bf16"].recipe is graph["train-bf16"].params.recipe


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
    (None, ["runs.bf16.recipe=mxfp8", "runs.bf16.backend=scaled_mm"], "runs.bf16.backend: recipe mxfp8: "
     "backend scaled_mm needs per-tensor FP8 (current or delayed scaling) on all six operands; choose backend emulated"),
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
    # Found by the property-based tests (tests/pipeline/test_fuzz_config.py) or the issue:
    ("a: &x [*x]\n", [], "study.yaml:1: 'a.0' contains itself (a recursive alias)"),
    (None, ["description=&x [*x]"], "--set description=&x [*x]:1: '0' contains itself (a recursive alias)"),
    ("study: " + "[" * 1000 + "]" * 1000 + "\n", [], "study.yaml: invalid YAML: nested deeper than 32 levels"),
    ("study: " + "[" * 40 + "]" * 40 + "\n", [], "study.yaml:1: nested deeper than 32 levels"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\nf: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
     [], "study.yaml: expands to more than 20000 values (through aliases)"),
    ("? [a, b]\n: 1\n", [], "study.yaml:1: invalid YAML: found unhashable key"),
    ("study: \x07bell\n", [], "study.yaml: invalid YAML: unacceptable character #x0007"),
    (None, ["runs=[1,2]"], "--set runs=[1,2]: runs: Input should be a valid dictionary"),
    (None, ["runs.bf16.resources.gpus=2"], "--set runs.bf16.resources.gpus=2: runs.bf16.resources: gpus: unknown key"),
    (None, ["runs.bf16.recipe=" + "a" * 300], "runs.bf16.recipe: recipe aaaa"),
    (None, ["runs.bf16.recipe=/" + "a" * 300 + ".yaml"], ".yaml: file not found"),
    (None, ["images.lock_file=/" + "a" * 300], "images: lock_file: '/aaaa"),
    (None, ["slurm.profile=/" + "a" * 300], "slurm: profile '/aaaa"),
    (None, ["resources.train.memory_gb=.inf"], "resources.train.memory_gb: Input should be a finite number"),
    (None, ["train.lr=.nan"], "train.lr: Input should be a finite number"),
    (None, ['study="two\\nlines"'], "study: 'two\\nlines' must be a DNS-1123 label"),  # a YAML escape: a newline
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


def test_one_kind_s_image_can_be_changed_alone():
    config = load_config("smoke", ["images.stages.train=cpu"]).config
    assert config.images.stages["train"] == "cpu" and config.images.stages["preprocess"] == "cpu"
    assert build_study_graph(config)["train-bf16"].image == "cpu"


@pytest.mark.parametrize("command", ["status", "report", "sync", "cancel", "logs"])
def test_a_run_that_does_not_exist_is_bad_input(tmp_path, capsys, command):
    args = [command, "nosuch", *(["stage"] if command == "logs" else []), "--root", str(tmp_path)]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: run 'nosuch': no such run under {tmp_path}\n"
    none = tmp_path / "none"  # no run named: the latest one, and there is none
    args = [command, "nosuch", "stage"] if command == "logs" else [command]
    assert main([*args, "--root", str(none)]) == 2
    expected = f"run 'nosuch': no such run under {none}" if command == "logs" else f"--root {none}: no runs here"
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("args,expected", [
    (["run", "-c", "smoke", "--run-id", "../escape"], "--run-id ../escape: must be a DNS-1123 label"),
    (["run", "-c", "smoke", "--max-parallel", "0"], "argument --max-parallel: 0: must be at least 1"),
    (["logs", "r", "s", "--tail", "-1"], "argument --tail: -1: must be 0 (all) or more"),
])
def test_bad_cli_values_are_one_line_exit_2(tmp_path, capsys, args, expected):
    try:
        code = main([*args, "--root", str(tmp_path / "runs")])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()


def test_a_root_or_output_that_is_a_file_is_bad_input(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["run", "-c", "smoke", "--root", str(tmp_path / "file" / "runs")]) == 2
    assert capsys.readouterr().err == f"error: --root {tmp_path}/file/runs: not a directory ({tmp_path}/file is a file)\n"
    assert main(["render", "--cluster", "slurm", "-c", "smoke", "--root", str(tmp_path / "runs"),
                 "-o", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"error: -o {tmp_path}/file: not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


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


@pytest.mark.parametrize("overrides, expected", [
    (["model_revision=main branch"], "--set model_revision=main branch: model_revision: 'main branch' is not a "
     "hub revision: give a commit hash (40 hex digits, which pins the files) or a tag name"),
    (["data.source_revision=../up"], "data.source_revision: '../up' is not a hub revision"),
    (["model=./local-model"], "model_revision: model "),  # the profile's revision with a local model
    (["train.model_revision=v1.0"], "train: model_revision: set without model"),
])
def test_a_bad_or_misplaced_revision_is_one_line_exit_2(capsys, overrides, expected):
    args = [item for override in overrides for item in ("--set", override)]
    assert main(["validate", "-c", "qwen3-8b-b200", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_a_tag_or_commit_is_a_revision_and_a_hub_tokenizer_keeps_its_own():
    config = load_config("qwen3-8b-b200", ["model_revision=v1.0", "data.tokenizer=Qwen/Qwen3-0.6B"]).config
    assert config.model_revision == "v1.0" and config.data.tokenizer_revision is None
