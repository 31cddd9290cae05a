"""Resumable training checkpoints: `<stage>/checkpoints/step-N/`, written atomically.

Model and optimizer go through torch.distributed.checkpoint (DCP) for 1 and N processes
alike: DCP saves each rank's shards under fully-qualified names, so one format serves
single-process runs and FSDP2 runs, and a run may resume on a different world size.
Beside it: `train_state.pt` (step, scheduler, rank 0) and per rank `rng-R.pt` and
`quantizer-R.pt` (the PreparedModel's own state, when it has any outside the model's
buffers). Everything is written into `.step-N.tmp/` and renamed when complete, so a kill
mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from stages.train.distributed import World, barrier

CHECKPOINTS_DIR = "checkpoints"
TRAIN_STATE_FILE = "train_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """What a checkpoint restores besides model and optimizer."""

    step: int  # optimizer steps completed; also the data position (see batches.py)
    scheduler: dict[str, Any]


def checkpoint_dirs(stage_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(stage_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / TRAIN_STATE_FILE).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(stage_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(stage_dir)
    return dirs[-1] if dirs else None


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


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> tuple[TrainState, dict[str, Any] | None]:
    """Restore model, optimizer and this rank's RNG; returns the train state and quantizer state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_path = path / f"rng-{world.rank}.pt"
    if rng_path.exists():  # absent when resuming on more ranks than saved: fresh RNG there
        _set_rng_state(torch.load(rng_path, weights_only=False))
    quantizer_path = path / f"quantizer-{world.rank}.pt"
    if not quantizer_path.exists():
        quantizer_path = path / "quantizer-0.pt"
    quantizer = torch.load(quantizer_path, weights_only=False) if quantizer_path.exists() else None
    train = torch.load(path / TRAIN_STATE_FILE, weights_only=False)
    return TrainState(step=int(train["step"]), scheduler=train["scheduler"]), quantizer


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
