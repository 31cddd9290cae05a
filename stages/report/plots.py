"""Study plots: training loss curves overlaid, step-time bars, val loss vs step time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from stages.report.table import StudyRow  # noqa: E402


def draw_plots(rows: list[StudyRow], curves: dict[str, list[dict[str, Any]]], out_dir: Path,
               baseline: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = [row for row in rows if row.phase == "trained"]
    return [
        _loss_curves(curves, out_dir / "loss_curves.png"),
        _step_time_bars(trained, out_dir / "step_time.png", baseline),
        _loss_vs_time(trained, out_dir / "val_loss_vs_step_time.png"),
    ]


def _save(figure: plt.Figure, path: Path) -> Path:
    tmp = path.with_suffix(".tmp.png")
    figure.tight_layout()
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)
    return path


def _loss_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    figure, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run, rows in sorted(curves.items()):
        steps = [r["step"] for r in rows if "loss" in r]
        train_ax.plot(steps, [r["loss"] for r in rows if "loss" in r], label=run)
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if val:
            val_ax.plot(*zip(*val), marker="o", label=run)
    train_ax.set(title="training loss", xlabel="step", ylabel="loss")
    val_ax.set(title="validation loss (training precision)", xlabel="step", ylabel="loss")
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(figure, path)


def _step_time_bars(rows: list[StudyRow], path: Path, baseline: str) -> Path:
    figure, ax = plt.subplots(figsize=(7, 4))
    timed = [row for row in rows if row.step_time_s is not None]
    colors = ["tab:gray" if row.run == baseline else "tab:blue" for row in timed]
    bars = ax.bar([row.run for row in timed], [row.step_time_s for row in timed], color=colors)
    for bar, row in zip(bars, timed):
        if row.step_time_vs_baseline is not None:
            ax.annotate(f"{row.step_time_vs_baseline:.2f}x", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set(title=f"step time (ratio to {baseline})", ylabel="seconds per step")
    ax.tick_params(axis="x", rotation=30)
    return _save(figure, path)


def _loss_vs_time(rows: list[StudyRow], path: Path) -> Path:
    figure, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row.step_time_s is not None and row.val_loss is not None:
            ax.scatter(row.step_time_s, row.val_loss)
            ax.annotate(row.run, (row.step_time_s, row.val_loss), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.set(title="val loss (deployed) vs step time", xlabel="seconds per step", ylabel="val loss")
    ax.grid(alpha=0.3)
    return _save(figure, path)
