"""One optimizer step and one validation pass, identical for 1 and N processes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from contract.params.train import TrainStageParams
from stages.batches import (
    Batch,
    StepBatches,
    StepPlan,
    TokenSplit,
    TrainOrder,
    validation_batches,
)
from stages.hf_model import causal_lm_logits
from stages.losses import cross_entropy_sum, kl_sum
from stages.train.distributed import World, all_reduce_sum


@dataclass
class Session:
    """Everything a step needs; built once by core.py."""

    params: TrainStageParams
    world: World
    model: nn.Module
    prepared: Any  # stages.precision PreparedModel: .autocast(), .on_step(step)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train: TokenSplit
    val: TokenSplit
    order: TrainOrder
    plan: StepPlan
    teacher: nn.Module | None = None
    batches: StepBatches = field(init=False)

    def __post_init__(self) -> None:
        self.batches = StepBatches(self.train, self.order, self.plan, self.world.rank, self.world.device.type == "cuda")


@dataclass(frozen=True)
class StepResult:
    loss: float  # the objective, per label token of the global batch
    ce_loss: float
    kd_loss: float | None
    grad_norm: float
    lr: float
    tokens: int  # all tokens of the global batch (for throughput)
    label_tokens: int


def train_step(session: Session, step: int) -> StepResult:
    """Optimizer step `step` (0-based): accumulate over this rank's micro-batches, clip, step.

    One host-device sync, at the end (the loss and the gradient norm are read once the optimizer
    step is queued); the next step's rows are read on the host while the GPU runs the backward."""
    s, world, device = session, session.world, session.world.device
    host_batches = s.batches.take(step)
    label_tokens, tokens = sum(b.label_tokens for b in host_batches), sum(b.input_ids.numel() for b in host_batches)
    if world.distributed:  # counted on the host from the host rows; summed over ranks
        counts = torch.tensor([label_tokens, tokens], dtype=torch.int64, device=device)
        label_tokens, tokens = (int(v) for v in all_reduce_sum(counts, world).tolist())
    batches = [b.to(device) for b in host_batches]
    # FSDP2 averages gradients over ranks; x world_size turns that into the sum over the global batch.
    scale = world.world_size / max(label_tokens, 1)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [ce, kd]
    kd_weight = s.params.qad.kd_weight if s.teacher is not None else 0.0
    for index, batch in enumerate(batches):
        if hasattr(s.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch
            s.model.set_requires_gradient_sync(index == len(batches) - 1)
        teacher_logits = _teacher_logits(s.teacher, batch) if s.teacher is not None else None
        with s.prepared.autocast():
            logits = causal_lm_logits(s.model, batch)
            ce = cross_entropy_sum(logits, batch.labels)
            objective = ce
            if teacher_logits is not None:
                kd = kl_sum(logits, teacher_logits, batch.labels, s.params.qad.temperature)
                objective = kd_weight * kd + (1 - kd_weight) * ce
                sums[1] += kd.detach().double()
            (objective * scale).backward()
        sums[0] += ce.detach().double()
    if step + 1 < s.params.steps:
        s.batches.prefetch(step + 1)
    grad_norm = _clip(s.model, s.params.grad_clip)
    lr = s.optimizer.param_groups[0]["lr"]
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.prepared.on_step(step + 1)  # steps done: QAT delay, delayed-scaling amax roll
    means = all_reduce_sum(sums, world) / max(label_tokens, 1)
    ce_loss, kd_loss, grad_norm = torch.cat([means, grad_norm.reshape(1).to(means)]).tolist()
    if s.teacher is None:
        return StepResult(ce_loss, ce_loss, None, grad_norm, lr, tokens, label_tokens)
    loss = kd_weight * kd_loss + (1 - kd_weight) * ce_loss
    return StepResult(loss, ce_loss, kd_loss, grad_norm, lr, tokens, label_tokens)


@torch.no_grad()
def validate(session: Session) -> float:
    """Token-weighted mean cross entropy on the val split (capped at val_batches per rank)."""
    s = session
    s.model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=s.world.device)  # [ce sum, label tokens]
    for batch in validation_batches(s.val, s.params.micro_batch, s.world.rank, s.world.world_size, s.params.val_batches):
        batch = batch.to(s.world.device)
        with s.prepared.autocast():
            sums[0] += cross_entropy_sum(causal_lm_logits(s.model, batch), batch.labels).double()
        sums[1] += batch.label_tokens
    s.model.train()
    total, count = all_reduce_sum(sums, s.world).tolist()
    return total / max(count, 1.0)


def calibration_loop(split: TokenSplit, order: TrainOrder, micro_batch: int, n_batches: int, device: torch.device) -> Callable[[nn.Module], None]:
    """A forward loop over the first n_batches global micro-batches: the same data on every rank,
    so calibrated quantizer state (amax) is identical across ranks."""

    def forward_loop(model: nn.Module) -> None:
        with torch.no_grad():
            for index in range(n_batches):
                rows = [order.row(i) for i in range(index * micro_batch, (index + 1) * micro_batch)]
                causal_lm_logits(model, split.rows(rows).to(device))

    return forward_loop


def _teacher_logits(teacher: nn.Module, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return causal_lm_logits(teacher, batch)


def _clip(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm (DTensor-aware under FSDP2); returns the norm before clipping,
    as a tensor on the device (read with the step's loss: no sync of its own)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm

