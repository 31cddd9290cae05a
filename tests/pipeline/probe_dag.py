"""A small DAG of probe stages, drivable from tests in-process or as a subprocess:

    python -m tests.pipeline.probe_dag ROOT [--sleep S] [--fail STAGE] [--max-parallel N] [--runtime R]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from contract.params import ProbeParams
from contract.spec import TrackingRef
from pipeline.backends.local_driver import LocalDriver
from pipeline.backends.local_settings import LocalSettings
from pipeline.graph import Graph, Stage
from pipeline.layout import RunLayout
from pipeline.plan import RunPlan, plan_graph
from pipeline.prepare import PreparedRun, prepare_run
from pipeline.runlock import acquire_run_lock

IMAGES = {"cpu": "faster-qat-cpu:dev"}
RUN_ID = "probe"


def fan_out_graph(sleep_s: float = 0.0, fail: str | None = None, payloads: dict | None = None,
                  metric_every_s: float = 0.0) -> Graph:
    """source -> {a, b, c, d} -> join."""
    payloads = payloads or {}

    def params(name: str) -> ProbeParams:
        return ProbeParams(sleep_s=sleep_s, fail=name == fail, payload=payloads.get(name, name),
                           metric_every_s=metric_every_s)

    stages = [Stage("source", "probe", params("source"))]
    for name in ("a", "b", "c", "d"):
        stages.append(Stage(name, "probe", params(name), {"in": "source"}))
    stages.append(Stage("join", "probe", params("join"), {n: n for n in ("a", "b", "c", "d")}))
    return Graph(stages)


def tracking_to(uri: str, experiment: str = "probe-study", settle_s: float = 0.0) -> TrackingRef:
    """Artifacts beside a sqlite store, as `pipeline.tracking` puts them (MLflow's default would
    be ./mlruns in the working directory: the repository, for the tests)."""
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return TrackingRef(tracking_uri=uri, experiment=experiment, run_key=RUN_ID, settle_s=settle_s,
                       artifact_location=artifacts)


def plan(graph: Graph, root: Path, tracking: TrackingRef | None = None, cluster: str = "local",
         stage_root: Path | None = None) -> RunPlan:
    return plan_graph(graph, RUN_ID, stage_root or Path(root).resolve(), IMAGES, tracking, cluster)


def prepare(graph: Graph, root: Path, tracking: TrackingRef | None = None,
            max_parallel: int = 4, runtime: str = "process") -> PreparedRun:
    settings = LocalSettings(max_parallel=max_parallel, runtime=runtime).model_dump()
    return prepare_run(plan(graph, root, tracking), RunLayout(Path(root).resolve(), RUN_ID), "local", settings, None)


def drive(graph: Graph, root: Path, max_parallel: int = 4, tracking: TrackingRef | None = None,
          runtime: str = "process") -> dict[str, str]:
    """As `python -m pipeline run` does: the run lock first, then prepare, then the driver
    (runtime process: the probe stages are forked from the preloaded launcher)."""
    with acquire_run_lock(RunLayout(Path(root).resolve(), RUN_ID), "probe_dag"):
        prepared = prepare(graph, root, tracking, max_parallel, runtime)
        settings = LocalSettings(max_parallel=max_parallel, runtime=runtime)
        states = LocalDriver(prepared.layout, prepared.record, settings, []).run()
    return {name: state.value for name, state in states.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--fail", default=None)
    parser.add_argument("--max-parallel", type=int, default=4)
    parser.add_argument("--metric-every", type=float, default=0.0)
    parser.add_argument("--tracking-uri", default=None, help="report to this MLflow")
    parser.add_argument("--runtime", default="process", choices=("process", "fresh-process"))
    args = parser.parse_args()
    tracking = tracking_to(args.tracking_uri) if args.tracking_uri else None
    graph = fan_out_graph(args.sleep, args.fail, metric_every_s=args.metric_every)
    states = drive(graph, args.root, args.max_parallel, tracking, args.runtime)
    print(" ".join(f"{name}={state}" for name, state in states.items()), flush=True)


if __name__ == "__main__":
    main()
