"""The report stage: the study table (markdown, CSV, one-page HTML), plots, and the study in MLflow.

Outputs: report.md, report.csv, report.html (table, plots, settings and versions; offline),
rows.json, plots/*.png, mlflow_view.json (with tracking). In MLflow: the table becomes the
parent run's description and the files its artifacts; each row's numbers go to the stage run it
stands for under names shared by all (`study/*`, `study_ci/*`, `study_n/*`; its yes/no facts as
tags `study.*`); a saved view of the runs page shows them side by side (stages/report/mlflow_view.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from contract.files import write_atomic, write_json_atomic
from contract.params.report import ReportStageParams
from contract.spec import StageSpec, load_spec
from stages.report import mlflow_view
from stages.report.html import StageRecord, to_html
from stages.report.rows import Settings, Study, build_study, read_summary
from stages.report.table import accuracy_tasks, to_csv, to_markdown
from stages.runtime import StageContext, StageInputError
from stages.versions import package_versions

REPORT_PACKAGES = ("numpy", "matplotlib", "mlflow", "pydantic")


def run(ctx: StageContext) -> dict[str, Any]:
    params = ctx.params_as(ReportStageParams)
    missing = sorted(set(ctx.spec.inputs) - set(params.inputs))
    if missing:
        raise StageInputError(f"params.inputs: no row given for input '{missing[0]}'")
    # What produced each input (for the HTML page): the specs the upstream stages ran with.
    specs = {role: _upstream_spec(role, path) for role, path in ctx.spec.inputs.items()}
    settings = Settings(params.baseline_run, params.skip_first_steps, params.confidence, params.bootstrap_resamples)
    rows_of = {role: params.inputs[role].model_dump() for role in ctx.spec.inputs}
    study = build_study(dict(ctx.spec.inputs), rows_of, settings)
    if not study.rows:
        raise StageInputError("report: no train or eval stage among the inputs")
    title = f"Study {params.study}"
    description = params.description
    out = ctx.output_dir
    markdown = to_markdown(study, title, description)
    write_atomic(out / "report.md", markdown)
    write_atomic(out / "report.csv", to_csv(study))
    write_atomic(out / "rows.json", json.dumps([asdict(row) for row in study.rows], indent=2) + "\n")
    plots: list[Path] = []
    if params.plots:
        from stages.report.plots import draw_plots

        plots = draw_plots(study, out / "plots")
    records = [StageRecord(spec.stage, spec.kind, spec.fingerprint, spec.params.model_dump(mode="json"), spec.tags,
                           read_summary(ctx.spec.inputs[role])) for role, spec in sorted(specs.items())]
    write_atomic(out / "report.html", to_html(study, title, description, plots, records,
                                              params.model_dump(), package_versions(REPORT_PACKAGES)))
    for path in (out / "report.md", out / "report.csv", out / "report.html", *plots):
        ctx.tracker.log_artifact(path, "report")
        ctx.tracker.log_parent_artifact(path, "report")
    ctx.tracker.set_parent_tags({"mlflow.note.content": markdown, "study.report": "report/report.html",
                                 **_parent_tags(study)})
    ctx.tracker.log_parent_metrics(_parent_metrics(study))
    if ctx.spec.tracking is not None:
        _mlflow_comparison(ctx, study, set(ctx.spec.inputs), title)
    print(markdown)
    return {"runs": len(study.rows), "plots": len(plots)}


def _upstream_spec(role: str, stage_dir: Path) -> StageSpec:
    try:
        return load_spec(stage_dir / "spec.json")
    except (OSError, ValueError) as error:  # missing, not JSON, not a spec
        text = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise StageInputError(f"inputs.{role}: {stage_dir / 'spec.json'}: not a stage spec ({text})") from None


def _parent_metrics(study: Study) -> dict[str, float]:
    """Per-row numbers on the parent run too, named `<run>.<phase>.<metric>`."""
    return {f"{row.run}.{row.phase}.{name.split('/', 1)[1]}": value
            for row in study.rows for name, value in mlflow_view.comparison_metrics(row).items()}


def _parent_tags(study: Study) -> dict[str, str]:
    """Per-row yes/no facts on the parent run too, named `study.<run>.<phase>.<fact>`."""
    return {f"{mlflow_view.TAG_PREFIX}{row.run}.{row.phase}.{name.removeprefix(mlflow_view.TAG_PREFIX)}": value
            for row in study.rows for name, value in mlflow_view.comparison_tags(row).items()}


def _mlflow_comparison(ctx: StageContext, study: Study, stages: set[str], title: str) -> None:
    """Each row's metrics on its stage run, and a saved view of the runs page that compares them."""
    for row in study.rows:
        stage = mlflow_view.row_stage(row, stages)
        if stage is not None:
            ctx.tracker.log_stage_metrics(stage, mlflow_view.comparison_metrics(row))
            if tags := mlflow_view.comparison_tags(row):
                ctx.tracker.set_stage_tags(stage, tags)
    ids = ctx.tracker.mlflow_ids()
    if ids is None:  # MLflow unreachable since the stage started: `sync` delivers the metrics later
        ctx.log.warning("report: MLflow ids unknown (tracking offline); no saved view of the runs page")
        return
    experiment_id, parent_run_id = ids
    state = mlflow_view.view_state(parent_run_id, accuracy_tasks(study.rows))
    view_id, tag_key, tag_value = mlflow_view.saved_view(f"{title} ({ctx.spec.run_id}): compare runs", state)
    ctx.tracker.set_experiment_tags({tag_key: tag_value})
    write_json_atomic(ctx.output_dir / mlflow_view.VIEW_FILE, {
        "experiment_id": experiment_id, "view_id": view_id,
        "route": mlflow_view.view_route(experiment_id, view_id),
    })
