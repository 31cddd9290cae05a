"""The stage kinds the data plane offers, and which source folders each one runs."""

from __future__ import annotations

# kind -> folders under stages/ whose code the kind runs (besides the shared stages/*.py).
_CODE_DIRS: dict[str, tuple[str, ...]] = {
    "preprocess": ("preprocess",),
    "train": ("train", "precision"),
    "ptq": ("ptq", "precision"),
    "export": ("export", "precision"),
    "eval": ("eval", "precision"),
    "report": ("report",),
    # Does small, real file work with no ML: the orchestration tests and bench use it.
    "probe": ("probe",),
}

STAGE_KINDS = tuple(_CODE_DIRS)


def code_dirs(kind: str) -> tuple[str, ...]:
    try:
        return _CODE_DIRS[kind]
    except KeyError:
        raise ValueError(f"unknown stage kind '{kind}'; known: {', '.join(STAGE_KINDS)}") from None


def stage_module(kind: str) -> str:
    code_dirs(kind)
    return f"stages.{kind}"
