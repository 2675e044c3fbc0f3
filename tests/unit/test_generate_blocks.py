"""The generator's blocks: each a pure function of (config, block id), together the sequential world.

What lets Spark make blocks in parallel (tests/parity holds the two engines equal) is checked here without Spark:
blocks made in any order, their ids shifted by prefix sums of their counts, give the embedded generator's files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finrec.data.synthetic import generate as G
from finrec.data.synthetic.generate import WorldConfig, generate_block, generate_world, n_blocks, prepare_world
from finrec.data.synthetic.tables import offset_events
from finrec.data.synthetic.truth import GroundTruth, save_users_part, save_world
from finrec.errors import FinrecError

WORLD = WorldConfig(users=2_000, products=20, months=2, seed=4, drift_month=2)


@pytest.fixture()
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Blocks of 700 customers, so a 2k world has three (the last one short)."""
    monkeypatch.setattr(G, "BLOCK_SIZE", 700)
    return 700


def test_blocks_in_any_order_make_the_sequential_world(small_blocks: int, tmp_path: Path) -> None:
    generate_world(WORLD, tmp_path / "w", progress=False)
    world = prepare_world(WORLD)
    blocks = {b: generate_block(WORLD, world, b) for b in reversed(range(n_blocks(WORLD)))}
    assert len(blocks) == 3 and blocks[2].users.num_rows == 2_000 - 2 * small_blocks

    event_offset = request_offset = 1
    users, events = [], []
    for b in range(len(blocks)):
        users.append(blocks[b].users)
        events.append(offset_events(blocks[b].events, event_offset, request_offset))
        event_offset += blocks[b].events.num_rows
        request_offset += blocks[b].n_requests
    assert pa.concat_tables(users).equals(pq.read_table(tmp_path / "w" / "users.parquet"))
    written = pq.read_table(tmp_path / "w" / "events.parquet")
    assert pa.concat_tables(events).cast(written.schema).equals(written)
    ids = written.column("event_id").to_numpy()
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # contiguous across blocks
    requests = pd.unique(written.column("request_id").drop_null().to_numpy())
    assert np.array_equal(np.sort(requests), np.arange(1, request_offset))


def test_a_block_depends_on_nothing_but_its_arguments() -> None:
    world = prepare_world(WORLD)
    later = generate_block(WORLD, world, 0)
    generate_block(WORLD, prepare_world(WORLD), 0)  # another world object, another call in between
    again = generate_block(WORLD, world, 0)
    assert later.users.equals(again.users) and later.events.equals(again.events)
    assert later.counts == again.counts and later.counts["users"] == WORLD.users


def test_ground_truth_is_written_per_block_and_loads_whole(small_blocks: int, tmp_path: Path) -> None:
    generate_world(WORLD, tmp_path / "w", progress=False)
    parts = sorted((tmp_path / "w" / "ground_truth" / "users").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    truth = GroundTruth.load(tmp_path / "w" / "ground_truth")
    assert np.array_equal(truth.users["user_id"], np.arange(1, 2_001))


def test_both_ground_truth_layouts_load_the_same(tmp_path: Path) -> None:
    generate_world(WORLD, tmp_path / "w", progress=False)
    truth = GroundTruth.load(tmp_path / "w" / "ground_truth")
    truth.save(tmp_path / "one_file")  # every customer in users.parquet
    save_world(tmp_path / "parts", truth.products, truth.info, truth.coef)
    half = truth.n_users // 2
    for part, rows in ((1, slice(half, None)), (0, slice(0, half))):  # parts may come in any order
        save_users_part(tmp_path / "parts", part, {k: v[rows] for k, v in truth.users.items()})
    one, parts = GroundTruth.load(tmp_path / "one_file"), GroundTruth.load(tmp_path / "parts")
    assert one.users_frame().equals(truth.users_frame()) and parts.users_frame().equals(truth.users_frame())
    assert parts.products_frame().equals(truth.products_frame())
    p = parts.propensity(user_ids=[1, 2_000], product_ids=[3, 4])
    assert np.array_equal(p, truth.propensity(user_ids=[1, 2_000], product_ids=[3, 4]))


def test_spark_engine_refuses_csv_before_starting() -> None:
    from finrec.data.synthetic.spark import check_for_spark

    with pytest.raises(FinrecError, match="Parquet only") as exc:
        check_for_spark(WorldConfig(users=10, products=12, months=1, format="csv"))
    assert exc.value.hint is not None and "--engine duckdb" in exc.value.hint


def test_engine_spark_without_pyspark_is_a_clear_error(tmp_path: Path) -> None:
    """Without PySpark, `finrec generate --engine spark` says what to install, with no traceback."""
    hide = (
        "import sys, runpy; sys.modules['pyspark'] = None; sys.argv = ['finrec', *sys.argv[1:]]; "
        "runpy.run_module('finrec', run_name='__main__')"
    )
    res = subprocess.run(
        [sys.executable, "-c", hide, "generate", "--engine", "spark", "--users", "10", "--products", "12",
         "--months", "1", "--out", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=120, env=_env() | {"COLUMNS": "200"},
    )  # fmt: skip
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in text, text
    assert "needs PySpark" in text and "finrec[spark]" in text
    assert not (tmp_path / "w").exists()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FINREC_")}
