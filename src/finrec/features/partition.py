"""A dataset of some customers: what one partition of a distributed job holds.

Every customer feature, label and history reads only that customer's own events, so a partition that holds
some customers whole (their profile rows, every event of theirs, the whole catalogue) computes them exactly as
the full dataset would. What counts every customer's events (the catalogue's demand, conversion and holders)
comes from outside: :class:`~finrec.features.builder.FeatureBuilder`'s ``catalogue_stats``.

:func:`partition_dataset` builds such a :class:`~finrec.data.dataset.Dataset` from Arrow tables: the customers'
raw rows, typed by the embedded reader's own SQL (DuckDB, in the worker), and their events already typed
(:mod:`finrec.features.spark`), put in log order.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from finrec.data.dataset import Dataset, EventLog, _normalise, _table_sql

#: Columns the Spark readers add to a table's own (its place in the files), dropped before typing.
PLACE_COLUMNS = ("__file", "__row")


def typed_users(raw: pa.Table) -> pd.DataFrame:
    """Raw ``users`` rows (as in the file, any of the contract's storage types) typed as the embedded reader does."""
    keep = [c for c in raw.column_names if c not in PLACE_COLUMNS and c != "bucket"]
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("users", raw.select(keep))
        sql, _ = _table_sql(con, "users")
        frame = con.execute(f"SELECT {sql} FROM users").df()
    finally:
        con.close()
    return _normalise(frame, "users")


def partition_dataset(users: pd.DataFrame, products: pd.DataFrame, events: pa.Table, path: Path,
                      fingerprint: str = "") -> Dataset:  # fmt: skip
    """The customers of ``users`` (typed rows), the whole catalogue and their ``events`` as a :class:`Dataset`.

    ``events`` has columns ``u`` (user id text), ``p`` (catalogue row), ``e``, ``ts``, ``pos`` and the log's
    order ``i`` = (ts, file, row); events of customers not in ``users`` are an error (a partition holds its
    customers whole).
    """
    users = users.reset_index(drop=True)
    if len(events):
        i = events.column("i").combine_chunks()
        order = np.lexsort((
            i.field("row").to_numpy(zero_copy_only=False),
            pc.rank(i.field("file"), sort_keys="ascending", tiebreaker="dense").to_numpy(),
            events.column("ts").to_numpy(),
        ))  # fmt: skip
    else:
        order = np.empty(0, dtype=np.int64)
    user = pd.Index(users["user_id"]).get_indexer(events.column("u").to_numpy(zero_copy_only=False)[order])
    if (user < 0).any():
        raise ValueError("a partition holds events of customers it does not hold")
    log = EventLog(
        user=user.astype(np.int32),
        product=events.column("p").to_numpy(zero_copy_only=False)[order].astype(np.int32),
        etype=events.column("e").to_numpy(zero_copy_only=False)[order].astype(np.int8),
        ts=events.column("ts").to_numpy(zero_copy_only=False)[order].astype(np.int64),
        position=events.column("pos").to_numpy(zero_copy_only=False)[order].astype(np.int16),
    )
    return Dataset(path=path, users=users, products=products, events=log, fingerprint=fingerprint)
