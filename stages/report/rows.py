"""The study's rows: one per run and phase, each number with its sample size and interval.

Read from the stage folders (the source of truth, readable during an MLflow outage):
- train stages: `metrics.jsonl` (step times, losses, when each step ended) and the summary's
  `device_sharing` record (contract/device_sharing.py);
- eval stages: the summary (val loss, accuracy and its number of questions) and
  `val_sequences.json` (each validation sequence's loss sum and label tokens).
Intervals come from stages/report/stats.py; val-loss differences are paired over the same
validation sequences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.device_sharing import shared_during, steps_window
from contract.spec import MANIFEST_FILE
from stages.report import stats
from stages.runtime import StageInputError

METRICS_FILE = "metrics.jsonl"
SEQUENCES_FILE = "val_sequences.json"  # as stages.eval.core.SEQUENCES_FILE (the eval stage imports torch)
ACCURACY_PREFIX = "acc_"  # the eval stage's summary key of each lm-eval task's accuracy
QUESTIONS_PREFIX = "questions_"  # ... and of the number of questions it was measured on
PHASE_ORDER = {"base": 0, "ptq": 1, "trained": 2}


@dataclass
class Accuracy:
    value: float
    correct: int | None = None
    n: int | None = None
    low: float | None = None
    high: float | None = None


@dataclass
class StudyRow:
    run: str
    phase: str  # "base", "ptq", "trained"
    backend: str = ""
    recipe: str = ""
    inference_format: str = ""
    # Step time: the mean over the steps after the warm-up, its interval and how many steps.
    step_time_s: float | None = None
    step_time_low: float | None = None
    step_time_high: float | None = None
    step_time_steps: int | None = None
    step_time_vs_baseline: float | None = None
    step_time_vs_baseline_low: float | None = None
    step_time_vs_baseline_high: float | None = None
    # exclusive | shared | unknown: did the run have its device to itself during those steps?
    timing: str = ""
    timing_note: str = ""
    step_time_comparable: bool | None = None  # this run and the baseline both exclusive
    tokens_per_s: float | None = None
    # Val loss of the deployed model (nats/token) over val_tokens label tokens in val_sequences.
    val_loss: float | None = None
    val_loss_low: float | None = None
    val_loss_high: float | None = None
    val_tokens: int | None = None
    val_sequences: int | None = None
    # 100 * (val_loss / baseline's - 1), paired over the same sequences; None for the baseline.
    val_loss_vs_baseline_pct: float | None = None
    val_loss_vs_baseline_pct_low: float | None = None
    val_loss_vs_baseline_pct_high: float | None = None
    val_loss_within_noise: bool | None = None  # the interval contains 0
    train_val_loss: float | None = None  # last validation of training, in training precision
    accuracy: dict[str, Accuracy] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.run, self.phase)


@dataclass
class Samples:
    """What a row's intervals are computed from (kept out of the table's files)."""

    loss_sums: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    sequence_rows: list[int] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)


@dataclass
class PairedDifference:
    """100 * (val loss of `row` / val loss of `reference` - 1) over the same sequences."""

    label: str
    row: tuple[str, str]
    reference: tuple[str, str]
    pct: float
    low: float
    high: float

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high


@dataclass
class Study:
    rows: list[StudyRow]
    differences: list[PairedDifference]
    notes: list[str]
    baseline: str
    level: float
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run -> metrics.jsonl rows


@dataclass(frozen=True)
class Settings:
    baseline: str = "bf16"
    skip_first_steps: int = 2
    level: float = stats.LEVEL
    resamples: int = stats.RESAMPLES
    seed: int = stats.SEED


def read_summary(stage_dir: Path) -> dict[str, Any]:
    """The summary a stage's manifest holds; an upstream whose manifest is missing or not one
    is named in one line (the report reads what other stages wrote: it trusts no shape)."""
    path = stage_dir / MANIFEST_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))["summary"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StageInputError(f"inputs: {path}: not a stage manifest ({type(error).__name__}: "
                              f"{str(error)[:120]})") from None
    if not isinstance(summary, dict):
        raise StageInputError(f"inputs: {path}: its summary is not a mapping")
    return summary


def read_step_metrics(train_dir: Path) -> list[dict[str, Any]]:
    path = train_dir / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    try:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError(f"line {number} is not an object with a 'step'")
                rows.append(row)
    except (OSError, ValueError) as error:
        raise StageInputError(f"inputs: {path}: not step metrics ({str(error)[:120]})") from None
    return rows


def _number(value: Any) -> float | None:
    """A metric as a float; anything else (a string, a bool, a list) as missing."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def build_study(inputs: dict[str, Path], tags: dict[str, dict[str, str]], settings: Settings) -> Study:
    """`inputs`: role (= upstream stage name) -> stage dir; `tags`: role -> what the study graph
    knows of it (contract.params.ReportInput: run, phase, recipe, inference_format, backend)."""
    rows: dict[tuple[str, str], StudyRow] = {}
    samples: dict[tuple[str, str], Samples] = {}
    sharing: dict[tuple[str, str], tuple[dict[str, Any] | None, tuple[float, float] | None]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    notes: list[str] = []

    def row_for(run: str, phase: str, stage_tags: dict[str, str]) -> StudyRow:
        if (run, phase) not in rows:
            recipe = stage_tags.get("recipe", "")
            rows[(run, phase)] = StudyRow(run=run, phase=phase, backend=stage_tags.get("backend", ""),
                                          recipe=recipe, inference_format=stage_tags.get("inference_format", ""))
            samples[(run, phase)] = Samples()
        return rows[(run, phase)]

    for role, stage_dir in sorted(inputs.items()):
        stage_tags = tags.get(role, {})
        run = stage_tags.get("run", role)
        summary = read_summary(stage_dir)
        if role.startswith("train-"):
            row = row_for(run, "trained", stage_tags)
            metrics = read_step_metrics(stage_dir)
            curves[run] = metrics
            timed = [m for m in metrics if _number(m.get("step_time_s")) is not None]
            kept = [m for m in timed if m["step"] > settings.skip_first_steps]
            if timed and not kept:
                kept = timed
                notes.append(f"{role}: all {len(timed)} steps are within report.skip_first_steps "
                             f"({settings.skip_first_steps}): its step time includes the warm-up")
            samples[row.key].step_times = [m["step_time_s"] for m in kept]
            sharing[row.key] = (summary.get("device_sharing"), steps_window(kept))
            row.tokens_per_s = _number(summary.get("tokens_per_s"))
            row.train_val_loss = _number(summary.get("val_loss"))
            row.backend = str(summary.get("backend", row.backend))
        elif role.startswith("eval-"):
            phase = stage_tags.get("phase") or ("base" if role == "eval-base" else "trained")
            row = row_for(run, phase, stage_tags)
            row.val_loss = _number(summary.get("val_loss"))
            row.val_tokens = summary.get("val_tokens")
            # What eval deployed (e.g. int4-fake-quant where torchao had no int4 kernels), not only what the recipe says.
            row.inference_format = summary.get("precision") or row.inference_format
            row.accuracy = _accuracies(summary, settings.level)
            sequences = stage_dir / SEQUENCES_FILE
            if sequences.exists():
                sample = samples[row.key]
                sample.sequence_rows, sample.loss_sums, sample.tokens = _read_sequences(sequences)
                row.val_sequences = len(sample.sequence_rows)
            else:
                notes.append(f"{role} recorded no per-sequence losses ({SEQUENCES_FILE}): its val loss has no interval")

    ordered = sorted(rows.values(), key=lambda r: (PHASE_ORDER[r.phase], r.run))
    for row in ordered:
        _step_time(row, samples[row.key], settings)
        _val_loss(row, samples[row.key], settings)
    for key, (record, window) in sharing.items():
        rows[key].timing, rows[key].timing_note = _timing(record, window)
    baseline = rows.get((settings.baseline, "trained"))
    if baseline is None:
        notes.append(f"baseline run '{settings.baseline}' is not in this study: no comparisons to it")
    else:
        for row in ordered:
            _against_baseline(row, samples[row.key], baseline, samples[baseline.key], settings, notes)
    differences = _other_differences(rows, samples, settings, notes)
    return Study(ordered, differences, notes, settings.baseline, settings.level, curves)


def _read_sequences(path: Path) -> tuple[list[int], list[float], list[int]]:
    """(rows, loss sums, label tokens) of each validation sequence, of equal lengths."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        columns = record["rows"], record["loss_sum"], record["tokens"]
        if not all(isinstance(column, list) and len(column) == len(columns[0]) for column in columns):
            raise ValueError("rows, loss_sum and tokens are not lists of one length")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StageInputError(f"inputs: {path}: not per-sequence losses ({str(error)[:120]})") from None
    return columns


def _accuracies(summary: dict[str, Any], level: float) -> dict[str, Accuracy]:
    found: dict[str, Accuracy] = {}
    for key, value in summary.items():
        if not key.startswith(ACCURACY_PREFIX) or not isinstance(value, (int, float)):
            continue
        task = key.removeprefix(ACCURACY_PREFIX)
        n = summary.get(f"{QUESTIONS_PREFIX}{task}")
        if not isinstance(n, int) or n <= 0:
            found[task] = Accuracy(float(value))
            continue
        correct = round(value * n)  # accuracy is the mean of 0/1 scores: exactly correct / n
        interval = stats.wilson(correct, n, level)
        found[task] = Accuracy(float(value), correct, n, interval.low, interval.high)
    return found


def _step_time(row: StudyRow, sample: Samples, settings: Settings) -> None:
    if not sample.step_times:
        return
    row.step_time_s = sum(sample.step_times) / len(sample.step_times)
    row.step_time_steps = len(sample.step_times)
    if len(sample.step_times) > 1:
        interval = stats.bootstrap_mean(sample.step_times, settings.resamples, settings.seed, settings.level)
        row.step_time_low, row.step_time_high = interval.low, interval.high


def _val_loss(row: StudyRow, sample: Samples, settings: Settings) -> None:
    if not sample.loss_sums:
        return
    interval = stats.bootstrap_ratio_of_sums(sample.loss_sums, sample.tokens, settings.resamples,
                                             settings.seed, settings.level)
    row.val_loss_low, row.val_loss_high = interval.low, interval.high


def _timing(record: dict[str, Any] | None, window: tuple[float, float] | None) -> tuple[str, str]:
    """(exclusive | shared | unknown, why) for the steps the mean step time is taken over."""
    if not record:
        return "unknown", "no device-sharing record"
    overlaps = shared_during(record, window) if window else record.get("shared_with", [])
    if overlaps:
        by_device: dict[str, list[str]] = {}
        for entry in overlaps:
            by_device.setdefault(entry["on"], []).append(entry["stage"])
        return "shared", "; ".join(f"{on} with {', '.join(sorted(set(stages)))}" for on, stages in sorted(by_device.items()))
    if record.get("exclusive") is None:
        return "unknown", record.get("note", "")
    if record.get("shared_with"):  # shared, but only during the warm-up steps the mean leaves out
        return "exclusive", f"{record['source']}: no other stage during the timed steps (some during warm-up)"
    return "exclusive", f"{record['source']}: no other stage on {record['device']}"


def _against_baseline(row: StudyRow, sample: Samples, baseline: StudyRow, base: Samples,
                      settings: Settings, notes: list[str]) -> None:
    if sample.step_times and base.step_times:
        if row is baseline:
            row.step_time_vs_baseline = row.step_time_vs_baseline_low = row.step_time_vs_baseline_high = 1.0
        else:
            ratio, interval = stats.bootstrap_ratio_of_means(sample.step_times, base.step_times,
                                                             settings.resamples, settings.seed, settings.level)
            row.step_time_vs_baseline, row.step_time_vs_baseline_low, row.step_time_vs_baseline_high = ratio, interval.low, interval.high
        row.step_time_comparable = row.timing == "exclusive" and baseline.timing == "exclusive"
    if row is baseline or row.val_loss is None or baseline.val_loss is None:
        return
    paired = _paired(row.key, sample, baseline.key, base, settings, notes)
    if paired is None:
        row.val_loss_vs_baseline_pct = 100.0 * (row.val_loss / baseline.val_loss - 1.0)
        return
    row.val_loss_vs_baseline_pct, row.val_loss_vs_baseline_pct_low, row.val_loss_vs_baseline_pct_high = paired
    row.val_loss_within_noise = paired[1] <= 0.0 <= paired[2]


def _paired(key: tuple[str, str], sample: Samples, ref_key: tuple[str, str], ref: Samples,
            settings: Settings, notes: list[str]) -> tuple[float, float, float] | None:
    if not sample.loss_sums or not ref.loss_sums:
        return None
    if sample.sequence_rows != ref.sequence_rows:
        notes.append(f"{'/'.join(key)} and {'/'.join(ref_key)} were scored on different validation "
                     "sequences: no paired interval for their difference")
        return None
    pct, interval = stats.paired_relative_difference(sample.loss_sums, sample.tokens, ref.loss_sums, ref.tokens,
                                                     settings.resamples, settings.seed, settings.level)
    return pct, interval.low, interval.high


def _other_differences(rows: dict[tuple[str, str], StudyRow], samples: dict[tuple[str, str], Samples],
                       settings: Settings, notes: list[str]) -> list[PairedDifference]:
    """PTQ against the base model, and training against the PTQ model it started from."""
    pairs = []
    for (run, phase) in sorted(rows):
        if phase == "ptq" and ("base", "base") in rows:
            pairs.append((f"{run}: PTQ vs the base model", (run, "ptq"), ("base", "base")))
        if phase == "trained" and (run, "ptq") in rows:
            pairs.append((f"{run}: trained vs its PTQ start", (run, "trained"), (run, "ptq")))
    found = []
    for label, key, ref_key in pairs:
        paired = _paired(key, samples[key], ref_key, samples[ref_key], settings, notes)
        if paired is not None:
            found.append(PairedDifference(label, key, ref_key, *paired))
    return found
