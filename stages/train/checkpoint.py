"""Resumable training checkpoints: `<stage>/checkpoints/step-N/`, written atomically.

Model and optimizer go through torch.distributed.checkpoint (DCP) for 1 and N processes
alike: DCP saves each rank's shards under fully-qualified names, so one format serves
single-process runs and FSDP2 runs, and a run may resume on a different world size.
Beside it: `train_state.pt` (step, scheduler, rank 0) and per rank `rng-R.pt` and
`quantizer-R.pt` (the PreparedModel's own state, when it has any outside the model's
buffers). Everything is written into `.step-N.tmp/` and renamed when complete, so a kill
mid-save leaves the previous checkpoint as the latest.

A checkpoint can still break after it was written (a disk filled, a file cut or deleted by
hand). Resume takes the newest checkpoint that loads completely: before anything is loaded
into the model, each file DCP's index names must be there and as long as the index says, and
the small files must unpickle; a broken one is named in one line, moved aside to
`checkpoints/.broken-step-N-<time>/` (never deleted: it may be worth a look), and the one
before it is tried.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from stages.train.distributed import World, any_rank, barrier

CHECKPOINTS_DIR = "checkpoints"
TRAIN_STATE_FILE = "train_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """What a checkpoint restores besides model and optimizer."""

    step: int  # optimizer steps completed; also the data position (see batches.py)
    scheduler: dict[str, Any]


def checkpoint_dirs(stage_dir: Path) -> list[Path]:
    """Checkpoints, oldest first: every `step-N` (a save in progress is `.step-N.tmp`, and a
    `step-N` without its train state lost it after the save: resume names it broken)."""
    root = Path(stage_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(
    stage_dir: Path,
    state: TrainState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World,
    quantizer_state: dict[str, Any] | None,
    keep: int,
) -> Path:
    root = Path(stage_dir) / CHECKPOINTS_DIR
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-{world.rank}.pt")
    if quantizer_state is not None:
        torch.save(quantizer_state, tmp / f"quantizer-{world.rank}.pt")
    barrier(world)
    if world.is_main:
        # Written last: its presence is what makes the directory a complete checkpoint.
        torch.save({"step": state.step, "scheduler": state.scheduler}, tmp / TRAIN_STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(stage_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


class BrokenCheckpoint(Exception):
    """A checkpoint that cannot load completely; the message says which file and why."""


@dataclass
class Resumed:
    path: Path
    state: TrainState
    quantizer_state: dict[str, Any] | None


def resume_newest(
    stage_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World, log: logging.Logger
) -> Resumed | None:
    """Load the newest checkpoint that loads completely into model and optimizer (and this
    rank's RNG); set broken ones aside on the way. None: no checkpoint, start at step 0."""
    touched = None  # a checkpoint that failed inside DCP's load: the model may hold part of it
    for path in reversed(checkpoint_dirs(stage_dir)):
        try:
            side = _read_side_files(path, world)
            problem = None
        except BrokenCheckpoint as error:
            problem = str(error)
        if any_rank(problem is not None, world):  # every rank takes the same checkpoint
            _set_aside(path, problem or "broken on another rank", world, log)
            continue
        try:
            state, quantizer = load_checkpoint(path, model, optimizer, world, side)
        except Exception as error:  # the index looked whole but the bytes did not load
            touched = path
            _set_aside(path, f"{type(error).__name__}: {_first_line(error)}", world, log)
            continue
        return Resumed(path, state, quantizer)
    if touched is not None:
        raise BrokenCheckpoint(
            f"checkpoint {touched} failed while loading into the model and no older one loads; it was "
            "moved aside: run the stage again to start from step 0"
        )
    return None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World,
    side: dict[str, Any] | None = None,
) -> tuple[TrainState, dict[str, Any] | None]:
    """Restore model, optimizer and this rank's RNG; returns the train state and quantizer state."""
    side = side if side is not None else _read_side_files(path, world)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if side["rng"] is not None:  # absent when resuming on more ranks than saved: fresh RNG there
        _set_rng_state(side["rng"])
    train = side["train"]
    return TrainState(step=int(train["step"]), scheduler=train["scheduler"]), side["quantizer"]


def verify_checkpoint(path: Path) -> None:
    """Raise BrokenCheckpoint unless every file DCP's index names is there, whole.

    The index (`.metadata`) records each tensor's file, offset and length: a file that is
    missing or shorter than its last item is caught here, before the model is touched.
    """
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as error:
        raise BrokenCheckpoint(f".metadata: unreadable ({type(error).__name__}: {_first_line(error)})") from None
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(needed.items()):
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            raise BrokenCheckpoint(f"{name}: missing") from None
        if size < end:
            raise BrokenCheckpoint(f"{name}: {size} bytes, its index needs {end}")


def _read_side_files(path: Path, world: World) -> dict[str, Any]:
    """Check the DCP files and read the small ones (train state, this rank's RNG and
    quantizer state) before the model is touched."""
    verify_checkpoint(path)
    quantizer_path = path / f"quantizer-{world.rank}.pt"
    if not quantizer_path.exists():
        quantizer_path = path / "quantizer-0.pt"
    rng_path = path / f"rng-{world.rank}.pt"
    return {
        "train": _torch_load(path / TRAIN_STATE_FILE),
        "rng": _torch_load(rng_path) if rng_path.exists() else None,
        "quantizer": _torch_load(quantizer_path) if quantizer_path.exists() else None,
    }


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise BrokenCheckpoint(f"{path.name}: missing") from None
    except Exception as error:
        raise BrokenCheckpoint(f"{path.name}: {type(error).__name__}: {_first_line(error)}") from None


def _set_aside(path: Path, reason: str, world: World, log: logging.Logger) -> None:
    target = path.with_name(f".broken-{path.name}-{time.strftime('%Y%m%dT%H%M%S')}")
    barrier(world)
    if world.is_main:
        path.rename(target)
        log.warning("checkpoint %s is broken (%s); moved to %s, resuming from the one before", path, reason,
                    target.name)
    barrier(world)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
