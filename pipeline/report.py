"""`python -m pipeline report`: the study table the report stage wrote, and where to see it.

After the table: the one-page HTML report, and a link to the MLflow UI's runs page with the saved
view the report stage made (model-training view, stage runs listed, comparison columns chosen).
With the embedded sqlite store there is no server yet: the command to start one comes first.
"""

from __future__ import annotations

import json
import sys

from contract.markers import success_problem
from pipeline.errors import ConfigError
from pipeline.layout import RunLayout
from pipeline.run_record import RunRecord

REPORT_STAGE = "report"
REPORT_TABLE = "report.md"
REPORT_PAGE = "report.html"
VIEW_FILE = "mlflow_view.json"  # written by the report stage (stages/report/mlflow_view.py)
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def print_report(layout: RunLayout, record: RunRecord) -> int:
    if REPORT_STAGE not in record.stages:
        raise ConfigError(f"run {layout.run_id} has no report stage")
    stage_dir = layout.stage_dir(REPORT_STAGE)
    # The cache's own test: a report of other inputs (a config changed since) or with an output
    # gone or changed is not this run's report, and is said so rather than printed.
    problem = success_problem(stage_dir, record.stages[REPORT_STAGE].fingerprint)
    if problem is not None:
        print(f"error: {layout.run_id}: no report to show: {_why_not(problem)}; "
              f"see `python -m pipeline status {layout.run_id}`", file=sys.stderr)
        return 1
    print((stage_dir / REPORT_TABLE).read_text())
    if (stage_dir / REPORT_PAGE).exists():
        print(f"One-page report: {stage_dir / REPORT_PAGE}")
    for line in mlflow_link_lines(layout, record):
        print(line)
    return 0


def _why_not(problem: str) -> str:
    if problem == "not run":
        return "the report stage has not run yet"
    if problem == "failed":
        return "the report stage failed"
    if problem.startswith("its "):  # another fingerprint: an earlier config's report
        return f"the report there is stale ({problem} since it was made; the next run remakes it)"
    return f"the report stage's {problem} (the next run remakes it)"


def mlflow_link_lines(layout: RunLayout, record: RunRecord) -> list[str]:
    """How to open the study's comparison in the MLflow UI, or nothing without tracking."""
    view_path = layout.stage_dir(REPORT_STAGE) / VIEW_FILE
    if not view_path.exists() or record.tracking is None:
        return []
    route = json.loads(view_path.read_text())["route"]
    uri = record.tracking.tracking_uri
    if uri.startswith(("http://", "https://")):
        return [f"MLflow (runs compared): {uri.rstrip('/')}/#{route}"]
    return [f"MLflow: start the UI with `mlflow ui --backend-store-uri {uri}`, then open",
            f"  {LOCAL_UI}/#{route}"]
