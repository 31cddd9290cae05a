"""The preloaded launcher of the local backend: how the driver and its fork server talk.

A stage is `python -m stages.<kind> --spec FILE` (contract.launch). Started that way, each of
the smoke study's 28 stages pays seconds of imports (torch, transformers, MLflow, ...) before
its first line of work. The local driver can instead keep one process that has imported those
once (`python -m stages.preload`, the data plane's fork server) and have it fork a child per
CPU stage, which then runs the same module with the same arguments, environment, working
directory, log and process group as a fresh process would (stages/preload/child.py). GPU and
multi-process stages, and `--runtime docker`, start fresh as before; Slurm and k8s never use it.

Wire format: one message per datagram on an AF_UNIX SOCK_SEQPACKET socket pair (the server's
end is inherited as fd `--fd`), a JSON object each; a `start` carries the stage's log file as
an SCM_RIGHTS file descriptor.
  driver -> server: {"op": "start", "id", "module", "args", "env", "cwd"} + [log fd]
  server -> driver: {"op": "started", "id", "pid"} once the child leads its own process group
                    {"op": "refused", "id", "error"} (nothing was started)
                    {"op": "exited", "pid", "code"} (code as subprocess gives it: -N for signal N)
The driver closing its end stops the server; the server dies with the driver (PDEATHSIG).
"""

from __future__ import annotations

import json
import select
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

SERVER_MODULE = "stages.preload"
# The variables a stage's environment may differ in from the server's: read by a stage at work,
# never while modules import. Any other difference is refused: the preloaded modules were
# imported under the server's environment, and a fresh process would have imported them under
# the stage's.
PER_STAGE_ENV = ("PIPELINE_JOB_ID",)
MAX_MESSAGE = 1 << 20


@dataclass(frozen=True)
class StartRequest:
    id: int
    module: str
    args: list[str]
    env: dict[str, str]
    cwd: str
    op: str = field(default="start")


def server_argv(python: str, fd: int, kinds: list[str], tracking_uri: str | None) -> list[str]:
    """The fork server's command: it preloads what `kinds` import, in that order, and the MLflow
    client of the run's tracking store (by the URI's scheme: sqlite, http, ...)."""
    scheme = tracking_uri.split(":", 1)[0] if tracking_uri else "none"
    return [python, "-m", SERVER_MODULE, "--fd", str(fd), "--kinds", ",".join(kinds), "--tracking", scheme]


def env_difference(server_env: dict[str, str], stage_env: dict[str, str]) -> list[str]:
    """Names of the variables that differ between the two, besides PER_STAGE_ENV."""
    names = (set(server_env) | set(stage_env)) - set(PER_STAGE_ENV)
    return sorted(name for name in names if server_env.get(name) != stage_env.get(name))


def send(sock: socket.socket, message: dict[str, Any] | StartRequest, fds: list[int] | None = None) -> None:
    payload = json.dumps(asdict(message) if isinstance(message, StartRequest) else message).encode()
    if fds:
        socket.send_fds(sock, [payload], fds)
    else:
        sock.send(payload)


def readable(sock: socket.socket, timeout_s: float) -> bool:
    """Whether a message (or the other end's close) waits on `sock`, waiting up to `timeout_s`.
    poll, not select: a driver that holds over 1024 files (a long test session, a busy
    submitter) gets fd numbers select() refuses."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the fds it carried; (None, []) when the other end closed."""
    payload, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if not payload:
        return None, fds
    return json.loads(payload), fds
