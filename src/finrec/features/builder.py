"""Point-in-time features of customers, products and (customer, product) pairs.

Every feature at a cutoff is computed from events strictly before it, so
moving an event past the cutoff cannot change anything (a test holds this).
Aggregations run in DuckDB over the event log registered zero-copy as an
Arrow table; the result is a pandas frame per entity, one row per dense index.

* user: profile (well-known and extra columns, minus protected attributes),
  behaviour counts over 30/90/365 days, recency, holdings, category affinity;
* product: attributes, rule values, age since launch, demand and smoothed
  conversion over 90 days and all history (all-history counts as log shares of the
  catalogue's total, so they keep their scale as history grows), share of holders;
* pair: eligibility margins (credit, income, age), risk gap, affinity with the
  product's category, whether the customer holds the category or the provider,
  and the customer's history with this very product.

A dataset with only the required columns gets the behaviour and demand
features; everything else is simply absent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from finrec.data.dataset import ETYPE, Dataset

DAY = 86_400
WINDOWS = (30, 90, 365)
PAIR_HISTORY_COUNTS = ("seen", "clicked", "applied", "declined")
#: Event type behind each pair-history count (the online overlay adds live events the same way).
PAIR_HISTORY_TYPES = {"seen": "impression", "clicked": "click", "applied": "apply", "declined": "decline"}
_BEHAVIOUR_TYPES = ("impression", "view", "click", "apply", "approve", "decline")
#: Event types counted per customer and window, engaged types (affinity, history) and ownership types (holdings).
BEHAVIOUR_TYPES = _BEHAVIOUR_TYPES
ENGAGED_TYPES = ("click", "apply", "approve", "decline")
OWNERSHIP_TYPES = ("approve", "hold", "close")
_ENGAGED = tuple(ETYPE[t] for t in ENGAGED_TYPES)
_OWNERSHIP = tuple(ETYPE[t] for t in OWNERSHIP_TYPES)

USER_PROFILE_NUMERIC = ("age", "income", "credit_score", "risk_tolerance", "marketing_consent")
USER_PROFILE_CATEGORICAL = ("region", "employment_status")
PRODUCT_NUMERIC = ("risk_level", "apr", "apy", "annual_fee", "min_credit_score", "min_income", "min_age", "max_age")
PRODUCT_CATEGORICAL = ("category", "provider")
#: Most categories that get their own customer columns (holds_<category>, affinity_<category>).
MAX_CATEGORY_COLUMNS = 30
_NOT_FEATURES = {"user_id", "product_id", "name", "signup_date", "launch_date", "regions"}


@dataclass
class Snapshot:
    """Features of every customer and product at one cutoff, plus what pair features need."""

    cutoff: int
    users: pd.DataFrame  # one row per user row
    products: pd.DataFrame  # one row per product row
    user_numeric: list[str]
    user_categorical: list[str]
    product_numeric: list[str]
    product_categorical: list[str]
    held: pd.DataFrame  # columns user, product: what each customer holds at the cutoff
    category_codes: np.ndarray  # per product, -1 when unknown
    n_categories: int
    category_affinity: np.ndarray  # (n_users, n_categories + 1) share of engaged events per category


def _columns_as_features(table: pd.DataFrame, skip: set[str]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """A table's columns as features: numbers as float64, anything else categorical; ``skip`` left out."""
    out = pd.DataFrame(index=pd.RangeIndex(len(table)))
    numeric: list[str] = []
    categorical: list[str] = []
    for c in table.columns:
        if c in skip:
            continue
        s = table[c]
        if pd.api.types.is_numeric_dtype(s):
            out[c] = s.to_numpy(dtype=np.float64)
            numeric.append(c)
        else:
            out[c] = s.astype(object)
            categorical.append(c)
    return out, numeric, categorical


def profile_pair_features(
    ucol: Callable[[str], np.ndarray | None], pcol: Callable[[str], np.ndarray | None]
) -> dict[str, np.ndarray]:
    """Pair features that need only the two profiles: eligibility margins and the risk gap.

    ``ucol(name)`` / ``pcol(name)`` give a customer / product column aligned with the pairs, or ``None`` when
    the data lacks it. Shared by the offline builder and the online service, so both compute them alike.
    """
    out: dict[str, np.ndarray] = {}
    credit, min_credit = ucol("credit_score"), pcol("min_credit_score")
    if credit is not None and min_credit is not None:
        out["credit_margin"] = credit - min_credit
    income, min_income = ucol("income"), pcol("min_income")
    if income is not None and min_income is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            out["income_ratio"] = np.log(np.maximum(income, 1) / np.maximum(min_income, 1))
    age = ucol("age")
    if age is not None:
        for c, sign in (("min_age", 1), ("max_age", -1)):
            v = pcol(c)
            if v is not None:
                out[f"age_margin_{c}"] = sign * (age - v)
    tol, risk = ucol("risk_tolerance"), pcol("risk_level")
    if tol is not None and risk is not None:
        out["risk_gap"] = risk - tol
    return out


class FeatureBuilder:
    """Computes :class:`Snapshot` and pair features for a dataset at any cutoff.

    Parameters
    ----------
    dataset
        A loaded dataset.
    protected
        User columns never used as features (e.g. ``["gender"]``).
    """

    def __init__(self, dataset: Dataset, protected: list[str] | tuple[str, ...] = ()):
        self.ds = dataset
        self.protected = set(protected)
        ev = dataset.events
        self.con = duckdb.connect()
        self.con.execute("SET threads TO 2")
        self.con.register(
            "ev",
            # i: the event's place in the log (sorted by time, then file order), the total order "last" means: by
            # time alone, arg_max over a customer-product's events at the same second is not deterministic (it
            # differed between 1 and 2 DuckDB threads on day-resolution data).
            pa.table({"u": ev.user, "p": ev.product, "e": ev.etype, "ts": ev.ts, "pos": ev.position,
                      "i": np.arange(len(ev.ts), dtype=np.int32 if len(ev.ts) < 2**31 else np.int64)}),
        )
        products = dataset.products
        if "category" in products.columns:
            cats = pd.Categorical(products["category"].fillna("(none)").astype(str))
            self.category_names = list(cats.categories)
            self.category_codes = cats.codes.astype(np.int64)
        else:
            self.category_names = []
            self.category_codes = np.full(len(products), -1, dtype=np.int64)
        self.con.register("pcat", pa.table({"p": np.arange(len(products), dtype=np.int32), "c": self.category_codes}))

    # -- snapshot ----------------------------------------------------------------------------
    def snapshot(self, cutoff: int) -> Snapshot:
        ds = self.ds
        users, u_num, u_cat = _columns_as_features(ds.users, _NOT_FEATURES | self.protected)
        if "income" in users:
            users["income"] = np.log1p(users["income"].clip(lower=0))
        if "signup_date" in ds.users.columns:
            users["tenure_days"] = (cutoff - ds.users["signup_date"].to_numpy(dtype=np.float64)) / DAY
            u_num.append("tenure_days")

        beh = self._user_behaviour(cutoff)
        for c in beh.columns:
            users[c] = beh[c].to_numpy()
            u_num.append(c)
        held = self.con.execute(
            f"""SELECT u AS "user", p AS product FROM (
                  SELECT u, p, arg_max(e, i) AS last FROM ev
                  WHERE ts < {cutoff} AND e IN {tuple(_OWNERSHIP)} GROUP BY u, p)
                WHERE last <> {ETYPE["close"]} ORDER BY 1, 2"""
        ).df()
        n_held = np.bincount(held["user"].to_numpy(), minlength=ds.n_users)
        users["n_held"] = n_held.astype(np.float64)
        u_num.append("n_held")
        n_cat = len(self.category_names)
        affinity = self._category_affinity(cutoff, n_cat)
        # One holding and one affinity column per category, for catalogues with a handful of categories. With
        # hundreds (a retailer's product subclasses) they would swamp the customer's features; the pair
        # features (affinity with and holding of the candidate's own category) carry that signal for any number.
        if 0 < n_cat <= MAX_CATEGORY_COLUMNS:
            hc = np.zeros((ds.n_users, n_cat), dtype=np.float64)
            hc[held["user"].to_numpy(), self.category_codes[held["product"].to_numpy()]] = 1.0
            per_cat = {f"holds_{name}": hc[:, j] for j, name in enumerate(self.category_names)}
            per_cat |= {f"affinity_{name}": affinity[:, j] for j, name in enumerate(self.category_names)}
            users = pd.concat([users, pd.DataFrame(per_cat, index=users.index)], axis=1)
            u_num.extend(per_cat)

        products, p_num, p_cat = _columns_as_features(ds.products, _NOT_FEATURES)
        if "regions" in ds.products.columns:
            spec = ds.products["regions"].fillna("*").astype(str).str.strip()
            products["n_regions"] = [
                0.0 if s == "*" else float(len([r for r in s.split(",") if r.strip()])) for s in spec
            ]
            p_num.append("n_regions")
        if "launch_date" in ds.products.columns:
            products["days_since_launch"] = (cutoff - ds.products["launch_date"].to_numpy(dtype=np.float64)) / DAY
            p_num.append("days_since_launch")
        if "category" in ds.products.columns:
            # Price relative to the category's other offers: an APR of 9% is cheap for a card, dear for a mortgage.
            cat = pd.Series(self.category_codes)
            for c in ("apr", "apy", "annual_fee", "min_credit_score", "min_income"):
                if c in products.columns:
                    v = products[c]
                    g = v.groupby(cat)
                    products[f"{c}_vs_category"] = (
                        ((v - g.transform("mean")) / g.transform("std").replace(0, np.nan)).fillna(0.0).where(v.notna())
                    )
                    p_num.append(f"{c}_vs_category")
        demand = self._product_demand(cutoff)
        for c in demand.columns:
            products[c] = demand[c].to_numpy()
            p_num.append(c)
        # Share of the customers holding anything (a count would grow with the customer base).
        holders = np.bincount(held["product"].to_numpy(), minlength=ds.n_products).astype(np.float64)
        products["holders"] = holders / max(1, int((n_held > 0).sum()))
        p_num.append("holders")
        return Snapshot(
            cutoff=cutoff,
            users=users,
            products=products,
            user_numeric=u_num,
            user_categorical=u_cat,
            product_numeric=p_num,
            product_categorical=p_cat,
            held=held,
            category_codes=self.category_codes,
            n_categories=n_cat,
            category_affinity=affinity,
        )

    def _user_behaviour(self, cutoff: int) -> pd.DataFrame:
        cols = []
        for t in _BEHAVIOUR_TYPES:
            for w in WINDOWS:
                cols.append(f"ln(1 + count(*) FILTER (WHERE e = {ETYPE[t]} AND ts >= {cutoff - w * DAY})) AS {t}_{w}d")
        df = self.con.execute(
            f"""SELECT u, {", ".join(cols)},
                       ({cutoff} - max(ts)) / {DAY}.0 AS days_since_last_event,
                       ({cutoff} - max(ts) FILTER (WHERE e IN {tuple(_ENGAGED)})) / {DAY}.0 AS days_since_last_click
                FROM ev WHERE ts < {cutoff} GROUP BY u"""
        ).df()
        out = pd.DataFrame(index=pd.RangeIndex(self.ds.n_users))
        rows = df["u"].to_numpy()
        for c in df.columns:
            if c == "u":
                continue
            full = np.zeros(self.ds.n_users) if not c.startswith("days_since") else np.full(self.ds.n_users, np.nan)
            full[rows] = df[c].to_numpy(dtype=np.float64)
            out[c] = full
        return out

    def _category_affinity(self, cutoff: int, n_cat: int) -> np.ndarray:
        """Share of each customer's engaged events (click and later) per category; the last column is the total."""
        aff = np.zeros((self.ds.n_users, n_cat + 1))
        if not n_cat:
            return aff
        df = self.con.execute(
            f"""SELECT ev.u, pcat.c, count(*) AS n FROM ev JOIN pcat ON ev.p = pcat.p
                WHERE ts < {cutoff} AND e IN {tuple(_ENGAGED)} GROUP BY ALL"""
        ).df()
        u, c, n = df["u"].to_numpy(), df["c"].to_numpy(), df["n"].to_numpy(np.float64)
        aff[u, c] = n
        total = aff[:, :n_cat].sum(axis=1)
        aff[:, :n_cat] /= np.maximum(total, 1)[:, None]
        aff[:, n_cat] = np.log1p(total)
        return aff

    def _product_demand(self, cutoff: int) -> pd.DataFrame:
        since = cutoff - 90 * DAY
        df = self.con.execute(
            f"""SELECT p,
                  count(*) FILTER (WHERE e = {ETYPE["impression"]}) AS imp,
                  count(*) FILTER (WHERE e = {ETYPE["click"]}) AS clk,
                  count(*) FILTER (WHERE e = {ETYPE["apply"]}) AS app,
                  count(*) FILTER (WHERE e = {ETYPE["approve"]}) AS apr,
                  count(*) FILTER (WHERE e = {ETYPE["decline"]}) AS dec,
                  count(*) FILTER (WHERE e = {ETYPE["impression"]} AND ts >= {since}) AS imp90,
                  count(*) FILTER (WHERE e = {ETYPE["click"]} AND ts >= {since}) AS clk90,
                  count(*) FILTER (WHERE e IN {tuple(_ENGAGED)} AND ts >= {since}) AS eng90
                FROM ev WHERE ts < {cutoff} GROUP BY p"""
        ).df()
        n = self.ds.n_products
        raw = {c: np.zeros(n) for c in df.columns if c != "p"}
        rows = df["p"].to_numpy()
        for c in raw:
            raw[c][rows] = df[c].to_numpy(np.float64)
        # Smoothed rates shrink towards the catalogue rate, so a product seen 3 times is not "100%".
        ctr0 = (raw["clk"].sum() + 1) / (raw["imp"].sum() + 20)
        app0 = (raw["app"].sum() + 1) / (raw["clk"].sum() + 4)
        apr0 = (raw["apr"].sum() + 1) / (raw["apr"].sum() + raw["dec"].sum() + 2)
        out = pd.DataFrame(index=pd.RangeIndex(n))
        # All-history counts grow with the length of the history, so a model trained at one cutoff and served
        # at a later one would read them on another scale: they are log shares of the catalogue's total (a
        # product's place in the catalogue, the same at any cutoff). Windowed counts keep their scale.
        def share(c: np.ndarray) -> np.ndarray:
            return np.log((c + 1.0) / (c.sum() + n))

        out["impressions"] = share(raw["imp"])
        out["clicks"] = share(raw["clk"])
        out["applications"] = share(raw["app"])
        out["approvals"] = share(raw["apr"])
        out["impressions_90d"] = np.log1p(raw["imp90"])
        out["engaged_90d"] = np.log1p(raw["eng90"])
        out["ctr"] = (raw["clk"] + 50 * ctr0) / (raw["imp"] + 50)
        out["ctr_90d"] = (raw["clk90"] + 50 * ctr0) / (raw["imp90"] + 50)
        out["apply_rate"] = (raw["app"] + 10 * app0) / (raw["clk"] + 10)
        out["approval_rate"] = (raw["apr"] + 10 * apr0) / (raw["apr"] + raw["dec"] + 10)
        return out

    # -- pairs ---------------------------------------------------------------------------------
    def pair_features(self, snap: Snapshot, users: np.ndarray, products: np.ndarray) -> pd.DataFrame:
        """Features of (users[i], products[i]) pairs at the snapshot's cutoff."""
        ds = self.ds
        out = pd.DataFrame(index=pd.RangeIndex(len(users)))
        U, P = ds.users, ds.products

        def ucol(c: str) -> np.ndarray | None:
            return U[c].to_numpy(np.float64)[users] if c in U.columns else None

        def pcol(c: str) -> np.ndarray | None:
            return P[c].to_numpy(np.float64)[products] if c in P.columns else None

        for c, v in profile_pair_features(ucol, pcol).items():
            out[c] = v
        if snap.n_categories:
            cat = snap.category_codes[products]
            out["category_affinity"] = snap.category_affinity[users, cat]
            held_cat = np.zeros((ds.n_users, snap.n_categories), dtype=bool)
            held_cat[snap.held["user"].to_numpy(), snap.category_codes[snap.held["product"].to_numpy()]] = True
            out["holds_category"] = held_cat[users, cat].astype(np.float64)
        if "provider" in P.columns and len(snap.held):
            prov = pd.Categorical(P["provider"].fillna("(none)").astype(str)).codes.astype(np.int64)
            held_prov = pd.MultiIndex.from_arrays(
                [snap.held["user"].to_numpy(), prov[snap.held["product"].to_numpy()]]
            ).unique()
            out["holds_provider"] = (
                pd.MultiIndex.from_arrays([users, prov[products]]).isin(held_prov).astype(np.float64)
            )
        hist = self._pair_history(snap.cutoff, users, products)
        for c in hist.columns:
            out[c] = hist[c].to_numpy()
        return out

    @staticmethod
    def _pair_history_sql(cutoff: int) -> str:
        return f"""count(*) FILTER (WHERE e = {ETYPE["impression"]}) AS seen,
                  count(*) FILTER (WHERE e = {ETYPE["click"]}) AS clicked,
                  count(*) FILTER (WHERE e = {ETYPE["apply"]}) AS applied,
                  count(*) FILTER (WHERE e = {ETYPE["decline"]}) AS declined,
                  ({cutoff} - max(ts) FILTER (WHERE e = {ETYPE["impression"]})) / {DAY}.0 AS days_since_seen"""

    @staticmethod
    def _pair_history_frame(df: pd.DataFrame, rows: np.ndarray, n: int) -> pd.DataFrame:
        out = pd.DataFrame(index=pd.RangeIndex(n))
        for c in PAIR_HISTORY_COUNTS:
            full = np.zeros(n)
            full[rows] = np.log1p(df[c].to_numpy(np.float64))
            out[f"pair_{c}"] = full
        full = np.full(n, np.nan)
        full[rows] = df["days_since_seen"].to_numpy(np.float64)
        out["pair_days_since_seen"] = full
        return out

    def _pair_history(self, cutoff: int, users: np.ndarray, products: np.ndarray) -> pd.DataFrame:
        cand = pa.table(
            {"i": np.arange(len(users), dtype=np.int64), "u": users.astype(np.int32), "p": products.astype(np.int32)}
        )
        self.con.register("cand", cand)
        df = self.con.execute(
            f"""SELECT cand.i, {self._pair_history_sql(cutoff)}
                FROM cand JOIN ev ON ev.u = cand.u AND ev.p = cand.p
                WHERE ev.ts < {cutoff} GROUP BY cand.i"""
        ).df()
        self.con.unregister("cand")
        return self._pair_history_frame(df, df["i"].to_numpy(), len(users))

    def pair_history_table(self, cutoff: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        """Every (user, product) pair with events before ``cutoff``, sorted: (user rows, product rows, features).

        The features are the ``pair_*`` columns of :meth:`pair_features`, computed the same way; the online
        service keeps this table so a request looks its pairs up instead of querying the event log.
        """
        df = self.con.execute(
            f"SELECT u, p, {self._pair_history_sql(cutoff)} FROM ev WHERE ts < {cutoff} GROUP BY u, p ORDER BY u, p"
        ).df()
        feats = self._pair_history_frame(df, np.arange(len(df)), len(df))
        return df["u"].to_numpy(np.int64), df["p"].to_numpy(np.int64), feats

    # -- labels and history ---------------------------------------------------------------------
    def labels(self, start: int, end: int, grades: dict[str, int]) -> pd.DataFrame:
        """Highest relevance grade of each (user, product) with events in ``[start, end)``; grade > 0 only."""
        grade_of = np.zeros(len(ETYPE), dtype=np.int64)
        for t, g in grades.items():
            grade_of[ETYPE[t]] = g
        self.con.register("grades", pa.table({"e": np.arange(len(ETYPE), dtype=np.int8), "g": grade_of}))
        df = self.con.execute(
            f"""SELECT ev.u AS "user", ev.p AS product, max(g) AS grade
                FROM ev JOIN grades USING (e) WHERE ts >= {start} AND ts < {end}
                GROUP BY ALL HAVING max(g) > 0 ORDER BY 1, 2"""
        ).df()
        return df

    def shown(self, start: int, end: int) -> pd.DataFrame:
        """(user, product, position) shown in ``[start, end)``, whether ignored or not; best position (0 = unknown)."""
        return self.con.execute(
            f"""SELECT u AS "user", p AS product, coalesce(min(pos) FILTER (WHERE pos > 0), 0) AS position
                FROM ev WHERE e = {ETYPE["impression"]} AND ts >= {start} AND ts < {end} GROUP BY ALL ORDER BY 1, 2"""
        ).df()

    def history(self, cutoff: int, length: int = 20) -> np.ndarray:
        """(n_users, length) most recent distinct products each customer engaged with before ``cutoff``; -1 pads."""
        df = self.con.execute(
            f"""SELECT u, p FROM (
                  SELECT u, p, row_number() OVER (PARTITION BY u ORDER BY max(ts) DESC, p) AS r
                  FROM ev WHERE ts < {cutoff} AND e IN {tuple(_ENGAGED)} GROUP BY u, p)
                WHERE r <= {length} ORDER BY u, r"""
        ).df()
        hist = np.full((self.ds.n_users, length), -1, dtype=np.int64)
        u = df["u"].to_numpy()
        if len(u):
            starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
            rank = np.arange(len(u)) - np.repeat(starts, np.diff(np.r_[starts, len(u)]))
            hist[u, rank] = df["p"].to_numpy()
        return hist
