"""Check a dataset against the data contract and report every problem at once.

:func:`validate_dataset` opens the three tables with DuckDB (see
:mod:`finrec.data.io`) and runs every check of the contract, each as a few
aggregate queries that return a count and a handful of example rows, so it
scales to tens of millions of events without loading columns into Python.
Each kind of problem has a stable ``code`` (listed in :data:`PROBLEM_CODES`
and in docs/data.md). :func:`require_valid` is what later commands call: it
raises :class:`~finrec.errors.DataValidationError` when there are errors.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "users.csv").write_text("user_id\\nC-1\\n")
>>> _ = (d / "products.csv").write_text("product_id\\nP-1\\n")
>>> _ = (d / "events.csv").write_text("user_id,product_id,event_type,timestamp\\nC-1,P-1,Click,2024-01-01\\n")
>>> report = validate_dataset(d)
>>> report.ok, [p.code for p in report.errors]
(False, ['unknown_event_type'])
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from finrec.data.contract import TABLES, Column, Kind
from finrec.data.io import (
    ROW,
    column_types,
    find_tables,
    id_sql,
    is_int_type,
    is_temporal_type,
    open_dataset,
    present_sql,
    quote_ident,
    quote_literal,
    spill_past,
    typed_sql,
)
from finrec.data.report import (
    PROBLEM_CODES,
    Problem,
    Severity,
    TableSummary,
    ValidationReport,
    _num,
    _plural,
    _rows,
    _v,
)
from finrec.errors import DataError, DataValidationError

__all__ = [
    "PROBLEM_CODES",
    "Problem",
    "Severity",
    "TableSummary",
    "ValidationReport",
    "require_valid",
    "validate_dataset",
]

_KIND_TEXT = {
    Kind.INT: "an integer",
    Kind.FLOAT: "a number",
    Kind.BOOL: "a boolean",
    Kind.TIMESTAMP: "a timestamp",
    Kind.DATE: "a date",
}

_KIND_HINT = {
    Kind.INT: "write whole numbers such as 3 (3.0 is accepted, 3.5 is not)",
    Kind.FLOAT: "write plain numbers with a dot as decimal separator (1234.5): no currency signs, percent signs "
    "or thousands separators",
    Kind.BOOL: "write true/false, 1/0 or yes/no (any case)",
    Kind.TIMESTAMP: "write ISO 8601 such as 2024-03-01T12:30:00Z, 2024-03-01T12:30:00+01:00 or 2024-03-01 12:30:00 "
    "(no zone means UTC), or store a Parquet timestamp; integer epoch values are not accepted, convert them first",
    Kind.DATE: "write ISO 8601 dates such as 2024-03-01 (a timestamp is accepted too), or store a Parquet date",
}

_ALLOWED_CODES = {"event_type": "unknown_event_type"}

#: Warnings about column names a pandas index leaves behind, or that DuckDB invents for empty headers.
_UNNAMED = re.compile(r"^(column\d+|Unnamed: \d+|__index_level_\d+__|index)$")

#: DuckDB's memory while validating. Measured at 65M events (1M customers): 3.95 GB peak and 38 s without a limit
#: (it grows with the log), 1.1 GB and 42 s with it; the same report.
MEMORY_LIMIT = "1GB"


# --------------------------------------------------------------------------- checks


@dataclass
class _RowCheck:
    """A per-row condition, evaluated with all others of its table in one scan."""

    code: str
    column: str | None
    cond: str
    show: list[str]
    describe: Callable[[int, list[dict[str, Any]]], tuple[str, str]]
    examples: bool = True


class _Validator:
    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        data_dir: Path,
        files: dict[str, Path],
        now: dt.datetime,
        tolerance: int,
        max_examples: int,
    ) -> None:
        self.con = con
        self.data_dir = data_dir
        self.files = files
        self.now = now
        self.tolerance = tolerance
        self.n = max_examples
        self.problems: list[Problem] = []
        self.types = {t: column_types(con, t) for t in TABLES}
        self.rows = {t: int(self._one(f"SELECT count(*) FROM {quote_ident(t)}")[0]) for t in TABLES}

    # -- helpers ---------------------------------------------------------------------------

    def _one(self, sql: str, params: list[Any] | None = None) -> tuple[Any, ...]:
        row = self.con.execute(sql, params or []).fetchone()
        assert row is not None
        return row

    def has(self, table: str, *columns: str) -> bool:
        return all(c in self.types[table] for c in columns)

    def usable(self, table: str, *columns: str) -> bool:
        """The columns exist and the table has rows."""
        return self.has(table, *columns) and self.rows[table] > 0

    def add(
        self,
        code: str,
        table: str,
        column: str | None,
        count: int,
        message: str,
        hint: str,
        examples: list[dict[str, Any]] | None = None,
    ) -> None:
        severity = PROBLEM_CODES[code][0]
        self.problems.append(Problem(code, severity, table, column, int(count), message, hint, list(examples or [])))

    def context(self, table: str, column: str | None) -> list[str]:
        """Columns shown next to an offending value so a row can be found."""
        spec = TABLES[table]
        keys = [spec.key] if spec.key else ["user_id", "product_id"]
        cols = [k for k in keys if k and k in self.types[table]]
        if column is not None and column not in cols:
            cols.append(column)
        return [c for c in cols if c != "row"]

    def struct(self, table: str, show: list[str]) -> str:
        parts = [f"'row': {ROW}"] + [f"{quote_literal(c)}: {quote_ident(c)}" for c in show if c in self.types[table]]
        return "{" + ", ".join(parts) + "}"

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> ValidationReport:
        summaries: dict[str, TableSummary] = {}
        for name, spec in TABLES.items():
            cols = list(self.types[name])
            summaries[name] = TableSummary(
                name=name,
                file=self.files[name],
                rows=self.rows[name],
                columns=cols,
                known_optional=[c.name for c in spec.optional if c.name in self.types[name]],
                extra=[c for c in cols if c not in spec.by_name],
            )
        for name in TABLES:
            self.check_structure(name)
            self.run_row_checks(name, self.row_checks(name))
        self.check_duplicates("users", "user_id", "duplicate_key")
        self.check_duplicates("products", "product_id", "duplicate_key")
        self.check_duplicates("events", "event_id", "duplicate_event_id")
        self.check_references("user_id", "users", "unknown_user", "user_without_events")
        self.check_references("product_id", "products", "unknown_product", "product_without_events")
        self.check_regions()
        for col in ("apr", "apy"):
            self.check_fraction_rate(col)
        table_order = {t: i for i, t in enumerate(TABLES)}
        problems = sorted(
            self.problems, key=lambda p: (table_order.get(p.table, 99), p.severity != "error")
        )  # stable: detection order within a table
        return ValidationReport(path=self.data_dir, tables=summaries, problems=problems)

    # -- structure ---------------------------------------------------------------------------

    def check_structure(self, table: str) -> None:
        spec = TABLES[table]
        cols = list(self.types[table])

        def norm(s: str) -> str:
            return re.sub(r"[\s\-]+", "_", s.strip().lower())

        near = {norm(c): c for c in cols if c not in spec.by_name}
        for column in spec.required:
            if column.name in self.types[table]:
                continue
            if norm(column.name) in near:
                hint = f"rename column {near[norm(column.name)]!r} to {column.name!r} (names are case-sensitive)"
            elif len(cols) == 1 and any(d in cols[0] for d in ";\t|"):
                hint = (
                    f"the header {cols[0]!r} looks like one column holding several: finrec reads comma-separated "
                    "files; re-export with ',' as the delimiter"
                )
            else:
                hint = f"add the column ({column.description}); the table has: {', '.join(cols) or 'no columns'}"
            self.add(
                "missing_column",
                table,
                column.name,
                1,
                f"{table} has no {column.name!r} column, which is required; checks that need it are skipped",
                hint,
            )
        for column in spec.optional:
            if column.name not in self.types[table] and norm(column.name) in near:
                found = near[norm(column.name)]
                self.add(
                    "misnamed_column",
                    table,
                    found,
                    1,
                    f"column {found!r} looks like the well-known column {column.name!r} but is spelled differently, "
                    "so it is carried as a plain feature and its rules do not apply",
                    f"rename {found!r} to {column.name!r} (names are case-sensitive)",
                )
        for c in cols:
            if _UNNAMED.match(c):
                self.add(
                    "unnamed_column",
                    table,
                    c,
                    1,
                    f"column {c!r} has no real name; it looks like a saved row index and would be carried as a feature",
                    "drop it before export (pandas: to_csv(index=False) / to_parquet(index=False)) or give it a name",
                )
        if self.rows[table] == 0:
            self.add(
                "empty_table",
                table,
                None,
                1,
                f"{table} has no rows",
                f"{self.files[table].name} holds only a header; export the data with its rows",
            )

    # -- per-row checks ---------------------------------------------------------------------

    def row_checks(self, table: str) -> list[_RowCheck]:
        checks: list[_RowCheck] = []
        spec = TABLES[table]
        types = self.types[table]
        total = self.rows[table]
        for column in spec.columns:
            if column.name not in types:
                continue
            checks.extend(self.column_checks(table, column, types[column.name], total))
        if table == "products" and self.has("products", "min_age", "max_age"):
            lo = typed_sql(quote_ident("min_age"), Kind.INT, types["min_age"])
            hi = typed_sql(quote_ident("max_age"), Kind.INT, types["max_age"])
            checks.append(
                _RowCheck(
                    "inverted_age_range",
                    "min_age",
                    f"({lo}) > ({hi})",
                    self.context(table, "min_age") + ["max_age"],
                    lambda n, _ex: (
                        f"{_plural(n, 'product')} {_v(n, 'accepts', 'accept')} nobody: min_age is greater than max_age",
                        "swap the two values, or leave one empty when there is no bound on that side",
                    ),
                )
            )
        return checks

    def column_checks(self, table: str, column: Column, dtype: str, total: int) -> list[_RowCheck]:
        name, kind = column.name, column.kind
        c = quote_ident(name)
        present = present_sql(c, kind, dtype)
        typed = typed_sql(c, kind, dtype)
        show = self.context(table, name)
        out: list[_RowCheck] = []
        if column.required:
            out.append(
                _RowCheck(
                    "missing_value",
                    name,
                    f"NOT {present}",
                    show,
                    lambda n, _ex: (
                        f"{_rows(n)} of {table} {_v(n, 'has', 'have')} no {name}",
                        f"every row needs a {name}: fill it in or drop those rows",
                    ),
                )
            )
        elif column.missing_means is None:  # an empty rule column means "no rule": nothing to warn about
            out.append(
                _RowCheck(
                    "missing_optional_value",
                    name,
                    f"NOT {present}",
                    show,
                    lambda n, _ex: (
                        f"{name} is missing in {n:,} of {total:,} rows ({100 * n / max(total, 1):.1f}%)",
                        f"optional values may be empty, but a customer or product without {name} cannot pass a rule "
                        "that needs it, and features fall back to a default",
                    ),
                    examples=False,
                )
            )
        if typed is not None:
            native = (
                (kind is Kind.INT and is_int_type(dtype))
                or (kind is Kind.BOOL and dtype.upper() == "BOOLEAN")
                or (kind in (Kind.TIMESTAMP, Kind.DATE) and is_temporal_type(dtype))
            )
            if not native:
                code = "bad_timestamp" if kind in (Kind.TIMESTAMP, Kind.DATE) else "bad_type"

                def describe_bad(n: int, ex: list[dict[str, Any]], kind: Kind = kind) -> tuple[str, str]:
                    hint = _KIND_HINT[kind]
                    if (
                        kind in (Kind.TIMESTAMP, Kind.DATE)
                        and ex
                        and all(re.fullmatch(r"-?\d+(\.\d+)?", str(e.get(name, "")).strip()) for e in ex)
                    ):
                        hint = (
                            "the values look like integer epoch times, which are ambiguous (seconds? milliseconds?): "
                            "convert them to ISO 8601 text or a Parquet timestamp"
                        )
                    return (
                        f"{_plural(n, 'value')} of {table}.{name} cannot be read as {_KIND_TEXT[kind]}"
                        + (f" (the file stores it as {dtype})" if dtype.upper() != "VARCHAR" else ""),
                        hint,
                    )

                out.append(_RowCheck(code, name, f"{present} AND ({typed}) IS NULL", show, describe_bad))
            if column.min is not None or column.max is not None:
                conds = []
                if column.min is not None:
                    conds.append(f"({typed}) < {column.min!r}")
                if column.max is not None:
                    conds.append(f"({typed}) > {column.max!r}")
                if column.min is not None and column.max is not None:
                    rng = f"between {_num(column.min)} and {_num(column.max)}"
                elif column.min is not None:
                    rng = f"at least {_num(column.min)}"
                else:
                    rng = f"at most {_num(column.max)}"  # type: ignore[arg-type]
                out.append(
                    _RowCheck(
                        "out_of_range",
                        name,
                        " OR ".join(conds),
                        show,
                        lambda n, _ex: (
                            f"{_plural(n, 'value')} of {table}.{name} {_v(n, 'is', 'are')} outside the allowed range: "
                            f"must be {rng}",
                            f"{name}: {column.description} Fix or blank out these values.",
                        ),
                    )
                )
            if kind is Kind.TIMESTAMP:
                limit = self.now + dt.timedelta(seconds=self.tolerance)
                lit = f"TIMESTAMPTZ {quote_literal(limit.isoformat())}"
                out.append(
                    _RowCheck(
                        "future_timestamp",
                        name,
                        f"({typed}) > {lit}",
                        show,
                        lambda n, _ex: (
                            f"{_rows(n)} of {table} {_v(n, 'has', 'have')} a {name} in the future "
                            f"(after {self.now.isoformat(timespec='seconds')} + {self.tolerance} s tolerance)",
                            "check the exporter's clock and time zone (values without a zone are read as UTC); "
                            "fix or drop these rows",
                        ),
                    )
                )
        if column.allowed:
            allowed = ", ".join(quote_literal(a) for a in column.allowed)
            code = _ALLOWED_CODES.get(name, "unknown_value")
            out.append(
                _RowCheck(
                    code,
                    name,
                    f"{present} AND CAST({c} AS VARCHAR) NOT IN ({allowed})",
                    show,
                    lambda n, _ex: self.describe_allowed(table, column, n),
                )
            )
        return out

    def describe_allowed(self, table: str, column: Column, n: int) -> tuple[str, str]:
        c = quote_ident(column.name)
        assert column.allowed is not None
        allowed = ", ".join(quote_literal(a) for a in column.allowed)
        present = present_sql(c, column.kind, self.types[table][column.name])
        rows = self.con.execute(
            f"SELECT CAST({c} AS VARCHAR) AS v, count(*) AS n FROM {quote_ident(table)} "
            f"WHERE {present} AND CAST({c} AS VARCHAR) NOT IN ({allowed}) GROUP BY v ORDER BY n DESC, v LIMIT 10"
        ).fetchall()
        values = ", ".join(f"{v!r} ({k:,})" for v, k in rows)
        fixes = []
        for v, _k in rows:
            fixed = str(v).strip().lower()
            if fixed in column.allowed:
                v = str(v)
                if v.strip() == fixed:
                    fixes.append(f"{v!r} -> remove the surrounding spaces: {fixed!r}")
                elif v == v.strip():
                    fixes.append(f"{v!r} -> use lowercase {fixed!r}")
                else:
                    fixes.append(f"{v!r} -> use lowercase without spaces {fixed!r}")
        what = "event types" if column.name == "event_type" else "values"
        hint = f"allowed {what}: {', '.join(column.allowed)}"
        if fixes:
            hint = "; ".join(fixes) + "; " + hint
        return f"{_rows(n)} of {table} {_v(n, 'has', 'have')} {column.name} values outside the contract: {values}", hint

    def run_row_checks(self, table: str, checks: list[_RowCheck]) -> None:
        """Count every check's offending rows in one scan, then fetch examples for those that fail."""
        if not checks or self.rows[table] == 0:
            return
        t = quote_ident(table)
        counts = self._one(f"SELECT {', '.join(f'count(*) FILTER (WHERE {ch.cond})' for ch in checks)} FROM {t}")
        for ch, n in zip(checks, counts, strict=True):
            if not n:
                continue
            examples = []
            if ch.examples:
                examples = [
                    dict(r[0])
                    for r in self.con.execute(
                        f"SELECT {self.struct(table, ch.show)} FROM {t} WHERE {ch.cond} ORDER BY {ROW} LIMIT {self.n}"
                    ).fetchall()
                ]
            message, hint = ch.describe(int(n), examples)
            self.add(ch.code, table, ch.column, int(n), message, hint, examples)

    # -- set checks ------------------------------------------------------------------------

    def check_duplicates(self, table: str, column: str, code: str) -> None:
        if not self.usable(table, column):
            return
        dtype = self.types[table][column]
        c = quote_ident(column)
        # Primary keys are compared like references (trimmed text); event ids exactly as stored.
        key = c if (is_int_type(dtype) or code == "duplicate_event_id") else id_sql(c, dtype)
        t = quote_ident(table)
        keyed = f"(SELECT {key} AS k, {ROW} FROM {t}) AS keyed"
        ids, extra, first = self._one(
            f"WITH d AS MATERIALIZED (SELECT k, count(*) AS n, min({ROW}) AS first_row FROM {keyed} "
            "WHERE k IS NOT NULL GROUP BY k HAVING count(*) > 1) "
            "SELECT (SELECT count(*) FROM d), (SELECT coalesce(sum(n - 1), 0) FROM d), "
            f"(SELECT list(k ORDER BY first_row) FROM (SELECT k, first_row FROM d ORDER BY first_row LIMIT {self.n}))"
        )
        if not ids:
            return
        rows = dict(
            self.con.execute(
                f"SELECT k, list({ROW} ORDER BY {ROW}) FROM {keyed} WHERE k IN (SELECT unnest(?)) GROUP BY k",
                [list(first)],
            ).fetchall()
        )
        examples = []
        for k in first:
            r = rows.get(k, [])
            shown = ", ".join(str(x) for x in r[:10]) + (", ..." if len(r) > 10 else "")
            examples.append({"row": r[1] if len(r) > 1 else None, column: k, "times": len(r), "rows": shown})
        if code == "duplicate_key":
            message = (
                f"{_plural(int(ids), column + ' value')} {_v(int(ids), 'appears', 'appear')} "
                f"more than once in {table}: "
                f"{_rows(int(extra))} {_v(int(extra), 'repeats', 'repeat')} a key seen earlier"
            )
            hint = f"{column} must be unique: remove the repeated rows or give them their own ids"
        else:
            message = (
                f"{_plural(int(ids), 'event_id')} {_v(int(ids), 'appears', 'appear')} more than once: "
                f"{_rows(int(extra))} {_v(int(extra), 'repeats', 'repeat')} an event "
                "delivered earlier; later stages keep only the first"
            )
            hint = "usually harmless re-delivery; if these are different events, give each its own event_id"
        self.add(code, table, column, int(extra), message, hint, examples)

    def check_references(self, column: str, ref_table: str, unknown_code: str, unused_code: str) -> None:
        if not (self.usable("events", column) and self.usable(ref_table, column)):
            return
        c = quote_ident(column)
        et, rt = self.types["events"][column], self.types[ref_table][column]
        agg = f"__finrec_events_{column}"
        # Group on the stored type first (fast), then normalise the few distinct keys to text.
        self.con.execute(
            f"CREATE OR REPLACE TEMP TABLE {agg} AS "
            f"SELECT {id_sql('k', et)} AS k, sum(n) AS n, min(first_row) AS first_row FROM ("
            f"SELECT {c} AS k, count(*) AS n, min({ROW}) AS first_row FROM events GROUP BY {c}) "
            f"WHERE {id_sql('k', et)} IS NOT NULL GROUP BY 1"
        )
        try:
            ref = f"(SELECT {id_sql(c, rt)} AS k FROM {quote_ident(ref_table)}) AS r"
            ids, events = self._one(
                f"SELECT count(*), coalesce(sum(a.n), 0) FROM {agg} AS a ANTI JOIN {ref} ON a.k = r.k"
            )
            if ids:
                ex = self.con.execute(
                    f"SELECT a.first_row, a.k, a.n FROM {agg} AS a ANTI JOIN {ref} ON a.k = r.k "
                    f"ORDER BY a.first_row LIMIT {self.n}"
                ).fetchall()
                examples = [{"row": r, column: k, "events": n} for r, k, n in ex]
                self.add(
                    unknown_code,
                    "events",
                    column,
                    int(events),
                    f"{_plural(int(events), 'event')} {_v(int(events), 'names', 'name')} "
                    f"{_plural(int(ids), column + ' value')} that "
                    f"{'is' if ids == 1 else 'are'} not in {ref_table}.{column} (examples show each id's first row)",
                    f"add the missing rows to {ref_table} or drop their events; ids are compared as trimmed text "
                    "(1 matches '1', 'C-1' does not match 'c-1')",
                    examples,
                )
            if self.rows["events"] > 0:
                (unused,) = self._one(
                    f"SELECT count(*) FROM (SELECT {id_sql(c, rt)} AS k FROM {quote_ident(ref_table)}) AS r "
                    f"ANTI JOIN {agg} AS a ON r.k = a.k WHERE r.k IS NOT NULL"
                )
                if unused:
                    share = 100 * unused / max(self.rows[ref_table], 1)
                    noun = "user" if ref_table == "users" else "product"
                    self.add(
                        unused_code,
                        ref_table,
                        column,
                        int(unused),
                        f"{_plural(int(unused), noun)} of {self.rows[ref_table]:,} ({share:.1f}%) "
                        f"{'has' if unused == 1 else 'have'} no events",
                        f"fine for new or inactive {noun}s; if you expected events for them, check that the "
                        f"events export covers the same period and uses the same {column} values",
                    )
        finally:
            self.con.execute(f"DROP TABLE IF EXISTS {agg}")

    def check_regions(self) -> None:
        if not (self.usable("products", "regions") and self.usable("users", "region")):
            return
        reg = quote_ident("region")
        regions = quote_ident("regions")
        ptypes = self.types["products"]
        pid = quote_ident("product_id") if "product_id" in ptypes else "NULL"
        rows = self.con.execute(
            f"WITH known AS (SELECT DISTINCT TRIM(CAST({reg} AS VARCHAR)) AS r FROM users WHERE {reg} IS NOT NULL), "
            f"entries AS (SELECT {ROW} AS rn, {pid} AS pid, CAST({regions} AS VARCHAR) AS regions, "
            f"unnest(string_split(CAST({regions} AS VARCHAR), ',')) AS entry FROM products "
            f"WHERE {regions} IS NOT NULL), "
            "bad AS (SELECT rn, any_value(pid) AS pid, any_value(regions) AS regions, "
            "list_sort(list_distinct(list(TRIM(entry)))) AS unknown FROM entries "
            "WHERE TRIM(entry) NOT IN ('*', '') AND TRIM(entry) NOT IN (SELECT r FROM known WHERE r IS NOT NULL) "
            "GROUP BY rn) "
            "SELECT rn, pid, regions, unknown FROM bad ORDER BY rn"
        ).fetchall()
        if not rows:
            return
        unknown = sorted({u for r in rows for u in r[3]})
        shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        examples = [
            {"row": rn, "product_id": p, "regions": rg, "unknown": ", ".join(u)}
            if pid != "NULL"
            else {"row": rn, "regions": rg, "unknown": ", ".join(u)}
            for rn, p, rg, u in rows[: self.n]
        ]
        self.add(
            "unknown_region",
            "products",
            "regions",
            len(rows),
            f"{_plural(len(rows), 'product')} {_v(len(rows), 'lists', 'list')} regions no user has: {shown}",
            "regions entries must be `*` or region codes spelled exactly as in users.region (trimmed, "
            "case-sensitive); such products are never offered there",
            examples,
        )

    def check_fraction_rate(self, column: str) -> None:
        if not self.usable("products", column):
            return
        typed = typed_sql(quote_ident(column), Kind.FLOAT, self.types["products"][column])
        n, hi, ex = self._one(
            f"SELECT count(v), max(v), min_by(s, {ROW}, {self.n}) FILTER (WHERE v IS NOT NULL) FROM "
            f"(SELECT {typed} AS v, {self.struct('products', self.context('products', column))} AS s, {ROW} "
            "FROM products)"
        )
        if n and hi is not None and 0 < hi <= 1:
            self.add(
                "rate_as_fraction",
                "products",
                column,
                int(n),
                f"every {column} value is at most 1 (largest {hi:g}): they look like fractions, "
                "but the contract uses percent",
                f"multiply {column} by 100 (0.199 -> 19.9 for 19.9%)",
                [dict(e) for e in ex or []],
            )


# --------------------------------------------------------------------------- entry points


def validate_dataset(
    data_dir: Path,
    *,
    now: dt.datetime | None = None,
    future_tolerance_seconds: int = 300,
    max_examples: int = 5,
) -> ValidationReport:
    """Check the dataset in ``data_dir`` against the data contract.

    Every check runs; the report lists every problem found with its count and
    up to ``max_examples`` example rows.

    Parameters
    ----------
    data_dir
        Directory with the users, products and events tables.
    now
        The current time for the future-timestamp check (default: the clock);
        a naive value is read as UTC.
    future_tolerance_seconds
        Timestamps up to this far past ``now`` are accepted (clock skew).
    max_examples
        Example rows kept per problem.

    Raises
    ------
    DataError
        A table file is missing, ambiguous or cannot be read at all.
    """
    data_dir = Path(data_dir)
    if now is None:
        now = dt.datetime.now(dt.UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    max_examples = max(1, int(max_examples))
    con = duckdb.connect()
    try:
        con.execute("SET enable_progress_bar = false")
        # Checks over every event (repeated event ids group all of them) spill to disk past this, so validating
        # holds about this much, not memory in proportion to the log (1.1 GB at 16M events without it).
        spill_past(con, MEMORY_LIMIT)
        files = find_tables(data_dir)
        open_dataset(data_dir, con)
        try:
            return _Validator(con, data_dir, files, now, int(future_tolerance_seconds), max_examples).run()
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"cannot read the dataset in {data_dir}: {first}",
                hint="a table file is damaged or not in the expected format; re-export it",
            ) from None
    finally:
        con.close()


def require_valid(data_dir: Path, **kwargs: Any) -> ValidationReport:
    """Validate ``data_dir`` and raise :class:`DataValidationError` if the contract is broken.

    Keyword arguments go to :func:`validate_dataset`. Returns the report (which
    may hold warnings) when there are no errors.
    """
    report = validate_dataset(data_dir, **kwargs)
    if not report.ok:
        raise DataValidationError(report)
    return report


__all__ = [
    "PROBLEM_CODES",
    "Problem",
    "TableSummary",
    "ValidationReport",
    "require_valid",
    "validate_dataset",
]
