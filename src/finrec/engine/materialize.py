"""`finrec materialize --engine spark`: every customer's serving record, built and written to Redis by Spark's
executors.

The driver never holds the customers. It reads the catalogue (the products table), computes with Spark what
counts every customer's events (the catalogue's demand and holders, :func:`~finrec.engine.batch.catalogue_stats`,
and the number of events the bundle's candidate sources must have been fitted on), and builds the catalogue's
tables from a dataset with no customer that is given those statistics, so the products' features are those of a
run holding every customer. The customers are hashed into buckets of about ``per_bucket``; each bucket's task
gets its customers' rows and events (``cogroup``, as :func:`~finrec.engine.batch.spark_recommend`), builds the
partition's dataset, runs the embedded run's own per-block code on it
(:func:`~finrec.serving.materialize.block_records`) with the bundle shipped to the workers, writes the records to
Redis itself (:func:`~finrec.serving.materialize.write_records`, a client per task from the URL) and returns
its count and checksum. The driver adds them up; :func:`~finrec.serving.materialize.materialize` then writes the
manifest and moves the pointer exactly as for the embedded engine.

A retried task rewrites the same keys with the same bytes, and only the attempt that succeeded is counted, so
the manifest's count and checksum hold whatever Spark retried (``tests/parity/test_materialize_parity.py``:
both engines write the same bytes for every customer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa

from finrec.config import FinrecSettings
from finrec.data.contract import TABLES
from finrec.data.dataset import Dataset, dataset_fingerprint, load_table
from finrec.data.io import find_table
from finrec.engine.batch import CUSTOMERS_PER_BUCKET, _bundle, _no_events, _ship, _with_uid, catalogue_stats
from finrec.errors import FinrecError
from finrec.serving.materialize import Written, block_records, catalogue_tables, write_records
from finrec.serving.scoring import version_of

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

    from finrec.features.spark import SparkEventTables
    from finrec.serving.materialized import MaterializedFeatures
    from finrec.twostage.model import TwoStageModel

_TASK_SCHEMA = "customers long, checksum string"  # checksum as hex: a sum modulo 2**64 does not fit a long


class SparkProducer:
    """The records of the customers of the dataset folder ``data`` at its end, built by Spark's executors.

    A :class:`~finrec.serving.materialize.RecordProducer`; use it as a context manager (Spark keeps the typed
    event log while it is open). ``data`` must have been validated (``dedupe``: it repeats event ids, and only
    the first of each counts); ``model_dir`` is the bundle the records encode, shipped to the workers.

    Examples
    --------
    >>> from finrec.engine.materialize import SparkProducer
    >>> SparkProducer.engine
    'spark'
    """

    engine = "spark"

    def __init__(self, spark: SparkSession, data: Path, model_dir: Path, *, dedupe: bool = False,
                 per_bucket: int = CUSTOMERS_PER_BUCKET) -> None:  # fmt: skip
        self.spark, self.data, self.model_dir = spark, Path(data), Path(model_dir)
        self.dedupe, self.per_bucket = dedupe, per_bucket
        self.tables: SparkEventTables | None = None
        self.stats: pd.DataFrame | None = None  # the catalogue's statistics over every customer, by catalogue()

    def __enter__(self) -> SparkProducer:
        from finrec.features.spark import SparkEventTables, _read_raw

        self.products, self.extra_products = load_table(self.data, "products")
        self.tables = tables = SparkEventTables(self.spark, self.data, dedupe=self.dedupe)
        try:
            self.raw_users = _read_raw(self.spark, find_table(self.data, "users"))
            self.users: DataFrame = _with_uid(self.raw_users)
            self.n_customers = self.users.count()
            # Every event is before the cutoff: the count is the one the bundle's candidate sources record.
            self.cutoff, self.n_events = tables.span()
            self.fingerprint = dataset_fingerprint(self.data)  # as load_dataset computes it
        except BaseException:
            tables.close()
            raise
        self.buckets = max(1, math.ceil(self.n_customers / self.per_bucket))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tables is not None:
            self.tables.close()
            self.tables = None

    def catalogue(self, settings: FinrecSettings, model: TwoStageModel) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The catalogue as the embedded run writes it, from a dataset without customers given the statistics
        of every customer (computed here, once the bundle has been checked: minutes of Spark work at millions)."""
        from finrec.serving.state import ServingData

        assert self.tables is not None, "use SparkProducer as a context manager"
        self.stats = catalogue_stats(self.tables, self.cutoff)
        empty = _partition(self._context(), self.raw_users.limit(0).toArrow(), _no_events())
        data = ServingData(empty, settings, cutoff=self.cutoff)
        try:
            any_held = bool((self.stats["holders"] > 0).any())  # a share of holders is > 0 only if someone holds it
            return catalogue_tables(self.products, empty.users, data.snap, data.pair_names, any_held)
        finally:
            data.builder.con.close()

    def write(self, features: MaterializedFeatures, prefix: str, settings: FinrecSettings, model: TwoStageModel,
              horizon_days: float, on_progress: Callable[[int], None] | None = None) -> Written:  # fmt: skip
        """Build and write every bucket's records in Spark's tasks; the tasks' counts and checksums added up.

        ``model`` is the bundle loaded from ``model_dir`` (the tasks load their own copy of it).
        """
        from pyspark.sql import functions as F

        assert self.tables is not None, "use SparkProducer as a context manager"
        version = version_of(json.loads((self.model_dir / "manifest.json").read_text()))
        _, locate = _ship(self.spark, self.model_dir, version)
        context, cutoff = self._context(), self.cutoff
        url, timeout = features.client_url, features.timeout

        def write_bucket(users: pa.Table, events: pa.Table) -> pa.Table:
            import redis

            ds = _partition(context, users, events.drop_columns(["bucket"]))
            batch = block_records(ds, settings, _bundle(locate()), cutoff, horizon_days)
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
            try:
                done = write_records(client, prefix, [batch])
            finally:
                client.close()
            return pa.table({"customers": pa.array([done.customers], pa.int64()),
                             "checksum": pa.array([f"{done.checksum:016x}"], pa.string())})  # fmt: skip

        def bucket(column: str) -> Any:
            return F.pmod(F.xxhash64(column), F.lit(self.buckets))

        users = self.users.withColumn("bucket", bucket("uid")).drop("uid")
        events = self.tables.ev.withColumn("bucket", bucket("u"))
        parts = users.groupBy("bucket").cogroup(events.groupBy("bucket")).applyInArrow(write_bucket, _TASK_SCHEMA)
        total = Written()
        for row in parts.collect():  # one row per task (toLocalIterator would run the tasks one at a time)
            total = total + Written(int(row["customers"]), int(row["checksum"], 16))
            if on_progress is not None:
                on_progress(int(row["customers"]))
        if total.customers != self.n_customers:
            raise FinrecError(f"Spark wrote {total.customers} of {self.n_customers} customers",
                              hint="check that the data was validated (`finrec validate`): ids must be unique")
        return total

    def _context(self) -> dict[str, Any]:
        """What a task needs to build its partition's dataset (small: the catalogue and its statistics)."""
        assert self.stats is not None, "catalogue() computes the statistics the tasks need"
        return {"products": self.products, "extra_products": self.extra_products, "stats": self.stats,
                "data": self.data, "fingerprint": self.fingerprint}  # fmt: skip


def _partition(context: dict[str, Any], users: pa.Table, events: pa.Table) -> Dataset:
    """The dataset of some customers (raw rows, typed events), with the catalogue's statistics of every customer."""
    from finrec.features.partition import partition_dataset, typed_users

    typed = typed_users(users)
    ds = partition_dataset(typed, context["products"], events, context["data"], fingerprint=context["fingerprint"])
    ds.extra_product_columns = list(context["extra_products"])
    ds.extra_user_columns = [c for c in typed.columns if c not in TABLES["users"].by_name]
    stats: pd.DataFrame = context["stats"]
    ds.catalogue_stats = lambda _cutoff: stats.copy()  # one snapshot, at the run's cutoff
    return ds
