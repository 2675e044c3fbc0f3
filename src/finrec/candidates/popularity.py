"""Popularity sources: what many customers take, overall, lately, as additions, or within their segment.

* ``PopularitySource(window="all")``: customers with a positive per product (all history);
* ``window="recent"``: the same over the last ``recent_days`` before the cutoff;
* ``window="additions"``: products customers *added* to what they already had (see
  :mod:`finrec.candidates.interactions`); for monthly holdings this is "what people take next",
  which differs from what most people hold (everyone holds a current account; few add one);
* :class:`SegmentPopularitySource`: popularity within the customer's segment (a categorical
  profile column), shrunk towards the overall rate so that a small segment does not overfit.

Scores are log shares of customers (or smoothed shares), the same for every customer of a segment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import scipy.sparse as sp

from finrec.candidates.base import NotFittedError, check_params, load_arrays, save_arrays
from finrec.candidates.interactions import Interactions


class PopularitySource:
    kind = "popularity"

    def __init__(self, window: Literal["all", "recent", "additions"] = "all") -> None:
        if window not in ("all", "recent", "additions"):
            raise ValueError(f"unknown popularity window {window!r}; use all, recent or additions")
        self.window = window

    @property
    def name(self) -> str:
        return "popularity" if self.window == "all" else f"popularity_{self.window}"

    def get_params(self) -> dict[str, Any]:
        return {"window": self.window}

    def fit(self, data: Interactions, segments: np.ndarray | None = None) -> Self:
        if self.window == "all":
            counts = np.asarray(data.matrix.sum(axis=0)).ravel()
        elif self.window == "recent":
            counts = np.asarray((data.recent > 0).sum(axis=0)).ravel()
        else:
            counts = np.bincount(data.add_product, minlength=data.n_products).astype(np.float64)
        # Ties broken by all-time popularity, so two products never tie by accident of the window.
        overall = np.asarray(data.matrix.sum(axis=0)).ravel()
        # Log share of customers (scale-free: a fit on more data keeps the same range), ties broken by
        # all-time popularity so two products never tie by accident of the window.
        total = float(counts.sum()) if self.window == "additions" else float((data.matrix.getnnz(axis=1) > 0).sum())
        self.scores_ = np.log((counts.astype(np.float64) + 1.0) / (total + 1.0)) + 1e-6 * np.log1p(overall)
        self.n_events_ = int(counts.sum())
        return self

    def score(self, history: sp.csr_matrix, segments: np.ndarray | None = None) -> np.ndarray:
        if not hasattr(self, "scores_"):
            raise NotFittedError(f"{self.name} is not fitted")
        return np.broadcast_to(self.scores_, (history.shape[0], len(self.scores_))).copy()

    def save(self, directory: Path) -> None:
        if not hasattr(self, "scores_"):
            raise NotFittedError(f"{self.name} is not fitted")
        save_arrays(directory, self.kind, self.get_params(), {"scores": self.scores_}, {"n_events": self.n_events_})

    @classmethod
    def load(cls, directory: Path) -> PopularitySource:
        _, params, info, arrays = load_arrays(directory)
        check_params(cls, params, {"window"})
        src = cls(**params)
        src.scores_ = arrays["scores"]
        src.n_events_ = int(info.get("n_events", 0))
        return src


class SegmentPopularitySource:
    """Popularity within a segment: (count in segment + m * overall share) / (segment size + m)."""

    kind = "segment_popularity"

    def __init__(self, column: str, shrinkage: float = 50.0) -> None:
        self.column = column
        self.shrinkage = float(shrinkage)

    @property
    def name(self) -> str:
        return f"popularity_by_{self.column}"

    def get_params(self) -> dict[str, Any]:
        return {"column": self.column, "shrinkage": self.shrinkage}

    def fit(self, data: Interactions, segments: np.ndarray | None = None) -> Self:
        if segments is None or len(segments) != data.n_users:
            raise ValueError(f"{self.name} needs one segment code per customer row")
        seg = np.asarray(segments, dtype=np.int64)
        n_seg = int(seg.max()) + 1 if len(seg) and seg.max() >= 0 else 0
        m = data.matrix
        users_with = np.asarray(m.sum(axis=1)).ravel() > 0
        overall = np.asarray(m.sum(axis=0)).ravel()
        share = overall / max(int(users_with.sum()), 1)
        table = np.tile(share, (n_seg + 1, 1))  # last row: unknown segment
        for s in range(n_seg):
            rows = np.flatnonzero((seg == s) & users_with)
            c = np.asarray(m[rows].sum(axis=0)).ravel()
            table[s] = (c + self.shrinkage * share) / (len(rows) + self.shrinkage)
        self.table_ = table + 1e-9 * np.log1p(overall)
        return self

    def score(self, history: sp.csr_matrix, segments: np.ndarray | None = None) -> np.ndarray:
        if not hasattr(self, "table_"):
            raise NotFittedError(f"{self.name} is not fitted")
        n = history.shape[0]
        seg = np.full(n, -1, np.int64) if segments is None else np.asarray(segments, dtype=np.int64)
        unknown = len(self.table_) - 1
        seg = np.where((seg >= 0) & (seg < unknown), seg, unknown)
        return self.table_[seg].astype(np.float64)

    def save(self, directory: Path) -> None:
        if not hasattr(self, "table_"):
            raise NotFittedError(f"{self.name} is not fitted")
        save_arrays(directory, self.kind, self.get_params(), {"table": self.table_})

    @classmethod
    def load(cls, directory: Path) -> SegmentPopularitySource:
        _, params, _, arrays = load_arrays(directory)
        check_params(cls, params, {"column", "shrinkage"})
        src = cls(**params)
        src.table_ = arrays["table"]
        return src


class FlatSource:
    """Scores every product 0: stands in for a source that cannot be fitted at some cutoff (too little data
    before it), so that the ranker still finds its columns. Its rank feature is then the product order."""

    kind = "flat"

    def __init__(self, source_name: str, n_products: int) -> None:
        self.source_name = source_name
        self.n_products = int(n_products)

    @property
    def name(self) -> str:
        return self.source_name

    def get_params(self) -> dict[str, Any]:
        return {"source_name": self.source_name, "n_products": self.n_products}

    def fit(self, data: Interactions, segments: np.ndarray | None = None) -> Self:
        self.n_products = data.n_products
        return self

    def score(self, history: sp.csr_matrix, segments: np.ndarray | None = None) -> np.ndarray:
        return np.zeros((history.shape[0], self.n_products))

    def save(self, directory: Path) -> None:
        save_arrays(directory, self.kind, self.get_params(), {})

    @classmethod
    def load(cls, directory: Path) -> FlatSource:
        _, params, _, _ = load_arrays(directory)
        check_params(cls, params, {"source_name", "n_products"})
        return cls(**params)
