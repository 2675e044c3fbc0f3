"""Generation on Spark equals the embedded generator: the same seed gives the same rows, ids and ground truth."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from finrec.artifacts import read_manifest
from finrec.data.dataset import load_dataset
from finrec.data.io import open_dataset
from finrec.data.synthetic.generate import BLOCK_SIZE, WorldConfig, generate_world
from finrec.data.synthetic.truth import GroundTruth
from finrec.data.validate import validate_dataset

pytestmark = [pytest.mark.spark, pytest.mark.slow]

#: Three blocks (the last one short), a drift inside the period: about 25 s on Spark on a busy 2-core machine.
WORLD = WorldConfig(users=2 * BLOCK_SIZE + 5_000, products=30, months=2, seed=13, drift_month=2)
KEYS = {"users": "user_id", "products": "product_id", "events": "event_id"}


@pytest.fixture(scope="module")
def worlds(spark: object, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from finrec.data.synthetic.spark import generate_world_spark

    root = tmp_path_factory.mktemp("parity")
    generate_world(WORLD, root / "embedded", progress=False)
    generate_world_spark(WORLD, root / "spark", spark)  # type: ignore[arg-type]
    return root / "embedded", root / "spark"


def _rows(con: duckdb.DuckDBPyConnection, table: str, order: str) -> pa.Table:
    """A table's rows with plain types (dictionaries as text, timestamps in microseconds), in ``order``."""
    rel = con.sql(f'SELECT * EXCLUDE ("__row") FROM {table} ORDER BY {order}')
    t = rel.to_arrow_table()
    return pa.table({n: c.cast(pa.string()) if pa.types.is_dictionary(c.type) else c
                     for n, c in zip(t.column_names, t.columns, strict=True)})  # fmt: skip


@pytest.mark.parametrize("table", ["users", "products", "events"])
def test_every_table_is_equal_row_for_row(worlds: tuple[Path, Path], table: str) -> None:
    embedded, spark = (open_dataset(w) for w in worlds)
    a, b = _rows(embedded, table, KEYS[table]), _rows(spark, table, KEYS[table])
    assert a.num_rows == b.num_rows > 0
    assert a.column_names == b.column_names
    for name in a.column_names:
        assert a.column(name).cast(b.column(name).type).equals(b.column(name)), f"{table}.{name}"
    # Stored in the same order too: Spark's part b holds block b.
    a_order, b_order = _rows(embedded, table, '"__row"'), _rows(spark, table, '"__row"')
    assert a_order.column(KEYS[table]).equals(b_order.column(KEYS[table]))


def test_ids_run_across_blocks_without_gaps(worlds: tuple[Path, Path]) -> None:
    row = open_dataset(worlds[1]).execute(
        "SELECT min(event_id), max(event_id), count(DISTINCT event_id), count(*), min(request_id), "
        "max(request_id), count(DISTINCT request_id) FROM events"
    ).fetchone()
    assert row is not None
    first, last, distinct, n, first_request, last_request, requests = row
    assert (first, last, distinct) == (1, n, n)
    assert (first_request, last_request) == (1, requests)


def test_the_datasets_load_and_validate_alike(worlds: tuple[Path, Path]) -> None:
    embedded, spark = worlds
    reports = [validate_dataset(w) for w in worlds]
    assert reports[1].ok, [p.message for p in reports[1].errors]
    found = [[(p.code, p.table, p.column, p.count) for p in r.problems] for r in reports]
    assert found[0] == found[1]  # the same warnings (planted missing values, customers without events)
    a, b = load_dataset(embedded), load_dataset(spark)
    assert a.users.equals(b.users) and a.products.equals(b.products)
    for name in ("user", "product", "etype", "ts", "position"):
        assert np.array_equal(getattr(a.events, name), getattr(b.events, name)), name


def test_ground_truth_and_counts_are_equal(worlds: tuple[Path, Path]) -> None:
    embedded, spark = worlds
    a, b = GroundTruth.load(embedded / "ground_truth"), GroundTruth.load(spark / "ground_truth")
    assert a.n_users == WORLD.users
    assert a.users_frame().equals(b.users_frame()) and a.products_frame().equals(b.products_frame())
    assert a.info == b.info and a.coef == b.coef
    counts = [read_manifest(w)["metrics"]["counts"] for w in worlds]
    assert counts[0] == counts[1] and counts[0]["users"] == WORLD.users
    assert not (spark / "_staging").exists()


def test_the_command_generates_on_spark(spark: object, tmp_path: Path) -> None:
    """`finrec generate --engine spark` runs on the active session and writes a dataset that validates."""
    from typer.testing import CliRunner

    from finrec.cli import app

    out = tmp_path / "w"
    args = ["generate", "--engine", "spark", "--users", "1500", "--products", "12", "--months", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "on spark" in result.output and "valid" in result.output
    assert (out / "events").is_dir() and (out / "users").is_dir()
    assert load_dataset(out).n_users == 1_500
