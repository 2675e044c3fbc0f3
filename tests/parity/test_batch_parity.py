"""Batch recommendations on Spark equal the embedded ones for the same bundle, item for item.

Spark scores customer partitions, each a self-contained dataset of some customers, with the catalogue's
statistics and the candidate sources computed over every customer: the same answers as one process holding all
of them. Two cases: the data the bundle was trained on (its own sources serve), and data that grew after
training (both engines refit the sources at the new cutoff; Spark from the positives alone).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from finrec import pipeline
from finrec.config import FinrecSettings
from finrec.testing import TINY_TRAIN

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def _ids(world: Path, n: int) -> list[str]:
    return pd.read_parquet(world / "users.parquet")["user_id"].astype(str).tolist()[:n]


def _both(spark: object, model: Path, world: Path, users: Path, tmp: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    from finrec.engine.batch import spark_recommend

    s = FinrecSettings(train=TINY_TRAIN)
    pipeline.recommend(model, world, users, 10, tmp / "embedded.parquet", s, progress=False)
    res = spark_recommend(spark, model, world, users, 10, tmp / "spark.parquet", s)  # type: ignore[arg-type]
    a = pd.read_parquet(tmp / "embedded.parquet").astype({"user_id": str, "product_id": str})
    b = pd.read_parquet(tmp / "spark.parquet")
    order = ["user_id", "rank"]
    return a.sort_values(order).reset_index(drop=True), b.sort_values(order).reset_index(drop=True), res


def _assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) == len(b) > 0
    assert (a[["user_id", "rank", "product_id"]].to_numpy() == b[["user_id", "rank", "product_id"]].to_numpy()).all()
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=0, atol=1e-12)


def test_spark_batch_recommendations_equal_the_embedded_ones(spark: object, tiny_world: Path, tiny_model: Path,
                                                             tmp_path: Path) -> None:  # fmt: skip
    users = tmp_path / "users.txt"
    users.write_text("user_id\n" + "\n".join(_ids(tiny_world, 600) + ["not-a-customer"]) + "\n")
    a, b, res = _both(spark, tiny_model, tiny_world, users, tmp_path)
    _assert_same(a, b)
    assert res["users"] == 601 and res["unknown_users"] == 1 and res["rows"] == len(a)
    # The unknown customer gets what the embedded path gives (popular products that need no profile: here none).
    assert set(a["user_id"]) == set(b["user_id"])


def test_sources_refitted_at_a_later_cutoff_agree_and_refuse_orphan_events(
    spark: object, tiny_world: Path, tmp_path: Path
) -> None:
    # A bundle trained on the first months, asked about the whole data: its sources are refitted at the end.
    early = tmp_path / "early"
    shutil.copytree(tiny_world, early, ignore=shutil.ignore_patterns("events.parquet"))
    events = pq.read_table(tiny_world / "events.parquet")
    ts = events.column("timestamp").to_numpy()
    pq.write_table(events.filter(ts < ts.max() - np.timedelta64(45, "D")), early / "events.parquet")
    s = FinrecSettings(train=TINY_TRAIN)
    pipeline.train(early, tmp_path / "model", s, progress=False)
    users = tmp_path / "users.txt"
    users.write_text("\n".join(_ids(tiny_world, 400)) + "\n")
    a, b, _ = _both(spark, tmp_path / "model", tiny_world, users, tmp_path)
    _assert_same(a, b)

    # Positive events of customers the users table lacks: the refit says so rather than dropping them.
    from finrec.engine.batch import spark_recommend
    from finrec.errors import FinrecError

    orphans = tmp_path / "orphans"
    shutil.copytree(tiny_world, orphans)
    table = pq.read_table(tiny_world / "users.parquet")
    pq.write_table(table.slice(20), orphans / "users.parquet")
    with pytest.raises(FinrecError, match=r"pairs of positive events name a customer the users table does not hold"):
        spark_recommend(spark, tmp_path / "model", orphans, users, 10, tmp_path / "o.parquet", FinrecSettings())  # type: ignore[arg-type]
