"""The study table as text: markdown (the report, the parent run's description) and CSV.

Each estimate is written with its interval and sample size, and with as many digits as its
interval needs to show differences (two significant digits of the interval's half-width);
val loss keeps five decimals, as the seed's table. A difference whose interval contains none is
marked "within noise"; a step-time ratio from a run that shared its device is marked "not
comparable".
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass

from stages.report.rows import Study, StudyRow

LOSS_DECIMALS = 5
WITHIN_NOISE = "within noise"
NOT_COMPARABLE = "not comparable"


@dataclass(frozen=True)
class Column:
    header: str
    cells: list[str]


def decimals_for(low: float | None, high: float | None, at_least: int = 0, at_most: int = 6) -> int:
    """Decimals that show two significant digits of an interval's half-width."""
    if low is None or high is None or not math.isfinite(high - low):
        return at_least
    half = (high - low) / 2
    if half <= 1e-9 * max(1.0, abs(low + high) / 2):  # no spread (float noise only)
        return at_least
    return max(at_least, min(at_most, 1 - math.floor(math.log10(half))))


def _num(value: float, decimals: int, sign: bool = False) -> str:
    text = f"{value:+.{decimals}f}" if sign else f"{value:.{decimals}f}"
    return text.replace("-", "\u2212")  # a real minus sign: as wide as the plus


def _interval(low: float | None, high: float | None, decimals: int, sign: bool = False) -> str:
    if low is None or high is None:
        return ""
    return f" [{_num(low, decimals, sign)}, {_num(high, decimals, sign)}]"


def step_time_cell(row: StudyRow) -> str:
    if row.step_time_s is None:
        return "-"
    d = decimals_for(row.step_time_low, row.step_time_high, at_least=2)
    return f"{_num(row.step_time_s, d)}{_interval(row.step_time_low, row.step_time_high, d)} (n={row.step_time_steps})"


def step_ratio_cell(row: StudyRow, baseline: str) -> str:
    if row.step_time_vs_baseline is None:
        return "-"
    if row.run == baseline and row.phase == "trained":
        return "1 (baseline)"
    d = decimals_for(row.step_time_vs_baseline_low, row.step_time_vs_baseline_high, at_least=2)
    text = f"{_num(row.step_time_vs_baseline, d)}x{_interval(row.step_time_vs_baseline_low, row.step_time_vs_baseline_high, d)}"
    if row.step_time_vs_baseline_low is not None and row.step_time_vs_baseline_low <= 1.0 <= row.step_time_vs_baseline_high:
        text += f" {WITHIN_NOISE}"
    if not row.step_time_comparable:
        text += f", {NOT_COMPARABLE}"
    return text


def timing_cell(row: StudyRow) -> str:
    if not row.timing:
        return "-"
    return row.timing if row.timing == "exclusive" else f"{row.timing}: {row.timing_note}"


def val_loss_cell(row: StudyRow, with_n: bool) -> str:
    if row.val_loss is None:
        return "-"
    d = decimals_for(row.val_loss_low, row.val_loss_high)
    text = f"{row.val_loss:.{LOSS_DECIMALS}f}{_interval(row.val_loss_low, row.val_loss_high, d)}"
    if with_n:
        text += f" ({_sample_size(row)})"
    return text


def pct_cell(pct: float | None, low: float | None, high: float | None) -> str:
    if pct is None:
        return "-"
    d = decimals_for(low, high, at_least=1)
    text = f"{_num(pct, d, sign=True)}{_interval(low, high, d, sign=True)}"
    if low is not None and low <= 0.0 <= high:
        text += f" {WITHIN_NOISE}"
    return text


def val_diff_cell(row: StudyRow, baseline: str) -> str:
    if row.run == baseline and row.phase == "trained" and row.val_loss is not None:
        return "0 (baseline)"
    return pct_cell(row.val_loss_vs_baseline_pct, row.val_loss_vs_baseline_pct_low, row.val_loss_vs_baseline_pct_high)


def accuracy_cell(row: StudyRow, task: str) -> str:
    accuracy = row.accuracy.get(task)
    if accuracy is None:
        return "-"
    if accuracy.n is None:
        return f"{accuracy.value:.3f} (n unknown)"
    return f"{accuracy.value:.3f}{_interval(accuracy.low, accuracy.high, 3)} ({accuracy.correct}/{accuracy.n})"


def _sample_size(row: StudyRow) -> str:
    if row.val_sequences is None:
        return f"{row.val_tokens} tokens"
    return f"{row.val_tokens} tokens, {row.val_sequences} seqs"


def accuracy_tasks(rows: list[StudyRow]) -> list[str]:
    return sorted({task for row in rows for task in row.accuracy})


def columns(study: Study) -> list[Column]:
    """The table's columns, headers carrying units, levels and sample sizes shared by all rows."""
    rows, base, level = study.rows, study.baseline, f"{round(study.level * 100)}% CI"
    sizes = {_sample_size(row) for row in rows if row.val_loss is not None}
    loss_n = f"; {sizes.pop()}" if len(sizes) == 1 else ""
    cols = [
        Column("run", [row.run for row in rows]),
        Column("phase", [row.phase for row in rows]),
        Column("recipe", [row.recipe or "-" for row in rows]),
        Column("backend", [row.backend or "-" for row in rows]),
        Column("inference", [row.inference_format or "-" for row in rows]),
        Column(f"step time, s: mean [{level}] (n steps)", [step_time_cell(row) for row in rows]),
        Column(f"step time vs {base} [{level}]", [step_ratio_cell(row, base) for row in rows]),
        Column("device during timed steps", [timing_cell(row) for row in rows]),
        Column(f"val loss deployed, nats/token [{level}{loss_n}]", [val_loss_cell(row, not loss_n) for row in rows]),
        Column(f"val loss vs {base}, % [{level}, paired]", [val_diff_cell(row, base) for row in rows]),
    ]
    for task in accuracy_tasks(rows):
        cols.append(Column(f"acc {task} [{level} Wilson] (correct/n)", [accuracy_cell(row, task) for row in rows]))
    return cols


def notes(study: Study) -> list[str]:
    level = f"{round(study.level * 100)}%"
    return [
        (f"val loss: mean next-token cross entropy (nats/token) of the exported model in its inference "
         f"format on the held-out split; {level} interval: percentile bootstrap over validation sequences"),
        (f"val loss vs {study.baseline}: 100 x (val loss / {study.baseline}'s - 1), the interval a paired "
         f"bootstrap over the same sequences; '{WITHIN_NOISE}': the interval contains 0 (no difference is ruled out)"),
        (f"step time: mean seconds per optimizer step after the warm-up steps, {level} bootstrap interval "
         f"over steps; the ratio to {study.baseline} resamples both runs' steps"),
        (f"'{NOT_COMPARABLE}': this run or {study.baseline} shared its GPU or CPU cores with another stage "
         "during its timed steps (or nobody recorded it); set `report.timing: isolated` to run train stages alone"),
        ("'exclusive': no other stage of the study ran on the run's GPUs or CPU cores during its timed steps, by "
         "the local driver's record or the scheduler's allocation; processes outside the pipeline are not recorded"),
        f"accuracy: lm-eval multiple choice, {level} Wilson interval, correct/n questions",
        "val loss in training precision (the last validation of each run) is in report.csv and the loss curves",
        *study.notes,
    ]


def differences_markdown(study: Study) -> list[str]:
    if not study.differences:
        return []
    lines = ["", "Paired differences in val loss (deployed), same validation sequences:", ""]
    for diff in study.differences:
        lines.append(f"- {diff.label}, %: {pct_cell(diff.pct, diff.low, diff.high)}")
    return lines


def to_markdown(study: Study, title: str, description: str = "") -> str:
    cols = columns(study)
    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += ["| " + " | ".join(col.header for col in cols) + " |", "|" + "---|" * len(cols)]
    for i in range(len(study.rows)):
        lines.append("| " + " | ".join(col.cells[i] for col in cols) + " |")
    lines += differences_markdown(study)
    lines += [""] + [f"- {note}" for note in notes(study)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = [name for name in StudyRow.__dataclass_fields__ if name != "accuracy"]


def to_csv(study: Study) -> str:
    """Every field at full precision, one row per (run, phase)."""
    tasks = accuracy_tasks(study.rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_FIELDS + [f"accuracy_{task}{suffix}" for task in tasks
                                  for suffix in ("", "_low", "_high", "_n")])
    for row in study.rows:
        values = asdict(row)
        cells = ["" if values[name] is None else values[name] for name in CSV_FIELDS]
        for task in tasks:
            accuracy = row.accuracy.get(task)
            found = (accuracy.value, accuracy.low, accuracy.high, accuracy.n) if accuracy else (None,) * 4
            cells += ["" if value is None else value for value in found]
        writer.writerow(cells)
    return buffer.getvalue()
