"""The event-log tables on Apache Spark: the queries of :mod:`finrec.features.queries`, translated by sqlglot.

:class:`SparkEventTables` reads a dataset folder with Spark and gives the same tables as
:class:`~finrec.features.builder.FeatureBuilder`, as Spark DataFrames keyed by ``user_id`` (text) and the
product's row in the catalogue: nothing the size of the customer base comes to the driver. Three steps make the
two engines agree to the bit (``tests/parity/test_feature_parity.py``):

* Values are typed by the embedded reader's own SQL (:func:`~finrec.data.dataset.event_columns_sql`), run by
  DuckDB on each Arrow batch of the events inside Spark's tasks, so a timestamp or an id reads the same way.
* The log's total order (time, then place in the files) is ``i = (ts, file, row in file)``; the catalogue is
  the embedded reader's, broadcast.
* The queries return exact values only (counts, integer times); the float arithmetic after them is the shared
  numpy code, run on each Arrow batch (:func:`~finrec.features.queries.behaviour_features` and friends).

PySpark and sqlglot are imported here only: ``pip install 'finrec[spark]'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from finrec.data.contract import EVENT_TYPES
from finrec.data.dataset import ETYPE, load_table
from finrec.data.io import find_table
from finrec.data.layout import table_files
from finrec.errors import FinrecError
from finrec.features import queries as Q

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession


@cache
def spark_sql(duckdb_sql: str) -> str:
    """A query of :mod:`finrec.features.queries` in Spark's dialect."""
    try:
        import sqlglot
    except ImportError:
        from finrec.engine.spark import INSTALL_HINT

        raise FinrecError("the Spark engine needs sqlglot, which is not installed", hint=INSTALL_HINT) from None
    return str(sqlglot.transpile(duckdb_sql, read="duckdb", write="spark")[0])


def _typed_events(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Raw event rows to (u, pid, e, ts, pos, file, row[, event_id]) with the embedded reader's typing.

    Runs in Spark's Python workers, one DuckDB connection per task.
    """
    import duckdb

    from finrec.data.dataset import event_columns_sql
    from finrec.data.io import column_types

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        for batch in batches:
            con.register("events", pa.Table.from_batches([batch]))
            cols = event_columns_sql(column_types(con, "events"))
            select = [f"{cols['user_id']} AS u", f"{cols['product_id']} AS pid", f"{cols['etype']} AS e",
                      f"{cols['ts']} AS ts", f"{cols['position']} AS pos", "__file AS file",
                      "__row AS row"]  # fmt: skip
            if "event_id" in cols:
                select.append(f"{cols['event_id']} AS event_id")
            yield from con.sql(f"SELECT {', '.join(select)} FROM events").to_arrow_table().to_batches()
            con.unregister("events")
    finally:
        con.close()


def _read_raw(spark: SparkSession, path: Path) -> DataFrame:
    """A table file with its place in the files: ``__file`` (the file's rank in name order, from 1) and ``__row``
    (0-based row in the file). A number rather than the name: Spark keeps the typed log, and a name on every event
    is some 50 bytes of it."""
    from pyspark.sql import functions as F

    if path.is_dir() or path.name.endswith(".parquet"):  # one file, or a folder of part files (data/layout.py)
        df = spark.read.parquet(*(str(p) for p in table_files(path)))
        names = F.array(*(F.lit(p.name) for p in table_files(path)))  # name order, as table_files gives them
        place = F.array_position(names, F.col("_metadata.file_name")).cast("int")
        return df.select("*", place.alias("__file"), F.col("_metadata.row_index").alias("__row"))
    # CSV: read as text, as the embedded reader does. Spark splits a plain file by byte ranges in file order and
    # cannot split a gzipped one, so the monotonically increasing id follows the file's row order.
    df = spark.read.option("header", True).option("inferSchema", False).option("mode", "FAILFAST").csv(str(path))
    return df.select("*", F.lit(1).alias("__file"), F.monotonically_increasing_id().alias("__row"))


class SparkEventTables:
    """The tables the features, labels and histories read, computed by Spark from a dataset folder.

    Parameters
    ----------
    spark
        A session (:func:`finrec.engine.spark.spark_session`).
    data
        A dataset folder in the data contract, validated beforehand (``finrec validate``): Spark does not
        validate, and rows the validator refuses (unknown ids) would be dropped here silently.
    dedupe
        Keep only the first event of each repeated ``event_id`` (the validator's ``duplicate_event_id`` warning).
    """

    def __init__(self, spark: SparkSession, data: Path, *, dedupe: bool = False) -> None:
        from pyspark import StorageLevel
        from pyspark.sql import Window
        from pyspark.sql import functions as F
        from pyspark.sql import types as T

        self.spark = spark
        self.data = Path(data)
        products, _ = load_table(self.data, "products")
        self.n_products = len(products)
        if "category" in products.columns:
            cats = pd.Categorical(products["category"].fillna("(none)").astype(str))
            category_codes = cats.codes.astype(np.int64)
        else:
            category_codes = np.full(len(products), -1, dtype=np.int64)
        catalogue = spark.createDataFrame(
            pd.DataFrame({"pid": products["product_id"].astype(str), "p": np.arange(len(products), dtype=np.int32),
                          "c": category_codes})  # fmt: skip
        )
        raw = _read_raw(spark, find_table(self.data, "events"))
        schema = T.StructType([
            T.StructField("u", T.StringType()), T.StructField("pid", T.StringType()),
            T.StructField("e", T.ByteType()), T.StructField("ts", T.LongType()), T.StructField("pos", T.ShortType()),
            T.StructField("file", T.IntegerType()), T.StructField("row", T.LongType()),
        ] + ([T.StructField("event_id", T.StringType())] if "event_id" in raw.columns else []))  # fmt: skip
        typed = raw.mapInArrow(_typed_events, schema)
        if dedupe and "event_id" in raw.columns:
            first = Window.partitionBy("event_id").orderBy("file", "row")
            typed = typed.withColumn("_n", F.row_number().over(first)).where("_n = 1").drop("_n")
        ev = typed.join(F.broadcast(catalogue.select("pid", "p")), "pid").select(
            "u", "p", "e", "ts", "pos", F.struct("ts", "file", "row").alias("i")
        )
        # Every table reads the typed log: type it once, hashed by customer into pieces of a bounded number of
        # events (log_partitions). A task's share of the log (its sort and hash buffers) then follows the events per
        # piece, not the file splits: with the splits (4 at 1M customers, 8 at 2M) a task held an eighth of the log,
        # and 2M customers ran out of a 4 GB heap. The pieces are kept on local disk, not in the heap: cached in
        # memory (MEMORY_AND_DISK), 4M customers' log ran a 4 GB driver out of heap while caching, with 200 pieces
        # and again with 514. On disk the heap holds the pieces being read and the disk the log (about 30 bytes an
        # event); reading it back costs far less than typing it again.
        self.partitions = parts = log_partitions(spark, raw)
        self.ev = ev.repartition(parts, "u").persist(StorageLevel.DISK_ONLY)
        self.ev.createOrReplaceTempView("ev")
        catalogue.select("p", "c").createOrReplaceTempView("pcat")

    def close(self) -> None:
        """Release the typed log Spark keeps (the raised shuffle partitions stay: a session serves one command)."""
        self.ev.unpersist()

    def span(self) -> tuple[int, int]:
        """(cutoff just after the last event, number of events), in one pass; a FinrecError without events."""
        from pyspark.sql import functions as F

        last = self.ev.agg(F.max("ts"), F.count(F.lit(1))).first()
        if last is None or last[0] is None:
            raise FinrecError(f"{self.data} has no events", hint="features are computed at the data's last event")
        return int(last[0]) + 1, int(last[1])

    def query(self, duckdb_sql: str) -> DataFrame:
        """Run one of the shared queries (DuckDB dialect) on Spark."""
        return self.spark.sql(spark_sql(duckdb_sql))

    # -- the tables, keyed by user_id -------------------------------------------------------------------------
    def user_behaviour(self, cutoff: int) -> DataFrame:
        """Behaviour features of each customer with events before ``cutoff`` (``user_id`` + the feature columns)."""
        from pyspark.sql import types as T

        names = [*Q.behaviour_columns(), "days_since_last_event", "days_since_last_click"]
        schema = T.StructType([T.StructField("user_id", T.StringType())]
                              + [T.StructField(c, T.DoubleType()) for c in names])  # fmt: skip

        def features(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                cols = {c: _float(b.column(c)) for c in b.schema.names if c != "u"}
                out = Q.behaviour_features(cutoff, cols)
                yield pa.RecordBatch.from_arrays([b.column("u"), *(pa.array(out[c]) for c in names)],
                                                 names=["user_id", *names])  # fmt: skip

        return self.query(Q.user_behaviour_sql(cutoff)).mapInArrow(features, schema)

    def holdings(self, cutoff: int) -> DataFrame:
        """(user_id, product) held at ``cutoff``."""
        return self.query(Q.holdings_sql(cutoff)).withColumnRenamed("user", "user_id")

    def category_engagement(self, cutoff: int) -> DataFrame:
        """(user_id, category code, engaged events) before ``cutoff``."""
        return self.query(Q.category_engagement_sql(cutoff)).withColumnRenamed("u", "user_id")

    def product_demand(self, cutoff: int) -> pd.DataFrame:
        """Demand features of every product (one row per catalogue row): a table the size of the catalogue."""
        df = pd.DataFrame(self.query(Q.product_demand_sql(cutoff)).toPandas())
        raw = {c: np.zeros(self.n_products) for c in df.columns if c != "p"}
        rows = df["p"].to_numpy()
        for c in raw:
            raw[c][rows] = df[c].to_numpy(np.float64)
        return pd.DataFrame(Q.demand_features(raw, self.n_products), index=pd.RangeIndex(self.n_products))

    def pair_history(self, cutoff: int) -> DataFrame:
        """Every (user_id, product) with events before ``cutoff`` and its ``pair_*`` features."""
        from pyspark.sql import types as T

        names = [f"pair_{c}" for c in Q.PAIR_HISTORY_COUNTS] + ["pair_days_since_seen"]
        schema = T.StructType([T.StructField("user_id", T.StringType()), T.StructField("product", T.IntegerType())]
                              + [T.StructField(c, T.DoubleType()) for c in names])  # fmt: skip

        def features(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for b in batches:
                cols = {c: _float(b.column(c)) for c in (*Q.PAIR_HISTORY_COUNTS, "last_seen_ts")}
                out = Q.pair_history_features(cutoff, cols)
                yield pa.RecordBatch.from_arrays([b.column("u"), b.column("p"), *(pa.array(out[c]) for c in names)],
                                                 names=["user_id", "product", *names])  # fmt: skip

        return self.query(Q.pair_history_sql(cutoff)).mapInArrow(features, schema)

    def labels(self, start: int, end: int, grades: dict[str, int]) -> DataFrame:
        """(user_id, product, grade): highest positive grade in ``[start, end)``."""
        grade_of = [int(grades.get(t, 0)) for t in EVENT_TYPES]
        self.spark.createDataFrame(
            pd.DataFrame({"e": np.arange(len(ETYPE), dtype=np.int8), "g": np.asarray(grade_of, dtype=np.int64)})
        ).createOrReplaceTempView("grades")
        return self.query(Q.labels_sql(start, end)).withColumnRenamed("user", "user_id")

    def shown(self, start: int, end: int) -> DataFrame:
        """(user_id, product, best position) shown in ``[start, end)``."""
        return self.query(Q.shown_sql(start, end)).withColumnRenamed("user", "user_id")

    def history(self, cutoff: int, length: int) -> DataFrame:
        """(user_id, product, rank from 1): each customer's most recently engaged distinct products."""
        return self.query(Q.history_sql(cutoff, length)).withColumnRenamed("u", "user_id").withColumnRenamed(
            "p", "product"
        )


def _float(col: Any) -> np.ndarray:
    """An Arrow column as float64 with NaN for nulls."""
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def log_partitions(spark: SparkSession, raw: DataFrame) -> int:
    """Partitions of the typed log: the session's shuffle partitions, raised to one per
    ``[engine] spark_events_per_partition`` events when the log is larger (and the session's shuffles with them).

    What a task holds while it caches its piece of the log, or aggregates it, follows the events per partition:
    a fixed count of partitions let 4M customers (1.3M events a piece) run a 4 GB driver out of heap where 2M
    (650,000) fitted. Counting the rows reads the Parquet footers only (a pass over CSV files).
    """
    from finrec.engine.spark import DEFAULT_EVENTS_PER_PARTITION, EVENTS_PER_PARTITION_KEY

    configured = int(spark.conf.get("spark.sql.shuffle.partitions") or 200)
    per_partition = int(spark.conf.get(EVENTS_PER_PARTITION_KEY, None) or DEFAULT_EVENTS_PER_PARTITION)
    needed = -(-raw.count() // per_partition)
    if needed <= configured:
        return configured
    spark.conf.set("spark.sql.shuffle.partitions", str(needed))  # the aggregations' shuffles split as finely
    return needed
