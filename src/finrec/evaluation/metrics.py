"""Ranking metrics over plain arrays, vectorised so they scale to millions of users.

A model's output is ``ranked``: an integer array of shape ``(n_users, k)`` with
item indices per user in rank order, ``-1`` where a user has fewer than ``k``
items (padding). What users actually wanted is a :class:`Relevance`: graded
relevance per user in CSR form (``indptr``, ``items``, ``grades``). Every
per-user metric returns a float64 array of shape ``(n_users,)`` with NaN for
users who have no relevant items (callers drop them, see
:func:`finrec.evaluation.bootstrap.summarise`).

Work is done in blocks of rows so memory stays bounded; there is no Python
loop over users. Each row of ``ranked`` is assumed to hold distinct items (a
repeated item would be credited twice); :func:`dedupe_ranked` fixes rows that
may not.

Examples
--------
>>> rel = Relevance.from_pairs(2, user=[0, 0, 1], item=[3, 1, 2], grade=[2, 1, 1])
>>> ranked = np.array([[3, 0, 1], [0, 4, -1]])
>>> rel.gains(ranked).tolist()
[[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
>>> ndcg_at_k(ranked, rel, k=3).round(4).tolist()
[0.9639, 0.0]
>>> mrr(ranked, rel).tolist()
[1.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Relevance",
    "catalogue_coverage",
    "dedupe_ranked",
    "evaluate_rankings",
    "hit_rate_at_k",
    "map_at_k",
    "mrr",
    "ndcg_at_k",
    "recall_at_k",
]

Gain = Literal["exponential", "linear"]
GainsMethod = Literal["auto", "dense", "search"]

#: Cells of ``ranked`` handled per block (about 4M: 16 MB of float32 gains, 32 MB of int64 keys).
_BLOCK_CELLS = 1 << 22
#: Cells of the dense per-block grade matrix used by the "dense" lookup (32 MB of float32).
_DENSE_CELLS = 1 << 23
#: "auto" uses the dense lookup when the catalogue (max relevant item + 1) is at most this.
_DENSE_MAX_ITEMS = 1 << 14
#: (user, item) keys are ``user * stride + item``; keep well inside int64.
_MAX_KEY = 1 << 62


class Relevance:
    """Graded relevance of items per user, stored CSR-like.

    User ``u``'s relevant items are ``items[indptr[u]:indptr[u + 1]]`` with grades
    ``grades[indptr[u]:indptr[u + 1]]`` (all > 0). Items are kept sorted and
    distinct within each user; the constructor sorts them if needed and raises
    on a repeated (user, item) pair. Most callers use :meth:`from_pairs`.

    Parameters
    ----------
    indptr
        int64 ``(n_users + 1,)``, starting at 0, non-decreasing, ending at ``len(items)``.
    items
        int64 item indices (>= 0).
    grades
        float32 grades, finite and > 0.
    """

    def __init__(self, indptr: ArrayLike, items: ArrayLike, grades: ArrayLike) -> None:
        indptr_a = _as_int64(indptr, "indptr")
        items_a = _as_int64(items, "items")
        grades_a = np.asarray(grades, dtype=np.float32).ravel()
        if indptr_a.size < 1 or indptr_a[0] != 0:
            raise ValueError("indptr must have n_users + 1 entries and start at 0")
        if np.any(np.diff(indptr_a) < 0):
            raise ValueError("indptr must be non-decreasing")
        if not (indptr_a[-1] == items_a.size == grades_a.size):
            raise ValueError(
                f"indptr ends at {indptr_a[-1]} but there are {items_a.size} items and {grades_a.size} grades"
            )
        if items_a.size and items_a.min() < 0:
            raise ValueError("items must be >= 0")
        if not np.all(np.isfinite(grades_a)) or np.any(grades_a <= 0):
            raise ValueError("grades must be finite and > 0 (leave non-relevant items out)")

        n_users = indptr_a.size - 1
        self.stride = int(items_a.max()) + 1 if items_a.size else 1
        if n_users * self.stride >= _MAX_KEY:
            raise ValueError(f"n_users * (max item + 1) = {n_users * self.stride} is too large for int64 keys")
        rows = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(indptr_a))
        keys = rows * self.stride + items_a
        steps = np.diff(keys)
        if np.any(steps <= 0):  # not sorted within users (or a repeated pair): sort, then look for repeats
            order = np.argsort(keys, kind="stable")
            keys, items_a, grades_a = keys[order], items_a[order], grades_a[order]
            if np.any(np.diff(keys) == 0):
                raise ValueError("a (user, item) pair appears twice; use Relevance.from_pairs to keep the max grade")
        self.indptr: NDArray[np.int64] = indptr_a
        self.items: NDArray[np.int64] = items_a
        self.grades: NDArray[np.float32] = grades_a
        self._rows: NDArray[np.int64] = rows
        self._keys: NDArray[np.int64] = keys

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_pairs(cls, n_users: int, user: ArrayLike, item: ArrayLike, grade: ArrayLike) -> Relevance:
        """Build from parallel arrays of (user, item, grade).

        A pair given more than once keeps its highest grade. Pairs whose grade is
        <= 0 are not relevant and are left out. Users are ``0 .. n_users - 1``.
        """
        if n_users < 0:
            raise ValueError("n_users must be >= 0")
        u = _as_int64(user, "user")
        i = _as_int64(item, "item")
        g = np.asarray(grade, dtype=np.float64).ravel()
        if not (u.size == i.size == g.size):
            raise ValueError(f"user, item and grade differ in length ({u.size}, {i.size}, {g.size})")
        if u.size:
            if u.min() < 0 or u.max() >= n_users:
                raise ValueError(f"user indices must be in [0, {n_users})")
            if i.min() < 0:
                raise ValueError("item indices must be >= 0")
            if np.isnan(g).any():
                raise ValueError("grade has NaN values")
        keep = g > 0
        u, i, g = u[keep], i[keep], g[keep]
        stride = int(i.max()) + 1 if i.size else 1
        if n_users * stride >= _MAX_KEY:
            raise ValueError(f"n_users * (max item + 1) = {n_users * stride} is too large for int64 keys")
        key = u * stride + i
        order = np.lexsort((g, key))  # by key, then grade ascending: the last of each key has the max grade
        key, g = key[order], g[order]
        last = np.ones(key.size, dtype=bool)
        last[:-1] = key[1:] != key[:-1]
        key, g = key[last], g[last]
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(key // stride, minlength=n_users), out=indptr[1:])
        return cls(indptr, key % stride, g.astype(np.float32))

    def to_pairs(self) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
        """The (user, item, grade) arrays, sorted by user then item."""
        return self._rows.copy(), self.items.copy(), self.grades.copy()

    # -- facts ----------------------------------------------------------------------------------------

    @property
    def n_users(self) -> int:
        return int(self.indptr.size - 1)

    @property
    def n_pairs(self) -> int:
        return int(self.items.size)

    def __repr__(self) -> str:
        return f"Relevance(n_users={self.n_users}, n_pairs={self.n_pairs})"

    def n_relevant(self, min_grade: float | None = None) -> NDArray[np.int64]:
        """Relevant items per user: all stored items, or those with grade >= ``min_grade``."""
        rows = self._rows if min_grade is None else self._rows[self.grades >= min_grade]
        return np.bincount(rows, minlength=self.n_users).astype(np.int64)

    def ideal_dcg(self, k: int, gain: Gain = "exponential") -> NDArray[np.float64]:
        """DCG@k of each user's best possible ranking (their ``k`` highest grades in order)."""
        k = _check_k(k)
        desc, rank = self._by_grade
        keep = rank < k
        weights = _gain_values(desc[keep], gain) * _discounts(k)[rank[keep]]
        return np.bincount(self._rows[keep], weights=weights, minlength=self.n_users).astype(np.float64, copy=False)

    @cached_property
    def _by_grade(self) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        # Grades sorted high to low within each user, and each one's 0-based rank within its user.
        # Positive float32 values order like their bit patterns, so one int64 key sorts by (user, -grade).
        bits = self.grades.view(np.int32).astype(np.int64)
        order = np.argsort((self._rows << 31) | (0x7FFFFFFF - bits))
        rank = np.arange(self.items.size, dtype=np.int64) - self.indptr[self._rows]
        return self.grades[order], rank

    # -- lookup ---------------------------------------------------------------------------------------

    def gains(self, ranked: ArrayLike, method: GainsMethod = "auto") -> NDArray[np.float32]:
        """Grade of each ranked item: float32 of ``ranked``'s shape, 0 if not relevant or padding.

        ``method`` picks the lookup: "search" (binary search of ``user * stride + item``
        keys, any catalogue size) or "dense" (a per-block user x item grade matrix, faster
        for small catalogues); "auto" chooses by catalogue size. Both give the same result.
        """
        r = _check_ranked(ranked, self)
        out = np.empty(r.shape, dtype=np.float32)
        for start, stop in _row_blocks(r.shape[0], r.shape[1]):
            out[start:stop] = self._gains_block(r[start:stop], start, method)
        return out

    def _gains_block(self, block: NDArray[np.integer], start: int, method: GainsMethod = "auto") -> NDArray[np.float32]:
        """Gains of rows ``start .. start + len(block)`` of ``ranked``."""
        if method == "auto":
            method = "dense" if self.stride <= _DENSE_MAX_ITEMS else "search"
        if method == "dense":
            return self._gains_dense(block, start)
        if method == "search":
            return self._gains_search(block, start)
        raise ValueError(f"unknown method {method!r}; use 'auto', 'dense' or 'search'")

    def _gains_search(self, block: NDArray[np.integer], start: int) -> NDArray[np.float32]:
        n_rows, width = block.shape
        lo, hi = self.indptr[start], self.indptr[start + n_rows]
        if hi == lo or width == 0:
            return np.zeros(block.shape, dtype=np.float32)
        keys, grades = self._keys[lo:hi], self.grades[lo:hi]
        query = block.astype(np.int64)  # a copy: built in place below
        invalid = (query < 0) | (query >= self.stride)
        query += np.arange(start, start + n_rows, dtype=np.int64)[:, None] * self.stride
        query[invalid] = -1  # never matches a key (keys are >= 0)
        pos = np.searchsorted(keys, query)
        np.minimum(pos, keys.size - 1, out=pos)
        return np.where(keys[pos] == query, grades[pos], np.float32(0))

    def _gains_dense(self, block: NDArray[np.integer], start: int) -> NDArray[np.float32]:
        n_rows, width = block.shape
        out = np.zeros(block.shape, dtype=np.float32)
        cols = self.stride + 1  # the last column stays 0: where padding and unknown items look
        step = max(1, _DENSE_CELLS // cols)
        for s in range(0, n_rows, step):
            e = min(n_rows, s + step)
            lo, hi = self.indptr[start + s], self.indptr[start + e]
            if hi == lo:
                continue
            dense = np.zeros((e - s, cols), dtype=np.float32)
            dense[self._rows[lo:hi] - (start + s), self.items[lo:hi]] = self.grades[lo:hi]
            b = block[s:e]
            idx = np.where((b >= 0) & (b < self.stride), b, self.stride)
            out[s:e] = np.take_along_axis(dense, idx, axis=1)
        return out


# -- per-user metrics ---------------------------------------------------------------------------------


def ndcg_at_k(ranked: ArrayLike, rel: Relevance, k: int, gain: Gain = "exponential") -> NDArray[np.float64]:
    """NDCG@k per user: DCG of the top ``k`` over the DCG of the user's ``k`` best grades.

    ``gain="exponential"`` scores a grade ``g`` as ``2**g - 1``, ``"linear"`` as ``g``;
    position ``i`` (1-based) is discounted by ``log2(i + 1)``. NaN for users without
    relevant items.
    """
    return _run(ranked, rel, "ndcg", k=k, gain=gain)


def map_at_k(ranked: ArrayLike, rel: Relevance, k: int, min_grade: float | None = None) -> NDArray[np.float64]:
    """Average precision at k per user, normalised by ``min(k, n_relevant)``.

    Relevance is binary: grade >= ``min_grade`` (any relevant item if None). NaN for
    users with no such item.
    """
    return _run(ranked, rel, "map", k=k, min_grade=min_grade)


def mrr(ranked: ArrayLike, rel: Relevance, min_grade: float | None = None) -> NDArray[np.float64]:
    """Reciprocal rank of the first relevant item in the whole ranked list (0 if none); NaN if none exists."""
    return _run(ranked, rel, "mrr", min_grade=min_grade)


def hit_rate_at_k(ranked: ArrayLike, rel: Relevance, k: int, min_grade: float | None = None) -> NDArray[np.float64]:
    """1 if any relevant item is in the top ``k``, else 0; NaN for users with no relevant item."""
    return _run(ranked, rel, "hit_rate", k=k, min_grade=min_grade)


def recall_at_k(ranked: ArrayLike, rel: Relevance, k: int, min_grade: float | None = None) -> NDArray[np.float64]:
    """Relevant items in the top ``k`` over all of the user's relevant items; NaN if there are none.

    When ``k`` exceeds ``ranked``'s width the missing positions count as padding.
    """
    return _run(ranked, rel, "recall", k=k, min_grade=min_grade)


def catalogue_coverage(ranked: ArrayLike, n_items: int, k: int) -> float:
    """Share of the ``n_items`` catalogue items that appear in at least one user's top ``k``."""
    k = _check_k(k)
    if n_items <= 0:
        raise ValueError("n_items must be > 0")
    r = np.asarray(ranked)
    if r.ndim != 2 or not np.issubdtype(r.dtype, np.integer):
        raise ValueError("ranked must be a 2-D integer array")
    r = r[:, :k]
    seen = np.zeros(n_items, dtype=bool)
    for start, stop in _row_blocks(r.shape[0], r.shape[1]):
        v = r[start:stop]
        v = v[v >= 0]
        if v.size and v.max() >= n_items:
            raise ValueError(f"ranked holds item {int(v.max())} but the catalogue has n_items={n_items}")
        seen[v] = True
    return float(seen.sum() / n_items)


def evaluate_rankings(
    ranked: ArrayLike,
    rel: Relevance,
    n_items: int,
    k: int = 10,
    recall_ks: Sequence[int] = (10, 50, 100),
    min_grade: float | None = None,
    gain: Gain = "exponential",
) -> dict[str, NDArray[np.float64] | float]:
    """All metrics at once, reading ``ranked`` and looking up gains a single time.

    Returns per-user arrays under ``ndcg@{k}``, ``map@{k}``, ``mrr``, ``hit_rate@{k}``
    and ``recall@{n}`` for each ``n`` in ``recall_ks``, plus ``coverage@{k}`` as a float.
    ``min_grade`` sets binary relevance for all but NDCG (which uses the grades).
    """
    k = _check_k(k)
    names = [f"ndcg@{k}", f"map@{k}", "mrr", f"hit_rate@{k}"]
    out = _run_many(
        ranked,
        rel,
        [("ndcg", k), ("map", k), ("mrr", 0), ("hit_rate", k), *(("recall", _check_k(n)) for n in recall_ks)],
        min_grade=min_grade,
        gain=gain,
    )
    result: dict[str, NDArray[np.float64] | float] = dict(zip(names, out[:4], strict=True))
    for n, values in zip(recall_ks, out[4:], strict=True):
        result[f"recall@{n}"] = values
    result[f"coverage@{k}"] = catalogue_coverage(ranked, n_items, k)
    return result


def dedupe_ranked(ranked: ArrayLike) -> NDArray[np.int64]:
    """A copy of ``ranked`` where every repeat of an item within a row (after its first position) is -1."""
    r = np.array(ranked, dtype=np.int64)
    if r.ndim != 2:
        raise ValueError("ranked must be 2-D")
    for start, stop in _row_blocks(r.shape[0], r.shape[1]):
        block = r[start:stop]
        order = np.argsort(block, axis=1, kind="stable")  # equal items keep their rank order
        s = np.take_along_axis(block, order, axis=1)
        repeat = np.zeros(s.shape, dtype=bool)
        repeat[:, 1:] = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        rows, cols = np.nonzero(repeat)
        block[rows, order[rows, cols]] = -1
    return r


# -- machinery ----------------------------------------------------------------------------------------


def _run(
    ranked: ArrayLike,
    rel: Relevance,
    metric: str,
    k: int = 0,
    min_grade: float | None = None,
    gain: Gain = "exponential",
) -> NDArray[np.float64]:
    if metric != "mrr":
        k = _check_k(k)
    return _run_many(ranked, rel, [(metric, k)], min_grade=min_grade, gain=gain)[0]


def _run_many(
    ranked: ArrayLike,
    rel: Relevance,
    metrics: Sequence[tuple[str, int]],
    min_grade: float | None,
    gain: Gain,
) -> list[NDArray[np.float64]]:
    """Compute ``(name, k)`` metrics block by block; k is ignored for "mrr"."""
    r = _check_ranked(ranked, rel)
    if gain not in ("exponential", "linear"):
        raise ValueError(f"unknown gain {gain!r}; use 'exponential' or 'linear'")
    if min_grade is not None and not min_grade > 0:
        raise ValueError("min_grade must be > 0 (or None for any relevant item)")
    n_users, width = r.shape
    # Only the columns some metric reads: the top k's, or everything for MRR.
    need = max((width if name == "mrr" else min(k, width)) for name, k in metrics)
    r = r[:, :need]
    graded = any(name == "ndcg" for name, _ in metrics)
    binary = any(name != "ndcg" for name, _ in metrics)

    n_rel_any = rel.n_relevant()
    n_rel_bin = rel.n_relevant(min_grade) if binary else n_rel_any
    idcg = {k: rel.ideal_dcg(k, gain) for name, k in metrics if name == "ndcg"} if graded else {}
    outs = [np.zeros(n_users, dtype=np.float64) for _ in metrics]
    for start, stop in _row_blocks(n_users, need):
        g = rel._gains_block(r[start:stop], start)
        hit = g >= min_grade if min_grade is not None else g > 0
        cum = np.cumsum(hit, axis=1, dtype=np.int32) if binary else np.zeros((0, 0), dtype=np.int32)
        nb = n_rel_bin[start:stop]
        for (name, k), out in zip(metrics, outs, strict=True):
            kk = min(k, need)
            if name == "ndcg":
                out[start:stop] = _gain_values(g[:, :kk], gain) @ _discounts(kk)
            elif name == "map":
                precision_at_hits = np.where(hit[:, :kk], cum[:, :kk], 0) @ (1.0 / np.arange(1, kk + 1))
                out[start:stop] = precision_at_hits / np.maximum(np.minimum(k, nb), 1)
            elif name == "mrr":
                any_hit = hit.any(axis=1)
                first = np.argmax(hit, axis=1) if need else np.zeros(stop - start, dtype=np.int64)
                out[start:stop] = np.where(any_hit, 1.0 / (first + 1), 0.0)
            elif name in ("hit_rate", "recall"):
                found = cum[:, kk - 1] if kk > 0 else np.zeros(stop - start, dtype=np.int32)
                out[start:stop] = (found > 0) if name == "hit_rate" else found / np.maximum(nb, 1)
            else:  # pragma: no cover - internal names only
                raise AssertionError(name)
    for (name, k), out in zip(metrics, outs, strict=True):
        if name == "ndcg":
            ideal = idcg[k]
            with np.errstate(invalid="ignore", divide="ignore"):
                np.divide(out, ideal, out=out)
            out[n_rel_any == 0] = np.nan
        else:
            out[n_rel_bin == 0] = np.nan
    return outs


def _row_blocks(n_rows: int, width: int) -> Iterator[tuple[int, int]]:
    step = max(1, _BLOCK_CELLS // max(width, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _check_ranked(ranked: ArrayLike, rel: Relevance) -> NDArray[np.integer]:
    r = np.asarray(ranked)
    if r.ndim != 2:
        raise ValueError(f"ranked must be 2-D (n_users, k), got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"ranked must hold integer item indices, got dtype {r.dtype}")
    if r.shape[0] != rel.n_users:
        raise ValueError(f"ranked has {r.shape[0]} rows but relevance has {rel.n_users} users")
    return r


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _as_int64(a: ArrayLike, name: str) -> NDArray[np.int64]:
    arr = np.asarray(a)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False).ravel()


def _discounts(k: int) -> NDArray[np.float64]:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def _gain_values(g: NDArray[np.floating], gain: Gain) -> NDArray[np.float64]:
    if gain == "exponential":
        return np.exp2(g.astype(np.float64)) - 1.0
    if gain == "linear":
        return g.astype(np.float64)
    raise ValueError(f"unknown gain {gain!r}; use 'exponential' or 'linear'")
