"""What one stage asks of the machine it runs on; every backend maps it to its own terms."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    nodes: int = Field(1, ge=1, description="Nodes (multi-node stages run torchrun across them).")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node; >1 runs torchrun per node.")
    cpus: int = Field(1, ge=1, description="CPU cores per node.")
    memory_gb: float = Field(4.0, gt=0, description="Host memory per node in GiB.")
    time_limit_min: int = Field(60, ge=1, description="Wall-clock limit in minutes.")
    shm_gb: float = Field(1.0, gt=0, description="/dev/shm size in GiB (data loader workers, NCCL).")

    @property
    def processes_per_node(self) -> int:
        return max(1, self.gpus_per_node)
