"""The study table from stage folders as the train and eval stages leave them."""

from __future__ import annotations

import json
from pathlib import Path

from contract.files import write_json_atomic
from contract.spec import MANIFEST_FILE
from stages.report.table import build_rows, to_csv, to_markdown


def _stage(root: Path, name: str, summary: dict, steps: list[float] | None = None) -> Path:
    stage_dir = root / name
    write_json_atomic(stage_dir / MANIFEST_FILE, {"stage": name, "summary": summary})
    if steps is not None:
        rows = [{"step": i + 1, "loss": 1.0, "step_time_s": t} for i, t in enumerate(steps)]
        (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return stage_dir


def test_rows_take_step_times_from_training_and_the_deployed_precision_from_eval(tmp_path: Path) -> None:
    inputs = {
        "train-bf16": _stage(tmp_path, "train-bf16", {"backend": "emulated", "val_loss": 1.1}, [9.0, 2.0, 2.0]),
        "eval-bf16": _stage(tmp_path, "eval-bf16", {"val_loss": 1.0, "precision": "bf16", "acc_mmlu_tiny": 0.5}),
        "train-int4": _stage(tmp_path, "train-int4", {"backend": "torchao", "val_loss": 1.3}, [9.0, 3.0, 3.0]),
        "eval-int4": _stage(tmp_path, "eval-int4", {"val_loss": 1.2, "precision": "int4-fake-quant", "acc_mmlu_tiny": 0.25}),
    }
    tags = {"train-bf16": {"run": "bf16", "recipe": "bf16"}, "eval-bf16": {"run": "bf16", "recipe": "bf16"},
            "train-int4": {"run": "int4", "recipe": "my_int4.yaml"}, "eval-int4": {"run": "int4", "recipe": "my_int4.yaml"}}
    rows = {row.run: row for row in build_rows(inputs, tags, baseline="bf16", skip_first_steps=1)}

    assert (rows["int4"].step_time_s, rows["int4"].step_time_vs_baseline) == (3.0, 1.5)
    assert rows["int4"].val_loss_vs_baseline == 1.2 / 1.0 and rows["int4"].train_val_loss == 1.3
    assert rows["int4"].inference_format == "int4-fake-quant"  # what eval ran, though the recipe is no built-in
    assert rows["int4"].accuracy == {"mmlu_tiny": 0.25}
    markdown = to_markdown(list(rows.values()), "Study", []).splitlines()
    assert markdown[2].endswith("| tokens/s | acc mmlu_tiny |")
    assert markdown[5] == "| int4 | trained | torchao | my_int4.yaml | int4-fake-quant | 3 | 1.5 | 1.2 | 1.2 | 1.3 | - | 0.25 |"
    assert to_csv(list(rows.values())).splitlines()[0].endswith(",tokens_per_s,accuracy_mmlu_tiny")
