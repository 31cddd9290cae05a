"""Bandwidth of the Triton quantizers vs the device's copy bandwidth (x.clone(), same process).

Times are GPU time of CUDA-graph replays (triton.testing.do_bench_cudagraph): in a training step
the quantizers are queued behind GEMMs, so Python's launch cost is hidden there and would only
blur a kernel's bandwidth here. `eager_ms` (do_bench, launch cost included) is printed beside it.
GB/s counts every byte the kernels move: the bf16 input read once per pass (per-tensor FP8 and
NVFP4 scale from the whole tensor's amax, so they read it twice: an amax pass, then the cast)
plus every output written (FP8 data 1 B, E2M1 codes 1 B unpacked, scales, dequantized bf16 2 B).
`fraction_if_one_read` is the same time against a single read of the input. The PyTorch
reference is timed too.

`--sweep` first times each kernel family over candidate tiles (ops.TILES) on the three sizes
(each size's time as a multiple of its copy time, so the large one does not outweigh the
training step's shapes), prints the table and uses the fastest tile for the rest of the run:
how the defaults in ops.TILES were chosen.

  python -m bench.quantizers [--sweep [FAMILY ...]] [--kernels NAME,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench, do_bench_cudagraph

from stages.precision import fp8, mx, nvfp4
from stages.precision.kernels import ops

SIZES = [(4096, 4096), (4096, 12288), (151936, 4096)]
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# family (of ops.TILES) -> kernels of kernels() timed together; amax first: the others call it.
SWEEP = {
    "amax": ["amax"],
    "fp8": ["fp8_e4m3_quantize", "fp8_e5m2_quantize_and_transpose", "fp8_e5m2_quantize_and_transpose_2_launches",
            "fp8_e4m3_fake"],
    "block": ["mxfp8_quantize", "mxfp8_fake"],
    "nvfp4": ["nvfp4_quantize", "nvfp4_fake", "nvfp4_modelopt_fake"],
    "rows_cols": ["nvfp4_rows_mxfp8_cols_fake", "mxfp8_rows_and_cols_fake"],
    "block_t": ["mxfp8_quantize_colwise", "mxfp8_fake_colwise"],
}


def kernels() -> dict[str, tuple[callable, callable | None, int, float]]:
    """name -> (kernel(x), reference(x) or None, reads of the 2-B input, bytes written per element)."""
    return {
        "amax": (ops.amax, lambda x: x.abs().max(), 1, 0.0),  # the quantizers' partials, reduced by torch
        "fp8_e4m3_quantize": (lambda x: ops.fp8(x, E4M3), lambda x: fp8.quantize_fp8(x, E4M3), 2, 1.0),
        "fp8_e5m2_quantize_and_transpose": (lambda x: ops.fp8(x, E5M2, transposed=True), None, 2, 2.0),
        # the same in two launches (the amax kernel, then the cast): what the one launch replaced
        "fp8_e5m2_quantize_and_transpose_2_launches": (
            lambda x: ops.fp8(x, E5M2, transposed=True, one_launch=False), None, 2, 2.0,
        ),
        "fp8_e4m3_fake": (lambda x: ops.fake_fp8(x, E4M3), lambda x: fp8.fake_quantize_fp8(x, "fp8_e4m3"), 2, 2.0),
        "mxfp8_quantize": (ops.mxfp8, mx.quantize_mxfp8, 1, 1.0 + 1 / 32),
        "mxfp8_quantize_colwise": (lambda x: ops.mxfp8(x.t()), lambda x: mx.quantize_mxfp8(x.t()), 1, 1.0 + 1 / 32),
        "mxfp8_fake": (ops.fake_mxfp8, mx.fake_quantize_mxfp8, 1, 2.0),
        "mxfp8_fake_colwise": (lambda x: ops.fake_mxfp8(x.t()), lambda x: mx.fake_quantize_mxfp8(x.t()), 1, 2.0),
        "nvfp4_quantize": (ops.nvfp4, nvfp4.quantize_nvfp4, 2, 1.0 + 1 / 16),
        "nvfp4_fake": (ops.fake_nvfp4, nvfp4.fake_quantize_nvfp4, 2, 2.0),
        "nvfp4_modelopt_fake": (
            lambda x: ops.fake_nvfp4(x, "modelopt"),
            lambda x: nvfp4.fake_quantize_nvfp4(x, arithmetic="modelopt"),
            2,
            2.0,
        ),
        "nvfp4_rows_mxfp8_cols_fake": (
            lambda x: ops.fake_rows_and_cols(x, "nvfp4"),
            lambda x: (nvfp4.fake_quantize_nvfp4(x), mx.fake_quantize_mxfp8(x.t())),
            2,
            4.0,
        ),
        "mxfp8_rows_and_cols_fake": (
            lambda x: ops.fake_rows_and_cols(x, "mxfp8"),
            lambda x: (mx.fake_quantize_mxfp8(x), mx.fake_quantize_mxfp8(x.t())),
            1,
            4.0,
        ),
    }


def modelopt_nvfp4(x: torch.Tensor) -> tuple[float, float, float] | None:
    """(fractions of elements bit-equal to our NVFP4 fake quant in ModelOpt's arithmetic and in
    torchao's, ModelOpt's ms) if ModelOpt imports."""
    try:
        from modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper import (
            fp4_fake_quant_block,
        )
    except Exception as error:  # noqa: BLE001 - report why, keep benching
        print(f"modelopt: not compared ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
        return None
    amax = x.abs().amax().float()
    theirs = fp4_fake_quant_block(x, amax).view(torch.int16)
    modelopt, torchao = (ops.fake_nvfp4(x, arithmetic).view(torch.int16) for arithmetic in ("modelopt", "torchao"))
    return ((theirs == modelopt).float().mean().item(), (theirs == torchao).float().mean().item(),
            do_bench_cudagraph(lambda: fp4_fake_quant_block(x, amax)))


def sweep(families: list[str]) -> list[dict]:
    """Time each family's kernels over its candidate tiles; keep the fastest in ops.TILES.
    A tile's score: the sum over kernels and sizes of kernel time / copy time of that size."""
    inputs = [torch.randn(r, k, device="cuda", dtype=torch.bfloat16) for r, k in SIZES]
    copy_ms = [do_bench_cudagraph(lambda: x.clone()) for x in inputs]
    rows = []
    for family in families:
        names = SWEEP[family]
        fns = [kernels()[name][0] for name in names]
        timed = []
        for tile in ops.TILE_CANDIDATES[family]:
            ops.TILES[family] = tile
            try:
                copies = {name: [do_bench_cudagraph(lambda: fn(x), rep=5) / copy for x, copy in zip(inputs, copy_ms)]
                          for name, fn in zip(names, fns)}
            except Exception as error:  # noqa: BLE001 - a tile the compiler rejects is skipped, and said
                print(f"sweep {family} {tile}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
                continue
            ms = sum(sum(per_size) for per_size in copies.values())
            timed.append((ms, tile))
            rows.append({"family": family, "tile": [tile.rows, tile.cols, tile.warps], "copies": ms, "per_kernel": copies})
            detail = "  ".join(f"{name} " + "/".join(f"{c:.2f}" for c in per_size) for name, per_size in copies.items())
            print(f"sweep {family:9} rows {tile.rows:4} cols {tile.cols:5} warps {tile.warps:3}: {ms:8.3f} copies  ({detail})")
        best_ms, best = min(timed, key=lambda t: t[0])
        ops.TILES[family] = best
        print(f"sweep {family}: fastest {best} ({best_ms:.3f} copy times for {', '.join(names)} on {SIZES})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "quantizers.json"))
    parser.add_argument("--no-reference", action="store_true", help="skip timing the PyTorch reference")
    parser.add_argument("--sweep", nargs="*", choices=list(SWEEP), metavar="FAMILY",
                        help=f"choose ops.TILES by timing candidate tiles first (all families, or those named: {', '.join(SWEEP)})")
    parser.add_argument("--kernels", help="comma-separated: time only these (of: " + ", ".join(kernels()) + ")")
    args = parser.parse_args()
    chosen = kernels() if not args.kernels else {n: kernels()[n] for n in args.kernels.split(",")}
    rows = []
    device = torch.cuda.get_device_name()
    print(device)
    swept = [] if args.sweep is None else sweep(args.sweep or list(SWEEP))
    print(f"{'kernel':32} {'size':>14} {'ms':>8} {'GB/s':>8} {'of copy':>8} {'1 read':>7} {'eager ms':>8} {'ref ms':>8} {'speedup':>8}")
    for r, k in SIZES:
        x = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
        n = x.numel()
        copy_ms = do_bench_cudagraph(lambda: x.clone())
        copy_bw = 2 * n * 2 / (copy_ms * 1e-3) / 1e9
        rows.append({"kernel": "copy (x.clone)", "size": f"{r}x{k}", "ms": copy_ms, "gb_per_s": copy_bw, "fraction_of_copy_bw": 1.0})
        print(f"{'copy (x.clone)':32} {f'{r}x{k}':>14} {copy_ms:8.3f} {copy_bw:8.0f} {1.0:8.2f}")
        for name, (kernel, reference, reads, out_bytes) in chosen.items():
            ms = do_bench_cudagraph(lambda: kernel(x))
            eager_ms = do_bench(lambda: kernel(x))
            gbs = n * (2 * reads + out_bytes) / (ms * 1e-3) / 1e9
            one_read = n * (2 + out_bytes) / (ms * 1e-3) / 1e9 / copy_bw
            ref_ms = None
            if reference is not None and not args.no_reference:
                try:
                    ref_ms = do_bench(lambda: reference(x), rep=50)
                except torch.OutOfMemoryError:
                    ref_ms = None
                torch.cuda.empty_cache()
            row = {"kernel": name, "size": f"{r}x{k}", "ms": ms, "gb_per_s": gbs, "fraction_of_copy_bw": gbs / copy_bw,
                   "input_reads": reads, "fraction_if_one_read": one_read, "eager_ms": eager_ms,
                   "reference_ms": ref_ms, "speedup_vs_reference": (ref_ms / ms) if ref_ms else None}
            rows.append(row)
            ref_text = f"{ref_ms:8.3f} {ref_ms / ms:8.1f}" if ref_ms else f"{'-':>8} {'-':>8}"
            print(f"{name:32} {f'{r}x{k}':>14} {ms:8.3f} {gbs:8.0f} {gbs / copy_bw:8.2f} {one_read:7.2f} {eager_ms:8.3f} {ref_text}")
        if (r, k) == (4096, 4096) and not args.kernels:
            compared = modelopt_nvfp4(x)
            if compared is not None:
                equal, equal_torchao, mo_ms = compared
                print(f"modelopt fp4_fake_quant_block {r}x{k}: {mo_ms:.3f} ms (amax given); bit-equal to ours on "
                      f"{equal:.6f} of elements (nvfp4_arithmetic modelopt), {equal_torchao:.6f} (torchao)")
                rows.append({"kernel": "modelopt_nvfp4_fake", "size": f"{r}x{k}", "ms": mo_ms,
                             "gb_per_s": n * 4 / (mo_ms * 1e-3) / 1e9, "fraction_bit_equal_to_ours": equal,
                             "fraction_bit_equal_to_ours_torchao_arithmetic": equal_torchao})
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tiles = {family: [t.rows, t.cols, t.warps] for family, t in ops.TILES.items()}
    out.write_text(json.dumps({"device": device, "tiles": tiles, "sweep": swept, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
