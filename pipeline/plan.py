"""A run planned in memory: the graph, every stage's fingerprint and spec, where it reports.

Pure: planning reads the config and the content of the stages' external inputs, and writes
nothing. `render` writes a plan's files; `submit`/`run` prepare it on disk (pipeline/prepare.py)
and hand it to a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from contract.spec import StageSpec, TrackingRef
from pipeline.fingerprint import graph_fingerprints
from pipeline.graph import Graph
from pipeline.layout import RunLayout

if TYPE_CHECKING:  # the config imports the backends' settings, whose package imports this module
    from pipeline.config import StudyConfig


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    config: StudyConfig | None  # None for graphs built by hand (tests, benches)
    graph: Graph
    fingerprints: dict[str, str]
    image_refs: dict[str, str]
    specs: dict[str, StageSpec]  # every stage's spec, with paths as the stages see them

    @property
    def names(self) -> list[str]:
        return self.graph.names


def plan_run(config: StudyConfig, run_id: str, stage_root: Path, tracking: TrackingRef | None,
             cluster: str) -> RunPlan:
    """`stage_root`: the artifact root as the stages see it (a local dir, a pod's mount path)."""
    from pipeline.study import build_study_graph, image_refs

    graph = build_study_graph(config)
    return plan_graph(graph, run_id, stage_root, image_refs(config), tracking, cluster, config)


def plan_graph(graph: Graph, run_id: str, stage_root: Path, refs: dict[str, str],
               tracking: TrackingRef | None, cluster: str, config: StudyConfig | None = None) -> RunPlan:
    fingerprints = graph_fingerprints(graph, refs)
    layout = RunLayout(stage_root, run_id)
    specs = {
        stage.name: StageSpec(
            run_id=run_id,
            stage=stage.name,
            kind=stage.kind,
            fingerprint=fingerprints[stage.name],
            output_dir=layout.stage_dir(stage.name),
            inputs={role: layout.stage_dir(up) for role, up in stage.upstream.items()},
            params=stage.params,
            tags={**stage.tags, "image": refs[stage.image], "cluster": cluster},
            tracking=tracking,
        )
        for stage in graph
    }
    return RunPlan(run_id, config, graph, fingerprints, dict(refs), specs)  # type: ignore[arg-type]
