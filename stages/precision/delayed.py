"""Delayed scaling's state for one quantized tensor (Transformer Engine's DelayedScaling).

A tensor is scaled by an amax from earlier optimizer steps (the max of the history, or its
newest entry), so its cast needs no pass over it first; the amax it actually has is recorded
for later steps. Used by the emulated backend (fake quant, amax from torch) and the scaled_mm
backend (FP8 GEMMs, amax recorded by the cast kernel itself), so both scale alike.

A plain object, not an nn.Module: FSDP2 shards parameters only, and this state is per-rank
bookkeeping (the backends max-reduce `pending_amax` across ranks before `roll`).
"""

from __future__ import annotations

from typing import Any

import torch


class AmaxHistory:
    def __init__(self, length: int, algo: str) -> None:
        self.length, self.algo = length, algo
        self.history: torch.Tensor | None = None  # [length], newest first
        self.steps_recorded = 0
        self.pending_amax: torch.Tensor | None = None  # max |x| seen during this optimizer step
        self._scaling: torch.Tensor | None = None  # from the history: fixed for a whole step

    def scaling_amax(self, device: torch.device) -> torch.Tensor | None:
        """The amax this step scales with. None until a step has been recorded: the caller then
        scales from the current amax, not from TE's initial scale of 1.0, which would saturate or
        underflow most tensors on step 0."""
        if self.history is None or self.steps_recorded == 0:
            return None
        if self._scaling is None or self._scaling.device != device:
            if self.history.device != device:  # restored from a checkpoint on the CPU
                self.history = self.history.to(device)
            self._scaling = self.history[0] if self.algo == "most_recent" else self.history.max()
        return self._scaling

    def record(self, amax_now: torch.Tensor) -> None:
        """Take max |x| of one quantized tensor into this step's amax."""
        self.pending_amax = amax_now if self.pending_amax is None else torch.maximum(self.pending_amax, amax_now)

    def pending_buffer(self, device: torch.device) -> torch.Tensor:
        """This step's amax as a 0-dim fp32 tensor for a kernel to raise in place (an atomic max
        on its bits: |x|'s bits order as its values), 0 until a tensor is recorded into it."""
        if self.pending_amax is None:
            self.pending_amax = torch.zeros((), dtype=torch.float32, device=device)
        return self.pending_amax

    def roll(self) -> None:
        """End of an optimizer step: push this step's amax into the history (nothing seen: no change)."""
        if self.pending_amax is None:
            return
        if self.history is None:
            self.history = torch.zeros(self.length, device=self.pending_amax.device)
        self.history = torch.roll(self.history, 1)
        self.history[0] = self.pending_amax
        self.steps_recorded += 1
        self.pending_amax = None
        self._scaling = None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to scale as the uninterrupted one."""
        history = None if self.history is None else self.history.detach().cpu()
        return {"history": history, "steps_recorded": self.steps_recorded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state["history"]
        if history is not None and history.shape != (self.length,):
            raise ValueError(f"amax history of {tuple(history.shape)} values, recipe has amax_history_len {self.length}")
        self.history, self.steps_recorded = history, int(state["steps_recorded"])
        self.pending_amax = self._scaling = None


def roll_all(histories: list[AmaxHistory]) -> None:
    """End of an optimizer step for every delayed-scaled tensor. Under torch.distributed the
    step's amaxes are max-reduced first (one collective for all), so every rank scales with the
    same history, as TE does."""
    import torch.distributed as dist

    pending = [h for h in histories if h.pending_amax is not None]
    if pending and dist.is_available() and dist.is_initialized():
        stacked = torch.stack([h.pending_amax for h in pending])
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
        for history, amax in zip(pending, stacked, strict=True):
            history.pending_amax = amax
    for history in pending:
        history.roll()


def histories_state(histories: dict[str, AmaxHistory]) -> dict[str, dict[str, Any]]:
    """What a checkpoint keeps: each history's state, by its key (`<linear name>/<role>`)."""
    return {key: history.state_dict() for key, history in histories.items()}


def load_histories_state(histories: dict[str, AmaxHistory], state: dict[str, dict[str, Any]]) -> None:
    """ValueError naming the keys or the history when a checkpoint's state does not fit."""
    if set(state) != set(histories):
        missing, unknown = sorted(set(histories) - set(state)), sorted(set(state) - set(histories))
        raise ValueError(
            f"checkpoint's delayed-scaling state does not fit the recipe (missing {missing[:3]}, unknown {unknown[:3]})"
        )
    for key, history in histories.items():
        try:
            history.load_state_dict(state[key])
        except ValueError as error:
            raise ValueError(f"checkpoint's delayed-scaling state for {key}: {error}") from None
