"""The control plane runs on a laptop or login node without torch: prove it never imports it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import importlib, pkgutil, sys
import pipeline
from pipeline.cli import main
for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
    if info.name != "pipeline.__main__":
        importlib.import_module(info.name)
code = main(["validate", "-c", "smoke"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "datasets", "torchao", "modelopt"))
print("HEAVY", heavy)
sys.exit(code)
"""


def test_importing_every_pipeline_module_and_validating_imports_no_torch():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
