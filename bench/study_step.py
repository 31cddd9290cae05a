"""The study's step time at Qwen3-8B's full size on one GPU, through the train stage's own code.

A random-init Qwen3-8B (36 layers, hidden 4096, ffn 12288, 32/8 heads, head_dim 128, vocab 151936;
built on the GPU, nothing downloaded) trained by the train stage as `python -m stages.train` runs
it: `run_stage` with a spec (markers, tracking events, metrics.jsonl), then the stage's
`load_data` -> `build_training` (the recipe's conversion, activation checkpointing as the params
say, torch.compile per decoder layer, fused AdamW, the schedule) -> `train_loop` (its `train_step`,
gradient clipping, metrics, logging, the final validation). Two things differ from a pipeline run:
the model comes from memory rather than a checkpoint on disk, and the final 16 GB model is not
written. Data: a preprocess-format folder of random tokens, seq 4096. Params: the h100 profile's
(global batch 8 = 8 micro-batches of 1 sequence, bf16 weights, lr 1e-5, compile on).

Per variant: the stage's step time (its own `step_time_s`, the warm-up steps left out), tokens/s,
MFU = model FLOPs of the step (bench.step.flops: 6 x tokens x weights of the decoder and lm_head,
plus causal attention; recomputation not counted) / step time / the dense bf16 peak measured in
this process, peak memory, and the ratio to the bf16 run (the faster of the first and the last:
clock drift). `--harness` also times bench.step's bf16 step at the same depth in this process, the
yardstick of the stage's overhead. A variant that does not fit in memory is reported with the
memory it had reached and rerun at the largest depth of `--fallback-layers` that fits (with bf16
at that depth for its ratio). Each variant, the harness and the peak measurement run in a process
of their own (a variant's model, optimizer and compiled graphs all go with it).

  python -m bench.study_step [--variants bf16,fp8_scaled_mm,...] [--layers 36] [--steps 3]
                             [--warmup 2] [--harness] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.step import (
    STUDY,
    Shape,
    build_model,
    flops,
    measured_bf16_peak_tflops,
    run_variant,
)

# name -> (recipe, train-stage backend, compile). torchao_float8 is the anchor: torchao's own
# tensorwise float8 training, applied to the model before the stage takes it (recipe bf16
# leaves linears as they are); nvfp4_qat_modelopt_eager the other anchor, ModelOpt's modules.
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "bf16": ("bf16", "emulated", True),
    "fp8_scaled_mm": ("fp8", "scaled_mm", True),
    # The seed's fp8 run ("ds"): Transformer Engine's delayed scaling, here on the same FP8 GEMMs.
    "fp8_delayed_scaled_mm": ("fp8_delayed", "scaled_mm", True),
    "mxfp8_emulated": ("mxfp8", "emulated", True),
    "nv4f_mx8b_emulated": ("nv4f_mx8b", "emulated", True),
    "nvfp4_qat_emulated": ("nvfp4_qat", "emulated", True),
    "nvfp4_qat_modelopt_compiled": ("nvfp4_qat", "modelopt", True),
    "nvfp4_qat_modelopt_eager": ("nvfp4_qat", "modelopt", False),
    "torchao_float8": ("bf16", "emulated", True),
}
# The seed's step times on 8x B200 (Transformer Engine; ModelOpt for the QAT run), seconds.
SEED_B200_S = {"nvfp4_qat_modelopt_eager": 28.28, "bf16": 14.00, "fp8_delayed_scaled_mm": 10.97,
               "mxfp8_emulated": 11.93, "nv4f_mx8b_emulated": 13.18}


@dataclass
class Result:
    name: str
    recipe: str
    backend: str
    compile: bool
    layers: int
    step_s: float | None = None
    step_s_each: list[float] = field(default_factory=list)  # every timed step
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu_measured_peak: float | None = None
    stage_mfu_spec_peak: float | None = None  # what the stage logs: 6 N tokens / 989 TFLOP/s
    peak_mem_gib: float | None = None
    alloc_retries: int | None = None  # cudaMalloc retries (allocator cache freed to fit): stalls
    ratio_to_bf16: float | None = None
    tags: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def write_random_tokens(data_dir: Path, rows: int, seq: int, vocab: int) -> Path:
    """A preprocess-format output of random tokens: every token a label, one sequence per row."""
    import datasets

    from contract.markers import mark_succeeded

    gen = torch.Generator().manual_seed(0)
    features = datasets.Features({c: datasets.Sequence(datasets.Value("int32"))
                                  for c in ("input_ids", "labels", "position_ids")})
    for split, n in (("train", rows), ("val", 1)):
        ids = torch.randint(0, vocab, (n, seq), generator=gen, dtype=torch.int32).tolist()
        positions = [list(range(seq))] * n
        datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "position_ids": positions},
                                   features=features).save_to_disk(str(data_dir / split))
    mark_succeeded(data_dir, "random-tokens")
    return data_dir


def train_params(recipe: str, backend: str, compiled: bool, steps: int, activation_checkpointing: bool) -> dict:
    """The h100 profile's train settings (global batch 8 of micro-batch 1, bf16, lr 1e-5)."""
    return {"recipe": recipe, "backend": backend, "compile": compiled, "dtype": "bfloat16", "global_batch": 8,
            "micro_batch": 1, "steps": steps, "lr": 1e-5, "warmup_steps": 1, "val_batches": 1,
            "device": "cuda", "calib_batches": 1, "method": "qat" if "qat" in recipe else "sft",
            "activation_checkpointing": activation_checkpointing, "log_every": 1}


def stage_work(ctx, shape: Shape, torchao_float8: bool, out: dict[str, Any]) -> dict[str, Any]:
    """The train stage's run() with the model built in memory and no final save."""
    from contract.params.train import TrainStageParams
    from stages.train import core
    from stages.train.distributed import init_world
    from stages.train.metrics import MetricsFile

    params = ctx.params_as(TrainStageParams)
    world = init_world(params.device)
    core.seed_everything(params.seed, world.device)
    data = core.load_data(ctx, params, world)
    model = build_model(shape)
    if torchao_float8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model.model.layers, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    torch.cuda.reset_peak_memory_stats()
    training = core.build_training(ctx, params, world, data, model, source=str(ctx.output_dir))
    out["tags"] = training.describe
    summary = core.train_loop(ctx, training.session, training.start, MetricsFile(ctx.output_dir, 0))
    out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    return summary


def run_stage_variant(name: str, shape: Shape, steps: int, warmup: int, root: Path, data_dir: Path,
                      activation_checkpointing: bool) -> Result:
    from contract.spec import StageSpec, write_spec
    from stages.runtime import run_stage

    recipe, backend, compiled = VARIANTS[name]
    result = Result(name, recipe, backend, compiled, shape.layers)
    stage = f"{name.replace('_', '-')}-{shape.layers}"
    spec = StageSpec(run_id="study-step", stage=stage, kind="train", fingerprint=f"{stage}-{time.time()}",
                     output_dir=root / stage, inputs={"data": data_dir},
                     params=train_params(recipe, backend, compiled, warmup + steps, activation_checkpointing))
    out: dict[str, Any] = {}
    work = functools.partial(stage_work, shape=shape, torchao_float8=name == "torchao_float8", out=out)
    code = run_stage(write_spec(spec), work)
    result.tags = out.get("tags", {})
    if code != 0:
        log = (root / stage / "stage.log")
        failed = (root / stage / "_FAILED")
        result.error = failed.read_text()[:600] if failed.exists() else f"exit {code}"
        if log.exists():
            print(log.read_text()[-3000:])
        return result
    rows = [json.loads(line) for line in (root / stage / "metrics.jsonl").read_text().splitlines()]
    timed = [row["step_time_s"] for row in rows[warmup:]]
    result.step_s_each = timed
    result.step_s = sum(timed) / len(timed)
    result.tokens_per_s = 8 * shape.seq / result.step_s
    result.stage_mfu_spec_peak = sum(row.get("mfu", 0.0) for row in rows[warmup:]) / len(timed) or None
    result.peak_mem_gib = out.get("peak_mem_gib")
    result.alloc_retries = out.get("alloc_retries")
    decoder, head = flops(replace(shape, micro_batches=8))
    result.tflops = (decoder + head) / result.step_s / 1e12
    return result


def run_child(args: argparse.Namespace, child: str, layers: int, root: Path) -> dict[str, Any]:
    """One variant (or "harness", or "peak") in a process of its own; its result as a dict."""
    out = root / f"{child}-{layers}.json"
    command = [sys.executable, "-m", "bench.study_step", "--child", child, "--layers", str(layers), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--root", str(root), "--out", str(out)]
    if args.activation_checkpointing:
        command.append("--activation-checkpointing")
    code = subprocess.run(command, check=False).returncode
    if out.exists():
        return json.loads(out.read_text())
    error = f"child process exited {code} without a result"
    return {"error": error} if child in ("harness", "peak") else asdict(Result(child, *VARIANTS[child], layers, error=error))


def child_main(args: argparse.Namespace) -> None:
    shape = replace(STUDY, layers=args.layers)
    if args.child == "peak":
        result: dict[str, Any] = {"tflops": measured_bf16_peak_tflops(), "device": torch.cuda.get_device_name()}
    elif args.child == "harness":
        result = asdict(run_variant("bf16", True, args.steps, args.warmup, shape))
    else:
        try:
            result = asdict(run_stage_variant(args.child, shape, args.steps, args.warmup, args.root, args.root / "data",
                                              args.activation_checkpointing))
        except Exception as error:  # noqa: BLE001 - reported in the table, not a traceback alone
            traceback.print_exc()
            result = asdict(Result(args.child, *VARIANTS[args.child], args.layers,
                                   error=f"{type(error).__name__}: {str(error)[:300]}"))
        if result["error"] and "out of memory" in result["error"].lower():
            result["notes"].append(f"out of memory at {args.layers} layers; allocated "
                                   f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB at most")
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--fallback-layers", default="28,20,12", help="depths tried, in order, after an out-of-memory")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, allocator)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--harness", action="store_true", help="also time bench.step's bf16 step at the same depth")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "study_step.json"))
    parser.add_argument("--root", type=Path, help="stage folders (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant, "harness" or "peak"
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    shape = replace(STUDY, layers=args.layers)
    root = (args.root or Path(tempfile.mkdtemp(prefix="study-step-"))).resolve()  # specs hold absolute paths
    write_random_tokens(root / "data", rows=16, seq=shape.seq, vocab=shape.vocab)
    measured = run_child(args, "peak", args.layers, root)  # the parent never touches the GPU: all its memory is the children's
    peak = measured["tflops"]
    print(f"measured dense bf16 peak (8192^3 matmul): {peak:.0f} TFLOP/s", flush=True)
    payload: dict[str, Any] = {"device": measured["device"], "measured_bf16_peak_tflops": peak,
                               "shape": asdict(shape), "global_batch": 8, "activation_checkpointing":
                               args.activation_checkpointing, "seed_b200_s": SEED_B200_S, "variants": [],
                               "harness": None}
    depths = [args.layers, *(int(n) for n in args.fallback_layers.split(",") if int(n) < args.layers)]
    # (variant, depths to try in order); bf16 once more at the end bounds the clocks' drift.
    tasks = [(name, depths) for name in names + (["bf16"] if "bf16" in names and len(names) > 1 else [])]
    for name, tried in tasks:
        for layers in tried:
            t0 = time.monotonic()
            result = run_child(args, name, layers, root)
            result["notes"].append(f"wall {time.monotonic() - t0:.0f}s incl. start, build, compile, validation")
            payload["variants"].append(result)
            print(json.dumps(result), flush=True)
            write(payload, Path(args.out))
            if not (result["error"] and "out of memory" in result["error"].lower()):
                if layers != args.layers and name != "bf16":  # its ratio needs bf16 at this depth too
                    tasks.append(("bf16", [layers]))
                break
    if args.harness:
        payload["harness"] = run_child(args, "harness", args.layers, root)
        print(json.dumps(payload["harness"]), flush=True)
    write(payload, Path(args.out))


def write(payload: dict[str, Any], out: Path) -> None:
    """Ratios, MFU and the table from what has run so far; the JSON written whole each time."""
    peak = payload["measured_bf16_peak_tflops"]
    variants = payload["variants"]
    for v in variants:
        bf16 = [b["step_s"] for b in variants if b["name"] == "bf16" and b["step_s"] and b["layers"] == v["layers"]]
        if v["step_s"]:
            v["mfu_measured_peak"] = v["tflops"] / peak
            v["ratio_to_bf16"] = v["step_s"] / min(bf16) if bf16 else None
    harness = payload.get("harness")
    bf16_full = [v["step_s"] for v in variants if v["name"] == "bf16" and v["step_s"] and v["layers"] == payload["shape"]["layers"]]
    if harness and harness.get("ms_per_step") and bf16_full:
        payload["stage_over_harness"] = min(bf16_full) / (harness["ms_per_step"] / 1e3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"\n{payload['device']}: dense bf16 peak measured {peak:.0f} TFLOP/s; ratio = step / bf16 step")
    print(f"{'variant':30} {'layers':>6} {'step s':>8} {'ratio':>6} {'tok/s':>8} {'MFU':>6} {'mem GiB':>8} {'B200 s':>7}")
    for v in variants:
        if v["error"]:
            print(f"{v['name']:30} {v['layers']:6} {v['error'][:120]}")
            continue
        seed = payload["seed_b200_s"].get(v["name"])
        print(f"{v['name']:30} {v['layers']:6} {v['step_s']:8.3f} {v['ratio_to_bf16'] or float('nan'):6.3f} "
              f"{v['tokens_per_s']:8.0f} {v['mfu_measured_peak']:6.3f} {v['peak_mem_gib'] or 0:8.1f} "
              f"{seed if seed else '':>7}")
    if harness and harness.get("ms_per_step"):
        print(f"harness bench.step bf16, same depth: {harness['ms_per_step'] / 1e3:.3f} s/step; stage / harness = "
              f"{payload.get('stage_over_harness', float('nan')):.3f}")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
