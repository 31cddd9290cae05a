"""The local driver's part in comparable step times: it records where each stage ran, and with
`report.timing: isolated` it runs each train stage alone.

- Record: `<run>/placements.jsonl` (contract/device_sharing.py reads it): a line when a stage
  starts, with the GPUs it was handed, and one when it ends. A train stage finds the file through
  PIPELINE_PLACEMENTS and writes down who ran beside it during its steps.
- Isolation: a train stage starts only when nothing else runs, nothing starts while it runs, and
  while a train stage waits for that, no other stage starts ahead of it (else a steady stream of
  evals could keep it waiting).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from contract.device_sharing import LEDGER_ENV, LEDGER_FILE, PlacementLedger

TIMED_KINDS = ("train",)  # stages whose step times the report compares


@dataclass
class LocalTiming:
    run_dir: Path
    isolated: bool = False
    timed_kinds: tuple[str, ...] = TIMED_KINDS

    @property
    def ledger(self) -> PlacementLedger:
        return PlacementLedger(Path(self.run_dir) / LEDGER_FILE)

    def is_timed(self, kind: str) -> bool:
        return kind in self.timed_kinds

    def may_start(self, kind: str, running_kinds: Iterable[str], timed_waiting: bool) -> bool:
        if not self.isolated:
            return True
        running = list(running_kinds)
        if any(other in self.timed_kinds for other in running):
            return False
        if kind in self.timed_kinds:
            return not running
        return not timed_waiting

    def environment(self) -> dict[str, str]:
        """What to add to every stage's environment: where the record is."""
        return {LEDGER_ENV: str(self.ledger.path.resolve())}

    def started(self, stage: str, kind: str, gpus: list[int]) -> None:
        self.ledger.started(stage, kind, gpus)

    def ended(self, stage: str) -> None:
        self.ledger.ended(stage)
