"""A table stored as a folder of Parquet part files (as Spark writes it) reads as the one table it holds."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finrec.data.dataset import load_dataset
from finrec.data.io import find_table, open_dataset, scan_sql
from finrec.data.validate import validate_dataset
from finrec.errors import DataError


def _split(table: pa.Table, folder: Path, parts: int) -> None:
    """Write ``table`` as ``parts`` part files, with Spark's side files (which are not data) beside them."""
    folder.mkdir()
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        name = f"part-{i:05d}-0f3c-c000.zstd.parquet"
        pq.write_table(table.slice(a, b - a), folder / name, compression="zstd")
        (folder / f".{name}.crc").write_bytes(b"not data")
    (folder / "_SUCCESS").write_bytes(b"")


@pytest.fixture()
def folder_world(tiny_world: Path, tmp_path: Path) -> Path:
    """``tiny_world`` with users in ``users/`` (3 parts) and events in ``events.parquet/`` (4 parts)."""
    out = tmp_path / "parts"
    out.mkdir()
    shutil.copy(tiny_world / "products.parquet", out / "products.parquet")
    _split(pq.read_table(tiny_world / "users.parquet"), out / "users", 3)
    _split(pq.read_table(tiny_world / "events.parquet"), out / "events.parquet", 4)
    return out


def test_a_folder_of_parts_loads_as_the_single_file(tiny_world: Path, folder_world: Path) -> None:
    assert validate_dataset(folder_world).ok
    one, parts = load_dataset(tiny_world), load_dataset(folder_world)
    assert parts.users.equals(one.users) and parts.products.equals(one.products)
    for name in ("user", "product", "etype", "ts", "position"):  # the same order too (rows numbered across parts)
        assert np.array_equal(getattr(parts.events, name), getattr(one.events, name)), name
    assert parts.fingerprint != one.fingerprint  # the fingerprint names the files it hashed


def test_rows_are_numbered_across_part_files(tiny_world: Path, folder_world: Path) -> None:
    one, parts = open_dataset(tiny_world), open_dataset(folder_world)
    query = 'SELECT "__row", event_id FROM events ORDER BY "__row"'
    a, b = one.execute(query).fetchnumpy(), parts.execute(query).fetchnumpy()
    assert np.array_equal(b["__row"], np.arange(1, len(a["__row"]) + 1))
    assert np.array_equal(a["event_id"], b["event_id"])


def test_problems_cite_the_row_across_parts(tiny_world: Path, tmp_path: Path) -> None:
    users = pq.read_table(tiny_world / "users.parquet")
    ages = users.column("age").to_numpy().copy()
    ages[1_500] = -4  # in the third of three parts
    users = users.set_column(users.schema.get_field_index("age"), "age", pa.array(ages))
    out = tmp_path / "w"
    out.mkdir()
    for t in ("products", "events"):
        shutil.copy(tiny_world / f"{t}.parquet", out / f"{t}.parquet")
    _split(users, out / "users", 3)
    problem = next(p for p in validate_dataset(out).problems if p.table == "users" and p.column == "age")
    assert problem.count == 1 and problem.examples[0]["row"] == 1_501


def test_duckdb_reads_a_folder_in_place(folder_world: Path, tiny_world: Path) -> None:
    with duckdb.connect() as con:
        n = con.execute(f"SELECT count(*) FROM {scan_sql(find_table(folder_world, 'events'))}").fetchone()
        plan = con.execute(f"EXPLAIN SELECT count(*) FROM {scan_sql(find_table(folder_world, 'events'))}").fetchall()
    assert n is not None and n[0] == pq.ParquetFile(tiny_world / "events.parquet").metadata.num_rows
    assert "PARQUET" in str(plan).upper()  # a scan of the files, not a materialised table


def test_a_table_in_a_file_and_a_folder_is_refused(folder_world: Path, tiny_world: Path) -> None:
    shutil.copy(tiny_world / "users.parquet", folder_world / "users.parquet")
    with pytest.raises(DataError, match="stored more than once") as exc:
        find_table(folder_world, "users")
    assert "users/" in str(exc.value.message) and "users.parquet" in str(exc.value.message)


def test_a_folder_without_parquet_files_is_refused(folder_world: Path) -> None:
    for f in (folder_world / "users").glob("part-*"):
        f.unlink()
    with pytest.raises(DataError, match="holds no Parquet file"):
        validate_dataset(folder_world)
