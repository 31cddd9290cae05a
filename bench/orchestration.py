"""Orchestration overhead: a 12-stage DAG of probe stages (real subprocesses, real markers,
no ML), run twice in one process: the first run's overhead per stage, then the fully cached
rerun's wall time (goal: < 1 s).

    python bench/orchestration.py [--root DIR] [--max-parallel N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from contract.params import ProbeParams
from pipeline.backends.local_driver import LocalDriver
from pipeline.backends.local_settings import LocalSettings
from pipeline.graph import Graph, Stage
from pipeline.layout import RunLayout
from pipeline.plan import plan_graph
from pipeline.prepare import prepare_run
from pipeline.runlock import acquire_run_lock

IMAGES = {"cpu": "faster-qat-cpu:dev"}


def twelve_stage_graph() -> Graph:
    """preprocess -> 4 fan-out chains of (train -> eval) -> 2 summaries -> report: 12 stages."""
    stages = [Stage("source", "probe", ProbeParams(payload="s"))]
    for run in ("a", "b", "c", "d"):
        stages.append(Stage(f"train-{run}", "probe", ProbeParams(payload=run), {"in": "source"}))
        stages.append(Stage(f"eval-{run}", "probe", ProbeParams(payload=run), {"in": f"train-{run}"}))
    stages.append(Stage("left", "probe", ProbeParams(), {"a": "eval-a", "b": "eval-b"}))
    stages.append(Stage("right", "probe", ProbeParams(), {"c": "eval-c", "d": "eval-d"}))
    stages.append(Stage("report", "probe", ProbeParams(), {"left": "left", "right": "right"}))
    return Graph(stages)


def run_once(graph: Graph, layout: RunLayout, max_parallel: int) -> tuple[float, int]:
    """As `python -m pipeline run` does it: plan, lock, prepare, drive."""
    started = time.perf_counter()
    settings = LocalSettings(max_parallel=max_parallel)
    plan = plan_graph(graph, layout.run_id, layout.root.resolve(), IMAGES, None, "local")
    with acquire_run_lock(layout, "bench"):
        prepared = prepare_run(plan, layout, "local", settings.model_dump(), None)
        if prepared.to_run:
            LocalDriver(layout, prepared.record, settings, []).run()
    return time.perf_counter() - started, len(prepared.to_run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--max-parallel", type=int, default=2)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    graph = twelve_stage_graph()
    layout = RunLayout(root, "bench")

    # Baseline in the same process: the cost of one bare stage subprocess, no orchestration.
    import subprocess
    import sys

    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import stages.runtime, stages.probe.core"], check=True)
    bare_process_s = time.perf_counter() - started

    first_s, ran = run_once(graph, layout, args.max_parallel)
    rerun_s, rerun_ran = run_once(graph, layout, args.max_parallel)
    critical_path = 6  # source, train, eval, left/right, report
    print(f"stages: {len(graph)}  max_parallel: {args.max_parallel}  root: {root}")
    print(f"bare stage process (python + stage imports): {bare_process_s * 1000:.0f} ms")
    print(f"first run: {first_s:.2f} s for {ran} stages = {first_s / ran * 1000:.0f} ms per stage "
          f"({first_s / critical_path * 1000:.0f} ms per stage on the {critical_path}-stage critical path,"
          f" {first_s / critical_path / bare_process_s:.2f}x a bare process)")
    print(f"cached rerun: {rerun_s * 1000:.0f} ms, {rerun_ran} stages run "
          f"(goal < 1000 ms: {'met' if rerun_s < 1 else 'NOT met'})")


if __name__ == "__main__":
    main()
