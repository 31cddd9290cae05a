"""Step metrics: MFU, the per-step `metrics.jsonl`, and progress output."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

METRICS_FILE = "metrics.jsonl"

# Dense BF16 tensor-core peak per GPU (FLOP/s), matched by substring of the device name.
# H200 has the H100 SXM compute die; B200's figure is NVIDIA's dense (non-sparse) BF16.
PEAK_BF16_FLOPS: dict[str, float] = {"H100": 989e12, "H200": 989e12, "B200": 2.25e15}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense BF16 FLOP/s of one device, or None when unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def trainable_flop_params(model: nn.Module) -> int:
    """Parameters counted by the 6*N*tokens rule: all but the input embedding (a lookup)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def mfu(n_params: int, tokens: int, step_time_s: float, peak: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation: 6*N*tokens of the global batch over the peak of all devices."""
    if peak is None or step_time_s <= 0:
        return None
    return 6.0 * n_params * tokens / (peak * world_size * step_time_s)


class MetricsFile:
    """`metrics.jsonl`: one JSON line per step. On resume, lines past the checkpoint are dropped
    so the file shows one continuous curve."""

    def __init__(self, stage_dir: Path, resume_step: int) -> None:
        self.path = Path(stage_dir) / METRICS_FILE
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar (loss, tokens/s, ETA) on a TTY, plain log lines every `log_every` otherwise."""

    def __init__(self, total: int, start: int, log_every: int, log: Any, enabled: bool) -> None:
        self.log = log
        self.log_every = log_every
        self.total = total
        self.enabled = enabled
        self.started = time.monotonic()
        self.start = start
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            self.bar.update(1)
            return
        if step % self.log_every == 0 or step == self.total:
            done = step - self.start
            eta = (time.monotonic() - self.started) / max(done, 1) * (self.total - step)
            self.log.info(
                "step %d/%d loss %.4f tokens/s %.0f eta %.0fs", step, self.total, loss, tokens_per_s, eta
            )

    def note(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
