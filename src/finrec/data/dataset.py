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
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from finrec.data.contract import EVENT_TYPES, TABLES, Kind
from finrec.data.io import column_types, id_sql, open_dataset, quote_ident, quote_literal, typed_sql
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


def fingerprint_files(paths: list[Path]) -> str:
    """sha256 over the tables' bytes: identifies the exact data a model was trained on."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


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
        ts = typed_sql('"timestamp"', Kind.TIMESTAMP, types["timestamp"])
        etypes = "[" + ", ".join(quote_literal(t) for t in EVENT_TYPES) + "]"
        pos = typed_sql('"position"', Kind.INT, types["position"]) if "position" in types else "NULL"
        dedupe = ""
        if "event_id" in types and report is not None and any(p.code == "duplicate_event_id" for p in report.problems):
            event_id = id_sql(quote_ident("event_id"), types["event_id"])
            dedupe = f'QUALIFY row_number() OVER (PARTITION BY {event_id} ORDER BY "__row") = 1'
        ev = con.execute(f"""
            SELECT u.urow AS user, p.prow AS product,
                   CAST(list_position({etypes}, trim(CAST(e.event_type AS VARCHAR))) - 1 AS TINYINT) AS etype,
                   CAST(epoch({ts}) AS BIGINT) AS ts,
                   CAST(coalesce({pos}, 0) AS SMALLINT) AS position
            FROM events e
            JOIN u_ids u ON u.uid = {id_sql('e."user_id"', types["user_id"])}
            JOIN p_ids p ON p.pid = {id_sql('e."product_id"', types["product_id"])}
            {dedupe}
            ORDER BY ts, e."__row"
        """).fetchnumpy()
    finally:
        con.close()
    events = EventLog(
        user=np.asarray(ev["user"], dtype=np.int32),
        product=np.asarray(ev["product"], dtype=np.int32),
        etype=np.asarray(ev["etype"], dtype=np.int8),
        ts=np.asarray(ev["ts"], dtype=np.int64),
        position=np.asarray(ev["position"], dtype=np.int16),
    )
    files = [p for p in path.iterdir() if p.is_file() and p.name.split(".")[0] in TABLES]
    return Dataset(
        path=path,
        users=users,
        products=products,
        events=events,
        fingerprint=fingerprint_files(files),
        report=report,
        extra_user_columns=extras["users"],
        extra_product_columns=extras["products"],
    )
