"""A validated dataset in memory: typed tables and the event log as compact arrays.

:func:`load_dataset` validates the folder first (refusing invalid data with the
validation report), then reads every table through the same typed SQL the
validator uses, so a value the validator accepted is read the same way here.
Ids are kept as trimmed text and mapped to dense row numbers; the event log is
a set of numpy arrays sorted by time (about 20 bytes an event).

Examples
--------
>>> import tempfile
>>> from finrec.data.synthetic.generate import WorldConfig, generate_world
>>> world = Path(tempfile.mkdtemp()) / "w"
>>> _ = generate_world(WorldConfig(users=100, products=12, months=1), world, progress=False)
>>> ds = load_dataset(world)
>>> ds.n_users, ds.n_products, len(ds.events) > 0
(100, 12, True)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from finrec.data.contract import EVENT_TYPES, TABLES, Kind
from finrec.data.io import column_types, id_sql, open_dataset, quote_ident, quote_literal, typed_sql
from finrec.data.layout import find_tables, table_files
from finrec.data.validate import ValidationReport, require_valid

ETYPE = {t: i for i, t in enumerate(EVENT_TYPES)}


@dataclass
class EventLog:
    """Events as parallel arrays sorted by time. ``position`` 0 means none."""

    user: np.ndarray  # int32 row in Dataset.users
    product: np.ndarray  # int32 row in Dataset.products
    etype: np.ndarray  # int8 index into EVENT_TYPES
    ts: np.ndarray  # int64 Unix seconds
    position: np.ndarray  # int16

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask: np.ndarray) -> EventLog:
        return EventLog(self.user[mask], self.product[mask], self.etype[mask], self.ts[mask], self.position[mask])

    def before(self, cutoff: int) -> EventLog:
        """Events strictly before ``cutoff`` (the arrays are sorted, so this is a slice)."""
        end = int(np.searchsorted(self.ts, cutoff, side="left"))
        return EventLog(self.user[:end], self.product[:end], self.etype[:end], self.ts[:end], self.position[:end])

    def between(self, start: int, end: int) -> EventLog:
        a, b = np.searchsorted(self.ts, [start, end], side="left")
        sl = slice(int(a), int(b))
        return EventLog(self.user[sl], self.product[sl], self.etype[sl], self.ts[sl], self.position[sl])


@dataclass
class Dataset:
    """Typed tables of a dataset. ``users``/``products`` rows are the dense indices used everywhere."""

    path: Path
    users: pd.DataFrame  # column user_id (text) + typed well-known columns + extra columns
    products: pd.DataFrame
    events: EventLog
    fingerprint: str
    report: ValidationReport | None = None
    extra_user_columns: list[str] = field(default_factory=list)
    extra_product_columns: list[str] = field(default_factory=list)
    #: Set when the dataset holds some customers of a larger base (a sample or a partition on Spark): the product
    #: features that count every customer's events, per cutoff (see FeatureBuilder.catalogue_stats).
    catalogue_stats: Callable[[int], pd.DataFrame] | None = None

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_products(self) -> int:
        return len(self.products)

    def user_rows(self, user_ids: list[str] | np.ndarray | pd.Series) -> np.ndarray:
        """Dense rows of user ids given as text or numbers; -1 for unknown ids."""
        return pd.Index(self.users["user_id"]).get_indexer(_as_text(user_ids))

    def product_rows(self, product_ids: list[str] | np.ndarray | pd.Series) -> np.ndarray:
        return pd.Index(self.products["product_id"]).get_indexer(_as_text(product_ids))

    @property
    def time_range(self) -> tuple[int, int]:
        """First and last event time (Unix seconds)."""
        return int(self.events.ts[0]), int(self.events.ts[-1])


def _as_text(ids: list[str] | np.ndarray | pd.Series) -> np.ndarray:
    arr = pd.Series(ids)
    if pd.api.types.is_float_dtype(arr):
        arr = arr.map(lambda v: str(int(v)) if float(v).is_integer() else str(v))
    return arr.astype(str).str.strip().to_numpy()


def _normalise(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Numbers, booleans and dates as float64 with NaN; text as str with None; one representation downstream."""
    spec = TABLES[table]
    out = {}
    for name in df.columns:
        col = spec.by_name.get(name)
        s = df[name]
        if col is not None and col.kind in (Kind.ID, Kind.STRING):
            out[name] = s.astype(object).where(s.notna(), None)
        elif (col is not None) or pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            out[name] = pd.to_numeric(s.astype(object), errors="coerce").astype("float64")
        else:  # extra non-numeric column: categorical text
            out[name] = s.astype(object).where(s.notna(), None).map(lambda v: v if v is None else str(v))
    return pd.DataFrame(out, index=pd.RangeIndex(len(df)))


def fingerprint_files(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over the tables' bytes: identifies the exact data a model was trained on.

    Each file counts with its name, or its path under ``root`` (a table folder's part files).
    """
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update((p.relative_to(root).as_posix() if root is not None else p.name).encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def dataset_fingerprint(path: Path) -> str:
    """The fingerprint of the three tables of a dataset folder (:func:`fingerprint_files` over their files)."""
    files = [f for table in find_tables(path).values() for f in table_files(table)]
    return fingerprint_files(files, root=path)


def _table_sql(con: duckdb.DuckDBPyConnection, table: str) -> tuple[str, list[str]]:
    """SELECT list reading a table with contract types; returns (sql, extra columns)."""
    spec = TABLES[table]
    types = column_types(con, table)
    parts, extra = [], []
    for name, dtype in types.items():
        c = quote_ident(name)
        col = spec.by_name.get(name)
        if col is None:
            extra.append(name)
            parts.append(f"{c} AS {c}")
        elif col.kind is Kind.ID:
            parts.append(f"{id_sql(c, dtype)} AS {c}")
        elif col.kind is Kind.STRING:
            parts.append(f"NULLIF(trim(CAST({c} AS VARCHAR)), '') AS {c}")
        else:
            typed = typed_sql(c, col.kind, dtype)
            if col.kind in (Kind.TIMESTAMP, Kind.DATE):
                typed = f"CAST(epoch({typed}) AS BIGINT)"  # Unix seconds
            parts.append(f"{typed} AS {c}")
    return ", ".join(parts), extra


def event_columns_sql(types: dict[str, str]) -> dict[str, str]:
    """SQL of each events column as every stage reads it, from the table's DuckDB storage types.

    ``user_id``/``product_id`` (and ``event_id`` when present) as comparable text, ``etype`` the index in
    :data:`~finrec.data.contract.EVENT_TYPES`, ``ts`` Unix seconds, ``position`` 0 when none. The Spark engine
    runs the same expressions with DuckDB on each partition of the table, so both engines type values alike.
    """
    ts = typed_sql('"timestamp"', Kind.TIMESTAMP, types["timestamp"])
    etypes = "[" + ", ".join(quote_literal(t) for t in EVENT_TYPES) + "]"
    pos = typed_sql('"position"', Kind.INT, types["position"]) if "position" in types else "NULL"
    cols = {
        "user_id": id_sql('"user_id"', types["user_id"]),
        "product_id": id_sql('"product_id"', types["product_id"]),
        "etype": f'CAST(list_position({etypes}, trim(CAST("event_type" AS VARCHAR))) - 1 AS TINYINT)',
        "ts": f"CAST(epoch({ts}) AS BIGINT)",
        "position": f"CAST(coalesce({pos}, 0) AS SMALLINT)",
    }
    if "event_id" in types:
        cols["event_id"] = id_sql('"event_id"', types["event_id"])
    return cols


def load_table(path: Path, table: str) -> tuple[pd.DataFrame, list[str]]:
    """One of the ``users`` or ``products`` tables, typed as :func:`load_dataset` reads it, and its extra columns.

    For engines that read the event log themselves (Spark) but take the catalogue from here, so that both read
    every value the same way.
    """
    con = open_dataset(Path(path))
    try:
        sql, extra = _table_sql(con, table)
        frame = con.execute(f'SELECT {sql} FROM {table} ORDER BY "__row"').df()
    finally:
        con.close()
    return _normalise(frame, table), extra


def _in_order(ts: np.ndarray, row: np.ndarray, block: int = 1 << 22) -> bool:
    """Whether (ts, row) pairs are strictly increasing (checked a block at a time: no n-long temporaries)."""
    for lo in range(0, max(len(ts) - 1, 0), block):
        hi = min(lo + block + 1, len(ts))
        step = np.diff(ts[lo:hi])
        if not ((step > 0) | ((step == 0) & (np.diff(row[lo:hi]) > 0))).all():
            return False
    return True


def _read_events(con: duckdb.DuckDBPyConnection, sql: str, n_max: int) -> EventLog:
    """The events of ``sql`` (columns user, product, etype, ts, position, row) sorted by time, then file row.

    Streamed in batches into arrays of their final types (at most ``n_max`` events), then sorted here if they
    did not arrive in order: the log costs about 20 bytes an event while it loads, where a sorted, materialised
    query result converted to numpy peaked at several times that (load stage 4.6 GB at 65M events, 3.3 GB now).
    """
    types = {"user": np.int32, "product": np.int32, "etype": np.int8, "ts": np.int64, "position": np.int16,
             "row": np.int32 if n_max < 2**31 else np.int64}  # fmt: skip
    cols = {c: np.empty(n_max, dtype=t) for c, t in types.items()}
    n = 0
    for batch in con.sql(sql).to_arrow_reader(1 << 20):
        m = batch.num_rows
        for c in cols:
            cols[c][n : n + m] = batch.column(c).to_numpy(zero_copy_only=False)
        n += m
    if n < n_max:  # events dropped (repeated event ids): the arrays shrink to what was read
        cols = {c: v[:n].copy() for c, v in cols.items()}
    ts, row = cols["ts"], cols.pop("row")
    if not _in_order(ts, row):
        order = np.lexsort((row, ts))
        del row
        for c in cols:
            cols[c] = cols[c][order]
    return EventLog(cols["user"], cols["product"], cols["etype"], cols["ts"], cols["position"])


def load_dataset(path: Path, *, validate: bool = True, future_tolerance_seconds: int = 300) -> Dataset:
    """Validate and load a dataset folder.

    Raises
    ------
    DataValidationError
        The data breaks the contract (the report lists every problem).
    DataError
        A table is missing or unreadable.
    """
    path = Path(path)
    report = require_valid(path, future_tolerance_seconds=future_tolerance_seconds) if validate else None
    con = open_dataset(path)
    try:
        frames = {}
        extras = {}
        for table in ("users", "products"):
            sql, extra = _table_sql(con, table)
            frames[table] = con.execute(f'SELECT {sql} FROM {table} ORDER BY "__row"').df()
            extras[table] = extra
        users = _normalise(frames["users"], "users")
        products = _normalise(frames["products"], "products")
        con.register("u_ids", pd.DataFrame({"uid": users["user_id"], "urow": np.arange(len(users), dtype=np.int32)}))
        con.register(
            "p_ids", pd.DataFrame({"pid": products["product_id"], "prow": np.arange(len(products), dtype=np.int32)})
        )
        types = column_types(con, "events")
        cols = event_columns_sql(types)
        dedupe = ""
        if "event_id" in types and report is not None and report.repeats_event_ids:
            dedupe = f'QUALIFY row_number() OVER (PARTITION BY {cols["event_id"]} ORDER BY "__row") = 1'
        n_max = int(con.execute("SELECT count(*) FROM events").fetchall()[0][0])
        events = _read_events(con, f"""
            SELECT u.urow AS user, p.prow AS product, {cols["etype"]} AS etype, {cols["ts"]} AS ts,
                   {cols["position"]} AS position, e."__row" AS "row"
            FROM events e
            JOIN u_ids u ON u.uid = {cols["user_id"]}
            JOIN p_ids p ON p.pid = {cols["product_id"]}
            {dedupe}
        """, n_max)  # fmt: skip
    finally:
        con.close()
    return Dataset(
        path=path,
        users=users,
        products=products,
        events=events,
        fingerprint=dataset_fingerprint(path),
        report=report,
        extra_user_columns=extras["users"],
        extra_product_columns=extras["products"],
    )
