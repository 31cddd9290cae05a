"""Fingerprints: a stage is done when a `_SUCCESS` with its current fingerprint exists.

fingerprint = hash(kind, params, image reference, stage code version, upstream fingerprints by
role). Changing one run's parameter changes that run's fingerprint and, through the upstream
part, those of its dependents only.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from pipeline.graph import Graph, Stage
from pipeline.stage_kinds import code_dirs

# Shared data-plane modules every stage runs (contract, runtime, tracking, data readers).
_SHARED_SUFFIXES = (".py",)


def stages_source_root() -> Path:
    spec = find_spec("stages")  # locates the package without importing it (and torch)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the `stages` package is not importable: install with `pip install -e .`")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=None)
def code_version(kind: str) -> str:
    """Hash of the source files a stage kind runs: its package, its helpers, the shared modules."""
    root = stages_source_root()
    digest = hashlib.sha256()
    files = sorted(p for p in root.glob("*.py"))
    for directory in code_dirs(kind):
        files += sorted(p for p in (root / directory).rglob("*") if p.suffix in (".py", ".yaml"))
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_fingerprint(stage: Stage, image_ref: str, upstream: dict[str, str]) -> str:
    payload = {
        "kind": stage.kind,
        "params": stage.params,
        "image": image_ref,
        "code": code_version(stage.kind),
        "upstream": upstream,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def graph_fingerprints(graph: Graph, image_refs: dict[str, str]) -> dict[str, str]:
    """Fingerprint of every stage, in topological order so upstream ones exist first."""
    fingerprints: dict[str, str] = {}
    for stage in graph:
        upstream = {role: fingerprints[name] for role, name in sorted(stage.upstream.items())}
        fingerprints[stage.name] = stage_fingerprint(stage, image_refs[stage.image], upstream)
    return fingerprints
