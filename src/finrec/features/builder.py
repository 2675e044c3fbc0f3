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

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from finrec.data.dataset import ETYPE, Dataset
from finrec.data.io import spill_past
from finrec.features import queries as Q
from finrec.features.queries import (  # noqa: F401  (re-exported: the online path imports them from here)
    BEHAVIOUR_TYPES,
    DAY,
    ENGAGED_TYPES,
    OWNERSHIP_TYPES,
    PAIR_HISTORY_COUNTS,
    PAIR_HISTORY_TYPES,
    WINDOWS,
)

USER_PROFILE_NUMERIC = ("age", "income", "credit_score", "risk_tolerance", "marketing_consent")
USER_PROFILE_CATEGORICAL = ("region", "employment_status")
PRODUCT_NUMERIC = ("risk_level", "apr", "apy", "annual_fee", "min_credit_score", "min_income", "min_age", "max_age")
PRODUCT_CATEGORICAL = ("category", "provider")
#: DuckDB's memory in a FeatureBuilder; past it, the event-log queries spill to disk.
MEMORY_LIMIT = "2GB"
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

    def __init__(self, dataset: Dataset, protected: list[str] | tuple[str, ...] = (),
                 catalogue_stats: Callable[[int], pd.DataFrame] | None = None):  # fmt: skip
        self.ds = dataset
        self.protected = set(protected)
        # The product features that count every customer's events (demand, conversion, share of holders), given
        # from outside when ``dataset`` holds only some customers (one partition of a Spark job): a frame per
        # cutoff with one row per product and the columns of :meth:`catalogue_stats`.
        self._catalogue_stats = catalogue_stats if catalogue_stats is not None else dataset.catalogue_stats
        ev = dataset.events
        self.con = duckdb.connect()
        self.con.execute("SET threads TO 2")
        # DuckDB's default limit is 80% of the machine's memory: its hash tables then grow with the log (most of
        # `finrec features`' 20 GB at 2M customers). Past this limit its aggregations spill to disk.
        spill_past(self.con, MEMORY_LIMIT)
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
        held = self.con.execute(f"{Q.holdings_sql(cutoff)} ORDER BY 1, 2").df()
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
        given = self._catalogue_stats
        stats = given(cutoff) if given is not None else self.catalogue_stats(cutoff, held)
        for c in stats.columns:
            products[c] = stats[c].to_numpy()
            p_num.append(c)
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

    def catalogue_stats(self, cutoff: int, held: pd.DataFrame | None = None) -> pd.DataFrame:
        """Product features that count every customer's events: demand, conversion and the share of holders.

        ``held``: the holdings at ``cutoff`` when already computed.
        """
        if held is None:
            held = self.con.execute(Q.holdings_sql(cutoff)).df()
        out = self._product_demand(cutoff)
        out["holders"] = Q.holder_shares(held["product"].to_numpy(), held["user"].to_numpy(), self.ds.n_products)
        return out

    def _user_behaviour(self, cutoff: int) -> pd.DataFrame:
        df = self.con.execute(Q.user_behaviour_sql(cutoff)).df()
        n, rows = self.ds.n_users, df["u"].to_numpy()
        columns = {}
        for c in df.columns[1:]:
            full = np.full(n, np.nan) if c.endswith("_ts") else np.zeros(n)
            full[rows] = df[c].to_numpy(dtype=np.float64, na_value=np.nan)
            columns[c] = full
        return pd.DataFrame(Q.behaviour_features(cutoff, columns), index=pd.RangeIndex(n))

    def _category_affinity(self, cutoff: int, n_cat: int) -> np.ndarray:
        """Share of each customer's engaged events (click and later) per category; the last column is the total."""
        aff = np.zeros((self.ds.n_users, n_cat + 1))
        if not n_cat:
            return aff
        df = self.con.execute(Q.category_engagement_sql(cutoff)).df()
        u, c, n = df["u"].to_numpy(), df["c"].to_numpy(), df["n"].to_numpy(np.float64)
        aff[u, c] = n
        total = aff[:, :n_cat].sum(axis=1)
        aff[:, :n_cat] /= np.maximum(total, 1)[:, None]
        aff[:, n_cat] = np.log1p(total)
        return aff

    def _product_demand(self, cutoff: int) -> pd.DataFrame:
        df = self.con.execute(Q.product_demand_sql(cutoff)).df()
        n = self.ds.n_products
        raw = {c: np.zeros(n) for c in df.columns if c != "p"}
        rows = df["p"].to_numpy()
        for c in raw:
            raw[c][rows] = df[c].to_numpy(np.float64)
        return pd.DataFrame(Q.demand_features(raw, n), index=pd.RangeIndex(n))

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
    def _pair_history_frame(cutoff: int, df: pd.DataFrame, rows: np.ndarray, n: int) -> pd.DataFrame:
        columns = {}
        for c in (*PAIR_HISTORY_COUNTS, "last_seen_ts"):
            full = np.full(n, np.nan) if c == "last_seen_ts" else np.zeros(n)
            full[rows] = df[c].to_numpy(dtype=np.float64, na_value=np.nan)
            columns[c] = full
        return pd.DataFrame(Q.pair_history_features(cutoff, columns), index=pd.RangeIndex(n))

    def _pair_history(self, cutoff: int, users: np.ndarray, products: np.ndarray) -> pd.DataFrame:
        cand = pa.table(
            {"i": np.arange(len(users), dtype=np.int64), "u": users.astype(np.int32), "p": products.astype(np.int32)}
        )
        self.con.register("cand", cand)
        df = self.con.execute(
            f"""SELECT cand.i, {Q.pair_history_aggregates()}
                FROM cand JOIN ev ON ev.u = cand.u AND ev.p = cand.p
                WHERE ev.ts < {cutoff} GROUP BY cand.i"""
        ).df()
        self.con.unregister("cand")
        return self._pair_history_frame(cutoff, df, df["i"].to_numpy(), len(users))

    def pair_history_table(self, cutoff: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        """Every (user, product) pair with events before ``cutoff``, sorted: (user rows, product rows, features).

        The features are the ``pair_*`` columns of :meth:`pair_features`, computed the same way; the online
        service keeps this table so a request looks its pairs up instead of querying the event log.
        """
        return self._pair_history_piece(cutoff, self.con.execute(f"{Q.pair_history_sql(cutoff)} ORDER BY u, p").df())

    def pair_history_chunks(
        self, cutoff: int, rows: int = 1_000_000
    ) -> Iterator[tuple[np.ndarray, np.ndarray, pd.DataFrame]]:
        """:meth:`pair_history_table` in consecutive pieces of at most ``rows`` pairs, in the same order: for
        writing the table out without holding it (36.7M pairs and 2.3 GB at 1M customers)."""
        reader = self.con.sql(f"{Q.pair_history_sql(cutoff)} ORDER BY u, p").to_arrow_reader(rows)
        empty = True
        for batch in reader:
            empty = False
            yield self._pair_history_piece(cutoff, batch.to_pandas())
        if empty:  # no events before the cutoff: one empty piece, so that the table still has its columns
            yield self._pair_history_piece(cutoff, reader.schema.empty_table().to_pandas())

    def _pair_history_piece(self, cutoff: int, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        feats = self._pair_history_frame(cutoff, df, np.arange(len(df)), len(df))
        return df["u"].to_numpy(np.int64), df["p"].to_numpy(np.int64), feats

    # -- labels and history ---------------------------------------------------------------------
    def labels(self, start: int, end: int, grades: dict[str, int]) -> pd.DataFrame:
        """Highest relevance grade of each (user, product) with events in ``[start, end)``; grade > 0 only."""
        grade_of = np.zeros(len(ETYPE), dtype=np.int64)
        for t, g in grades.items():
            grade_of[ETYPE[t]] = g
        self.con.register("grades", pa.table({"e": np.arange(len(ETYPE), dtype=np.int8), "g": grade_of}))
        return self.con.execute(f"{Q.labels_sql(start, end)} ORDER BY 1, 2").df()

    def shown(self, start: int, end: int) -> pd.DataFrame:
        """(user, product, position) shown in ``[start, end)``, whether ignored or not; best position (0 = unknown)."""
        return self.con.execute(f"{Q.shown_sql(start, end)} ORDER BY 1, 2").df()

    def history(self, cutoff: int, length: int = 20) -> np.ndarray:
        """(n_users, length) most recent distinct products each customer engaged with before ``cutoff``; -1 pads."""
        df = self.con.execute(f"{Q.history_sql(cutoff, length)} ORDER BY u, r").df()
        hist = np.full((self.ds.n_users, length), -1, dtype=np.int64)
        u = df["u"].to_numpy()
        if len(u):
            starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
            rank = np.arange(len(u)) - np.repeat(starts, np.diff(np.r_[starts, len(u)]))
            hist[u, rank] = df["p"].to_numpy()
        return hist
