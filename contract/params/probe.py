"""Parameters of the `probe` stage: small, real file work for orchestration tests and benches."""

from __future__ import annotations

from pydantic import Field

from contract.params.base import StageParams


class ProbeParams(StageParams):
    sleep_s: float = Field(0.0, ge=0, description="Seconds to sleep (in 0.05 s slices, interruptible).")
    fail: bool = Field(False, description="Raise an error instead of succeeding.")
    payload: str = Field("", description="Text written to output.txt, after the inputs' texts.")
    metric_every_s: float = Field(
        0.0, ge=0, description="While sleeping, log an `elapsed_s` metric this often (0: never)."
    )
