"""The run lock: one command at a time changes a run, and it takes the lock before it reads,
moves or writes anything of the run. A command refused because another holds it changes nothing.

The lock is an flock on `<root>/<run>/.lock`, held for as long as the command (or the detached
local driver it hands the lock to) runs; the kernel drops it when the holder dies, so a killed
run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from pipeline.errors import BackendError
from pipeline.layout import RunLayout

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle

    @property
    def fd(self) -> int:
        return self._handle.fileno()

    def note_holder(self, text: str) -> None:
        """Say who holds the lock (read by a refused command): e.g. `pid 123 (run)`."""
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(text)
        self._handle.flush()

    def release(self) -> None:
        self._handle.close()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_run_lock(layout: RunLayout, command: str) -> RunLock:
    path = Path(layout.run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise BackendError(
            f"run '{layout.run_id}' is already being run by {owner}; wait for it or "
            f"`python -m pipeline cancel {layout.run_id}`; nothing was changed"
        ) from None
    lock = RunLock(handle)
    lock.note_holder(f"pid {os.getpid()} ({command})")
    return lock
