"""Guardrail health from the audit log: how often answers are empty or short, what each guardrail removes,
how much of the catalogue is served.

Every answer of the service is one audit record (:mod:`finrec.serving.audit`) with its ``items`` and, in
``excluded``, how many products each guardrail removed before scoring (each product counted once, under the
first guardrail that removed it). From them:

* ``answers`` (by ``kind``: customer or prospect, and by model version);
* ``empty``: answers with no item; ``short``: answers with fewer items than the ``k`` asked for, among the
  records that say their ``k`` (``k_recorded``; a record without one is compared with ``default_k`` when that
  is given, else left out: the service's audit records do not carry ``k`` yet, so ``short`` is then unknown);
* ``items_per_answer``: mean and distribution;
* ``removed``: per guardrail, the products removed summed over answers and per answer on average;
* ``coverage``: distinct catalogue products served at least once / catalogue size, overall and per model
  version (products no longer in the catalogue are not counted).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from finrec.monitoring.conversion import AuditReader


class HealthAccumulator:
    """Consumes audit records one by one (:meth:`add`); :meth:`result` summarises them."""

    def __init__(self, default_k: int | None = None) -> None:
        self.default_k = default_k
        self.answers = 0
        self.kinds: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.empty = self.short = self.k_recorded = self.k_known = self.items = 0
        self.item_counts: Counter[int] = Counter()
        self.removed: dict[str, int] = defaultdict(int)
        self.served: set[Any] = set()  # product ids as the records spell them (text)
        self.served_by_model: dict[str, set[Any]] = defaultdict(set)
        self.first_ts: float | None = None
        self.last_ts: float | None = None

    def add(self, rec: Mapping[str, Any]) -> None:
        items = rec.get("items")
        if type(items) is not list:
            items = []
        n = len(items)
        k = rec.get("k")
        if type(k) is int and k > 0:
            self.k_recorded += 1
        else:
            k = self.default_k
        if k is not None:
            self.k_known += 1
            self.short += n < k
        mv = str(rec.get("model_version") or "unknown")
        self.answers += 1
        self.kinds[str(rec.get("kind") or "unknown")] += 1
        self.by_model[mv] += 1
        self.items += n
        self.item_counts[n] += 1
        self.empty += n == 0
        excluded = rec.get("excluded")
        if type(excluded) is dict:
            removed = self.removed
            for rule, count in excluded.items():
                if type(count) is int:
                    removed[rule] += count
        if n:
            products = [it.get("product_id") for it in items if type(it) is dict]
            self.served.update(products)
            self.served_by_model[mv].update(products)
        ts = rec.get("ts")
        if isinstance(ts, int | float):
            if self.first_ts is None or ts < self.first_ts:
                self.first_ts = ts
            if self.last_ts is None or ts > self.last_ts:
                self.last_ts = ts

    def result(self, catalogue: Iterable[str] | None = None) -> dict[str, Any]:
        """JSON-ready summary; ``catalogue`` (product ids) gives the coverage denominators."""
        n = self.answers
        cat = {str(p) for p in catalogue} if catalogue is not None else None

        def coverage(served: set[Any]) -> dict[str, Any]:
            served = {str(p) for p in served if p is not None}
            if cat is None:
                return {"distinct_products": len(served), "catalogue_size": None, "coverage": None}
            hit = len(served & cat)
            return {"distinct_products": hit, "catalogue_size": len(cat), "coverage": hit / len(cat) if cat else None}

        return {
            "answers": n,
            "kinds": dict(self.kinds),
            "answers_by_model_version": dict(self.by_model),
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "default_k": self.default_k,
            "k_recorded": self.k_recorded,
            "empty": {"count": self.empty, "rate": self.empty / n if n else None},
            "short": {"count": self.short, "rate": self.short / self.k_known if self.k_known else None,
                      "answers_with_k": self.k_known},
            "items_per_answer": {"mean": self.items / n if n else None,
                                 "distribution": {str(k): v for k, v in sorted(self.item_counts.items())}},
            "removed": {rule: {"sum": s, "mean": s / n if n else None} for rule, s in self.removed.items()},
            "coverage": {**coverage(self.served),
                         "per_model_version": {mv: coverage(s) for mv, s in sorted(self.served_by_model.items())}},
        }  # fmt: skip


def guardrail_health(audit_path: Path | None, catalogue: Iterable[str] | None = None,
                     default_k: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Scan an audit log on its own and summarise it (:meth:`HealthAccumulator.result`)."""
    acc = HealthAccumulator(default_k)
    reader = AuditReader(audit_path)
    for rec in reader:
        acc.add(rec)
    return {**acc.result(catalogue), "skipped_lines": reader.skipped}


def health_figure(health: Mapping[str, Any]) -> Figure | None:
    """Three panels: products removed per answer by guardrail, catalogue coverage, items per answer."""
    from finrec.evaluation.html import _color, _new_figure

    if not health.get("answers"):
        return None
    fig = _new_figure(11.0, 3.6)
    ax_rm, ax_cov, ax_items = fig.subplots(1, 3, width_ratios=[1.3, 1, 1])
    removed = health.get("removed") or {}
    rules = list(removed)
    means = [removed[r]["mean"] or 0.0 for r in rules]
    ax_rm.barh(range(len(rules)), means, color=_color(3))
    ax_rm.set_yticks(range(len(rules)), rules, fontsize="small")
    ax_rm.invert_yaxis()
    for i, r in enumerate(rules):
        ax_rm.annotate(f" {removed[r]['sum']:,}", (means[i], i), va="center", fontsize="x-small")
    ax_rm.set_title("products removed per answer (label: total)", fontsize="medium")
    ax_rm.grid(axis="x", alpha=0.3)

    cov = health.get("coverage") or {}
    per = cov.get("per_model_version") or {}
    names = ["all", *per]
    values = [cov.get("coverage") or 0.0, *[(v.get("coverage") or 0.0) for v in per.values()]]
    ax_cov.bar(range(len(names)), values, color=[_color(0)] + [_color(i + 1) for i in range(len(per))])
    ax_cov.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize="x-small")
    ax_cov.set_ylim(0, 1.05)
    ax_cov.set_title("catalogue coverage", fontsize="medium")
    ax_cov.grid(axis="y", alpha=0.3)

    dist = (health.get("items_per_answer") or {}).get("distribution") or {}
    ks = [int(k) for k in dist]
    ax_items.bar(ks, [dist[str(k)] for k in ks], color=_color(2))
    ax_items.set_xlabel("items in the answer")
    ax_items.set_ylabel("answers")
    ax_items.set_title("items per answer", fontsize="medium")
    ax_items.grid(axis="y", alpha=0.3)
    return fig
