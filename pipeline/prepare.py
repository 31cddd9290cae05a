"""Turn a graph into a run on disk: fingerprints, what is cached, spec files, MLflow parent run.

Every backend starts here; what differs between backends is only how the specs are executed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fingerprint import graph_fingerprints
from pipeline.graph import Graph
from pipeline.layout import RunLayout
from stages.contract import StageSpec, TrackingRef, load_spec, read_marker, write_atomic


@dataclass
class PreparedRun:
    layout: RunLayout
    graph: Graph
    fingerprints: dict[str, str]
    specs: dict[str, StageSpec]
    cached: set[str]
    tracking: TrackingRef | None

    @property
    def to_run(self) -> list[str]:
        return [name for name in self.graph.names if name not in self.cached]


def succeeded_stages(graph: Graph, layout: RunLayout, fingerprints: dict[str, str]) -> set[str]:
    done = set()
    for name in graph.names:
        marker = read_marker(layout.stage_dir(name))
        if marker and marker.state == "succeeded" and marker.fingerprint == fingerprints[name]:
            done.add(name)
    return done


def prepare_run(
    graph: Graph,
    layout: RunLayout,
    image_refs: dict[str, str],
    cluster: str,
    open_tracking: Callable[[RunLayout], TrackingRef] | None,
    config_snapshot: dict[str, Any],
    spec_root: Path | None = None,
) -> PreparedRun:
    """Write the specs of every stage that must run; touch nothing when all are cached.

    `open_tracking` creates or reuses the MLflow parent run; it is called only when some
    stage must run, so a fully cached rerun never imports MLflow. `spec_root` is the artifact
    root as the stages will see it (e.g. a volume's mount path in a pod); default: `layout.root`.
    """
    stage_root = RunLayout(spec_root or layout.root.resolve(), layout.run_id)
    fingerprints = graph_fingerprints(graph, image_refs)
    cached = succeeded_stages(graph, layout, fingerprints)
    prepared = PreparedRun(layout, graph, fingerprints, {}, cached, tracking=None)
    if not prepared.to_run:
        return prepared
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    prepared.tracking = open_tracking(layout) if open_tracking else None
    for name in prepared.to_run:
        stage = graph[name]
        _clear_if_stale(layout, name, fingerprints[name])
        spec = StageSpec(
            run_id=layout.run_id,
            stage=name,
            kind=stage.kind,
            fingerprint=fingerprints[name],
            output_dir=stage_root.stage_dir(name),
            inputs={role: stage_root.stage_dir(up) for role, up in stage.upstream.items()},
            params=stage.params,
            tags={**stage.tags, "image": image_refs[stage.image], "cluster": cluster},
            tracking=prepared.tracking,
        )
        write_atomic(layout.spec_path(name), spec.model_dump_json(indent=2) + "\n")
        prepared.specs[name] = spec
    previous = layout.read_run() if layout.run_file.exists() else {}
    layout.write_run(
        {
            **previous,
            "run_id": layout.run_id,
            "created_at": previous.get("created_at", time.time()),
            "updated_at": time.time(),
            "cluster": cluster,
            "stages": {
                s.name: {
                    "kind": s.kind,
                    "upstream": s.upstream,
                    "fingerprint": fingerprints[s.name],
                    "image": image_refs[s.image],
                    "tags": s.tags,
                }
                for s in graph
            },
            "tracking": prepared.tracking.model_dump() if prepared.tracking else None,
            "config": config_snapshot,
        }
    )
    return prepared


def _clear_if_stale(layout: RunLayout, name: str, fingerprint: str) -> None:
    """A stage dir left by another fingerprint is moved aside; one of this fingerprint is kept,
    so an interrupted stage resumes from its checkpoints."""
    stage_dir = layout.stage_dir(name)
    if not stage_dir.exists():
        return
    try:
        same = load_spec(stage_dir / "spec.json").fingerprint == fingerprint
    except Exception:
        same = False
    if same:
        return
    layout.trash_dir.mkdir(parents=True, exist_ok=True)
    target = layout.trash_dir / f"{name}-{time.time_ns()}"
    stage_dir.rename(target)
    shutil.rmtree(target, ignore_errors=True)
