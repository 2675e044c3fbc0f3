"""Turning a :class:`~finrec.features.builder.Snapshot` into model inputs, the same way at every cutoff.

:class:`FeatureSpace` is fitted once, on the training snapshot, and saved with
the model: numeric columns get a fill value (the training mean) and a scale,
columns that had missing values get a 0/1 missing indicator, and categorical
columns keep their most frequent values as a vocabulary (everything else is
"other"). The dense encoding feeds the two-tower model; the tabular encoding
(raw numbers with NaN, categories as stable integer codes) feeds LightGBM.
A column the model knows but a later dataset lacks becomes missing, never an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from finrec.features.builder import Snapshot

MAX_VOCAB = 30


@dataclass
class ColumnStats:
    mean: float
    scale: float
    has_missing: bool


@dataclass
class FeatureSpace:
    """Fitted encodings of user and product columns (JSON round-trip via to_dict/from_dict)."""

    user_numeric: dict[str, ColumnStats] = field(default_factory=dict)
    product_numeric: dict[str, ColumnStats] = field(default_factory=dict)
    user_vocab: dict[str, list[str]] = field(default_factory=dict)
    product_vocab: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def fit(cls, snap: Snapshot) -> FeatureSpace:
        def stats(df: pd.DataFrame, cols: list[str]) -> dict[str, ColumnStats]:
            out = {}
            for c in cols:
                v = df[c].to_numpy(np.float64)
                ok = ~np.isnan(v)
                mean = float(v[ok].mean()) if ok.any() else 0.0
                std = float(v[ok].std()) if ok.sum() > 1 else 0.0
                out[c] = ColumnStats(mean, std if std > 1e-9 else 1.0, bool((~ok).any()))
            return out

        def vocab(df: pd.DataFrame, cols: list[str]) -> dict[str, list[str]]:
            return {c: [str(x) for x in df[c].dropna().astype(str).value_counts().index[:MAX_VOCAB]] for c in cols}

        return cls(
            user_numeric=stats(snap.users, snap.user_numeric),
            product_numeric=stats(snap.products, snap.product_numeric),
            user_vocab=vocab(snap.users, snap.user_categorical),
            product_vocab=vocab(snap.products, snap.product_categorical),
        )

    # -- dense (two-tower) --------------------------------------------------------------------
    def user_dense_columns(self) -> dict[str, tuple[int, int | None]]:
        """Per numeric customer column, its position in :meth:`user_dense` (and of its missing indicator)."""
        out: dict[str, tuple[int, int | None]] = {}
        j = 0
        for c, s in self.user_numeric.items():
            out[c] = (j, j + 1 if s.has_missing else None)
            j += 2 if s.has_missing else 1
        return out

    @staticmethod
    def standardise(stats: ColumnStats, v: float) -> float:
        """One value as :meth:`user_dense` encodes it (NaN becomes the mean, i.e. 0)."""
        return 0.0 if v != v else float(np.clip((v - stats.mean) / stats.scale, -5, 5))

    @staticmethod
    def _dense(df: pd.DataFrame, numeric: dict[str, ColumnStats], vocab: dict[str, list[str]]) -> np.ndarray:
        parts = []
        n = len(df)
        for c, s in numeric.items():
            v = df[c].to_numpy(np.float64) if c in df.columns else np.full(n, np.nan)
            miss = np.isnan(v)
            parts.append(np.clip((np.where(miss, s.mean, v) - s.mean) / s.scale, -5, 5))
            if s.has_missing:
                parts.append(miss.astype(np.float64))
        for c, values in vocab.items():
            col = (
                df[c].astype(object).where(df[c].notna(), None).map(lambda x: None if x is None else str(x))
                if c in df.columns
                else pd.Series([None] * n)
            )
            codes = pd.Index(values).get_indexer(col)  # -1: missing or not in the vocabulary
            onehot = np.zeros((n, len(values) + 1))
            onehot[np.arange(n), np.where(codes < 0, len(values), codes)] = 1.0
            parts.append(onehot.T)
        if not parts:
            return np.zeros((n, 1), dtype=np.float32)
        return np.vstack([np.atleast_2d(p) for p in parts]).T.astype(np.float32)

    def user_dense(self, snap: Snapshot | pd.DataFrame) -> np.ndarray:
        """Dense customer features of a snapshot, or of a frame with the snapshot's customer columns."""
        users = snap if isinstance(snap, pd.DataFrame) else snap.users
        return self._dense(users, self.user_numeric, self.user_vocab)

    def product_dense(self, snap: Snapshot) -> np.ndarray:
        return self._dense(snap.products, self.product_numeric, self.product_vocab)

    # -- tabular (LightGBM) -------------------------------------------------------------------
    @staticmethod
    def _codes(df: pd.DataFrame, c: str, values: list[str], rows: np.ndarray) -> np.ndarray:
        if c not in df.columns:
            return np.full(len(rows), np.nan)
        col = df[c].to_numpy(dtype=object)[rows]
        codes = pd.Index(values).get_indexer([None if x is None or x != x else str(x) for x in col])
        return np.where(codes < 0, len(values), codes).astype(np.float64)  # unseen/missing -> "other"

    def tabular_names(self, pair_columns: list[str]) -> tuple[list[str], list[str]]:
        """Column names of :meth:`tabular` and which of them are categorical."""
        user_cat = [f"user_{c}" for c in self.user_vocab]
        prod_cat = [f"product_{c}" for c in self.product_vocab]
        names = (
            [f"user_{c}" for c in self.user_numeric]
            + user_cat
            + [f"product_{c}" for c in self.product_numeric]
            + prod_cat
            + list(pair_columns)
        )
        return names, user_cat + prod_cat

    def user_tabular(self, users: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
        """(len(rows), n_user_features) float64: the customer block of :meth:`tabular` for ``users`` rows."""
        cols = [users[c].to_numpy(np.float64)[rows] if c in users else np.full(len(rows), np.nan)
                for c in self.user_numeric]  # fmt: skip
        cols += [self._codes(users, c, values, rows) for c, values in self.user_vocab.items()]
        return np.column_stack(cols) if cols else np.zeros((len(rows), 0))

    def product_tabular(self, products: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
        """(len(rows), n_product_features) float64: the product block of :meth:`tabular`."""
        cols = [products[c].to_numpy(np.float64)[rows] if c in products else np.full(len(rows), np.nan)
                for c in self.product_numeric]  # fmt: skip
        cols += [self._codes(products, c, values, rows) for c, values in self.product_vocab.items()]
        return np.column_stack(cols) if cols else np.zeros((len(rows), 0))

    def tabular(
        self, snap: Snapshot, users: np.ndarray, products: np.ndarray, pairs: pd.DataFrame, pair_columns: list[str]
    ) -> np.ndarray:
        """(len(users), n_features) float32 with NaN for missing, in the order of :meth:`tabular_names`."""
        # Filled block by block into one float32 matrix: no float64 copy of the whole table (it is the peak of a
        # training's memory). Each value is cast to float32 exactly as a float64 table cast at the end would be.
        user = self.user_tabular(snap.users, users)
        n_user = user.shape[1]
        out = np.empty((len(users), n_user + len(self.product_numeric) + len(self.product_vocab) + len(pair_columns)),
                       dtype=np.float32)  # fmt: skip
        out[:, :n_user] = user
        del user
        prod = self.product_tabular(snap.products, products)
        out[:, n_user : n_user + prod.shape[1]] = prod
        start = n_user + prod.shape[1]
        del prod
        for j, c in enumerate(pair_columns):
            out[:, start + j] = pairs[c].to_numpy(np.float64) if c in pairs.columns else np.nan
        return out

    # -- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpace:
        return cls(
            user_numeric={k: ColumnStats(**v) for k, v in d["user_numeric"].items()},
            product_numeric={k: ColumnStats(**v) for k, v in d["product_numeric"].items()},
            user_vocab=d["user_vocab"],
            product_vocab=d["product_vocab"],
        )
