"""The one definition of every event-log table the features, labels and histories read, in DuckDB's SQL.

DuckDB runs these queries as written (:class:`~finrec.features.builder.FeatureBuilder`); Spark runs them after
sqlglot translates them (:mod:`finrec.features.spark`), and ``tests/parity`` holds the two engines equal. So
that both agree to the bit, the queries return only what both compute exactly (integer counts, maxima and
minima of integer times, argmax by a total order) and the floating-point arithmetic is done afterwards by
shared numpy code (:func:`behaviour_features`, :func:`pair_history_features`): Spark reads the literal
``86400.0`` as a DECIMAL and its ``ln`` differs from DuckDB's in the last bit in about 12% of cells.

Each query reads these relations, which each engine provides in its own way:

``ev(u, p, e, ts, pos, i)``
    One row per event: customer key ``u`` (DuckDB: the dense row; Spark: the id), product row ``p`` (the
    catalogue's file order, the same in both), event type code ``e`` (index in
    :data:`~finrec.data.contract.EVENT_TYPES`), Unix seconds ``ts``, slate position ``pos`` (0: none) and ``i``,
    a key that orders the log totally: by time, then by place in the files. "The last event" means the greatest
    ``i``; by ``ts`` alone, events of the same second tie, and which one wins differed between runs.
``pcat(p, c)``
    Each product's category code (-1: none).
``grades(e, g)``
    The relevance grade of each event type.
"""

from __future__ import annotations

import numpy as np

from finrec.data.dataset import ETYPE

DAY = 86_400
WINDOWS = (30, 90, 365)
#: Event types counted per customer and window.
BEHAVIOUR_TYPES = ("impression", "view", "click", "apply", "approve", "decline")
#: Engaged event types: category affinity, the customer's product history, recency of engagement.
ENGAGED_TYPES = ("click", "apply", "approve", "decline")
#: Ownership event types: what a customer holds is the last of these per product, unless it is a close.
OWNERSHIP_TYPES = ("approve", "hold", "close")
PAIR_HISTORY_COUNTS = ("seen", "clicked", "applied", "declined")
#: Event type behind each pair-history count (the online overlay adds live events the same way).
PAIR_HISTORY_TYPES = {"seen": "impression", "clicked": "click", "applied": "apply", "declined": "decline"}

_ENGAGED = tuple(ETYPE[t] for t in ENGAGED_TYPES)
_OWNERSHIP = tuple(ETYPE[t] for t in OWNERSHIP_TYPES)


def behaviour_columns() -> list[str]:
    """The count columns of :func:`user_behaviour_sql`, in order: ``<type>_<window>d``."""
    return [f"{t}_{w}d" for t in BEHAVIOUR_TYPES for w in WINDOWS]


def user_behaviour_sql(cutoff: int) -> str:
    """Per customer with events before ``cutoff``: event counts per type and window, last event and engagement."""
    counts = [
        f"count(*) FILTER (WHERE e = {ETYPE[t]} AND ts >= {cutoff - w * DAY}) AS {t}_{w}d"
        for t in BEHAVIOUR_TYPES
        for w in WINDOWS
    ]
    return f"""SELECT u, {", ".join(counts)}, max(ts) AS last_event_ts,
                      max(ts) FILTER (WHERE e IN {_ENGAGED}) AS last_engaged_ts
               FROM ev WHERE ts < {cutoff} GROUP BY u"""


def holdings_sql(cutoff: int) -> str:
    """(customer, product) held at ``cutoff``: the last ownership event before it is not a close."""
    return f"""SELECT u AS "user", p AS product FROM (
                 SELECT u, p, arg_max(e, i) AS last FROM ev
                 WHERE ts < {cutoff} AND e IN {_OWNERSHIP} GROUP BY u, p)
               WHERE last <> {ETYPE["close"]}"""


def category_engagement_sql(cutoff: int) -> str:
    """Engaged events per (customer, product category) before ``cutoff``."""
    return f"""SELECT ev.u, pcat.c, count(*) AS n FROM ev JOIN pcat ON ev.p = pcat.p
               WHERE ts < {cutoff} AND e IN {_ENGAGED} AND pcat.c >= 0 GROUP BY ALL"""


def product_demand_sql(cutoff: int) -> str:
    """Per product with events before ``cutoff``: funnel counts over all history and the last 90 days."""
    since = cutoff - 90 * DAY
    return f"""SELECT p,
                 count(*) FILTER (WHERE e = {ETYPE["impression"]}) AS imp,
                 count(*) FILTER (WHERE e = {ETYPE["click"]}) AS clk,
                 count(*) FILTER (WHERE e = {ETYPE["apply"]}) AS app,
                 count(*) FILTER (WHERE e = {ETYPE["approve"]}) AS apr,
                 count(*) FILTER (WHERE e = {ETYPE["decline"]}) AS dec,
                 count(*) FILTER (WHERE e = {ETYPE["impression"]} AND ts >= {since}) AS imp90,
                 count(*) FILTER (WHERE e = {ETYPE["click"]} AND ts >= {since}) AS clk90,
                 count(*) FILTER (WHERE e IN {_ENGAGED} AND ts >= {since}) AS eng90
               FROM ev WHERE ts < {cutoff} GROUP BY p"""


def pair_history_aggregates() -> str:
    """The aggregates of a (customer, product) pair's history: counts and the last impression's time."""
    counts = [f"count(*) FILTER (WHERE e = {ETYPE[t]}) AS {c}" for c, t in PAIR_HISTORY_TYPES.items()]
    return f"{', '.join(counts)}, max(ts) FILTER (WHERE e = {ETYPE['impression']}) AS last_seen_ts"


def pair_history_sql(cutoff: int) -> str:
    """Every (customer, product) pair with events before ``cutoff`` and its history aggregates."""
    return f"SELECT u, p, {pair_history_aggregates()} FROM ev WHERE ts < {cutoff} GROUP BY u, p"


def labels_sql(start: int, end: int) -> str:
    """Highest grade of each (customer, product) with events in ``[start, end)``; positive grades only."""
    return f"""SELECT ev.u AS "user", ev.p AS product, max(g) AS grade
               FROM ev JOIN grades USING (e) WHERE ts >= {start} AND ts < {end}
               GROUP BY ALL HAVING max(g) > 0"""


def shown_sql(start: int, end: int) -> str:
    """(customer, product) shown in ``[start, end)`` and the best slate position (0: unknown)."""
    return f"""SELECT u AS "user", p AS product, coalesce(min(pos) FILTER (WHERE pos > 0), 0) AS position
               FROM ev WHERE e = {ETYPE["impression"]} AND ts >= {start} AND ts < {end} GROUP BY ALL"""


def history_sql(cutoff: int, length: int) -> str:
    """Each customer's ``length`` most recently engaged distinct products before ``cutoff``, rank ``r`` from 1."""
    return f"""SELECT u, p, r FROM (
                 SELECT u, p, row_number() OVER (PARTITION BY u ORDER BY max(ts) DESC, p) AS r
                 FROM ev WHERE ts < {cutoff} AND e IN {_ENGAGED} GROUP BY u, p)
               WHERE r <= {length}"""


# -- the arithmetic after the queries, shared by both engines -----------------------------------------------
def days_before(cutoff: int, ts: np.ndarray) -> np.ndarray:
    """Days from ``ts`` (seconds; NaN: none) to ``cutoff`` as float64."""
    return (cutoff - np.asarray(ts, dtype=np.float64)) / DAY


def behaviour_features(cutoff: int, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feature columns from the result of :func:`user_behaviour_sql` (a customer's rows, NaN for missing times)."""
    out = {c: np.log1p(np.asarray(columns[c], dtype=np.float64)) for c in behaviour_columns()}
    out["days_since_last_event"] = days_before(cutoff, columns["last_event_ts"])
    out["days_since_last_click"] = days_before(cutoff, columns["last_engaged_ts"])
    return out


def pair_history_features(cutoff: int, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``pair_*`` feature columns from the aggregates of :func:`pair_history_aggregates`."""
    out = {f"pair_{c}": np.log1p(np.asarray(columns[c], dtype=np.float64)) for c in PAIR_HISTORY_COUNTS}
    out["pair_days_since_seen"] = days_before(cutoff, columns["last_seen_ts"])
    return out


def demand_features(raw: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Product demand features from :func:`product_demand_sql`'s counts, one float64 array per column (n products)."""
    # Smoothed rates shrink towards the catalogue rate, so a product seen 3 times is not "100%".
    ctr0 = (raw["clk"].sum() + 1) / (raw["imp"].sum() + 20)
    app0 = (raw["app"].sum() + 1) / (raw["clk"].sum() + 4)
    apr0 = (raw["apr"].sum() + 1) / (raw["apr"].sum() + raw["dec"].sum() + 2)

    # All-history counts grow with the length of the history, so a model trained at one cutoff and served at a
    # later one would read them on another scale: they are log shares of the catalogue's total (a product's place
    # in the catalogue, the same at any cutoff). Windowed counts keep their scale.
    def share(c: np.ndarray) -> np.ndarray:
        return np.log((c + 1.0) / (c.sum() + n))

    return {
        "impressions": share(raw["imp"]),
        "clicks": share(raw["clk"]),
        "applications": share(raw["app"]),
        "approvals": share(raw["apr"]),
        "impressions_90d": np.log1p(raw["imp90"]),
        "engaged_90d": np.log1p(raw["eng90"]),
        "ctr": (raw["clk"] + 50 * ctr0) / (raw["imp"] + 50),
        "ctr_90d": (raw["clk90"] + 50 * ctr0) / (raw["imp90"] + 50),
        "apply_rate": (raw["app"] + 10 * app0) / (raw["clk"] + 10),
        "approval_rate": (raw["apr"] + 10 * apr0) / (raw["apr"] + raw["dec"] + 10),
    }


def holder_shares(held_products: np.ndarray, held_users: np.ndarray, n: int) -> np.ndarray:
    """Each product's holders as a share of the customers holding anything (a count would grow with the base)."""
    return holder_share(np.bincount(held_products, minlength=n), len(np.unique(held_users)))


def holder_share(holders: np.ndarray, n_holding: int) -> np.ndarray:
    """Holders per product (counts) over the number of customers holding anything: the formula both engines use."""
    return np.asarray(holders, dtype=np.float64) / max(1, n_holding)
