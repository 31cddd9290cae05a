"""How the local driver starts a stage: one launcher strategy per `--runtime`.

- `FreshProcesses` (`--runtime fresh-process`): each stage a new process running the contract's
  command (`python -m stages.<kind> --spec FILE`, torchrun for several processes), in its own
  session, dying with the driver (PR_SET_PDEATHSIG). `DockerLauncher` (`--runtime docker`) is
  the same with the container runner as the command.
- `PreloadedProcesses` (`--runtime process`, the default): CPU stages are forked from a fork
  server that imported their code once (contract/preload.py, stages/preload/); GPU stages
  (CUDA is never initialised in a fork) and multi-process stages start fresh as above.

Either way the driver gets a `StageProcess`: its pid (also its process group), `poll()` and
`wait()` with subprocess's exit codes (-N for signal N). The stage cannot tell which one
started it: same module, arguments, environment, working directory, log, process group,
signals, limits (inherited from the driver through the server) and parent-death signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from contract.launch import StageLaunch
from contract.preload import (
    PER_STAGE_ENV,
    StartRequest,
    readable,
    receive,
    send,
    server_argv,
)
from pipeline.errors import BackendError
from pipeline.run_record import RunRecord, StageRecord

_PR_SET_PDEATHSIG = 1
SERVER_LOG = "preload.log"  # in the run dir: the fork server's own output
SERVER_STOP_S = 10.0


@dataclass(frozen=True)
class StageStart:
    name: str
    stage: StageRecord
    spec_path: Path
    gpus: list[int]
    env: dict[str, str]
    log: IO[bytes]


class StageProcess(Protocol):
    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...


class StageLauncher(Protocol):
    def open(self, record: RunRecord, run_dir: Path, cpu_stage_env: dict[str, str]) -> None:
        """Before the first stage; `cpu_stage_env`: a CPU stage's environment, less PER_STAGE_ENV."""

    def start(self, start: StageStart) -> StageProcess: ...

    def close(self) -> None:
        """After the last stage ended."""


def process_command(stage: StageRecord, spec_path: Path) -> list[str]:
    """The stage as a process on this machine: the contract's launch command (torchrun when
    the stage has several processes)."""
    return StageLaunch(stage.kind, str(spec_path), processes_per_node=stage.resources.processes_per_node,
                       python=sys.executable).argv()


def write_header(log: IO[bytes], text: str) -> None:
    log.write(f"=== {time.strftime('%F %T')} {text}\n".encode())
    log.flush()


def die_with_parent(signum: int = signal.SIGTERM):
    def set_parent_death_signal() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum)
    return set_parent_death_signal


def start_fresh(command: list[str], env: dict[str, str], log: IO[bytes]) -> subprocess.Popen:
    """A new process in its own session, output to `log`, dying with this one."""
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True, preexec_fn=die_with_parent())


class FreshProcesses:
    """Each stage a new process: `command()` says which (the contract's launch command here)."""

    def open(self, record: RunRecord, run_dir: Path, cpu_stage_env: dict[str, str]) -> None:
        pass

    def command(self, name: str, stage: StageRecord, spec_path: Path, gpus: list[int]) -> list[str]:
        return process_command(stage, spec_path)

    def start(self, start: StageStart) -> StageProcess:
        command = self.command(start.name, start.stage, start.spec_path, start.gpus)
        write_header(start.log, " ".join(command))
        return start_fresh(command, start.env, start.log)

    def close(self) -> None:
        pass


@dataclass
class PreloadedProcesses:
    """CPU stages forked from a fork server that preloaded their code; the rest start fresh.

    Never silently otherwise: a start the server refuses (its process no longer fit to fork,
    see stages/preload/server.py) starts fresh with a warning in the stage's log and on the
    driver's stderr; once the server is gone (killed, out of memory), the stages it ran fail
    (exit -9, rerun by the next `run`) and every later stage starts fresh, with the same
    warning once."""

    fresh: FreshProcesses = field(default_factory=FreshProcesses)
    python: str = sys.executable
    _server: ForkServer | None = field(default=None, init=False)
    _gone_warned: bool = field(default=False, init=False)

    @staticmethod
    def preloadable(stage: StageRecord) -> bool:
        return stage.resources.gpus_per_node == 0 and stage.resources.processes_per_node == 1

    def open(self, record: RunRecord, run_dir: Path, cpu_stage_env: dict[str, str]) -> None:
        kinds = list(dict.fromkeys(stage.kind for stage in record.stages.values() if self.preloadable(stage)))
        if kinds:
            tracking_uri = record.tracking.tracking_uri if record.tracking else None
            self._server = ForkServer.start(self.python, kinds, tracking_uri, run_dir / SERVER_LOG, cpu_stage_env)

    def start(self, start: StageStart) -> StageProcess:
        server = self._server
        if server is None or not self.preloadable(start.stage):
            return self.fresh.start(start)
        if not server.alive():
            if not self._gone_warned:
                _warn(start.log, f"the preloaded launcher (pid {server.pid}) is gone ({server.ended_how()}); "
                                 f"this and later stages start as fresh processes; its log: {server.log_path}")
                self._gone_warned = True
            return self.fresh.start(start)
        launch = StageLaunch(start.stage.kind, str(start.spec_path), python=self.python)
        try:
            forked = server.fork(launch.module, launch.module_args, start.env, start.log)
        except LaunchRefused as refusal:
            _warn(start.log, f"{start.name}: the preloaded launcher refused it ({refusal}); it starts as a fresh process")
            return self.fresh.start(start)
        except BackendError as error:  # it died while we asked
            _warn(start.log, f"{error}; this and later stages start as fresh processes")
            self._gone_warned = True
            return self.fresh.start(start)
        write_header(start.log, f"{' '.join(launch.argv())} (forked by the preloaded launcher, pid {server.pid}, "
                                f"as stage pid {forked.pid})")
        return forked

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def _warn(log: IO[bytes], text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)
    log.write(f"warning: {text}\n".encode())
    log.flush()


class LaunchRefused(BackendError):
    """The fork server would not fork this stage (nothing started)."""


@dataclass
class ForkedStage:
    """A stage forked by the server: the server reaps it and reports its exit code."""

    pid: int
    server: ForkServer

    def poll(self) -> int | None:
        self.server.pump()
        return self.server.exits.get(self.pid)

    def wait(self) -> int:
        while self.poll() is None:
            self.server.pump(timeout=0.1)
        return self.server.exits[self.pid]


@dataclass
class ForkServer:
    """The driver's end of one fork server (`python -m stages.preload`)."""

    process: subprocess.Popen
    sock: socket.socket
    log_path: Path
    exits: dict[int, int] = field(default_factory=dict)
    forked: set[int] = field(default_factory=set)
    _replies: dict[int, dict] = field(default_factory=dict)
    _next_id: int = 0
    _closed: bool = False

    @classmethod
    def start(cls, python: str, kinds: list[str], tracking_uri: str | None, log_path: Path,
              env: dict[str, str]) -> ForkServer:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                server_argv(python, theirs.fileno(), kinds, tracking_uri), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True, pass_fds=(theirs.fileno(),),
                # A `kill -9` of the driver takes the server, and the server its children (their
                # own PDEATHSIG), as it would take children the driver started itself.
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        theirs.close()
        return cls(process, ours, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        if not self._closed:
            self.pump()  # its end of the socket closing is how we learn first that it died
        return not self._closed and self.process.poll() is None

    def ended_how(self) -> str:
        code = self.process.poll()
        if code is None:
            return "its socket closed"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def fork(self, module: str, args: list[str], env: dict[str, str], log: IO[bytes]) -> ForkedStage:
        request_id = self._next_id = self._next_id + 1
        request = StartRequest(request_id, module, list(args), dict(env), os.getcwd())
        try:
            send(self.sock, request, [log.fileno()])
        except OSError as error:
            raise BackendError(f"the preloaded launcher (pid {self.pid}) took no request: {error}") from None
        while request_id not in self._replies:  # waits while the server finishes an import
            if self._closed:
                raise BackendError(f"the preloaded launcher (pid {self.pid}) ended; see its log")
            self.pump(timeout=1.0)
        reply = self._replies.pop(request_id)
        if reply["op"] != "started":
            raise LaunchRefused(str(reply.get("error")))
        self.forked.add(reply["pid"])
        return ForkedStage(reply["pid"], self)

    def pump(self, timeout: float = 0.0) -> None:
        """Read what the server said (exits, replies) without blocking longer than `timeout`."""
        while not self._closed and readable(self.sock, timeout):
            timeout = 0.0
            try:
                message, fds = receive(self.sock)
            except ConnectionResetError:
                message, fds = None, []
            for fd in fds:
                os.close(fd)
            if message is None:
                self._server_gone()
            elif message["op"] == "exited":
                self.exits[message["pid"]] = message["code"]
            else:
                self._replies[message["id"]] = message

    def _server_gone(self) -> None:
        """The server died: its running children got SIGTERM (their PDEATHSIG) and nobody can
        reap them for us; make sure they are gone, so no orphan keeps writing a stage dir."""
        self._closed = True
        self.sock.close()
        for pid in self.forked - set(self.exits):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.exits[pid] = -signal.SIGKILL
            print(f"warning: the preloaded launcher (pid {self.pid}) died ({self.ended_how()}); the stage it "
                  f"ran as pid {pid} was stopped with it (its marker says exit -9; the next run reruns it)",
                  file=sys.stderr, flush=True)

    def stop(self) -> None:
        """After the driver's last stage ended: nothing of the server's is left to wait for
        (it answers a closed socket only between two imports, which may take seconds)."""
        if not self._closed:
            self._closed = True
            self.sock.close()  # the server's cue to exit
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.process.terminate()  # busy importing; it has no stage left to take down
            try:
                self.process.wait(timeout=SERVER_STOP_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def launcher_for(runtime: str, docker_network: str = "none") -> StageLauncher:
    """The launcher of a `--runtime`."""
    if runtime == "process":
        return PreloadedProcesses()
    if runtime == "fresh-process":
        return FreshProcesses()
    if runtime == "docker":
        from pipeline.docker_runtime import DockerLauncher

        return DockerLauncher(docker_network)
    raise BackendError(f"--runtime: unknown '{runtime}'; choose process, fresh-process or docker")


def without_per_stage(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name not in PER_STAGE_ENV}
