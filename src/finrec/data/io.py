"""Locating and opening the three tables of a dataset.

A dataset directory holds ``users``, ``products`` and ``events``, each as
``<name>.parquet``, ``<name>.csv`` or ``<name>.csv.gz``, or as a folder ``<name>/``
(or ``<name>.parquet/``) of Parquet part files, as Spark writes a table (see
:mod:`finrec.data.contract`). :func:`open_dataset` registers them in a DuckDB
connection under their table names, each with a hidden 1-based ``__row``
column (the data row number in the file, header excluded; in a folder, counted
across its part files in name order) so problems can cite rows:

* Parquet is exposed as a view over ``read_parquet`` and never materialised.
* CSV is read as text (``all_varchar``) into a temporary table, so a value of
  the wrong type stays visible as the text the file holds instead of being
  silently coerced. Files must be comma-separated UTF-8 with a header row.

The SQL helpers :func:`id_sql`, :func:`present_sql` and :func:`typed_sql` turn a
column into the value the contract means, whatever its storage type, so the
validator and later stages read the data the same way.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "users.csv").write_text("user_id\\nC-1\\n")
>>> find_table(d, "users").name
'users.csv'
"""

from __future__ import annotations

import csv
import gzip
import itertools
import re
import tempfile
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from finrec.data.contract import Kind
from finrec.data.layout import find_table as find_table  # re-exported: callers locate and open tables here
from finrec.data.layout import find_tables, table_files
from finrec.errors import DataError

#: Name of the hidden 1-based row-number column every registered table carries.
ROW = "__row"

#: Text that counts as a missing value in typed (int, float, bool, date, timestamp) columns, compared lower-case.
NA_TOKENS: tuple[str, ...] = ("na", "n/a", "nan", "nat", "null", "none")

#: Text read as true / false in bool columns, compared lower-case after trimming.
TRUE_TOKENS: tuple[str, ...] = ("true", "t", "yes", "y", "1", "1.0")
FALSE_TOKENS: tuple[str, ...] = ("false", "f", "no", "n", "0", "0.0")

_INT_TYPES = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT"}
)
_FLOAT_TYPES = frozenset({"FLOAT", "DOUBLE", "REAL"})

_CSV_HINT = (
    "finrec reads comma-separated UTF-8 files with one header row and the same number of fields on every line; "
    'quote fields that contain commas or line breaks with double quotes ("a, b")'
)


# --------------------------------------------------------------------------- SQL quoting


def quote_ident(name: str) -> str:
    """Quote a column or table name for DuckDB SQL."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote a string literal for DuckDB SQL."""
    return "'" + value.replace("'", "''") + "'"


def spill_past(con: duckdb.DuckDBPyConnection, limit: str) -> None:
    """Cap ``con``'s memory at ``limit`` (e.g. "1GB"); past it, its sorts and aggregations spill to a temporary
    folder shared by finrec's connections (DuckDB's default cap is 80% of the machine's memory)."""
    con.execute(f"SET memory_limit = {quote_literal(limit)}")
    con.execute(f"SET temp_directory = {quote_literal(str(Path(tempfile.gettempdir()) / 'finrec-duckdb'))}")


# --------------------------------------------------------------------------- type classes


def is_int_type(dtype: str) -> bool:
    """DuckDB integer storage type."""
    return dtype.upper() in _INT_TYPES


def is_float_type(dtype: str) -> bool:
    """DuckDB floating-point or decimal storage type."""
    t = dtype.upper()
    return t in _FLOAT_TYPES or t.startswith("DECIMAL")


def is_temporal_type(dtype: str) -> bool:
    """DuckDB date or timestamp storage type (any precision, with or without time zone)."""
    t = dtype.upper()
    return t == "DATE" or t.startswith("TIMESTAMP")


def is_text_type(dtype: str) -> bool:
    t = dtype.upper()
    return t == "VARCHAR" or t.startswith("VARCHAR")


# --------------------------------------------------------------------------- value expressions


def _text(col: str) -> str:
    """Trimmed text of a column, NULL when empty."""
    return f"NULLIF(TRIM(CAST({col} AS VARCHAR)), '')"


def _text_na(col: str) -> str:
    """Trimmed text of a column, NULL when empty or an NA token."""
    tokens = ", ".join(quote_literal(t) for t in NA_TOKENS)
    t = _text(col)
    return f"(CASE WHEN lower({t}) IN ({tokens}) THEN NULL ELSE {t} END)"


def id_sql(col: str, dtype: str) -> str:
    """SQL for an id as comparable text: trimmed VARCHAR, NULL when missing.

    Integral floats (a Parquet id column that picked up NaN) are written without
    the ``.0`` so ``1.0`` matches ``1``.

    Parameters
    ----------
    col
        Quoted column reference (see :func:`quote_ident`).
    dtype
        The column's DuckDB storage type.
    """
    if is_int_type(dtype):
        return f"CAST({col} AS VARCHAR)"
    if is_float_type(dtype):
        d = f"CAST({col} AS DOUBLE)"
        return (
            f"(CASE WHEN isnan({d}) THEN NULL WHEN isfinite({d}) AND {d} = trunc({d}) "
            f"THEN CAST(TRY_CAST({d} AS HUGEINT) AS VARCHAR) ELSE CAST({col} AS VARCHAR) END)"
        )
    return _text(col)


def present_sql(col: str, kind: Kind, dtype: str) -> str:
    """SQL condition: the column holds a value (not NULL, empty text, NaN or, for typed kinds, an NA token)."""
    if kind in (Kind.ID, Kind.STRING):
        if is_text_type(dtype):
            return f"({_text(col)} IS NOT NULL)"
        if is_float_type(dtype):
            return f"({col} IS NOT NULL AND NOT isnan(CAST({col} AS DOUBLE)))"
        return f"({col} IS NOT NULL)"
    if is_float_type(dtype):
        return f"({col} IS NOT NULL AND NOT isnan(CAST({col} AS DOUBLE)))"
    if is_int_type(dtype) or is_temporal_type(dtype) or dtype.upper() == "BOOLEAN":
        return f"({col} IS NOT NULL)"
    return f"({_text_na(col)} IS NOT NULL)"


def typed_sql(col: str, kind: Kind, dtype: str) -> str | None:
    """SQL for the column read as its contract kind, NULL where it is missing or unreadable.

    ``None`` for id and string kinds, which every value satisfies. The rules:

    * int: integers, and integral floats or text such as ``3.0``; ``3.5`` is unreadable.
    * float: any finite number; ``inf`` is unreadable.
    * bool: a boolean, 1/0, or ``true/false/t/f/yes/no/y/n/1/0`` in any case.
    * timestamp and date: a Parquet date or timestamp, or ISO 8601 text with or
      without a time zone (naive values are UTC: the connection's time zone must
      be UTC, see :func:`open_dataset`); integer epochs are unreadable.
    """
    if kind in (Kind.ID, Kind.STRING):
        return None
    t = dtype.upper()
    if kind is Kind.INT:
        if is_int_type(t):
            return f"TRY_CAST({col} AS BIGINT)"
        if t == "BOOLEAN":
            return "CAST(NULL AS BIGINT)"
        d = f"CAST({col} AS DOUBLE)" if is_float_type(t) else f"TRY_CAST({_text_na(col)} AS DOUBLE)"
        return f"(CASE WHEN isfinite({d}) AND {d} = trunc({d}) THEN TRY_CAST({d} AS BIGINT) END)"
    if kind is Kind.FLOAT:
        if t == "BOOLEAN":
            return "CAST(NULL AS DOUBLE)"
        d = f"CAST({col} AS DOUBLE)" if (is_float_type(t) or is_int_type(t)) else f"TRY_CAST({_text_na(col)} AS DOUBLE)"
        return f"(CASE WHEN isfinite({d}) THEN {d} END)"
    if kind is Kind.BOOL:
        if t == "BOOLEAN":
            return col
        if is_int_type(t) or is_float_type(t):
            return f"(CASE WHEN {col} = 1 THEN true WHEN {col} = 0 THEN false END)"
        s = f"lower({_text_na(col)})"
        yes = ", ".join(quote_literal(x) for x in TRUE_TOKENS)
        no = ", ".join(quote_literal(x) for x in FALSE_TOKENS)
        return f"(CASE WHEN {s} IN ({yes}) THEN true WHEN {s} IN ({no}) THEN false END)"
    if kind in (Kind.TIMESTAMP, Kind.DATE):
        if t == "TIMESTAMP WITH TIME ZONE":
            return col
        if is_temporal_type(t):
            return f"TRY_CAST({col} AS TIMESTAMPTZ)"
        if is_int_type(t) or is_float_type(t) or t == "BOOLEAN":
            return "CAST(NULL AS TIMESTAMPTZ)"
        return f"TRY_CAST({_text_na(col)} AS TIMESTAMPTZ)"
    raise ValueError(f"unknown kind {kind!r}")  # pragma: no cover


def column_types(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    """The columns of a registered table and their DuckDB types, without the hidden ``__row``."""
    rows = con.execute(f"DESCRIBE SELECT * FROM {quote_ident(table)}").fetchall()
    return {str(r[0]): str(r[1]) for r in rows if r[0] != ROW}


# --------------------------------------------------------------------------- reading in place


def scan_sql(path: Path) -> str:
    """A DuckDB table expression reading the table at ``path`` (a file, or a folder of part files) in place."""
    files = table_files(path)
    if len(files) == 1 and not Path(path).is_dir():
        return quote_literal(str(files[0]))
    return "read_parquet([" + ", ".join(quote_literal(str(f)) for f in files) + "])"


# --------------------------------------------------------------------------- opening


def _one_line(exc: BaseException) -> str:
    """The useful part of a DuckDB error message, on one line."""
    text = str(exc)
    keep: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith(("Possible fix", "Possible Solution", "*", "file =")):
            break
        if line.startswith("Original Line"):
            continue
        keep.append(line)
    msg = "; ".join(keep) or text.strip()
    msg = re.sub(r"^(Invalid Input|IO|Conversion|Binder|Parser) Error:\s*", "", msg)
    return msg[:300]


def _read_csv_header(path: Path) -> list[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh), None)
    except UnicodeDecodeError:
        raise DataError(
            f"cannot read {path}: the header is not UTF-8 text", hint="save the file as UTF-8 CSV"
        ) from None
    except (OSError, EOFError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}", hint=_CSV_HINT) from None
    if not header or all(not h.strip() for h in header):
        raise DataError(f"cannot read {path}: the file is empty (no header row)", hint=_CSV_HINT)
    return header


def _register_csv(con: duckdb.DuckDBPyConnection, name: str, path: Path) -> None:
    header = _read_csv_header(path)
    names = [h if h.strip() else f"column{i}" for i, h in enumerate(header)]
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)
    if dupes:
        raise DataError(
            f"cannot read {path}: column{'s' if len(dupes) > 1 else ''} {', '.join(repr(d) for d in dupes)} "
            "appear more than once in the header",
            hint="give every column a distinct name",
        )
    # A real column called rowid would hide DuckDB's row id; store it under another name and rename it back.
    stored = ["__finrec_rowid" if n.lower() == "rowid" else n for n in names]
    columns = "{" + ", ".join(f"{quote_literal(n)}: 'VARCHAR'" for n in stored) + "}"
    raw = quote_ident(f"__finrec_raw_{name}")
    sql = (
        f"CREATE OR REPLACE TEMP TABLE {raw} AS SELECT * FROM read_csv({quote_literal(str(path))}, "
        f"header = true, auto_detect = false, columns = {columns}, delim = ',', quote = '\"', escape = '\"', "
        "strict_mode = true)"
    )
    try:
        con.execute(sql)
    except duckdb.Error as exc:
        raise DataError(f"cannot read {path}: {_one_line(exc)}", hint=_CSV_HINT) from None
    renames = [f"{quote_ident(s)} AS {quote_ident(n)}" for s, n in zip(stored, names, strict=True) if s != n]
    star = f"* RENAME ({', '.join(renames)})" if renames else "*"
    con.execute(f"CREATE OR REPLACE TEMP VIEW {quote_ident(name)} AS SELECT {star}, rowid + 1 AS {ROW} FROM {raw}")


_PARQUET_HINT = "the file is not a readable Parquet file; re-export it (e.g. pandas DataFrame.to_parquet)"


def _rows_before(files: list[Path]) -> list[int]:
    """Rows in the files before each file, from the files' footers."""
    rows = []
    for f in files:
        try:
            rows.append(pq.ParquetFile(f).metadata.num_rows)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"cannot read {f}: {str(exc)[:300]}", hint=_PARQUET_HINT) from None
    return [0, *itertools.accumulate(rows)][:-1]


def _register_parquet(con: duckdb.DuckDBPyConnection, name: str, path: Path) -> None:
    if path.is_dir():
        files = table_files(path)
        # Rows are numbered across the part files in name order: each file's row number plus the rows of the
        # files before it, so the view still streams from disk.
        before = _rows_before(files)
        offsets = "CAST([" + ", ".join(map(str, before)) + "] AS BIGINT[])"
        source = "read_parquet([" + ", ".join(quote_literal(str(f)) for f in files) + "], file_row_number = true)"
        row = f"{offsets}[CAST(file_index AS BIGINT) + 1] + file_row_number + 1"
    else:
        source = f"read_parquet({quote_literal(str(path))}, file_row_number = true)"
        row = "file_row_number + 1"
    sql = (
        f"CREATE OR REPLACE TEMP VIEW {quote_ident(name)} AS SELECT * EXCLUDE (file_row_number), "
        f"{row} AS {ROW} FROM {source}"
    )
    try:
        con.execute(sql)
    except duckdb.Error as exc:
        raise DataError(f"cannot read {path}: {_one_line(exc)}", hint=_PARQUET_HINT) from None


def open_dataset(data_dir: Path, con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """Register ``users``, ``products`` and ``events`` of ``data_dir`` in a DuckDB connection.

    Each becomes a temporary view with the file's columns plus ``__row``, the
    1-based data row number in the file. Parquet files stay on disk (views over
    ``read_parquet``); CSV files are read as text into temporary tables. The
    connection's time zone is set to UTC so naive timestamps read as UTC.

    Parameters
    ----------
    data_dir
        The dataset directory.
    con
        Connection to register the tables in; a new in-memory one when ``None``.

    Raises
    ------
    DataError
        A table file is missing, ambiguous or cannot be parsed at all.
    """
    data_dir = Path(data_dir)
    paths = find_tables(data_dir)
    own = con is None
    con = duckdb.connect() if con is None else con
    try:
        if own:
            con.execute("SET enable_progress_bar = false")
        con.execute("SET TimeZone = 'UTC'")
        for name, path in paths.items():
            if path.is_dir() or path.name.endswith(".parquet"):
                _register_parquet(con, name, path.resolve())
            else:
                _register_csv(con, name, path.resolve())
    except BaseException:
        if own:
            con.close()
        raise
    return con
