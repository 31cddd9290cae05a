"""A process that writes down how it was started, then ends as asked: what a stage could see of
its launcher. `tests/pipeline/test_local_launch.py` runs it fresh and forked, and compares.

    python -m tests.pipeline.launch_probe --out FILE [--then exit:N|raise|segfault|sigterm|wait] [--import MODULE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

_PR_GET_PDEATHSIG = 2


def parent_death_signal() -> int:
    value = ctypes.c_int(0)
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_GET_PDEATHSIG, ctypes.byref(value))
    return value.value


def open_fds() -> dict[str, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[name] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            continue
    return found


def threads_once_computing(numpy, torch) -> int:
    """OS threads after a matrix product in each loaded library: their pools start lazily (in a
    fresh process at import or first use, in a forked child at first use)."""
    if numpy is not None:
        numpy.ones((256, 256)) @ numpy.ones((256, 256))
    if torch is not None:
        torch.ones(256, 256) @ torch.ones(256, 256)
    return len(os.listdir("/proc/self/task"))


def seen() -> dict:
    """Everything a stage's code could ask about its own process."""
    torch = sys.modules.get("torch")
    numpy = sys.modules.get("numpy")
    return {
        "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "name": __name__,
        "argv": sys.argv, "orig_argv": sys.orig_argv, "path0": sys.path[0], "path": sys.path, "cwd": os.getcwd(),
        "env": dict(os.environ),
        "signals": {str(int(s)): repr(signal.getsignal(s)) for s in sorted(signal.valid_signals())
                    if s not in (signal.SIGKILL, signal.SIGSTOP)},
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "pdeathsig": parent_death_signal(),
        "fds": open_fds(),
        "stdout": {"line_buffering": sys.stdout.line_buffering, "write_through": sys.stdout.write_through},
        "rlimits": {name: resource.getrlimit(getattr(resource, name))
                    for name in ("RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_NPROC", "RLIMIT_STACK")},
        "umask": os.umask(os.umask(0)), "affinity": sorted(os.sched_getaffinity(0)), "nice": os.nice(0),
        "random": random.random(),
        "numpy_random": float(numpy.random.random()) if numpy is not None and hasattr(numpy, "random") else None,
        "torch": None if torch is None else {"threads": torch.get_num_threads(), "seed": torch.initial_seed(),
                                             "first_draw": torch.rand(1).item(),
                                             "cuda_initialized": torch.cuda.is_initialized()},
        "threads": threads_once_computing(numpy, torch),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--then", default="exit:0")
    parser.add_argument("--import", dest="modules", action="append", default=[], help="import this first")
    args = parser.parse_args()
    for module in args.modules:
        __import__(module)
    args.out.write_text(json.dumps(seen()))
    print(f"launch_probe: wrote {args.out}", flush=True)
    action, _, value = args.then.partition(":")
    if action == "exit":
        sys.exit(int(value))
    if action == "raise":
        raise RuntimeError("launch_probe asked to raise")
    if action == "segfault":
        ctypes.string_at(0)
    if action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    if action == "wait":  # until a signal ends it
        while True:
            time.sleep(0.05)


if __name__ == "__main__":
    main()
