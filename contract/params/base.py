"""The base of every stage kind's parameters, and what a stage reads from outside the run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

PATH_PREFIXES = ("/", "./", "../", "~")

# Where a stage may run; `auto` picks cuda when one is visible.
Device = Literal["auto", "cpu", "cuda"]

# A hub revision: a commit hash (40 hex: pins the files) or a tag or branch name (`v1.0`,
# `refs/pr/3`): what `from_pretrained(revision=)` and `load_dataset(revision=)` take.
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,99}){0,3}")


def _check_revision(value: str | None) -> str | None:
    if value is None or COMMIT_HASH.fullmatch(value) or (_REF_NAME.fullmatch(value) and ".." not in value):
        return value
    raise ValueError(f"{value!r} is not a hub revision: give a commit hash (40 hex digits, which pins the "
                     "files) or a tag name")


Revision = Annotated[str | None, AfterValidator(_check_revision)]
REVISION_DOC = ("a commit hash (40 hex) pins the files, a tag or branch name may move; null: unpinned "
                "(render/submit warn). Hub ids only: refused with a local path.")


@dataclass(frozen=True)
class ExternalInput:
    """Something a stage reads that no upstream stage made: a local file or folder, or a
    Hugging Face hub id (with the revision it is pinned to, when it is)."""

    field: str  # dotted params field, for messages
    location: str  # a path (absolute after config loading) or a hub id
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return self.location.startswith(PATH_PREFIXES)

    @property
    def revision_field(self) -> str:
        """The params field of the revision: `model` -> `model_revision`, `qad.teacher_model` ->
        `qad.teacher_revision`."""
        return f"{self.field.removesuffix('_model')}_revision"

    @property
    def is_pinned(self) -> bool:
        """A local input is read by content; a hub id is pinned by its revision."""
        return self.is_local or self.revision is not None


class StageParams(BaseModel):
    """Unknown keys are an error everywhere: a misspelt field never passes silently. Floats are
    finite: `lr: .nan` or `sleep_s: .inf` is bad input, not a stage that fails or never ends."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="after")
    def _revisions_pin_hub_ids_only(self) -> StageParams:
        # A local input is fingerprinted by its content and loaded from disk, where a revision
        # means nothing: refused rather than ignored, so no one believes a path is pinned by it.
        for found in self.external_inputs():
            if found.is_local and found.revision is not None:
                raise ValueError(f"{found.revision_field}: {found.field} {found.location} is a local path; a "
                                 "revision pins hub ids only (drop it: local content is fingerprinted)")
        return self

    def external_inputs(self) -> list[ExternalInput]:
        """What the stage reads from outside the run; fingerprints cover their content."""
        return []
