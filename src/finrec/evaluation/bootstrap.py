"""Bootstrap confidence intervals for per-user metrics.

Percentile bootstrap of the mean: draw ``n_boot`` resamples of the users with
replacement, take each resample's mean, and read the interval off the
quantiles of those means. Resampling is vectorised in chunks of at most a few
million draws, so a million users with 1,000 resamples stays within tens of
MB. When the values take few distinct values (hit rate is 0 or 1; recall of a
user with a handful of items takes few values) the resample is drawn
exactly and much faster as multinomial counts over the distinct values.

NaN values (users without relevant items) are dropped before resampling.

Examples
--------
>>> rng = np.random.default_rng(1)
>>> mean, low, high = bootstrap_ci(rng.normal(0.3, 0.1, size=500), n_boot=200)
>>> bool(low < mean < high), round(high - low, 2)
(True, 0.02)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["bootstrap_ci", "paired_bootstrap_diff", "summarise"]

#: Random draws per chunk of resamples (int32 indices plus float64 values: about 48 MB).
_CHUNK_DRAWS = 1 << 22
#: Use multinomial counts over distinct values when there are at most this many of them ...
_MAX_DISTINCT = 4096
#: ... and at most this share of the number of values.
_MAX_DISTINCT_SHARE = 0.25


def bootstrap_ci(
    values: ArrayLike, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap confidence interval ``(mean, low, high)``.

    NaN values are dropped; with no values left all three are NaN.
    """
    x = _finite(values)
    if x.size == 0:
        return (np.nan, np.nan, np.nan)
    means = _resample_means(x, n_boot, np.random.default_rng(seed))
    low, high = _interval(means, level)
    return (float(x.mean()), low, high)


def paired_bootstrap_diff(
    a: ArrayLike, b: ArrayLike, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float, float]:
    """Mean of ``a - b`` over the same users, its bootstrap interval and a two-sided p-value.

    Both models are resampled with the same user indices (equivalently: the per-user
    differences are resampled). Users where either value is NaN are dropped. The
    p-value is twice the smaller share of resampled differences on either side of 0
    (with the usual +1 correction), capped at 1; it is below ``1 - level`` about when
    the interval excludes 0. Returns ``(mean_diff, low, high, p_value)``.
    """
    xa = np.asarray(a, dtype=np.float64).ravel()
    xb = np.asarray(b, dtype=np.float64).ravel()
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must hold the same users, got {xa.size} and {xb.size} values")
    keep = ~(np.isnan(xa) | np.isnan(xb))
    d = xa[keep] - xb[keep]
    if d.size == 0:
        return (np.nan, np.nan, np.nan, np.nan)
    means = _resample_means(d, n_boot, np.random.default_rng(seed))
    low, high = _interval(means, level)
    below = (1 + np.count_nonzero(means <= 0)) / (n_boot + 1)
    above = (1 + np.count_nonzero(means >= 0)) / (n_boot + 1)
    return (float(d.mean()), low, high, float(min(1.0, 2 * min(below, above))))


def summarise(
    per_user: Mapping[str, NDArray[np.floating] | float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Mean, bootstrap interval and user count per metric, NaN values dropped.

    Array metrics become ``{"mean", "low", "high", "n"}`` (``n`` is the number of
    users kept); scalar metrics such as catalogue coverage pass through as
    ``{"mean": value}``. Takes the output of
    :func:`finrec.evaluation.metrics.evaluate_rankings`.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, values in per_user.items():
        if np.ndim(values) == 0:
            out[name] = {"mean": float(np.asarray(values))}
            continue
        x = _finite(values)
        mean, low, high = bootstrap_ci(x, n_boot=n_boot, level=level, seed=seed)
        out[name] = {"mean": mean, "low": low, "high": high, "n": int(x.size)}
    return out


def _finite(values: ArrayLike) -> NDArray[np.float64]:
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[~np.isnan(x)]


def _interval(means: NDArray[np.float64], level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = 1.0 - level
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _resample_means(x: NDArray[np.float64], n_boot: int, rng: np.random.Generator) -> NDArray[np.float64]:
    """Means of ``n_boot`` resamples (with replacement, same size) of ``x``."""
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    n = x.size
    distinct, counts = np.unique(x, return_counts=True)
    if distinct.size <= min(_MAX_DISTINCT, _MAX_DISTINCT_SHARE * n):
        # A resample only matters through how often it draws each distinct value:
        # multinomial(n, count / n) counts, exactly the distribution of n draws with replacement.
        means = np.empty(n_boot, dtype=np.float64)
        per_chunk = max(1, _CHUNK_DRAWS // distinct.size)
        for start in range(0, n_boot, per_chunk):
            stop = min(n_boot, start + per_chunk)
            drawn = rng.multinomial(n, counts / n, size=stop - start)
            means[start:stop] = drawn @ distinct / n
        return means
    means = np.empty(n_boot, dtype=np.float64)
    per_chunk = max(1, _CHUNK_DRAWS // n)
    index_type = np.int32 if n < 2**31 else np.int64
    for start in range(0, n_boot, per_chunk):
        stop = min(n_boot, start + per_chunk)
        idx = rng.integers(0, n, size=(stop - start, n), dtype=index_type)
        means[start:stop] = x[idx].mean(axis=1)
    return means
