"""The OnlineFeatureStore contract, run against every implementation.

To check a new backend, add one line to ``BACKENDS``: a URL factory (given a fresh temporary folder per test, so
each test gets an empty store), whether the store is shared, i.e. a second ``open_online_store`` of the same URL,
in this or another process, sees the same data, and optionally a cleanup run with the URL after the test.

The Redis cases use the server at 127.0.0.1:6379 (database 15, a fresh key prefix per test, deleted afterwards)
and skip when none answers there. ``test_speed`` only measures (run with ``-s`` to see the numbers).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from finrec.errors import ConfigError
from finrec.events.schema import Event
from finrec.features.online import Activity, OnlineFeatureStore, open_online_store
from finrec.features.online.memory import MemoryOnlineStore
from finrec.features.online.redis import RedisOnlineStore
from finrec.features.online.sqlite import SQLiteOnlineStore
from finrec.testing import REDIS_TEST_URL, redis_unavailable
from finrec.testing import drop_redis_keys as drop_redis_prefix

TS = 1_700_000_000
REDIS = REDIS_TEST_URL


class Backend(NamedTuple):
    url: Callable[[Path], str]
    shared: bool
    cleanup: Callable[[str], None] | None = None


def redis_url(tmp: Path | None = None) -> str:
    if reason := redis_unavailable():
        pytest.skip(reason)
    return f"{REDIS}?prefix=finrec-test-{uuid.uuid4().hex}"


def drop_redis_keys(url: str) -> None:
    drop_redis_prefix(url.rpartition("prefix=")[2])


BACKENDS = {
    "memory": Backend(lambda tmp: "memory://", shared=False),
    "sqlite": Backend(lambda tmp: f"sqlite:///{tmp / 'online' / 'online.db'}", shared=True),
    "redis": Backend(redis_url, shared=True, cleanup=drop_redis_keys),
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture
def store_url(backend: Backend, tmp_path: Path) -> Iterator[str]:
    url = backend.url(tmp_path)
    yield url
    if backend.cleanup is not None:
        backend.cleanup(url)


@pytest.fixture
def store(store_url: str) -> Iterator[OnlineFeatureStore]:
    opened = open_online_store(store_url)
    yield opened
    opened.close()


@pytest.fixture
def shared_url(backend: Backend, store_url: str) -> str:
    if not backend.shared:
        pytest.skip("this backend lives inside one store object")
    return store_url


def ev(ts: int, user_id: str = "C-1", product_id: str = "P-1", event_type: str = "click") -> Event:
    return Event(f"e-{uuid.uuid4().hex}", user_id, product_id, event_type, ts)


def act(ts: int, product_id: str = "P-1", event_type: str = "click") -> Activity:
    return Activity(ts, event_type, product_id)


def test_recent_returns_recorded_events_in_time_order_from_since(store: OnlineFeatureStore) -> None:
    store.record([ev(TS, product_id="P-1"), ev(TS + 10, product_id="P-2", event_type="view")])
    store.record([ev(TS + 20, product_id="P-3")])
    assert store.recent("C-1") == [act(TS, "P-1"), act(TS + 10, "P-2", "view"), act(TS + 20, "P-3")]
    assert store.recent("C-1", since=TS + 10) == [act(TS + 10, "P-2", "view"), act(TS + 20, "P-3")]  # inclusive
    assert store.recent("C-1", since=TS + 21) == [] and store.recent("nobody") == []
    store.record([])
    assert all(type(a.ts) is int for a in store.recent("C-1"))


def test_out_of_order_arrivals_are_sorted_and_equal_times_keep_recording_order(store: OnlineFeatureStore) -> None:
    store.record([ev(TS + 30, product_id="late"), ev(TS, product_id="a"), ev(TS + 10, product_id="b")])
    store.record([ev(TS + 5, product_id="c"), ev(TS, product_id="d"), ev(TS, product_id="d")])  # two alike: two
    assert [(a.ts - TS, a.product_id) for a in store.recent("C-1")] == [
        (0, "a"), (0, "d"), (0, "d"), (5, "c"), (10, "b"), (30, "late"),
    ]


def test_trimming_keeps_the_newest_max_per_user(store_url: str) -> None:
    store = open_online_store(store_url, max_per_user=5)
    try:
        assert store.max_per_user == 5
        store.record([ev(TS + t, product_id=f"P-{t}") for t in (3, 9, 1, 7, 5, 2)])  # past the limit in one call
        assert [a.ts - TS for a in store.recent("C-1")] == [2, 3, 5, 7, 9]
        store.record([ev(TS + 0)])  # older than everything kept in a full customer: dropped at once
        store.record([ev(TS + 8), ev(TS + 4), ev(TS + 4), ev(TS + 11)])
        assert [a.ts - TS for a in store.recent("C-1")] == [5, 7, 8, 9, 11]
        store.record([ev(TS + 11, product_id=f"tie-{i}") for i in range(5)])  # equal ts: the later recorded win
        assert [(a.ts - TS, a.product_id) for a in store.recent("C-1")] == [(11, f"tie-{i}") for i in range(5)]
        assert store.product_counts()["P-1"] == {"click": 6}  # counts are never trimmed
    finally:
        store.close()


def test_customers_are_isolated_and_recent_many_matches_recent(store: OnlineFeatureStore) -> None:
    store.record([ev(TS + 2, "C-1", "P-1"), ev(TS + 1, "C-2", "P-2"), ev(TS + 3, "C-1", "P-3"), ev(TS, "C-3")])
    store.record([ev(TS + 4, "C-2", "P-4", "view")])
    assert store.recent("C-1") == [act(TS + 2, "P-1"), act(TS + 3, "P-3")]
    assert store.recent("C-2") == [act(TS + 1, "P-2"), act(TS + 4, "P-4", "view")]
    users = ["C-2", "C-1", "nobody", "C-3", "C-1"]
    for since in (0, TS + 2):
        assert store.recent_many(users, since=since) == {u: store.recent(u, since=since) for u in users}
    assert store.recent_many([]) == {}


def test_product_counts_sum_across_calls(store: OnlineFeatureStore) -> None:
    assert store.product_counts() == {}
    store.record([ev(TS, "C-1", "P-1"), ev(TS, "C-2", "P-1"), ev(TS, "C-1", "P-1", "view"), ev(TS, "C-1", "P-2")])
    store.record([ev(TS + 1, "C-3", "P-1"), ev(TS + 1, "C-3", "P-3", "apply")])
    assert store.product_counts() == {"P-1": {"click": 3, "view": 1}, "P-2": {"click": 1}, "P-3": {"apply": 1}}


def test_odd_text_round_trips_exactly(store: OnlineFeatureStore) -> None:
    user, product, kind = "C ü:|x 🙂 \\ \" '", 'P|1:ä b|"[]"', "view|odd: ✓"
    store.record([ev(TS, user, product, kind), ev(TS + 1, user, "|", "|"), ev(TS + 2, "C:1", ":")])
    assert store.recent(user) == [act(TS, product, kind), act(TS + 1, "|", "|")]
    assert store.recent_many([user, "C:1"]) == {user: store.recent(user), "C:1": [act(TS + 2, ":")]}
    assert store.product_counts() == {product: {kind: 1}, "|": {"|": 1}, ":": {"click": 1}}


def test_a_bad_item_writes_nothing(store: OnlineFeatureStore) -> None:
    with pytest.raises(TypeError, match="Event objects"):
        store.record([ev(TS), {"user_id": "C-1"}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="ts must be an integer"):
        store.record([ev(TS), Event("e", "C-1", "P-1", "click", 1.5)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        store.record([ev(TS), ev(2**53)])
    assert store.recent("C-1") == [] and store.product_counts() == {}


def test_another_store_object_sees_a_record_when_it_returns(shared_url: str) -> None:
    first, second = open_online_store(shared_url), open_online_store(shared_url)
    try:
        first.record([ev(TS, "C-1", "P-1")])
        assert second.recent("C-1") == [act(TS, "P-1")]
        second.record([ev(TS + 1, "C-1", "P-2")])
        assert first.recent_many(["C-1"]) == {"C-1": [act(TS, "P-1"), act(TS + 1, "P-2")]}
        assert first.product_counts() == second.product_counts() == {"P-1": {"click": 1}, "P-2": {"click": 1}}
    finally:
        first.close()
        second.close()


RECORDER = """
import sys
from finrec.events.schema import Event
from finrec.features.online import open_online_store
store = open_online_store(sys.argv[1])
store.record([Event(f"x-{i}", "C-9", f"P-{i}", "view", 1_700_000_000 + i) for i in range(3)])
print("recorded", flush=True)
store.close()
"""


def test_another_process_sees_a_record_when_it_returns(shared_url: str) -> None:
    reader = open_online_store(shared_url)  # opened first, as a long-running worker's would be
    try:
        assert reader.recent("C-9") == []
        done = subprocess.run([sys.executable, "-c", RECORDER, shared_url], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout == "recorded\n", done.stderr
        assert reader.recent("C-9") == [act(TS + i, f"P-{i}", "view") for i in range(3)]
        assert reader.product_counts() == {f"P-{i}": {"view": 1} for i in range(3)}
    finally:
        reader.close()


def test_four_threads_recording_at_once_lose_nothing(store: OnlineFeatureStore) -> None:
    def writer(thread: int) -> None:
        for batch in range(25):
            base = TS + thread * 10_000 + batch * 10
            store.record([ev(base + i, f"C-{i % 4}", f"P-{i % 3}") for i in range(8)])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seen = store.recent_many([f"C-{u}" for u in range(4)])
    assert sum(len(rows) for rows in seen.values()) == 4 * 25 * 8
    assert all(len({a.ts for a in rows}) == len(rows) == 200 for rows in seen.values())
    assert all(rows == sorted(rows, key=lambda a: a.ts) for rows in seen.values())
    per_batch = Counter(f"P-{i % 3}" for i in range(8))
    assert store.product_counts() == {product: {"click": 100 * n} for product, n in per_batch.items()}


def test_readers_see_all_of_a_call_or_none_of_it(backend: Backend, store_url: str) -> None:
    writer = open_online_store(store_url)
    reader = open_online_store(store_url) if backend.shared else writer
    sizes: list[int] = []
    done, reading = threading.Event(), threading.Event()

    def read() -> None:
        while not done.is_set():
            sizes.append(len(reader.recent("C-1")))
            reading.set()
            time.sleep(0)  # let the writer have the GIL

    thread = threading.Thread(target=read)
    thread.start()
    try:
        assert reading.wait(10)
        for batch in range(1000):  # until the reader has had many chances to see half a call (trimming keeps 500)
            writer.record([ev(TS + batch, product_id=f"P-{i}") for i in range(10)])
            if batch >= 20 and len(set(sizes)) >= 5:
                break
    finally:
        done.set()
        thread.join()
        writer.close()
        reader.close()
    assert len(set(sizes)) > 1 and all(size % 10 == 0 for size in sizes), sorted(set(sizes))


def test_close_is_final_and_may_be_repeated(store_url: str) -> None:
    store = open_online_store(store_url)
    store.record([ev(TS)])
    store.close()
    store.close()
    calls: list[Callable[[], object]] = [
        lambda: store.record([ev(TS)]), lambda: store.recent("C-1"), lambda: store.recent_many(["C-1"]),
        store.product_counts,
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_speed(backend: Backend, store_url: str) -> None:
    """Report only: median time of a 10-event record and of recent() for a customer with 50 events."""
    store = open_online_store(store_url)
    try:
        record_ns, recent_ns = [], []
        for batch in range(100):
            events = [ev(TS + batch * 10 + i, f"bench-{batch % 20}", f"P-{i}") for i in range(10)]
            start = time.perf_counter_ns()
            store.record(events)
            record_ns.append(time.perf_counter_ns() - start)
        store.record([ev(TS + i, "fifty", f"P-{i % 7}") for i in range(50)])
        for _ in range(200):
            start = time.perf_counter_ns()
            rows = store.recent("fifty")
            recent_ns.append(time.perf_counter_ns() - start)
        assert len(rows) == 50
    finally:
        store.close()
    name = type(store).__name__
    print(f"\n{name}: record(10) median {statistics.median(record_ns) / 1e3:.0f} us, "
          f"recent(50) median {statistics.median(recent_ns) / 1e3:.0f} us")


def test_urls_pick_the_implementation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    stores = [open_online_store("memory://"), open_online_store("sqlite:///rel/dir/a.db", max_per_user=7)]
    stores.append(open_online_store(f"SQLite:///{tmp_path / 'abs.db'}"))
    try:
        assert isinstance(stores[0], MemoryOnlineStore) and isinstance(stores[1], SQLiteOnlineStore)
        assert isinstance(stores[2], SQLiteOnlineStore) and stores[1].max_per_user == 7
        assert (tmp_path / "rel" / "dir" / "a.db").is_file() and (tmp_path / "abs.db").is_file()
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "has no scheme"),
        ("online.db", "has no scheme"),
        ("postgres://db/online", "scheme 'postgres' is not supported"),
        ("memory://named", "memory:// takes none"),
        ("sqlite://online.db", "is not a SQLite file URL"),
        ("sqlite:///", "is not a SQLite file URL"),
        ("sqlite:///dir/", "is not a SQLite file URL"),
        ("sqlite:///online.db?mode=ro", "is not a SQLite file URL"),
    ],
)
def test_bad_urls_are_refused_with_the_supported_forms(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        open_online_store(url)
    hint = str(caught.value.hint)
    assert "memory://" in hint and "sqlite:///" in hint and "redis://" in hint


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://user:secret@localhost:port/0", "invalid host or port"),
        ("redis://:secret@/0", "has no host"),
        ("redis://user:secret@localhost:6379/zero", "must be a database number"),
        ("redis://user:secret@localhost:6379/0?prefix=a b", "prefix must be given once"),
        ("redis://user:secret@localhost:6379/0?password=secret", "unknown options 'password'"),
    ],
)
def test_bad_redis_urls_are_refused_without_showing_the_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        open_online_store(url)
    assert "redis://host:port/db" in str(caught.value.hint) and "secret" not in str(caught.value)


def test_an_unreachable_redis_and_a_bad_limit_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no Redis server answers at 127.0.0.1:1: ") as caught:
        open_online_store("redis://user:secret@127.0.0.1:1/0?prefix=x")  # nothing listens on port 1
    assert "is Redis running?" in str(caught.value.hint) and "secret" not in str(caught.value)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max_per_user must be a positive integer"):
            open_online_store("memory://", max_per_user=bad)  # type: ignore[arg-type]
    (tmp_path / "notes.db").write_text("not a database, just text that is long enough " * 50)
    with pytest.raises(ConfigError, match="cannot use .* as an online store"):
        open_online_store(f"sqlite:///{tmp_path / 'notes.db'}")


@pytest.fixture
def redis_prefix_url() -> Iterator[str]:
    url = redis_url()
    yield url
    drop_redis_keys(url)


def test_redis_key_layout_and_ttl(redis_prefix_url: str) -> None:
    import redis

    store = RedisOnlineStore(redis_prefix_url, ttl_days=2)
    prefix = store.prefix
    try:
        store.record([ev(TS, "C 1", "P|1"), ev(TS + 1, "C 1", "P|1", "view")])
        with redis.Redis.from_url(REDIS, decode_responses=True) as client:
            key = f"{prefix}:online:"
            assert set(client.scan_iter(match=f"{prefix}:*")) == {
                key + "seq", key + "products", key + "user:C 1", key + "product:P|1",
            }
            assert client.zrange(key + "user:C 1", 0, -1, withscores=True) == [
                (f"{1:020d}|[{TS},\"click\",\"P|1\"]", TS), (f"{2:020d}|[{TS + 1},\"view\",\"P|1\"]", TS + 1),
            ]
            assert client.hgetall(key + "product:P|1") == {"click": "1", "view": "1"}
            assert client.smembers(key + "products") == {"P|1"} and client.get(key + "seq") == "2"
            assert 2 * 86_400 - 60 < client.ttl(key + "user:C 1") <= 2 * 86_400
            assert client.ttl(key + "product:P|1") == -1  # counts never expire
    finally:
        store.close()
    with pytest.raises(ConfigError, match="ttl_days"):
        RedisOnlineStore(redis_prefix_url, ttl_days=0)


# -- the position in the event log (apply) ---------------------------------------------------------------


def test_apply_records_and_moves_the_position_only_from_where_it_is(store: OnlineFeatureStore) -> None:
    assert store.position() is None
    assert store.apply([ev(TS, product_id="P-1")], after=0, upto=3)
    assert store.position() == 3 and store.recent("C-1") == [act(TS, "P-1")]
    assert not store.apply([ev(TS + 1, product_id="P-2")], after=0, upto=5)  # stale: nothing written
    assert store.position() == 3 and store.recent("C-1") == [act(TS, "P-1")]
    assert store.product_counts() == {"P-1": {"click": 1}}
    assert store.apply([], after=3, upto=9) and store.position() == 9  # a position without events
    with pytest.raises(ValueError):
        store.apply([], after=9, upto=8)
    with pytest.raises(TypeError):
        store.apply(["not an event"], after=9, upto=10)  # type: ignore[list-item]
    assert store.position() == 9


def test_two_stores_on_one_url_apply_each_entry_once(shared_url: str) -> None:
    a, b = open_online_store(shared_url), open_online_store(shared_url)
    try:
        assert a.apply([ev(TS)], after=0, upto=1)
        assert not b.apply([ev(TS)], after=0, upto=1)  # b read position 0 before a moved it: refused
        assert b.position() == 1 and len(b.recent("C-1")) == 1
    finally:
        a.close()
        b.close()


def test_follower_applies_the_log_once_and_catches_up_after_missing_events(store: OnlineFeatureStore) -> None:
    from finrec.events.store import open_event_store
    from finrec.features.online.follow import EventFollower

    log = open_event_store("memory://")
    follower = EventFollower(log, store, batch=2)
    log.append([ev(TS + i, product_id=f"P-{i}") for i in range(5)])
    assert follower.sync() == 5 and store.position() == 5
    assert follower.sync() == 0  # nothing new: nothing applied twice
    log.append([ev(TS + 10, product_id="P-9")])
    follower.after_append()
    assert [a.product_id for a in store.recent("C-1")] == [f"P-{i}" for i in range(5)] + ["P-9"]
    log.close()
