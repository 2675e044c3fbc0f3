"""What candidate sources learn from: each customer's positive products before a cutoff, as sparse matrices.

A *positive* is any event whose grade (``[events.grades]``) is at or above the
minimum grade, ``hold`` included. :class:`Interactions` keeps, for one cutoff,

* ``matrix``: (n_users, n_products) CSR, 1 where the customer had a positive with the product;
* ``recent``: the same, counting only the last ``recent_days`` before the cutoff;
* ``additions``: (user, product, time) of positives that are *additions*: the first positive of
  that pair, for a customer who already had a positive at an earlier time. For holdings sent as
  dated snapshots (a bank's monthly ``hold`` rows), a product held at one snapshot and not at the
  one before is an addition: the "next product" a bank wants to predict. A customer's first
  snapshot has no additions (we cannot tell when those products were acquired);
* ``first_user``, ``first_product``, ``first_ts``: when each (customer, product) pair first became
  positive, sorted by customer (the co-holding transition source reads what a customer had before
  each addition from them).

Everything is exact integer counting; the same events give the same matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from finrec.data.dataset import ETYPE, EventLog

DAY = 86_400


def grade_table(grades: dict[str, int]) -> np.ndarray:
    """Grade of each event type code (``ETYPE``), 0 for types without a grade."""
    out = np.zeros(len(ETYPE), dtype=np.int64)
    for t, g in grades.items():
        if t in ETYPE:
            out[ETYPE[t]] = int(g)
    return out


def positive_mask(events: EventLog, grades: dict[str, int], min_grade: int) -> np.ndarray:
    """Events whose grade is at least ``min_grade`` (``close`` never counts)."""
    g = grade_table(grades)[events.etype.astype(np.int64)]
    return (g >= min_grade) & (events.etype != ETYPE["close"])


#: The window of the ``recent`` matrix (days before the cutoff).
RECENT_DAYS = 90.0


@dataclass
class Interactions:
    """Positives before ``cutoff`` of ``n_users`` customers over ``n_products`` products."""

    cutoff: int
    matrix: sp.csr_matrix  # (n_users, n_products) float32 0/1
    recent: sp.csr_matrix  # (n_users, n_products) float32 counts in the recent window
    add_user: np.ndarray  # additions: user row
    add_product: np.ndarray  # additions: product row
    add_ts: np.ndarray  # additions: time (Unix seconds)
    first_user: np.ndarray  # every positive pair: user row (sorted)
    first_product: np.ndarray  # every positive pair: product row
    first_ts: np.ndarray  # every positive pair: time of its first positive

    @property
    def n_users(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def n_products(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def n_positives(self) -> int:
        return int(self.matrix.nnz)

    @classmethod
    def from_events(
        cls,
        events: EventLog,
        n_users: int,
        n_products: int,
        grades: dict[str, int],
        min_grade: int,
        cutoff: int | None = None,
        recent_days: float = RECENT_DAYS,
    ) -> Interactions:
        """Positives of ``events`` strictly before ``cutoff`` (default: all of them)."""
        ev = events if cutoff is None else events.before(cutoff)
        end = int(ev.ts[-1]) + 1 if cutoff is None and len(ev) else int(cutoff or 0)
        pos = positive_mask(ev, grades, min_grade)
        u = ev.user[pos].astype(np.int64)
        p = ev.product[pos].astype(np.int64)
        ts = ev.ts[pos].astype(np.int64)
        ones = np.ones(len(u), dtype=np.float32)
        matrix = sp.csr_matrix((ones, (u, p)), shape=(n_users, n_products), dtype=np.float32)
        matrix.data[:] = 1.0  # duplicates were summed: binary
        recent_m = ts >= end - recent_days * DAY
        recent = sp.csr_matrix((ones[recent_m], (u[recent_m], p[recent_m])), shape=(n_users, n_products),
                               dtype=np.float32)  # fmt: skip
        first = pd.DataFrame({"u": u, "p": p, "ts": ts}).groupby(["u", "p"], as_index=False, sort=True)["ts"].min()
        fu, fp, ft = (first[c].to_numpy(np.int64) for c in ("u", "p", "ts"))
        is_add = ft > first.groupby("u")["ts"].transform("min").to_numpy(np.int64)
        return cls(end, matrix, recent, fu[is_add], fp[is_add], ft[is_add], fu, fp, ft)

    @classmethod
    def from_pairs(cls, user: np.ndarray, product: np.ndarray, first_ts: np.ndarray, n_recent: np.ndarray,
                   n_users: int, n_products: int, cutoff: int) -> Interactions:  # fmt: skip
        """The same as :meth:`from_events`, from the positives already aggregated per (customer, product) pair:
        the time of the pair's first positive and its number of positives in the recent window. What an engine
        that counts elsewhere (Spark) hands over instead of every positive event: one row per pair."""
        order = np.lexsort((product, user))
        u, p = user[order].astype(np.int64), product[order].astype(np.int64)
        ft, nr = first_ts[order].astype(np.int64), n_recent[order].astype(np.float32)
        ones = np.ones(len(u), dtype=np.float32)
        matrix = sp.csr_matrix((ones, (u, p)), shape=(n_users, n_products), dtype=np.float32)
        matrix.data[:] = 1.0
        r = nr > 0
        recent = sp.csr_matrix((nr[r], (u[r], p[r])), shape=(n_users, n_products), dtype=np.float32)
        start = np.full(n_users, np.iinfo(np.int64).max)
        np.minimum.at(start, u, ft)
        is_add = ft > start[u]
        return cls(int(cutoff), matrix, recent, u[is_add], p[is_add], ft[is_add], u, p, ft)

    def held_before(self, users: np.ndarray, times: np.ndarray) -> sp.csr_matrix:
        """(len(users), n_products) 0/1: what each ``users[i]`` had as a positive strictly before ``times[i]``."""
        ptr = np.searchsorted(self.first_user, np.arange(self.n_users + 1))
        rows, cols = [], []
        for i, (u, t) in enumerate(zip(users.tolist(), times.tolist(), strict=True)):
            a, b = ptr[u], ptr[u + 1]
            q = self.first_product[a:b][self.first_ts[a:b] < t]
            rows.append(np.full(len(q), i))
            cols.append(q)
        r = np.concatenate(rows) if rows else np.empty(0, np.int64)
        c = np.concatenate(cols) if cols else np.empty(0, np.int64)
        return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(len(users), self.n_products))


def rows_of(matrix: sp.csr_matrix, users: np.ndarray) -> sp.csr_matrix:
    """The rows of ``users`` (customer rows; -1 gives an empty row: a prospect or an unknown customer)."""
    users = np.asarray(users, dtype=np.int64)
    out = matrix[np.maximum(users, 0)]
    if (users < 0).any():
        keep = sp.diags((users >= 0).astype(np.float32))
        out = keep @ out
    return sp.csr_matrix(out)
