"""Live activity on top of the batch snapshot: what a customer did since the data's cutoff changes their features.

The snapshot (:class:`~finrec.serving.state.ServingData`) holds every feature as of
the end of the data. Events accepted since then are in the online feature store;
for a customer who has some, :func:`overlay` recomputes, for that customer only,
exactly what the offline builder would compute with those events in the data:

* behaviour counts per type and window, recency of the last event and engagement;
* holdings (approve/hold add, close removes), holdings per category, held providers;
* category affinity (share of engaged events per category);
* the user tower's history (recently engaged products first) and so the customer's embedding;
* per candidate, the pair history (times seen, clicked, applied, declined; days since last seen).

Counts are stored as ``log1p`` values, so they are turned back into counts, added
to and logged again. Features of time alone (days since the last event, for a
customer with no live event) stay as of the cutoff: batch features are as fresh as
the last batch, live events are fresh to the second. A test holds the overlay equal
to the offline builder run on the data with the events appended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from finrec.features.builder import BEHAVIOUR_TYPES, ENGAGED_TYPES, OWNERSHIP_TYPES, PAIR_HISTORY_TYPES, WINDOWS
from finrec.features.online import Activity

if TYPE_CHECKING:
    from finrec.serving.records import CustomerRecord
    from finrec.serving.scoring import CustomerInputs, ServingModel

DAY = 86_400


@dataclass
class LiveCustomer:
    """What a customer's live events change, in the form the pair features need."""

    now: float
    held: np.ndarray  # product rows held now (snapshot holdings with live changes)
    affinity: np.ndarray  # (n_categories + 1,) category affinity row
    pair_counts: dict[str, np.ndarray]  # pair-history count name -> (n_products,) live events
    last_seen: np.ndarray  # (n_products,) Unix seconds of the last live impression, NaN if none
    positives: np.ndarray | None = None  # product rows of live events at or above the model's positive grade


def _counts(v: np.ndarray | float) -> np.ndarray:
    """Counts back from their log1p encoding (exact: counts are whole numbers)."""
    return np.rint(np.expm1(np.asarray(v, dtype=np.float64)))


def live_customer(served: ServingModel, record: CustomerRecord, activity: list[Activity], now: float) -> LiveCustomer:
    """Holdings, affinity and per-product live counts of one customer."""
    data = served.data
    rows = np.array([data.product_row.get(a.product_id, -1) for a in activity], dtype=np.int64)
    types = np.array([a.event_type for a in activity], dtype=object)
    ts = np.array([a.ts for a in activity], dtype=np.float64)
    known = rows >= 0
    rows, types, ts = rows[known], types[known], ts[known]
    held = set(record.held.tolist())
    own = np.isin(types, OWNERSHIP_TYPES)
    for p, t in zip(rows[own], types[own], strict=True):  # activity is in time order: the last one decides
        if t == "close":
            held.discard(int(p))
        else:
            held.add(int(p))
    n = data.n_products
    pair_counts = {name: np.bincount(rows[types == t], minlength=n).astype(np.float64)
                   for name, t in PAIR_HISTORY_TYPES.items()}  # fmt: skip
    last_seen = np.full(n, np.nan)
    imp = types == "impression"
    if imp.any():
        np.fmax.at(last_seen, rows[imp], ts[imp])
    affinity = np.array(record.affinity, dtype=np.float64) if data.snap.n_categories else np.zeros(1)
    eng = np.isin(types, ENGAGED_TYPES)
    if data.snap.n_categories and eng.any():
        n_cat = data.snap.n_categories
        total = _counts(affinity[n_cat])
        per_cat = np.rint(affinity[:n_cat] * total) + np.bincount(data.category_codes[rows[eng]], minlength=n_cat)
        new_total = per_cat.sum()
        affinity[:n_cat] = per_cat / max(new_total, 1)
        affinity[n_cat] = np.log1p(new_total)
    grades = served.model.config.grades
    min_grade = served.model.config.min_grade
    is_pos = np.array([grades.get(t, 0) >= min_grade and t != "close" for t in types], dtype=bool)
    positives = np.unique(rows[is_pos]) if len(rows) else np.empty(0, np.int64)
    return LiveCustomer(now, np.array(sorted(held), dtype=np.int64), affinity, pair_counts, last_seen, positives)


def overlay(served: ServingModel, record: CustomerRecord, activity: list[Activity], now: float) -> CustomerInputs:
    """The customer's model inputs with their live events since the cutoff applied."""
    from finrec.serving.scoring import CustomerInputs

    live = live_customer(served, record, activity, now)
    data, space = served.data, served.model.space
    values: dict[str, float] = {}
    ts = np.array([a.ts for a in activity], dtype=np.float64)
    types = np.array([a.event_type for a in activity], dtype=object)
    col = served.user_column
    for t in BEHAVIOUR_TYPES:
        for w in WINDOWS:
            name = f"{t}_{w}d"
            if name in col:
                live_n = int(((types == t) & (ts >= now - w * DAY)).sum())
                if live_n:
                    values[name] = float(np.log1p(_counts(record.tabular[col[name]]) + live_n))
    if len(ts):
        values["days_since_last_event"] = (now - ts.max()) / DAY
    eng = np.isin(types, ENGAGED_TYPES)
    if eng.any():
        values["days_since_last_click"] = (now - ts[eng].max()) / DAY
    values["n_held"] = float(len(live.held))
    names = data.builder.category_names
    held_cats = set(data.category_codes[live.held].tolist())
    for j, cname in enumerate(names):
        values[f"holds_{cname}"] = float(j in held_cats)
        values[f"affinity_{cname}"] = float(live.affinity[j])
    tab = np.array(record.tabular, dtype=np.float32)
    dense = np.array(record.dense, dtype=np.float32) if record.dense is not None else None
    dense_cols = served.dense_columns
    for name, v in values.items():
        if name not in col:
            continue
        tab[col[name]] = v
        if dense is not None and name in dense_cols:
            j, miss = dense_cols[name]
            dense[j] = space.standardise(space.user_numeric[name], v)
            if miss is not None:
                dense[miss] = float(v != v)
    emb = None
    if served.model.retriever is not None and dense is not None:
        length = served.model.config.history_length
        order = np.argsort(-ts[eng], kind="stable")
        recent = [data.product_row.get(activity[i].product_id, -1) for i in np.flatnonzero(eng)[order]]
        seq = list(dict.fromkeys([p for p in recent if p >= 0] + [int(p) for p in record.history if p >= 0]))
        hist = np.full((1, length), -1, dtype=np.int64)
        seq = seq[:length]
        hist[0, : len(seq)] = served.train_rows[np.asarray(seq, dtype=np.int64)] if seq else []
        emb = served.model.retriever.user_embeddings(dense[None, :], hist)[0]
    return CustomerInputs(record, emb, tab, None, live)
