"""Settings of the local backend: from the command line (`--max-parallel`, `--runtime`) and the
config (`images.network`, `report.timing`), recorded in run.json so a detached driver and later commands agree."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def default_max_parallel() -> int:
    return max(1, min(4, (os.cpu_count() or 1)))


class LocalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_parallel: int = Field(default_factory=default_max_parallel, ge=1, description="Stages at once.")
    runtime: Literal["process", "fresh-process", "docker"] = Field(
        "process", description="Stages as processes here (CPU stages forked from a launcher that preloaded their "
                               "code; fresh-process: each a new `python -m stages.<kind>`), or in their images "
                               "(pinned by digest) through Docker.")
    docker_network: str = Field("none", description="--runtime docker: the containers' network.")
    timing: Literal["shared", "isolated"] = Field(
        "shared", description="report.timing: isolated runs each train stage alone (comparable step times).")
