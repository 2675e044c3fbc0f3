"""`finrec recommend --engine spark`: batch recommendations over customer partitions, on any number of machines.

Customers are hashed into buckets of about :data:`CUSTOMERS_PER_BUCKET`. Each bucket's task gets its customers'
raw rows and typed events (``cogroup``), builds the partition's dataset (:mod:`finrec.features.partition`) and
runs the embedded batch path on it (:func:`finrec.pipeline.recommend_rows`) with the model bundle shipped to the
workers (``SparkContext.addFile``) and the catalogue's statistics computed once over every event and broadcast.
So a Spark run and an embedded one give the same recommendations for the same bundle
(``tests/parity/test_batch_parity.py``), and no task or the driver ever holds every customer.

Output: a folder of Parquet (or CSV) part files at ``--output``, as Spark writes; ids as text (the contract's
type: an embedded run writes integers when every id is one).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from finrec.config import FinrecSettings
from finrec.data.dataset import load_table
from finrec.data.io import find_table
from finrec.errors import FinrecError
from finrec.features import queries as Q

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

    from finrec.features.spark import SparkEventTables
    from finrec.twostage.model import TwoStageModel

#: Customers a task scores at once: bounds a worker's memory (about 1 GB at the default 300 products).
CUSTOMERS_PER_BUCKET = 20_000
OUTPUT_SCHEMA = "user_id string, rank long, product_id string, score double"


def catalogue_stats(tables: SparkEventTables, cutoff: int) -> pd.DataFrame:
    """The catalogue's demand, conversion and share of holders at ``cutoff``, over every customer (small)."""
    out = tables.product_demand(cutoff)
    held = tables.holdings(cutoff)
    counts = pd.DataFrame(held.groupBy("product").count().toPandas())
    n_holding = held.select("user_id").distinct().count()
    holders = np.zeros(tables.n_products)
    holders[counts["product"].to_numpy(np.int64)] = counts["count"].to_numpy(np.float64)
    out["holders"] = Q.holder_share(holders, n_holding)
    return out


#: Rows one collect to the driver brings at most: Spark refuses results over spark.driver.maxResultSize (1 GB by
#: default), and 4M customers' positive events were 1.03 GB in one collect.
PAIRS_PER_COLLECT = 5_000_000
USERS_PER_COLLECT = 1_000_000


def sources_at(tables: SparkEventTables, model: TwoStageModel, users: DataFrame, products: pd.DataFrame,
               cutoff: int, n_before: int | None = None) -> Any:  # fmt: skip
    """The model's candidate sources fitted at ``cutoff`` on every customer: the bundle's own when it was fitted
    there on the same events (the usual case: recommending at the end of the training data), else refitted on
    the driver from every customer's positives before ``cutoff``. ``n_before``: the events before ``cutoff`` when
    the caller has counted them (:meth:`SparkEventTables.span` does at the end of the data), else counted here.

    Spark counts the positives per (customer, product) pair (first time, positives in the recent window), numbers
    the customers with a positive and types their segment (the one profile column the sources read) on the
    workers. The driver receives integers only, in pieces of a bounded size: a row of four numbers per positive
    pair and of two per customer with a positive (at 10M customers the text ids and whole profile rows it used to
    receive were 13.8 GB).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from finrec.candidates.interactions import DAY, RECENT_DAYS, Interactions, grade_table
    from finrec.data.dataset import ETYPE

    if model.sources is None:
        return None
    cfg = model.config
    if n_before is None:
        n_before = tables.ev.where(F.col("ts") < cutoff).count()
    if cfg.sources_fitted_at(cutoff, n_before):
        return model.sources
    grade = grade_table(cfg.grades)
    codes = [int(c) for c in range(len(grade)) if grade[c] >= cfg.min_grade and c != ETYPE["close"]]
    recent_from = cutoff - int(RECENT_DAYS * DAY)
    pairs = (
        tables.ev.where((F.col("ts") < cutoff) & F.col("e").isin(codes)).groupBy("u", "p")
        .agg(F.min("ts").alias("first"), F.sum((F.col("ts") >= recent_from).cast("long")).alias("recent"))
        .persist(StorageLevel.DISK_ONLY)
    )  # fmt: skip
    segment = _segments(model.sources.segment_column, model.sources.segment_vocab)
    who = users.join(pairs.select(F.col("u").alias("uid")).distinct(), "uid", "left_semi").mapInArrow(
        segment, "uid string, place long, seg int"
    )
    try:
        n_pairs = pairs.count()
        # A customer is matched to their pairs by a salted 64-bit hash of their id: the same wherever Spark
        # computes it, so the pairs need no join. Hashes that collide (about 1 in 370,000 at 10M customers) are
        # seen on the driver and drawn again with another salt. Rows follow the users table's order, as the
        # embedded engine's do: a source that samples by row (transitions, past 300,000 additions) then draws the
        # same sample.
        for salt in range(_SALTS):
            numbered = who.select(F.xxhash64(F.lit(salt), "uid").alias("row"), "place", "seg").persist(
                StorageLevel.DISK_ONLY
            )
            try:
                n_who = numbered.count()
                pieces = max(1, -(-n_pairs // PAIRS_PER_COLLECT), -(-n_who // USERS_PER_COLLECT))
                customers = _collect(numbered, pieces)
            finally:
                numbered.unpersist()
            number = customers.column("row").to_numpy()
            by_hash = np.argsort(number, kind="stable")
            number = number[by_hash]
            if not len(number) or (number[1:] != number[:-1]).all():
                break
        else:  # pragma: no cover - three collisions of 64-bit hashes in a row
            raise FinrecError("customer numbers collided with every salt", hint="report this as a bug")
        table = _collect(pairs.select(F.xxhash64(F.lit(salt), "u").alias("row"), "p", "first", "recent"), pieces)
    finally:
        pairs.unpersist()
    hashed = table.column("row").to_numpy()
    found = np.minimum(np.searchsorted(number, hashed), max(0, len(number) - 1))
    orphans = int((number[found] != hashed).sum()) if len(number) else len(hashed)
    if orphans:
        raise FinrecError(
            f"{orphans:,} customer-product pairs of positive events name a customer the users table does not hold",
            hint="validate the data (`finrec validate`): every event's user_id must be a customer",
        )
    order = np.argsort(customers.column("place").to_numpy(), kind="stable")  # rows in the users table's order
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    row = rank[by_hash[found]]
    inter = Interactions.from_pairs(row, table.column("p").to_numpy(), table.column("first").to_numpy(),
                                    table.column("recent").to_numpy(), len(number), len(products), cutoff)  # fmt: skip
    seg = customers.column("seg").to_numpy()[order].astype(np.int64)
    return model.sources.refit(inter, None if model.sources.segment_column is None else seg)


#: Bits of a row's number within its file in a customer's place (a file of up to 2^40 rows).
_ROW_BITS = 40

#: Salts tried for the customers' numbers before giving up (each retry follows a collision of 64-bit hashes).
_SALTS = 3


def _collect(df: DataFrame, pieces: int) -> pa.Table:
    """``df`` on the driver in ``pieces`` collects (split on its integer ``row``), each under Spark's result cap."""
    from pyspark.sql import functions as F

    return pa.concat_tables([df.where(F.pmod(F.col("row"), F.lit(pieces)) == i).toArrow() for i in range(pieces)])


def _segments(column: str | None, vocab: list[str]) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A ``mapInArrow`` function from raw users rows (with ``uid`` and their place in the files) to ``uid``, the
    place as one number (file rank, then row: the embedded reader's order) and the segment's code, typed on the
    worker as the embedded reader types it (-1 unknown; 0 for every row when the sources have no segment)."""

    def to_codes(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from finrec.candidates.source_set import segment_codes
        from finrec.features.partition import typed_users

        for b in batches:
            if column is None:
                seg = np.zeros(b.num_rows, np.int32)
            else:
                typed = typed_users(pa.Table.from_batches([b]).select([n for n in b.schema.names if n != "uid"]))
                seg = segment_codes(typed, column, vocab).astype(np.int32)
            col = b.schema.get_field_index
            place = (b.column(col("__file")).to_numpy(zero_copy_only=False).astype(np.int64) << _ROW_BITS) + b.column(
                col("__row")
            ).to_numpy(zero_copy_only=False).astype(np.int64)
            yield pa.RecordBatch.from_arrays([b.column(col("uid")), pa.array(place), pa.array(seg)],
                                             names=["uid", "place", "seg"])  # fmt: skip

    return to_codes


def _with_uid(raw: DataFrame) -> DataFrame:
    """``raw`` users plus ``uid``: the id as the embedded reader types it (the same SQL, run by DuckDB per batch)."""
    from pyspark.sql.types import StringType, StructField, StructType

    schema = StructType([*raw.schema.fields, StructField("uid", StringType())])  # (StructType.add changes raw's own)

    def typed(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import duckdb

        from finrec.data.io import column_types, id_sql

        con = duckdb.connect()
        try:
            for b in batches:
                con.register("t", pa.Table.from_batches([b]))
                uid = con.sql(f'SELECT {id_sql(chr(34) + "user_id" + chr(34), column_types(con, "t")["user_id"])} '
                              "AS uid FROM t").to_arrow_table().column("uid")  # fmt: skip
                yield pa.RecordBatch.from_arrays([*b.columns, uid.combine_chunks()], names=[*b.schema.names, "uid"])
                con.unregister("t")
        finally:
            con.close()

    return raw.mapInArrow(typed, schema)


@cache
def _bundle(path: str) -> TwoStageModel:
    """The shipped bundle, loaded once per Python worker (checked against its manifest on the driver)."""
    from finrec.twostage.model import TwoStageModel

    return TwoStageModel.load(Path(path))


def _ship(spark: SparkSession, model_dir: Path, version: str) -> tuple[str, Callable[[], str]]:
    """Copy the bundle under a name unique to its version and hand it to Spark; returns (name, worker's path)."""
    name = f"finrec-bundle-{version}".replace("/", "_")
    sc = spark.sparkContext
    # The same version shipped before in this session: its files are on the workers already (Spark refuses a
    # second file of the same name).
    if not any(f.rstrip("/").rsplit("/", 1)[-1] == name for f in sc.listFiles):
        staging = Path(tempfile.mkdtemp(prefix="finrec-ship-"))  # Spark serves the files from here: kept
        shutil.copytree(model_dir, staging / name)
        sc.addFile(str(staging / name), recursive=True)

    def locate() -> str:
        from pyspark import SparkFiles

        return str(SparkFiles.get(name))

    return name, locate


def spark_recommend(spark: SparkSession, model_dir: Path, data: Path, users_file: Path, k: int, output: Path,
                    settings: FinrecSettings, exclude: str = "held",
                    dedupe: bool = False) -> dict[str, Any]:  # fmt: skip
    """Recommend for the listed customers at the end of ``data`` on Spark; writes a folder of part files.

    ``data`` must have been validated (``dedupe``: it repeats event ids, and only the first of each counts).
    """
    from pyspark.sql import functions as F

    from finrec.features.partition import partition_dataset, typed_users
    from finrec.features.spark import SparkEventTables, _read_raw
    from finrec.pipeline import check_recommend_request, load_model, recommend_unknown

    suffix = check_recommend_request(k, exclude, output)
    if not users_file.is_file():
        raise FinrecError(f"users file {users_file} does not exist", hint="pass a text file with one user id per line")
    model, manifest = load_model(model_dir)
    version = str(manifest["metrics"].get("model_version") or manifest.get("created_at") or "bundle")
    products, _ = load_table(data, "products")
    tables = SparkEventTables(spark, data, dedupe=dedupe)
    try:
        cutoff, n_events = tables.span()
        stats = catalogue_stats(tables, cutoff)
        users = _with_uid(_read_raw(spark, find_table(data, "users")))
        sources = sources_at(tables, model, users, products, cutoff, n_events)
        wanted = (
            spark.read.text(str(users_file)).select(F.trim("value").alias("uid"))
            .where((F.col("uid") != "") & (F.lower("uid") != "user_id")).distinct()
        )  # fmt: skip
        known = users.join(wanted, "uid", "left_semi")
        n_known = known.count()
        unknown = [r.uid for r in wanted.join(users.select("uid"), "uid", "left_anti").collect()]
        if not n_known and not unknown:
            raise FinrecError(f"users file {users_file} lists no user ids", hint="one user id per line")
        buckets = max(1, math.ceil(n_known / CUSTOMERS_PER_BUCKET))
        known = known.withColumn("bucket", F.pmod(F.xxhash64("uid"), F.lit(buckets))).drop("uid")
        events = tables.ev.join(wanted.withColumnRenamed("uid", "u"), "u", "left_semi").withColumn(
            "bucket", F.pmod(F.xxhash64("u"), F.lit(buckets))
        )
        _, locate = _ship(spark, model_dir, version)
        protected = list(settings.protected_attributes)
        product_ids = products["product_id"].to_numpy()

        def score(left: pa.Table, right: pa.Table) -> pa.Table:
            model = _bundle(locate())
            ds = partition_dataset(typed_users(left), products, right.drop_columns(["bucket"]), data)
            from finrec.features.builder import FeatureBuilder
            from finrec.pipeline import recommend_rows

            builder = FeatureBuilder(ds, protected, catalogue_stats=lambda _cutoff: stats)
            frame = recommend_rows(model, builder, settings, cutoff, np.arange(ds.n_users), k, exclude,
                                   sources=sources)  # fmt: skip
            return pa.table({"user_id": pa.array(frame["user_id"].astype(str).to_numpy(), pa.string()),
                             "rank": pa.array(frame["rank"].to_numpy(np.int64)),
                             "product_id": pa.array(product_ids[frame["item"].to_numpy(np.int64)].astype(str)),
                             "score": pa.array(frame["score"].to_numpy(np.float64))})  # fmt: skip

        scored = known.groupBy("bucket").cogroup(events.groupBy("bucket")).applyInArrow(score, OUTPUT_SCHEMA)
        if unknown:
            empty = partition_dataset(typed_users(pa.Table.from_pylist([], schema=_arrow_schema(users))), products,
                                      _no_events(), data)  # fmt: skip
            from finrec.features.builder import FeatureBuilder

            cold = recommend_unknown(model, FeatureBuilder(empty, protected, catalogue_stats=lambda _c: stats),
                                     settings, cutoff, unknown, k)  # fmt: skip
            cold["product_id"] = product_ids[cold.pop("item").to_numpy(np.int64)].astype(str)
            cold = cold[["user_id", "rank", "product_id", "score"]].astype({"user_id": str})
            scored = scored.unionByName(spark.createDataFrame(cold, OUTPUT_SCHEMA))
        _write(scored, output, suffix)
    finally:
        tables.close()
    rows = spark.read.parquet(str(output)).count() if suffix == ".parquet" else None
    return {"users": n_known + len(unknown), "unknown_users": len(unknown), "rows": rows,
            "model_version": manifest["metrics"].get("model_version"), "output": str(output),
            "buckets": buckets}  # fmt: skip


def _arrow_schema(df: DataFrame) -> pa.Schema:
    """The Arrow schema of the users table as read (without the added columns)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    keep = [f for f in df.schema.fields if f.name not in ("uid",)]
    from pyspark.sql.types import StructType

    return to_arrow_schema(StructType(keep))


def _no_events() -> pa.Table:
    return pa.table({"u": pa.array([], pa.string()), "p": pa.array([], pa.int32()), "e": pa.array([], pa.int8()),
                     "ts": pa.array([], pa.int64()), "pos": pa.array([], pa.int16()),
                     "i": pa.array([], pa.struct([("ts", pa.int64()), ("file", pa.int32()),
                                                  ("row", pa.int64())]))})  # fmt: skip


def _write(df: DataFrame, output: Path, suffix: str) -> None:
    """Write to a temporary folder beside ``output``, then rename: a reader never sees half an answer."""
    tmp = output.with_name(f".{output.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    writer = df.write.mode("overwrite")
    if suffix == ".parquet":
        writer.parquet(str(tmp))
    else:
        writer.option("header", True).csv(str(tmp))
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    tmp.rename(output)
