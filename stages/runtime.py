"""Runs one stage under the contract: read the spec, do the work, mark the result.

Each stage module is `python -m stages.<kind> --spec FILE`, whose `__main__` calls
`stage_main(work)` with a function `work(ctx) -> summary metrics`. The spec's params arrive
typed (the kind's model in contract.params, validated when the spec was read): a stage does not
validate them again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from pydantic import ValidationError

from contract.files import write_json_atomic
from contract.markers import (
    UPSTREAM_FAILED_EXIT,
    clear_markers,
    mark_failed,
    mark_succeeded,
    read_marker,
    success_problem,
)
from contract.params import StageParams
from contract.spec import LOG_FILE, MANIFEST_FILE, StageSpec, load_spec
from contract.tracking import StageTracker
from contract.validation import first_problem


class StageInterrupted(Exception):
    """SIGTERM/SIGINT/SIGUSR1 arrived: stop at a safe point, leave no marker, resume later."""


class StageInputError(Exception):
    """Bad input data or params: reported as one line, no traceback."""


Params = TypeVar("Params", bound=StageParams)


@dataclass
class StageContext:
    spec: StageSpec
    tracker: StageTracker
    log: logging.Logger
    interrupted: bool = False
    # A stage that checkpoints sets this, then calls check_interrupted() at safe points;
    # otherwise the first signal stops the stage at once.
    defer_signals: bool = False

    @property
    def output_dir(self) -> Path:
        return self.spec.output_dir

    @property
    def params(self) -> StageParams:
        return self.spec.params

    def params_as(self, model: type[Params]) -> Params:
        """The spec's params, typed; a spec of another kind is bad input."""
        if not isinstance(self.spec.params, model):
            raise StageInputError(f"spec.kind: a '{self.spec.kind}' spec was given to the stage that takes "
                                  f"{model.__name__}; run python -m stages.{self.spec.kind}")
        return self.spec.params

    def input_dir(self, role: str) -> Path:
        try:
            return self.spec.inputs[role]
        except KeyError:
            raise StageInputError(
                f"spec.inputs: stage {self.spec.stage} needs an input '{role}', "
                f"has {sorted(self.spec.inputs)}"
            ) from None

    def check_interrupted(self) -> None:
        """Call at safe points (e.g. after a checkpoint) to stop when a signal came."""
        if self.interrupted:
            raise StageInterrupted("stopped by signal")


Work = Callable[[StageContext], dict[str, Any]]

def stage_main(work: Work, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one pipeline stage from its spec file.")
    parser.add_argument("--spec", required=True, type=Path, help="path to the stage's spec.json")
    args = parser.parse_args(argv)
    sys.exit(run_stage(args.spec, work))


def run_stage(spec_path: Path, work: Work) -> int:
    if _process_rank() > 0:
        return _run_worker_rank(spec_path, work)
    spec = _read_spec(spec_path, work)
    if spec is None:
        return 2
    out = spec.output_dir
    out.mkdir(parents=True, exist_ok=True)
    problem = success_problem(out, spec.fingerprint)
    if problem is None:
        print(f"{spec.stage}: already succeeded ({spec.fingerprint[:12]}) and its outputs verify; nothing to do")
        return 0
    if read_marker(out) is not None and problem.startswith("output "):
        print(f"{spec.stage}: runs again: its {problem}")
    clear_markers(out)
    log = _stage_logger(spec.stage)
    upstream_error = _failed_upstream(spec)
    if upstream_error:
        mark_failed(out, spec.fingerprint, upstream_error, UPSTREAM_FAILED_EXIT)
        print(f"error: {upstream_error}", file=sys.stderr)
        return UPSTREAM_FAILED_EXIT

    tracker = StageTracker(stage_dir=out, ref=spec.tracking, run_name=spec.stage)
    ctx = StageContext(spec=spec, tracker=tracker, log=log)
    _install_signal_handlers(ctx)
    try:  # from the handlers on, a signal at any point is an interruption, never a traceback
        return _run_and_record(ctx, work)
    except StageInterrupted:
        log.warning("%s: interrupted; outputs kept for resume, no marker written", spec.stage)
        tracker.flush()
        return 143


def _run_and_record(ctx: StageContext, work: Work) -> int:
    """The stage's work, then its manifest, metrics and `_SUCCESS`; or its `_FAILED`."""
    spec, tracker, log, out = ctx.spec, ctx.tracker, ctx.log, ctx.output_dir
    started = time.time()
    tracker.start({"stage": spec.stage, "kind": spec.kind, "fingerprint": spec.fingerprint, **spec.tags})
    tracker.log_params(spec.params.model_dump(mode="json"))
    try:
        summary = work(ctx) or {}
    except StageInputError as error:
        return _fail(ctx, f"{spec.stage}: {_one_line(error)}", 2)
    except StageInterrupted:
        raise
    except Exception as error:
        traceback.print_exc()
        return _fail(ctx, f"{spec.stage}: {type(error).__name__}: {_one_line(error)}", 1)
    summary = {"wall_s": round(time.time() - started, 3), **summary}
    numeric = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics(numeric)
    write_json_atomic(
        out / MANIFEST_FILE,
        {"stage": spec.stage, "kind": spec.kind, "fingerprint": spec.fingerprint, "summary": summary},
    )
    # Logged before the marker: whoever sees `_SUCCESS` finds the whole log.
    log.info("%s: succeeded in %.1f s", spec.stage, summary["wall_s"])
    _log_stage_log(ctx)
    tracker.finish("FINISHED")
    mark_succeeded(out, spec.fingerprint)
    return 0


def _read_spec(spec_path: Path, work: Work, mark: bool = True) -> StageSpec | None:
    """The spec, or None after one line on stderr (exit 2). A spec whose params are wrong but
    whose stage dir is known gets a `_FAILED` naming the field, as any bad input does; a spec of
    another kind is refused before anything is written (its outputs are not this module's)."""
    try:
        spec = load_spec(spec_path)
    except ValidationError as error:
        where, message = first_problem(error)
        raw = _raw_json(spec_path)
        stage, out, fingerprint = raw.get("stage"), raw.get("output_dir"), raw.get("fingerprint")
        if where == "params" or where.startswith("params."):
            line = f"{stage}: {where}: {message}"
        else:
            line = f"{spec_path}: invalid stage spec: {where + ': ' if where else ''}{message}"
        line = " ".join(line.splitlines())  # a key or value with a line break in it stays one line
        print(f"error: {line}", file=sys.stderr)
        markable = (all(isinstance(v, str) and v for v in (stage, out, fingerprint))
                    and _kind_mismatch(raw.get("kind"), work) is None)
        # Only at an absolute output dir: a relative one would land in whatever dir the stage started in.
        if mark and markable and Path(out).is_absolute():
            try:
                mark_failed(Path(out), fingerprint, line, 2)
            except (OSError, ValueError):  # a dir the OS cannot make, a NUL byte in the path
                pass
        return None
    except Exception as error:  # unreadable spec: nothing to mark
        print(f"error: {spec_path}: invalid stage spec: {_one_line(error)}", file=sys.stderr)
        return None
    mismatch = _kind_mismatch(spec.kind, work)
    if mismatch:
        print(f"error: {spec_path}: {mismatch}", file=sys.stderr)
        return None
    return spec


def _kind_mismatch(kind: Any, work: Work) -> str | None:
    """`python -m stages.probe` with a train stage's spec would mark the train stage done."""
    parts = getattr(work, "__module__", "").split(".")
    if len(parts) >= 2 and parts[0] == "stages" and parts[1] != kind:
        return f"spec.kind is '{kind}' but this is stages.{parts[1]}; run `python -m stages.{kind}`"
    return None


def _raw_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _process_rank() -> int:
    """This process's rank under torchrun/srun (RANK env), 0 for a single-process stage."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


class _SilentTracker:
    """Tracker of ranks > 0: rank 0 alone reports, so the others log nothing."""

    def start(self, tags: dict[str, str]) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def flush(self) -> bool:
        return True

    def finish(self, status: str) -> bool:
        return True


def _run_worker_rank(spec_path: Path, work: Work) -> int:
    """A rank > 0 of a multi-process stage: run `work` (it joins rank 0's collectives) but
    write no marker, manifest or tracking; rank 0 owns those. Reads the same markers as
    rank 0 so both agree on whether there is anything to do."""
    spec = _read_spec(spec_path, work, mark=False)
    if spec is None:
        return 2
    if success_problem(spec.output_dir, spec.fingerprint) is None:
        return 0
    if _failed_upstream(spec):
        return UPSTREAM_FAILED_EXIT
    log = _stage_logger(spec.stage)
    log.setLevel(logging.WARNING)
    ctx = StageContext(spec=spec, tracker=_SilentTracker(), log=log)  # type: ignore[arg-type]
    _install_signal_handlers(ctx)
    try:
        work(ctx)
    except StageInterrupted:
        return 143
    except StageInputError as error:
        print(f"error: {spec.stage} (rank {_process_rank()}): {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def _fail(ctx: StageContext, message: str, exit_code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    mark_failed(ctx.output_dir, ctx.spec.fingerprint, message, exit_code)
    ctx.tracker.set_tags({"error": message[:500]})
    _log_stage_log(ctx)
    ctx.tracker.finish("FAILED")
    return exit_code


def _failed_upstream(spec: StageSpec) -> str | None:
    for role, path in spec.inputs.items():
        marker = read_marker(path)
        if marker is None or marker.state != "succeeded":
            state = marker.state if marker else "not finished"
            return f"{spec.stage}: upstream '{role}' ({path}) is {state}; nothing to do"
        problem = success_problem(path, marker.fingerprint)
        if problem:
            return f"{spec.stage}: upstream '{role}' ({path}) succeeded but its {problem}; run it again"
    return None


def _log_stage_log(ctx: StageContext) -> None:
    log_path = ctx.output_dir / LOG_FILE
    if log_path.exists():
        sys.stdout.flush()
        sys.stderr.flush()
        ctx.tracker.log_artifact(log_path)


# One kill often arrives more than once: Slurm signals every process of the step, so the stage
# hears it directly and again through the wrapper shell's trap (stage_gate.run_script). Signals
# this soon after the first are that same request; a later one is someone insisting.
SAME_REQUEST_S = 2.0


def _install_signal_handlers(ctx: StageContext) -> None:
    first_at: float | None = None
    stopping = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal first_at, stopping
        now = time.monotonic()
        if stopping or (first_at is not None and now - first_at < SAME_REQUEST_S):
            return  # on its way out already: a second raise would break the clean-up
        if ctx.interrupted or not ctx.defer_signals:  # a later signal stops at once
            stopping = True
            raise StageInterrupted(f"signal {signum}")
        first_at = now
        ctx.interrupted = True
        ctx.log.warning("signal %d: stopping at the next safe point", signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, handler)


def _stage_logger(name: str) -> logging.Logger:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    return logging.getLogger(f"stages.{name}")


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
