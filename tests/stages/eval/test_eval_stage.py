"""The eval stage end to end: val loss in bf16 and in the deployed NVFP4 precision, lm-eval."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from contract.markers import read_marker
from stages.deployment.packing import LinearAmax, unpack_nvfp4
from stages.deployment.unified import pack_device, pack_linear
from stages.eval.core import run
from stages.runtime import run_stage
from tests.stages.ptq.quant_testkit import (
    MMLU_TINY,
    REPO,
    TINY_MODEL,
    HandNvfp4Linear,
    fused_amax,
    mean_ce,
    stage_spec,
    val_rows,
)

EVAL = {"micro_batch": 2, "max_batches": 3, "device": "cpu"}  # the first 6 val rows


@pytest.fixture(scope="module")
def ptq_and_export(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, Path]:
    from stages.export.core import run as export
    from stages.ptq.core import run as ptq

    root = tmp_path_factory.mktemp("chain")
    params = {"recipe": "nvfp4_qat", "backend": "emulated", "model": str(TINY_MODEL), "calib_samples": 8, "device": "cpu"}
    assert run_stage(stage_spec(root / "ptq", "ptq", {"data": data_dir}, params), ptq) == 0
    assert run_stage(stage_spec(root / "export", "export", {"model": root / "ptq"}, {"bf16_checkpoint": False}), export) == 0
    return root / "ptq", root / "export"


def _summary(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["summary"]


def _bf16_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16).eval()


def sequence_ce(model, data_dir: Path) -> list[float]:
    """Each of the first 6 val rows' summed cross entropy (nats), by hand: three forwards of 2
    rows as the stage runs them, fp32 per token, summed per row in fp64."""
    import torch.nn.functional as F

    sums = []
    for rows in (_rows(data_dir, i) for i in range(3)):
        with torch.no_grad():
            logits = model(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).logits
        for row_logits, labels in zip(logits[:, :-1].float(), rows.labels[:, 1:]):
            sums.append(float(F.cross_entropy(row_logits, labels, ignore_index=-100, reduction="none").double().sum()))
    return sums


def test_eval_base_is_the_token_weighted_cross_entropy(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "eval-base"
    spec = stage_spec(out, "eval", {"data": data_dir}, {**EVAL, "model": str(TINY_MODEL), "recipe": "bf16"})
    assert run_stage(spec, run) == 0
    summary = _summary(out)
    batch = val_rows(data_dir, 6)
    assert summary["val_tokens"] == batch.label_tokens == 6 * 24  # 31 predicted tokens, 7 of them prompt
    assert summary["val_sequences"] == 6
    # Each sequence's loss, kept for the report's bootstrap, and the token-weighted mean of them.
    hand = sequence_ce(_bf16_model(), data_dir)
    sequences = json.loads((out / "val_sequences.json").read_text())
    assert (sequences["rows"], sequences["tokens"]) == (list(range(6)), [24] * 6)
    assert sequences["loss_sum"] == pytest.approx(hand, rel=1e-12)
    assert summary["val_loss"] == pytest.approx(sum(hand) / batch.label_tokens, rel=1e-12)
    assert summary["val_loss"] == pytest.approx(mean_ce(_bf16_model(), batch), rel=1e-6)  # fp32 sums: 1e-7 apart
    assert (summary["precision"], summary["packer"], summary["activation_scaling"]) == ("bf16", "none", "none")


def test_eval_ptq_runs_the_deployed_nvfp4_forward(tmp_path: Path, data_dir: Path, ptq_and_export: tuple[Path, Path]) -> None:
    ptq, _ = ptq_and_export
    out = tmp_path / "eval-ptq"
    assert run_stage(stage_spec(out, "eval", {"data": data_dir, "model": ptq}, {**EVAL, "recipe": "nvfp4_qat"}), run) == 0
    summary = _summary(out)
    assert (summary["precision"], summary["activation_scaling"], summary["packer"]) == ("nvfp4", "static", "ours")

    # By hand: every converted linear quantizes its weight with the fused-group weight amax and
    # its input with the calibrated input amax (stages.precision's NVFP4), matmul in fp32.
    amax = json.loads((ptq / "model" / "precision.json").read_text())["calibration"]["amax"]
    weight_amax, input_amax = fused_amax(amax, "weight"), fused_amax(amax, "input")
    batch = val_rows(data_dir, 6)

    def hand_loss(weights_as_exported: bool) -> float:
        model = _bf16_model()
        for name in amax:
            linear = model.get_submodule(name)
            hand = HandNvfp4Linear(linear, weight_amax[name], input_amax[name])
            if weights_as_exported:  # and the activation amax as the stored input_scale gives it back
                scales = LinearAmax(torch.tensor(weight_amax[name]), torch.tensor(input_amax[name]))
                packed = pack_linear("nvfp4", linear.weight, scales, pack_device())
                hand.weight, hand.input_amax = unpack_nvfp4(packed), packed["input_scale"] * (6 * 448)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, hand)
        return sum(sequence_ce(model, data_dir)) / batch.label_tokens

    # With the weights as the export packs them (ModelOpt's arithmetic), the loss is exact.
    assert summary["val_loss"] == hand_loss(weights_as_exported=True)
    # With stages.precision's weight quantizer: equal but for the few weights on an E2M1 tie
    # (tests/stages/export/test_packing.py), which move this random model's loss by ~1e-4.
    assert summary["val_loss"] == pytest.approx(hand_loss(weights_as_exported=False), rel=5e-4)
    bf16 = mean_ce(_bf16_model(), batch)
    assert abs(summary["val_loss"] - bf16) > 1e-3  # quantization moved the loss


def _rows(data_dir: Path, index: int):
    from stages.batches import TokenSplit

    return TokenSplit(data_dir, "val").rows([2 * index, 2 * index + 1])


def test_eval_of_the_export_equals_eval_of_the_ptq_dir(tmp_path: Path, data_dir: Path, ptq_and_export: tuple[Path, Path]) -> None:
    """Unpacked from disk (export) and packed in memory (ptq dir): the same weights, the same loss."""
    ptq, export = ptq_and_export
    for name, model in (("from-ptq", ptq), ("from-export", export)):
        assert run_stage(stage_spec(tmp_path / name, "eval", {"data": data_dir, "model": model}, {**EVAL, "recipe": "nvfp4_qat"}), run) == 0
    assert _summary(tmp_path / "from-export")["val_loss"] == _summary(tmp_path / "from-ptq")["val_loss"]


def test_bf16_precision_of_an_export_without_bf16_checkpoint_is_refused(tmp_path: Path, data_dir: Path, ptq_and_export: tuple[Path, Path]) -> None:
    _, export = ptq_and_export
    out = tmp_path / "eval"
    params = {**EVAL, "recipe": "nvfp4_qat", "precision": "bf16"}
    assert run_stage(stage_spec(out, "eval", {"data": data_dir, "model": export}, params), run) == 2
    assert "has no bf16 checkpoint; set export.bf16_checkpoint: true" in read_marker(out).error


def test_an_export_record_is_read_typed_and_a_broken_one_is_one_line(tmp_path: Path, ptq_and_export: tuple[Path, Path]) -> None:
    from stages.deployment.export_record import read_export_record
    from stages.runtime import StageInputError

    _, export = ptq_and_export
    record = read_export_record(export)
    assert (record.recipe.name, record.packer, record.activation_scaling) == ("nvfp4_qat", "ours", "static")
    assert (record.checkpoints.bf16, record.checkpoints.quantized) == (None, "quantized")
    assert read_export_record(tmp_path) is None  # no export.json: a train/ptq/HF dir
    (tmp_path / "export.json").write_text(json.dumps({**record.model_dump(mode="json"), "activation_scaling": None}))
    with pytest.raises(StageInputError) as refused:
        read_export_record(tmp_path)
    assert str(refused.value) == (f"inputs.model: {tmp_path / 'export.json'}: packer and activation_scaling: "
                                  "both set (a quantized checkpoint) or both null")


def test_a_recipe_other_than_the_models_is_refused(tmp_path: Path, data_dir: Path, ptq_and_export: tuple[Path, Path]) -> None:
    ptq, _ = ptq_and_export
    out = tmp_path / "eval"
    assert run_stage(stage_spec(out, "eval", {"data": data_dir, "model": ptq}, {**EVAL, "recipe": "fp8"}), run) == 2
    assert "params.recipe: fp8 but" in read_marker(out).error and "recipe nvfp4_qat" in read_marker(out).error


def _hand_mmlu_accuracy(model, tokenizer) -> float:
    """lm-eval's multiple choice by hand: argmax over ' A'..' D' of the continuation log-likelihood."""
    rows = [json.loads(line) for line in (MMLU_TINY / "test.jsonl").read_text().splitlines()]
    correct = 0
    for row in rows:
        context = row["question"].strip() + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", row["choices"])) + "\nAnswer:"
        scores = []
        for letter in "ABCD":
            whole = tokenizer(context + " " + letter, add_special_tokens=False).input_ids
            n_ctx = len(tokenizer(context, add_special_tokens=False).input_ids)
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
        correct += int(max(range(4), key=scores.__getitem__) == row["answer"])
    return correct / len(rows)


@pytest.mark.slow  # importing lm-eval and its metrics costs ~15 s of CPU
def test_lm_eval_accuracy_on_the_local_mmlu_tiny_task(tmp_path: Path, data_dir: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "eval"
    params = {**EVAL, "model": str(TINY_MODEL), "recipe": "bf16", "lm_eval_tasks": ["mmlu_tiny"],
              "lm_eval_task_dir": str(MMLU_TINY)}
    assert run_stage(stage_spec(out, "eval", {"data": data_dir}, params), run) == 0
    summary = _summary(out)
    assert summary["acc_mmlu_tiny"] == _hand_mmlu_accuracy(_bf16_model(), AutoTokenizer.from_pretrained(TINY_MODEL))
    assert json.loads((out / "lm_eval.json").read_text())["mmlu_tiny"]["acc"] == summary["acc_mmlu_tiny"]
    assert summary["questions_mmlu_tiny"] == len((MMLU_TINY / "test.jsonl").read_text().splitlines()) == 6


def test_lm_evals_own_tasks_are_indexed_only_when_one_of_them_is_asked_for() -> None:
    from contract.params.eval import EvalStageParams
    from stages.eval.harness import task_manager

    def params(tasks: list[str]) -> EvalStageParams:
        return EvalStageParams(recipe="bf16", lm_eval_tasks=tasks, lm_eval_task_dir=str(MMLU_TINY))

    assert task_manager(params(["mmlu_tiny"])).all_tasks == ["mmlu_tiny"]  # the task dir alone
    with_own = task_manager(params(["mmlu_tiny", "arc_easy"])).all_tasks
    assert {"mmlu_tiny", "arc_easy"} <= set(with_own) and len(with_own) > 1000


INT8_INT4_SMOKE = str(TINY_MODEL.parents[1] / "recipes" / "int8_dyn_act_int4_weight_smoke.yaml")


def test_torchao_int8_int4_evaluates_torchaos_own_quantized_forward(tmp_path: Path, data_dir: Path) -> None:
    """An int8_int4 export deploys as torchao's int tensors; eval of the train dir quantizes in
    memory the same way: the same val loss, and not the bf16 one."""
    pytest.importorskip("torchao")
    from stages.export.core import run as export
    from tests.stages.ptq.quant_testkit import fake_train_dir

    train = fake_train_dir(tmp_path / "train", INT8_INT4_SMOKE)
    assert run_stage(stage_spec(tmp_path / "export", "export", {"model": train}, {}), export) == 0
    summaries = {}
    for source in ("export", "train"):
        out = tmp_path / f"eval-{source}"
        params = {**EVAL, "recipe": INT8_INT4_SMOKE}
        assert run_stage(stage_spec(out, "eval", {"data": data_dir, "model": tmp_path / source}, params), run) == 0
        summaries[source] = _summary(out)
    for summary in summaries.values():
        assert (summary["precision"], summary["activation_scaling"], summary["packer"]) == ("int8_int4", "dynamic", "torchao")
    assert summaries["export"]["val_loss"] == summaries["train"]["val_loss"]
    model, batches = _bf16_model(), [_rows(data_dir, i) for i in range(3)]
    bf16 = sum(mean_ce(model, b) * b.label_tokens for b in batches) / sum(b.label_tokens for b in batches)
    assert abs(summaries["export"]["val_loss"] - bf16) > 1e-3


@pytest.mark.skipif(importlib.util.find_spec("mslk") is not None, reason="mslk's int4 kernels are installed")
def test_int4_weight_only_without_its_kernels_evaluates_its_fake_quant(tmp_path: Path, data_dir: Path) -> None:
    """No torchao int4 kernels here: export wrote bf16 only (and said why); eval runs the
    recipe's fake quant and says so in `precision`."""
    from stages.export.core import run as export
    from tests.stages.ptq.quant_testkit import fake_train_dir

    recipe = tmp_path / "int4_g32.yaml"
    recipe.write_text((REPO / "contract/recipes/int4_weight_only.yaml").read_text()
                      .replace("name: int4_weight_only", "name: int4_g32").replace("group_size: 256", "group_size: 32"))
    train = fake_train_dir(tmp_path / "train", str(recipe))
    assert run_stage(stage_spec(tmp_path / "export", "export", {"model": train}, {}), export) == 0
    out = tmp_path / "eval"
    assert run_stage(stage_spec(out, "eval", {"data": data_dir, "model": tmp_path / "export"}, {**EVAL, "recipe": str(recipe)}), run) == 0
    summary = _summary(out)
    assert (summary["precision"], summary["activation_scaling"], summary["packer"]) == ("int4-fake-quant", "none", "none")
    model, batches = _bf16_model(), [_rows(data_dir, i) for i in range(3)]
    bf16 = sum(mean_ce(model, b) * b.label_tokens for b in batches) / sum(b.label_tokens for b in batches)
    assert abs(summary["val_loss"] - bf16) > 1e-4  # the fake quant is on (int4 weights move the random model little)
