"""Where a GPU waited on its host: the idle gaps of one profiled step, and what the host was doing.

Input: a torch.profiler chrome trace with CPU and CUDA activities. The GPU is busy while any
kernel, copy or memset runs; an idle gap is a stretch between two busy stretches. A gap is
host-bound when the work that ends it was launched after the gap had begun: the GPU had nothing
queued and waited for the host. Each host-bound gap is charged to the innermost CPU op around
that launch on the launching thread (the main thread runs the forward, autograd's device thread
the backward) and to the phase (a `record_function` range) the gap falls in. Gaps whose work was
already queued are dependency waits (events between streams, copies); they are counted apart.

  summary = summarize(*idle_gaps(json.load(open("trace.json"))))
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

_GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
_LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver"}


@dataclass(frozen=True)
class Gap:
    start_us: float
    end_us: float
    host_bound: bool
    thread: str  # the launching thread's id, "" when the launch was not recorded
    op: str  # innermost CPU op around the launch that ended the gap ("" when none)
    phase: str  # innermost record_function range around the gap's start ("" when none)

    @property
    def us(self) -> float:
        return self.end_us - self.start_us


class _Intervals:
    """Properly nested [start, end) intervals of one thread; the innermost one around a time."""

    def __init__(self, spans: list[tuple[float, float, str]]) -> None:
        self.spans = sorted(spans)
        self.starts = [s for s, _, _ in self.spans]

    def innermost(self, t: float, look_back: int = 20000) -> str:
        # Nested intervals: the one around t with the latest start is the innermost.
        i = bisect.bisect_right(self.starts, t) - 1
        for j in range(i, max(i - look_back, -1), -1):
            start, end, name = self.spans[j]
            if start <= t < end:
                return name
        return ""


def _spans(events: list[dict[str, Any]], category: str) -> dict[str, _Intervals]:
    by_thread: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for e in events:
        if e.get("cat") == category and e.get("ph") == "X":
            by_thread[str(e.get("tid"))].append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"]))
    return {tid: _Intervals(spans) for tid, spans in by_thread.items()}


def idle_gaps(trace: dict[str, Any], min_gap_us: float = 1.0) -> tuple[list[Gap], float, float]:
    """(the gaps between the GPU's busy stretches, the busy time in us, the window in us)."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict)]
    gpu = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), (e.get("args") or {}).get("correlation"))
        for e in events
        if e.get("cat") in _GPU_CATEGORIES and e.get("ph") == "X"
    )
    if not gpu:
        return [], 0.0, 0.0
    launches = {
        (e.get("args") or {}).get("correlation"): (float(e["ts"]), str(e.get("tid")))
        for e in events
        if e.get("cat") in _LAUNCH_CATEGORIES and e.get("ph") == "X"
    }
    ops = _spans(events, "cpu_op")
    phases = [span for intervals in _spans(events, "user_annotation").values() for span in intervals.spans]
    phase_index = _Intervals(phases)

    gaps: list[Gap] = []
    busy = 0.0
    run_start, run_end = gpu[0][0], gpu[0][1]
    for start, end, correlation in gpu[1:]:
        if start <= run_end:
            run_end = max(run_end, end)
            continue
        busy += run_end - run_start
        if start - run_end >= min_gap_us:
            launch_ts, tid = launches.get(correlation, (float("-inf"), ""))
            op = ops[tid].innermost(launch_ts) if tid in ops else ""
            gaps.append(Gap(run_end, start, launch_ts > run_end, tid, op, phase_index.innermost(run_end)))
        run_start, run_end = start, end
    busy += run_end - run_start
    return gaps, busy, gpu[-1][1] - gpu[0][0]


def host_syncs(trace: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Host calls that wait for the GPU (synchronizes, blocking copies): count and host ms each."""
    found: dict[str, dict[str, float]] = {}
    for e in trace.get("traceEvents", []):
        name = str(e.get("name", "")) if isinstance(e, dict) else ""
        if name and e.get("cat") in _LAUNCH_CATEGORIES and ("Synchronize" in name or name == "cudaMemcpy"):
            entry = found.setdefault(name, {"count": 0, "ms": 0.0})
            entry["count"] += 1
            entry["ms"] += float(e.get("dur", 0)) / 1e3
    return found


def summarize(gaps: list[Gap], busy_us: float, window_us: float, top: int = 25) -> dict[str, Any]:
    """Idle time in ms: in all, host-bound, by phase, by thread and by the CPU op that launched late."""
    def ms(us: float) -> float:
        return round(us / 1e3, 3)

    host = [g for g in gaps if g.host_bound]
    by_phase: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for g in gaps:
        by_phase[g.phase or "(none)"][0] += g.us
        if g.host_bound:
            by_phase[g.phase or "(none)"][1] += g.us
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_thread: dict[str, float] = defaultdict(float)
    for g in host:
        by_op[g.op or "(no cpu op)"][0] += g.us
        by_op[g.op or "(no cpu op)"][1] += 1
        by_thread[g.thread] += g.us
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "window_ms": ms(window_us),
        "busy_ms": ms(busy_us),
        "idle_ms": ms(sum(g.us for g in gaps)),
        "host_bound_idle_ms": ms(sum(g.us for g in host)),
        "gaps": len(gaps),
        "host_bound_gaps": len(host),
        "by_phase_ms": {p: {"idle": ms(v[0]), "host_bound": ms(v[1])} for p, v in sorted(by_phase.items())},
        "by_thread_ms": {t: ms(v) for t, v in sorted(by_thread.items(), key=lambda kv: -kv[1])},
        "host_bound_by_op": [{"op": op, "ms": ms(v[0]), "gaps": int(v[1])} for op, v in ranked],
    }
