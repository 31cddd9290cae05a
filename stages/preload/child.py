"""A forked child of the fork server becomes `python -m <module> <args>` as a fresh process
started by the local driver would be:

- its own session and process group (the driver signals the group), dying with its parent
  (PR_SET_PDEATHSIG; the server in turn dies with the driver);
- signal dispositions and mask as a new interpreter has them;
- stdin /dev/null (the server's), stdout and stderr the stage's log, no other descriptor of the
  server's; the environment, working directory, sys.path[0] and argv of `python -m`;
- fresh random state where a fork would share it (Python's `random` reseeds itself at fork;
  numpy's global generator and torch's default CPU generator do not);
- the module run as `__main__`; its exit (code, exception, signal) is the process's exit, with
  atexit handlers and the interpreter's shutdown as usual.

What differs, and what reads it: sys.modules holds what the server preloaded (server.py says
what that brings along); /proc/self/environ shows the server's start environment, which equals
the stage's but for PIPELINE_JOB_ID (os.environ and getenv() are the stage's); a traceback that
reaches the top shows this module and runpy below the stage's frames.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
from dataclasses import dataclass

from contract.preload import StartRequest

_PR_SET_PDEATHSIG = 1
# What a new CPython process has (anything else is the default action).
_FRESH_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGPIPE: signal.SIG_IGN,
                   signal.SIGXFSZ: signal.SIG_IGN}


@dataclass
class ChildStart:
    request: StartRequest
    log_fd: int
    ready_fd: int  # written once the child leads its process group; the server waits for it
    server_pid: int


def become_stage(start: ChildStart) -> None:
    os.setsid()
    _fresh_signals()
    _die_with_parent(start.server_pid)
    os.write(start.ready_fd, b"1")
    os.close(start.ready_fd)
    os.dup2(start.log_fd, 1)
    os.dup2(start.log_fd, 2)
    os.close(start.log_fd)
    request = start.request
    os.environ.clear()
    os.environ.update(request.env)
    os.chdir(request.cwd)
    sys.path[0] = request.cwd  # `python -m` puts the working directory first
    sys.argv = ["-m", *request.args]  # runpy sets argv[0] to the module's file, as `-m` does
    sys.orig_argv = [sys.executable, "-m", request.module, *request.args]
    _fresh_random_state()
    runpy.run_module(request.module, run_name="__main__", alter_sys=True)


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the server died before the line above: go as it would have made us
        os.kill(os.getpid(), signal.SIGTERM)


def _fresh_signals() -> None:
    signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        current = signal.getsignal(signum)
        if current is None:  # installed outside Python (by a library at import): left as it is
            continue
        wanted = _FRESH_HANDLERS.get(signum, signal.SIG_DFL)
        if current != wanted:
            signal.signal(signum, wanted)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _fresh_random_state() -> None:
    """Each process draws its own: a fresh interpreter seeds these from entropy at import."""
    legacy = sys.modules.get("numpy.random")
    if legacy is not None:
        legacy.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.default_generator.seed()  # the CPU generator; CUDA's are seeded when CUDA starts
