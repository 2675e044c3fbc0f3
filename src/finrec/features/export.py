"""`finrec features`: the event-log feature tables at a cutoff, keyed by id, from either engine.

One Parquet table per definition of :mod:`finrec.features.queries` (with the shared float arithmetic applied):
``behaviour`` (per customer), ``holdings``, ``category_engagement``, ``pair_history`` and ``history`` (per
customer and product), ``demand`` (per product). Customers are keyed by ``user_id`` and products by
``product_id``, so the tables of two engines compare row for row, and a bank can read them with any tool.
With DuckDB each table is one file; with Spark a folder of part files, written by the workers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finrec.artifacts import atomic_dir, write_manifest
from finrec.config import FinrecSettings

TABLES = ("behaviour", "holdings", "category_engagement", "pair_history", "history", "demand")


def export_features(data: Path, out: Path, settings: FinrecSettings, cutoff: int | None = None,
                    engine: str = "duckdb", overwrite: bool = False,
                    dedupe: bool = False) -> dict[str, Any]:  # fmt: skip
    """Write the tables at ``cutoff`` (default: just after the last event) to ``out``; returns the manifest."""
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if engine == "spark":
            counts, cutoff = _spark(data, tmp, settings, cutoff, dedupe)
        else:
            counts, cutoff = _duckdb(data, tmp, settings, cutoff)
        return write_manifest(tmp, "features", config={"engine": engine, "cutoff": int(cutoff)},
                              inputs={"data": str(Path(data).resolve())},
                              metrics={"rows": counts, "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip


def _duckdb(data: Path, out: Path, settings: FinrecSettings, cutoff: int | None) -> tuple[dict[str, int], int]:
    from finrec.data.dataset import load_dataset
    from finrec.features import queries as Q
    from finrec.features.builder import FeatureBuilder

    ds = load_dataset(data, future_tolerance_seconds=settings.validation.future_tolerance_seconds)
    cutoff = ds.time_range[1] + 1 if cutoff is None else int(cutoff)
    b = FeatureBuilder(ds, settings.protected_attributes)
    uid = ds.users["user_id"].to_numpy()
    pid = ds.products["product_id"].to_numpy()

    def behaviour() -> pd.DataFrame:
        active = np.unique(ds.events.user[ds.events.ts < cutoff])
        frame = b._user_behaviour(cutoff).iloc[active].reset_index(drop=True)
        frame.insert(0, "user_id", uid[active])
        return frame

    def holdings() -> pd.DataFrame:
        held = b.con.execute(f"{Q.holdings_sql(cutoff)} ORDER BY 1, 2").df()
        return pd.DataFrame({"user_id": uid[held["user"]], "product_id": pid[held["product"]]})

    def category_engagement() -> pd.DataFrame:
        engaged = b.con.execute(f"{Q.category_engagement_sql(cutoff)} ORDER BY 1, 2").df()
        return pd.DataFrame({"user_id": uid[engaged["u"]], "category": engaged["c"], "n": engaged["n"]})

    def pair_history() -> Iterator[pd.DataFrame]:  # the largest table: written in pieces
        for users, products, pair in b.pair_history_chunks(cutoff):
            yield pd.concat([pd.DataFrame({"user_id": uid[users], "product_id": pid[products]}), pair], axis=1)

    def history() -> pd.DataFrame:
        hist = b.con.execute(f"{Q.history_sql(cutoff, settings.train.history_length)} ORDER BY u, r").df()
        return pd.DataFrame({"user_id": uid[hist["u"]], "product_id": pid[hist["p"]], "rank": hist["r"]})

    def demand() -> pd.DataFrame:
        return pd.concat([pd.DataFrame({"product_id": pid}), b.catalogue_stats(cutoff)], axis=1)

    # One table at a time, written and let go before the next: the peak is the largest table (the pair history),
    # not the six together.
    counts = {}
    for name, table in (("behaviour", behaviour), ("holdings", holdings), ("category_engagement", category_engagement),
                        ("pair_history", pair_history), ("history", history), ("demand", demand)):  # fmt: skip
        result = table()
        if isinstance(result, pd.DataFrame):
            result.to_parquet(out / f"{name}.parquet", index=False)
            counts[name] = len(result)
        else:
            counts[name] = _write_pieces(result, out / f"{name}.parquet")
        del result
    return counts, cutoff


def _write_pieces(pieces: Iterator[pd.DataFrame], path: Path) -> int:
    """Frames of one schema (at least one, empty or not) into one Parquet file; the rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, n = None, 0
    try:
        for frame in pieces:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            n += len(frame)
    finally:
        if writer is not None:
            writer.close()
    return n


def _spark(data: Path, out: Path, settings: FinrecSettings, cutoff: int | None,
           dedupe: bool) -> tuple[dict[str, int], int]:  # fmt: skip
    from pyspark.sql import functions as F

    from finrec.data.dataset import load_table
    from finrec.engine.batch import catalogue_stats
    from finrec.engine.spark import spark_session
    from finrec.features.spark import SparkEventTables

    spark = spark_session(settings.engine)
    tables = SparkEventTables(spark, data, dedupe=dedupe)
    try:
        if cutoff is None:
            cutoff, _ = tables.span()
        products, _ = load_table(data, "products")
        pid = spark.createDataFrame(pd.DataFrame({"product": np.arange(len(products), dtype=np.int32),
                                                  "product_id": products["product_id"].astype(str)}))  # fmt: skip

        def keyed(df: Any) -> Any:  # product rows as product ids, as the DuckDB tables have them
            return df.join(F.broadcast(pid), "product").drop("product")

        frames = {
            "behaviour": tables.user_behaviour(cutoff),
            "holdings": keyed(tables.holdings(cutoff)),
            "category_engagement": tables.category_engagement(cutoff).withColumnRenamed("c", "category"),
            "pair_history": keyed(tables.pair_history(cutoff)),
            "history": keyed(tables.history(cutoff, settings.train.history_length)).withColumnRenamed("r", "rank"),
        }
        counts = {}
        for name, df in frames.items():
            df.write.parquet(str(out / name))
            counts[name] = spark.read.parquet(str(out / name)).count()
        demand = pd.concat([pd.DataFrame({"product_id": products["product_id"].astype(str)}),
                            catalogue_stats(tables, cutoff)], axis=1)  # fmt: skip
        demand.to_parquet(out / "demand.parquet", index=False)
        counts["demand"] = len(demand)
    finally:
        tables.close()
    return counts, int(cutoff)
