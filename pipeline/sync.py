"""`python -m pipeline sync`: deliver tracking events that stages buffered during an outage."""

from __future__ import annotations

from contract.tracking import pending_event_count, sync_stage_events
from pipeline.layout import RunLayout
from pipeline.run_record import RunRecord


def sync_run(layout: RunLayout, record: RunRecord) -> int:
    ref = record.tracking
    if ref is None:
        print(f"{layout.run_id}: no tracking configured; nothing to sync")
        return 0
    failures = 0
    for stage in record.stages:
        stage_dir = layout.stage_dir(stage)
        pending = pending_event_count(stage_dir)
        if not pending:
            continue
        try:
            sent = sync_stage_events(stage_dir, ref)
            print(f"{stage}: sent {sent} event(s)")
        except Exception as error:
            failures += 1
            print(f"{stage}: {pending} event(s) still pending: {type(error).__name__}: "
                  f"{str(error).splitlines()[0][:200]}")
    if failures:
        return 1
    print(f"{layout.run_id}: tracking is in sync with {ref.tracking_uri}")
    return 0
