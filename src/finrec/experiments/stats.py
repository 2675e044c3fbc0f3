"""Statistics of A/B tests on conversion rates: fixed-horizon tests, sample-ratio checks, plans, sequential tests.

Every comparison is *treatment minus control* (or treatment over control), so a positive difference means the
treatment converts more. Proportions are ``x`` successes out of ``n`` units per arm; ratio metrics (clicks per
impression, approvals per decision) come as per-unit numerators and denominators, because units (customers)
are what is randomised and their events are not independent.

* :func:`two_proportion_ztest`: pooled two-proportion z-test (the textbook test; equal to Pearson's chi-square
  on the 2x2 table without continuity correction).
* :func:`difference_interval`: interval of ``p_t - p_c``, Newcombe's hybrid score interval (method 10 of
  Newcombe 1998; good coverage for small counts and rates near 0) or the unpooled Wald interval.
* :func:`relative_lift_interval`: interval of ``p_t / p_c - 1`` by the delta method on the log of the ratio
  (Katz et al. 1978).
* :func:`ratio_interval`, :func:`ratio_comparison`: ratio metrics by the delta method over units (Deng, Knoblich
  and Lu 2018, "Applying the delta method in metric analytics").
* :func:`sample_ratio_mismatch`: chi-square goodness of fit of units per arm against the configured weights.
* :func:`required_sample_size`: units per arm a fixed-horizon test needs for a relative lift at a given power.
* :func:`mixture_sprt`, :func:`sequential_two_proportions`: the mixture sequential probability ratio test (mSPRT)
  of Johari, Koomen, Pekelis and Walsh ("Always valid inference: continuous monitoring of A/B tests", Operations
  Research 2022), giving p-values and confidence sequences that stay valid however often one looks. They live in
  :mod:`finrec.experiments.sequential` and are re-exported here, so that one import holds every test.

Examples
--------
>>> round(two_proportion_ztest(100, 1000, 130, 1000).p_value, 4)
0.0355
>>> required_sample_size(0.10, 0.10)
SamplePlan(control=14751, treatment=14751)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import chi2, norm

from finrec.experiments.sequential import SequentialResult, mixture_sprt, sequential_two_proportions
from finrec.monitoring.conversion import wilson_interval

__all__ = [
    "SRM_THRESHOLD", "Interval", "RatioComparison", "SamplePlan", "SampleRatioCheck", "SequentialResult", "ZTest",
    "difference_interval", "mixture_sprt", "ratio_comparison", "ratio_interval", "relative_lift_interval",
    "required_sample_size", "sample_ratio_mismatch", "sequential_two_proportions", "two_proportion_ztest",
]  # fmt: skip

#: p-value below which a sample ratio mismatch is flagged; see :func:`sample_ratio_mismatch`.
SRM_THRESHOLD = 0.001

_NAN = math.nan


class Interval(NamedTuple):
    """A point estimate and its interval; NaN where it cannot be computed (no units, no successes)."""

    estimate: float
    low: float
    high: float


class ZTest(NamedTuple):
    """A z statistic (positive: treatment higher) and its two-sided p-value."""

    z: float
    p_value: float


class RatioComparison(NamedTuple):
    """Two ratio metrics, their difference (treatment - control) with interval, z and two-sided p-value."""

    control: float
    treatment: float
    difference: float
    low: float
    high: float
    z: float
    p_value: float


class SampleRatioCheck(NamedTuple):
    """Chi-square goodness of fit of the units per arm against the configured weights."""

    chi2: float
    df: int
    p_value: float
    expected: list[float]
    mismatch: bool


class SamplePlan(NamedTuple):
    """Units a fixed-horizon test needs in each arm."""

    control: int
    treatment: int


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2))


def _check_counts(x: int, n: int) -> None:
    if n < 0 or x < 0 or x > n:
        raise ValueError(f"need 0 <= successes <= units, got successes={x}, units={n}")


# -- fixed-horizon tests of two proportions ----------------------------------------------------------------


def two_proportion_ztest(x_control: int, n_control: int, x_treatment: int, n_treatment: int) -> ZTest:
    """Pooled two-proportion z-test of ``p_t = p_c``.

    The variance uses the pooled rate because under the null hypothesis both arms share it; that makes the
    test exact in the same sense as Pearson's chi-square on the 2x2 table (``z**2`` is that statistic).

    Returns
    -------
    ZTest
        ``z`` (positive when the treatment converts more) and the two-sided p-value; ``(0, 1)`` when an arm
        has no units or every unit did the same thing (no variation, so no evidence).

    Examples
    --------
    >>> t = two_proportion_ztest(200, 1000, 250, 1000)
    >>> round(t.z, 3), round(t.p_value, 4)
    (2.677, 0.0074)
    """
    _check_counts(x_control, n_control)
    _check_counts(x_treatment, n_treatment)
    if n_control == 0 or n_treatment == 0:
        return ZTest(0.0, 1.0)
    pooled = (x_control + x_treatment) / (n_control + n_treatment)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_control + 1 / n_treatment))
    if se == 0:
        return ZTest(0.0, 1.0)
    z = (x_treatment / n_treatment - x_control / n_control) / se
    return ZTest(z, min(1.0, float(2 * norm.sf(abs(z)))))


def difference_interval(
    x_control: int,
    n_control: int,
    x_treatment: int,
    n_treatment: int,
    confidence: float = 0.95,
    method: Literal["newcombe", "wald"] = "newcombe",
) -> Interval:
    """Interval of the difference ``p_t - p_c``.

    Parameters
    ----------
    method
        ``newcombe`` (default): the hybrid score interval built from each arm's Wilson interval (Newcombe
        1998, method 10). It stays inside [-1, 1] and keeps its coverage with few successes, where the Wald
        interval is too narrow. ``wald``: ``d +- z * sqrt(p_t q_t / n_t + p_c q_c / n_c)``.

    Examples
    --------
    Newcombe's own example 56/70 against 48/80 (his table II gives 0.0524 to 0.3339):

    >>> [round(v, 4) for v in difference_interval(48, 80, 56, 70)]
    [0.2, 0.0524, 0.3339]
    """
    _check_counts(x_control, n_control)
    _check_counts(x_treatment, n_treatment)
    if n_control == 0 or n_treatment == 0:
        return Interval(_NAN, _NAN, _NAN)
    pc, pt = x_control / n_control, x_treatment / n_treatment
    d = pt - pc
    if method == "wald":
        half = _z(confidence) * math.sqrt(pt * (1 - pt) / n_treatment + pc * (1 - pc) / n_control)
        return Interval(d, d - half, d + half)
    if method != "newcombe":
        raise ValueError(f"unknown method {method!r}; use newcombe or wald")
    lc, uc = wilson_interval(x_control, n_control, confidence)
    lt, ut = wilson_interval(x_treatment, n_treatment, confidence)
    # Each side combines the two arms' Wilson half-widths that push the difference that way.
    low = d - math.sqrt((pt - lt) ** 2 + (uc - pc) ** 2)
    high = d + math.sqrt((ut - pt) ** 2 + (pc - lc) ** 2)
    return Interval(d, max(-1.0, low), min(1.0, high))


def relative_lift_interval(
    x_control: int, n_control: int, x_treatment: int, n_treatment: int, confidence: float = 0.95
) -> Interval:
    """Interval of the relative lift ``p_t / p_c - 1`` (0.2 = the treatment converts 20% more).

    The delta method on ``log(p_t / p_c)``, whose variance is about ``(1 - p_t) / x_t + (1 - p_c) / x_c``:
    the log is closer to normal than the ratio itself, and mapping back gives an asymmetric interval that never
    goes below -100%. Undefined (NaN) while either arm has no success.

    Examples
    --------
    >>> [round(v, 4) for v in relative_lift_interval(100, 1000, 150, 1000)]
    [0.5, 0.1831, 0.9019]
    """
    _check_counts(x_control, n_control)
    _check_counts(x_treatment, n_treatment)
    if n_control == 0 or n_treatment == 0 or x_control == 0:
        return Interval(_NAN, _NAN, _NAN)
    pc, pt = x_control / n_control, x_treatment / n_treatment
    if x_treatment == 0:
        return Interval(pt / pc - 1, _NAN, _NAN)
    log_ratio = math.log(pt / pc)
    se = math.sqrt((1 - pt) / x_treatment + (1 - pc) / x_control)
    half = _z(confidence) * se
    return Interval(pt / pc - 1, math.exp(log_ratio - half) - 1, math.exp(log_ratio + half) - 1)


# -- ratio metrics over units (delta method) ---------------------------------------------------------------


def _ratio_and_variance(num: ArrayLike, den: ArrayLike) -> tuple[float, float]:
    a = np.asarray(num, dtype=float)
    b = np.asarray(den, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("numerators and denominators must be 1-d arrays of the same length")
    n = a.size
    total = float(b.sum())
    if n < 2 or total <= 0:
        return (_NAN if total <= 0 else float(a.sum()) / total), _NAN
    r = float(a.sum()) / total
    mean_den = total / n
    # Var(sum a / sum b) by the delta method: the variance of the per-unit residual a - r b, scaled.
    resid = a - r * b
    var = float(resid.var(ddof=1)) / (n * mean_den**2)
    return r, var


def ratio_interval(num: ArrayLike, den: ArrayLike, confidence: float = 0.95) -> Interval:
    """``sum(num) / sum(den)`` with a delta-method interval over units.

    Events of one customer are correlated (a customer who clicks once tends to click again), so a binomial
    interval over events would be too narrow; treating the customer as the unit, as randomisation did, is right.

    Examples
    --------
    Two customers with 10 impressions each, one clicked every time and one never:

    >>> est, low, high = ratio_interval([10, 0], [10, 10])
    >>> est, low < 0
    (0.5, True)
    """
    r, var = _ratio_and_variance(num, den)
    if not math.isfinite(var):
        return Interval(r, _NAN, _NAN)
    half = _z(confidence) * math.sqrt(var)
    return Interval(r, r - half, r + half)


def ratio_comparison(
    num_control: ArrayLike,
    den_control: ArrayLike,
    num_treatment: ArrayLike,
    den_treatment: ArrayLike,
    confidence: float = 0.95,
) -> RatioComparison:
    """Difference of two ratio metrics (treatment - control) with a delta-method interval and Wald z-test.

    Each argument holds one value per unit (customer). NaN statistics when an arm has fewer than two units or
    a zero denominator sum.
    """
    rc, vc = _ratio_and_variance(num_control, den_control)
    rt, vt = _ratio_and_variance(num_treatment, den_treatment)
    d = rt - rc
    se = math.sqrt(vc + vt) if math.isfinite(vc) and math.isfinite(vt) else _NAN
    if not math.isfinite(se):
        return RatioComparison(rc, rt, d, _NAN, _NAN, _NAN, _NAN)
    if se == 0:  # every unit had the same ratio in both arms: any difference is certain, none is no evidence
        z0 = 0.0 if d == 0 else math.copysign(math.inf, d)
        return RatioComparison(rc, rt, d, d, d, z0, 1.0 if d == 0 else 0.0)
    half = _z(confidence) * se
    z = d / se
    return RatioComparison(rc, rt, d, d - half, d + half, z, min(1.0, float(2 * norm.sf(abs(z)))))


# -- sample ratio mismatch ---------------------------------------------------------------------------------


def sample_ratio_mismatch(
    counts: Sequence[int], weights: Sequence[float], threshold: float = SRM_THRESHOLD
) -> SampleRatioCheck:
    """Do the units per arm fit the configured weights? Pearson's chi-square goodness of fit.

    A sample ratio mismatch means something between assignment and logging loses or adds units in one arm
    (a crash in one model, a bot filter, redirects), and then every comparison is biased in an unknown
    direction. The threshold is strict (0.001 rather than the analysis's alpha) because the check runs on
    every analysis of every experiment, so at 0.05 one healthy experiment in twenty would raise a false
    alarm, while real mismatches are usually gross and give p-values far below 0.001 (Fabijan et al. 2019,
    "Diagnosing sample ratio mismatch in online controlled experiments"; Kohavi, Tang and Xu 2020, ch. 21).

    Examples
    --------
    >>> sample_ratio_mismatch([50_000, 48_800], [1, 1]).mismatch
    True
    >>> sample_ratio_mismatch([500, 488], [1, 1]).mismatch
    False
    """
    if len(counts) != len(weights) or len(counts) < 2:
        raise ValueError("need one count per weight and at least two arms")
    if any(c < 0 for c in counts) or any(w <= 0 for w in weights):
        raise ValueError("counts must be >= 0 and weights > 0")
    total = sum(counts)
    w_sum = float(sum(weights))
    expected = [total * w / w_sum for w in weights]
    if total == 0:
        return SampleRatioCheck(0.0, len(counts) - 1, 1.0, expected, False)
    stat = sum((c - e) ** 2 / e for c, e in zip(counts, expected, strict=True))
    p = float(chi2.sf(stat, len(counts) - 1))
    return SampleRatioCheck(stat, len(counts) - 1, p, expected, p < threshold)


# -- fixed-horizon plan ------------------------------------------------------------------------------------


def required_sample_size(
    baseline: float, relative_mde: float, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0
) -> SamplePlan:
    """Units per arm for a two-sided two-proportion z-test to detect a relative lift with the given power.

    The normal-approximation formula (Fleiss, Levin and Paik, "Statistical methods for rates and proportions",
    without continuity correction), with the null variance from the pooled rate and the alternative variance
    from both arms' rates.

    Parameters
    ----------
    baseline
        Control conversion rate, in (0, 1).
    relative_mde
        Smallest relative lift worth detecting (0.1 = 10%); the treatment's rate ``baseline * (1 + mde)`` must
        stay in (0, 1).
    alpha, power
        Two-sided false-positive rate and the chance to detect a lift of exactly the MDE.
    ratio
        Treatment units per control unit (the ratio of the arms' weights).

    Examples
    --------
    >>> required_sample_size(0.10, 0.10, alpha=0.05, power=0.8)
    SamplePlan(control=14751, treatment=14751)
    """
    if not 0 < baseline < 1:
        raise ValueError(f"baseline must be in (0, 1), got {baseline}")
    p2 = baseline * (1 + relative_mde)
    if relative_mde == 0 or not 0 < p2 < 1:
        raise ValueError(f"baseline * (1 + relative_mde) must be in (0, 1) and differ from baseline, got {p2}")
    if not 0 < alpha < 1 or not 0 < power < 1 or ratio <= 0:
        raise ValueError("need 0 < alpha < 1, 0 < power < 1 and ratio > 0")
    p1 = baseline
    pooled = (p1 + ratio * p2) / (1 + ratio)
    z_a = float(norm.ppf(1 - alpha / 2))
    z_b = float(norm.ppf(power))
    root = z_a * math.sqrt(pooled * (1 - pooled) * (1 + 1 / ratio)) + z_b * math.sqrt(
        p1 * (1 - p1) + p2 * (1 - p2) / ratio
    )
    n_control = math.ceil(root**2 / (p2 - p1) ** 2 - 1e-9)  # the tolerance keeps exact integers from rounding up
    return SamplePlan(n_control, math.ceil(ratio * n_control - 1e-9))
