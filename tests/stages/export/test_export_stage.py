"""The export stage end to end on the tiny Qwen3: bf16 and ModelOpt unified HF checkpoints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from contract.markers import read_marker
from stages.deployment.unified import pack_device
from stages.export.core import run
from stages.runtime import run_stage
from tests.stages.ptq.quant_testkit import (
    REPO,
    TINY_MODEL,
    fake_train_dir,
    linear_names,
    stage_spec,
)

NVFP4_HF_QUANT_CONFIG = {
    "producer": {"name": "modelopt", "version": "0.47.0"},
    "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                     "exclude_modules": ["lm_head", "model.embed_tokens"]},
}


def _calibrated_train_dir(out: Path, recipe: str) -> Path:
    """A train dir whose quantizer state holds hand-picked amax: input 1 + i/10 for linear i."""
    from safetensors.torch import save_file

    fake_train_dir(out, recipe)
    state = {f"{n}.input_quantizer._amax": torch.tensor(1.0 + i / 10) for i, n in enumerate(linear_names())}
    save_file(state, str(out / "model" / "quantizer_state.safetensors"))
    return out


def test_nvfp4_export_writes_modelopts_unified_format(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    train = _calibrated_train_dir(tmp_path / "train", "nvfp4_qat")
    assert run_stage(stage_spec(tmp_path / "export", "export", {"model": train}, {}), run) == 0
    out = tmp_path / "export"
    assert read_marker(out).state == "succeeded"
    export = json.loads((out / "export.json").read_text())
    assert (export["packer"], export["activation_scaling"], export["inference_format"]) == ("ours", "static", "nvfp4")
    assert export["checkpoints"] == {"bf16": "bf16", "quantized": "quantized"}

    quantized = out / "quantized"
    assert json.loads((quantized / "hf_quant_config.json").read_text()) == NVFP4_HF_QUANT_CONFIG
    config = json.loads((quantized / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["quantization_config"]["ignore"] == ["lm_head", "model.embed_tokens"]
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"] == {
        "dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}

    tensors = load_file(str(quantized / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert (tensors[f"{q}.weight"].dtype, tuple(tensors[f"{q}.weight"].shape)) == (torch.uint8, (64, 32))
    assert (tensors[f"{q}.weight_scale"].dtype, tuple(tensors[f"{q}.weight_scale"].shape)) == (torch.float8_e4m3fn, (64, 4))
    assert tensors["lm_head.weight"].dtype == torch.bfloat16  # high precision stays as it was
    # q/k/v read one input: one global scale for the fused GEMM (the max of their weight amax),
    # and input_scale = input amax / (6 * 448) with the group's max input amax (linears 0..2 -> 1.2).
    plain = load_file(str(TINY_MODEL / "model.safetensors"))
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    # (Divided on the packing device: CUDA divides by a scalar through its fp32 reciprocal.)
    dev = pack_device()
    weight_amax = max(plain[f"{n}.weight"].abs().max().float() for n in qkv).to(dev)
    for name in qkv:
        assert tensors[f"{name}.weight_scale_2"].item() == (weight_amax / 2688).item()
        assert tensors[f"{name}.input_scale"].item() == (torch.tensor(1.2, device=dev) / 2688).item()
    o = "model.layers.0.self_attn.o_proj"  # alone: its own amax (linear 3 -> 1.3)
    assert tensors[f"{o}.weight_scale_2"].item() == (plain[f"{o}.weight"].abs().max().float().to(dev) / 2688).item()
    assert tensors[f"{o}.input_scale"].item() == (torch.tensor(1.3, device=dev) / 2688).item()


def test_bf16_export_reloads_with_the_trained_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    train = fake_train_dir(tmp_path / "train", "bf16")
    assert run_stage(stage_spec(tmp_path / "export", "export", {"model": train}, {}), run) == 0
    export = json.loads((tmp_path / "export" / "export.json").read_text())
    assert export["checkpoints"] == {"bf16": "bf16", "quantized": None} and export["packer"] is None
    ids = torch.arange(10, 42).reshape(2, 16)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "bf16").eval()
        trained = AutoModelForCausalLM.from_pretrained(train / "model", dtype=torch.bfloat16).eval()
        assert exported.dtype == torch.bfloat16
        assert torch.equal(exported(input_ids=ids).logits, trained(input_ids=ids).logits)


INT8_INT4_SMOKE = str(TINY_MODEL.parents[1] / "recipes" / "int8_dyn_act_int4_weight_smoke.yaml")


def test_torchao_int8_int4_export_loads_back_with_the_qat_fake_quantized_weights(tmp_path: Path) -> None:
    """The seed's TorchAO deploy step as a checkpoint: from_pretrained gives torchao's int
    tensors, which dequantize to exactly the weights QAT's fake quantizer trained against."""
    from transformers import AutoModelForCausalLM

    from stages.precision import load_recipe, prepare_model

    train = fake_train_dir(tmp_path / "train", INT8_INT4_SMOKE)
    assert run_stage(stage_spec(tmp_path / "export", "export", {"model": train}, {}), run) == 0
    export = json.loads((tmp_path / "export" / "export.json").read_text())
    assert export["checkpoints"] == {"bf16": "bf16", "quantized": "quantized"}
    assert (export["packer"], export["activation_scaling"], export["quantized_skipped"]) == ("torchao", "dynamic", None)
    config = json.loads((tmp_path / "export" / "quantized" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "torchao"
    projections = "|".join(rf"model\.layers\.\d+\.{p}" for p in (
        r"mlp\.down_proj", r"mlp\.gate_proj", r"mlp\.up_proj",
        r"self_attn\.k_proj", r"self_attn\.o_proj", r"self_attn\.q_proj", r"self_attn\.v_proj"))
    assert list(config["quant_type"]["default"]["_data"]["fqn_to_config"]) == [f"re:{projections}"]  # lm_head stays bf16

    deployed = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "quantized").eval()
    qat = AutoModelForCausalLM.from_pretrained(train / "model", dtype=torch.bfloat16).eval()
    prepare_model(qat, load_recipe(INT8_INT4_SMOKE), "torchao").on_step(2)  # fake quant on, as at the end of training
    assert type(deployed.lm_head.weight).__name__ == "Parameter"
    for name in linear_names():
        weight = deployed.get_submodule(name).weight
        assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
        qat_linear = qat.get_submodule(name)
        assert torch.equal(weight.dequantize(), qat_linear.weight_fake_quantizer(qat_linear.weight))
    # The activations' int8 quantization rounds differently in bf16 than the fake quantizer's
    # fp32 arithmetic: close to the QAT forward, far closer than the unquantized model is.
    plain = AutoModelForCausalLM.from_pretrained(train / "model", dtype=torch.bfloat16).eval()
    ids = torch.arange(10, 42).reshape(2, 16)
    with torch.no_grad():
        qat_logits = qat(input_ids=ids).logits.float()
        off_deployed = (deployed(input_ids=ids).logits.float() - qat_logits).abs().max()
        off_plain = (plain(input_ids=ids).logits.float() - qat_logits).abs().max()
    assert off_deployed < off_plain / 4


@pytest.mark.skipif(importlib.util.find_spec("mslk") is not None, reason="mslk's int4 kernels are installed")
def test_int4_weight_only_without_its_kernels_exports_bf16_and_says_why(tmp_path: Path) -> None:
    recipe = tmp_path / "int4_g32.yaml"
    recipe.write_text((REPO / "contract/recipes/int4_weight_only.yaml").read_text()
                      .replace("name: int4_weight_only", "name: int4_g32").replace("group_size: 256", "group_size: 32"))
    train = fake_train_dir(tmp_path / "train", str(recipe))
    assert run_stage(stage_spec(tmp_path / "export", "export", {"model": train}, {}), run) == 0
    export = json.loads((tmp_path / "export" / "export.json").read_text())
    assert export["checkpoints"] == {"bf16": "bf16", "quantized": None} and export["packer"] is None
    assert export["quantized_skipped"] == (
        "recipe int4_g32: torchao cannot quantize for deployment here (Requires mslk >= 1.0.0); export the bf16 weights instead"
    )
    assert not (tmp_path / "export" / "quantized").exists() and not (tmp_path / "export" / ".quantized.partial").exists()
    # Asked for nothing else, the bf16 checkpoint is required: a one-line error otherwise.
    spec = stage_spec(tmp_path / "export2", "export", {"model": train}, {"bf16_checkpoint": False})
    assert run_stage(spec, run) == 2
    assert read_marker(tmp_path / "export2").error == (
        "export2: params.bf16_checkpoint: false leaves nothing to export: recipe int4_g32: torchao cannot quantize "
        "for deployment here (Requires mslk >= 1.0.0); export the bf16 weights instead"
    )


@pytest.mark.parametrize(("recipe", "preset"), [("fp8", "FP8_DEFAULT_CFG"), ("mxfp8", "MXFP8_DEFAULT_CFG")])
def test_export_matches_modelopts_exporter_byte_for_byte(tmp_path: Path, recipe: str, preset: str) -> None:
    """ModelOpt's FP8 and MXFP8 exports run on CPU: calibrate with mtq.quantize, export with
    export_hf_checkpoint, and pack the same amax with ours: every tensor and both jsons equal."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from stages.ptq.core import record_amax_modelopt

    device = pack_device()  # ModelOpt's scalar divisions round differently on CPU and CUDA
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16).to(device)
    ids = torch.arange(10, 74, device=device).reshape(2, 32)
    model = mtq.quantize(model, getattr(mtq, preset), lambda m: m(input_ids=ids))
    amax = record_amax_modelopt(model)  # MXFP8 has none: its scales are all per block
    export_hf_checkpoint(model, export_dir=str(tmp_path / "modelopt"))

    train = fake_train_dir(tmp_path / "train", recipe)
    state = {f"{n}.{role}_quantizer._amax": v.cpu() for n, roles in amax.items() for role, v in roles.items()}
    if state:
        save_file(state, str(train / "model" / "quantizer_state.safetensors"))
    assert run_stage(stage_spec(tmp_path / "export", "export", {"model": train}, {"packer": "ours"}), run) == 0
    ours_dir, theirs_dir = tmp_path / "export" / "quantized", tmp_path / "modelopt"
    ours, theirs = load_file(str(ours_dir / "model.safetensors")), load_file(str(theirs_dir / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert ours[key].reshape(-1).view(torch.uint8).equal(theirs[key].reshape(-1).view(torch.uint8)), key
    for name in ("hf_quant_config.json", "config.json"):
        assert json.loads((ours_dir / name).read_text()) == json.loads((theirs_dir / name).read_text())


def test_an_uncalibrated_model_is_calibrated_on_the_data_input(tmp_path: Path, data_dir: Path) -> None:
    """An SFT run (nv4f_mx8b) has no input amax: with a data input the export calibrates it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stages.batches import TokenSplit

    train = fake_train_dir(tmp_path / "train", "nv4f_mx8b")
    spec = stage_spec(tmp_path / "export", "export", {"model": train, "data": data_dir}, {"calib_samples": 5, "bf16_checkpoint": False})
    assert run_stage(spec, run) == 0
    export = json.loads((tmp_path / "export" / "export.json").read_text())
    assert (export["calibrated_in_export"], export["activation_scaling"]) == (True, "static")
    tensors = load_file(str(tmp_path / "export" / "quantized" / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16).eval()
    ids = TokenSplit(data_dir, "train").rows(list(range(5))).input_ids
    with torch.no_grad():
        q_input = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    expected = (q_input.abs().max().float().to(pack_device()) / 2688).item()
    assert [tensors[f"model.layers.0.self_attn.{p}_proj.input_scale"].item() for p in "qkv"] == [expected] * 3
