"""The fork server's loop: preload, answer start requests with a forked child, report exits.

    python -m stages.preload --fd N --kinds preprocess,eval,ptq,train,export,report

Kinds come in the order the run needs them; for each, the server imports the kind's `core`
module (everything the stage imports before its first line of work) and the packages that
kind's work imports on every run (WARM). Between two imports it answers requests, so the first
stage starts as soon as what it needs is in, while the rest warms up beside it.

What keeps a fork as good as a fresh process (checked before every fork, else the request is
refused with the reason and the driver starts that stage fresh): one thread of Python (the
server starts none; a Python thread could hold a lock the child then waits on forever), CUDA
never initialised here, and the stage's environment equal to the server's but for
contract.preload.PER_STAGE_ENV (so every module was imported under the environment the stage
has). The native threads that imports start are idle pools that handle a fork themselves
(OpenBLAS's of numpy and scipy stop before it and start again on first use; jemalloc's of
pyarrow): the child starts with none and makes them when it computes, as a fresh process
does at import. The server writes only to its own log (stdout): never the root logger, never
a stage's.

What a child can see of the server: modules already in sys.modules (those of the other kinds
too, and what their imports registered: warnings filters and library loggers of packages a
stage of its kind imports later anyway, e.g. MLflow's). Nothing here imports ModelOpt, whose
import registers itself with transformers and torch.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from contract.preload import StartRequest, env_difference, readable, receive, send
from stages.preload.child import ChildStart

POLL_S = 0.02
# Imported by a kind's work on every run, after its first line of work (lazily, so that a fresh
# process of another kind does not pay for them): worth having in the server.
# (transformers' model code: `from_pretrained` imports it, and with it the quantizer registry,
# which imports torchao and scipy when they are installed.)
# Generation and masking: every causal LM's modeling module imports them (and through them
# torch._dynamo and Triton). The tokenizer: every stage that loads a model loads its tokenizer.
_HF_MODEL = ("transformers.modeling_utils", "transformers.models.auto.modeling_auto", "transformers.generation.utils",
             "transformers.masking_utils", "transformers.models.auto.tokenization_auto",
             "transformers.tokenization_utils_tokenizers")
_SPLITS = ("datasets",)  # stages.data reads a preprocessed split with it
WARM: dict[str, tuple[str, ...]] = {
    "preprocess": (),
    "train": (*_SPLITS, *_HF_MODEL),
    "ptq": (*_SPLITS, *_HF_MODEL),
    "export": (*_SPLITS, *_HF_MODEL),
    "eval": (*_SPLITS, *_HF_MODEL, "lm_eval.models.huggingface", "lm_eval.tasks"),
    "report": (),
    "probe": (),
}
# Every stage of a tracked run opens the MLflow store (contract.tracking) before its first line
# of work: the client, the store's module and, for the embedded sqlite store, SQLAlchemy's
# mappers (configured once per process, pure Python state: no connection is made here).
TRACKING: dict[str, tuple[str, ...]] = {
    "none": (),
    "sqlite": ("mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "sqlalchemy.orm:configure_mappers"),
    "http": ("mlflow.tracking", "mlflow.store.tracking.rest_store"),
    "https": ("mlflow.tracking", "mlflow.store.tracking.rest_store"),
}


def steps_for(kinds: list[str], tracking: str) -> list[str]:
    """What to import (`module`, or `module:function` to call after), in order: the first
    kind's code and the tracking client first, then the other kinds, then what work loads."""
    order: list[str] = ["stages.runtime"]
    for position, kind in enumerate(kinds):
        order.append(f"stages.{kind}.core")
        if position == 0:
            order += TRACKING.get(tracking, ("mlflow.tracking",))
    for kind in kinds:
        order += WARM.get(kind, ())
    return list(dict.fromkeys(order))


@dataclass
class ForkServer:
    sock: socket.socket
    steps: deque[str]  # what is left to preload
    environment: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: set[int] = field(default_factory=set)
    frozen: bool = False

    def serve(self) -> ChildStart | None:
        """Until the driver closes its end; returns in a forked child only."""
        while True:
            self._reap()
            if readable(self.sock, 0 if self.steps else POLL_S):
                message, fds = receive(self.sock)
                if message is None:
                    self.sock.close()
                    return None
                child = self._start(StartRequest(**message), fds)
                if child is not None:
                    return child
            elif self.steps:
                self._preload(self.steps.popleft())
            elif not self.frozen:
                # Warm: keep what was imported out of the collector's way in every child (fewer
                # pages copied on write, no first full collection over the preloaded modules).
                gc.collect()
                gc.freeze()
                self.frozen = True
                print(f"preload: warm, {len(sys.modules)} modules", flush=True)

    def _preload(self, step: str) -> None:
        started = time.perf_counter()
        module, _, function = step.partition(":")
        try:
            imported = importlib.import_module(module)
            if function:
                getattr(imported, function)()
        except Exception as error:  # the stage that needs it does it again and reports the error
            print(f"preload: {step}: {type(error).__name__}: {error}", flush=True)
            return
        print(f"preload: {step} in {time.perf_counter() - started:.2f} s", flush=True)

    def _refusal(self, request: StartRequest) -> str | None:
        differing = env_difference(self.environment, request.env)
        if differing:
            return (f"the stage's environment differs from the preloaded launcher's in {', '.join(differing[:5])}; "
                    "its modules were imported under another environment")
        if threading.active_count() > 1:
            return f"{threading.active_count()} Python threads run in the preloaded launcher; a fork is unsafe"
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            return "CUDA was initialised in the preloaded launcher; a forked child cannot use it"
        return None

    def _start(self, request: StartRequest, fds: list[int]) -> ChildStart | None:
        problem = self._refusal(request) if len(fds) == 1 else "a start carries exactly one log fd"
        if problem:
            for fd in fds:
                os.close(fd)
            send(self.sock, {"op": "refused", "id": request.id, "error": problem})
            return None
        log_fd = fds[0]
        ready_read, ready_write = os.pipe()
        server_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            self.sock.close()  # the child's copy: the driver talks to the server only
            return ChildStart(request, log_fd, ready_write, server_pid)
        os.close(ready_write)
        os.close(log_fd)
        os.read(ready_read, 1)  # the child leads its own process group now (or died trying)
        os.close(ready_read)
        self.children.add(pid)
        send(self.sock, {"op": "started", "id": request.id, "pid": pid})
        return None

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            send(self.sock, {"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def serve_from_argv(argv: list[str] | None = None) -> ChildStart | None:
    parser = argparse.ArgumentParser(prog="python -m stages.preload")
    parser.add_argument("--fd", type=int, required=True, help="this end of the driver's socket pair")
    parser.add_argument("--kinds", default="", help="stage kinds to preload, in the order they run")
    parser.add_argument("--tracking", default="none", help="scheme of the run's MLflow store (sqlite, http, none)")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    print(f"preload: pid {os.getpid()}, kinds {', '.join(kinds)}, tracking {args.tracking}", flush=True)
    return ForkServer(sock, deque(steps_for(kinds, args.tracking))).serve()
