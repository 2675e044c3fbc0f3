"""One arm against control: conversion tests, the fixed-horizon plan, the sequential test, the decision, guardrails.

Works on :class:`ArmData`, the per-customer arrays of one arm that :mod:`finrec.experiments.analysis` collects
from the audit log and the events; see that module for what is counted and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from finrec.config import ExperimentSettings
from finrec.experiments import stats

#: customer-level conversions, each an event type
METRICS = ("click", "apply", "approve")
#: conversion -> column of ``ArmData.converted_at``
CONVERSION_INDEX = {"click": 0, "apply": 1, "approve": 2}
TREATMENT_BETTER, CONTROL_BETTER, NO_DIFFERENCE = "treatment better", "control better", "no significant difference yet"
_APPROVE, _DECLINE = 3, 4  # columns of ArmData.counts


@dataclass
class ArmData:
    """Per-customer arrays of one arm, one row per exposed customer in order of first exposure.

    ``first`` is the first exposure (unix seconds), ``answers`` and ``empty`` the customer's answers and empty
    ones, ``counts`` their impressions, clicks, applications, approvals and declines, ``converted_at`` the time
    of their first click, application and approval after exposure (``inf``: never).
    """

    first: np.ndarray
    answers: np.ndarray
    empty: np.ndarray
    counts: np.ndarray  # customers x (impression, click, apply, approve, decline)
    converted_at: np.ndarray  # customers x (click, apply, approve); inf when never

    @classmethod
    def of(cls, members: Sequence[Any]) -> ArmData:
        """From objects with attributes ``first``, ``answers``, ``empty``, ``counts`` and ``converted_at``."""
        members = sorted(members, key=lambda c: c.first)

        def column(attr: str) -> np.ndarray:
            return np.array([getattr(c, attr) for c in members], float)

        return cls(column("first"), column("answers"), column("empty"), column("counts").reshape(-1, 5),
                   column("converted_at").reshape(-1, 3))  # fmt: skip

    @property
    def n(self) -> int:
        """Exposed customers."""
        return len(self.first)

    def converted(self, metric: str) -> int:
        """Customers who converted on ``metric`` (click, apply or approve) at least once."""
        return int(np.isfinite(self.converted_at[:, CONVERSION_INDEX[metric]]).sum())


def look_times(arms: dict[str, ArmData], looks: int) -> list[float]:
    """When the sequential test looks: as each ``1/looks`` of all customers has arrived, then at the end (inf).

    Looks evenly spaced over arrivals rather than over time keep every look informative even when traffic is
    uneven (weekends, a launch), and repeat exactly when the analysis is run again on the same data.
    """
    everyone = np.sort(np.concatenate([a.first for a in arms.values()]))
    if everyone.size == 0:
        return []
    idx = np.ceil(np.arange(1, looks + 1) * everyone.size / looks).astype(int) - 1
    return [*sorted(set(everyone[idx].tolist())), math.inf]  # inf: the final look, with every event so far


def _cumulative(a: ArmData, metric: str, times: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    conv = a.converted_at[:, CONVERSION_INDEX[metric]]
    conv = np.sort(conv[np.isfinite(conv)])  # inf = never converted, which even the final look must not count
    t = np.asarray(times)
    return np.searchsorted(conv, t, side="right"), np.searchsorted(a.first, t, side="right")


def compare_with_control(exp: ExperimentSettings, ctl: str, arm: str, arms: dict[str, ArmData],
                         times: Sequence[float], alpha: float, tau: float | None,
                         min_units: int) -> dict[str, Any]:  # fmt: skip
    """Arm ``arm`` against control ``ctl``: every metric's tests, the plan, the sequential test and the decision.

    Parameters
    ----------
    exp
        The experiment (weights, primary metric, power, minimum detectable effect).
    ctl, arm
        Names of the control arm and the compared arm, keys of ``arms``.
    times
        Looks of the sequential test, from :func:`look_times`.
    alpha
        Level of this comparison (the experiment's alpha already divided among the comparisons).
    tau
        Mixing standard deviation of the mSPRT; None: control's rate times the minimum detectable effect.
    min_units
        Customers both arms need before a look carries evidence.

    Returns
    -------
    dict
        JSON-ready: ``metrics``, ``sequential`` (with ``looks``), ``plan``, ``decision``, ``decision_basis``,
        ``reason`` and ``guardrails``.
    """
    c, t = arms[ctl], arms[arm]
    conf = 1 - alpha
    metrics = {}
    for m in METRICS:
        xc, xt = c.converted(m), t.converted(m)
        z = stats.two_proportion_ztest(xc, c.n, xt, t.n)
        metrics[m] = {"difference": stats.difference_interval(xc, c.n, xt, t.n, conf)._asdict(),
                      "relative_lift": stats.relative_lift_interval(xc, c.n, xt, t.n, conf)._asdict(),
                      "z": z.z, "p_value": z.p_value}  # fmt: skip
    primary = exp.primary_metric
    baseline = c.converted(primary) / c.n if c.n else 0.0
    plan: dict[str, Any] = {"baseline": baseline if c.n else None, "relative_mde": exp.min_detectable_effect,
                            "power": exp.power, "required": None, "progress": None, "reached": False}  # fmt: skip
    try:
        need = stats.required_sample_size(baseline, exp.min_detectable_effect, alpha, exp.power,
                                          ratio=exp.arms[arm].weight / exp.arms[ctl].weight)  # fmt: skip
        progress = min(c.n / need.control, t.n / need.treatment)
        plan.update(required={ctl: need.control, arm: need.treatment}, progress=progress, reached=progress >= 1)
    except ValueError as exc:  # no conversions in control yet, or a lift that would pass a rate of 1
        plan["note"] = f"no plan: {exc}"
    tau = tau if tau is not None else (baseline * exp.min_detectable_effect or None)
    seq: dict[str, Any] = {"metric": primary, "tau": tau, "p_value": 1.0, "low": -1.0, "high": 1.0, "looks": []}
    if tau is not None and times:
        xc_l, nc_l = _cumulative(c, primary, times)
        xt_l, nt_l = _cumulative(t, primary, times)
        r = stats.sequential_two_proportions(xc_l, nc_l, xt_l, nt_l, tau=tau, alpha=alpha, min_units=min_units)
        seq.update(tau=tau, p_value=float(r.p_value[-1]), low=float(r.low[-1]), high=float(r.high[-1]),
                   looks=[{"time": tt, "customers": {ctl: int(a), arm: int(b)},
                           "conversions": {ctl: int(x), arm: int(y)},
                           "difference": float(d), "low": float(lo), "high": float(hi), "p_value": float(p)}
                          for tt, a, b, x, y, d, lo, hi, p in zip(times, nc_l, nt_l, xc_l, xt_l, r.estimate, r.low,
                                                                  r.high, r.p_value, strict=True)])  # fmt: skip
    else:
        seq["note"] = "no sequential test until control has a conversion (tau is sized on its rate)"
    decision, basis, reason = _decide(metrics[primary], seq, plan, alpha)
    approved_c, decided_c = c.counts[:, _APPROVE], c.counts[:, _APPROVE] + c.counts[:, _DECLINE]
    approved_t, decided_t = t.counts[:, _APPROVE], t.counts[:, _APPROVE] + t.counts[:, _DECLINE]
    guard = {"approval_rate": _guardrail(approved_c, decided_c, approved_t, decided_t, conf, worse_if_lower=True),
             "empty_answer_rate": _guardrail(c.empty, c.answers, t.empty, t.answers, conf,
                                             worse_if_lower=False)}  # fmt: skip
    return {"arm": arm, "control": ctl, "metrics": metrics, "sequential": seq, "plan": plan, "decision": decision,
            "decision_basis": basis, "reason": reason, "guardrails": guard}  # fmt: skip


def _decide(fixed: dict[str, Any], seq: dict[str, Any], plan: dict[str, Any],
            alpha: float) -> tuple[str, str | None, str]:  # fmt: skip
    if seq["p_value"] < alpha:
        better = TREATMENT_BETTER if seq["low"] > 0 else CONTROL_BETTER
        return better, "sequential", "the always-valid confidence sequence of the difference excludes 0"
    if plan["reached"] and fixed["p_value"] < alpha:
        better = TREATMENT_BETTER if fixed["z"] > 0 else CONTROL_BETTER
        return better, "fixed-horizon", ("the planned sample is reached and the fixed-horizon test is significant "
                                         "(valid if this is the first look at or past the plan)")  # fmt: skip
    if plan["reached"]:
        return NO_DIFFERENCE, None, "planned sample reached: any effect is likely smaller than the detectable one"
    progress = plan["progress"]
    done = f"{progress:.0%} of the planned sample" if progress is not None else "no plan yet"
    return NO_DIFFERENCE, None, f"keep collecting ({done}); the sequential test may be read at any time"


def _guardrail(nc: np.ndarray, dc: np.ndarray, nt: np.ndarray, dt: np.ndarray, confidence: float,
               worse_if_lower: bool) -> dict[str, Any]:  # fmt: skip
    r = stats.ratio_comparison(nc, dc, nt, dt, confidence)
    worse = r.difference < 0 if worse_if_lower else r.difference > 0
    significant = math.isfinite(r.p_value) and r.p_value < 1 - confidence
    return {"control": r.control, "treatment": r.treatment, "difference": r.difference, "low": r.low,
            "high": r.high, "p_value": r.p_value, "flagged": bool(significant and worse)}  # fmt: skip
