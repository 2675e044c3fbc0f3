"""Top-k inner-product search over item embeddings: exact (numpy), HNSW (hnswlib) and IVF (faiss).

Every index has the same ``search(query_emb, k, exclude=None) -> (scores, items)``:

- ``scores`` float32 ``(n_queries, k)``, sorted descending, ties broken by the smaller item row;
- ``items`` int64 ``(n_queries, k)``, item rows (positions in ``item_emb``);
- ``exclude`` an optional bool ``(n_queries, n_items)`` mask of items that must never be returned for that query
  (held products, ineligible ones). When fewer than ``k`` items are allowed the rows are padded with item ``-1``
  and score ``-inf``.

The approximate indexes only *propose* candidates: the scores they return are recomputed exactly from the
embeddings, so scores are comparable across index kinds. With ``exclude`` they over-fetch (``oversample`` times
``k``), drop the excluded candidates, and retry the queries left short with twice as many candidates and twice the
search effort (``ef`` for HNSW, ``nprobe`` for IVF); once a retry would fetch half the catalogue or more, those
queries fall back to exact search, so a query never gets fewer results than it has allowed items.

hnswlib and faiss are imported when an index of that kind is built, not when this module is imported. None of
the indexes has a save format: rebuild them from the saved item embeddings.

>>> import numpy as np
>>> items = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
>>> scores, rows = ExactIndex(items).search(np.array([[1.0, 0.0]], dtype=np.float32), k=2)
>>> rows.tolist(), [round(float(s), 2) for s in scores[0]]
([[0, 2]], [1.0, 0.6])
"""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol

import numpy as np

__all__ = [
    "CandidateIndex",
    "ExactIndex",
    "HNSWIndex",
    "IVFIndex",
    "make_index",
    "recall_vs_exact",
]

# Scores are computed in blocks of queries so that a block holds at most this many float32 values (~16 MB).
_BLOCK_VALUES = 1 << 22


class CandidateIndex(Protocol):
    """What the retrieval stage needs from an index."""

    @property
    def n_items(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def search(
        self, query_emb: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


# --------------------------------------------------------------------------- validation


def _as_embeddings(name: str, arr: Any, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 (n, d) copy/view of ``arr``; ValueError naming ``name`` otherwise."""
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must hold floating-point values, got dtype {a.dtype}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} has {a.shape[1]} columns but the index holds {dim}-dimensional embeddings")
    if a.shape[1] == 0:
        raise ValueError(f"{name} has no columns")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check_exclude(exclude: Any, n_queries: int, n_items: int) -> np.ndarray | None:
    if exclude is None:
        return None
    ex = np.asarray(exclude)
    if ex.dtype != np.bool_:
        raise ValueError(f"exclude must be a boolean mask, got dtype {ex.dtype}")
    if ex.shape != (n_queries, n_items):
        raise ValueError(f"exclude must have shape (n_queries, n_items) = {(n_queries, n_items)}, got {ex.shape}")
    return ex


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- shared top-k machinery


def _select_top(cand: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of candidates by descending score (ties: smaller item first), keep ``k``, pad with -1/-inf.

    ``scores`` must be ``-inf`` wherever the candidate is missing or not allowed.
    """
    n, m = cand.shape
    out_s = np.full((n, k), -np.inf, dtype=np.float32)
    out_i = np.full((n, k), -1, dtype=np.int64)
    if m == 0 or n == 0:
        return out_s, out_i
    order = np.lexsort((cand, -scores), axis=1)[:, :k]
    s = np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False)
    i = np.take_along_axis(cand, order, axis=1).astype(np.int64, copy=False)
    i[np.isneginf(s)] = -1
    width = s.shape[1]
    out_s[:, :width] = s
    out_i[:, :width] = i
    return out_s, out_i


def _exact_top_k(
    items: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, in blocks of queries; ``exclude`` rows align with ``queries``."""
    n_q, n_items = len(queries), len(items)
    out_s = np.full((n_q, k), -np.inf, dtype=np.float32)
    out_i = np.full((n_q, k), -1, dtype=np.int64)
    keep = min(k, n_items)
    step = max(1, _BLOCK_VALUES // max(n_items, 1))
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        scores = queries[start:stop] @ items.T
        if exclude is not None:
            scores[exclude[start:stop]] = -np.inf
        if keep < n_items:
            cand = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        else:
            cand = np.broadcast_to(np.arange(n_items), scores.shape)
        cand_scores = np.take_along_axis(scores, cand, axis=1)
        s, i = _select_top(np.ascontiguousarray(cand, dtype=np.int64), cand_scores, keep)
        out_s[start:stop, :keep] = s
        out_i[start:stop, :keep] = i
    return out_s, out_i


# --------------------------------------------------------------------------- exact


class _ItemTable:
    """The checked item embeddings every index searches (exactly, or to rescore candidates)."""

    def __init__(self, item_emb: np.ndarray) -> None:
        self.item_emb = _as_embeddings("item_emb", item_emb)
        if len(self.item_emb) == 0:
            raise ValueError("item_emb is empty: an index needs at least one item")

    @property
    def n_items(self) -> int:
        return int(self.item_emb.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_emb.shape[1])


class ExactIndex(_ItemTable):
    """Brute-force inner-product search (numpy matmul + argpartition), batched over queries."""

    def search(self, query_emb: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query by inner product; see the module docstring for the output contract."""
        q = _as_embeddings("query_emb", query_emb, self.dim)
        k = _check_k(k)
        ex = _check_exclude(exclude, len(q), self.n_items)
        return _exact_top_k(self.item_emb, q, k, ex)


# --------------------------------------------------------------------------- approximate


class _ApproximateIndex(_ItemTable):
    """Shared ``search`` for indexes that propose candidates: exact rescoring, exclusion, retries, fallback."""

    def __init__(self, item_emb: np.ndarray, oversample: float) -> None:
        super().__init__(item_emb)
        if not (isinstance(oversample, int | float) and math.isfinite(oversample) and oversample >= 1):
            raise ValueError(f"oversample must be a number >= 1, got {oversample!r}")
        self.oversample = float(oversample)

    def _candidates(self, queries: np.ndarray, k: int, attempt: int) -> np.ndarray:
        """int64 (n, k) candidate rows, -1 where the index found fewer; ``attempt`` 0, 1, ... asks for more effort."""
        raise NotImplementedError

    def search(self, query_emb: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query (approximate); see the module docstring for the output contract."""
        q = _as_embeddings("query_emb", query_emb, self.dim)
        k = _check_k(k)
        ex = _check_exclude(exclude, len(q), self.n_items)
        n_q, n_items = len(q), self.n_items
        keep = min(k, n_items)
        out_s = np.full((n_q, k), -np.inf, dtype=np.float32)
        out_i = np.full((n_q, k), -1, dtype=np.int64)
        if n_q == 0:
            return out_s, out_i
        # How many results each query can have at most: k, or fewer when most of the catalogue is excluded.
        target = np.full(n_q, keep, dtype=np.int64)
        if ex is not None:
            target = np.minimum(target, n_items - ex.sum(axis=1))
        first_ask = keep if ex is None else min(n_items, math.ceil(self.oversample * keep))

        pending = np.arange(n_q)
        ask, attempt = first_ask, 0
        while pending.size:
            if ask >= n_items or (attempt > 0 and 2 * ask >= n_items):
                # Fetching (nearly) everything: exact search is cheaper and guaranteed complete.
                s, i = _exact_top_k(self.item_emb, q[pending], keep, None if ex is None else ex[pending])
                out_s[pending, :keep], out_i[pending, :keep] = s, i
                break
            still_short = []
            step = max(1, _BLOCK_VALUES // (ask * self.dim))
            for start in range(0, pending.size, step):
                rows = pending[start : start + step]
                cand = self._candidates(q[rows], ask, attempt)
                valid = (cand >= 0) & (cand < n_items)
                safe = np.where(valid, cand, 0)
                if ex is not None:
                    valid &= ~ex[rows[:, None], safe]
                done = valid.sum(axis=1) >= target[rows]
                if not done.all():
                    still_short.append(rows[~done])
                rows, safe, valid = rows[done], safe[done], valid[done]
                if rows.size == 0:
                    continue
                # Exact rescoring: scores comparable with ExactIndex, independent of the library's distance.
                scores = np.einsum("nd,nkd->nk", q[rows], self.item_emb[safe]).astype(np.float32, copy=False)
                scores[~valid] = -np.inf
                s, i = _select_top(safe, scores, keep)
                out_s[rows, :keep], out_i[rows, :keep] = s, i
            pending = np.concatenate(still_short) if still_short else np.empty(0, dtype=np.int64)
            ask, attempt = min(n_items, 2 * ask), attempt + 1
        return out_s, out_i


class HNSWIndex(_ApproximateIndex):
    """Hierarchical navigable small-world graph (hnswlib, inner-product space).

    ``M`` and ``ef_construction`` trade build time and memory for graph quality; ``ef_search`` (the size of the
    dynamic candidate list, raised to at least the number of candidates fetched) trades query time for recall.
    The graph is built with ``random_seed=seed``; with ``num_threads=1`` (the default) insertion order is fixed,
    so the graph and the results are reproducible. More threads build faster but the graph then depends on
    thread scheduling. Searching sets the index's ``ef``, so do not search one instance from several threads.
    """

    def __init__(
        self,
        item_emb: np.ndarray,
        M: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        *,
        seed: int = 0,
        num_threads: int = 1,
        oversample: float = 2.0,
    ) -> None:
        super().__init__(item_emb, oversample)
        self.M = _check_positive_int("M", M)
        self.ef_construction = _check_positive_int("ef_construction", ef_construction)
        self.ef_search = _check_positive_int("ef_search", ef_search)
        self.num_threads = _check_positive_int("num_threads", num_threads)
        import hnswlib  # lazy: importing finrec.retrieval.index must not load it

        index = hnswlib.Index(space="ip", dim=self.dim)
        index.init_index(
            max_elements=self.n_items, M=self.M, ef_construction=self.ef_construction, random_seed=int(seed)
        )
        index.add_items(self.item_emb, np.arange(self.n_items), num_threads=self.num_threads)
        self._index = index

    def _candidates(self, queries: np.ndarray, k: int, attempt: int) -> np.ndarray:
        ef = max(self.ef_search << attempt, k)
        self._index.set_ef(ef)
        try:
            labels, _ = self._index.knn_query(queries, k=k, num_threads=self.num_threads)
        except RuntimeError:
            # hnswlib refuses when it finds fewer than k neighbours for some query; let the caller retry.
            return np.full((len(queries), k), -1, dtype=np.int64)
        return np.asarray(labels, dtype=np.int64)


class IVFIndex(_ApproximateIndex):
    """Inverted-file index with exact vectors in the lists (faiss ``IndexIVFFlat``, inner product).

    ``nlist`` coarse centroids (default ``round(sqrt(n_items))``) are learned by k-means on the items themselves;
    a query scans the ``nprobe`` lists whose centroids score highest (default ``ceil(nlist / 4)``). k-means uses
    ``seed``, so the index is reproducible.
    """

    def __init__(
        self,
        item_emb: np.ndarray,
        nlist: int | None = None,
        nprobe: int | None = None,
        *,
        seed: int = 0,
        oversample: float = 2.0,
    ) -> None:
        super().__init__(item_emb, oversample)
        n = self.n_items
        self.nlist = max(1, round(math.sqrt(n))) if nlist is None else _check_positive_int("nlist", nlist)
        if self.nlist > n:
            raise ValueError(f"nlist={self.nlist} is larger than the number of items ({n})")
        self.nprobe = math.ceil(self.nlist / 4) if nprobe is None else _check_positive_int("nprobe", nprobe)
        self.nprobe = min(self.nprobe, self.nlist)
        import faiss  # lazy: importing finrec.retrieval.index must not load it

        self._faiss = faiss
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed)
        # Small catalogues train on few points per centroid; that is fine here and not worth a warning.
        index.cp.min_points_per_centroid = 1
        index.train(self.item_emb)
        index.add(self.item_emb)
        self._quantizer = quantizer  # the IVF index points into it: keep it alive
        self._index = index

    def _candidates(self, queries: np.ndarray, k: int, attempt: int) -> np.ndarray:
        nprobe = min(self.nlist, self.nprobe << attempt)
        params = self._faiss.SearchParametersIVF()  # per call: the index's own nprobe is never changed
        params.nprobe = nprobe
        _, labels = self._index.search(queries, k, params=params)
        return np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------- helpers


def make_index(kind: Literal["exact", "hnsw", "ivf"], item_emb: np.ndarray, **params: Any) -> CandidateIndex:
    """Build an index of the given kind; ``params`` go to its constructor (e.g. ``ef_search=256``, ``nprobe=8``)."""
    if kind == "exact":
        if params:
            raise ValueError(f"the exact index takes no parameters, got {sorted(params)}")
        return ExactIndex(item_emb)
    if kind == "hnsw":
        return HNSWIndex(item_emb, **params)
    if kind == "ivf":
        return IVFIndex(item_emb, **params)
    raise ValueError(f"unknown index kind {kind!r}; expected 'exact', 'hnsw' or 'ivf'")


def recall_vs_exact(index: CandidateIndex, exact: CandidateIndex, queries: np.ndarray, k: int) -> float:
    """Mean over queries of |top-k(index) ∩ top-k(exact)| / |top-k(exact)| (padding ignored)."""
    _, approx_items = index.search(queries, k)
    _, exact_items = exact.search(queries, k)
    if len(exact_items) == 0:
        raise ValueError("queries is empty: recall is undefined")
    total = 0.0
    for found, truth in zip(approx_items, exact_items, strict=True):
        truth = truth[truth >= 0]
        if truth.size == 0:
            total += 1.0
            continue
        total += np.intersect1d(found[found >= 0], truth).size / truth.size
    return total / len(exact_items)
