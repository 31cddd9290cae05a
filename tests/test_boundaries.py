"""The rules of the three packages' boundaries (ARCHITECTURE.md), read from the source's imports:
the contract imports neither plane and no torch; the control plane never imports stages/; a stage
kind never imports another kind (shared code lives in shared modules)."""

from __future__ import annotations

import ast
from pathlib import Path

from contract.kinds import STAGE_KINDS, code_dirs

REPO = Path(__file__).resolve().parents[1]
KINDS = STAGE_KINDS


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def imports_of(package: str) -> dict[Path, set[str]]:
    return {path: imported_modules(path) for path in (REPO / package).rglob("*.py")}


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{path.relative_to(REPO)}: {module}" for path, modules in imports_of(package).items()
                  for module in modules if module.split(".")[0] in forbidden)


def test_the_contract_imports_neither_plane_nor_torch():
    assert offenders("contract", ("pipeline", "stages", "torch", "transformers", "datasets")) == []


def test_the_control_plane_reaches_stages_only_through_the_contract():
    assert offenders("pipeline", ("stages", "torch")) == []


def test_a_stage_kind_imports_no_other_kind():
    found = []
    for kind in KINDS:
        for path, modules in imports_of(f"stages/{kind}").items():
            others = [m for m in modules if m.startswith("stages.") and m.split(".")[1] in KINDS
                      and m.split(".")[1] != kind]
            found += [f"{path.relative_to(REPO)}: {m}" for m in others]
    assert found == []


def test_only_the_nemo_session_imports_the_optional_nemo_run_extra():
    # It imports nemo_run inside its functions: the control plane imports without the extra
    # (tests/pipeline/backends/test_nemo_render.py checks that at run time too).
    assert offenders("pipeline", ("nemo_run",)) == ["pipeline/backends/nemo_session.py: nemo_run",
                                                   "pipeline/backends/nemo_session.py: nemo_run.config"]


def stage_folders_imported(folder: str) -> set[str]:
    """The folders under stages/ that stages/<folder> imports (stages/*.py modules aside)."""
    return {module.split(".")[1] for modules in imports_of(f"stages/{folder}").values() for module in modules
            if module.startswith("stages.") and (REPO / "stages" / module.split(".")[1]).is_dir()}


def test_a_kinds_fingerprint_covers_every_stage_folder_it_imports():
    # A folder missing from code_dirs would let a cached stage survive a change to code it runs.
    uncovered = {}
    for kind in KINDS:
        reached, todo = set(), [kind]
        while todo:
            folder = todo.pop()
            if folder not in reached:
                reached.add(folder)
                todo += stage_folders_imported(folder)
        if missing := sorted(reached - set(code_dirs(kind))):
            uncovered[kind] = missing
    assert uncovered == {}
