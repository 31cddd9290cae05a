"""Processes on this machine, by pid: whether one still runs, and stopping one with SIGTERM.
The local driver and NeMo-Run's experiment driver are both such a process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive: it only waits to be reaped.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and ") Z" in stat.read_text())


def terminate_and_wait(pid: int, timeout_s: float = 60.0) -> bool:
    """SIGTERM, then wait for the process to end; whether it ended within `timeout_s`."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not process_alive(pid)
