"""Helpers for the preprocess tests: paths of the fixtures, jsonl writers, a stage runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contract.markers import read_marker
from stages.preprocess.core import run
from stages.runtime import run_stage
from tests.spec_files import write_spec_file

REPO = Path(__file__).resolve().parents[3]
FIXTURE_TOKENIZER = REPO / "fixtures" / "tokenizer"
FIXTURE_DATA = REPO / "fixtures" / "openscience" / "openscience.jsonl"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def run_preprocess(out_dir: Path, **params: Any) -> tuple[int, Path]:
    """Run the stage in-process through the runtime, as a backend would; returns (exit code, dir)."""
    params = {"tokenizer": str(FIXTURE_TOKENIZER), "seq_len": 512, **params}
    spec = write_spec_file(out_dir, "preprocess", params, stage="preprocess", fingerprint="f" * 16)
    return run_stage(spec, run), out_dir


def failure(out_dir: Path) -> str:
    marker = read_marker(out_dir)
    assert marker is not None and marker.state == "failed"
    return marker.error or ""
