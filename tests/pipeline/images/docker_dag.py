"""A probe DAG run with --runtime docker, as a subprocess the tests can signal:

    python -m tests.pipeline.images.docker_dag ROOT IMAGE_REF [--sleep S]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.backends.local_driver import LocalDriver
from pipeline.backends.local_settings import LocalSettings
from pipeline.docker_runtime import DockerLauncher
from pipeline.graph import Graph
from pipeline.layout import RunLayout
from pipeline.plan import plan_graph
from pipeline.prepare import prepare_run, run_record
from pipeline.run_record import RunRecord
from pipeline.runlock import acquire_run_lock


def probe_record(graph: Graph, root: Path, image_ref: str) -> RunRecord:
    """The run record of a probe DAG whose stages run in `image_ref` (what the launcher checks)."""
    return run_record(plan_graph(graph, "probe", Path(root).resolve(), {"cpu": image_ref}, None, "local"),
                      "local", {}, None)


def drive_in_docker(graph: Graph, root: Path, image_ref: str, max_parallel: int = 4) -> dict[str, str]:
    launcher = DockerLauncher()
    launcher.check(probe_record(graph, root, image_ref))
    plan = plan_graph(graph, "probe", Path(root).resolve(), {"cpu": image_ref}, None, "local")
    layout = RunLayout(Path(root).resolve(), "probe")
    settings = LocalSettings(max_parallel=max_parallel, runtime="docker")
    with acquire_run_lock(layout, "docker_dag"):
        prepared = prepare_run(plan, layout, "local", settings.model_dump(), None)
        states = LocalDriver(layout, prepared.record, settings, [], launcher=launcher).run()
    return {name: state.value for name, state in states.items()}


def main() -> None:
    from tests.pipeline.probe_dag import fan_out_graph

    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("image_ref")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    states = drive_in_docker(fan_out_graph(args.sleep), args.root, args.image_ref)
    print(" ".join(f"{name}={state}" for name, state in states.items()), flush=True)


if __name__ == "__main__":
    main()
