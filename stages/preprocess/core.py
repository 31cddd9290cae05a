"""The `preprocess` stage: source rows -> chat-templated, assistant-masked, fixed-length rows.

Output (the contract the train and eval stages read through `stages.data`):
  train/, val/          `datasets.Dataset.save_to_disk` folders; int32 list columns input_ids,
                        labels (-100 off the assistant turns and on padding), position_ids
                        (0 at every conversation start); every row exactly seq_len long
  data_manifest.json    counts, token totals, split sizes, tokenizer hash, packing efficiency
Order of work: load -> encode every row (batched, num_proc workers) -> drop/skip/raise on
bad rows -> split conversations train/val by seed -> pack or pad each split -> save.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import AutoTokenizer

from contract.files import write_json_atomic
from contract.params.preprocess import PreprocessParams
from stages.preprocess.chat import (
    DROPPED_TOO_LONG,
    ENCODED_FEATURES,
    IGNORE_INDEX,
    OK,
    ChatColumns,
    ConversationEncoder,
    tokenizer_hash,
)
from stages.preprocess.packing import TokenTable, plan_rows, write_rows
from stages.preprocess.source import SourceRows, load_source
from stages.runtime import StageContext, StageInputError

DATA_MANIFEST = "data_manifest.json"
SPLITS = ("train", "val")
CACHE_DIR = ".preprocess-cache"  # intermediate files, removed when the stage ends


def run(ctx: StageContext) -> dict[str, Any]:
    params = ctx.params_as(PreprocessParams)
    manifest = preprocess(params, ctx.output_dir, ctx.log)
    # The runtime logs the numeric summary as metrics; the file keeps the strings too.
    ctx.tracker.set_tags({"tokenizer_hash": manifest["tokenizer_hash"]})
    ctx.tracker.log_artifact(ctx.output_dir / DATA_MANIFEST)
    return manifest




def preprocess(params: PreprocessParams, output_dir: Path, log: Any) -> dict[str, Any]:
    """Write train/, val/ and data_manifest.json into `output_dir`; return the manifest."""
    cache = output_dir / CACHE_DIR
    shutil.rmtree(cache, ignore_errors=True)  # never reuse intermediate files of another attempt
    try:
        manifest = _preprocess(params, output_dir, cache, log)
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # can be as large as the dataset: never leave it
    write_json_atomic(output_dir / DATA_MANIFEST, manifest)
    log.info(
        "preprocess: %d rows in, %d kept (%d truncated, %d dropped, %d skipped); train %d rows, val %d rows; "
        "packing efficiency %.3f",
        manifest["rows_in"], manifest["rows_out"], manifest["truncated"], manifest["dropped"],
        manifest["skipped"], manifest["train_rows"], manifest["val_rows"], manifest["packing_efficiency"],
    )
    return manifest


def _preprocess(params: PreprocessParams, output_dir: Path, cache: Path, log: Any) -> dict[str, Any]:
    tokenizer = load_tokenizer(params.tokenizer, params.tokenizer_revision)
    columns = ChatColumns(params.input_column, params.output_column, params.messages_column, params.system_prompt)
    source = load_source(params, cache, log)
    missing = [name for name in columns.required() if name not in source.dataset.column_names]
    if missing:
        raise StageInputError(
            f"source: {source.parts[0][0]} has no column {missing[0]!r} (columns: {source.dataset.column_names}); "
            "set input_column/output_column or messages_column"
        )
    encoded = encode(source, tokenizer, columns, params, cache)
    status = np.asarray(encoded["status"])
    counts = _check_rows(status, encoded, source, params, log)
    # `table` holds every encoded row (bad and dropped ones empty); `kept` indexes the usable ones.
    kept = np.flatnonzero(status == OK)
    table = TokenTable.from_arrow(encoded.data.column("input_ids"), encoded.data.column("labels"))
    lengths = table.lengths()
    manifest: dict[str, Any] = {
        "rows_in": len(source.dataset) + source.skipped_lines,
        "rows_out": int(len(kept)),
        **counts,
        "truncated": int(np.asarray(encoded["truncated"]).sum()),
        "tokens": int(lengths[kept].sum()),
        "assistant_tokens": int((table.labels != IGNORE_INDEX).sum()),
        "seq_len": params.seq_len,
        "pack": params.pack,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "pad_token_id": pad_id(tokenizer),
    }
    members = split_members(len(source.dataset), np.asarray(encoded["row"])[kept], params)
    for split in SPLITS:
        conversations = kept[members[split]]
        plan = plan_rows(lengths[conversations], params.seq_len, params.pack)
        arrow = cache / f"{split}.arrow"
        write_rows(table, conversations, plan, params.seq_len, pad_id(tokenizer), arrow, desc=f"{split} rows")
        save_split(arrow, output_dir / split)
        real = int(lengths[conversations].sum())
        manifest[f"{split}_conversations"] = int(len(conversations))
        manifest[f"{split}_rows"] = len(plan)
        manifest[f"{split}_tokens"] = real
        manifest[f"{split}_packing_efficiency"] = _efficiency(real, len(plan), params.seq_len)
    manifest["packing_efficiency"] = _efficiency(
        manifest["tokens"], manifest["train_rows"] + manifest["val_rows"], params.seq_len
    )
    return manifest


def _efficiency(tokens: int, rows: int, seq_len: int) -> float:
    """Share of the written token slots that hold real (non-padding) tokens."""
    return round(tokens / (rows * seq_len), 4) if rows else 0.0


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    """`revision` pins a hub id (params refuse one with a local path)."""
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision)
    except Exception as error:
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        at = f" at revision {revision}" if revision else ""
        raise StageInputError(f"tokenizer: cannot load {name}{at}: {text[:300]}") from None


def pad_id(tokenizer: Any) -> int:
    token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(token_id)


def encode(
    source: SourceRows, tokenizer: Any, columns: ChatColumns, params: PreprocessParams, cache: Path
) -> datasets.Dataset:
    encoder = ConversationEncoder(tokenizer, columns, params.seq_len, params.truncate)
    return source.dataset.map(
        encoder,
        batched=True,
        batch_size=params.batch_size,
        with_indices=True,
        num_proc=params.num_proc if params.num_proc > 1 else None,
        remove_columns=source.dataset.column_names,
        features=ENCODED_FEATURES,
        cache_file_name=str(cache / "encoded.arrow"),
        load_from_cache_file=False,
        new_fingerprint=f"preprocess-encode-{params.seed}",  # files are ours; skip hashing the tokenizer
        desc="tokenize",
    )


def _check_rows(
    status: np.ndarray, encoded: datasets.Dataset, source: SourceRows, params: PreprocessParams, log: Any
) -> dict[str, int]:
    bad = np.flatnonzero(np.char.startswith(status.astype(str), "bad:"))
    if len(bad) and params.on_bad_row == "error":
        first = int(bad[0])
        reason = status[first].removeprefix("bad: ")
        raise StageInputError(
            f"source: {source.where(int(encoded[first]['row']))}: {reason}; fix the row or set on_bad_row: skip"
        )
    for index in bad[:20]:
        where = source.where(int(encoded[int(index)]["row"]))
        log.warning("skipped %s: %s", where, status[index].removeprefix("bad: "))
    if len(bad) > 20:
        log.warning("... and %d more bad rows skipped", len(bad) - 20)
    dropped = int((status == DROPPED_TOO_LONG).sum())
    if dropped:
        log.warning("dropped %d conversation(s) longer than seq_len=%d (truncate: false)", dropped, params.seq_len)
    if len(bad) + dropped == len(status):
        raise StageInputError(f"source: {params.source}: no usable rows ({len(bad)} bad, {dropped} too long)")
    return {"skipped": int(len(bad)) + source.skipped_lines, "dropped": dropped}


def split_members(num_rows: int, kept_rows: np.ndarray, params: PreprocessParams) -> dict[str, np.ndarray]:
    """Positions into `kept_rows` for each split: a seeded permutation of source row indices
    decides, so a row's split depends only on (seed, num_rows), not on which other rows were
    bad; val takes the first round(val_fraction * num_rows) of the permutation."""
    permutation = np.random.default_rng(params.seed).permutation(num_rows)
    val_count = int(round(params.val_fraction * num_rows))
    if params.val_fraction > 0 and num_rows >= 2:
        val_count = min(max(val_count, 1), num_rows - 1)
    in_val = np.zeros(num_rows, dtype=bool)
    in_val[permutation[:val_count]] = True
    rank = np.empty(num_rows, dtype=np.int64)
    rank[permutation] = np.arange(num_rows)
    # Each split keeps permutation order, so packing input order is seeded too.
    positions = np.argsort(rank[kept_rows], kind="stable")
    is_val = in_val[kept_rows[positions]]
    return {"train": positions[~is_val], "val": positions[is_val]}


def save_split(arrow_stream: Path, target: Path) -> None:
    """Save to `target` through a temporary sibling, so a reader never sees half a split."""
    dataset = datasets.Dataset.from_file(str(arrow_stream))
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    # An empty split (val_fraction 0) needs one explicit shard, or it cannot be loaded back.
    dataset.save_to_disk(str(staging), num_shards=1 if len(dataset) == 0 else None)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
