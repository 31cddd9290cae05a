"""The report stage: the study table (markdown + CSV), plots, and the summary on the parent run.

Outputs: report.md, report.csv, rows.json, plots/*.png. The table also becomes the parent MLflow
run's description, so the MLflow UI shows the study's result on the run a user opens first.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from contract.files import write_atomic
from contract.params.report import ReportStageParams
from stages.report.table import build_rows, read_step_metrics, to_csv, to_markdown
from stages.runtime import StageContext, StageInputError


def run(ctx: StageContext) -> dict[str, Any]:
    params = ctx.params_as(ReportStageParams)
    missing = sorted(set(ctx.spec.inputs) - set(params.inputs))
    if missing:
        raise StageInputError(f"params.inputs: no row given for input '{missing[0]}'")
    tags = {role: params.inputs[role].model_dump() for role in ctx.spec.inputs}
    rows = build_rows(dict(ctx.spec.inputs), tags, params.baseline_run, params.skip_first_steps)
    if not rows:
        raise StageInputError("report: no train or eval stage among the inputs")
    study = params.study
    notes = [
        f"ratios are to run '{params.baseline_run}' (trained); step time is the mean over steps "
        f"after the first {params.skip_first_steps}",
        "val loss (deployed): the exported model in its inference format on the held-out split; "
        "val loss (training): the last validation of the training run in its training precision",
    ]
    if not any(row.run == params.baseline_run for row in rows):
        notes.append(f"baseline run '{params.baseline_run}' is not in this study: no ratios")
    markdown = to_markdown(rows, f"Study {study}", notes)
    out = ctx.output_dir
    write_atomic(out / "report.md", markdown)
    write_atomic(out / "report.csv", to_csv(rows))
    write_atomic(out / "rows.json", json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    plots: list[Path] = []
    if params.plots:
        from stages.report.plots import draw_plots

        curves = {role.removeprefix("train-"): read_step_metrics(path)
                  for role, path in ctx.spec.inputs.items() if role.startswith("train-")}
        plots = draw_plots(rows, curves, out / "plots", params.baseline_run)
    for path in (out / "report.md", out / "report.csv", *plots):
        ctx.tracker.log_artifact(path, "report")
        ctx.tracker.log_parent_artifact(path, "report")
    ctx.tracker.set_parent_tags({"mlflow.note.content": markdown, "study.report": "report/report.md"})
    ctx.tracker.log_parent_metrics(_parent_metrics(rows))
    print(markdown)
    return {"runs": len(rows), "plots": len(plots)}


def _parent_metrics(rows: list) -> dict[str, float]:
    """Per-run numbers on the parent run, so the runs list can sort and chart them."""
    metrics: dict[str, float] = {}
    for row in rows:
        prefix = f"{row.run}.{row.phase}"
        for name in ("step_time_s", "step_time_vs_baseline", "val_loss", "val_loss_vs_baseline"):
            value = getattr(row, name)
            if value is not None:
                metrics[f"{prefix}.{name}"] = float(value)
    return metrics
