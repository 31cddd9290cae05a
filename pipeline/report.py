"""`python -m pipeline report`: the study table the report stage wrote, in the terminal."""

from __future__ import annotations

from contract.markers import read_marker
from pipeline.errors import ConfigError
from pipeline.layout import RunLayout
from pipeline.run_record import RunRecord

REPORT_STAGE = "report"
REPORT_TABLE = "report.md"


def print_report(layout: RunLayout, record: RunRecord) -> int:
    if REPORT_STAGE not in record.stages:
        raise ConfigError(f"run {layout.run_id} has no report stage")
    stage_dir = layout.stage_dir(REPORT_STAGE)
    marker = read_marker(stage_dir)
    if marker is None or marker.state != "succeeded":
        state = marker.state if marker else "not run yet"
        print(f"error: {layout.run_id}: the report stage is {state}; "
              f"see `python -m pipeline status {layout.run_id}`")
        return 1
    print((stage_dir / REPORT_TABLE).read_text())
    return 0
