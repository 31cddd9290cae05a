"""The study table: one row per run, from the train and eval stages' manifests on disk.

Rows come from the stage folders (the source of truth, readable during an MLflow outage);
the same numbers are in MLflow, where the report is also logged to the parent run.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contract.spec import MANIFEST_FILE

METRICS_FILE = "metrics.jsonl"
ACCURACY_PREFIX = "acc_"  # the eval stage's summary key of each lm-eval task's accuracy


@dataclass
class StudyRow:
    run: str
    phase: str  # "base", "ptq", "trained"
    backend: str = ""
    recipe: str = ""
    inference_format: str = ""
    step_time_s: float | None = None
    step_time_vs_baseline: float | None = None
    val_loss: float | None = None
    val_loss_vs_baseline: float | None = None
    train_val_loss: float | None = None
    tokens_per_s: float | None = None
    accuracy: dict[str, float] = field(default_factory=dict)


COLUMNS = (
    ("run", "run"),
    ("phase", "phase"),
    ("backend", "backend"),
    ("recipe", "recipe"),
    ("inference_format", "inference"),
    ("step_time_s", "step time (s)"),
    ("step_time_vs_baseline", "step time vs baseline"),
    ("val_loss", "val loss (deployed)"),
    ("val_loss_vs_baseline", "val loss vs baseline"),
    ("train_val_loss", "val loss (training)"),
    ("tokens_per_s", "tokens/s"),
)


def read_summary(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / MANIFEST_FILE).read_text())["summary"]


def read_step_metrics(train_dir: Path) -> list[dict[str, Any]]:
    path = train_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_step_time(rows: list[dict[str, Any]], skip_first: int) -> float | None:
    times = [row["step_time_s"] for row in rows if "step_time_s" in row]
    kept = times[skip_first:] or times
    return sum(kept) / len(kept) if kept else None


def build_rows(inputs: dict[str, Path], tags: dict[str, dict[str, str]], baseline: str,
               skip_first_steps: int) -> list[StudyRow]:
    """`inputs`: role (= upstream stage name) -> stage dir; `tags`: role -> what the study graph
    knows of it (contract.params.ReportInput: run, phase, recipe, inference_format, backend)."""
    rows: dict[tuple[str, str], StudyRow] = {}

    def row_for(run: str, phase: str, stage_tags: dict[str, str]) -> StudyRow:
        key = (run, phase)
        if key not in rows:
            recipe = stage_tags.get("recipe", "")
            rows[key] = StudyRow(run=run, phase=phase, backend=stage_tags.get("backend", ""),
                                 recipe=recipe, inference_format=stage_tags.get("inference_format", ""))
        return rows[key]

    for role, stage_dir in sorted(inputs.items()):
        stage_tags = tags.get(role, {})
        run = stage_tags.get("run", role)
        summary = read_summary(stage_dir)
        if role.startswith("train-"):
            row = row_for(run, "trained", stage_tags)
            row.step_time_s = mean_step_time(read_step_metrics(stage_dir), skip_first_steps)
            if row.step_time_s is None:
                row.step_time_s = summary.get("mean_step_time_s")
            row.tokens_per_s = summary.get("tokens_per_s")
            row.train_val_loss = summary.get("val_loss")
            row.backend = summary.get("backend", row.backend)
        elif role.startswith("eval-"):
            phase = stage_tags.get("phase") or ("base" if role == "eval-base" else "trained")
            row = row_for(run, phase, stage_tags)
            row.val_loss = summary.get("val_loss")
            # What eval deployed (e.g. int4-fake-quant where torchao had no int4 kernels), not only what the recipe says.
            row.inference_format = summary.get("precision") or row.inference_format
            row.accuracy = {k.removeprefix(ACCURACY_PREFIX): v for k, v in summary.items()
                            if k.startswith(ACCURACY_PREFIX) and isinstance(v, (int, float))}
    ordered = sorted(rows.values(), key=lambda r: ({"base": 0, "ptq": 1, "trained": 2}[r.phase], r.run))
    reference = rows.get((baseline, "trained"))
    for row in ordered:
        if reference is None:
            break
        row.step_time_vs_baseline = _ratio(row.step_time_s, reference.step_time_s)
        row.val_loss_vs_baseline = _ratio(row.val_loss, reference.val_loss)
    return ordered


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference or math.isnan(reference):
        return None
    return value / reference


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def accuracy_tasks(rows: list[StudyRow]) -> list[str]:
    return sorted({task for row in rows for task in row.accuracy})


def to_markdown(rows: list[StudyRow], title: str, notes: list[str]) -> str:
    tasks = accuracy_tasks(rows)
    header = [label for _, label in COLUMNS] + [f"acc {task}" for task in tasks]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_cell(getattr(row, name)) for name, _ in COLUMNS]
        cells += [_cell(row.accuracy.get(task)) for task in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[StudyRow]) -> str:
    tasks = accuracy_tasks(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([name for name, _ in COLUMNS] + [f"accuracy_{task}" for task in tasks])
    for row in rows:
        values = asdict(row)
        writer.writerow([values[name] if values[name] is not None else "" for name, _ in COLUMNS]
                        + [row.accuracy.get(task, "") for task in tasks])
    return buffer.getvalue()
