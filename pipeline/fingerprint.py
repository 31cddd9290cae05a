"""Fingerprints: a stage is done when a `_SUCCESS` with its current fingerprint exists and its
outputs verify.

fingerprint = hash(kind, typed params (the recipe by value), image reference, the stage's code,
the content of what it reads from outside the run, upstream fingerprints by role). Changing one
run's parameter changes that run's fingerprint and, through the upstream part, those of its
dependents only.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from contract.kinds import code_dirs
from pipeline.graph import Graph, Stage
from pipeline.inputs import InputDigests


def _package_root(name: str) -> Path:
    spec = find_spec(name)  # locates the package without importing it (and torch)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the `{name}` package is not importable: install with `pip install -e .`")
    return Path(next(iter(spec.submodule_search_locations)))


def stages_source_root() -> Path:
    return _package_root("stages")


@lru_cache(maxsize=None)
def code_version(kind: str) -> str:
    """Hash of the source a stage kind runs: its package, the shared stages/*.py, the contract."""
    root = stages_source_root()
    contract = _package_root("contract")
    digest = hashlib.sha256()
    files = sorted(root.glob("*.py"))
    for directory in code_dirs(kind):
        files += sorted(p for p in (root / directory).rglob("*") if p.suffix in (".py", ".yaml"))
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    for path in sorted(p for p in contract.rglob("*") if p.suffix in (".py", ".yaml")):
        digest.update(f"contract/{path.relative_to(contract)}".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_fingerprint(stage: Stage, image_ref: str, upstream: dict[str, str], digests: InputDigests) -> str:
    payload = {
        "kind": stage.kind,
        "params": stage.params.model_dump(mode="json"),
        "image": image_ref,
        "code": code_version(stage.kind),
        "reads": {found.field: digests(found) for found in stage.params.external_inputs()},
        "upstream": upstream,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def graph_fingerprints(graph: Graph, image_refs: dict[str, str]) -> dict[str, str]:
    """Fingerprint of every stage, in topological order so upstream ones exist first."""
    fingerprints: dict[str, str] = {}
    digests = InputDigests()
    for stage in graph:
        upstream = {role: fingerprints[name] for role, name in sorted(stage.upstream.items())}
        fingerprints[stage.name] = stage_fingerprint(stage, image_refs[stage.image], upstream, digests)
    return fingerprints
