"""Item-to-item collaborative filtering: EASE (closed form) and cosine item-kNN.

EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019) learns an
item-item weight matrix ``B`` with a zero diagonal that best reconstructs each customer's
positives from their other positives, with an L2 penalty ``l2``:
``P = (X^T X + l2 I)^-1``, ``B = I - P / diag(P)`` (so ``B_jj = 0``). A customer's score
is ``x_u @ B``. It is one dense ``n x n`` inverse: exact and fast up to ~20k products
(a 20k inverse is ~3 GB of float64 and a minute on two cores); larger catalogues use
:class:`ItemKNNSource`. We write it ourselves: the whole model is three lines of numpy, and
the libraries that ship it are research code without a stable save format.

``ItemKNNSource``: cosine similarity of products over customers (``X^T X`` normalised by
the products' counts), keeping each product's ``neighbours`` most similar products; sparse,
so it scales to any catalogue. ``l2`` of EASE is chosen by the training plan on validation
(``fit_path`` fits several penalties from one Gram matrix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from finrec.candidates.base import (
    NotFittedError,
    as_csr32,
    check_params,
    csr_from,
    csr_parts,
    load_arrays,
    save_arrays,
)
from finrec.candidates.interactions import Interactions

MAX_EASE_PRODUCTS = 20_000


def gram(x: sp.csr_matrix) -> np.ndarray:
    """``X^T X`` as a dense float64 matrix."""
    x = sp.csr_matrix(x, dtype=np.float64)
    return np.asarray((x.T @ x).toarray(), dtype=np.float64)


class EASESource:
    """EASE (Steck 2019). ``l2`` is the penalty *per unit of the mean product count* (the mean diagonal of
    ``X^T X``), the scale-free form a penalty is searched in; ``penalty``, when given, is the absolute one.

    Training searches ``l2`` on its tuning data and keeps the *absolute* penalty it amounts to there: as in
    ridge regression, the penalty is the prior's strength, the same whatever the number of rows, so a refit on
    more data (every event, after validation on part of them) regularises a little less, as it should.
    """

    kind = "ease"

    def __init__(self, l2: float = 1.0, penalty: float | None = None) -> None:
        if not l2 > 0 or (penalty is not None and not penalty > 0):
            raise ValueError(f"EASE needs l2 > 0 and penalty > 0 when given, got l2={l2}, penalty={penalty}")
        self.l2 = float(l2)
        self.penalty = None if penalty is None else float(penalty)

    @property
    def name(self) -> str:
        return "ease"

    def get_params(self) -> dict[str, Any]:
        return {"l2": self.l2, "penalty": self.penalty}

    def fit(self, data: Interactions, segments: np.ndarray | None = None, g: np.ndarray | None = None) -> Self:
        n = data.n_products
        if n > MAX_EASE_PRODUCTS:
            raise ValueError(f"EASE over {n} products needs a {n}x{n} inverse; use item_knn above "
                             f"{MAX_EASE_PRODUCTS} products")  # fmt: skip
        g = gram(data.matrix) if g is None else g.copy()
        if self.penalty is not None:
            self.penalty_ = self.penalty
        else:
            self.penalty_ = self.l2 * (float(np.mean(np.diag(g))) or 1.0) if n else self.l2
        g[np.diag_indices(n)] += self.penalty_
        try:
            p = scipy.linalg.inv(g, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:  # not possible with l2 > 0, but never crash a training on it
            p = np.linalg.pinv(g)
        b = -p / np.diag(p)[None, :]
        b[np.diag_indices(n)] = 0.0
        self.weights_ = b.astype(np.float32)
        return self

    def score(self, history: sp.csr_matrix, segments: np.ndarray | None = None) -> np.ndarray:
        if not hasattr(self, "weights_"):
            raise NotFittedError("ease is not fitted")
        h = as_csr32(history)
        if h.shape[0] == 1 and np.all(h.data == 1.0):  # one customer (a request): rows summed in order, as scipy does
            return np.asarray(self.weights_[h.indices].sum(axis=0, dtype=np.float32), dtype=np.float64)[None, :]
        return np.asarray(h @ self.weights_, dtype=np.float64)

    def save(self, directory: Path) -> None:
        if not hasattr(self, "weights_"):
            raise NotFittedError("ease is not fitted")
        save_arrays(directory, self.kind, self.get_params(), {"weights": self.weights_})

    @classmethod
    def load(cls, directory: Path) -> EASESource:
        _, params, _, arrays = load_arrays(directory)
        check_params(cls, params, {"l2", "penalty"})
        src = cls(**params)
        src.weights_ = arrays["weights"].astype(np.float32)
        return src


class ItemKNNSource:
    kind = "item_knn"

    def __init__(self, neighbours: int = 100, shrink: float = 10.0) -> None:
        self.neighbours = int(neighbours)
        self.shrink = float(shrink)

    @property
    def name(self) -> str:
        return "item_knn"

    def get_params(self) -> dict[str, Any]:
        return {"neighbours": self.neighbours, "shrink": self.shrink}

    def fit(self, data: Interactions, segments: np.ndarray | None = None) -> Self:
        x = sp.csr_matrix(data.matrix, dtype=np.float64)
        co = sp.csr_matrix(x.T @ x)
        co.setdiag(0)
        co.eliminate_zeros()
        norm = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
        co = co.tocoo()
        sim = co.data / (norm[co.row] * norm[co.col] + self.shrink)
        # Keep each product's best neighbours (ties by product row, so the result is deterministic).
        order = np.lexsort((co.col, -sim, co.row))
        r, c, s = co.row[order], co.col[order], sim[order]
        start = np.searchsorted(r, np.arange(data.n_products + 1))
        rank = np.arange(len(r)) - start[r]
        keep = rank < self.neighbours
        n = data.n_products
        self.similarity_ = sp.csr_matrix((s[keep].astype(np.float32), (r[keep], c[keep])), shape=(n, n))
        return self

    def score(self, history: sp.csr_matrix, segments: np.ndarray | None = None) -> np.ndarray:
        if not hasattr(self, "similarity_"):
            raise NotFittedError("item_knn is not fitted")
        return np.asarray((as_csr32(history) @ self.similarity_).toarray(), dtype=np.float64)

    def save(self, directory: Path) -> None:
        if not hasattr(self, "similarity_"):
            raise NotFittedError("item_knn is not fitted")
        save_arrays(directory, self.kind, self.get_params(), csr_parts(self.similarity_, "similarity"))

    @classmethod
    def load(cls, directory: Path) -> ItemKNNSource:
        _, params, _, arrays = load_arrays(directory)
        check_params(cls, params, {"neighbours", "shrink"})
        src = cls(**params)
        src.similarity_ = csr_from(arrays, "similarity")
        return src
