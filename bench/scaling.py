"""Data-parallel scaling of the train stage: 1 vs N processes with the same per-process batch.

Runs the real stage (`torchrun -m stages.train --spec ...`, FSDP2) twice in one invocation on the
same preprocessed data: once on 1 process, once on N with N times the global batch, and prints
step time, tokens/s and the scaling efficiency tokens/s(N) / (N x tokens/s(1)) (goal >= 90% on
GPUs of one host). On CPU it runs with gloo: a check that the path works, not a GPU figure.

    python bench/scaling.py [--nproc N] [--model DIR] [--seq-len 512] [--steps 6] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from contract.markers import mark_succeeded
from contract.params.preprocess import PreprocessParams
from contract.spec import StageSpec, write_spec
from stages.preprocess.core import preprocess

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 2


def prepare_data(root: Path, model: str, seq_len: int) -> Path:
    data_dir = root / "preprocess"
    params = PreprocessParams(source=str(REPO / "fixtures/openscience/openscience.jsonl"),
                              tokenizer=model, seq_len=seq_len, pack=True)
    preprocess(params, data_dir, logging.getLogger("bench"))
    mark_succeeded(data_dir, "bench-data")
    return data_dir


def train(root: Path, data_dir: Path, nproc: int, args: argparse.Namespace) -> dict:
    name = f"train-{nproc}p"
    spec = StageSpec(
        run_id="scaling", stage=name, kind="train", fingerprint=f"bench-{nproc}",
        output_dir=root / name, inputs={"data": data_dir},
        params={"model": args.model, "dtype": args.dtype, "recipe": args.recipe, "backend": args.backend,
                "global_batch": args.micro_batch * args.accum * nproc, "micro_batch": args.micro_batch,
                "steps": args.steps, "lr": 1e-5, "val_batches": nproc, "device": args.device,
                "calib_batches": 0, "log_every": 1},
    )
    spec_path = write_spec(spec)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NCCL_NVLS_ENABLE": "0"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "stages.train", "--spec", str(spec_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    timed = rows[WARMUP_STEPS:] or rows
    step_s = sum(r["step_time_s"] for r in timed) / len(timed)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed) / len(timed)
    return {"nproc": nproc, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "final_loss": rows[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default=str(REPO / "fixtures/models/small-qwen3"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--recipe", default="bf16")
    parser.add_argument("--backend", default="emulated")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    root = (args.root or Path(tempfile.mkdtemp(prefix="bench-scaling-"))).resolve()  # specs hold absolute paths
    data_dir = prepare_data(root, args.model, args.seq_len)
    single = train(root, data_dir, 1, args)
    multi = train(root, data_dir, args.nproc, args)
    efficiency = multi["tokens_per_s"] / (args.nproc * single["tokens_per_s"])
    print(f"device {args.device}, recipe {args.recipe}/{args.backend}, per-process batch "
          f"{args.micro_batch} x {args.accum} accumulation, seq {args.seq_len}")
    for row in (single, multi):
        print(f"  {row['nproc']} process(es): {row['step_s'] * 1000:8.1f} ms/step "
              f"{row['tokens_per_s']:10.0f} tokens/s")
    print(f"scaling efficiency {args.nproc} vs 1: {efficiency:.1%} (goal >= 90% on GPUs)")
    if args.out:
        args.out.write_text(json.dumps({"single": single, "multi": multi, "efficiency": efficiency,
                                        "device": args.device, "recipe": args.recipe}, indent=2) + "\n")


if __name__ == "__main__":
    main()
