"""A probe DAG run with --runtime docker, as a subprocess the tests can signal:

    python -m tests.pipeline.images.docker_dag ROOT IMAGE_REF [--sleep S]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.backends.local_driver import LocalDriver
from pipeline.docker_runtime import DockerLauncher
from pipeline.graph import Graph
from pipeline.layout import RunLayout
from pipeline.prepare import prepare_run


def drive_in_docker(graph: Graph, root: Path, image_ref: str, max_parallel: int = 4) -> dict[str, str]:
    refs = {"cpu": image_ref}
    launcher = DockerLauncher(refs)
    launcher.check(graph)
    prepared = prepare_run(graph, RunLayout(root, "probe"), refs, "local", None, {})
    states = LocalDriver(prepared, max_parallel, [], launcher=launcher).run()
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
