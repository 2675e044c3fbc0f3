"""The dataset's state at the service's cutoff, arranged for one-customer lookups.

:class:`ServingData` is everything about customers and products that does not
depend on the model: the feature snapshot at the cutoff (end of the data), the
eligibility rules, what each customer holds and each customer's history with
each product, kept as sorted arrays with per-customer offsets (CSR) so that a
request reads a slice instead of querying the event log. A model reload reuses
it; only the model's own encodings are recomputed.

Prospects (people who are not customers yet) get a one-row frame with the same
columns as the snapshot: their profile where given, "no activity" elsewhere,
exactly what the snapshot holds for a customer without events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from finrec.config import FinrecSettings
from finrec.data.dataset import Dataset
from finrec.features.builder import DAY, PAIR_HISTORY_COUNTS, FeatureBuilder, Snapshot, profile_pair_features
from finrec.twostage.train import rules_for

if TYPE_CHECKING:
    from finrec.serving.online import LiveCustomer
    from finrec.serving.records import CustomerRecord

#: Customer profile fields a prospect may send (the data contract's well-known customer columns).
PROFILE_FIELDS = ("age", "income", "credit_score", "risk_tolerance", "region", "employment_status",
                  "dependants", "marketing_consent")  # fmt: skip


def _csr(keys: np.ndarray, n: int) -> np.ndarray:
    """Offsets of each key's run in a sorted key array: rows of key i are indptr[i]:indptr[i + 1]."""
    return np.searchsorted(keys, np.arange(n + 1), side="left").astype(np.int64)


@dataclass
class Catalogue:
    """What a replica without the customers' snapshot knows about the data (see :mod:`finrec.serving.materialized`).

    ``snap`` holds the products' features and the customers' columns (no customer rows); ``pair_names`` the pair
    history's columns; ``any_held`` whether any customer holds anything at the cutoff (the offline features have
    no ``holds_provider`` otherwise); ``n_customers`` how many customers were materialised.
    """

    snap: Snapshot
    pair_names: list[str]
    any_held: bool
    n_customers: int
    snapshot_id: str = ""
    source: Any = None  # the MaterializedFeatures the records are read from


class ServingData:
    """Customers, products and their history at ``cutoff`` (default: just after the last event).

    With a ``catalogue`` (a replica serving customers materialised in Redis) ``ds`` holds the products and the
    customers' columns only, no customer is loaded, and each request brings its customer's
    :class:`~finrec.serving.records.CustomerRecord`.
    """

    def __init__(self, ds: Dataset, settings: FinrecSettings, cutoff: int | None = None,
                 catalogue: Catalogue | None = None) -> None:  # fmt: skip
        self.ds = ds
        self.catalogue = catalogue
        if catalogue is not None:
            self.cutoff = int(catalogue.snap.cutoff)
        else:
            self.cutoff = int(ds.time_range[1] + 1 if cutoff is None else cutoff)
        self.builder = FeatureBuilder(ds, settings.protected_attributes)
        self.snap = self.builder.snapshot(self.cutoff) if catalogue is None else catalogue.snap
        self.rules = rules_for(ds, settings)
        # Which products have each rule: the catalogue's, the same for every request (and for prospects, whose
        # rules differ only in the customer's values).
        self.rule_presence = self.rules.presence()
        self.n_users, self.n_products = ds.n_users, ds.n_products
        self.n_customers = ds.n_users if catalogue is None else catalogue.n_customers
        self._user_row = {u: i for i, u in enumerate(ds.users["user_id"].astype(str))}
        P = ds.products
        self.product_ids = P["product_id"].astype(str).tolist()
        self.product_row = {p: i for i, p in enumerate(self.product_ids)}

        def text(col: str) -> list[str | None]:
            return [None if v is None or v != v else str(v) for v in P[col]] if col in P.columns else [None] * len(P)

        self.names, self.categories, self.providers = text("name"), text("category"), text("provider")
        held = self.snap.held
        self.held_user = held["user"].to_numpy(np.int64)
        self.held_product = held["product"].to_numpy(np.int64)
        self.held_ptr = _csr(self.held_user, self.n_users)
        self.any_held = bool(len(self.held_product)) if catalogue is None else catalogue.any_held
        self.category_codes = self.snap.category_codes
        self.provider_codes = (
            pd.Categorical(P["provider"].fillna("(none)").astype(str)).codes.astype(np.int64)
            if "provider" in P.columns else None
        )  # fmt: skip
        if catalogue is None:
            pu, pp, feats = self.builder.pair_history_table(self.cutoff)
            self.pair_names = list(feats.columns)
            self.pair_values = feats.to_numpy(np.float32)  # the ranker reads float32; the cast is exact either way
        else:
            pu = pp = np.empty(0, np.int64)
            self.pair_names = list(catalogue.pair_names)
            self.pair_values = np.empty((0, len(self.pair_names)), np.float32)
        self.pair_product = pp
        self.pair_ptr = _csr(pu, self.n_users)
        self._pair_default = np.array([0.0 if c.removeprefix("pair_") in PAIR_HISTORY_COUNTS else np.nan
                                       for c in self.pair_names], dtype=np.float32)  # fmt: skip
        self.consent = (
            ds.users["marketing_consent"].to_numpy(np.float64) if "marketing_consent" in ds.users.columns else None
        )
        self._history: dict[int, np.ndarray] = {}
        self._user_float = {c: ds.users[c].to_numpy(np.float64) for c in ds.users.columns
                            if c != "user_id" and pd.api.types.is_numeric_dtype(ds.users[c])}  # fmt: skip
        self._user_other = {c: ds.users[c].to_numpy(object) for c in ds.users.columns
                            if c != "user_id" and c not in self._user_float}  # fmt: skip
        self._product_float = {c: P[c].to_numpy(np.float64) for c in P.columns
                               if c != "product_id" and pd.api.types.is_numeric_dtype(P[c])}  # fmt: skip

    # -- lookups ------------------------------------------------------------------------------------
    def user_row(self, user_id: str) -> int:
        """Dense row of a customer id, -1 when the data does not know it."""
        return self._user_row.get(user_id, -1)

    def history(self, length: int) -> np.ndarray:
        """(n_users, length) recent products per customer at the cutoff (the user tower's input)."""
        if length not in self._history:
            self._history[length] = self.builder.history(self.cutoff, length)
        return self._history[length]

    def held(self, row: int) -> np.ndarray:
        """Product rows a customer holds at the cutoff."""
        return self.held_product[self.held_ptr[row] : self.held_ptr[row + 1]]

    def profile(self, row: int) -> dict[str, Any]:
        """A customer's columns as the data has them (numbers as floats, NaN when missing; text or None)."""
        out: dict[str, Any] = {c: float(v[row]) for c, v in self._user_float.items()}
        for c, v in self._user_other.items():
            x = v[row]
            out[c] = None if x is None or x != x else str(x)
        return out

    def customer_record(self, row: int, history_length: int = 0) -> CustomerRecord:
        """The model-independent part of a customer's record (the model's encodings left empty: see
        :meth:`~finrec.serving.scoring.ServingModel.record`)."""
        from finrec.serving.records import CustomerRecord

        a, b = self.pair_ptr[row], self.pair_ptr[row + 1]
        history = self.history(history_length)[row] if history_length else np.empty(0, np.int64)
        return CustomerRecord(
            tabular=np.empty(0, np.float32), dense=None, embedding=None, held=self.held(row),
            pair_product=self.pair_product[a:b], pair_values=self.pair_values[a:b], history=history,
            affinity=self.snap.category_affinity[row], positives=np.empty(0, np.int64), segment=None,
            profile=self.profile(row),
        )  # fmt: skip

    # -- pair features for one customer and many products ----------------------------------------------
    def pair_block(self, record: CustomerRecord | int | None, items: np.ndarray, columns: list[str],
                   profile: Mapping[str, Any] | None = None,
                   live: LiveCustomer | None = None) -> np.ndarray:  # fmt: skip
        """(len(items), len(columns)) float64 pair features of one customer (``record``, or None with ``profile``).

        The same values as :meth:`FeatureBuilder.pair_features` at the cutoff (a test holds this),
        from lookups instead of a query; ``live`` adds the customer's events since the cutoff. A row number
        stands for the customer's record in this data (-1: none).
        """
        n = len(items)
        if isinstance(record, int | np.integer):
            record = self.customer_record(int(record)) if record >= 0 else None
        if record is not None:
            profile = record.profile

        def ucol(c: str) -> np.ndarray | None:
            if c not in self._user_float:
                return None
            return np.full(n, float(profile[c]) if profile and profile.get(c) is not None else np.nan)

        def pcol(c: str) -> np.ndarray | None:
            v = self._product_float.get(c)
            return None if v is None else v[items]

        values: dict[str, np.ndarray] = profile_pair_features(ucol, pcol)
        held_now = live.held if live is not None else (record.held if record is not None else np.empty(0, np.int64))
        if self.snap.n_categories:
            cat = self.category_codes[items]
            if record is not None:
                aff = live.affinity if live is not None else record.affinity
                values["category_affinity"] = aff[cat]
                held_cats = self.category_codes[held_now]
                values["holds_category"] = np.isin(cat, held_cats).astype(np.float64)
            else:
                values["category_affinity"] = np.zeros(n)
                values["holds_category"] = np.zeros(n)
        if self.provider_codes is not None and self.any_held:
            mine = self.provider_codes[held_now]
            values["holds_provider"] = np.isin(self.provider_codes[items], mine).astype(np.float64)
        hist = np.broadcast_to(self._pair_default, (n, len(self.pair_names)))
        if record is not None and len(record.pair_product):
            mine_p = record.pair_product
            pos = np.searchsorted(mine_p, items)
            hit = pos < len(mine_p)
            hit[hit] = mine_p[pos[hit]] == items[hit]
            if hit.any():
                hist = hist.copy()
                hist[hit] = record.pair_values[pos[hit]]
        if live is not None:
            hist = np.array(hist, dtype=np.float64)
            for j, c in enumerate(self.pair_names):
                name = c.removeprefix("pair_")
                if name in live.pair_counts:
                    hist[:, j] = np.log1p(np.rint(np.expm1(hist[:, j])) + live.pair_counts[name][items])
                elif name == "days_since_seen":
                    last = live.last_seen[items]
                    hist[:, j] = np.where(np.isnan(last), hist[:, j], (live.now - last) / DAY)
        for j, c in enumerate(self.pair_names):
            values[c] = hist[:, j]
        out = np.full((n, len(columns)), np.nan)
        for j, c in enumerate(columns):
            if c in values:
                out[:, j] = values[c]
        return out

    # -- prospects ------------------------------------------------------------------------------------
    def prospect_frame(self, profile: Mapping[str, Any]) -> pd.DataFrame:
        """One row with the snapshot's customer columns for someone with no history and no holdings."""
        row: dict[str, Any] = {}
        for c in self.snap.users.columns:
            if c in profile and profile[c] is not None:
                v = profile[c]
                if c == "income":  # the snapshot keeps income on a log scale
                    v = float(np.log1p(max(float(v), 0.0)))
                row[c] = v
            elif c.startswith("days_since"):
                row[c] = np.nan  # no event yet: the snapshot's value for a customer without events
            elif c in self.snap.user_numeric and c not in self.ds.users.columns:
                row[c] = 0.0  # behaviour counts, holdings, affinities, tenure: nothing yet
            else:
                row[c] = np.nan if c in self.snap.user_numeric else None
        frame = pd.DataFrame([row], columns=self.snap.users.columns)
        for c in self.snap.user_numeric:
            frame[c] = pd.to_numeric(frame[c], errors="coerce").astype(np.float64)
        return frame

    def prospect_users(self, profile: Mapping[str, Any]) -> pd.DataFrame:
        """The prospect's raw profile as a one-row customers frame (for the eligibility rules)."""
        cols = [c for c in self.ds.users.columns if c != "user_id"]
        return pd.DataFrame([{c: profile.get(c) for c in cols}], columns=cols).astype(
            {c: np.float64 for c in cols if c in self._user_float}
        )
