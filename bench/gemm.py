"""GEMM throughput of the study's linear shapes: bf16 matmul vs FP8 torch._scaled_mm.

The ceiling of every precision variant of bench/step.py: per micro-batch of 4096 tokens, the
seven linears of a Qwen3-8B decoder layer each run fprop, dgrad and wgrad. FP8 is timed with FP32
promotion of the partial sums and with fast accumulation (what the fp8 recipe's fprop uses, as
Transformer Engine's does), per tensor and row-wise. Times are CUDA-graph replays (GPU time
without Python launch cost), ratios against bf16 in the same process.

  python -m bench.gemm [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

TOKENS, HIDDEN, FFN, Q, KV = 4096, 4096, 12288, 4096, 1024
# name -> (N out_features, K in_features, linears of this shape per layer)
LINEARS = {"q/o": (Q, HIDDEN, 2), "k/v": (KV, HIDDEN, 2), "gate/up": (FFN, HIDDEN, 2), "down": (HIDDEN, FFN, 1)}


def gemms(n: int, k: int) -> dict[str, tuple[int, int, int]]:
    """The three GEMMs of a linear as (M, N, K) of A[M,K] @ B[K,N]."""
    return {"fprop": (TOKENS, n, k), "dgrad": (TOKENS, k, n), "wgrad": (n, k, TOKENS)}


def time_bf16(m: int, n: int, k: int) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).t()
    return do_bench_cudagraph(lambda: a @ b)


def time_fp8(m: int, n: int, k: int, rowwise: bool = False, fast_accum: bool = False) -> float:
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
    if rowwise:
        sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    else:
        sa, sb = torch.ones((), device="cuda"), torch.ones((), device="cuda")
    return do_bench_cudagraph(
        lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "gemm.json"))
    args = parser.parse_args()
    rows, totals = [], {"bf16": 0.0, "fp8": 0.0, "fp8_fast_accum": 0.0, "fp8_rowwise": 0.0}
    print(torch.cuda.get_device_name())
    print(f"{'linear':8} {'gemm':6} {'M x N x K':>20} {'bf16 TF/s':>10} {'fp8 TF/s':>9} {'fast acc':>9} {'rowwise':>8} {'fp8/bf16 time':>14}")
    for name, (n, k, count) in LINEARS.items():
        for gemm, (m, gn, gk) in gemms(n, k).items():
            flops = 2 * m * gn * gk
            times = {"bf16": time_bf16(m, gn, gk), "fp8": time_fp8(m, gn, gk),
                     "fp8_fast_accum": time_fp8(m, gn, gk, fast_accum=True), "fp8_rowwise": time_fp8(m, gn, gk, True)}
            for key, ms in times.items():
                totals[key] += count * ms
            tflops = {key: flops / (ms * 1e-3) / 1e12 for key, ms in times.items()}
            rows.append({"linear": name, "gemm": gemm, "mnk": [m, gn, gk], "per_layer": count, "ms": times, "tflops": tflops})
            print(f"{name:8} {gemm:6} {f'{m}x{gn}x{gk}':>20} {tflops['bf16']:10.0f} {tflops['fp8']:9.0f} "
                  f"{tflops['fp8_fast_accum']:9.0f} {tflops['fp8_rowwise']:8.0f} {times['fp8'] / times['bf16']:14.3f}")
    print(f"one layer, one micro-batch, all GEMMs: bf16 {totals['bf16']:.2f} ms, fp8 {totals['fp8']:.2f} ms "
          f"({totals['fp8'] / totals['bf16']:.3f}x), fp8 fast accumulation {totals['fp8_fast_accum']:.2f} ms, "
          f"fp8 rowwise {totals['fp8_rowwise']:.2f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "per_layer_ms": totals, "gemms": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
