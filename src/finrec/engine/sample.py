"""A sample of whole customers, drawn by Spark, as an embedded dataset that knows the statistics of all of them.

`finrec train --engine spark` and `finrec evaluate --engine spark` learn and measure on a sample: customers are
kept whole (every event of theirs) by a seeded hash of their id, so that each keeps their history and their
labels, and a model's memory follows the sample, not the customer base. What counts every customer's events,
the catalogue's demand, conversion and holders, is computed by Spark over all of them at each cutoff the stage
asks for (:attr:`~finrec.data.dataset.Dataset.catalogue_stats`), so a product's features read the same as in a
run that holds every customer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from finrec.data.contract import TABLES
from finrec.data.dataset import Dataset, dataset_fingerprint, load_table
from finrec.data.io import find_table
from finrec.errors import FinrecError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

    from finrec.features.spark import SparkEventTables
    from finrec.twostage.model import TwoStageModel

#: Hash buckets the sampling draws from: a customer is kept when their bucket is below the sampled share.
_BUCKETS = 1_000_000


class CustomerSample:
    """Whole customers of ``data``, at most about ``max_customers`` of them, drawn by Spark.

    Use as a context manager: the Spark tables stay open while the stage asks for the catalogue's statistics.
    """

    def __init__(self, spark: SparkSession, data: Path, max_customers: int, seed: int = 0, dedupe: bool = False):
        self.spark, self.data, self.max_customers = spark, Path(data), max_customers
        self.seed, self.dedupe = seed, dedupe
        self.tables: SparkEventTables | None = None
        self.n_customers = 0
        self.users: DataFrame | None = None
        self.products = pd.DataFrame()
        self._stats: dict[int, pd.DataFrame] = {}

    def __enter__(self) -> Dataset:
        from pyspark.sql import functions as F

        from finrec.engine.batch import _with_uid
        from finrec.features.partition import partition_dataset, typed_users
        from finrec.features.spark import SparkEventTables, _read_raw

        products, extra_products = load_table(self.data, "products")
        self.tables = tables = SparkEventTables(self.spark, self.data, dedupe=self.dedupe)
        self.products = products
        self.users = users = _with_uid(_read_raw(self.spark, find_table(self.data, "users")))
        self.n_customers = users.count()
        share = min(1.0, self.max_customers / max(1, self.n_customers))
        bucket = F.pmod(F.xxhash64(F.col("uid"), F.lit(self.seed)), F.lit(_BUCKETS))
        kept = users.where(bucket < F.lit(int(round(share * _BUCKETS)))).cache()
        # In file order, as load_dataset reads them: a sample of every customer is then the same dataset, row for row.
        raw_users = kept.drop("uid").toArrow().sort_by([("__file", "ascending"), ("__row", "ascending")])
        # The kept ids are broadcast: a semi-join against a hash of them streams the log once. Left to Spark's size
        # estimate (the whole users file's, not the sample's), a base whose users file is over the broadcast limit
        # (10 MB) got a sort-merge join: every event of the base sorted by customer to keep a few.
        ids = F.broadcast(kept.select(F.col("uid").alias("u")))
        events = tables.ev.join(ids, "u", "left_semi").toArrow()
        kept.unpersist()
        if not raw_users.num_rows or not events.num_rows:
            raise FinrecError(f"the sample of {self.data} holds no customer with events",
                              hint="raise [engine] sample_customers")  # fmt: skip
        typed = typed_users(raw_users)
        ds = partition_dataset(typed, products, events, self.data, fingerprint=dataset_fingerprint(self.data))
        ds.extra_product_columns = extra_products
        ds.extra_user_columns = [c for c in raw_users.column_names
                                 if c in typed.columns and c not in _contract_user_columns()]  # fmt: skip
        ds.catalogue_stats = self.stats
        return ds

    def stats(self, cutoff: int) -> pd.DataFrame:
        """The catalogue's statistics at ``cutoff`` over every customer (computed once per cutoff)."""
        from finrec.engine.batch import catalogue_stats

        if cutoff not in self._stats:
            assert self.tables is not None, "use CustomerSample as a context manager"
            self._stats[cutoff] = catalogue_stats(self.tables, cutoff)
        return self._stats[cutoff].copy()

    def fit_sources_on_everyone(self, model: TwoStageModel) -> None:
        """Refit ``model``'s candidate sources on every customer's positives at the end of the whole data.

        Training fitted them on the sample, at the sample's last event; batch scoring, ``finrec materialize`` and
        the API use them at the end of the whole data, for every customer, and take the bundle's own only when
        their cutoff and event count are that snapshot's. Refitted here once, on the driver, from the positives
        (a matrix the size of the positives, not of the customers), the bundle serves the base as trained.
        """
        from finrec.engine.batch import sources_at

        assert self.tables is not None and self.users is not None, "use CustomerSample as a context manager"
        if model.sources is None:
            return
        cutoff, n_events = self.tables.span()
        # As is for a full sample; the log is counted once (span), not again by sources_at.
        model.sources = sources_at(self.tables, model, self.users, self.products, cutoff, n_events)
        model.config = model.config.with_sources_fit(cutoff, n_events)

    def __exit__(self, *exc: object) -> None:
        if self.tables is not None:
            self.tables.close()


def _contract_user_columns() -> set[str]:
    return set(TABLES["users"].by_name)
