"""Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr, or constant."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, steps: int, schedule: str) -> float:
    """Learning rate used by optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(1, steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    raise ValueError(f"params.schedule: unknown schedule {schedule!r}; choose cosine, linear or constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int, steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor makes the optimizer's lr equal `lr_at(step)` (base lr = `lr`)."""

    def factor(step: int) -> float:
        return lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, steps=steps, schedule=schedule) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
