"""On a GPU the reference quantizers give the CPU's bits, and converted models train in bf16.

Skipped without CUDA (CI); run on a GPU machine with `pytest tests/stages/precision -k cuda`.
"""

from __future__ import annotations

import pytest
import torch
from precision_helpers import tiny_qwen3

from stages.precision import (
    fake_quantize,
    load_recipe,
    prepare_model,
    quantize_mxfp8,
    quantize_nvfp4,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def wide_random_cuda_and_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1024, 1024, generator=gen) * torch.exp2(torch.randint(-30, 30, (1024, 1), generator=gen).float())
    return x, x.cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_quantizers_match_cpu_bit_for_bit(dtype: torch.dtype) -> None:
    cpu, gpu = (t.to(dtype) for t in wide_random_cuda_and_cpu())
    mx_cpu, mx_gpu = quantize_mxfp8(cpu), quantize_mxfp8(gpu)
    assert torch.equal(mx_gpu.scale_e8m0.cpu(), mx_cpu.scale_e8m0)
    assert torch.equal(mx_gpu.data.view(torch.uint8).cpu(), mx_cpu.data.view(torch.uint8))
    nv_cpu, nv_gpu = quantize_nvfp4(cpu), quantize_nvfp4(gpu)
    assert torch.equal(nv_gpu.codes.cpu(), nv_cpu.codes)
    assert torch.equal(nv_gpu.block_scales.view(torch.uint8).cpu(), nv_cpu.block_scales.view(torch.uint8))
    for fmt in ("fp8_e4m3", "fp8_e5m2", "mxfp8", "nvfp4"):
        assert torch.equal(fake_quantize(gpu, fmt).cpu(), fake_quantize(cpu, fmt)), fmt


@pytest.mark.parametrize("name", ["bf16", "fp8", "fp8_delayed", "mxfp8", "nv4f_mx8b", "nvfp4_qat"])
def test_cuda_bf16_training_lowers_the_loss(name: str) -> None:
    model = tiny_qwen3().to("cuda", torch.bfloat16)
    prepared = prepare_model(model, load_recipe(name), "emulated")
    batch = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    losses = []
    for step in range(4):
        with prepared.autocast():
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        prepared.on_step(step + 1)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
