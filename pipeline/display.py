"""Stage tables for the terminal: a live table on a TTY, one line per change otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.backends.base import StageState, StageStatus

_STYLE = {
    StageState.SUCCEEDED: "green",
    StageState.CACHED: "dim green",
    StageState.FAILED: "bold red",
    StageState.RUNNING: "yellow",
    StageState.QUEUED: "cyan",
    StageState.PENDING: "dim",
    StageState.BLOCKED: "red",
    StageState.INTERRUPTED: "magenta",
    StageState.CANCELLED: "magenta",
}


def status_table(statuses: list[StageStatus], title: str = "") -> Table:
    table = Table(title=title or None, show_lines=False)
    for column in ("stage", "kind", "state", "time", "job", "note"):
        table.add_column(column, overflow="fold")
    now = time.time()
    for status in statuses:
        elapsed = ""
        if status.started_at:
            elapsed = f"{(status.finished_at or now) - status.started_at:.1f}s"
        table.add_row(status.name, status.kind, f"[{_STYLE[status.state]}]{status.state.value}[/]",
                      elapsed, status.job_id, status.note)
    return table


class StatusView:
    """Shows stage states while a run is driven; `live=False` prints plain transition lines."""

    def __init__(self, title: str, live: bool | None = None) -> None:
        self.title = title
        self.console = Console()
        self.live = sys.stdout.isatty() if live is None else live
        self._live: Live | None = None
        self._last: dict[str, StageState] = {}

    def __enter__(self) -> StatusView:
        if self.live:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, statuses: list[StageStatus]) -> None:
        if self._live is not None:
            self._live.update(status_table(statuses, self.title))
            return
        for status in statuses:
            if self._last.get(status.name) != status.state:
                self._last[status.name] = status.state
                note = f"  {status.note}" if status.note else ""
                print(f"{time.strftime('%H:%M:%S')} {status.name:<24} {status.state.value}{note}",
                      flush=True)
