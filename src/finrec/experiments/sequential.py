"""Sequential tests that stay valid under continuous monitoring: the mixture SPRT and its confidence sequences.

A fixed-horizon test is valid when its sample size is fixed in advance and it is looked at once; stopping at the
first significant look of many inflates false positives (with 20 looks at alpha 0.05, to about 0.25). The mixture
sequential probability ratio test (mSPRT) of Johari, Koomen, Pekelis and Walsh ("Always valid inference:
continuous monitoring of A/B tests", Operations Research 2022) instead gives a p-value and a confidence sequence
that are valid at every look at once, however many looks there are and whenever they happen.

Examples
--------
>>> r = sequential_two_proportions([40, 90], [1000, 2000], [80, 170], [1000, 2000], tau=0.02)
>>> [f"{p:.1e}" for p in r.p_value]  # always-valid p-value after each look
['8.1e-03', '2.8e-05']
>>> [round(float(v), 4) for v in (r.low[-1], r.high[-1])]  # the confidence sequence of p_t - p_c at the end
[0.0164, 0.0636]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


@dataclass(frozen=True)
class SequentialResult:
    """The mSPRT at each look (last axis): estimate, always-valid p-value and confidence sequence.

    ``p_value`` is the running minimum of ``1 / likelihood ratio`` and ``low``/``high`` the running
    intersection of the per-look intervals, so they only ever tighten; both stay valid at every look, whenever
    and however often one looks. ``p_value < alpha`` exactly when ``theta0`` has left the sequence.
    """

    estimate: NDArray[np.float64]
    variance: NDArray[np.float64]
    log_likelihood_ratio: NDArray[np.float64]
    p_value: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]


def mixture_sprt(
    estimates: ArrayLike, variances: ArrayLike, tau: float, alpha: float = 0.05, theta0: float = 0.0
) -> SequentialResult:
    """The normal-mixture SPRT of ``theta = theta0`` on an asymptotically normal estimate seen at several looks.

    At a look the estimate ``theta_hat`` has variance ``V``. Mixing the likelihood ratio of ``N(theta, V)``
    against ``N(theta0, V)`` over ``theta ~ N(theta0, tau**2)`` gives

    ``Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 (theta_hat - theta0)^2 / (2 V (V + tau^2)))``,

    a martingale under the null hypothesis, so by Ville's inequality ``P(sup Lambda >= 1/alpha) <= alpha``
    (Johari, Koomen, Pekelis and Walsh 2022; Robbins 1970). Inverting the test at every ``theta0`` gives the
    confidence sequence ``theta_hat +- sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) - 2 log alpha))``.

    Parameters
    ----------
    estimates, variances
        One value per look along the last axis (leading axes are independent series, e.g. simulation runs).
        Looks whose variance is not a positive finite number carry no evidence (ratio 1, unbounded interval).
    tau
        Standard deviation of the mixing distribution, in the units of the estimate. It sets which effects the
        test is quickest to find: the interval at a look is narrowest when ``tau**2`` is about eight times that
        look's ``V`` (at alpha = 0.05; the root of ``r = log(1 + r) - 2 log(alpha)``), and a ``tau`` equal to
        the smallest effect worth detecting is close to that at the sample size a fixed-horizon test would plan
        for that effect (whose ``V`` is the effect squared over ``(z_{alpha/2} + z_power)**2``, about 7.9 at
        alpha 0.05 and power 0.8). Validity never depends on ``tau``; only power does.
    alpha
        Level of the test and miscoverage of the confidence sequence.
    theta0
        The null value of the parameter.
    """
    if tau <= 0 or not math.isfinite(tau):
        raise ValueError(f"tau must be a positive number, got {tau}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    est = np.asarray(estimates, dtype=float)
    var = np.asarray(variances, dtype=float)
    if est.shape != var.shape or est.ndim == 0:
        raise ValueError("estimates and variances must have the same (non-scalar) shape")
    t2 = tau * tau
    ok = np.isfinite(var) & (var > 0) & np.isfinite(est)
    v = np.where(ok, var, 1.0)
    dev = np.where(ok, est - theta0, 0.0)
    log_lr = np.where(ok, 0.5 * np.log(v / (v + t2)) + t2 * dev**2 / (2 * v * (v + t2)), 0.0)
    p_look = np.minimum(1.0, np.exp(-log_lr))
    half = np.where(ok, np.sqrt(v * (v + t2) / t2 * (np.log((v + t2) / v) - 2 * math.log(alpha))), np.inf)
    centre = np.where(ok, est, 0.0)
    return SequentialResult(
        estimate=est,
        variance=var,
        log_likelihood_ratio=log_lr,
        p_value=np.minimum.accumulate(p_look, axis=-1),
        low=np.maximum.accumulate(centre - half, axis=-1),
        high=np.minimum.accumulate(centre + half, axis=-1),
    )


def sequential_two_proportions(
    x_control: ArrayLike,
    n_control: ArrayLike,
    x_treatment: ArrayLike,
    n_treatment: ArrayLike,
    tau: float,
    alpha: float = 0.05,
    min_units: int = 100,
) -> SequentialResult:
    """mSPRT of ``p_t - p_c = 0`` from cumulative counts at each look (last axis), with a plug-in variance.

    The variance of the difference at a look is ``p_t q_t / n_t + p_c q_c / n_c`` from the rates seen so far,
    which makes the test asymptotically valid (Johari et al. 2022, section on binary data); looks before both
    arms have ``min_units`` units carry no evidence, because a variance estimated from a handful of units can
    be near zero and fake a huge likelihood ratio. The confidence sequence is clipped to [-1, 1].

    Parameters
    ----------
    x_control, n_control, x_treatment, n_treatment
        Cumulative successes and units of each arm at each look.
    tau
        Mixing standard deviation, an absolute difference in rates; see :func:`mixture_sprt`. A good choice is
        the smallest difference worth detecting, ``baseline * relative_mde``.

    Examples
    --------
    >>> r = sequential_two_proportions([50, 100], [1000, 2000], [80, 170], [1000, 2000], tau=0.02)
    >>> bool(r.p_value[-1] < 0.05), bool(r.low[-1] > 0)
    (True, True)
    """
    xc, nc, xt, nt = (np.asarray(a, dtype=float) for a in (x_control, n_control, x_treatment, n_treatment))
    if np.any(xc < 0) or np.any(xt < 0) or np.any(xc > nc) or np.any(xt > nt):
        raise ValueError("need 0 <= successes <= units at every look")
    with np.errstate(divide="ignore", invalid="ignore"):
        pc = np.where(nc > 0, xc / nc, np.nan)
        pt = np.where(nt > 0, xt / nt, np.nan)
        var = pt * (1 - pt) / nt + pc * (1 - pc) / nc
    var = np.where((nc >= min_units) & (nt >= min_units), var, np.nan)
    r = mixture_sprt(pt - pc, var, tau, alpha)
    return SequentialResult(r.estimate, r.variance, r.log_likelihood_ratio, r.p_value,
                            np.maximum(r.low, -1.0), np.minimum(r.high, 1.0))  # fmt: skip
