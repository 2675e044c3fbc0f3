"""Eligibility and suitability as vectorised masks over (customers x products).

A rule is active only when the data has what it needs: ``min_credit_score`` on
products *and* ``credit_score`` on users enable the credit rule, and so on. A
product with an empty rule value has no such rule; a customer with an empty
attribute that an active rule needs does **not** pass it (we never guess in a
customer's favour). Each rule's failures are kept apart so callers can report
how many products each rule removed.

Examples
--------
>>> users = pd.DataFrame({"credit_score": [700.0, 550.0]})
>>> products = pd.DataFrame({"min_credit_score": [600.0, float("nan")]})
>>> rules = ProductRules.from_frames(users, products)
>>> rules.allowed(np.arange(2)).tolist()
[[True, True], [False, True]]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

#: Rule names, in the order they are reported.
RULES = ("credit", "income", "age", "region", "launched", "suitability")


@dataclass
class SuitabilityPolicy:
    """Investment risk above the customer's tolerance is unsuitable.

    ``categories``: products this applies to (``None``: every product with a risk level).
    ``max_above_tolerance``: how many levels above the tolerance are still suitable.
    """

    categories: tuple[str, ...] | None = ("investment_fund", "pension")
    max_above_tolerance: int = 0


@dataclass
class ProductRules:
    """Per-product rule values and per-user attributes as arrays, ready for broadcasting."""

    min_credit: np.ndarray | None
    min_income: np.ndarray | None
    min_age: np.ndarray | None
    max_age: np.ndarray | None
    region_ok: np.ndarray | None  # (n_products, n_regions) bool; None: no regional products
    launch: np.ndarray | None  # Unix seconds
    risk_level: np.ndarray | None  # NaN where the suitability policy does not apply
    credit: np.ndarray | None
    income: np.ndarray | None
    age: np.ndarray | None
    region: np.ndarray | None  # int code into region vocabulary, -1 unknown/missing
    risk_tolerance: np.ndarray | None
    regions: list[str] = field(default_factory=list)
    n_products: int = 0  # the catalogue size, whatever rules are active

    @classmethod
    def from_frames(
        cls, users: pd.DataFrame, products: pd.DataFrame, policy: SuitabilityPolicy | None = None
    ) -> ProductRules:
        def col(df: pd.DataFrame, name: str) -> np.ndarray | None:
            return df[name].to_numpy(dtype=np.float64) if name in df.columns else None

        policy = policy or SuitabilityPolicy()
        region_ok = region = None
        regions: list[str] = []
        if "regions" in products.columns and "region" in users.columns:
            spec = products["regions"].fillna("*").astype(str).str.strip()
            lists = [[r.strip() for r in s.split(",") if r.strip()] if s != "*" else None for s in spec]
            regions = sorted({r for lst in lists if lst for r in lst} | set(users["region"].dropna().astype(str)))
            pos = {r: i for i, r in enumerate(regions)}
            if any(lst is not None for lst in lists):
                region_ok = np.ones((len(products), len(regions) + 1), dtype=bool)  # last column: unknown region
                for i, lst in enumerate(lists):
                    if lst is not None:
                        region_ok[i] = False
                        region_ok[i, [pos[r] for r in lst]] = True
                region = users["region"].map(lambda v: pos.get(str(v), -1) if v is not None else -1).to_numpy()
                region = np.where(region < 0, len(regions), region).astype(np.int64)
        risk = col(products, "risk_level") if "risk_tolerance" in users.columns else None
        if risk is not None and policy.categories is not None:
            if "category" in products.columns:
                risk = np.where(products["category"].isin(policy.categories).to_numpy(), risk, np.nan)
            else:
                risk = None
        if risk is not None:
            risk = risk - policy.max_above_tolerance
        has_users = {c: c in users.columns for c in ("credit_score", "income", "age")}
        return cls(
            min_credit=col(products, "min_credit_score") if has_users["credit_score"] else None,
            min_income=col(products, "min_income") if has_users["income"] else None,
            min_age=col(products, "min_age") if has_users["age"] else None,
            max_age=col(products, "max_age") if has_users["age"] else None,
            region_ok=region_ok,
            launch=col(products, "launch_date"),
            risk_level=risk,
            credit=col(users, "credit_score"),
            income=col(users, "income"),
            age=col(users, "age"),
            region=region,
            risk_tolerance=col(users, "risk_tolerance"),
            regions=regions,
            n_products=len(products),
        )

    def with_users(self, users: pd.DataFrame) -> ProductRules:
        """The same product rules over other customers (e.g. a prospect's profile).

        The active rules stay those of the catalogue: a column the new frame lacks is a missing
        attribute, which fails every rule that needs it (never a rule switched off by omission).
        """
        n = len(users)
        regions = users["region"].tolist() if "region" in users.columns else [None] * n
        return self._over(n, lambda c: users[c].to_numpy(dtype=np.float64) if c in users.columns else None, regions)

    def with_profile(self, profile: Mapping[str, Any]) -> ProductRules:
        """:meth:`with_users` for one customer given as a mapping of column to value (None or NaN: missing),
        without building a frame (a request's path)."""

        def number(c: str) -> np.ndarray | None:
            v = profile.get(c)
            return np.array([np.nan if v is None else float(v)]) if c in profile else None

        return self._over(1, number, [profile.get("region")])

    def _over(self, n: int, number: Callable[[str], np.ndarray | None], regions: list[Any]) -> ProductRules:
        def col(name: str, current: np.ndarray | None) -> np.ndarray | None:
            if current is None:
                return None
            found = number(name)
            return np.full(n, np.nan) if found is None else found

        region = None
        if self.region is not None:
            pos = {r: i for i, r in enumerate(self.regions)}
            region = np.array([pos.get(str(v), len(self.regions)) if v is not None else len(self.regions)
                               for v in regions], dtype=np.int64)  # fmt: skip
        return replace(
            self,
            credit=col("credit_score", self.credit),
            income=col("income", self.income),
            age=col("age", self.age),
            region=region,
            risk_tolerance=col("risk_tolerance", self.risk_tolerance),
        )

    def presence(self) -> dict[str, np.ndarray]:
        """Per active rule, which products have it (where "you meet this requirement" can be said)."""
        out: dict[str, np.ndarray] = {}
        if self.min_credit is not None:
            out["credit"] = ~np.isnan(self.min_credit)
        if self.min_income is not None:
            out["income"] = ~np.isnan(self.min_income)
        if self.age is not None and (self.min_age is not None or self.max_age is not None):
            has = np.zeros(self.n_products, dtype=bool)
            for v in (self.min_age, self.max_age):
                if v is not None:
                    has |= ~np.isnan(v)
            out["age"] = has
        if self.region_ok is not None:
            out["region"] = np.asarray(~self.region_ok.all(axis=1))
        if self.risk_level is not None and self.risk_tolerance is not None:
            out["suitability"] = ~np.isnan(self.risk_level)
        return out

    def failures(self, users: np.ndarray, at: int | None = None) -> dict[str, np.ndarray]:
        """Per rule, a (len(users), n_products) bool mask of products that rule removes."""
        out: dict[str, np.ndarray] = {}

        def below(attr: np.ndarray | None, minimum: np.ndarray | None) -> np.ndarray | None:
            if attr is None or minimum is None:
                return None
            a = attr[users][:, None]
            # A rule exists where minimum is set; missing attribute fails it; NaN minimum: no rule.
            return ~np.isnan(minimum)[None, :] & (np.isnan(a) | (a < minimum[None, :]))

        for name, fail in (
            ("credit", below(self.credit, self.min_credit)),
            ("income", below(self.income, self.min_income)),
        ):
            if fail is not None:
                out[name] = fail
        if self.age is not None and (self.min_age is not None or self.max_age is not None):
            a = self.age[users][:, None]
            fail = np.zeros((len(users), self.n_products), dtype=bool)
            if self.min_age is not None:
                fail |= ~np.isnan(self.min_age)[None, :] & (np.isnan(a) | (a < self.min_age[None, :]))
            if self.max_age is not None:
                fail |= ~np.isnan(self.max_age)[None, :] & (np.isnan(a) | (a > self.max_age[None, :]))
            out["age"] = fail
        if self.region_ok is not None and self.region is not None:
            out["region"] = ~self.region_ok[:, self.region[users]].T
        if self.launch is not None and at is not None:
            out["launched"] = np.broadcast_to(self.launch[None, :] > at, (len(users), len(self.launch))).copy()
        if self.risk_level is not None and self.risk_tolerance is not None:
            tol = self.risk_tolerance[users][:, None]
            applies = ~np.isnan(self.risk_level)[None, :]
            out["suitability"] = applies & (np.isnan(tol) | (self.risk_level[None, :] > tol))
        return out

    def allowed(self, users: np.ndarray, at: int | None = None) -> np.ndarray:
        """(len(users), n_products) bool: passes every active rule."""
        ok = np.ones((len(users), self.n_products), dtype=bool)
        for fail in self.failures(users, at).values():
            ok &= ~fail
        return ok
