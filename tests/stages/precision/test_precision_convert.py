"""prepare_model: the converted layers compute what the recipe says, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from precision_helpers import gamma, nvfp4_error_bound, recipe_with, tiny_qwen3
from torch import nn

from contract.recipe import OperandSpec, parse_recipe
from stages.precision import (
    PrecisionUnavailable,
    fake_quantize,
    load_recipe,
    prepare_model,
)
from stages.precision.delayed import AmaxBank, AmaxHistory, roll_all
from stages.precision.emulated import OperandQuantizer, QuantizedLinear
from stages.precision.nvfp4 import apply_hadamard, fake_quantize_nvfp4
from stages.precision.surgery import input_owners, linear_names


def one_linear(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 40))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(40, 48, generator=gen))
        model[0].bias.copy_(torch.randn(40, generator=gen))
    x = torch.randn(2, 35, 48, generator=gen, requires_grad=True)  # 70 tokens: a partial MX block
    grad = torch.randn(2, 35, 40, generator=gen)
    return model, x, grad


def run(recipe_name_or_recipe, seed: int = 0):
    recipe = load_recipe(recipe_name_or_recipe) if isinstance(recipe_name_or_recipe, str) else recipe_name_or_recipe
    model, x, grad = one_linear(seed)
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    prepared = prepare_model(model, recipe, "emulated")
    y = prepared.model(x)
    y.backward(grad)
    return x, w, b, y, grad, x.grad, prepared.model[0].weight.grad


def test_forward_equals_hand_computation_with_fake_quantize() -> None:
    x, w, b, y, *_ = run("nv4f_mx8b")
    assert torch.equal(y, F.linear(fake_quantize(x.detach(), "nvfp4"), fake_quantize(w, "nvfp4"), b))


def test_te_style_backward_requantizes_each_operand_from_the_original_along_k() -> None:
    x, w, _, _, g, dx, dw = run("nv4f_mx8b")
    x2, g2 = x.detach().reshape(-1, 48), g.reshape(-1, 40)
    # dgrad: K = out_features, so W is blocked along dim 0 (W^T along its last dim).
    expected_dx = fake_quantize(g2, "mxfp8") @ fake_quantize(w.t(), "mxfp8").t()
    # wgrad: K = tokens, both operands blocked along the token dim.
    expected_dw = fake_quantize(g2.t(), "mxfp8") @ fake_quantize(x2.t(), "mxfp8").t()
    assert torch.equal(dx, expected_dx.reshape(dx.shape))
    assert torch.equal(dw, expected_dw)


def test_qat_backward_is_straight_through_on_the_fake_quantized_forward_tensors() -> None:
    x, w, _, _, g, dx, dw = run("nvfp4_qat")  # ModelOpt's NVFP4 arithmetic, as its QAT
    x_q = fake_quantize_nvfp4(x.detach(), arithmetic="modelopt").reshape(-1, 48)
    g2 = g.reshape(-1, 40)
    assert torch.equal(dx, (g2 @ fake_quantize_nvfp4(w, arithmetic="modelopt")).reshape(dx.shape))
    assert torch.equal(dw, g2.t() @ x_q)


def test_ste_and_requantized_backward_differ_only_in_backward() -> None:
    ste = load_recipe("nvfp4_qat")
    original = recipe_with("nvfp4_qat", backward_source="original")
    *_, y_ste, _, dx_ste, dw_ste = run(ste)
    *_, y_orig, _, dx_orig, dw_orig = run(original)
    assert torch.equal(y_ste, y_orig)
    assert not torch.equal(dw_ste, dw_orig) and not torch.equal(dx_ste, dx_orig)
    x, w, _, _, g, _, _ = run(original)
    assert torch.equal(dw_orig, g.reshape(-1, 40).t() @ x.detach().reshape(-1, 48))  # bf16 backward, unquantized


def test_bf16_recipe_is_exactly_nn_linear() -> None:
    model, x, grad = one_linear()
    reference = nn.Linear(48, 40)
    reference.load_state_dict(model[0].state_dict())
    y_ref = reference(x)
    y_ref.backward(grad)
    dx_ref, x.grad = x.grad.clone(), None
    prepared = prepare_model(model, load_recipe("bf16"), "emulated")
    y = prepared.model(x)
    y.backward(grad)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, dx_ref)
    g2, x2 = grad.reshape(-1, 40), x.detach().reshape(-1, 48)
    assert torch.equal(model[0].weight.grad, g2.t() @ x2)  # the recipe's wgrad, in its own order
    # nn.Linear's autograd sums the same 70 products in another order: both are within
    # gamma_70 * sum |g x| of the exact sum (fp32 dot products), so within twice that of each other.
    bound = 2 * gamma(70) * (g2.abs().t() @ x2.abs())
    assert ((model[0].weight.grad - reference.weight.grad).abs() <= bound).all()


def test_qwen3_keeps_lm_head_and_embeddings_and_parameters() -> None:
    model = tiny_qwen3()
    params_before = {name: p for name, p in model.named_parameters()}
    prepared = prepare_model(model, load_recipe("mxfp8"), "emulated")
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding
    assert type(model.model.layers[0].self_attn.q_proj) is QuantizedLinear
    assert len(prepared.converted) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    # The same Parameter objects (an optimizer made before conversion still works; FSDP2 can shard them).
    assert all(params_before[name] is p for name, p in model.named_parameters())
    tags = prepared.describe()
    assert {k: tags[k] for k in ("recipe", "backend", "inference_format", "converted_linears")} == {
        "recipe": "mxfp8", "backend": "emulated", "inference_format": "mxfp8", "converted_linears": "14"
    }
    assert tags["torch_version"] == torch.__version__
    assert tags["recipe_gemms"] == "fprop=mxfp8,mxfp8 dgrad=mxfp8,mxfp8 wgrad=mxfp8,mxfp8 (original)"
    assert "fast_accumulation" not in tags and "nvfp4_arithmetic" not in tags


def test_nvfp4_runs_say_whose_arithmetic_they_ran() -> None:
    assert prepare_model(tiny_qwen3(), load_recipe("nvfp4_qat"), "emulated").describe()["nvfp4_arithmetic"] == "modelopt"
    assert prepare_model(tiny_qwen3(), load_recipe("nv4f_mx8b"), "emulated").describe()["nvfp4_arithmetic"] == "torchao"


def test_emulated_fp8_says_it_does_not_model_fast_accumulation() -> None:
    tags = prepare_model(tiny_qwen3(), load_recipe("fp8"), "emulated").describe()
    assert tags["fast_accumulation"] == "not modeled by backend emulated (fprop): FP32 accumulation"


def test_high_precision_globs_cover_whole_submodules() -> None:
    model = tiny_qwen3()
    recipe = recipe_with("fp8", high_precision=["lm_head", "model.layers.0"])
    prepare_model(model, recipe, "emulated")
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert type(model.model.layers[1].mlp.up_proj) is QuantizedLinear


EMULATED = ["bf16", "fp8", "fp8_delayed", "mxfp8", "nv4f_mx8b", "nvfp4_qat"]


def train_losses(model: nn.Module, prepared, batch: torch.Tensor, steps: int = 4) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    losses = []
    for step in range(steps):
        with prepared.autocast():
            loss = prepared.model(input_ids=batch, labels=batch).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        prepared.on_step(step + 1)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", EMULATED)
def test_sgd_lowers_the_loss_for_every_emulated_builtin(name: str, token_batch: torch.Tensor) -> None:
    model = tiny_qwen3()
    losses = train_losses(model, prepare_model(model, load_recipe(name), "emulated"), token_batch)
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("name", ["int4_weight_only", "int8_dyn_act_int4_weight"])
def test_sgd_lowers_the_loss_for_int_builtins_on_torchao(name: str, token_batch: torch.Tensor) -> None:
    pytest.importorskip("torchao")
    base = load_recipe(name).model_dump()
    base["fprop"]["weight"]["group_size"] = 32  # the tiny model's 64 features are not a multiple of 256
    base["fake_quant_after_steps"] = 0
    model = tiny_qwen3()
    prepared = prepare_model(model, parse_recipe(base, name), "torchao")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "FakeQuantizedLinear"
    losses = train_losses(model, prepared, token_batch)
    assert losses[-1] < losses[0] - 0.3, losses


def test_int_recipes_on_emulated_name_torchao() -> None:
    with pytest.raises(PrecisionUnavailable) as error:
        prepare_model(tiny_qwen3(), load_recipe("int8_dyn_act_int4_weight"), "emulated")
    assert str(error.value) == (
        "recipe int8_dyn_act_int4_weight: backend emulated does not implement int4, int8 fake quant; "
        "choose backend torchao"
    )


def test_torchao_rejects_a_group_size_that_does_not_divide_the_layer() -> None:
    pytest.importorskip("torchao")
    with pytest.raises(PrecisionUnavailable, match=r"group_size 256 does not divide in_features 64 of "
                       r"model.layers.0.self_attn.q_proj; choose a group_size that does$"):
        prepare_model(tiny_qwen3(), load_recipe("int4_weight_only"), "torchao")


def test_delayed_fake_quant_switches_on_at_the_configured_step() -> None:
    recipe = recipe_with("nvfp4_qat", fake_quant_after_steps=2)
    model, x, _ = one_linear()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    prepared = prepare_model(model, recipe, "emulated")
    with torch.no_grad():
        assert torch.equal(prepared.model(x), F.linear(x, w, b))
        prepared.on_step(1)
        assert torch.equal(prepared.model(x), F.linear(x, w, b))
        prepared.on_step(2)
        x_q, w_q = (fake_quantize_nvfp4(t, arithmetic="modelopt") for t in (x, w))
        assert torch.equal(prepared.model(x), F.linear(x_q, w_q, b))


def test_torchao_delayed_fake_quant() -> None:
    pytest.importorskip("torchao")
    data = load_recipe("int4_weight_only").model_dump()
    data["fprop"]["weight"]["group_size"] = 16
    data["fake_quant_after_steps"] = 3
    model, x, _ = one_linear()
    plain = F.linear(x, model[0].weight, model[0].bias).detach()
    prepared = prepare_model(model, parse_recipe(data, "int4"), "torchao")
    with torch.no_grad():
        assert torch.equal(prepared.model(x), plain)
        prepared.on_step(3)
        quantized = prepared.model(x)
    assert not torch.equal(quantized, plain)
    layer = prepared.model[0]
    w, w_q = layer.weight.detach(), layer.weight_fake_quantizer(layer.weight).detach()
    assert torch.equal(quantized, F.linear(x, w_q, layer.bias))
    # int4 in groups of 16: every weight of a group is an integer multiple of the group's step
    # (its range / 15), at most 16 distinct levels. (torchao's asymmetric int4 may clip a group's
    # extreme: how far it moves a weight is torchao's arithmetic, not ours to bound.)
    groups, levels = w.reshape(40, 3, 16), w_q.reshape(40, 3, 16)
    step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    units = levels / step
    assert ((units - units.round()).abs() <= 1e-4).all()  # fp32: <= 8 * 3u = 1.4e-6 off an integer
    assert (units.round().amax(-1) - units.round().amin(-1) <= 15).all()


def test_delayed_scaling_uses_the_amax_history_of_previous_steps() -> None:
    quantizer = OperandQuantizer(OperandSpec(format="fp8_e4m3", scaling="delayed", amax_history_len=2))
    first = quantizer(torch.tensor([1.0, -2.0]))  # no history yet: current amax 2
    assert first.tolist() == [1.0, -2.0]
    quantizer.roll()
    second = quantizer(torch.tensor([4.0, 1.0]))  # scaled with amax 2 from step 1: 4 saturates to 2
    assert second.tolist() == [2.0, 1.0]
    quantizer.roll()
    assert quantizer.history.tolist() == [4.0, 2.0]
    quantizer.roll()  # nothing seen this step: history unchanged
    quantizer(torch.tensor([0.5]))
    quantizer.roll()
    assert quantizer.history.tolist() == [0.5, 4.0]  # length 2: the 2.0 fell off


def test_histories_of_one_bank_roll_apart_and_checkpoint_alone() -> None:
    """A model's histories share one tensor (delayed.py); each still rolls only what it saw,
    scales from its own rows, and leaves a checkpoint that is a copy, not a view of the bank."""
    bank = AmaxBank(3, "max")
    seen, idle = AmaxHistory(3, "max", bank), AmaxHistory(3, "max", bank)
    for amax in (2.0, 5.0, 1.0):
        seen.record(torch.tensor(amax))
        roll_all([seen, idle])
    assert seen.history.tolist() == [1.0, 5.0, 2.0] and seen.scaling_amax(torch.device("cpu")).item() == 5.0
    assert idle.history is None and idle.steps_recorded == 0 and idle.scaling_amax(torch.device("cpu")) is None
    saved = seen.state_dict()
    seen.record(torch.tensor(9.0))
    seen.roll()
    assert saved["history"].tolist() == [1.0, 5.0, 2.0] and seen.history.tolist() == [9.0, 1.0, 5.0]
    restored = AmaxHistory(3, "max", AmaxBank(3, "max"))
    restored.load_state_dict(saved)
    assert restored.history.tolist() == [1.0, 5.0, 2.0] and restored.steps_recorded == 3
    with pytest.raises(ValueError, match="amax bank of length 3"):
        AmaxHistory(4, "max", bank)


def test_siblings_that_read_one_x_have_the_first_converted_one_as_input_owner() -> None:
    model = tiny_qwen3(layers=1)
    names = linear_names(model, recipe_with("fp8_delayed", high_precision=["lm_head", "*.q_proj"]))
    owners = {name.removeprefix("model.layers.0."): owner.removeprefix("model.layers.0.")
              for name, owner in input_owners(model, names).items()}
    assert owners == {"self_attn.k_proj": "self_attn.k_proj", "self_attn.v_proj": "self_attn.k_proj",
                      "self_attn.o_proj": "self_attn.o_proj", "mlp.gate_proj": "mlp.gate_proj",
                      "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}
    # The owner is the first in the order given (the order layers are built in), not the group's.
    k, q, v = (f"model.layers.0.self_attn.{p}_proj" for p in "kqv")
    assert input_owners(model, [k, q, v]) == {k: k, q: k, v: k}
    model.config.model_type = "mllama"  # a cross-attention's k/v read other states than its q: nothing shared
    assert all(owner == name for name, owner in input_owners(model, names).items())


def test_fp8_delayed_model_rolls_history_once_per_step(token_batch: torch.Tensor) -> None:
    model = tiny_qwen3()
    prepared = prepare_model(model, load_recipe("fp8_delayed"), "emulated")
    train_losses(model, prepared, token_batch, steps=2)
    quantizer = model.model.layers[0].mlp.down_proj.quantizers["dgrad.grad_output"]
    assert quantizer.steps_recorded == 2 and quantizer.history.shape == (1024,)
    assert (quantizer.history[:2] > 0).all() and (quantizer.history[2:] == 0).all()


def test_runs_in_bfloat16() -> None:
    model, x, grad = one_linear()
    model = model.to(torch.bfloat16)
    prepared = prepare_model(model, load_recipe("nv4f_mx8b"), "emulated")
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    y = prepared.model(xb)
    y.backward(grad.to(torch.bfloat16))
    assert y.dtype == xb.grad.dtype == model[0].weight.grad.dtype == torch.bfloat16


def test_hadamard_wgrad_is_exact_without_quantization_and_changes_quantized_wgrad() -> None:
    data = load_recipe("bf16").model_dump()
    data["wgrad"] = {"grad_output": {"format": "nvfp4", "hadamard": True}, "input": {"format": "nvfp4", "hadamard": True}}
    model, x, grad = one_linear()
    prepared = prepare_model(model, parse_recipe(data, "rht"), "emulated")
    prepared.model(x).backward(grad)
    dw, h = model[0].weight.grad, model[0].hadamard
    data["wgrad"] = {"grad_output": "nvfp4", "input": "nvfp4"}
    *_, dw_no_rht = run(parse_recipe(data, "no-rht"))
    assert not torch.equal(dw, dw_no_rht)
    # What the recipe says, in its order: both operands rotated along the tokens, then NVFP4.
    a = apply_hadamard(grad.reshape(-1, 40).t(), h)
    b = apply_hadamard(x.detach().reshape(-1, 48).t(), h)
    qa, qb = fake_quantize(a, "nvfp4"), fake_quantize(b, "nvfp4")
    assert torch.equal(dw, qa @ qb.t())
    # An NVFP4 estimate of g^T x (the rotations cancel: H is orthonormal): each operand moves by
    # at most one step of its block, so the product by at most e_a|b| + |a|e_b + e_a e_b, plus
    # the fp32 rounding of the products and of the rotations.
    e_a, e_b = nvfp4_error_bound(a), nvfp4_error_bound(b)
    assert ((qa - a).abs() <= e_a).all() and ((qb - b).abs() <= e_b).all()
    dw_plain = grad.reshape(-1, 40).t() @ x.detach().reshape(-1, 48)
    quantization = e_a @ b.abs().t() + a.abs() @ e_b.t() + e_a @ e_b.t()
    rounding = 4 * gamma(70 + 16) * ((a.abs() + e_a) @ (b.abs() + e_b).t())
    assert ((dw - dw_plain).abs() <= quantization + rounding).all()
    assert (dw - dw_plain).abs().max() > rounding.max()  # the quantization is there to see


def test_unknown_backend() -> None:
    with pytest.raises(PrecisionUnavailable, match=r"^backend 'cuda' is not one of emulated, te, modelopt, torchao, scaled_mm$"):
        prepare_model(nn.Sequential(nn.Linear(4, 4)), load_recipe("fp8"), "cuda")


def test_convert_for_export_gives_back_plain_linears_with_the_trained_weights(token_batch: torch.Tensor) -> None:
    from stages.precision import convert_for_export

    model = tiny_qwen3()
    prepared = prepare_model(model, load_recipe("nv4f_mx8b"), "emulated")
    train_losses(model, prepared, token_batch, steps=1)
    trained = model.model.layers[0].mlp.up_proj.weight
    exported = convert_for_export(prepared)
    assert not any(isinstance(m, QuantizedLinear) for m in exported.modules())
    assert exported.model.layers[0].mlp.up_proj.weight is trained


def test_torchao_export_of_8da4w_equals_its_fake_quantized_forward(token_batch: torch.Tensor) -> None:
    pytest.importorskip("torchao")
    from stages.precision import convert_for_export

    data = load_recipe("int8_dyn_act_int4_weight").model_dump()
    data["fprop"]["weight"]["group_size"] = 32
    data["fake_quant_after_steps"] = 0
    model = tiny_qwen3()
    prepared = prepare_model(model, parse_recipe(data, "8da4w"), "torchao")
    with torch.no_grad():
        fake_quantized = model(input_ids=token_batch).logits
        exported = convert_for_export(prepared)
        assert type(exported.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
        assert torch.equal(exported(input_ids=token_batch).logits, fake_quantized)
