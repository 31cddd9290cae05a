"""Study plots: loss curves, step-time bars, val loss against step time.

- Loss curves: every run's training cross entropy on one axis (a QAD run's `ce_loss`: its
  `loss` is the distillation mix), validation cross entropy beside it, and the KL loss of QAD
  runs on a panel of its own (a different quantity, two orders of magnitude smaller).
- Units on every axis; legends sit outside the axes, so they cover no data; one colour per run
  across all panels.
- Intervals as error bars; step times measured while a device was shared are drawn hatched
  and labelled not comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from stages.report.rows import Study, StudyRow  # noqa: E402

CE_UNITS = "cross entropy (nats/token)"
PLOT_FILES = ("loss_curves.png", "step_time.png", "val_loss_vs_step_time.png")


def draw_plots(study: Study, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = colours_for(sorted({row.run for row in study.rows} | set(study.curves)))
    trained = [row for row in study.rows if row.phase == "trained"]
    figures = (loss_curves_figure(study.curves, colours), step_time_figure(trained, study.baseline, colours),
               loss_vs_time_figure(trained, colours))
    return [_save(figure, out_dir / name) for figure, name in zip(figures, PLOT_FILES)]


def colours_for(runs: list[str]) -> dict[str, Any]:
    palette = plt.get_cmap("tab10").colors
    return {run: palette[i % len(palette)] for i, run in enumerate(runs)}


def _save(figure: plt.Figure, path: Path) -> Path:
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=110, bbox_inches="tight")  # keeps the outside legends in the picture
    plt.close(figure)
    tmp.replace(path)
    return path


def training_ce(row: dict[str, Any]) -> float | None:
    """The cross entropy of a training step: `ce_loss` where the loss mixes in distillation."""
    return row.get("ce_loss", row.get("loss"))


def loss_curves_figure(curves: dict[str, list[dict[str, Any]]], colours: dict[str, Any]) -> plt.Figure:
    distilled = {run: rows for run, rows in curves.items() if any("kd_loss" in r for r in rows)}
    panels = 3 if distilled else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    train_ax, val_ax = axes[0], axes[1]
    for run, rows in sorted(curves.items()):
        points = [(r["step"], training_ce(r)) for r in rows if training_ce(r) is not None]
        if points:
            train_ax.plot(*zip(*points), color=colours[run], label=run)
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if val:
            val_ax.plot(*zip(*val), marker="o", color=colours[run], label=run)
    train_ax.set(title="training cross entropy (QAD: its CE term)", xlabel="optimizer step", ylabel=CE_UNITS)
    val_ax.set(title="validation, training precision", xlabel="optimizer step", ylabel=CE_UNITS)
    if distilled:
        kl_ax = axes[2]
        for run, rows in sorted(distilled.items()):
            kl = [(r["step"], r["kd_loss"]) for r in rows if r.get("kd_loss") is not None]
            kl_ax.plot(*zip(*kl), color=colours[run], label=run)
        kl_ax.set(title="QAD: distillation loss", xlabel="optimizer step",
                  ylabel="KL(teacher || student) x T^2 (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = train_ax.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      ncol=min(len(labels), 7), frameon=False, title="run")
    figure.tight_layout()
    return figure


def step_time_figure(rows: list[StudyRow], baseline: str, colours: dict[str, Any]) -> plt.Figure:
    figure, ax = plt.subplots(figsize=(8, 4.5))
    timed = [row for row in rows if row.step_time_s is not None]
    for i, row in enumerate(timed):
        comparable = bool(row.step_time_comparable)  # the baseline's: whether it ran alone
        errors = None
        if row.step_time_low is not None:
            errors = [[row.step_time_s - row.step_time_low], [row.step_time_high - row.step_time_s]]
        ax.bar(i, row.step_time_s, yerr=errors, capsize=4, color=colours[row.run],
               alpha=1.0 if comparable else 0.45, hatch=None if comparable else "//", edgecolor="black")
        label = "baseline" if row.run == baseline else f"{row.step_time_vs_baseline:.2f}x"
        if not comparable:
            label += "\nshared" if row.run == baseline else "\nnot comparable"
        ax.annotate(label, (i, row.step_time_high or row.step_time_s), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(range(len(timed)), [row.run for row in timed], rotation=30, ha="right")
    ax.set(title=f"step time (ratio to {baseline})", ylabel="seconds per optimizer step (mean, CI)")
    ax.margins(y=0.2)
    ax.legend(handles=[Patch(facecolor="white", edgecolor="black", label="device to itself"),
                       Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="device shared or unrecorded: not comparable")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure


def loss_vs_time_figure(rows: list[StudyRow], colours: dict[str, Any]) -> plt.Figure:
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row.step_time_s is None or row.val_loss is None:
            continue
        xerr = None if row.step_time_low is None else [[row.step_time_s - row.step_time_low], [row.step_time_high - row.step_time_s]]
        yerr = None if row.val_loss_low is None else [[row.val_loss - row.val_loss_low], [row.val_loss_high - row.val_loss]]
        ax.errorbar(row.step_time_s, row.val_loss, xerr=xerr, yerr=yerr, fmt="o", capsize=3,
                    color=colours[row.run], mfc=colours[row.run] if row.step_time_comparable else "white",
                    label=row.run + ("" if row.step_time_comparable else " (timing not comparable)"))
    ax.set(title="val loss (deployed) against step time", xlabel="seconds per optimizer step (mean, CI)",
           ylabel="val loss deployed, " + CE_UNITS)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    return figure
