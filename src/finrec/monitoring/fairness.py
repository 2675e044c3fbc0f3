"""Fairness across protected groups: who is shown products, who is approved.

For each configured protected attribute (``protected_attributes``, e.g. ``gender``) present in the users
table, customers are grouped by its value (missing values form the group ``missing``). Numeric attributes
are banded: ``age`` into :data:`AGE_BANDS` (<25, 25-34, 35-49, 50-64, 65+); other numeric attributes with
more than :data:`MAX_LEVELS` distinct values into quartile bands of the users table; numeric attributes with
few values are taken value by value. Per group:

* ``exposure``: share of the group's answered customers (with at least one audit record) who received at
  least one item, and the mean number of items per answer. The audit log holds a keyed pseudonym, not the
  customer id, and the hash is one-way, so every customer id of the users table is hashed once with the
  audit key and records are joined on the pseudonym;
* ``approval``: approve / (approve + decline) events of the group's customers, from the event store;
* ``application rate``: apply / impression events (reported, not tested).

For exposure and approval the *adverse impact ratio* is the lowest group rate over the highest, and a
chi-square test of independence (``scipy.stats.chi2_contingency``, with Yates' correction for two groups)
asks whether the rate depends on the group. Groups with fewer than ``min_group_size`` customers (exposure)
or decisions (approval) are reported but left out of the ratio and the test. A comparison is flagged when
the ratio is below ``fairness_min_ratio`` (four-fifths rule) *and* p < ``fairness_alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import chi2_contingency

from finrec.config import MonitorSettings
from finrec.events.schema import Event
from finrec.monitoring.conversion import rate
from finrec.serving.audit import pseudonymise

#: Bands of ``age`` in years: (upper bound exclusive, label).
AGE_BANDS: tuple[tuple[float, str], ...] = ((25, "<25"), (35, "25-34"), (50, "35-49"), (65, "50-64"), (math.inf, "65+"))
#: Numeric attributes with at most this many distinct values are grouped value by value.
MAX_LEVELS = 6
MISSING = "missing"
_EVENT_INDEX = {"impression": 0, "apply": 1, "approve": 2, "decline": 3}
_pseudonym_cache: dict[tuple[bytes, str], dict[str, int]] = {}


def group_labels(values: pd.Series, attribute: str) -> tuple[np.ndarray, str, list[str]]:
    """Group label of every customer, how the groups were formed (``categorical``, ``bands: ...``), group order."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        x = values.to_numpy(dtype=float)
        known = ~np.isnan(x)
        levels = np.unique(x[known])
        if attribute == "age":
            edges = [b for b, _ in AGE_BANDS[:-1]]
            names = [n for _, n in AGE_BANDS]
            how = "bands: " + ", ".join(names)
        elif len(levels) <= MAX_LEVELS:
            out = np.array([f"{v:g}" if k else MISSING for v, k in zip(x, known, strict=True)], dtype=object)
            return out, "values", [f"{v:g}" for v in levels] + [MISSING]
        else:
            edges = sorted(set(np.quantile(x[known], [0.25, 0.5, 0.75]).tolist()))
            names = [f"<{edges[0]:g}", *[f"{a:g} to <{b:g}" for a, b in zip(edges, edges[1:], strict=False)],
                     f">={edges[-1]:g}"]  # fmt: skip
            how = "quartile bands: " + ", ".join(names)
        idx = np.searchsorted(np.asarray(edges, dtype=float), np.where(known, x, 0), side="right")
        out = np.where(known, np.asarray(names, dtype=object)[idx], MISSING)
        return out, how, [*names, MISSING]
    text = values.astype(object).map(lambda v: MISSING if v is None or v != v or str(v).strip() == "" else str(v))
    labels = text.to_numpy(dtype=object)
    return labels, "categorical", sorted(set(labels) - {MISSING}) + [MISSING]


def pseudonym_rows(user_ids: Sequence[str], key: bytes, cache_key: str | None = None) -> dict[str, int]:
    """Pseudonym -> row of every customer id; the last result is cached under ``(key, cache_key)``."""
    token = (key, cache_key) if cache_key is not None else None
    if token is not None and token in _pseudonym_cache:
        return _pseudonym_cache[token]
    rows = {pseudonymise(u, key): i for i, u in enumerate(user_ids)}
    if token is not None:
        _pseudonym_cache.clear()  # one dataset at a time: a dict of 200k pseudonyms is about 30 MB
        _pseudonym_cache[token] = rows
    return rows


def compare_groups(successes: Mapping[str, int], totals: Mapping[str, int],
                   monitor: MonitorSettings) -> dict[str, Any]:  # fmt: skip
    """Adverse impact ratio and chi-square test of ``successes / totals`` across the groups big enough."""
    tested = [g for g in totals if totals[g] >= monitor.min_group_size]
    small = [g for g in totals if g not in tested and totals[g] > 0]
    out: dict[str, Any] = {"tested_groups": tested, "excluded_groups": small, "ratio": None, "lowest": None,
                           "highest": None, "chi2": None, "p_value": None, "flagged": False, "note": None}  # fmt: skip
    if len(tested) < 2:
        out["note"] = f"fewer than two groups with at least {monitor.min_group_size}: nothing to compare"
        return out
    rates = {g: successes[g] / totals[g] for g in tested}
    out["lowest"] = min(rates, key=rates.__getitem__)
    out["highest"] = max(rates, key=rates.__getitem__)
    top = rates[out["highest"]]
    out["ratio"] = rates[out["lowest"]] / top if top > 0 else None
    table = np.array([[successes[g], totals[g] - successes[g]] for g in tested], dtype=float)
    if (table.sum(axis=0) == 0).any():
        out["chi2"], out["p_value"] = 0.0, 1.0  # every group at 0% or every group at 100%: no difference at all
    else:
        res = chi2_contingency(table)
        out["chi2"], out["p_value"] = float(res.statistic), float(res.pvalue)
    out["flagged"] = bool(out["ratio"] is not None and out["ratio"] < monitor.fairness_min_ratio
                          and out["p_value"] < monitor.fairness_alpha)  # fmt: skip
    return out


class FairnessAccumulator:
    """Per-customer tallies from audit records (:meth:`add_answer`) and events (:meth:`add_event`)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[int]] = {}  # pseudonym -> [answers, items, answers with an item]
        self.events: dict[str, list[int]] = {}  # user id -> [impressions, applications, approvals, declines]

    def add_answer(self, rec: Mapping[str, Any]) -> None:
        who = rec.get("customer")
        if not isinstance(who, str):
            return  # a prospect
        items = rec.get("items")
        n = len(items) if isinstance(items, list) else 0
        t = self.answers.setdefault(who, [0, 0, 0])
        t[0] += 1
        t[1] += n
        t[2] += n > 0

    def add_event(self, event: Event) -> None:
        i = _EVENT_INDEX.get(event.event_type)
        if i is not None:
            t = self.events.get(event.user_id)
            if t is None:
                t = self.events[event.user_id] = [0, 0, 0, 0]
            t[i] += 1

    def result(self, users: pd.DataFrame, key: bytes | None, attributes: Sequence[str], monitor: MonitorSettings,
               cache_key: str | None = None) -> dict[str, Any]:  # fmt: skip
        n = len(users)
        ids = users["user_id"].astype(str).tolist()
        per = np.zeros((n, 7), dtype=np.int64)  # answers, items, exposed answers, imp, apply, approve, decline
        unmatched_answers = 0
        if key is not None and self.answers:
            rows = pseudonym_rows(ids, key, cache_key)
            for who, t in self.answers.items():
                r = rows.get(who, -1)
                if r < 0:
                    unmatched_answers += t[0]
                else:
                    per[r, :3] = t
        ev_rows = pd.Index(ids).get_indexer(list(self.events))
        ev = np.array(list(self.events.values()), dtype=np.int64).reshape(-1, 4)
        known = ev_rows >= 0
        np.add.at(per[:, 3:], ev_rows[known], ev[known])
        return fairness_of_tallies(per, users, key is not None, attributes, monitor, unmatched_answers,
                                   int(ev[~known].sum()))  # fmt: skip


def fairness_of_tallies(per: np.ndarray, users: pd.DataFrame, exposure: bool, attributes: Sequence[str],
                        monitor: MonitorSettings, unmatched_answers: int = 0,
                        unmatched_events: int = 0) -> dict[str, Any]:  # fmt: skip
    """The fairness section from per-customer tallies ``per`` (a row per row of ``users``; columns: answers,
    items, answers with an item, impressions, applications, approvals, declines); ``exposure``: whether the
    answers could be joined to customers (an audit key)."""
    attrs: dict[str, Any] = {}
    for attr in attributes:
        if attr in users.columns:
            attrs[attr] = _attribute(users[attr], attr, per, monitor, exposure=exposure)
    flagged = [f"{a}: {m}" for a, r in attrs.items() for m in ("exposure", "approval") if r[m]["flagged"]]
    return {"attributes": attrs, "missing_attributes": [a for a in attributes if a not in users.columns],
            "flagged": flagged, "min_ratio": monitor.fairness_min_ratio, "alpha": monitor.fairness_alpha,
            "min_group_size": monitor.min_group_size, "exposure_available": exposure,
            "unmatched_answers": unmatched_answers, "unmatched_events": unmatched_events}  # fmt: skip


def _attribute(values: pd.Series, attr: str, per: np.ndarray, monitor: MonitorSettings,
               exposure: bool) -> dict[str, Any]:  # fmt: skip
    labels, how, order = group_labels(values, attr)
    frame = pd.DataFrame(per, columns=["answers", "items", "exposed", "imp", "apply", "approve", "decline"])
    frame["answered"] = frame["answers"] > 0
    frame["reached"] = frame["exposed"] > 0
    frame["customers"] = 1
    agg = frame.groupby(labels).sum()
    agg = agg.loc[[g for g in order if g in agg.index]]
    conf = monitor.confidence
    groups: list[dict[str, Any]] = []
    for g, r in agg.iterrows():
        decisions = int(r["approve"] + r["decline"])
        groups.append({
            "group": str(g), "customers": int(r["customers"]), "answered": int(r["answered"]),
            "exposure": rate(int(r["reached"]), int(r["answered"]), conf),
            "items_per_answer": float(r["items"] / r["answers"]) if r["answers"] else None,
            "decisions": decisions, "approval": rate(int(r["approve"]), decisions, conf),
            "impressions": int(r["imp"]), "applications": int(r["apply"]),
            "application_rate": float(r["apply"] / r["imp"]) if r["imp"] else None,
        })  # fmt: skip
    exp = compare_groups({g["group"]: int(agg.loc[g["group"], "reached"]) for g in groups},
                         {g["group"]: g["answered"] for g in groups}, monitor)  # fmt: skip
    if not exposure:
        exp = {**exp, "ratio": None, "p_value": None, "flagged": False, "note": "no audit key: exposure unknown"}
    app = compare_groups({g["group"]: int(agg.loc[g["group"], "approve"]) for g in groups},
                         {g["group"]: g["decisions"] for g in groups}, monitor)  # fmt: skip
    return {"grouping": how, "groups": groups, "exposure": exp, "approval": app}


def fairness_figure(fairness: Mapping[str, Any]) -> Figure | None:
    """Per attribute, exposure and approval bars per group (intervals), a dashed line at min_ratio x highest."""
    from finrec.evaluation.html import _color, _new_figure

    attrs = fairness.get("attributes") or {}
    if not attrs:
        return None
    min_ratio = float(fairness.get("min_ratio", 0.8))
    fig = _new_figure(10.0, 3.0 * len(attrs) + 0.3)
    axes = fig.subplots(len(attrs), 2, squeeze=False)
    for row, (attr, res) in zip(axes, attrs.items(), strict=True):
        for ax, metric in zip(row, ("exposure", "approval"), strict=True):
            groups = res["groups"]
            tested = set(res[metric]["tested_groups"])
            vals = [g[metric]["rate"] for g in groups]
            ys = [v if v is not None else 0.0 for v in vals]
            err = [[max(0.0, y - (g[metric]["low"] or y)) for y, g in zip(ys, groups, strict=True)],
                   [max(0.0, (g[metric]["high"] or y) - y) for y, g in zip(ys, groups, strict=True)]]  # fmt: skip
            colors = [_color(3) if g["group"] in tested else "#cccccc" for g in groups]
            ax.bar(range(len(groups)), ys, yerr=err, capsize=3, color=colors)
            ax.set_xticks(range(len(groups)), [g["group"] for g in groups], fontsize="small")
            top = max((y for y, g in zip(ys, groups, strict=True) if g["group"] in tested), default=None)
            if top:
                ax.axhline(min_ratio * top, color=_color(4), linestyle="--", linewidth=1,
                           label=f"{min_ratio:g} x highest")  # fmt: skip
                ax.legend(frameon=False, fontsize="x-small", loc="lower right")
            ratio = res[metric]["ratio"]
            flag = " FLAGGED" if res[metric]["flagged"] else ""
            ax.set_title(f"{attr}: {metric} (ratio {'—' if ratio is None else f'{ratio:.2f}'}){flag}",
                         fontsize="medium", color=_color(4) if flag else "black")  # fmt: skip
            ax.set_ylim(0, 1.05)
            ax.grid(axis="y", alpha=0.3)
    return fig


_NO_RATE: dict[str, float | None] = {"rate": None, "low": None, "high": None}


def suppress_small_groups(report: dict[str, Any], min_size: int) -> dict[str, Any]:
    """Blank the fairness cells of groups with fewer than ``min_size`` customers behind them, in place.

    A published count that moves by one when one customer is answered (or decided) tells a watcher which group
    that customer is in; below ``min_size`` customers a cell shows nothing (and ``suppressed`` lists what was
    blanked). Exposure and item counts rest on the customers answered, approval on the decisions, the group's
    size on its customers.
    """
    fairness = report.get("fairness") or {}
    for res in (fairness.get("attributes") or {}).values():
        for g in res.get("groups") or []:
            blanked = []
            if (g.get("customers") or 0) < min_size:
                g["customers"] = None
                blanked.append("customers")
            if (g.get("answered") or 0) < min_size:
                g.update(answered=None, exposure=dict(_NO_RATE), items_per_answer=None, impressions=None,
                         applications=None, application_rate=None)  # fmt: skip
                blanked.append("answered")
            if (g.get("decisions") or 0) < min_size:
                g.update(decisions=None, approval=dict(_NO_RATE))
                blanked.append("decisions")
            if blanked:
                g["suppressed"] = blanked
    if fairness:
        fairness["min_reported_group_size"] = min_size
    return report
