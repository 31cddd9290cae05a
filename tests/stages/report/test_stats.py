"""The report's statistics against values known independently of the code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.report import stats

LOSS_SUMS = [10.0, 12.0, 9.0, 11.0, 30.0, 14.0]  # nats per validation sequence
TOKENS = [5, 6, 5, 5, 10, 7]  # label tokens per sequence


def test_wilson_interval_of_three_in_six_is_the_textbook_value():
    # p = 0.5, z = 1.95996: centre 0.5, half-width z*sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    interval = stats.wilson(3, 6)
    assert interval.low == pytest.approx(0.187616, abs=1e-6)
    assert interval.high == pytest.approx(0.812384, abs=1e-6)


def test_wilson_interval_of_none_right_reaches_z2_over_n_plus_z2():
    z2 = stats.z_value() ** 2
    interval = stats.wilson(0, 6)
    assert interval.low == 0.0
    assert interval.high == pytest.approx(z2 / (6 + z2), rel=1e-12)  # 0.39033


def test_wilson_refuses_counts_outside_zero_to_n():
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        stats.wilson(7, 6)


def test_val_loss_bootstrap_on_a_fixed_seed_resamples_whole_sequences():
    interval = stats.bootstrap_ratio_of_sums(LOSS_SUMS, TOKENS, resamples=2000, seed=0)
    # The same draws by hand: 2000 resamples of 6 sequence indices from numpy's default generator.
    draws = np.random.default_rng(0).integers(0, 6, size=(2000, 6))
    by_hand = [sum(LOSS_SUMS[i] for i in row) / sum(TOKENS[i] for i in row) for row in draws]
    assert (interval.low, interval.high) == pytest.approx(tuple(np.percentile(by_hand, [2.5, 97.5])), rel=1e-12)
    assert (interval.low, interval.high) == pytest.approx((1.9375, 2.652174), abs=1e-6)  # seed 0, pinned
    assert interval.contains(sum(LOSS_SUMS) / sum(TOKENS))
    assert stats.bootstrap_ratio_of_sums(LOSS_SUMS, TOKENS, seed=0) == interval  # same seed, same interval


def test_bootstrap_of_a_mean_matches_the_normal_interval_on_a_large_sample():
    sample = np.random.default_rng(7).normal(10.0, 2.0, size=2000)
    interval = stats.bootstrap_mean(sample, resamples=4000, seed=1)
    half = stats.z_value() * sample.std(ddof=1) / math.sqrt(len(sample))
    assert interval.low == pytest.approx(sample.mean() - half, abs=0.1 * half)
    assert interval.high == pytest.approx(sample.mean() + half, abs=0.1 * half)


def test_paired_difference_of_a_model_one_percent_worse_on_every_sequence_is_exactly_one_percent():
    worse = [1.01 * loss for loss in LOSS_SUMS]
    pct, interval = stats.paired_relative_difference(worse, TOKENS, LOSS_SUMS, TOKENS)
    # Pairing cancels how hard each sequence is: every resample sees the same 1 %.
    assert pct == pytest.approx(1.0, abs=1e-9)
    assert (interval.low, interval.high) == pytest.approx((1.0, 1.0), abs=1e-9)


def test_paired_difference_that_goes_both_ways_contains_zero():
    mixed = [loss * (1.02 if i % 2 else 0.98) for i, loss in enumerate(LOSS_SUMS)]
    pct, interval = stats.paired_relative_difference(mixed, TOKENS, LOSS_SUMS, TOKENS)
    assert abs(pct) < 1.0 and interval.contains(0.0)


def test_ratio_of_two_runs_mean_step_times():
    ratio, interval = stats.bootstrap_ratio_of_means([3.0, 3.0, 3.0], [2.0, 2.0])
    assert ratio == 1.5 and (interval.low, interval.high) == (1.5, 1.5)
    ratio, interval = stats.bootstrap_ratio_of_means([2.9, 3.1, 3.0, 3.2], [2.0, 2.1, 1.9])
    assert interval.low < ratio < interval.high and interval.low > 1.3


def test_samples_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="equally long"):
        stats.bootstrap_ratio_of_sums([1.0, 2.0], [1])
