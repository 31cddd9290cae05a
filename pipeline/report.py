"""`python -m pipeline report`: the study table the report stage wrote, in the terminal."""

from __future__ import annotations

import sys

from pipeline.layout import RunLayout
from stages.contract import read_marker

REPORT_STAGE = "report"
REPORT_TABLE = "report.md"


def print_report(layout: RunLayout) -> int:
    stage_dir = layout.stage_dir(REPORT_STAGE)
    marker = read_marker(stage_dir)
    if marker is None or marker.state != "succeeded":
        state = marker.state if marker else "not run yet"
        print(f"error: {layout.run_id}: the report stage is {state}; "
              f"see `python -m pipeline status {layout.run_id}`", file=sys.stderr)
        return 1
    print((stage_dir / REPORT_TABLE).read_text())
    return 0
