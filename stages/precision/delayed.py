"""Delayed scaling's state (Transformer Engine's DelayedScaling): amax histories.

A tensor is scaled by an amax from earlier optimizer steps (the max of its history, or the
newest entry), so its cast needs no pass over it first; the amax it actually has is recorded
for later steps. Used by the emulated backend (fake quant, amax from torch) and the scaled_mm
backend (FP8 GEMMs, amax recorded by the cast kernel itself), so both scale alike.

The histories of one model live as rows of one tensor (`AmaxBank`, as TE keeps one amax buffer
per recipe): a step's roll is a few launches for all of them, and a quantized tensor reads its
scaling amax and raises its step's amax through views of that tensor, with no launch of its own
(one launch per history per step added up to tens of ms of host time on an H200 step).

Plain objects, not nn.Modules: FSDP2 shards parameters only, and this state is per-rank
bookkeeping (`roll_all` max-reduces the step's amaxes across ranks first).
"""

from __future__ import annotations

from typing import Any

import torch

from stages.precision.errors import PrecisionUnavailable


class AmaxBank:
    """Histories of one length and algorithm, as rows of one [rows, length] tensor (newest first)."""

    def __init__(self, length: int, algo: str) -> None:
        self.length, self.algo = length, algo
        self.device: torch.device | None = None  # tensors are made on first use, where it is
        self.history = self.pending = self.scaling = torch.empty(0)
        self._pending_rows: list[torch.Tensor] = []  # one 0-dim view per row, made once
        self._scaling_rows: list[torch.Tensor] = []
        self.recorded: list[int] = []  # steps recorded, per row
        self.used: set[int] = set()  # rows that saw a tensor during this step
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}

    def add(self) -> int:
        if self.device is not None:
            raise RuntimeError("an amax bank takes its rows before its first use")
        self.recorded.append(0)
        return len(self.recorded) - 1

    def on(self, device: torch.device) -> None:
        """Make (or move) the tensors on `device`."""
        if self.device == device:
            return
        if self.device is None:
            rows = len(self.recorded)
            self.history = torch.zeros(rows, self.length, device=device)
            self.pending = torch.zeros(rows, device=device)
            self.scaling = torch.zeros(rows, device=device)
        else:
            self.history, self.pending, self.scaling = (t.to(device) for t in (self.history, self.pending, self.scaling))
        self.device = device
        self._pending_rows = list(self.pending.unbind())
        self._scaling_rows = list(self.scaling.unbind())
        self._indices.clear()

    def roll(self, rows: set[int]) -> None:
        """End of an optimizer step for these rows: each that saw a tensor pushes its amax."""
        used = tuple(sorted(rows & self.used))
        if not used:
            return
        if len(used) == len(self.recorded):
            self.history.copy_(torch.cat([self.pending[:, None], self.history[:, :-1]], dim=1))
            self.pending.zero_()
        else:
            index = self._indices.get(used)
            if index is None:
                index = self._indices[used] = torch.tensor(used, device=self.device)
            self.history[index] = torch.cat([self.pending[index, None], self.history[index, :-1]], dim=1)
            self.pending[index] = 0.0
        self._update_scaling()
        for row in used:
            self.recorded[row] += 1
        self.used -= set(used)

    def _update_scaling(self) -> None:
        self.scaling.copy_(self.history[:, 0] if self.algo == "most_recent" else self.history.amax(dim=1))


class AmaxHistory:
    """One tensor's history: a row of a bank (its own bank when none is given)."""

    def __init__(self, length: int, algo: str, bank: AmaxBank | None = None) -> None:
        self.bank = bank if bank is not None else AmaxBank(length, algo)
        if (self.bank.length, self.bank.algo) != (length, algo):
            raise ValueError(f"amax bank of length {self.bank.length} ({self.bank.algo}) for a history of {length} ({algo})")
        self.row = self.bank.add()

    @property
    def steps_recorded(self) -> int:
        return self.bank.recorded[self.row]

    @property
    def history(self) -> torch.Tensor | None:
        """[length], newest first; None until a step has been recorded."""
        return self.bank.history[self.row] if self.steps_recorded else None

    def scaling_amax(self, device: torch.device) -> torch.Tensor | None:
        """The amax this step scales with. None until a step has been recorded: the caller then
        scales from the current amax, not from TE's initial scale of 1.0, which would saturate or
        underflow most tensors on step 0."""
        if not self.bank.recorded[self.row]:
            return None
        self.bank.on(device)
        return self.bank._scaling_rows[self.row]

    def record(self, amax_now: torch.Tensor) -> None:
        """Take max |x| of one quantized tensor into this step's amax."""
        pending = self.pending_buffer(amax_now.device)
        torch.maximum(pending, amax_now, out=pending)

    def pending_buffer(self, device: torch.device) -> torch.Tensor:
        """This step's amax as a 0-dim fp32 view for a kernel to raise in place (an atomic max on
        its bits: |x|'s bits order as its values), 0 until a tensor is recorded into it."""
        self.bank.on(device)
        self.bank.used.add(self.row)
        return self.bank._pending_rows[self.row]

    def roll(self) -> None:
        """End of an optimizer step: push this step's amax into the history (nothing seen: no change)."""
        self.bank.roll({self.row})

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to scale as the uninterrupted one."""
        history = self.history
        return {"history": None if history is None else history.detach().cpu().clone(), "steps_recorded": self.steps_recorded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state["history"]
        length = self.bank.length
        if history is not None and history.shape != (length,):
            raise ValueError(f"amax history of {tuple(history.shape)} values, recipe has amax_history_len {length}")
        bank = self.bank
        bank.on(bank.device or (history.device if history is not None else torch.device("cpu")))
        bank.history[self.row] = 0.0 if history is None else history.to(bank.device)
        bank.pending[self.row] = 0.0
        bank.used.discard(self.row)
        bank.recorded[self.row] = int(state["steps_recorded"]) if history is not None else 0
        bank._update_scaling()


def banks_for(length: int, algo: str, banks: dict[tuple[int, str], AmaxBank]) -> AmaxBank:
    """The bank of `banks` for histories of this length and algorithm (made on first ask)."""
    return banks.setdefault((length, algo), AmaxBank(length, algo))


def roll_all(histories: list[AmaxHistory]) -> None:
    """End of an optimizer step for these histories, a few launches per bank. Under
    torch.distributed each bank's step amaxes are max-reduced first (one collective per bank),
    so every rank scales with the same history, as TE does."""
    import torch.distributed as dist

    by_bank: dict[int, tuple[AmaxBank, set[int]]] = {}
    for history in histories:
        by_bank.setdefault(id(history.bank), (history.bank, set()))[1].add(history.row)
    for bank, rows in by_bank.values():
        if not rows & bank.used:
            continue
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bank.pending, op=dist.ReduceOp.MAX)
        bank.roll(rows)


def histories_state(histories: dict[str, AmaxHistory]) -> dict[str, dict[str, Any]]:
    """What a checkpoint keeps: each history's state, by its key (`<linear name>/<role>`)."""
    return {key: history.state_dict() for key, history in histories.items()}


def load_histories_state(histories: dict[str, AmaxHistory], state: dict[str, dict[str, Any]]) -> None:
    """PrecisionUnavailable naming the keys or the history when a checkpoint's state does not fit."""
    if set(state) != set(histories):
        missing, unknown = sorted(set(histories) - set(state)), sorted(set(state) - set(histories))
        raise PrecisionUnavailable(
            f"checkpoint's delayed-scaling state does not fit the recipe (missing {missing[:3]}, unknown {unknown[:3]})"
        )
    for key, history in histories.items():
        try:
            history.load_state_dict(state[key])
        except ValueError as error:
            raise PrecisionUnavailable(f"checkpoint's delayed-scaling state for {key}: {error}") from None
