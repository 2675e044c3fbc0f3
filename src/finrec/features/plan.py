"""The validation plan: which part of the data a model may learn from while it is being chosen, and the answer.

Real data comes in shapes a fixed temporal split starves: a few months of bursty
history, one or two monthly holdings snapshots, holdings with no dates at all. The plan
is chosen from the data (``[train] validation = "auto"``) and reported:

``temporal``
    a cutoff ``T`` at the 80th percentile of the positives' times (moved past the first
    time when most positives share it, as with a first holdings snapshot). The model learns
    from events before ``T``; the answer is what customers who already had a positive before
    ``T`` newly took at or after it (pairs positive before ``T`` are not new). Chosen when at
    least ``MIN_CUSTOMERS`` customers have such an answer.
``holdout``
    per customer, a seeded random 20% (at least one) of the products they have a positive
    with is held out, every event of those pairs removed; the answer is the held-out pairs.
    For data without time (every event at one moment) or without enough customers who come
    back after ``T``.

Either way the same models are then fitted on everything (``[train] refit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from finrec.candidates.interactions import grade_table, positive_mask
from finrec.data.dataset import Dataset

MIN_CUSTOMERS = 50
TEMPORAL_QUANTILE = 0.8
HOLDOUT_SHARE = 0.2


@dataclass
class ValidationPlan:
    kind: Literal["temporal", "holdout"]
    cutoff: int  # features and sources at this time (temporal: T; holdout: after the last event)
    keep: np.ndarray  # bool per event of the dataset: what the model may learn from during validation
    targets: pd.DataFrame  # user, product, grade: the answer
    reason: str

    @property
    def n_customers(self) -> int:
        return int(self.targets["user"].nunique()) if len(self.targets) else 0

    def earlier(self, ds: Dataset, grades: dict[str, int], min_grade: int) -> ValidationPlan | None:
        """A temporal plan inside this one's learning part (before its cutoff): where a ranker can learn, so
        that this plan's later window judges it forward in time. None when there is not enough signal."""
        if self.kind != "temporal":
            return None
        plan = _temporal(ds, grades, min_grade, end=self.cutoff)
        if plan is None or plan.n_customers < MIN_CUSTOMERS or plan.cutoff >= self.cutoff:
            return None
        return plan

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "cutoff": int(self.cutoff), "customers": self.n_customers,
                "pairs": int(len(self.targets)), "reason": self.reason}  # fmt: skip

    @classmethod
    def choose(cls, ds: Dataset, grades: dict[str, int], min_grade: int,
               mode: Literal["auto", "temporal", "holdout"] = "auto", seed: int = 0) -> ValidationPlan:  # fmt: skip
        """The plan for ``ds`` (``mode`` forces a kind; a forced temporal plan without signal says so)."""
        temporal = _temporal(ds, grades, min_grade)
        if mode == "temporal" or (mode == "auto" and temporal is not None and temporal.n_customers >= MIN_CUSTOMERS):
            if temporal is None:
                raise ValueError("validation = temporal needs positives at two or more different times")
            if mode == "auto":
                temporal.reason = (f"temporal: {temporal.n_customers} customers took new products after the "
                                   f"cutoff (need {MIN_CUSTOMERS})")  # fmt: skip
            else:
                temporal.reason = "temporal (forced by [train] validation)"
            return temporal
        plan = _holdout(ds, grades, min_grade, seed)
        if mode == "auto":
            n = 0 if temporal is None else temporal.n_customers
            plan.reason = (f"holdout: only {n} customers took new products after a temporal cutoff "
                           f"(need {MIN_CUSTOMERS}); {HOLDOUT_SHARE:.0%} of each customer's products held out")
        else:
            plan.reason = "holdout (forced by [train] validation)"
        return plan


def _best_grades(ds: Dataset, mask: np.ndarray, grades: dict[str, int]) -> pd.DataFrame:
    ev = ds.events
    g = grade_table(grades)[ev.etype[mask].astype(np.int64)]
    df = pd.DataFrame({"user": ev.user[mask].astype(np.int64), "product": ev.product[mask].astype(np.int64),
                       "grade": g})  # fmt: skip
    return df.groupby(["user", "product"], as_index=False, sort=True)["grade"].max()


def _temporal(ds: Dataset, grades: dict[str, int], min_grade: int, end: int | None = None) -> ValidationPlan | None:
    """Cutoff at the 80th percentile of the positives' times before ``end``; answer: new positives up to ``end``."""
    ev = ds.events
    within = np.ones(len(ev), dtype=bool) if end is None else ev.ts < end
    pos = positive_mask(ev, grades, min_grade) & within
    ts = ev.ts[pos]
    if not len(ts) or ts.min() == ts.max():
        return None
    cut = int(np.quantile(ts, TEMPORAL_QUANTILE, method="lower"))
    if cut <= int(ts.min()):
        cut = int(ts[ts > ts.min()].min())  # most positives at the first time (a first snapshot)
    before = ev.ts < cut
    had = _best_grades(ds, pos & before, grades)
    after = _best_grades(ds, pos & ~before, grades)
    seen = pd.MultiIndex.from_frame(had[["user", "product"]])
    new = after[~pd.MultiIndex.from_frame(after[["user", "product"]]).isin(seen)]
    new = new[new["user"].isin(had["user"].unique())]  # customers the model knows something about
    return ValidationPlan("temporal", cut, before, new.reset_index(drop=True), "")


def _holdout(ds: Dataset, grades: dict[str, int], min_grade: int, seed: int) -> ValidationPlan:
    ev = ds.events
    pos = positive_mask(ev, grades, min_grade)
    pairs = _best_grades(ds, pos, grades)
    rng = np.random.default_rng(seed)
    n_per = pairs.groupby("user")["product"].transform("size").to_numpy()
    draw = rng.random(len(pairs))
    rank = pd.Series(draw).groupby(pairs["user"].to_numpy()).rank(method="first").to_numpy()
    n_out = np.maximum(1, np.floor(n_per * HOLDOUT_SHARE)).astype(int)
    out = (n_per >= 2) & (rank <= n_out)
    targets = pairs[out].reset_index(drop=True)
    key = ev.user.astype(np.int64) * ds.n_products + ev.product.astype(np.int64)
    drop = np.isin(key, targets["user"].to_numpy() * ds.n_products + targets["product"].to_numpy())
    cutoff = int(ev.ts[-1]) + 1 if len(ev) else 0
    return ValidationPlan("holdout", cutoff, ~drop, targets, "")
