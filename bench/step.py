"""Training-step speed of the precision backends on Qwen3-8B-shaped layers (one GPU, one process).

4 decoder layers (hidden 4096, ffn 12288, 32/8 heads, head_dim 128), vocab 151936, seq 4096,
micro-batch 1; a step = 8 micro-batches of gradient accumulation + one fused AdamW step.
Random init from transformers' Qwen3 config (no downloads). lm_head and the embedding stay
bf16 in every variant; their time (and the optimizer's) is reported apart from the decoder
layers' time, and the ratios are on the decoder layers' time, against the fastest bf16 variant.

  python -m bench.step [--variants bf16,fp8_native,...] [--compile both|off|on] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, SEQ, LAYERS, MICRO = 4096, 12288, 32, 8, 128, 151936, 4096, 4, 8
DENSE_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
# name -> (recipe, backend); torchao_float8 is the anchor (torchao's own tensorwise float8 training).
VARIANTS = {
    "bf16": ("bf16", None),
    "fp8_native": ("fp8", "scaled_mm"),
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
    head_embed_ms: float | None = None
    optimizer_ms: float | None = None
    ratio_to_bf16: float | None = None  # decoder time / the fastest bf16 variant's decoder time
    tflops: float | None = None  # model FLOPs of the whole step / step time
    decoder_tflops: float | None = None
    peak_mem_gib: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def flops() -> tuple[float, float]:
    """(decoder, lm_head) FLOPs of one step: 6 x tokens x weights (+ causal attention, 3x fwd)."""
    tokens = SEQ * MICRO
    linear = HIDDEN * (HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM) + HEADS * HEAD_DIM * HIDDEN + 3 * HIDDEN * FFN
    attention_fwd = 2 * 2 * SEQ * SEQ * HEADS * HEAD_DIM / 2 * MICRO  # QK^T and PV, causal half
    decoder = LAYERS * (6 * tokens * linear + 3 * attention_fwd)
    return decoder, 6 * tokens * VOCAB * HIDDEN


def build_model() -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=VOCAB, max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen3ForCausalLM(config).to(torch.bfloat16)


def convert(model: torch.nn.Module, recipe_name: str, backend: str | None):
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
        ids = torch.randint(0, VOCAB, (1, 256), device="cuda")

        def calibrate(m: torch.nn.Module) -> None:
            with torch.no_grad():
                m(input_ids=ids)

    prepared = prepare_model(model, load_recipe(recipe_name), backend, calibrate)
    return prepared.on_step


def run_variant(name: str, compiled: bool, steps: int, warmup: int) -> Result:
    recipe_name, backend = VARIANTS[name]
    result = Result(name, backend or "bf16", compiled)
    model = build_model()
    on_step = convert(model, recipe_name, backend)
    inner = model.model
    layers = list(inner.layers)
    if compiled:
        for layer in layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    positions = torch.arange(SEQ, device="cuda").unsqueeze(0)
    events = []

    def micro_batch() -> list[torch.cuda.Event]:
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
        ids = torch.randint(0, VOCAB, (1, SEQ), device="cuda", generator=gen)
        marks[0].record()
        emb = inner.embed_tokens(ids)
        h0 = emb.detach().requires_grad_()
        marks[1].record()
        rope = inner.rotary_emb(h0, positions)
        h = h0
        for layer in layers:
            out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope)
            h = out[0] if isinstance(out, tuple) else out
        hd = h.detach().requires_grad_()
        marks[2].record()
        logits = model.lm_head(inner.norm(hd)).float()
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:]) / MICRO
        loss.backward()
        del logits
        marks[3].record()
        h.backward(hd.grad)
        marks[4].record()
        emb.backward(h0.grad)
        marks[5].record()
        return marks

    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            events.clear()
        t_start = torch.cuda.Event(enable_timing=True)
        t_start.record()
        mbs = [micro_batch() for _ in range(MICRO)]
        t_opt = torch.cuda.Event(enable_timing=True)
        t_opt.record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        on_step(step + 1)
        t_end = torch.cuda.Event(enable_timing=True)
        t_end.record()
        events.append((t_start, mbs, t_opt, t_end))
    torch.cuda.synchronize()
    decoder = head = opt = total = 0.0
    for t_start, mbs, t_opt, t_end in events:
        total += t_start.elapsed_time(t_end)
        opt += t_opt.elapsed_time(t_end)
        for m in mbs:
            decoder += m[1].elapsed_time(m[2]) + m[3].elapsed_time(m[4])
            head += m[0].elapsed_time(m[1]) + m[2].elapsed_time(m[3]) + m[4].elapsed_time(m[5])
    n = len(events)
    result.ms_per_step, result.decoder_ms = total / n, decoder / n
    result.head_embed_ms, result.optimizer_ms = head / n, opt / n
    dec_flops, head_flops = flops()
    result.tflops = (dec_flops + head_flops) / (result.ms_per_step * 1e-3) / 1e12
    result.decoder_tflops = dec_flops / (result.decoder_ms * 1e-3) / 1e12
    result.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--compile", choices=["both", "off", "on"], default="both")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, caches)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip the variants left after this many seconds")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "step.json"))
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.compile]
    started = time.monotonic()
    results: list[Result] = []
    for compiled in modes:
        for name in names:
            if time.monotonic() - started > args.budget_s:
                results.append(Result(name, VARIANTS[name][1] or "bf16", compiled, error="skipped: time budget"))
                continue
            t0 = time.monotonic()
            try:
                result = run_variant(name, compiled, args.steps, args.warmup)
            except Exception as error:  # one broken variant must not hide the others' numbers
                first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
                result = Result(name, VARIANTS[name][1] or "bf16", compiled, error=f"{type(error).__name__}: {first}")
                traceback.print_exc()
            result.notes.append(f"wall {time.monotonic() - t0:.0f}s incl. build/compile")
            results.append(result)
            print(json.dumps(asdict(result)), flush=True)
            torch.cuda.empty_cache()
    write(results, Path(args.out))


def write(results: list[Result], out: Path) -> None:
    bf16 = [r.decoder_ms for r in results if r.name == "bf16" and r.decoder_ms]
    base = min(bf16) if bf16 else None
    for r in results:
        if base and r.decoder_ms:
            r.ratio_to_bf16 = r.decoder_ms / base
    device = torch.cuda.get_device_name()
    peak = next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in device), None)
    header = f"{'variant':22} {'compile':7} {'ms/step':>9} {'decoder':>8} {'head+emb':>8} {'optim':>7} {'ratio':>6} {'TFLOP/s':>8} {'dec TF/s':>8} {'peak GiB':>8}"
    print(f"\n{device}; ratio = decoder-layer time / fastest bf16 decoder time; dense bf16 peak {peak} TFLOP/s")
    print(header)
    for r in results:
        if r.error:
            print(f"{r.name:22} {str(r.compile):7} {r.error}")
            continue
        print(
            f"{r.name:22} {str(r.compile):7} {r.ms_per_step:9.1f} {r.decoder_ms:8.1f} {r.head_embed_ms:8.1f} "
            f"{r.optimizer_ms:7.1f} {r.ratio_to_bf16 or float('nan'):6.3f} {r.tflops:8.1f} {r.decoder_tflops:8.1f} {r.peak_mem_gib:8.1f}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": device, "dense_bf16_peak_tflops": peak, "shape": {
        "layers": LAYERS, "hidden": HIDDEN, "ffn": FFN, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab": VOCAB, "seq": SEQ, "micro_batches": MICRO}, "variants": [asdict(r) for r in results]}
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
