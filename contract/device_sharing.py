"""What a train stage shared its device with while its steps were timed (torch-free, both planes).

Step times are comparable between runs only when each run had its device to itself. A train
stage records, at its end, who else ran on its GPUs or CPU cores during its steps, from the
record of whoever placed it:
- the local driver: `<run>/placements.jsonl`, one line when it starts a stage (with the GPUs it
  handed out) and one when the stage ends; the driver passes the file's path in
  PIPELINE_PLACEMENTS. The driver pins no CPU cores, so every stage running at the same time
  shares the CPU cores, and a stage on the same GPU shares the GPU.
- Slurm (SLURM_JOB_ID) or Kubernetes (KUBERNETES_SERVICE_HOST): GPUs they allocate belong to the
  job alone; CPU cores do only when the scheduler binds them (the process's affinity is a strict
  subset of the node's cores). Otherwise the record says it cannot tell.
- Anything else (a stage started by hand): no record; the report treats it as unknown.

The record (`device_sharing` in the train summary): {"source", "device", "window": [start, end],
"exclusive": true | false | null, "shared_with": [{"stage", "kind", "on", "from", "until"}],
"note"}. "from"/"until" are Unix times clipped to the window, so the report can ask about the
steps it averages only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEDGER_ENV = "PIPELINE_PLACEMENTS"
LEDGER_FILE = "placements.jsonl"


@dataclass(frozen=True)
class Placement:
    stage: str
    kind: str
    gpus: tuple[int, ...]
    started_at: float
    ended_at: float | None  # None: still running (or its driver died without a word)


class PlacementLedger:
    """The local driver's record of which stage ran when, on which GPUs (append-only JSON lines)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def started(self, stage: str, kind: str, gpus: list[int], at: float | None = None) -> None:
        self._append({"event": "start", "stage": stage, "kind": kind, "gpus": list(gpus),
                      "time": time.time() if at is None else at})

    def ended(self, stage: str, at: float | None = None) -> None:
        self._append({"event": "end", "stage": stage, "time": time.time() if at is None else at})

    def placements(self) -> list[Placement]:
        """Each start paired with the next end of the same stage, in start order."""
        if not self.path.exists():
            return []
        open_starts: dict[str, dict[str, Any]] = {}
        done: list[Placement] = []
        for line in self.path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            stage = event.get("stage", "")
            if event.get("event") == "start":
                if stage in open_starts:  # started again with no end: the earlier attempt died with its driver
                    done.append(_placement(open_starts.pop(stage), event["time"]))
                open_starts[stage] = event
            elif event.get("event") == "end" and stage in open_starts:
                done.append(_placement(open_starts.pop(stage), event["time"]))
        done += [_placement(start, None) for start in open_starts.values()]
        return sorted(done, key=lambda p: p.started_at)

    def _append(self, event: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One short line per write in append mode: concurrent writers do not interleave.
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")


def _placement(start: dict[str, Any], ended_at: float | None) -> Placement:
    return Placement(start["stage"], start.get("kind", ""), tuple(start.get("gpus", [])), start["time"], ended_at)


def sharing_from_ledger(ledger: PlacementLedger, stage: str, window: tuple[float, float]) -> dict[str, Any]:
    """Who ran beside `stage` during `window`, by the local driver's record."""
    placements = ledger.placements()
    mine = [p for p in placements if p.stage == stage and p.started_at <= window[0]]
    if not mine:
        return _record("local driver", "unknown", window, None,
                       note=f"{ledger.path} has no start of {stage} before its steps")
    gpus = set(mine[-1].gpus)
    device = f"gpu {','.join(map(str, sorted(gpus)))}" if gpus else "cpu"
    shared = []
    for other in placements:
        if other.stage == stage:
            continue
        start = max(other.started_at, window[0])
        until = min(other.ended_at if other.ended_at is not None else window[1], window[1])
        if start >= until:
            continue
        common = gpus & set(other.gpus)
        on = f"gpu {','.join(map(str, sorted(common)))}" if common else "cpu cores"
        shared.append({"stage": other.stage, "kind": other.kind, "on": on, "from": start, "until": until})
    return _record("local driver", device, window, not shared, shared,
                   note="the local driver pins no CPU cores: stages running at the same time share them")


def sharing_from_scheduler(window: tuple[float, float], on_gpu: bool) -> dict[str, Any]:
    """What Slurm or Kubernetes allocated to this job, or an unknown record."""
    if os.environ.get("SLURM_JOB_ID"):
        source = f"slurm job {os.environ['SLURM_JOB_ID']}"
        gpus = os.environ.get("SLURM_JOB_GPUS") or os.environ.get("SLURM_STEP_GPUS")
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        source = f"kubernetes pod {os.environ.get('HOSTNAME', '')}".strip()
        gpus = os.environ.get("NVIDIA_VISIBLE_DEVICES")
    else:
        return _record("none", "gpu" if on_gpu else "cpu", window, None,
                       note="started outside the local driver, Slurm and Kubernetes: no record of what else ran")
    if on_gpu:
        exclusive = bool(gpus) and gpus not in ("all", "none", "void")
        note = (f"GPUs {gpus} allocated to this job alone" if exclusive
                else "the scheduler's environment names no GPUs allocated to this job")
        return _record(source, f"gpu {gpus or '?'}", window, True if exclusive else None, note=note)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < (os.cpu_count() or 0):
        return _record(source, "cpu", window, True,
                       note=f"CPU cores {_ranges(cores)} bound to this job by the scheduler")
    return _record(source, "cpu", window, None,
                   note=f"CPU cores not bound (affinity: all {len(cores)} cores of the node): "
                        "other jobs on the node may have shared them")


def record_sharing(stage: str, window: tuple[float, float], on_gpu: bool) -> dict[str, Any]:
    """The record for a train stage whose timed steps ran during `window` (Unix times)."""
    ledger_path = os.environ.get(LEDGER_ENV)
    if ledger_path:
        return sharing_from_ledger(PlacementLedger(Path(ledger_path)), stage, window)
    return sharing_from_scheduler(window, on_gpu)


def steps_window(metric_rows: list[dict[str, Any]]) -> tuple[float, float] | None:
    """Unix times from the start of the first step to the end of the last, from the train stage's
    metrics.jsonl rows (each has `ended_at` and `step_time_s`); None without such rows."""
    timed = [row for row in metric_rows if "ended_at" in row and "step_time_s" in row]
    if not timed:
        return None
    return (min(row["ended_at"] - row["step_time_s"] for row in timed), max(row["ended_at"] for row in timed))


def shared_during(record: dict[str, Any] | None, window: tuple[float, float]) -> list[dict[str, Any]]:
    """The record's entries that overlap `window` (e.g. the steps the report averages)."""
    if not record:
        return []
    return [entry for entry in record.get("shared_with", [])
            if entry["from"] < window[1] and entry["until"] > window[0]]


def _record(source: str, device: str, window: tuple[float, float], exclusive: bool | None,
            shared_with: list[dict[str, Any]] | None = None, note: str = "") -> dict[str, Any]:
    return {"source": source, "device": device, "window": list(window), "exclusive": exclusive,
            "shared_with": shared_with or [], "note": note}


def _ranges(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    spans: list[list[int]] = []
    for core in cores:
        if spans and spans[-1][1] + 1 == core:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
