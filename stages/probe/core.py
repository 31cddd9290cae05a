"""The probe stage: concatenates its inputs' output.txt with its payload, optionally sleeping
or failing. Real file work with no ML, so the orchestration can be tested on its own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from contract.files import write_atomic
from contract.params.probe import ProbeParams
from stages.runtime import StageContext, StageInputError


def run(ctx: StageContext) -> dict[str, Any]:
    params = ctx.params_as(ProbeParams)
    started = time.monotonic()
    deadline = started + params.sleep_s
    next_metric, step = started + params.metric_every_s, 0
    while time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if params.metric_every_s and time.monotonic() >= next_metric:
            step += 1
            ctx.tracker.log_metrics({"elapsed_s": time.monotonic() - started}, step=step)
            next_metric += params.metric_every_s
    if params.fail:
        raise RuntimeError("probe asked to fail")
    parts = [_upstream_text(ctx.input_dir(role) / "output.txt") for role in sorted(ctx.spec.inputs)]
    text = "".join(parts) + params.payload
    write_atomic(ctx.output_dir / "output.txt", text)
    ctx.tracker.log_metrics({"chars": len(text)})
    return {"chars": len(text)}


def _upstream_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise StageInputError(f"inputs: {path}: unreadable ({error})") from None
