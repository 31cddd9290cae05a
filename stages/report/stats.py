"""The study's statistics: intervals for what the report estimates from a sample.

- Val loss is a ratio of sums (nats over label tokens) over the validation sequences: its interval
  is a percentile bootstrap over sequences (tokens within a sequence are not independent).
- Two models scored on the same sequences differ by a paired bootstrap: each resample draws one
  set of sequences and scores both models on it, so the sequences' own difficulty cancels.
- Accuracy on n questions: the Wilson score interval (correct near 0, 1 and small n, where the
  normal approximation is not).
- Step time is a mean over steps; a ratio of two runs' means resamples each run's steps apart.
Every bootstrap takes a seed, so the same data give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
# Index draws per chunk: bounds memory at study scale (tens of thousands of sequences).
_CHUNK_DRAWS = 4_000_000


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def z_value(level: float = LEVEL) -> float:
    """The two-sided standard normal quantile, e.g. 1.95996... for 95 %."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(successes: int, n: int, level: float = LEVEL) -> Interval:
    """Wilson score interval of a proportion successes/n."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson: need 0 <= successes <= n and n > 0, got {successes}/{n}")
    z = z_value(level)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def _resampled_indices(n: int, resamples: int, seed: int):
    """Yield [k, n] arrays of indices drawn with replacement, resamples rows in all."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_DRAWS // max(n, 1))
    done = 0
    while done < resamples:
        k = min(per_chunk, resamples - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _percentiles(values: np.ndarray, level: float) -> Interval:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(float(low), float(high))


def _checked(name: str, *arrays: Sequence[float]) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    if any(len(a) != len(out[0]) for a in out) or len(out[0]) == 0:
        raise ValueError(f"{name}: needs equally long, non-empty samples, got lengths {[len(a) for a in out]}")
    return out


def bootstrap_ratio_of_sums(numerators: Sequence[float], denominators: Sequence[float],
                            resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """Interval of sum(numerators) / sum(denominators), resampling the (numerator, denominator)
    pairs: val loss from per-sequence loss sums and label-token counts."""
    num, den = _checked("bootstrap_ratio_of_sums", numerators, denominators)
    ratios = np.concatenate([num[idx].sum(1) / den[idx].sum(1)
                             for idx in _resampled_indices(len(num), resamples, seed)])
    return _percentiles(ratios, level)


def paired_relative_difference(numerators: Sequence[float], denominators: Sequence[float],
                               base_numerators: Sequence[float], base_denominators: Sequence[float],
                               resamples: int = RESAMPLES, seed: int = SEED,
                               level: float = LEVEL) -> tuple[float, Interval]:
    """(point, interval) of 100 * (A / B - 1) for two ratios of sums over the same items, each
    resample drawing one set of item indices for both: e.g. two models' val loss in percent."""
    num, den, bnum, bden = _checked("paired_relative_difference", numerators, denominators,
                                    base_numerators, base_denominators)
    point = 100.0 * ((num.sum() / den.sum()) / (bnum.sum() / bden.sum()) - 1.0)
    diffs = np.concatenate([
        100.0 * ((num[idx].sum(1) / den[idx].sum(1)) / (bnum[idx].sum(1) / bden[idx].sum(1)) - 1.0)
        for idx in _resampled_indices(len(num), resamples, seed)])
    return float(point), _percentiles(diffs, level)


def bootstrap_mean(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                   level: float = LEVEL) -> Interval:
    """Interval of the mean of `values` (e.g. step times)."""
    (x,) = _checked("bootstrap_mean", values)
    means = np.concatenate([x[idx].mean(1) for idx in _resampled_indices(len(x), resamples, seed)])
    return _percentiles(means, level)


def bootstrap_ratio_of_means(values: Sequence[float], base_values: Sequence[float],
                             resamples: int = RESAMPLES, seed: int = SEED,
                             level: float = LEVEL) -> tuple[float, Interval]:
    """(point, interval) of mean(values) / mean(base_values), two independent samples each
    resampled on its own (a run's step times against the baseline's)."""
    (x,) = _checked("bootstrap_ratio_of_means", values)
    (b,) = _checked("bootstrap_ratio_of_means", base_values)
    x_means = np.concatenate([x[idx].mean(1) for idx in _resampled_indices(len(x), resamples, seed)])
    b_means = np.concatenate([b[idx].mean(1) for idx in _resampled_indices(len(b), resamples, seed + 1)])
    return float(x.mean() / b.mean()), _percentiles(x_means / b_means, level)
