"""The stage kinds the data plane offers: the module each runs and the code its fingerprint covers.

A kind is `python -m stages.<kind> --spec FILE`; its params model is contract.params.STAGE_PARAMS.
Adding a kind: `stages/<kind>/` (its `__main__` and core), its params model in contract/params/,
one line here and one in STAGE_PARAMS, and an image for it in config (`images.stages`).
"""

from __future__ import annotations

from contract.params import STAGE_PARAMS

# kind -> folders under stages/ whose code the kind runs, besides the shared stages/*.py and the
# whole contract package (both planes' shared code: a change there reruns every kind). Every
# folder a kind imports, directly or through another folder, is listed (tests/test_boundaries.py).
_CODE_DIRS: dict[str, tuple[str, ...]] = {
    "preprocess": ("preprocess",),
    "train": ("train", "precision"),
    "ptq": ("ptq", "precision"),
    "export": ("export", "precision", "deployment"),
    "eval": ("eval", "precision", "deployment"),
    "report": ("report",),
    # Does small, real file work with no ML: the orchestration tests and bench use it.
    "probe": ("probe",),
}
assert set(_CODE_DIRS) == set(STAGE_PARAMS), "every kind has params and code"

STAGE_KINDS = tuple(_CODE_DIRS)


def code_dirs(kind: str) -> tuple[str, ...]:
    try:
        return _CODE_DIRS[kind]
    except KeyError:
        raise ValueError(f"unknown stage kind '{kind}'; known: {', '.join(STAGE_KINDS)}") from None


def stage_module(kind: str) -> str:
    code_dirs(kind)
    return f"stages.{kind}"
