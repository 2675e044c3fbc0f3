"""Co-holding transitions: customers who hold X add Y next.

From the *additions* of :mod:`finrec.candidates.interactions` (a customer's first positive with
a product, made after they already had others), count for every pair of products how often a
customer who had X went on to add Y: ``C[x, y]``, and ``N[x]`` the additions made while having X.
The score of Y for a customer is the mean over the products X they have of

    P(add Y | has X) = (C[x, y] + m * prior[y]) / (N[x] + m)

where ``prior`` is the share of all additions that were Y and ``m`` the shrinkage: an X seen in
few additions says little and falls back to what customers add in general. A customer with
nothing yet gets the prior. Unlike co-occurrence, this is directional and learns the order in
which customers acquire products (a current account, then a card, then a loan).

Needs dated additions: with a single snapshot of holdings (every positive at one time) there is
nothing to learn and ``fit`` raises ``ValueError`` (the training plan reports the source as
unavailable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import numpy as np
import scipy.sparse as sp

from finrec.candidates.base import NotFittedError, as_csr32, check_params, load_arrays, save_arrays
from finrec.candidates.interactions import Interactions

MIN_ADDITIONS = 20
MAX_ADDITIONS = 300_000
MAX_PRODUCTS = 20_000


class TransitionSource:
    kind = "transitions"

    def __init__(self, shrinkage: float = 20.0, seed: int = 0) -> None:
        self.shrinkage = float(shrinkage)
        self.seed = int(seed)

    @property
    def name(self) -> str:
        return "transitions"

    def get_params(self) -> dict[str, Any]:
        return {"shrinkage": self.shrinkage, "seed": self.seed}

    def fit(self, data: Interactions, segments: np.ndarray | None = None) -> Self:
        n_add = len(data.add_user)
        if data.n_products > MAX_PRODUCTS:
            raise ValueError(f"transitions keep a dense {data.n_products}^2 table; not above {MAX_PRODUCTS} products")
        if n_add < MIN_ADDITIONS:
            raise ValueError(f"only {n_add} dated additions (need {MIN_ADDITIONS}): holdings without a history of "
                             "acquisitions say nothing about what customers add next")  # fmt: skip
        idx = np.arange(n_add)
        if n_add > MAX_ADDITIONS:  # counts converge long before; bound time and memory
            idx = np.sort(np.random.default_rng(self.seed).choice(n_add, MAX_ADDITIONS, replace=False))
        before = data.held_before(data.add_user[idx], data.add_ts[idx])
        n = data.n_products
        target = sp.csr_matrix((np.ones(len(idx), np.float64), (np.arange(len(idx)), data.add_product[idx])),
                               shape=(len(idx), n))  # fmt: skip
        counts = np.asarray((sp.csr_matrix(before, dtype=np.float64).T @ target).toarray())
        totals = counts.sum(axis=1)
        prior = np.bincount(data.add_product[idx], minlength=n) / len(idx)
        self.transition_ = ((counts + self.shrinkage * prior[None, :]) / (totals[:, None] + self.shrinkage)).astype(
            np.float32
        )
        self.prior_ = prior.astype(np.float64)
        self.n_additions_ = int(len(idx))
        return self

    def score(self, history: sp.csr_matrix, segments: np.ndarray | None = None) -> np.ndarray:
        if not hasattr(self, "transition_"):
            raise NotFittedError("transitions is not fitted")
        h = as_csr32(history)
        if not np.all(h.data == 1.0):
            h = h.copy()
            h.data[:] = 1.0
        n_have = np.diff(h.indptr)
        if h.shape[0] == 1:  # one customer (a request): rows summed in order, as scipy does
            total = np.asarray(self.transition_[h.indices].sum(axis=0, dtype=np.float32), dtype=np.float64)[None, :]
        else:
            total = np.asarray(h @ self.transition_, dtype=np.float64)
        mean = total / np.maximum(n_have, 1)[:, None]
        return np.where(n_have[:, None] > 0, mean, self.prior_[None, :])

    def save(self, directory: Path) -> None:
        if not hasattr(self, "transition_"):
            raise NotFittedError("transitions is not fitted")
        save_arrays(directory, self.kind, self.get_params(), {"transition": self.transition_, "prior": self.prior_},
                    {"n_additions": self.n_additions_})  # fmt: skip

    @classmethod
    def load(cls, directory: Path) -> TransitionSource:
        _, params, info, arrays = load_arrays(directory)
        check_params(cls, params, {"shrinkage", "seed"})
        src = cls(**params)
        src.transition_ = arrays["transition"].astype(np.float32)
        src.prior_ = arrays["prior"]
        src.n_additions_ = int(info.get("n_additions", 0))
        return src
