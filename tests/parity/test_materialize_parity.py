"""`finrec materialize` on Spark writes what the embedded engine writes, byte for byte.

Spark's tasks each build a bucket of customers (a dataset of those customers, whole, given the catalogue's
statistics of every customer) and write their records to Redis themselves; the driver builds the catalogue from
a dataset without customers. The embedded engine builds blocks of the loaded dataset. Buckets and blocks of
uneven sizes: customers at their edges must come out as in one pass.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from finrec.config import FinrecSettings
from finrec.data.dataset import load_dataset
from finrec.errors import FinrecError
from finrec.pipeline import load_model
from finrec.serving.materialize import EmbeddedProducer, materialize
from finrec.serving.materialized import MaterializedFeatures
from finrec.testing import REDIS_TEST_URL, drop_redis_keys, redis_unavailable

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def two_prefixes() -> Iterator[tuple[str, str]]:
    """Two fresh key prefixes in the test database (deleted afterwards); skips when no Redis answers."""
    if reason := redis_unavailable():
        pytest.skip(reason)
    names = (f"finrec-test-{uuid.uuid4().hex}", f"finrec-test-{uuid.uuid4().hex}")
    yield names
    for name in names:
        drop_redis_keys(name)


def test_spark_materialises_the_records_the_embedded_engine_does(spark: object, tiny_world: Path, tiny_model: Path,
                                                                  two_prefixes: tuple[str, str]) -> None:  # fmt: skip
    from finrec.engine.materialize import SparkProducer

    model, manifest = load_model(tiny_model)
    settings = FinrecSettings()
    ds = load_dataset(tiny_world)
    embedded, on_spark = (MaterializedFeatures(f"{REDIS_TEST_URL}?prefix={p}") for p in two_prefixes)
    a = materialize(EmbeddedProducer(ds, block=700), model, manifest, embedded, settings)
    progress: list[int] = []
    with SparkProducer(spark, tiny_world, tiny_model, per_bucket=700) as source:  # type: ignore[arg-type]
        assert source.buckets == 3 and source.n_customers == ds.n_users
        b = materialize(source, model, manifest, on_spark, settings, on_progress=progress.append)
        # A bundle whose sources were fitted on other events is refused, as by the embedded engine, before any
        # work: the catalogue's statistics over every customer (minutes of Spark at millions) are not computed.
        source.n_events += 1
        source.stats = None
        with pytest.raises(FinrecError, match="candidate sources"):
            materialize(source, model, manifest, on_spark, settings)
        assert source.stats is None

    assert (a["engine"], b["engine"]) == ("duckdb", "spark")
    assert b["customers"] == a["customers"] == ds.n_users == sum(progress) and len(progress) == 3
    assert b["checksum"] == a["checksum"]
    same = {k: v for k, v in a.items() if k not in ("engine", "created_at", "seconds")}
    assert {k: b[k] for k in same} == same  # snapshot, cutoff, catalogue's columns, record columns, horizon

    pa_, pb = embedded.current(a["model_version"]), on_spark.current(b["model_version"])
    ca, cb = embedded.redis.hgetall(pa_ + "catalogue"), on_spark.redis.hgetall(pb + "catalogue")
    assert set(ca) == {b"products", b"product_features", b"users", b"user_features"}
    for table in ca:
        assert cb[table] == ca[table], table
    ids = ds.users["user_id"].astype(str).tolist()
    for s in range(0, len(ids), 500):
        chunk = ids[s : s + 500]
        want = embedded.redis.mget([pa_ + "c:" + u for u in chunk])
        got = on_spark.redis.mget([pb + "c:" + u for u in chunk])
        assert all(w is not None for w in want)
        for u, w, g in zip(chunk, want, got, strict=True):
            assert g == w, u
    embedded.close()
    on_spark.close()
