"""Spec files as a backend hands them to a stage, written from plain values (params as JSON, a
recipe by its name): the stage itself reads and validates them, so bad params reach the stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contract.files import write_json_atomic
from contract.spec import SPEC_FILE


def write_spec_file(out: Path, kind: str, params: dict[str, Any], inputs: dict[str, Path] | None = None,
                    stage: str | None = None, fingerprint: str | None = None, run_id: str = "test") -> Path:
    path = Path(out) / SPEC_FILE
    write_json_atomic(path, {
        "run_id": run_id, "stage": stage or Path(out).name, "kind": kind,
        "fingerprint": fingerprint or f"fp-{Path(out).name}", "output_dir": str(out),
        "inputs": {role: str(where) for role, where in (inputs or {}).items()}, "params": params,
    })
    return path
