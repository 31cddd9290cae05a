"""Put a planned run on disk, under its lock: what is cached, stale stage dirs moved aside, the
spec of every stage to run, and `run.json`.

Every backend's `submit` (and `run`) goes through here; what differs between backends is only
how the specs are executed. The caller holds the run lock (pipeline/runlock.py).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.files import write_atomic
from contract.markers import FAILED_MARKER, SUCCESS_MARKER, success_problem
from contract.spec import StageSpec, load_spec, write_spec
from pipeline.graph import Graph
from pipeline.layout import RunLayout
from pipeline.plan import RunPlan
from pipeline.run_record import RunRecord, StageRecord, write_record


@dataclass
class StageChanges:
    """What preparing a run changed in its stage dirs, kept until the backend has taken the run:
    stale dirs set aside (not deleted yet) and the files replaced or removed, with their bytes.
    `undo` puts all of it back (a refused submit changes nothing); `settle` deletes what was set
    aside."""

    set_aside: list[tuple[Path, Path]] = field(default_factory=list)  # (stage dir, where it is held)
    replaced: list[tuple[Path, bytes | None]] = field(default_factory=list)  # (file, its bytes before)

    def keep(self, path: Path) -> None:
        try:
            self.replaced.append((path, path.read_bytes()))
        except FileNotFoundError:
            self.replaced.append((path, None))

    def undo(self) -> None:
        for path, content in reversed(self.replaced):
            if content is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, content)
        for stage_dir, held in reversed(self.set_aside):
            shutil.rmtree(stage_dir, ignore_errors=True)  # made by this prepare: holds its spec only
            held.rename(stage_dir)
            try:
                held.parent.rmdir()  # the trash folder, when this prepare made it
            except OSError:
                pass
        self.set_aside.clear()
        self.replaced.clear()

    def settle(self) -> None:
        for _, held in self.set_aside:
            shutil.rmtree(held, ignore_errors=True)
        self.set_aside.clear()
        self.replaced.clear()


@dataclass
class PreparedRun:
    layout: RunLayout  # the run as this machine sees it
    plan: RunPlan
    cached: set[str]
    record: RunRecord
    # Why each stage that runs is not cached (not run, failed, inputs changed, an output changed).
    reasons: dict[str, str]
    changes: StageChanges = field(default_factory=StageChanges)  # settled unless prepared reversibly

    @property
    def graph(self) -> Graph:
        return self.plan.graph

    @property
    def fingerprints(self) -> dict[str, str]:
        return self.plan.fingerprints

    @property
    def specs(self) -> dict[str, StageSpec]:
        return self.plan.specs

    @property
    def to_run(self) -> list[str]:
        return [name for name in self.graph.names if name not in self.cached]


def cached_stages(plan: RunPlan, layout: RunLayout) -> tuple[set[str], dict[str, str]]:
    """Stages whose `_SUCCESS` is of their fingerprint and whose outputs verify, with every
    upstream cached too (a stage that reruns takes its dependents with it); and why the others
    are not."""
    cached: set[str] = set()
    reasons: dict[str, str] = {}
    for stage in plan.graph:
        problem = success_problem(layout.stage_dir(stage.name), plan.fingerprints[stage.name])
        rerun = [up for up in stage.dependencies if up not in cached]
        if problem is None and rerun:
            problem = f"upstream {rerun[0]} runs again"
        if problem is None:
            cached.add(stage.name)
        else:
            reasons[stage.name] = problem
    return cached, reasons


def rerun_lines(reasons: dict[str, str]) -> list[str]:
    """Why each stage that ran before runs again, as `run` prints it: one line per stage with a
    reason of its own (its inputs or parameters changed, it failed, an output no longer verifies),
    then one line for the successes that run again only because an upstream does. A stage never
    run before says nothing (a first run would list every stage)."""
    own: list[str] = []
    following: list[str] = []
    for name, reason in reasons.items():
        if reason == "not run":
            continue
        if reason.startswith("upstream "):
            following.append(f"{name} (after {reason.split()[1]})")
        elif reason == "failed":
            own.append(f"{name}: runs again: it failed before")
        else:
            own.append(f"{name}: runs again: {reason if reason.startswith('its ') else f'its {reason}'}")
    if following:
        own.append(f"run again as their upstream does: {', '.join(following)}")
    return own


def prepare_run(plan: RunPlan, layout: RunLayout, cluster: str, settings: dict[str, Any],
                config_yaml: str | None, write_specs: bool = True, reversible: bool = False) -> PreparedRun:
    """Write what the run needs; touch nothing when every stage is cached.

    `write_specs`: false where the specs travel with the jobs (k8s: a ConfigMap) and the stage
    dirs are not on this machine. `reversible`: the stage dirs' changes are kept in
    `prepared.changes` (stale dirs set aside, old markers and specs by their bytes) until the
    caller settles or undoes them; else stale dirs are deleted at once."""
    cached, reasons = cached_stages(plan, layout)
    record = run_record(plan, cluster, settings, _created_at(layout) or time.time())
    prepared = PreparedRun(layout, plan, cached, record, reasons)
    if not prepared.to_run:
        return prepared
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    if write_specs:
        changes = prepared.changes
        for name in prepared.to_run:
            _clear_if_stale(layout, name, plan.fingerprints[name], changes)
            stage_dir = layout.stage_dir(name)
            for marker in (SUCCESS_MARKER, FAILED_MARKER):  # a success whose outputs no longer verify, an old failure
                if (stage_dir / marker).exists():
                    changes.keep(stage_dir / marker)
                    (stage_dir / marker).unlink()
            changes.keep(layout.spec_path(name))
            write_spec(plan.specs[name], layout.spec_path(name))
        if not reversible:
            changes.settle()
    if config_yaml is not None:
        write_atomic(layout.config_path, config_yaml)
    write_record(layout.run_file, record)
    return prepared


def run_record(plan: RunPlan, cluster: str, settings: dict[str, Any], created_at: float | None) -> RunRecord:
    """run.json of a plan (`created_at` None: a rendered record, the same bytes every time)."""
    tracking = next(iter(plan.specs.values())).tracking if plan.specs else None
    return RunRecord(
        run_id=plan.run_id,
        cluster=cluster,
        created_at=created_at,
        updated_at=time.time() if created_at is not None else None,
        settings=settings,
        stages={
            stage.name: StageRecord(kind=stage.kind, upstream=stage.upstream,
                                    fingerprint=plan.fingerprints[stage.name], image=plan.image_refs[stage.image],
                                    tags=stage.tags, resources=stage.resources)
            for stage in plan.graph
        },
        tracking=tracking,
        config=plan.config.model_dump(mode="json") if plan.config is not None else {},
    )


def _created_at(layout: RunLayout) -> float | None:
    try:
        return RunRecord.model_validate_json(layout.run_file.read_text()).created_at
    except (FileNotFoundError, ValueError):
        return None


def _clear_if_stale(layout: RunLayout, name: str, fingerprint: str, changes: StageChanges) -> None:
    """A stage dir left by another fingerprint is moved aside (deleted when the changes settle);
    one of this fingerprint is kept, so an interrupted stage resumes from its checkpoints."""
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
    changes.set_aside.append((stage_dir, target))
