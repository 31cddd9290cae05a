"""`python -m pipeline report`: the study table the report stage wrote, and where to see it.

After the table: the one-page HTML report, and a link to the MLflow UI's runs page with the saved
view the report stage made (model-training view, stage runs listed, comparison columns chosen).
With the embedded sqlite store there is no server yet: the command to start one comes first.
"""

from __future__ import annotations

import json
import sys

from contract.markers import read_marker
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
    marker = read_marker(stage_dir)
    if marker is None or marker.state != "succeeded":
        state = marker.state if marker else "not run yet"
        print(f"error: {layout.run_id}: the report stage is {state}; "
              f"see `python -m pipeline status {layout.run_id}`", file=sys.stderr)
        return 1
    print((stage_dir / REPORT_TABLE).read_text())
    if (stage_dir / REPORT_PAGE).exists():
        print(f"One-page report: {stage_dir / REPORT_PAGE}")
    for line in mlflow_link_lines(layout, record):
        print(line)
    return 0


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
