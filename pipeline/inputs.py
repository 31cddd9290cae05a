"""What a stage reads from outside the run, as fingerprints see it: the content of local files and
folders (data files, model and tokenizer dirs, task folders) and hub ids with their revision.

Editing a data file in place, retraining a local base model or changing a user recipe (which
travels by value in the params) changes the fingerprints of the stages that read it, and of
their dependents. Content is hashed with xxh3 (a 16 GB checkpoint in a few seconds).
"""

from __future__ import annotations

import glob
from pathlib import Path

import xxhash

from contract.files import hash_file
from contract.params import ExternalInput
from pipeline.graph import Graph


class InputDigests:
    """Digests of external inputs, each location hashed once per fingerprinting (a graph reads the
    same model and data in many stages)."""

    def __init__(self) -> None:
        self._local: dict[str, str] = {}

    def __call__(self, found: ExternalInput) -> str:
        """`local:<hash of the files' names, sizes and contents>`, or `hub:<id>@<revision|unpinned>`."""
        if not found.is_local:
            return f"hub:{found.location}@{found.revision or 'unpinned'}"
        location = str(Path(found.location).expanduser())
        if location not in self._local:
            self._local[location] = _local_digest(location)
        return f"local:{self._local[location]}"


def _local_digest(location: str) -> str:
    paths = sorted(Path(p) for p in glob.glob(location)) if glob.has_magic(location) else [Path(location)]
    digest = xxhash.xxh3_128()
    found = False
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if not file.is_file() or any(part.startswith(".") for part in file.relative_to(path.parent).parts):
                continue
            found = True
            digest.update(f"{file.relative_to(path.parent).as_posix()}\0{file.stat().st_size}\0".encode())
            digest.update(hash_file(file).encode())
    return digest.hexdigest() if found else "missing"


def unpinned_hub_ids(graph: Graph) -> dict[str, list[str]]:
    """Hub id -> the `stage.field`s that read it without a revision, in graph order: what the
    hub serves under that name may change between two stages of one run, or two runs."""
    found: dict[str, list[str]] = {}
    for stage in graph:
        for external in stage.params.external_inputs():
            if not external.is_pinned:
                found.setdefault(external.location, []).append(f"{stage.name}.{external.field}")
    return found


def unpinned_warning(graph: Graph) -> str | None:
    """One line naming each unpinned hub id and where it is read, or None when all are pinned."""
    found = unpinned_hub_ids(graph)
    if not found:
        return None
    named = ", ".join(f"{location} (read as {_first_few(readers)})" for location, readers in found.items())
    return (f"warning: hub id(s) {named} not pinned to a revision: set model_revision, data.source_revision, "
            "data.tokenizer_revision (see `python -m pipeline config`) to a commit hash")


def _first_few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
