"""The validation report: problems found in a dataset, as data, JSON and a console view.

:mod:`finrec.data.validate` fills it; the CLI renders it; later commands raise
:class:`~finrec.errors.DataValidationError` carrying it.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

Severity = Literal["error", "warning"]

#: Every problem code, its severity and what it means (docs/data.md lists the same).
PROBLEM_CODES: dict[str, tuple[Severity, str]] = {
    "missing_column": ("error", "A required column is absent; checks that need it are skipped."),
    "empty_table": ("error", "The table has a header but no rows."),
    "missing_value": ("error", "A required column is empty (null, blank text) in some rows."),
    "bad_type": ("error", "A value of a well-known int, float or bool column cannot be read as that type."),
    "bad_timestamp": ("error", "A value of a timestamp or date column cannot be read as a date/time."),
    "future_timestamp": ("error", "An event timestamp is later than now plus the clock-skew tolerance."),
    "out_of_range": ("error", "A number is outside the column's allowed range."),
    "duplicate_key": ("error", "A user_id or product_id appears in more than one row."),
    "unknown_user": ("error", "Events name a user_id that is not in users."),
    "unknown_product": ("error", "Events name a product_id that is not in products."),
    "unknown_event_type": ("error", "An event_type is not one of the contract's event types."),
    "unknown_value": ("error", "A value is outside a column's closed vocabulary."),
    "inverted_age_range": ("error", "A product's min_age is greater than its max_age."),
    "duplicate_event_id": ("warning", "The same event_id appears more than once; later stages keep the first."),
    "unknown_region": ("warning", "A products.regions entry is neither `*` nor a region some user has."),
    "rate_as_fraction": (
        "warning",
        "Every apr/apy value is at most 1: looks like fractions, the contract uses percent.",
    ),
    "user_without_events": ("warning", "Some users have no events at all."),
    "product_without_events": ("warning", "Some products never appear in events."),
    "missing_optional_value": ("warning", "A well-known optional column is empty in some rows."),
    "misnamed_column": ("warning", "A column name differs from a well-known column only by case or spacing."),
    "unnamed_column": ("warning", "A column has no header name (often a saved pandas index)."),
}


@dataclass
class Problem:
    """One kind of problem found in one table column, with how often and where.

    ``count`` is the number of offending rows (for duplicate keys: rows that
    repeat an earlier key; for unknown users/products: events; for table-level
    problems such as a missing column: 1). ``examples`` are up to
    ``max_examples`` offending rows as dicts with the 1-based data ``row``
    number and the relevant values.
    """

    code: str
    severity: Severity
    table: str
    column: str | None
    count: int
    message: str
    hint: str
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "table": self.table,
            "column": self.column,
            "count": self.count,
            "message": self.message,
            "hint": self.hint,
            "examples": [{str(k): _plain(v) for k, v in ex.items()} for ex in self.examples],
        }


@dataclass
class TableSummary:
    """What a table file holds: its row count and which columns it brings."""

    name: str
    file: Path
    rows: int
    columns: list[str]
    known_optional: list[str]
    extra: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": str(self.file),
            "rows": self.rows,
            "columns": list(self.columns),
            "known_optional": list(self.known_optional),
            "extra": list(self.extra),
        }


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_dataset`: table summaries and every problem found."""

    path: Path
    tables: dict[str, TableSummary]
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings are allowed)."""
        return not self.errors

    @property
    def repeats_event_ids(self) -> bool:
        """The events repeat an ``event_id`` (a warning): every engine then keeps only the first of each."""
        return any(p.code == "duplicate_event_id" for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view of the report."""
        return {
            "path": str(self.path),
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "tables": {name: s.to_dict() for name, s in self.tables.items()},
            "problems": [p.to_dict() for p in self.problems],
        }

    def render(self, console: Console) -> None:
        """Print the table summary, then every problem grouped by table."""
        summary = Table(
            title=f"dataset {self.path}",
            title_justify="left",
            title_style="bold",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            expand=True,
        )
        summary.add_column("table", style="bold", no_wrap=True)
        summary.add_column("file", no_wrap=True)
        summary.add_column("rows", justify="right", no_wrap=True)
        summary.add_column("columns", justify="right", no_wrap=True)
        summary.add_column("known optional", overflow="fold", ratio=2)
        summary.add_column("extra (features)", overflow="fold", ratio=1)
        for s in self.tables.values():
            summary.add_row(
                s.name,
                s.file.name,
                f"{s.rows:,}",
                str(len(s.columns)),
                ", ".join(s.known_optional) or Text("-", style="dim"),
                ", ".join(s.extra) or Text("-", style="dim"),
            )
        console.print(summary)

        order = list(self.tables) + sorted({p.table for p in self.problems} - set(self.tables))
        for table in order:
            probs = [p for p in self.problems if p.table == table]
            if not probs:
                continue
            ne = sum(p.severity == "error" for p in probs)
            nw = len(probs) - ne
            console.rule(
                Text.assemble((table, "bold"), f"  {_plural(ne, 'error')}, {_plural(nw, 'warning')}"),
                align="left",
                style="red" if ne else "yellow",
            )
            for p in probs:
                _render_problem(console, p)
        ne, nw = len(self.errors), len(self.warnings)
        if ne:
            console.print(
                Text.assemble(
                    ("✗ ", "bold red"),
                    (f"{_plural(ne, 'error')}, {_plural(nw, 'warning')}: ", "bold"),
                    "the dataset breaks the data contract (docs/data.md)",
                )
            )
        else:
            console.print(
                Text.assemble(
                    ("✓ ", "bold green"),
                    (f"valid: no errors, {_plural(nw, 'warning')}", "bold"),
                )
            )


def _render_problem(console: Console, p: Problem) -> None:
    badge = (" ERROR ", "bold white on red") if p.severity == "error" else (" WARN  ", "bold black on yellow")
    where = f"{p.table}.{p.column}" if p.column else p.table
    console.print(
        Text.assemble(badge, " ", (p.code, "bold"), "  ", (where, "cyan"), "  ", (f"count {p.count:,}", "dim"))
    )
    console.print(Padding(Text(p.message), (0, 0, 0, 2)))
    console.print(Padding(Text.assemble(("hint: ", "green"), p.hint), (0, 0, 0, 2)))
    if p.examples:
        keys: list[str] = []
        for ex in p.examples:
            keys.extend(k for k in ex if k not in keys)
        t = Table(box=box.SIMPLE, show_edge=False, pad_edge=False, header_style="dim")
        for k in keys:
            t.add_column(k, justify="right" if k == "row" else "left", overflow="fold")
        for ex in p.examples:
            t.add_row(*(_cell(ex.get(k)) for k in keys))
        console.print(Padding(t, (0, 0, 1, 4)))
    else:
        console.print()


def _cell(value: Any) -> Text:
    if value is None:
        return Text("null", style="dim italic")
    v = _plain(value)
    s = repr(v) if isinstance(v, str) and (v != v.strip() or v == "") else str(v)
    return Text(s if len(s) <= 60 else s[:57] + "...")


def _plain(value: Any) -> Any:
    """Convert a DuckDB value to str/int/float/bool/None for JSON."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return ", ".join(str(_plain(v)) for v in value)
    return str(value)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _rows(n: int) -> str:
    return _plural(n, "row")


def _v(n: int, one: str, many: str) -> str:
    """The verb form agreeing with a count: ``_v(1, "has", "have")``."""
    return one if n == 1 else many
