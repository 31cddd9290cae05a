"""NVFP4 fake quant: ModelOpt's kernel (fp4_fake_quant_block) against ours, input by input.

Per input, the fraction of elements whose bits equal ModelOpt's: our Triton kernel in
ModelOpt's arithmetic (`nvfp4_arithmetic: modelopt`), our exactly-dividing PyTorch reference
of it, and our kernel in torchao's arithmetic (bits and values); then the time of each on the
FFN weight's shape (ModelOpt's given a torch amax, ours computing it). GPU (Hopper+) only.

  python -m bench.modelopt_nvfp4 [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def inputs() -> dict[str, torch.Tensor]:
    """CPU tensors where the two NVFP4 arithmetics part ways, and plain ones (the GPU tests' too)."""
    gen = torch.Generator().manual_seed(7)
    randn = torch.randn(1024, 4096, generator=gen)
    spikes = torch.where(torch.rand(1024, 4096, generator=gen) < 1e-4, 1000.0, 1.0)
    return {
        "randn_bf16": randn.bfloat16(),
        "randn_fp32": randn,
        "outliers": (randn * spikes).bfloat16(),
        # rows 2^-12..2^12 apart: the small rows' block scales are subnormal E4M3 in ModelOpt's arithmetic
        "row_scales": (randn * torch.exp2(torch.randint(-12, 13, (1024, 1), generator=gen).float())).bfloat16(),
        "ties": (torch.randint(-12, 13, (1024, 4096), generator=gen).float() / 4).bfloat16(),
        "signed_zeros": torch.where(randn.abs() < 0.5, -0.0, randn).bfloat16(),
        "all_zero": torch.zeros(64, 256),
    }


def main() -> None:
    from modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper import (
        fp4_fake_quant_block,
    )
    from triton.testing import do_bench_cudagraph

    from stages.precision.kernels import ops
    from stages.precision.nvfp4 import fake_quantize_nvfp4

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "modelopt_nvfp4.json"))
    args = parser.parse_args()
    rows = []
    for name, cpu in inputs().items():
        x = cpu.cuda()
        theirs = fp4_fake_quant_block(x, x.abs().amax().float())
        as_int = torch.int16 if x.element_size() == 2 else torch.int32

        def equal_bits(ours: torch.Tensor) -> float:
            return (ours.view(as_int) == theirs.view(as_int)).float().mean().item()  # noqa: B023 - called at once

        torchao = ops.fake_nvfp4(x)
        row = {"input": name, "elements": x.numel(),
               "kernel_modelopt_arithmetic_bits": equal_bits(ops.fake_nvfp4(x, "modelopt")),
               "reference_modelopt_arithmetic_bits": equal_bits(fake_quantize_nvfp4(x, arithmetic="modelopt")),
               "kernel_torchao_arithmetic_bits": equal_bits(torchao),
               "kernel_torchao_arithmetic_values": (torchao == theirs).float().mean().item()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    x = torch.randn(4096, 12288, device="cuda", dtype=torch.bfloat16)
    timing = {
        "size": "4096x12288",
        "modelopt_ms": do_bench_cudagraph(lambda: fp4_fake_quant_block(x, x.abs().amax().float())),
        "ours_modelopt_arithmetic_ms": do_bench_cudagraph(lambda: ops.fake_nvfp4(x, "modelopt")),
        "ours_torchao_arithmetic_ms": do_bench_cudagraph(lambda: ops.fake_nvfp4(x)),
    }
    timing["ratio_ours_to_modelopt"] = timing["ours_modelopt_arithmetic_ms"] / timing["modelopt_ms"]
    print(json.dumps(timing))
    out = Path(args.out)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "inputs": rows, "timing": timing}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
