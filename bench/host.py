"""Host (CPU) cost per call of the pieces of a quantized linear, against bf16 in the same process.

A training step is host-bound wherever Python and the launch path take longer than the GPU's
kernels (bench/step.py --tiny measures that per step). This splits it: each piece runs on
tensors so small that its GPU work is negligible, so the wall time per call is the host's.
Ratios are against one bf16 `torch.mm` call (the cost every variant pays per GEMM).

  python -m bench.host [--calls N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

M, K, N = 64, 256, 256  # tiny: microseconds of GPU work per call


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Median over 5 rounds of the host's wall time per call (the GPU keeps up: tiny work)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def pieces() -> dict[str, Callable[[], object]]:
    from stages.precision import load_recipe
    from stages.precision.fp8_native import ScaledMMLinear
    from stages.precision.kernels import ops
    from stages.precision.kernels import triton_jit as jit

    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    xq, wq = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    tile = ops.TILES["amax"]
    tiles_r, tiles_k = ops._grid(M, K, tile)
    programs = min(tiles_r * tiles_k, jit.MAX_PARTIALS.value)
    partials = torch.empty(1 + programs, dtype=torch.int32, device="cuda")
    counter = torch.zeros((), dtype=torch.int32, device="cuda")
    amax_args = (x, partials, counter, M, K, K, 1, tiles_k, tiles_r * tiles_k)

    def amax_jit() -> None:
        jit._amax_kernel[(programs,)](*amax_args, BR=tile.rows, BK=tile.cols, num_warps=tile.warps)

    def amax_direct() -> None:
        ops._AMAX((programs,), *amax_args, BR=tile.rows, BK=tile.cols, num_warps=tile.warps)

    bf16_linear = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    fp8_linear = ScaledMMLinear(nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16), load_recipe("fp8"))
    x_grad = x.clone().requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer(x_grad).backward(dy)

        return run

    return {
        "torch.mm bf16": lambda: torch.mm(x, w.t()),
        "torch._scaled_mm fp8": lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
        "torch.empty": lambda: torch.empty(M, K, dtype=torch.float8_e4m3fn, device="cuda"),
        "torch.zeros (0-dim)": lambda: torch.zeros((), dtype=torch.int32, device="cuda"),
        "amax kernel: triton JIT launch": amax_jit,
        "amax kernel: direct (Launcher)": amax_direct,
        "ops.amax": lambda: ops.amax(x),
        "ops.fp8 (+transpose)": lambda: ops.fp8(x, torch.float8_e4m3fn, transposed=True),
        "ops.fp8 (+transpose), 2 launches": lambda: ops.fp8(x, torch.float8_e4m3fn, transposed=True, one_launch=False),
        "nn.Linear fwd+bwd bf16": fwd_bwd(bf16_linear),
        "ScaledMMLinear fwd+bwd fp8": fwd_bwd(fp8_linear),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "host.json"))
    args = parser.parse_args()
    timed = {name: per_call_us(fn, args.calls) for name, fn in pieces().items()}
    base = timed["torch.mm bf16"]
    rows = [{"piece": name, "us_per_call": us, "ratio_to_mm": us / base} for name, us in timed.items()]
    print(f"{torch.cuda.get_device_name()}; host µs per call, ratio to one bf16 torch.mm")
    for row in rows:
        print(f"{row['piece']:32} {row['us_per_call']:8.1f} {row['ratio_to_mm']:6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "pieces": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
