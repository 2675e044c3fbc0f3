"""What the arms of an A/B test did: conversion per customer, comparisons with control, SRM, guardrails.

The unit of randomisation is the customer, so it is the unit of analysis too. The exposed customers of an arm
are the distinct pseudonyms (``customer``) in the audit records of the experiment (prospects have no arm and
are left out), each with the time of their first answer (``served_at``, the service clock that also stamps
events and decides the experiment's window; ``ts`` when it is missing). A customer's events count from their
first exposure until the experiment's ``stop``, whatever product or request they concern: the question is
whether the arm changed what the customer did, and an effect on products the arm did not show (cannibalisation)
is part of the answer. Each customer counts once per metric: clicked at least once, applied, was approved.

Customers stay in the arm of their first exposure (intention to treat). Assignment is a hash, so a customer
in two arms means the configuration (salt, weights, arms) changed during the experiment or something else
broke; such customers are counted and reported as an integrity problem.

Comparisons of each other arm with control use the pooled z-test, Newcombe's interval of the difference and the
delta-method interval of the relative lift, at ``alpha / (arms - 1)`` (Bonferroni) so that the chance of any
false winner stays at ``alpha``. The decision rests on the always-valid mSPRT (:mod:`finrec.experiments.stats`)
replayed at looks spread over the customers' first exposures: it may be read at any time, as often as one
likes. The fixed-horizon test is reported beside it with the sample size it needs, and decides only once that
size is reached. Ratio metrics (per impression, approval rate, empty answers) get delta-method intervals over
customers, since the events of one customer are not independent.

Examples
--------
>>> from finrec.config import ExperimentSettings
>>> exp = ExperimentSettings(name="x", arms={"a": {"model": "champion", "weight": 1},
...                                          "b": {"model": "challenger", "weight": 1}})
>>> analyze_experiment(exp, [], [], key=b"k" * 32, now=0.0)["comparisons"][0]["decision"]
'no significant difference yet'
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from finrec.config import ExperimentSettings
from finrec.errors import FinrecError
from finrec.events.schema import Event
from finrec.experiments import stats
from finrec.experiments.assignment import assign_arm
from finrec.experiments.comparison import CONVERSION_INDEX, METRICS, ArmData, compare_with_control, look_times
from finrec.monitoring.conversion import rate
from finrec.serving.audit import pseudonymise

if TYPE_CHECKING:  # pragma: no cover
    from finrec.config import FinrecSettings
    from finrec.events.store import EventStore

#: event type -> index into a customer's counts (the columns of ``ArmData.counts``)
_COUNTED = {"impression": 0, "click": 1, "apply": 2, "approve": 3, "decline": 4}
DEFAULT_LOOKS = 20
DEFAULT_MIN_UNITS = 100


@dataclass(slots=True)
class _Customer:
    arm: str
    first: float
    answers: int = 0
    empty: int = 0
    counts: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])
    converted_at: list[float] = field(default_factory=lambda: [math.inf, math.inf, math.inf])


def _timestamp(value: datetime | None, default: float) -> float:
    return default if value is None else value.timestamp()


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


# -- reading -----------------------------------------------------------------------------------------------


def _read_exposures(exp: ExperimentSettings, records: Iterable[dict[str, Any]], start: float,
                    stop: float) -> tuple[dict[str, _Customer], Counter[str]]:  # fmt: skip
    customers: dict[str, _Customer] = {}
    seen_arms: dict[str, set[str]] = {}
    problems: Counter[str] = Counter()
    for rec in records:
        if rec.get("experiment") != exp.name:
            continue
        who, arm = rec.get("customer"), rec.get("arm")
        if who is None or rec.get("kind") == "prospect":
            problems["prospect_records"] += 1  # not a problem: prospects are never in an arm
            continue
        t = _number(rec.get("served_at"))
        t = t if t is not None else _number(rec.get("ts"))
        if arm not in exp.arms or t is None:
            problems["records_without_arm_or_time"] += 1
            continue
        problems["records_outside_window"] += not start <= t < stop
        c = customers.get(who)
        if c is None:
            c = customers[who] = _Customer(arm, t)
            seen_arms[who] = {arm}
        else:
            seen_arms[who].add(arm)
            if t < c.first:  # the log is in write order, which can differ from served_at order across workers
                c.first, c.arm = t, arm
        c.answers += 1
        c.empty += not rec.get("items")
    problems["customers_in_several_arms"] = sum(len(a) > 1 for a in seen_arms.values())
    return customers, problems


def _read_events(exp: ExperimentSettings, customers: dict[str, _Customer], events: Iterable[Event], key: bytes,
                 start: float, stop: float) -> tuple[Counter[str], int, float]:  # fmt: skip
    counts: Counter[str] = Counter()
    pseudonyms: dict[str, str] = {}
    checked: set[str] = set()
    mismatched = 0
    last = -math.inf
    for e in events:
        counts["read"] += 1
        who = pseudonyms.get(e.user_id)
        if who is None:
            who = pseudonyms[e.user_id] = pseudonymise(e.user_id, key)
        c = customers.get(who)
        if c is None:
            counts["not_exposed" if start <= e.ts < stop else "outside_window"] += 1
            continue
        if who not in checked:  # the raw id is here, so assignment can be recomputed and checked
            checked.add(who)
            mismatched += assign_arm(e.user_id, exp) != c.arm
        # Event times are whole seconds and exposures have milliseconds: a click in the second of the answer
        # has a ts just below served_at.
        if e.ts < math.floor(c.first):
            counts["before_exposure"] += 1
            continue
        if e.ts >= stop:
            counts["after_stop"] += 1
            continue
        counts["attributed"] += 1
        counts["arm_differs_from_audit"] += e.arm is not None and e.arm != c.arm
        last = max(last, float(e.ts))
        i = _COUNTED.get(e.event_type)
        if i is None:
            continue
        c.counts[i] += 1
        j = CONVERSION_INDEX.get(e.event_type)
        if j is not None:
            c.converted_at[j] = min(c.converted_at[j], max(float(e.ts), c.first))
    return counts, mismatched, last


# -- the report --------------------------------------------------------------------------------------------


def _interval(iv: tuple[float, float, float]) -> dict[str, float]:
    return {"rate": iv[0], "low": iv[1], "high": iv[2]}


def _arm_summary(exp: ExperimentSettings, name: str, a: ArmData, confidence: float) -> dict[str, Any]:
    imp, clicks, applies, approves, declines = (a.counts[:, i] for i in range(5))
    totals = {k: int(v.sum()) for k, v in zip(("impressions", "clicks", "applications", "approvals", "declines"),
                                                (imp, clicks, applies, approves, declines), strict=True)}  # fmt: skip
    return {
        "model": exp.arms[name].model, "weight": exp.arms[name].weight, "customers": a.n,
        "answers": int(a.answers.sum()), "empty_answers": int(a.empty.sum()), **totals,
        "customer_rates": {m: rate(a.converted(m), a.n, confidence) for m in METRICS},
        "impression_rates": {m: _interval(stats.ratio_interval(num, imp, confidence))
                             for m, num in zip(METRICS, (clicks, applies, approves), strict=True)},
        "approval_rate": _interval(stats.ratio_interval(approves, approves + declines, confidence)),
        "empty_answer_rate": _interval(stats.ratio_interval(a.empty, a.answers, confidence)),
    }  # fmt: skip


def analyze_experiment(
    exp: ExperimentSettings,
    records: Iterable[dict[str, Any]],
    events: Iterable[Event],
    key: bytes,
    now: float | None = None,
    *,
    looks: int = DEFAULT_LOOKS,
    tau: float | None = None,
    min_units: int = DEFAULT_MIN_UNITS,
) -> dict[str, Any]:
    """Analyse one experiment from the audit records and feedback events; a JSON-ready report.

    Parameters
    ----------
    exp
        The experiment as configured (arms, weights, control, window, primary metric, alpha, power, MDE).
    records
        Audit records (any experiment; others are skipped), read once before ``events``.
    events
        Feedback events (the whole store is fine: events of customers not exposed are counted and skipped).
    key
        The audit log's pseudonymisation key, to match events' ``user_id`` to records' ``customer``.
    now
        Time of the analysis (unix seconds, service clock) for the status; default: the machine's clock.
    looks
        Checkpoints of the sequential test, evenly spaced over the customers' first exposures (plus the final).
    tau
        Mixing standard deviation of the mSPRT, an absolute difference in the primary rate. Default: the control
        rate times ``min_detectable_effect`` (see :func:`finrec.experiments.stats.mixture_sprt`).
    min_units
        Customers both arms need before a look carries evidence.

    Returns
    -------
    dict
        ``arms`` (per-arm counts and rates), ``comparisons`` (each arm against control, with ``decision``),
        ``srm``, ``integrity``, ``events`` (how each event was used), ``warnings`` and ``trustworthy``.
    """
    now = time.time() if now is None else now
    start, stop = _timestamp(exp.start, -math.inf), _timestamp(exp.stop, math.inf)
    customers, problems = _read_exposures(exp, records, start, stop)
    event_counts, mismatched, last_event = _read_events(exp, customers, events, key, start, stop)
    ctl = exp.control_arm
    n_compared = len(exp.arms) - 1
    alpha_each = exp.alpha / n_compared
    arms = {name: ArmData.of([c for c in customers.values() if c.arm == name]) for name in exp.arms}
    times = look_times(arms, looks)
    comparisons = [compare_with_control(exp, ctl, name, arms, times, alpha_each, tau, min_units) for name in exp.arms
                   if name != ctl]  # fmt: skip
    final_time = max([last_event, *(float(a.first[-1]) for a in arms.values() if a.n)], default=None)
    for comp in comparisons:  # the final look happens at the last thing seen, not at infinity
        if comp["sequential"]["looks"]:
            comp["sequential"]["looks"][-1]["time"] = final_time
    srm = stats.sample_ratio_mismatch([arms[a].n for a in exp.arms], [w.weight for w in exp.arms.values()])
    integrity = {"customers_in_several_arms": problems["customers_in_several_arms"],
                 "assignment_mismatches": mismatched,
                 "records_without_arm_or_time": problems["records_without_arm_or_time"],
                 "records_outside_window": problems["records_outside_window"],
                 "events_arm_differs_from_audit": event_counts["arm_differs_from_audit"]}  # fmt: skip
    warnings = _warnings(srm, integrity, comparisons, ctl)
    report = {
        "experiment": exp.name, "status": _status(now, start, stop), "analysed_at": _iso(now),
        "window": {"start": _iso(start), "stop": _iso(stop)}, "control": ctl, "primary_metric": exp.primary_metric,
        "alpha": exp.alpha, "alpha_per_comparison": alpha_each, "confidence": 1 - exp.alpha,
        "arms": {name: _arm_summary(exp, name, a, 1 - exp.alpha) for name, a in arms.items()},
        "comparisons": comparisons,
        "srm": {"chi2": srm.chi2, "df": srm.df, "p_value": srm.p_value, "threshold": stats.SRM_THRESHOLD,
                "expected": dict(zip(exp.arms, srm.expected, strict=True)), "mismatch": srm.mismatch},
        "integrity": {**integrity, "prospect_records": problems["prospect_records"]},
        "events": {k: int(event_counts[k]) for k in ("read", "attributed", "not_exposed", "before_exposure",
                                                     "after_stop", "outside_window")},
        "warnings": warnings, "trustworthy": not srm.mismatch and not integrity["customers_in_several_arms"],
    }  # fmt: skip
    return _json_ready(report)


def _warnings(srm: stats.SampleRatioCheck, integrity: dict[str, int], comparisons: list[dict[str, Any]],
              ctl: str) -> list[str]:  # fmt: skip
    out = []
    if srm.mismatch:
        out.append(f"SAMPLE RATIO MISMATCH (p = {srm.p_value:.2g} < {stats.SRM_THRESHOLD}): the customers per arm do "
                   "not fit the weights, so something loses or adds customers in some arm; every comparison below is "
                   "UNTRUSTWORTHY until the cause is found")  # fmt: skip
    if integrity["customers_in_several_arms"]:
        out.append(f"{integrity['customers_in_several_arms']} customer(s) were served in more than one arm (kept in "
                   "their first arm); did the salt, weights or arms change during the experiment?")  # fmt: skip
    if integrity["assignment_mismatches"]:
        out.append(f"{integrity['assignment_mismatches']} customer(s) were served in another arm than the configured "
                   "assignment gives; is this the configuration the service ran with?")  # fmt: skip
    for comp in comparisons:
        for name, g in comp["guardrails"].items():
            if g["flagged"]:
                out.append(f"guardrail: {name.replace('_', ' ')} of arm {comp['arm']} is significantly worse than "
                           f"{ctl}'s")  # fmt: skip
    return out


def _status(now: float, start: float, stop: float) -> str:
    return "not started" if now < start else "running" if now < stop else "stopped"


def _iso(ts: float | None) -> str | None:
    if ts is None or not math.isfinite(ts):
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# -- loading from settings ---------------------------------------------------------------------------------


def find_experiment(experiments: Sequence[ExperimentSettings], name: str) -> ExperimentSettings:
    """The configured experiment called ``name``; a :class:`FinrecError` listing the configured ones if none."""
    for exp in experiments:
        if exp.name == name:
            return exp
    names = ", ".join(e.name for e in experiments) or "none"
    raise FinrecError(f"no experiment named {name!r} is configured (configured: {names})",
                      hint="check the spelling, or configure it in the settings file (docs/experiments.md); "
                      "`finrec experiment list` shows the configured ones")  # fmt: skip


def analyze_configured(
    settings: FinrecSettings,
    name: str,
    *,
    now: float | None = None,
    tau: float | None = None,
    open_store: Callable[[str], EventStore] | None = None,
) -> dict[str, Any]:
    """Analyse experiment ``name`` from the service's audit log and event store as the settings locate them.

    Raises
    ------
    FinrecError
        The experiment is not configured, or the audit log or its key is missing (the key is never created
        here: a new key would match no record).
    """
    from finrec.events.store import open_event_store
    from finrec.monitoring.conversion import AuditReader, iter_events
    from finrec.serving.audit import read_existing_key

    exp = find_experiment(settings.experiments, name)
    audit_path, key_path = settings.serve.audit_paths(settings.workspace)
    key = read_existing_key(audit_path, key_path)
    url = settings.serve.event_store_url(settings.workspace)
    store = (open_store or open_event_store)(url)
    reader = AuditReader(audit_path)
    try:
        report = analyze_experiment(exp, reader, (e for _, e in iter_events(store)), key, now, tau=tau)
    finally:
        store.close()
    report["sources"] = {"audit_log": str(audit_path), "audit_records": reader.records,
                         "audit_skipped_lines": reader.skipped, "event_store": _without_password(url)}  # fmt: skip
    return report


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username + ':***@' if parts.username else ':***@'}{host}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit(parts._replace(netloc=netloc))
