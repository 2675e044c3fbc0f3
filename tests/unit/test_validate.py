"""The dataset validator and the table readers: every contract check, on CSV and Parquet."""

from __future__ import annotations

import datetime as dt
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from finrec.data.contract import TABLES
from finrec.data.io import ROW, find_table, open_dataset
from finrec.data.validate import PROBLEM_CODES, Problem, ValidationReport, require_valid, validate_dataset
from finrec.errors import DataError, DataValidationError

NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "data.md"


# --------------------------------------------------------------------------- helpers


def full_frames() -> dict[str, pd.DataFrame]:
    """A small dataset with every well-known column filled in, every user and product in events."""
    users = pd.DataFrame(
        {
            "user_id": [1, 2, 3, 4],
            "age": [34, 51, 23, 67],
            "income": [52000.0, 81000.5, 18000.0, 30000.0],
            "credit_score": [710.0, 640.0, 580.0, 800.0],
            "risk_tolerance": [3, 2, 5, 1],
            "region": ["north", "south", "north", "east"],
            "employment_status": ["employed", "self_employed", "student", "retired"],
            "marketing_consent": [True, False, True, False],
            "signup_date": [dt.date(2020, 1, 5), dt.date(2021, 6, 1), dt.date(2023, 3, 9), dt.date(2019, 12, 31)],
            "segment": ["a", "b", "a", "c"],  # an extra column, carried as a feature
        }
    )
    products = pd.DataFrame(
        {
            "product_id": ["P1", "P2", "P3"],
            "name": ["Gold Card, no fee", "Easy Saver", 'Home "Plus" Mortgage'],
            "category": ["credit_card", "savings", "mortgage"],
            "provider": ["Bank A", "Bank B", "Bank A"],
            "risk_level": [3, 1, 4],
            "apr": [19.9, 0.0, 4.5],
            "apy": [0.0, 2.5, 0.0],
            "annual_fee": [0.0, 0.0, 250.0],
            "min_credit_score": [600.0, 0.0, 650.0],
            "min_income": [15000.0, 0.0, 40000.0],
            "min_age": [18, 16, 21],
            "max_age": [99, 120, 70],
            "regions": ["*", "north,south", "east"],
            "launch_date": [dt.date(2018, 1, 1), dt.date(2019, 5, 5), dt.date(2020, 2, 2)],
        }
    )
    ts = pd.to_datetime(
        ["2024-01-01 10:00", "2024-01-01 10:01", "2024-02-03 12:00", "2024-02-03 12:05", "2024-03-01 09:00"]
    ).tz_localize("UTC")
    events = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 3, 4],
            "product_id": ["P1", "P1", "P2", "P3", "P3"],
            "event_type": ["view", "click", "apply", "approve", "hold"],
            "timestamp": ts,
            "event_id": ["e1", "e2", "e3", "e4", "e5"],
            "request_id": ["r1", "r1", "r2", "r3", "r4"],
            "position": [1, 1, 2, 1, 3],
            "channel": ["app", "app", "web", "email", "branch"],
        }
    )
    return {"users": users, "products": products, "events": events}


def minimal_frames() -> dict[str, pd.DataFrame]:
    """Only the required columns, string ids."""
    return {
        "users": pd.DataFrame({"user_id": ["C-001", "C-002"]}),
        "products": pd.DataFrame({"product_id": ["card", "loan"]}),
        "events": pd.DataFrame(
            {
                "user_id": ["C-001", "C-002", "C-002"],
                "product_id": ["card", "loan", "card"],
                "event_type": ["impression", "click", "apply"],
                "timestamp": ["2024-05-01T08:00:00Z", "2024-05-01 09:30:00", "2024-05-02T10:00:00+02:00"],
            }
        ),
    }


def write(directory: Path, frames: dict[str, pd.DataFrame], fmt: str = "csv") -> Path:
    """Write the frames as ``<name>.<fmt>``; ``fmt`` may also map table names to formats."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, df in frames.items():
        f = fmt if isinstance(fmt, str) else fmt[name]
        path = directory / f"{name}.{f}"
        if f == "parquet":
            df.to_parquet(path, index=False)
        elif f == "csv.gz":
            df.to_csv(path, index=False, compression="gzip")
        else:
            df.to_csv(path, index=False)
    return directory


def put(df: pd.DataFrame, column: str, row: int, value: Any) -> None:
    """Set one cell, turning the column into text so any value fits in CSV and Parquet alike."""
    col = df[column]
    if pd.api.types.is_datetime64_any_dtype(col):
        text = col.dt.strftime("%Y-%m-%dT%H:%M:%SZ").astype(object)
    else:
        text = col.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    text = text.astype(object)
    text.iloc[row] = value
    df[column] = text


def codes(report: ValidationReport | list[Problem]) -> list[tuple[str, str, str | None]]:
    problems = report.problems if isinstance(report, ValidationReport) else report
    return [(p.code, p.table, p.column) for p in problems]


def only(report: ValidationReport, code: str, column: str | None = None):
    found = [p for p in report.problems if p.code == code and (column is None or p.column == column)]
    assert len(found) == 1, f"expected one {code} on {column}, got {codes(report)}"
    return found[0]


def rows(problem) -> list[int]:
    return [e["row"] for e in problem.examples]


def validate(directory: Path, **kw: Any) -> ValidationReport:
    return validate_dataset(directory, now=NOW, **kw)


@pytest.fixture(params=["csv", "parquet"])
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


# --------------------------------------------------------------------------- valid data


def test_full_dataset_is_valid_without_any_problem(tmp_path: Path, fmt: str) -> None:
    report = validate(write(tmp_path, full_frames(), fmt))
    assert report.ok
    assert report.problems == [], codes(report)
    users = report.tables["users"]
    assert users.rows == 4
    assert users.file.name == f"users.{fmt}"
    assert users.extra == ["segment"]
    assert "marketing_consent" in users.known_optional and "user_id" not in users.known_optional
    assert ROW not in users.columns
    assert report.tables["events"].known_optional == ["event_id", "request_id", "position", "channel"]


def test_minimal_dataset_with_string_ids_is_valid(tmp_path: Path, fmt: str) -> None:
    report = validate(write(tmp_path, minimal_frames(), fmt))
    assert report.ok, codes(report)
    assert report.problems == []
    assert report.tables["users"].known_optional == [] and report.tables["users"].extra == []


def test_gzip_csv_and_mixed_formats(tmp_path: Path) -> None:
    report = validate(write(tmp_path, full_frames(), {"users": "parquet", "products": "csv.gz", "events": "csv"}))
    assert report.problems == [], codes(report)
    assert report.tables["products"].file.name == "products.csv.gz"


def test_ids_compare_as_text_across_storage_types(tmp_path: Path) -> None:
    frames = full_frames()
    # Integer ids in users.parquet, the same ids as text with stray spaces in events.csv.
    frames["events"]["user_id"] = [" 1", "1", "2 ", "3", "4"]
    write(tmp_path, {"users": frames["users"]}, "parquet")
    write(tmp_path, {"products": frames["products"], "events": frames["events"]}, "csv")
    assert validate(tmp_path).problems == []


def test_float_ids_from_nan_columns_match_integers(tmp_path: Path) -> None:
    frames = full_frames()
    frames["events"]["user_id"] = [1.0, 1.0, 2.0, 3.0, 4.0]  # what pandas makes of an int column with a gap
    write(tmp_path, {"events": frames["events"]}, "parquet")
    write(tmp_path, {"users": frames["users"], "products": frames["products"]}, "csv")
    assert validate(tmp_path).problems == []


def test_lenient_but_unambiguous_values_are_accepted(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    put(frames["users"], "age", 0, "34.0")
    put(frames["users"], "marketing_consent", 0, "Yes")
    put(frames["users"], "marketing_consent", 1, "0")
    put(frames["users"], "marketing_consent", 2, "T")
    put(frames["users"], "marketing_consent", 3, "n")
    put(frames["users"], "signup_date", 0, "2020-01-05T10:00:00")
    put(frames["events"], "timestamp", 0, "2024-01-01T10:00:00+02:00")
    put(frames["events"], "timestamp", 1, "2024-01-01")
    put(frames["products"], "min_age", 0, None)  # empty rule: "no minimum age", not a gap
    put(frames["users"], "income", 0, None)  # a gap in the profile: reported as a warning
    report = validate(write(tmp_path, frames, fmt))
    assert report.ok, codes(report)
    assert codes(report) == [("missing_optional_value", "users", "income")]
    assert report.problems[0].message.startswith("income is missing in 1 of 4 rows (25.0%)")


# --------------------------------------------------------------------------- structure


def test_missing_required_column_skips_dependent_checks_only(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["events"] = frames["events"].drop(columns=["timestamp"])
    frames["events"].loc[2, "user_id"] = 99  # an unknown user must still be found
    report = validate(write(tmp_path, frames, fmt))
    p = only(report, "missing_column", "timestamp")
    assert (p.severity, p.table) == ("error", "events")
    assert "skipped" in p.message
    assert only(report, "unknown_user").count == 1
    assert not [x for x in report.problems if x.code in ("bad_timestamp", "future_timestamp")]


def test_missing_required_column_hint_suggests_rename(tmp_path: Path) -> None:
    frames = full_frames()
    frames["users"] = frames["users"].rename(columns={"user_id": "User_ID"})
    report = validate(write(tmp_path, frames))
    p = only(report, "missing_column", "user_id")
    assert "'User_ID'" in p.hint and "rename" in p.hint
    # users.user_id is gone: the reference checks against users are skipped, not reported as unknown users
    assert not [x for x in report.problems if x.code in ("unknown_user", "user_without_events")]


def test_semicolon_file_hint(tmp_path: Path) -> None:
    write(tmp_path, full_frames())
    (tmp_path / "users.csv").write_text("user_id;age\n1;30\n2;40\n3;20\n4;50\n")
    p = only(validate(tmp_path), "missing_column", "user_id")
    assert "comma-separated" in p.hint


def test_misnamed_and_unnamed_columns_are_warned(tmp_path: Path) -> None:
    frames = full_frames()
    frames["users"] = frames["users"].rename(columns={"age": "Age"})
    write(tmp_path, frames)
    frames["products"].to_csv(tmp_path / "products.csv")  # with the pandas index, an empty header name
    report = validate(tmp_path)
    assert report.ok
    assert only(report, "misnamed_column").column == "Age"
    assert only(report, "unnamed_column").table == "products"
    assert "Age" in report.tables["users"].extra


def test_empty_table(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["products"] = frames["products"].iloc[0:0]
    report = validate(write(tmp_path, frames, fmt))
    p = only(report, "empty_table")
    assert (p.table, p.severity) == ("products", "error")
    assert report.tables["products"].rows == 0
    # every event now names an unknown product
    assert not [x for x in report.problems if x.code == "product_without_events"]


# --------------------------------------------------------------------------- values


def test_missing_required_values(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    put(frames["events"], "event_type", 1, None)
    put(frames["events"], "event_type", 3, "  ")
    put(frames["users"], "user_id", 2, None)
    report = validate(write(tmp_path, frames, fmt))
    p = only(report, "missing_value", "event_type")
    assert (p.table, p.count, rows(p)) == ("events", 2, [2, 4])
    p = only(report, "missing_value", "user_id")
    assert (p.table, p.count, rows(p)) == ("users", 1, [3])


#: (table, column, row index, bad value, expected code); several per dataset, one validation run.
WRONG_TYPES = [
    ("users", "age", 1, "abc", "bad_type"),
    ("users", "age", 3, "34.5", "bad_type"),
    ("users", "income", 1, "12,000", "bad_type"),
    ("users", "risk_tolerance", 2, "2.5", "bad_type"),
    ("users", "marketing_consent", 0, "maybe", "bad_type"),
    ("users", "signup_date", 1, "last week", "bad_timestamp"),
    ("products", "risk_level", 1, "high", "bad_type"),
    ("products", "launch_date", 2, "2020-02-30", "bad_timestamp"),
    ("events", "timestamp", 1, "01/02/2024", "bad_timestamp"),
    ("events", "position", 4, "first", "bad_type"),
]


def test_wrong_types(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    expected: dict[tuple[str, str, str], list[tuple[int, str]]] = {}
    for table, column, row, value, code in WRONG_TYPES:
        put(frames[table], column, row, value)
        expected.setdefault((code, table, column), []).append((row + 1, value))
    report = validate(write(tmp_path, frames, fmt))
    assert sorted(codes(report.errors)) == sorted(expected)
    for (code, table, column), bad in expected.items():
        p = only(report, code, column)
        assert (p.table, p.severity, p.count) == (table, "error", len(bad))
        assert [(e["row"], e[column]) for e in p.examples] == sorted(bad)
        assert p.hint


def test_epoch_timestamps_are_rejected_with_a_specific_hint(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["events"]["timestamp"] = frames["events"]["timestamp"].astype("int64") // 10**9
    p = only(validate(write(tmp_path, frames, fmt)), "bad_timestamp", "timestamp")
    assert p.count == 5
    assert "epoch" in p.hint


def test_future_timestamps_respect_tolerance_and_time_zones(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    put(frames["events"], "timestamp", 0, "2025-01-01T00:04:00Z")  # within 300 s: fine
    put(frames["events"], "timestamp", 1, "2025-01-01T01:04:59+01:00")  # 00:04:59 UTC: fine
    put(frames["events"], "timestamp", 2, "2025-01-01 00:10:00")  # naive = UTC, 10 min ahead
    put(frames["events"], "timestamp", 4, "2031-07-01T00:00:00-05:00")
    report = validate(write(tmp_path, frames, fmt))
    p = only(report, "future_timestamp")
    assert (p.count, rows(p)) == (2, [3, 5])
    assert only(validate(tmp_path, future_tolerance_seconds=3600), "future_timestamp").count == 1
    later = validate_dataset(tmp_path, now=dt.datetime(2040, 1, 1))  # a naive now is UTC
    assert not [x for x in later.problems if x.code == "future_timestamp"]


OUT_OF_RANGE = [
    ("users", "age", 130),
    ("users", "income", -1.5),
    ("users", "credit_score", 1001),
    ("users", "risk_tolerance", 0),
    ("products", "risk_level", 6),
    ("products", "apr", 150.0),
    ("products", "annual_fee", -10.0),
    ("events", "position", 0),
]


def test_out_of_range(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    for table, column, value in OUT_OF_RANGE:
        frames[table][column] = frames[table][column].astype(type(value))
        frames[table].loc[1, column] = value
    report = validate(write(tmp_path, frames, fmt))
    assert sorted(codes(report.errors)) == sorted(("out_of_range", t, c) for t, c, _ in OUT_OF_RANGE)
    for table, column, value in OUT_OF_RANGE:
        p = only(report, "out_of_range", column)
        assert (p.table, p.count, rows(p)) == (table, 1, [2])
        assert float(p.examples[0][column]) == value
        assert "must be" in p.message


def test_unknown_event_types_with_case_hint(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["events"]["event_type"] = ["view", "Click", "purchase", "Click", " hold"]
    p = only(validate(write(tmp_path, frames, fmt)), "unknown_event_type", "event_type")
    assert (p.table, p.count, rows(p)) == ("events", 4, [2, 3, 4, 5])
    assert "'Click' -> use lowercase 'click'" in p.hint
    assert "remove the surrounding spaces: 'hold'" in p.hint
    assert "'purchase' (1)" in p.message and "'Click' (2)" in p.message


def test_examples_are_capped(tmp_path: Path) -> None:
    frames = full_frames()
    frames["events"]["event_type"] = "buy"
    p = only(validate(write(tmp_path, frames), max_examples=2), "unknown_event_type")
    assert (p.count, rows(p)) == (5, [1, 2])


# --------------------------------------------------------------------------- keys and references


def test_duplicate_keys(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["users"]["user_id"] = [1, 2, 1, 1]
    frames["products"]["product_id"] = ["P1", "P2", "P2"]
    report = validate(write(tmp_path, frames, fmt))
    p = only(report, "duplicate_key", "user_id")
    assert (p.table, p.severity, p.count) == ("users", "error", 2)
    [ex] = p.examples
    assert (ex["row"], str(ex["user_id"]), ex["times"], ex["rows"]) == (3, "1", 3, "1, 3, 4")
    p = only(report, "duplicate_key", "product_id")
    assert (p.count, p.examples[0]["rows"]) == (1, "2, 3")


def test_duplicate_event_ids_warn(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["events"]["event_id"] = ["e1", "e2", "e1", "e4", "e2"]
    report = validate(write(tmp_path, frames, fmt))
    assert report.ok
    p = only(report, "duplicate_event_id")
    assert (p.severity, p.count, rows(p)) == ("warning", 2, [3, 5])


def test_unknown_users_and_products(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["events"]["user_id"] = [1, 99, 2, 99, 77]
    frames["events"]["product_id"] = ["P1", "P1", "X", "P3", "P3"]
    report = validate(write(tmp_path, frames, fmt))
    p = only(report, "unknown_user")
    assert (p.table, p.column, p.count) == ("events", "user_id", 3)
    assert "2 user_id values" in p.message
    assert [(e["row"], e["user_id"], e["events"]) for e in p.examples] == [(2, "99", 2), (5, "77", 1)]
    p = only(report, "unknown_product")
    assert (p.count, rows(p)) == (1, [3])
    # users 3 and 4 and product P2 now have no events
    assert only(report, "user_without_events").count == 2
    assert only(report, "product_without_events").count == 1
    assert only(report, "product_without_events").examples == []


# --------------------------------------------------------------------------- cross-column rules


def test_inverted_age_range(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["products"]["min_age"] = [18, 65, 21]
    frames["products"]["max_age"] = [99, 30, 21]  # 21..21 is fine
    p = only(validate(write(tmp_path, frames, fmt)), "inverted_age_range")
    assert (p.count, rows(p)) == (1, [2])
    ex = p.examples[0]
    assert (ex["product_id"], str(ex["min_age"]), str(ex["max_age"])) == ("P2", "65", "30")  # CSV keeps the text


def test_unknown_regions_warn_only_when_users_have_regions(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["products"]["regions"] = ["*", "north, west", "East"]
    report = validate(write(tmp_path, frames, fmt))
    assert report.ok
    p = only(report, "unknown_region")
    assert (p.severity, p.count, rows(p)) == ("warning", 2, [2, 3])
    assert "'East'" in p.message and "'west'" in p.message
    frames["users"] = frames["users"].drop(columns=["region"])
    other = tmp_path / "noregion"
    assert not [x for x in validate(write(other, frames, fmt)).problems if x.code == "unknown_region"]


def test_rates_as_fractions_warn(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["products"]["apr"] = [0.199, 0.0, None]
    report = validate(write(tmp_path, frames, fmt))
    p = only(report, "rate_as_fraction")
    assert (p.column, p.severity, p.count) == ("apr", "warning", 2)
    assert "percent" in p.message


# --------------------------------------------------------------------------- files


def test_find_table_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_table(tmp_path / "nope", "users")
    (tmp_path / "Users.CSV").write_text("user_id\n1\n")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as exc:
        find_table(tmp_path, "users")
    msg = str(exc.value)
    assert "users.parquet, users.csv, users.csv.gz" in msg and "notes.txt" in msg and "Users.CSV" in msg
    assert "rename Users.CSV to users.csv" in exc.value.hint
    (tmp_path / "users.csv").write_text("user_id\n1\n")
    assert find_table(tmp_path, "users") == tmp_path / "users.csv"
    (tmp_path / "users.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="more than once"):
        find_table(tmp_path, "users")


def test_validate_raises_data_error_for_a_missing_table(tmp_path: Path) -> None:
    frames = full_frames()
    del frames["events"]
    with pytest.raises(DataError, match="table 'events' not found"):
        validate(write(tmp_path, frames))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"user_id,age\n1,30\n2,40,5\n", r"users\.csv.*Expected Number of Columns"),
        (b"", r"users\.csv.*empty"),
        (b"user_id,age,age\n1,2,3\n", "more than once in the header"),
        (b"user_id,name\n1,\xe9t\xe9\n", r"users\.csv.*(unicode|UTF-8)"),
    ],
)
def test_unreadable_csv_is_a_data_error(tmp_path: Path, content: bytes, match: str) -> None:
    write(tmp_path, full_frames())
    (tmp_path / "users.csv").write_bytes(content)
    with pytest.raises(DataError, match=match) as exc:
        validate(tmp_path)
    assert "\n" not in exc.value.message
    assert exc.value.hint


def test_unreadable_parquet_is_a_data_error(tmp_path: Path) -> None:
    write(tmp_path, full_frames(), "parquet")
    (tmp_path / "events.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"events\.parquet"):
        validate(tmp_path)


def test_open_dataset_row_numbers_and_quoting(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["products"]["rowid"] = ["x", "y", "z"]  # a column named like DuckDB's row id
    con = open_dataset(write(tmp_path, frames, fmt))
    try:
        got = con.execute(f"SELECT {ROW}, name, rowid FROM products ORDER BY {ROW}").fetchall()
        assert got == [
            (1, "Gold Card, no fee", "x"),
            (2, "Easy Saver", "y"),
            (3, 'Home "Plus" Mortgage', "z"),
        ]
        kinds = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE users)").fetchall())
        assert kinds["age"] == ("VARCHAR" if fmt == "csv" else "BIGINT")
    finally:
        con.close()


# --------------------------------------------------------------------------- report


def test_report_to_dict_and_render(tmp_path: Path, fmt: str) -> None:
    frames = full_frames()
    frames["events"]["user_id"] = [1, 99, 2, 3, 4]
    put(frames["events"], "timestamp", 0, "2999-01-01T00:00:00Z")
    put(frames["users"], "income", 0, "[red]lots")  # rich markup in data must print as text
    report = validate(write(tmp_path, frames, fmt))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["errors"] == len(report.errors) == 3
    assert {p["code"] for p in data["problems"]} >= {"unknown_user", "future_timestamp", "bad_type"}
    assert data["tables"]["users"]["rows"] == 4
    for p in data["problems"]:
        for ex in p["examples"]:
            assert all(v is None or isinstance(v, (str, int, float)) for v in ex.values())
    console = Console(record=True, width=160, color_system=None)
    report.render(console)
    text = console.export_text()
    for code in ("unknown_user", "future_timestamp", "bad_type"):
        assert code in text
    assert "[red]lots" in text
    assert "3 errors" in text


def test_render_valid_report(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    validate(write(tmp_path, minimal_frames())).render(console)
    assert "valid: no errors" in console.export_text()


def test_require_valid(tmp_path: Path) -> None:
    good = write(tmp_path / "good", minimal_frames())
    assert require_valid(good, now=NOW).ok
    frames = minimal_frames()
    frames["events"].loc[0, "event_type"] = "Click"
    bad = write(tmp_path / "bad", frames)
    with pytest.raises(DataValidationError) as exc:
        require_valid(bad, now=NOW)
    assert exc.value.exit_code == 1
    assert [p.code for p in exc.value.report.errors] == ["unknown_event_type"]


def test_every_problem_code_is_documented() -> None:
    if not DOCS.exists():
        pytest.skip("docs/data.md not written yet")
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z_]+)` \| (?:error|warning) \|", text, flags=re.M))
    assert documented == set(PROBLEM_CODES)
    for code, (severity, _) in PROBLEM_CODES.items():
        assert f"| `{code}` | {severity} |" in text


def test_synthetic_world_satisfies_the_contract(small_world: Path) -> None:
    report = validate_dataset(small_world, now=dt.datetime(2100, 1, 1, tzinfo=dt.UTC))
    assert report.ok, [(p.code, p.table, p.column, p.message) for p in report.errors]


# --------------------------------------------------------------------------- properties


@st.composite
def datasets(draw: st.DrawFn) -> tuple[dict[str, pd.DataFrame], int]:
    """A random valid dataset plus k events naming users that do not exist."""
    string_ids = draw(st.booleans())
    n_users = draw(st.integers(1, 8))
    n_products = draw(st.integers(1, 5))
    uid = [f"U{i}" if string_ids else i for i in range(n_users)]
    pid = [f"P-{i}" if string_ids else 100 + i for i in range(n_products)]
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from(uid), st.sampled_from(pid), st.sampled_from(["view", "click", "apply", "hold"])),
            min_size=1,
            max_size=15,
        )
    )
    k = draw(st.integers(0, 4))
    ghosts = [(f"ghost{i}" if string_ids else 10_000 + i, pid[0], "view") for i in range(k)]
    events = draw(st.permutations(pairs + ghosts))
    seconds = draw(st.lists(st.integers(0, 10**8), min_size=len(events), max_size=len(events)))
    users = pd.DataFrame(
        {"user_id": uid, "age": draw(st.lists(st.integers(0, 120), min_size=n_users, max_size=n_users))}
    )
    products = pd.DataFrame(
        {"product_id": pid, "risk_level": draw(st.lists(st.integers(1, 5), min_size=n_products, max_size=n_products))}
    )
    ev = pd.DataFrame(
        {
            "user_id": [e[0] for e in events],
            "product_id": [e[1] for e in events],
            "event_type": [e[2] for e in events],
            "timestamp": [
                (dt.datetime(2020, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=s)).isoformat() for s in seconds
            ],
        }
    )
    return {"users": users, "products": products, "events": ev}, k


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=datasets(), fmt=st.sampled_from(["csv", "parquet"]))
def test_property_only_injected_unknown_users_are_errors(data: tuple[dict[str, pd.DataFrame], int], fmt: str) -> None:
    frames, k = data
    with tempfile.TemporaryDirectory() as d:
        report = validate(write(Path(d), frames, fmt))
    if k == 0:
        assert report.ok, codes(report)
    else:
        assert [(p.code, p.count) for p in report.errors] == [("unknown_user", k)]
        ghost_rows = [i + 1 for i, u in enumerate(frames["events"]["user_id"]) if str(u).startswith(("ghost", "10"))]
        assert rows(report.errors[0]) == ghost_rows[: len(report.errors[0].examples)]
    assert all(p.severity == "warning" for p in report.warnings)
    assert {p.code for p in report.warnings} <= {"user_without_events", "product_without_events"}


def test_docs_column_tables_match_the_contract() -> None:
    if not DOCS.exists():
        pytest.skip("docs/data.md not written yet")
    text = DOCS.read_text(encoding="utf-8")
    for name, spec in TABLES.items():
        section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        documented = re.findall(r"^\| `([a-z_]+)` \| (required|optional) \| ([a-z]+) \|", section, flags=re.M)
        assert documented == [(c.name, "required" if c.required else "optional", c.kind.value) for c in spec.columns]
        for c in spec.columns:
            assert c.description in section, (name, c.name)


def test_docs_minimal_example_is_valid(tmp_path: Path) -> None:
    if not DOCS.exists():
        pytest.skip("docs/data.md not written yet")
    text = DOCS.read_text(encoding="utf-8").split("## A minimal dataset", 1)[1]
    for name in TABLES:
        body = re.search(rf"`{name}\.csv`\s*```csv\n(.*?)```", text, flags=re.S)
        assert body, name
        (tmp_path / f"{name}.csv").write_text(body.group(1), encoding="utf-8")
    report = validate(tmp_path)
    assert report.problems == [], codes(report)
