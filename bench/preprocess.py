"""Tokenization throughput of the preprocess stage vs a plain row-by-row `datasets.map`.

    python bench/preprocess.py [--copies 10] [--num-proc 2]

Both sides turn the same OpenScience-format rows into chat-templated token ids with an
assistant-only loss mask, in one process run:
  baseline  map(batched=False, num_proc=1): per row, apply_chat_template(tokenize=True) on the
            chat and on its prompt, labels = ids after the prompt's length
  stage     stages.preprocess.core.encode: batched rendering, one batched fast-tokenizer call
            with offsets per batch, num_proc workers
Each side runs --repeats times, alternating, and the fastest run of each counts (the machine
is shared; the minimum is the least disturbed). Prints tokens/s of each and the ratio
(stage / baseline). Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoTokenizer

from contract.params.preprocess import PreprocessParams
from stages.preprocess.chat import ChatColumns
from stages.preprocess.core import encode
from stages.preprocess.source import load_source

REPO = Path(__file__).resolve().parents[1]


def baseline_row(row: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
    chat = [{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row["output"]}]
    ids = list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=True, add_generation_prompt=True, return_dict=True)
    start = len(prompt["input_ids"])
    return {"input_ids": ids, "labels": [-100] * start + ids[start:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "fixtures" / "openscience" / "openscience.jsonl")
    parser.add_argument("--tokenizer", default=str(REPO / "fixtures" / "tokenizer"))
    parser.add_argument("--copies", type=int, default=10, help="repeat the rows to get a measurable size")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    log = logging.getLogger("bench")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "rows.jsonl"
        text = args.data.read_text(encoding="utf-8")
        data.write_text(text * args.copies, encoding="utf-8")
        params = PreprocessParams(source=str(data), tokenizer=args.tokenizer, seq_len=args.seq_len,
                                  num_proc=args.num_proc)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        source = load_source(params, work / "cache", log)
        rows = len(source.dataset)

        columns = ChatColumns(params.input_column, params.output_column)
        baseline_runs, stage_runs = [], []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            plain = source.dataset.map(
                baseline_row, fn_kwargs={"tokenizer": tokenizer}, batched=False, num_proc=None,
                remove_columns=source.dataset.column_names,
                cache_file_name=str(work / f"baseline-{repeat}.arrow"), load_from_cache_file=False,
            )
            baseline_runs.append(time.perf_counter() - started)
            started = time.perf_counter()
            staged = encode(source, tokenizer, columns, params, work / f"stage-{repeat}")
            stage_runs.append(time.perf_counter() - started)
        baseline_tokens = sum(len(ids) for ids in plain["input_ids"])
        stage_tokens = sum(staged["full_length"])
        baseline_s, stage_s = min(baseline_runs), min(stage_runs)

    same = baseline_tokens == stage_tokens
    print(f"rows: {rows}, tokens: {stage_tokens} (baseline counted {baseline_tokens}, same: {same})")
    print(f"runs (s): baseline {[round(t, 2) for t in baseline_runs]}, stage {[round(t, 2) for t in stage_runs]}")
    baseline_rate, stage_rate = baseline_tokens / baseline_s, stage_tokens / stage_s
    print(f"baseline map(batched=False, num_proc=1): {baseline_s:7.2f} s  {baseline_rate:12,.0f} tokens/s")
    print(f"stage encode(batched, num_proc={args.num_proc}):     {stage_s:7.2f} s  {stage_rate:12,.0f} tokens/s")
    print(f"ratio stage/baseline: {(stage_tokens / stage_s) / (baseline_tokens / baseline_s):.2f}x")


if __name__ == "__main__":
    main()
