"""A small DAG of probe stages, drivable from tests in-process or as a subprocess:

    python -m tests.pipeline.probe_dag ROOT [--sleep S] [--fail STAGE] [--max-parallel N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.backends.local_driver import LocalDriver
from pipeline.graph import Graph, Stage
from pipeline.layout import RunLayout
from pipeline.prepare import PreparedRun, prepare_run

IMAGES = {"cpu": "faster-qat-cpu:dev"}


def fan_out_graph(sleep_s: float = 0.0, fail: str | None = None, payloads: dict | None = None,
                  metric_every_s: float = 0.0) -> Graph:
    """source -> {a, b, c, d} -> join."""
    payloads = payloads or {}

    def params(name: str) -> dict:
        return {"sleep_s": sleep_s, "fail": name == fail, "payload": payloads.get(name, name),
                "metric_every_s": metric_every_s}

    stages = [Stage("source", "probe", params("source"))]
    for name in ("a", "b", "c", "d"):
        stages.append(Stage(name, "probe", params(name), {"in": "source"}))
    stages.append(Stage("join", "probe", params("join"), {n: n for n in ("a", "b", "c", "d")}))
    return Graph(stages)


def prepare(graph: Graph, root: Path, open_tracking=None) -> PreparedRun:
    return prepare_run(graph, RunLayout(root, "probe"), IMAGES, "local", open_tracking, {})


def drive(graph: Graph, root: Path, max_parallel: int = 4, open_tracking=None) -> dict[str, str]:
    prepared = prepare(graph, root, open_tracking)
    states = LocalDriver(prepared, max_parallel, []).run()
    return {name: state.value for name, state in states.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--fail", default=None)
    parser.add_argument("--max-parallel", type=int, default=4)
    parser.add_argument("--metric-every", type=float, default=0.0)
    parser.add_argument("--tracking-uri", default=None, help="report to this MLflow")
    args = parser.parse_args()
    open_tracking = None
    if args.tracking_uri:
        from pipeline.tracking import open_parent_run

        open_tracking = lambda layout: open_parent_run(layout, args.tracking_uri, "probe-study")  # noqa: E731
    graph = fan_out_graph(args.sleep, args.fail, metric_every_s=args.metric_every)
    states = drive(graph, args.root, args.max_parallel, open_tracking)
    print(" ".join(f"{name}={state}" for name, state in states.items()), flush=True)


if __name__ == "__main__":
    main()
