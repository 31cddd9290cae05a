"""The study table from stage folders as the train and eval stages leave them."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from stages.report.rows import Settings, build_study
from stages.report.table import decimals_for, to_csv, to_markdown
from tests.stages.report.report_fixtures import LOSS_SUMS, TOKENS, small_study


@pytest.fixture
def study(tmp_path: Path):
    inputs, tags = small_study(tmp_path)
    return build_study(inputs, tags, Settings(baseline="bf16", skip_first_steps=1))


def test_step_times_are_means_after_the_warm_up_with_their_interval_and_count(study):
    rows = {row.key: row for row in study.rows}
    bf16 = rows[("bf16", "trained")]
    assert (bf16.step_time_s, bf16.step_time_steps) == (pytest.approx(2.0), 3)  # steps 2-4 of 9, 2, 2.1, 1.9
    assert bf16.step_time_low < 2.0 < bf16.step_time_high
    assert rows[("qat", "trained")].step_time_vs_baseline == pytest.approx(2.0)


def test_a_run_that_shared_its_cpu_while_timed_is_not_comparable(study):
    rows = {row.key: row for row in study.rows}
    fp8, int4 = rows[("fp8", "trained")], rows[("int4", "trained")]
    assert (fp8.timing, fp8.timing_note, fp8.step_time_comparable) == ("shared", "cpu cores with train-bf16", False)
    # int4 shared the CPU only during its first step, which the mean leaves out.
    assert (int4.timing, int4.step_time_comparable) == ("exclusive", True)
    assert int4.timing_note == "local driver: no other stage during the timed steps (some during warm-up)"


def test_val_loss_carries_tokens_sequences_and_a_bootstrap_interval(study):
    bf16 = next(row for row in study.rows if row.key == ("bf16", "trained"))
    assert bf16.val_loss == pytest.approx(sum(LOSS_SUMS) / sum(TOKENS))
    assert (bf16.val_tokens, bf16.val_sequences) == (38, 6)
    assert (bf16.val_loss_low, bf16.val_loss_high) == pytest.approx((1.9375, 2.652174), abs=1e-6)


def test_differences_to_the_baseline_are_paired_over_the_same_sequences(study):
    rows = {row.key: row for row in study.rows}
    fp8, int4 = rows[("fp8", "trained")], rows[("int4", "trained")]
    # 1 % worse on every sequence: exactly 1 %, and no noise in a paired comparison.
    assert (fp8.val_loss_vs_baseline_pct, fp8.val_loss_vs_baseline_pct_low) == (pytest.approx(1.0), pytest.approx(1.0))
    assert fp8.val_loss_within_noise is False
    # 2 % worse on half the sequences, 2 % better on the others: within noise.
    assert int4.val_loss_within_noise is True and int4.val_loss_vs_baseline_pct_low < 0 < int4.val_loss_vs_baseline_pct_high
    labels = {d.label: round(d.pct, 6) for d in study.differences}
    assert labels == {"qat: PTQ vs the base model": round(100 * (1.1 / 1.2 - 1), 6),
                      "qat: trained vs its PTQ start": round(100 * (1.03 / 1.1 - 1), 6)}


def test_accuracy_has_its_number_of_questions_and_a_wilson_interval(study):
    bf16 = next(row for row in study.rows if row.key == ("bf16", "trained"))
    accuracy = bf16.accuracy["mmlu_tiny"]
    assert (accuracy.correct, accuracy.n) == (3, 6)
    assert (accuracy.low, accuracy.high) == pytest.approx((0.187616, 0.812384), abs=1e-6)


def test_markdown_table_shows_intervals_sample_sizes_and_flags(study):
    lines = to_markdown(study, "Study t", "what it asks").splitlines()
    assert lines[:3] == ["# Study t", "", "what it asks"]
    assert lines[4] == (
        "| run | phase | recipe | backend | inference | step time, s: mean [95% CI] (n steps) "
        "| step time vs bf16 [95% CI] | device during timed steps "
        "| val loss deployed, nats/token [95% CI; 38 tokens, 6 seqs] | val loss vs bf16, % [95% CI, paired] "
        "| acc mmlu_tiny [95% CI Wilson] (correct/n) |")
    by_run = {line.split(" | ")[0] + "/" + line.split(" | ")[1]: line for line in lines if line.startswith("| ")}
    assert by_run["| bf16/trained"] == (
        "| bf16 | trained | bf16 | emulated | bf16 | 2.00 [1.90, 2.10] (n=3) | 1 (baseline) | exclusive "
        "| 2.26316 [1.94, 2.65] | 0 (baseline) | 0.500 [0.188, 0.812] (3/6) |")
    assert by_run["| fp8/trained"] == (
        "| fp8 | trained | fp8 | emulated | fp8 | 1.00 [0.90, 1.10] (n=3) | 0.500x [0.452, 0.552], not comparable "
        "| shared: cpu cores with train-bf16 | 2.28579 [1.96, 2.68] | +1.0 [+1.0, +1.0] | 0.500 [0.188, 0.812] (3/6) |")
    assert "| \u22120.3 [\u22121.6, +1.5] within noise |" in by_run["| int4/trained"]
    assert "- qat: PTQ vs the base model, %: \u22128.3 [\u22128.3, \u22128.3]" in lines


def test_digits_follow_the_interval_so_small_differences_show():
    assert decimals_for(8.0020, 8.0046) == 4  # half-width 0.0013: two significant digits
    assert decimals_for(1.9, 2.1) == 2
    assert decimals_for(0.0031, 0.0123, at_least=1) == 4
    assert decimals_for(None, None, at_least=2) == 2


def test_csv_keeps_full_precision_and_every_interval(study):
    rows = {(r["run"], r["phase"]): r for r in csv.DictReader(io.StringIO(to_csv(study)))}
    fp8 = rows[("fp8", "trained")]
    assert float(fp8["val_loss"]) == pytest.approx(1.01 * sum(LOSS_SUMS) / sum(TOKENS), rel=1e-12)
    assert fp8["step_time_comparable"] == "False" and fp8["timing"] == "shared"
    assert fp8["accuracy_mmlu_tiny_n"] == "6" and float(fp8["accuracy_mmlu_tiny_low"]) == pytest.approx(0.187616, abs=1e-6)
    assert rows[("base", "base")]["step_time_s"] == ""  # no training: no step time
