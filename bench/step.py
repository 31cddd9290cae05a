"""Training-step speed of the precision backends on Qwen3-8B-shaped layers (one GPU, one process).

4 decoder layers (hidden 4096, ffn 12288, 32/8 heads, head_dim 128), vocab 151936, seq 4096,
micro-batch 1; a step = 8 micro-batches of gradient accumulation + one fused AdamW step.
Random init from transformers' Qwen3 config (no downloads). lm_head and the embedding stay
bf16 in every variant; their time (and the optimizer's) is reported apart from the decoder
layers' time, and the ratios are on the decoder layers' time, against the fastest bf16 run
(bf16 runs first and again last in each compile mode, which bounds clock drift).
`--tiny` runs the same step on layers so small that the GPU's work is negligible: its ms/step
is each backend's host cost (Python, kernel launches), which the GPU waits on wherever the host
is not ahead of it. `--profile DIR` writes, per variant, the GPU kernels of one step and the
Python functions (cProfile) of another; `--timeline DIR` where the GPU of one more step sat idle
and which host work it waited on (bench/timeline.py).

  python -m bench.step [--variants bf16,fp8_native,...] [--compile both|off|on] [--out FILE]
                       [--profile DIR] [--timeline DIR] [--tiny] [--layers N]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import record_function


@dataclass(frozen=True)
class Shape:
    layers: int = 4
    hidden: int = 4096
    ffn: int = 12288
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 151936
    seq: int = 4096
    micro_batches: int = 8


STUDY = Shape()  # Qwen3-8B's layers
# So small that the GPU's work is negligible: the step time is the host's (Python, launches).
TINY = Shape(hidden=256, ffn=768, heads=4, kv_heads=2, head_dim=64, vocab=1024, seq=64)
SPEC_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # the data sheet, dense; printed for reference
# name -> (recipe, backend); torchao_float8 is the anchor (torchao's own tensorwise float8 training).
VARIANTS = {
    "bf16": ("bf16", None),
    "fp8_native": ("fp8", "scaled_mm"),
    "fp8_delayed_native": ("fp8_delayed", "scaled_mm"),
    "mxfp8_emulated": ("mxfp8", "emulated"),
    "nv4f_mx8b_emulated": ("nv4f_mx8b", "emulated"),
    "nvfp4_qat_ours": ("nvfp4_qat", "emulated"),
    "nvfp4_qat_modelopt": ("nvfp4_qat", "modelopt"),
    "torchao_float8": ("fp8", "torchao_float8"),
}


@dataclass
class Result:
    name: str
    backend: str
    compile: bool
    ms_per_step: float | None = None
    decoder_ms: float | None = None
    decoder_forward_ms: float | None = None  # of decoder_ms: the layers' forward
    head_embed_ms: float | None = None
    optimizer_ms: float | None = None
    ratio_to_bf16: float | None = None  # decoder time / the fastest bf16 variant's decoder time
    tflops: float | None = None  # model FLOPs of the whole step / step time
    decoder_tflops: float | None = None
    decoder_fraction_of_peak: float | None = None  # decoder TFLOP/s / measured dense bf16 peak
    peak_mem_gib: float | None = None
    # cudaMalloc retries (the caching allocator freed its cache to fit): each stalls the step.
    alloc_retries: int | None = None
    # With --profile: profiled step time minus the sum of its GPU kernels' times (launch gaps,
    # a GPU waiting on Python).
    gpu_idle_ms: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def flops(s: Shape) -> tuple[float, float]:
    """(decoder, lm_head) FLOPs of one step: 6 x tokens x weights (+ causal attention, 3x fwd)."""
    tokens = s.seq * s.micro_batches
    q_out = s.heads * s.head_dim
    linear = s.hidden * (q_out + 2 * s.kv_heads * s.head_dim) + q_out * s.hidden + 3 * s.hidden * s.ffn
    attention_fwd = 2 * 2 * s.seq * s.seq * q_out / 2 * s.micro_batches  # QK^T and PV, causal half
    decoder = s.layers * (6 * tokens * linear + 3 * attention_fwd)
    return decoder, 6 * tokens * s.vocab * s.hidden


def build_model(s: Shape) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers, num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads, head_dim=s.head_dim, vocab_size=s.vocab, max_position_embeddings=s.seq,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen3ForCausalLM(config).to(torch.bfloat16)


def convert(model: torch.nn.Module, recipe_name: str, backend: str | None, s: Shape):
    """The variant's conversion; returns on_step(step) for after each optimizer step."""
    if backend is None:
        return lambda step: None
    if backend == "torchao_float8":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model.model.layers, config=Float8LinearConfig.from_recipe_name("tensorwise"))
        return lambda step: None
    from stages.precision import load_recipe, prepare_model

    calibrate = None
    if backend == "modelopt":
        ids = torch.randint(0, s.vocab, (1, min(256, s.seq)), device="cuda")

        def calibrate(m: torch.nn.Module) -> None:
            with torch.no_grad():
                m(input_ids=ids)

    prepared = prepare_model(model, load_recipe(recipe_name), backend, calibrate)
    return prepared.on_step


def measured_bf16_peak_tflops(n: int = 8192, repeats: int = 20) -> float:
    """Dense bf16 GEMM throughput of this device, measured: the best of `repeats` n^3 matmuls."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    del a, b
    return 2 * n**3 / (best * 1e-3) / 1e12


def profile_step(step_fn, path: Path) -> float:
    """One more step under torch.profiler: the GPU kernels by total time, as a text table.
    Returns the step's GPU idle time: its wall time minus the sum of its kernels' times."""
    from torch.profiler import ProfilerActivity, profile

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        step_fn()
        end.record()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    busy_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    return start.elapsed_time(end) - busy_ms


def timeline_step(step_fn, path: Path) -> dict:
    """One more step under torch.profiler (CPU and CUDA): where the GPU waited for the host
    (bench.timeline), written as JSON; returns the summary."""
    from torch.profiler import ProfilerActivity, profile

    from bench.timeline import host_syncs, idle_gaps, summarize

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    trace = path.with_suffix(".trace.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    loaded = json.loads(trace.read_text())
    trace.unlink()  # hundreds of MB at full depth; the summary is what is kept
    summary = summarize(*idle_gaps(loaded))
    summary["host_syncs"] = host_syncs(loaded)
    path.write_text(json.dumps(summary, indent=1))
    return summary


def profile_host(step_fn, path: Path) -> None:
    """One more step under cProfile: the Python functions by their own time, as text."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    step_fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(45)
    path.write_text(text.getvalue())


def run_variant(
    name: str, compiled: bool, steps: int, warmup: int, s: Shape = STUDY, profile_dir: Path | None = None,
    timeline_dir: Path | None = None,
) -> Result:
    recipe_name, backend = VARIANTS[name]
    result = Result(name, backend or "bf16", compiled)
    model = build_model(s)
    on_step = convert(model, recipe_name, backend, s)
    inner = model.model
    layers = list(inner.layers)
    if compiled:
        for layer in layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    positions = torch.arange(s.seq, device="cuda").unsqueeze(0)
    events = []

    def micro_batch() -> list[torch.cuda.Event]:
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
        ids = torch.randint(0, s.vocab, (1, s.seq), device="cuda", generator=gen)
        marks[0].record()
        emb = inner.embed_tokens(ids)
        h0 = emb.detach().requires_grad_()
        marks[1].record()
        with record_function("step:forward"):
            rope = inner.rotary_emb(h0, positions)
            h = h0
            for layer in layers:
                out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope)
                h = out[0] if isinstance(out, tuple) else out
        hd = h.detach().requires_grad_()
        marks[2].record()
        with record_function("step:head"):
            logits = model.lm_head(inner.norm(hd)).float()
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:]) / s.micro_batches
            loss.backward()
            del logits
        marks[3].record()
        with record_function("step:backward"):
            h.backward(hd.grad)
        marks[4].record()
        emb.backward(h0.grad)
        marks[5].record()
        return marks

    def train_step(step: int) -> None:
        t_start = torch.cuda.Event(enable_timing=True)
        t_start.record()
        mbs = [micro_batch() for _ in range(s.micro_batches)]
        t_opt = torch.cuda.Event(enable_timing=True)
        t_opt.record()
        with record_function("step:optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            on_step(step + 1)
        t_end = torch.cuda.Event(enable_timing=True)
        t_end.record()
        events.append((t_start, mbs, t_opt, t_end))

    try:
        for step in range(warmup + steps):
            if step == warmup:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                events.clear()
                # As the train stage (gc_every): no automatic collection pausing the host mid-step.
                gc.collect()
                gc.disable()
            train_step(step)
        torch.cuda.synchronize()
    finally:
        gc.enable()
    peak_mem = torch.cuda.max_memory_allocated()
    stem = f"{name}{'_compiled' if compiled else ''}"
    if profile_dir is not None:
        result.gpu_idle_ms = profile_step(lambda: train_step(warmup + steps), profile_dir / f"{stem}.txt")
        profile_host(lambda: train_step(warmup + steps + 1), profile_dir / f"{stem}_host.txt")
        del events[-2:]
    if timeline_dir is not None:
        summary = timeline_step(lambda: train_step(warmup + steps + 2), timeline_dir / f"{stem}.json")
        result.notes.append(
            f"timeline: idle {summary['idle_ms']} ms of {summary['window_ms']} ms, host-bound {summary['host_bound_idle_ms']} ms"
        )
        del events[-1:]
    decoder = forward = head = opt = total = 0.0
    for t_start, mbs, t_opt, t_end in events:
        total += t_start.elapsed_time(t_end)
        opt += t_opt.elapsed_time(t_end)
        for m in mbs:
            forward += m[1].elapsed_time(m[2])
            decoder += m[1].elapsed_time(m[2]) + m[3].elapsed_time(m[4])
            head += m[0].elapsed_time(m[1]) + m[2].elapsed_time(m[3]) + m[4].elapsed_time(m[5])
    n = len(events)
    result.ms_per_step, result.decoder_ms, result.decoder_forward_ms = total / n, decoder / n, forward / n
    result.head_embed_ms, result.optimizer_ms = head / n, opt / n
    dec_flops, head_flops = flops(s)
    result.tflops = (dec_flops + head_flops) / (result.ms_per_step * 1e-3) / 1e12
    result.decoder_tflops = dec_flops / (result.decoder_ms * 1e-3) / 1e12
    result.peak_mem_gib = peak_mem / 2**30
    result.alloc_retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    del model, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--compile", choices=["both", "off", "on"], default="both")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, caches)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip the variants left after this many seconds")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "step.json"))
    parser.add_argument("--profile", type=Path, help="write each variant's top GPU kernels (one profiled step) here")
    parser.add_argument("--timeline", type=Path, help="write each variant's GPU idle gaps and their host causes (bench.timeline) here")
    parser.add_argument("--tiny", action="store_true", help="tiny layers: the step time is the host's overhead")
    parser.add_argument("--layers", type=int, help=f"decoder layers (default {STUDY.layers}; Qwen3-8B has 36)")
    args = parser.parse_args()
    shape = TINY if args.tiny else STUDY
    if args.layers:
        shape = replace(shape, layers=args.layers)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.compile]
    measured_peak = measured_bf16_peak_tflops()
    print(f"measured dense bf16 peak (8192^3 matmul): {measured_peak:.0f} TFLOP/s", flush=True)
    started = time.monotonic()
    results: list[Result] = []
    for compiled in modes:
        # bf16 once more at the end: the GPU's clocks drift over minutes of full load (power,
        # heat), and the two bf16 numbers bound that drift; ratios take the faster one.
        runs = names + (["bf16"] if "bf16" in names and len(names) > 1 else [])
        for i, name in enumerate(runs):
            if time.monotonic() - started > args.budget_s:
                results.append(Result(name, VARIANTS[name][1] or "bf16", compiled, error="skipped: time budget"))
                continue
            t0 = time.monotonic()
            try:
                result = run_variant(name, compiled, args.steps, args.warmup, shape, args.profile, args.timeline)
            except Exception as error:  # one broken variant must not hide the others' numbers
                first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
                result = Result(name, VARIANTS[name][1] or "bf16", compiled, error=f"{type(error).__name__}: {first}")
                traceback.print_exc()
            result.notes.append(f"wall {time.monotonic() - t0:.0f}s incl. build/compile")
            if i == len(names):
                result.notes.append("bf16 repeated last: clock drift check")
            results.append(result)
            print(json.dumps(asdict(result)), flush=True)
            torch.cuda.empty_cache()
    write(results, Path(args.out), measured_peak, shape)


def write(results: list[Result], out: Path, measured_peak: float, shape: Shape) -> None:
    bf16 = [r.decoder_ms for r in results if r.name == "bf16" and r.decoder_ms]
    base = min(bf16) if bf16 else None
    for r in results:
        if base and r.decoder_ms:
            r.ratio_to_bf16 = r.decoder_ms / base
    device = torch.cuda.get_device_name()
    spec_peak = next((v for k, v in SPEC_BF16_PEAK_TFLOPS.items() if k in device), None)
    header = f"{'variant':22} {'compile':7} {'ms/step':>9} {'decoder':>8} {'(fwd)':>7} {'head+emb':>8} {'optim':>7} {'ratio':>6} {'TFLOP/s':>8} {'dec TF/s':>8} {'of peak':>7} {'peak GiB':>8} {'idle ms':>7}"
    print(
        f"\n{device}; ratio = decoder-layer time / fastest bf16 decoder time; dense bf16 peak measured "
        f"{measured_peak:.0f} TFLOP/s (data sheet {spec_peak}); 'of peak' = decoder TFLOP/s / measured peak"
    )
    print(header)
    for r in results:
        if r.error:
            print(f"{r.name:22} {str(r.compile):7} {r.error}")
            continue
        print(
            f"{r.name:22} {str(r.compile):7} {r.ms_per_step:9.1f} {r.decoder_ms:8.1f} {r.decoder_forward_ms:7.1f} {r.head_embed_ms:8.1f} "
            f"{r.optimizer_ms:7.1f} {r.ratio_to_bf16 or float('nan'):6.3f} {r.tflops:8.1f} {r.decoder_tflops:8.1f} {r.decoder_tflops / measured_peak:7.2f} {r.peak_mem_gib:8.1f} {r.gpu_idle_ms if r.gpu_idle_ms is not None else float('nan'):7.1f}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in results:
        if r.decoder_tflops:
            r.decoder_fraction_of_peak = r.decoder_tflops / measured_peak
    payload = {"device": device, "measured_bf16_peak_tflops": measured_peak, "spec_bf16_peak_tflops": spec_peak,
               "shape": asdict(shape), "variants": [asdict(r) for r in results]}
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
