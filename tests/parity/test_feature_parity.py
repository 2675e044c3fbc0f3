"""The event-log tables on Spark equal DuckDB's, bit for bit: one definition, two engines.

Both engines run the queries of ``finrec.features.queries`` (Spark after sqlglot's translation) on the same
world, with CSV and Parquet tables; every count is equal and every float bitwise equal (the float arithmetic is
shared numpy code after exact queries). Spark keys customers by id, DuckDB by dense row: the DuckDB side is mapped
to ids before comparing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finrec.data.dataset import Dataset, load_dataset
from finrec.data.synthetic.generate import WorldConfig, generate_world
from finrec.features.builder import FeatureBuilder

pytestmark = [pytest.mark.spark, pytest.mark.slow]

DAY = 86_400


@pytest.fixture(scope="module", params=["parts", "csv"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV world, and a Parquet one whose events are a folder of part files (as Spark writes a table): the
    log's order runs across the parts, in name order, for both engines."""
    out = tmp_path_factory.mktemp("parity") / f"w-{request.param}"
    fmt = "csv" if request.param == "csv" else "parquet"
    generate_world(WorldConfig(users=1500, products=30, months=4, seed=11, format=fmt), out, progress=False)
    if request.param == "parts":
        import pyarrow.parquet as pq

        events = pq.read_table(out / "events.parquet")
        (out / "events.parquet").unlink()
        (out / "events").mkdir()
        third = events.num_rows // 3
        for i, (a, b) in enumerate([(0, third), (third, 2 * third), (2 * third, events.num_rows)]):
            pq.write_table(events.slice(a, b - a), out / "events" / f"part-{i:05d}.parquet")
    return out


@pytest.fixture(scope="module")
def engines(world: Path, spark: object) -> tuple[Dataset, FeatureBuilder, object]:
    from finrec.features.spark import SparkEventTables

    ds = load_dataset(world)
    tables = SparkEventTables(spark, world)  # type: ignore[arg-type]
    yield ds, FeatureBuilder(ds, ["gender"]), tables
    tables.close()


def _cutoffs(ds: Dataset) -> list[int]:
    first, last = ds.time_range
    return [first + 45 * DAY, last + 1]


def _keyed(ds: Dataset, df: pd.DataFrame, user_col: str) -> pd.DataFrame:
    out = df.copy()
    out.insert(0, "user_id", ds.users["user_id"].to_numpy()[df[user_col].to_numpy()])
    return out.drop(columns=[user_col])


def _same(duck: pd.DataFrame, spark: pd.DataFrame, keys: list[str]) -> None:
    duck = duck.sort_values(keys).reset_index(drop=True)
    spark = spark[list(duck.columns)].sort_values(keys).reset_index(drop=True)
    assert len(duck) == len(spark) > 0
    for c in duck.columns:
        a, b = duck[c].to_numpy(), spark[c].to_numpy()
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            # bitwise: the same float64 bits, NaN where NaN
            assert np.array_equal(a.astype(np.float64).view(np.int64), b.astype(np.float64).view(np.int64)), c
        else:
            assert np.array_equal(a.astype(str) if a.dtype == object else a.astype(np.int64),
                                  b.astype(str) if b.dtype == object else b.astype(np.int64)), c  # fmt: skip


def test_customer_behaviour_is_bitwise_equal(engines: tuple) -> None:
    ds, builder, tables = engines
    for cutoff in _cutoffs(ds):
        full = builder._user_behaviour(cutoff)
        active = np.unique(ds.events.user[ds.events.ts < cutoff])  # Spark has a row per customer with events
        duck = full.iloc[active].reset_index(drop=True)
        duck.insert(0, "user_id", ds.users["user_id"].to_numpy()[active])
        _same(duck, tables.user_behaviour(cutoff).toPandas(), ["user_id"])


def test_holdings_and_category_engagement_are_equal(engines: tuple) -> None:
    ds, builder, tables = engines
    for cutoff in _cutoffs(ds):
        snap = builder.snapshot(cutoff)
        _same(_keyed(ds, snap.held, "user"), tables.holdings(cutoff).toPandas(), ["user_id", "product"])
        from finrec.features import queries as Q

        duck = builder.con.execute(Q.category_engagement_sql(cutoff)).df()
        _same(_keyed(ds, duck, "u"), tables.category_engagement(cutoff).toPandas(), ["user_id", "c"])


def test_product_demand_is_bitwise_equal(engines: tuple) -> None:
    ds, builder, tables = engines
    for cutoff in _cutoffs(ds):
        duck = builder._product_demand(cutoff).reset_index(names="p")
        _same(duck, tables.product_demand(cutoff).reset_index(names="p"), ["p"])


def test_pair_history_is_bitwise_equal(engines: tuple) -> None:
    ds, builder, tables = engines
    for cutoff in _cutoffs(ds):
        users, products, feats = builder.pair_history_table(cutoff)
        duck = feats.copy()
        duck.insert(0, "product", products)
        duck.insert(0, "user_id", ds.users["user_id"].to_numpy()[users])
        _same(duck, tables.pair_history(cutoff).toPandas(), ["user_id", "product"])


def test_labels_shown_and_histories_are_equal(engines: tuple) -> None:
    ds, builder, tables = engines
    grades = {"impression": 0, "click": 2, "apply": 3, "approve": 4, "hold": 1}
    for cutoff in _cutoffs(ds):
        start = cutoff - 30 * DAY
        _same(_keyed(ds, builder.labels(start, cutoff, grades), "user"),
              tables.labels(start, cutoff, grades).toPandas(), ["user_id", "product"])  # fmt: skip
        _same(_keyed(ds, builder.shown(start, cutoff), "user"), tables.shown(start, cutoff).toPandas(),
              ["user_id", "product"])  # fmt: skip
        hist = builder.history(cutoff, 5)
        u, r = np.nonzero(hist >= 0)
        duck = pd.DataFrame({"user_id": ds.users["user_id"].to_numpy()[u], "product": hist[u, r], "r": r + 1})
        _same(duck, tables.history(cutoff, 5).toPandas(), ["user_id", "r"])


def test_finrec_features_writes_the_same_tables_from_both_engines(spark: object, tiny_world: Path,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    from finrec.config import EngineSettings, FinrecSettings
    from finrec.features.export import TABLES, export_features

    s = FinrecSettings(engine=EngineSettings(spark_partitions=4))
    cutoff = int(load_dataset(tiny_world).time_range[1]) + 1 - 10 * DAY
    a = export_features(tiny_world, tmp_path / "duckdb", s, cutoff, engine="duckdb")
    b = export_features(tiny_world, tmp_path / "spark", s, cutoff, engine="spark")
    assert a["metrics"]["rows"] == b["metrics"]["rows"] and a["config"]["cutoff"] == b["config"]["cutoff"] == cutoff
    keys = {"behaviour": ["user_id"], "holdings": ["user_id", "product_id"], "demand": ["product_id"],
            "category_engagement": ["user_id", "category"], "pair_history": ["user_id", "product_id"],
            "history": ["user_id", "rank"]}  # fmt: skip
    for name in TABLES:
        duck = pd.read_parquet(tmp_path / "duckdb" / f"{name}.parquet")
        spark_path = tmp_path / "spark" / name
        other = pd.read_parquet(spark_path if spark_path.is_dir() else tmp_path / "spark" / f"{name}.parquet")
        _same(duck, other, keys[name])


def test_a_log_larger_than_the_partitions_hold_gets_more_partitions_and_the_same_tables(world: Path,
                                                                                       spark: object) -> None:
    """`[engine] spark_events_per_partition` bounds a task's share of the log: past it the log and the session's
    shuffles get one partition per that many events (never fewer than configured), and the tables do not change."""
    from finrec.engine.spark import EVENTS_PER_PARTITION_KEY
    from finrec.features.spark import SparkEventTables

    conf = spark.conf  # type: ignore[attr-defined]
    configured = int(conf.get("spark.sql.shuffle.partitions"))
    ds = load_dataset(world)
    per_partition = len(ds.events) // (3 * configured) + 1  # about three times the configured partitions
    conf.set(EVENTS_PER_PARTITION_KEY, str(per_partition))
    try:
        tables = SparkEventTables(spark, world)  # type: ignore[arg-type]
        try:
            want = -(-len(ds.events) // per_partition)
            assert tables.partitions == want > configured
            assert tables.ev.rdd.getNumPartitions() == want
            assert int(conf.get("spark.sql.shuffle.partitions")) == want
            cutoff = ds.time_range[1] + 1
            builder = FeatureBuilder(ds, ["gender"])
            duck = builder._user_behaviour(cutoff)
            active = np.unique(ds.events.user)
            duck = duck.iloc[active].reset_index(drop=True)
            duck.insert(0, "user_id", ds.users["user_id"].to_numpy()[active])
            _same(duck, tables.user_behaviour(cutoff).toPandas(), ["user_id"])
        finally:
            tables.close()
        conf.set("spark.sql.shuffle.partitions", str(configured))
        conf.set(EVENTS_PER_PARTITION_KEY, str(10**8))  # a log far below it keeps the configured count
        small = SparkEventTables(spark, world)  # type: ignore[arg-type]
        assert small.partitions == configured == int(conf.get("spark.sql.shuffle.partitions"))
        small.close()
    finally:
        conf.set("spark.sql.shuffle.partitions", str(configured))
        conf.unset(EVENTS_PER_PARTITION_KEY)
