"""Customers materialised in Redis (`finrec materialize`): what a replica reads back is the engine's snapshot, and
a replica reading it answers exactly as a service holding the whole snapshot in memory.

* Parity: every customer's record in Redis, written block by block, equals the record the in-memory service slices
  out of the full snapshot (features, holdings, pair history, embeddings, positives, recent declines).
* Same answers: for the same customers, with and without live events since the cutoff, both services return the
  same items with the same scores and reasons.
* Errors: Redis down at materialise time, nothing materialised at serve start, Redis down per request (503).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from finrec.config import FinrecSettings
from finrec.data.dataset import Dataset, load_dataset
from finrec.errors import FinrecError
from finrec.events.schema import Event
from finrec.events.store import MemoryEventStore
from finrec.pipeline import load_model
from finrec.serving.guardrails import GuardrailPolicy, LiveState
from finrec.serving.materialize import EmbeddedProducer, materialize, record_digest
from finrec.serving.materialized import MaterializedFeatures, materialized_data
from finrec.serving.recommender import Recommender, UnknownCustomerError
from finrec.serving.records import CustomerRecord, decode, encode
from finrec.serving.scoring import ServingModel
from finrec.serving.service import Service
from finrec.serving.state import ServingData
from finrec.storage import CircuitBreaker, Guarded, StoreUnavailable
from finrec.testing import REDIS_TEST_URL

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tiny_world: Path, tiny_model: Path) -> tuple[Dataset, Any, dict[str, Any]]:
    model, manifest = load_model(tiny_model)
    return load_dataset(tiny_world), model, manifest


@pytest.fixture
def url(redis_prefix: str) -> str:
    return f"{REDIS_TEST_URL}?prefix={redis_prefix}"


@pytest.fixture
def written(world: tuple[Dataset, Any, dict[str, Any]], url: str) -> dict[str, Any]:
    ds, model, manifest = world
    # Blocks of an uneven size: customers at block edges must come out as in one pass.
    return materialize(EmbeddedProducer(ds, block=700), model, manifest, MaterializedFeatures(url), FinrecSettings())


def _in_memory(world: tuple[Dataset, Any, dict[str, Any]]) -> ServingModel:
    ds, model, manifest = world
    return ServingModel(model, manifest, ServingData(ds, FinrecSettings()))


def _from_redis(world: tuple[Dataset, Any, dict[str, Any]], url: str) -> ServingModel:
    _, model, manifest = world
    settings = FinrecSettings(serve={"customer_features": url})
    data = materialized_data(settings, str(manifest["metrics"]["model_version"]), GuardrailPolicy())
    customers = data.catalogue.source.customers_for(str(manifest["metrics"]["model_version"]),
                                                    data.catalogue.snapshot_id)  # fmt: skip
    return ServingModel(model, manifest, data, customers)


def assert_records_equal(got: CustomerRecord, want: CustomerRecord, who: str) -> None:
    for f in dataclasses.fields(CustomerRecord):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, np.ndarray) or isinstance(a, np.ndarray):
            assert a is not None and b is not None, (who, f.name)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{who}: {f.name}")
        elif f.name == "profile":
            assert a.keys() == b.keys()
            for k in b:
                same = a[k] == b[k] or (a[k] is None and b[k] != b[k])  # NaN travels as JSON null
                assert same, (who, k, a[k], b[k])
        elif f.name not in ("declined", "shown"):
            assert a == b, (who, f.name, a, b)


def test_redis_read_back_equals_the_engine_snapshot(world: Any, url: str, written: dict[str, Any]) -> None:
    ds = world[0]
    served = _in_memory(world)
    live = LiveState(GuardrailPolicy())
    live.seed(served.data)
    features = MaterializedFeatures(url)
    customers = features.customers(features.current(served.version), written)
    assert written["customers"] == ds.n_users
    with_pairs = with_declines = 0
    for row, uid in enumerate(ds.users["user_id"].astype(str)):
        got = customers.find(uid)
        assert got is not None, uid
        assert_records_equal(got, served.record(row), uid)
        assert got.declined == live._declined.get(uid, {})
        assert got.shown == {p: t for p, t in live._shown.get(uid, {}).items()}
        with_pairs += len(got.pair_product) > 0
        with_declines += bool(got.declined)
    assert with_pairs > ds.n_users // 2 and with_declines > 0  # the comparison had something to compare
    # The manifest's checksum names exactly the bytes stored.
    total = sum(record_digest(u, customers.redis.get(customers.prefix + "c:" + u)) for u in ds.users["user_id"])
    assert f"{total % 2**64:016x}" == written["checksum"]


def test_record_layout_round_trips(world: Any) -> None:
    served = _in_memory(world)
    rec = served.record(3)
    rec.declined, rec.shown = {4: 1_700_000_000}, {5: [1_700_000_100, 1_700_000_200]}
    back = decode(encode(rec), len(served.data.pair_names))
    assert_records_equal(back, rec, "row 3")
    assert (back.declined, back.shown) == (rec.declined, rec.shown)
    with pytest.raises(ValueError, match="layout"):
        decode(b"XXXX" + encode(rec)[4:], len(served.data.pair_names))


def _recommender(served: ServingModel) -> Recommender:
    live = LiveState(GuardrailPolicy())
    live.seed(served.data)
    return Recommender(served, live, MemoryEventStore(), None, clock=lambda: float(served.data.cutoff + 3600))


def _items(body: dict[str, Any]) -> list[tuple[str, list[str]]]:
    return [(it["product_id"], [r["code"] for r in it["reasons"]]) for it in body["items"]]


def test_a_replica_reading_redis_answers_as_the_in_memory_service(world: Any, url: str, written: Any) -> None:
    ds = world[0]
    memory, redis_ = _recommender(_in_memory(world)), _recommender(_from_redis(world, url))
    assert redis_.model.data.n_users == 0 and redis_.model.n_customers == ds.n_users  # no customer loaded
    users = ds.users["user_id"].astype(str).tolist()[::13]
    now = int(memory.clock())
    products = ds.products["product_id"].astype(str).tolist()
    # Live events since the cutoff for some of them: a decline, an approval, clicks (overlay and guardrails).
    events = [Event(f"e{i}", u, products[(i * 7) % len(products)], t, now - 60 + i)
              for i, u in enumerate(users[:40]) for t in ("click", "decline" if i % 3 else "approve")]  # fmt: skip
    for rec in (memory, redis_):
        rec.live.record(events)
    compared = 0
    for u in users:
        a, b = memory.recommend(u, k=8).body, redis_.recommend(u, k=8).body
        assert _items(a) == _items(b), u
        np.testing.assert_allclose([it["score"] for it in a["items"]], [it["score"] for it in b["items"]],
                                   rtol=0, atol=1e-6)  # fmt: skip
        assert a["excluded"] == b["excluded"], u
        compared += len(a["items"])
    assert compared > len(users) * 3
    with pytest.raises(UnknownCustomerError):
        redis_.recommend("not-a-customer")
    # Events are checked against the customers in Redis.
    out = redis_.ingest([{"event_id": "x1", "user_id": "nobody", "product_id": products[0], "event_type": "hold",
                          "timestamp": now}, {"event_id": "x2", "user_id": users[0], "product_id": products[0],
                                              "event_type": "hold", "timestamp": now}], trusted=True)  # fmt: skip
    assert out["accepted"] == 1 and "not a customer" in out["rejected"][0]["errors"][0], out


def test_materialize_refuses_a_redis_that_is_down() -> None:
    with pytest.raises(FinrecError, match="does not answer"):
        MaterializedFeatures("redis://127.0.0.1:1/0", timeout=0.5)


def test_a_bundle_whose_sources_are_not_the_snapshots_is_refused_before_any_work(world: Any, url: str) -> None:
    """A replica cannot refit candidate sources (it holds no events): a bundle fitted on fewer events (a sample,
    older data) is refused naming what to do, and nothing is written to Redis."""
    ds, model, manifest = world
    source = EmbeddedProducer(ds)
    source.n_events -= 1  # the data holds one event the bundle's sources did not see
    features = MaterializedFeatures(url)
    with pytest.raises(FinrecError, match="candidate sources") as err:
        materialize(source, model, manifest, features, FinrecSettings())
    assert err.value.hint and "finrec retrain" in err.value.hint
    assert not list(features.redis.scan_iter(match=features.base + "*", count=1000))


def test_serve_start_without_materialised_customers_says_what_to_run(tiny_model: Path, url: str,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    settings = FinrecSettings(workspace=tmp_path, serve={"customer_features": url, "model_dir": tiny_model})
    with pytest.raises(FinrecError, match="no customers are materialised") as err:
        Service.from_settings(settings, audit=False, watch=False)
    assert "finrec materialize" in (err.value.hint or "")


def test_redis_down_per_request_is_a_503(world: Any, url: str, written: Any) -> None:
    served = _from_redis(world, url)
    features = MaterializedFeatures(url)
    dead = features.customers(features.current(served.version), written)
    import redis

    dead.redis = redis.Redis(port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    served.customers = Guarded(dead, CircuitBreaker("customer features", 1, 30))
    rec = _recommender(served)
    for _ in range(2):  # the store's error, then failing fast
        with pytest.raises(StoreUnavailable, match="customer features"):
            rec.recommend(str(world[0].users["user_id"].iloc[0]))


def test_finrec_materialize_then_a_replica_serves_over_http(tiny_world: Path, tiny_model: Path, url: str,
                                                            server_factory: Any) -> None:  # fmt: skip
    import subprocess
    import sys

    import httpx

    from finrec.testing import TEST_HEADERS

    # -d and -m, as on every other command that reads a dataset and a bundle
    run = subprocess.run([sys.executable, "-m", "finrec", "materialize", "-d", str(tiny_world), "-m",
                          str(tiny_model), "--redis", url, "--no-progress"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "materialised 2000 customers" in run.stdout
    stores = {"FINREC_SERVE__CLOCK": "data"}
    replica = server_factory(tiny_model, tiny_world, env={**stores, "FINREC_SERVE__CUSTOMER_FEATURES": url})
    memory = server_factory(tiny_model, tiny_world, env=stores)
    ready = replica.wait_ready()
    memory.wait_ready()
    assert ready["stores"]["customer_features"] == "ok"
    users = load_dataset(tiny_world).users["user_id"].astype(str).tolist()[::97]
    for u in users:
        a = httpx.get(f"{memory.url}/recommend/{u}?k=5", headers=TEST_HEADERS, timeout=30).json()
        b = httpx.get(f"{replica.url}/recommend/{u}?k=5", headers=TEST_HEADERS, timeout=30).json()
        assert _items(a) == _items(b), u
    gone = httpx.get(f"{replica.url}/recommend/not-a-customer", headers=TEST_HEADERS, timeout=30)
    assert gone.status_code == 404


@pytest.mark.parametrize("case", ["redis down", "bundle missing", "unknown engine"])
def test_finrec_materialize_fails_clearly(case: str, tiny_world: Path, tiny_model: Path, url: str,
                                          tmp_path: Path) -> None:  # fmt: skip
    import os
    import subprocess
    import sys

    model, redis_url, extra = tiny_model, url, []
    if case == "redis down":
        redis_url, want = "redis://127.0.0.1:1/0", "does not answer"
    elif case == "bundle missing":
        model, want = tmp_path / "nothing", "no model bundle at"
    else:
        extra, want = ["--engine", "flink"], "unknown --engine"
    env = {**os.environ, "COLUMNS": "200", "FINREC_WORKSPACE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "finrec", "materialize", "--data", str(tiny_world), "--model-dir",
                          str(model), "--redis", redis_url, "--no-progress", *extra],
                         capture_output=True, text=True, env=env)  # fmt: skip
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in text and want in text, text
