"""Fingerprints cover everything a stage reads: its typed params with the recipe's content, and the
content of the local files and folders it reads from outside the run (data, model, tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

from contract.params import ExternalInput
from pipeline.inputs import InputDigests
from pipeline.loader import load_config
from pipeline.plan import plan_run

REPO = Path(__file__).resolve().parents[2]


def fingerprints(config_path: Path, *overrides: str) -> dict[str, str]:
    config = load_config(str(config_path), list(overrides)).config
    return plan_run(config, "smoke", Path("/runs"), None, "local").fingerprints


def smoke_copy(tmp_path: Path) -> Path:
    """The smoke profile beside its own copies of the data file and a user recipe."""
    shutil.copy(REPO / "fixtures" / "openscience" / "openscience.jsonl", tmp_path / "data.jsonl")
    shutil.copy(REPO / "contract" / "recipes" / "fp8.yaml", tmp_path / "my_fp8.yaml")
    text = (REPO / "pipeline" / "profiles" / "smoke.yaml").read_text()
    text = text.replace("../../fixtures/openscience/openscience.jsonl", "./data.jsonl")
    text = text.replace("../../fixtures/", f"{REPO}/fixtures/")
    text = text.replace("fp8: {recipe: fp8, backend: emulated}", "fp8: {recipe: ./my_fp8.yaml, backend: emulated}")
    (tmp_path / "study.yaml").write_text(text)
    return tmp_path / "study.yaml"


def test_editing_the_data_file_in_place_changes_every_fingerprint_below_preprocess(tmp_path):
    study = smoke_copy(tmp_path)
    before = fingerprints(study)
    with (tmp_path / "data.jsonl").open("a") as data:
        data.write('{"input": "one more question?", "output": "one more answer."}\n')
    after = fingerprints(study)
    assert all(before[name] != after[name] for name in before)  # every stage reads preprocess's output


def test_editing_a_user_recipe_changes_its_run_only(tmp_path):
    study = smoke_copy(tmp_path)
    before = fingerprints(study)
    recipe = tmp_path / "my_fp8.yaml"
    recipe.write_text(recipe.read_text().replace("description:", "fake_quant_after_steps: 1\ndescription:", 1))
    after = fingerprints(study)
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == ["eval-fp8", "export-fp8", "report", "train-fp8"]


def test_a_local_base_model_is_read_by_content(tmp_path):
    shutil.copytree(REPO / "fixtures" / "models" / "tiny-qwen3", tmp_path / "model")
    study = smoke_copy(tmp_path)
    before = fingerprints(study, f"model={tmp_path / 'model'}")
    (tmp_path / "model" / "generation_config.json").write_text('{"do_sample": false}\n')
    after = fingerprints(study, f"model={tmp_path / 'model'}")
    assert before["train-bf16"] != after["train-bf16"] and before["eval-base"] != after["eval-base"]
    assert before["preprocess"] != after["preprocess"]  # the tokenizer defaults to the model's


def test_the_same_config_gives_the_same_fingerprints(tmp_path):
    study = smoke_copy(tmp_path)
    assert fingerprints(study) == fingerprints(study)


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def test_a_hub_id_is_read_at_its_revision():
    digests = InputDigests()
    assert digests(ExternalInput("model", "Qwen/Qwen3-8B", COMMIT_A)) == f"hub:Qwen/Qwen3-8B@{COMMIT_A}"
    assert digests(ExternalInput("model", "Qwen/Qwen3-8B")) == "hub:Qwen/Qwen3-8B@unpinned"


def test_a_hub_revision_changes_the_stages_that_load_it_and_their_dependents():
    """The study-scale profile reads hub ids only (nothing here is opened). The tokenizer is pinned
    on its own, so moving the model's revision leaves preprocess alone."""
    study = "qwen3-8b-b200"
    base = fingerprints(study, f"data.tokenizer_revision={COMMIT_A}", f"data.source_revision={COMMIT_A}")
    model_moved = fingerprints(study, f"data.tokenizer_revision={COMMIT_A}", f"data.source_revision={COMMIT_A}",
                               f"model_revision={COMMIT_B}")
    assert sorted(name for name in base if base[name] == model_moved[name]) == ["preprocess"]
    data_moved = fingerprints(study, f"data.tokenizer_revision={COMMIT_A}", f"data.source_revision={COMMIT_B}")
    assert all(base[name] != data_moved[name] for name in base)  # every stage reads preprocess's output
