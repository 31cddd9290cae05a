"""The base of every stage kind's parameters, and what a stage reads from outside the run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

PATH_PREFIXES = ("/", "./", "../", "~")

# Where a stage may run; `auto` picks cuda when one is visible.
Device = Literal["auto", "cpu", "cuda"]


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


class StageParams(BaseModel):
    """Unknown keys are an error everywhere: a misspelt field never passes silently. Floats are
    finite: `lr: .nan` or `sleep_s: .inf` is bad input, not a stage that fails or never ends."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def external_inputs(self) -> list[ExternalInput]:
        """What the stage reads from outside the run; fingerprints cover their content."""
        return []
