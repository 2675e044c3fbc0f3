"""A/B test statistics: known values, invariants, and simulations with a planted answer (A/A and a real lift)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency, chisquare, norm
from scipy.stats.contingency import relative_risk

from finrec.experiments.stats import (
    SRM_THRESHOLD,
    difference_interval,
    mixture_sprt,
    ratio_comparison,
    ratio_interval,
    relative_lift_interval,
    required_sample_size,
    sample_ratio_mismatch,
    sequential_two_proportions,
    two_proportion_ztest,
)


@st.composite
def two_arms(draw: st.DrawFn, min_n: int = 1) -> tuple[int, int, int, int]:
    nc = draw(st.integers(min_n, 5000))
    nt = draw(st.integers(min_n, 5000))
    return draw(st.integers(0, nc)), nc, draw(st.integers(0, nt)), nt


# -- known values ------------------------------------------------------------------------------------------


def test_ztest_is_pearson_chi_square_without_correction() -> None:
    for xc, nc, xt, nt in [(200, 1000, 250, 1000), (31, 420, 12, 380), (5, 60, 9, 55)]:
        t = two_proportion_ztest(xc, nc, xt, nt)
        stat, p, _, _ = chi2_contingency([[xc, nc - xc], [xt, nt - xt]], correction=False)
        assert t.z**2 == pytest.approx(stat, rel=1e-9)
        assert t.p_value == pytest.approx(p, rel=1e-9)
    # by hand: pooled 0.225, se = sqrt(0.225 * 0.775 * 2 / 1000) = 0.018675, z = 0.05 / se
    t = two_proportion_ztest(200, 1000, 250, 1000)
    assert t.z == pytest.approx(2.6774, abs=1e-4) and t.p_value == pytest.approx(0.00742, abs=1e-5)


def test_ztest_without_variation_or_units_is_no_evidence() -> None:
    assert two_proportion_ztest(0, 100, 0, 100) == (0.0, 1.0)
    assert two_proportion_ztest(0, 0, 3, 10) == (0.0, 1.0)
    with pytest.raises(ValueError):
        two_proportion_ztest(11, 10, 0, 10)


def test_newcombe_interval_matches_the_paper() -> None:
    # Newcombe (1998), table II, method 10: 56/70 - 48/80 and 9/10 - 3/10
    d = difference_interval(48, 80, 56, 70)
    assert (d.estimate, round(d.low, 4), round(d.high, 4)) == (pytest.approx(0.2), 0.0524, 0.3339)
    d = difference_interval(3, 10, 9, 10)
    assert (round(d.low, 4), round(d.high, 4)) == (0.1705, 0.8090)


def test_wald_interval_by_hand() -> None:
    d = difference_interval(100, 1000, 150, 1000, confidence=0.9, method="wald")
    half = norm.ppf(0.95) * math.sqrt(0.1 * 0.9 / 1000 + 0.15 * 0.85 / 1000)
    assert d == pytest.approx((0.05, 0.05 - half, 0.05 + half))


def test_relative_lift_matches_scipy_relative_risk() -> None:
    for xc, nc, xt, nt in [(100, 1000, 150, 1000), (40, 900, 31, 1100), (7, 50, 15, 70)]:
        lift = relative_lift_interval(xc, nc, xt, nt, confidence=0.95)
        ref = relative_risk(xt, nt, xc, nc)
        ci = ref.confidence_interval(0.95)
        assert lift == pytest.approx((ref.relative_risk - 1, ci.low - 1, ci.high - 1), rel=1e-9)
    assert all(math.isnan(v) for v in relative_lift_interval(0, 100, 5, 100))
    zero_t = relative_lift_interval(5, 100, 0, 100)
    assert zero_t.estimate == -1 and math.isnan(zero_t.low)


def test_ratio_interval_with_one_trial_per_unit_is_the_binomial_interval() -> None:
    n, x = 400, 60
    num = np.r_[np.ones(x), np.zeros(n - x)]
    est, low, high = ratio_interval(num, np.ones(n), confidence=0.95)
    se = math.sqrt(0.15 * 0.85 / (n - 1))  # ddof=1: the unbiased variance of the units
    assert (est, low, high) == pytest.approx((0.15, 0.15 - 1.959964 * se, 0.15 + 1.959964 * se), rel=1e-6)


def test_ratio_comparison_widens_for_clustered_units() -> None:
    # Planted clustering: each customer sees 10 impressions and clicks all or none of them. Events are then
    # worth one customer each, so the honest standard error is sqrt(10) times the one over events.
    rng = np.random.default_rng(3)
    clicked_c = rng.random(2000) < 0.10
    clicked_t = rng.random(2000) < 0.10
    res = ratio_comparison(10.0 * clicked_c, np.full(2000, 10.0), 10.0 * clicked_t, np.full(2000, 10.0))
    pc, pt = clicked_c.mean(), clicked_t.mean()
    naive_se = math.sqrt(pc * (1 - pc) / 20_000 + pt * (1 - pt) / 20_000)
    delta_se = (res.high - res.low) / (2 * 1.959964)
    assert delta_se / naive_se == pytest.approx(math.sqrt(10), rel=0.02)
    assert res.difference == pytest.approx(pt - pc)


def test_sample_ratio_mismatch_matches_scipy_and_respects_weights() -> None:
    check = sample_ratio_mismatch([10_321, 9_679], [1, 1])
    ref = chisquare([10_321, 9_679])
    assert check.chi2 == pytest.approx(ref.statistic) and check.p_value == pytest.approx(ref.pvalue)
    assert check.mismatch  # a 51.6/48.4 split of 20k is far beyond chance
    assert not sample_ratio_mismatch([6_690, 3_310], [2, 1]).mismatch  # 2:1 weights, near 2:1 counts
    assert sample_ratio_mismatch([5_000, 5_000], [2, 1]).mismatch
    assert sample_ratio_mismatch([0, 0], [1, 1]).p_value == 1.0
    assert SRM_THRESHOLD == 0.001


def test_sample_size_textbook_value_and_minimality() -> None:
    # (1.96 sqrt(2 * .105 * .895) + 0.8416 sqrt(.09 + .0979))^2 / .01^2 = 14750.6
    assert required_sample_size(0.10, 0.10, 0.05, 0.8) == (14_751, 14_751)

    def power(nc: int, nt: int, p1: float, p2: float, alpha: float) -> float:
        pooled = (nc * p1 + nt * p2) / (nc + nt)
        null_se = math.sqrt(pooled * (1 - pooled) * (1 / nc + 1 / nt))
        alt_se = math.sqrt(p1 * (1 - p1) / nc + p2 * (1 - p2) / nt)
        return float(norm.cdf((abs(p2 - p1) - norm.ppf(1 - alpha / 2) * null_se) / alt_se))

    for baseline, mde, ratio in [(0.05, 0.2, 1.0), (0.3, -0.1, 1.0), (0.02, 0.5, 2.0)]:
        plan = required_sample_size(baseline, mde, 0.05, 0.9, ratio=ratio)
        assert plan.treatment == math.ceil(ratio * plan.control)
        p2 = baseline * (1 + mde)
        assert power(plan.control, round(ratio * plan.control), baseline, p2, 0.05) >= 0.9 - 1e-6
        assert power(plan.control - 2, round(ratio * (plan.control - 2)), baseline, p2, 0.05) < 0.9
    with pytest.raises(ValueError):
        required_sample_size(0.6, 1.0)  # the treatment's rate would be 1.2


def test_planned_sample_size_gives_the_planned_power() -> None:
    rng = np.random.default_rng(11)
    plan = required_sample_size(0.2, 0.25, alpha=0.05, power=0.8)
    xc = rng.binomial(plan.control, 0.2, 4000)
    xt = rng.binomial(plan.treatment, 0.25, 4000)
    detected = np.mean([two_proportion_ztest(int(a), plan.control, int(b), plan.treatment).p_value < 0.05
                        for a, b in zip(xc, xt, strict=True)])  # fmt: skip
    assert 0.77 <= detected <= 0.84


def test_msprt_single_look_by_hand() -> None:
    est, var, tau = 0.03, 0.0001, 0.02
    lam = math.sqrt(var / (var + tau**2)) * math.exp(tau**2 * est**2 / (2 * var * (var + tau**2)))
    r = mixture_sprt([est], [var], tau=tau, alpha=0.05)
    assert r.p_value[0] == pytest.approx(min(1, 1 / lam))
    half = math.sqrt(var * (var + tau**2) / tau**2 * (math.log((var + tau**2) / var) + 2 * math.log(20)))
    assert (r.low[0], r.high[0]) == pytest.approx((est - half, est + half))
    # wider than the fixed-horizon interval: the price of looking as often as one likes
    assert half > 1.959964 * math.sqrt(var)


def test_msprt_looks_without_variance_carry_no_evidence() -> None:
    r = sequential_two_proportions([0, 5, 40], [50, 150, 1000], [10, 20, 80], [50, 150, 1000], tau=0.02,
                                   min_units=100)  # fmt: skip
    assert r.p_value[0] == 1.0 and r.low[0] == -1.0 and r.high[0] == 1.0
    assert r.p_value[2] < r.p_value[1] <= 1.0


# -- invariants --------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(two_arms())
def test_ztest_bounds_and_symmetry(arms: tuple[int, int, int, int]) -> None:
    xc, nc, xt, nt = arms
    t, swapped = two_proportion_ztest(xc, nc, xt, nt), two_proportion_ztest(xt, nt, xc, nc)
    assert 0 <= t.p_value <= 1
    assert swapped.z == pytest.approx(-t.z) and swapped.p_value == pytest.approx(t.p_value)


@settings(max_examples=200, deadline=None)
@given(two_arms(), st.sampled_from(["newcombe", "wald"]), st.sampled_from([0.8, 0.95, 0.99]))
def test_difference_interval_contains_estimate_and_flips(arms: tuple[int, int, int, int], method: str,
                                                          confidence: float) -> None:  # fmt: skip
    xc, nc, xt, nt = arms
    d = difference_interval(xc, nc, xt, nt, confidence, method)  # type: ignore[arg-type]
    assert d.low <= d.estimate + 1e-12 and d.estimate <= d.high + 1e-12
    if method == "newcombe":
        assert d.low >= -1 and d.high <= 1
    s = difference_interval(xt, nt, xc, nc, confidence, method)  # type: ignore[arg-type]
    assert s == pytest.approx((-d.estimate, -d.high, -d.low), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(two_arms())
def test_relative_lift_contains_estimate_and_inverts_on_swap(arms: tuple[int, int, int, int]) -> None:
    xc, nc, xt, nt = arms
    lift = relative_lift_interval(xc, nc, xt, nt)
    if xc == 0 or xt == 0:
        assert math.isnan(lift.low)
        return
    assert -1 < lift.low <= lift.estimate * (1 + 1e-12) + 1e-12 and lift.estimate <= lift.high * (1 + 1e-12) + 1e-12
    back = relative_lift_interval(xt, nt, xc, nc)
    assert back == pytest.approx((1 / (1 + lift.estimate) - 1, 1 / (1 + lift.high) - 1, 1 / (1 + lift.low) - 1))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 100_000), min_size=2, max_size=5), st.data())
def test_srm_p_value_is_a_probability(counts: list[int], data: st.DataObject) -> None:
    weights = data.draw(st.lists(st.floats(0.1, 10), min_size=len(counts), max_size=len(counts)))
    check = sample_ratio_mismatch(counts, weights)
    assert 0 <= check.p_value <= 1 and check.mismatch == (check.p_value < SRM_THRESHOLD)
    assert sum(check.expected) == pytest.approx(sum(counts))


@settings(max_examples=150, deadline=None)
@given(st.lists(two_arms(min_n=1), min_size=1, max_size=8), st.floats(0.001, 0.5), st.sampled_from([0.01, 0.05]))
def test_msprt_p_value_agrees_with_confidence_sequence(looks: list[tuple[int, int, int, int]], tau: float,
                                                        alpha: float) -> None:  # fmt: skip
    xc, nc, xt, nt = (np.array(v) for v in zip(*looks, strict=True))
    r = sequential_two_proportions(xc, nc, xt, nt, tau=tau, alpha=alpha, min_units=1)
    assert np.all((r.p_value >= 0) & (r.p_value <= 1))
    assert np.all(np.diff(r.p_value) <= 0) and np.all(np.diff(r.low) >= 0) and np.all(np.diff(r.high) <= 0)
    if np.any(np.abs(r.log_likelihood_ratio - math.log(1 / alpha)) < 1e-9):
        return  # exactly on the boundary: either answer is right
    assert (r.p_value[-1] < alpha) == (not r.low[-1] <= 0 <= r.high[-1])
    s = sequential_two_proportions(xt, nt, xc, nc, tau=tau, alpha=alpha, min_units=1)
    np.testing.assert_allclose(s.p_value, r.p_value, rtol=1e-9)
    np.testing.assert_allclose(s.low, -r.high, atol=1e-12)


# -- simulations with a planted answer ---------------------------------------------------------------------


def _peeking_runs(rng: np.random.Generator, runs: int, looks: int, batch: int, pc: float, pt: float,
                  weight_t: float = 1.0) -> tuple[np.ndarray, ...]:  # fmt: skip
    bt = round(batch * weight_t)
    xc = rng.binomial(batch, pc, (runs, looks)).cumsum(axis=1)
    xt = rng.binomial(bt, pt, (runs, looks)).cumsum(axis=1)
    nc = np.broadcast_to(np.arange(1, looks + 1) * batch, xc.shape)
    nt = np.broadcast_to(np.arange(1, looks + 1) * bt, xt.shape)
    return xc, nc, xt, nt


def _naive_peeking_rejects(xc: np.ndarray, nc: np.ndarray, xt: np.ndarray, nt: np.ndarray, alpha: float) -> float:
    pooled = (xc + xt) / (nc + nt)
    with np.errstate(invalid="ignore", divide="ignore"):  # no conversions yet: z is NaN and rejects nothing
        z = (xt / nt - xc / nc) / np.sqrt(pooled * (1 - pooled) * (1 / nc + 1 / nt))
    return float(np.mean(np.any(2 * norm.sf(np.abs(z)) < alpha, axis=1)))


def test_aa_with_peeking_sequential_keeps_alpha_naive_does_not() -> None:
    alpha, rng = 0.05, np.random.default_rng(2024)
    xc, nc, xt, nt = _peeking_runs(rng, runs=300, looks=20, batch=200, pc=0.1, pt=0.1)
    seq = sequential_two_proportions(xc, nc, xt, nt, tau=0.1 * 0.1, alpha=alpha)
    seq_rate = float(np.mean(seq.p_value[:, -1] < alpha))
    covered = float(np.mean((seq.low[:, -1] <= 0) & (seq.high[:, -1] >= 0)))
    naive_rate = _naive_peeking_rejects(xc, nc, xt, nt, alpha)
    assert seq_rate <= alpha + 0.02
    assert covered >= 1 - alpha - 0.02
    assert naive_rate > 2 * alpha  # about 0.25 with 20 looks: peeking at a fixed-horizon test is not harmless


def test_planted_twenty_percent_lift_is_found_with_the_right_sign() -> None:
    rng = np.random.default_rng(7)
    xc, nc, xt, nt = _peeking_runs(rng, runs=1, looks=20, batch=1000, pc=0.10, pt=0.12)
    up = sequential_two_proportions(xc, nc, xt, nt, tau=0.02)
    assert up.p_value[0, -1] < 0.05 and up.low[0, -1] > 0 and up.high[0, -1] < 0.04
    assert up.low[0, -1] <= 0.02 <= up.high[0, -1]
    down = sequential_two_proportions(xt, nt, xc, nc, tau=0.02)  # arms swapped: control is better
    assert down.p_value[0, -1] < 0.05 and down.high[0, -1] < 0
    assert two_proportion_ztest(int(xc[0, -1]), int(nc[0, -1]), int(xt[0, -1]), int(nt[0, -1])).z > 0


@pytest.mark.slow
@pytest.mark.parametrize("weight_t", [1.0, 0.5])
def test_aa_validity_with_many_looks_and_unequal_arms(weight_t: float) -> None:
    alpha, rng = 0.05, np.random.default_rng(99)
    xc, nc, xt, nt = _peeking_runs(rng, runs=4000, looks=100, batch=100, pc=0.05, pt=0.05, weight_t=weight_t)
    seq = sequential_two_proportions(xc, nc, xt, nt, tau=0.005, alpha=alpha)
    assert float(np.mean(seq.p_value[:, -1] < alpha)) <= alpha + 0.01
    assert _naive_peeking_rejects(xc, nc, xt, nt, alpha) > 3 * alpha
