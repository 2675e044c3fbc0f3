"""The EventStore contract, run against every implementation.

To check a new backend, add one line to ``BACKENDS``: a URL factory (given a fresh temporary folder per test, so
each test gets an empty store), whether the store is shared, i.e. a second ``open_event_store`` of the same
URL, in this or another process, sees the same events, and optionally a cleanup run with the URL after the test.

The Redis cases use the server at 127.0.0.1:6379 (database 15, a fresh key prefix per test, deleted afterwards)
and skip when none answers there.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from finrec.errors import ConfigError
from finrec.events.redis_store import RedisEventStore
from finrec.events.schema import Event
from finrec.events.store import EventStore, MemoryEventStore, SQLiteEventStore, open_event_store
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
    "sqlite": Backend(lambda tmp: f"sqlite:///{tmp / 'log' / 'events.db'}", shared=True),
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
def store(store_url: str) -> Iterator[EventStore]:
    opened = open_event_store(store_url)
    yield opened
    opened.close()


@pytest.fixture
def shared_url(backend: Backend, store_url: str) -> str:
    if not backend.shared:
        pytest.skip("this backend lives inside one store object")
    return store_url


def ev(event_id: str, event_type: str = "click", **fields: object) -> Event:
    return Event(event_id, "C-1", "P-1", event_type, TS, **fields)  # type: ignore[arg-type]


def test_append_is_idempotent_on_event_id(store: EventStore) -> None:
    full = ev("e-1", position=3, request_id="r-1", channel="app", arm="explore", model_version="v2")
    assert store.append([full, ev("e-2")]) == [True, True]
    assert store.append([ev("e-1", "apply"), ev("e-3")]) == [False, True]  # first copy wins; content not compared
    assert store.append([full, ev("e-2"), ev("e-3")]) == [False, False, False]  # the whole batch sent again
    assert store.append([ev("e-4"), ev("e-4", "view"), ev("e-5")]) == [True, False, True]  # within one call
    assert store.append([]) == []
    assert store.count() == 5
    assert [e for _, e in store.read()] == [full, ev("e-2"), ev("e-3"), ev("e-4"), ev("e-5")]


def test_text_and_numbers_round_trip_exactly(store: EventStore) -> None:
    events = [
        Event("é-1:x y", "C-ü", "P-1", "view", 2**40, position=100_000, request_id="r:1", channel="", arm="a b"),
        Event("e-2", "C-1", "P-1", "click", 946_684_800, position=1, model_version="v-\u2603 🙂 \\ \" '"),
        Event("e-3", "C-1", "P-1", "click", 0),
    ]
    assert store.append(events) == [True, True, True]
    assert [e for _, e in store.read()] == events  # ints stay ints, "" stays "", None stays None
    assert all(type(e.ts) is int and type(e.position) in (int, type(None)) for _, e in store.read())


def test_read_returns_arrival_order_with_increasing_sequence_numbers_and_pages(store: EventStore) -> None:
    ids = [f"e-{i:02d}" for i in range(25)]
    for start in range(0, 25, 7):
        store.append([ev(i) for i in ids[start : start + 7]])
    everything = store.read()
    seqs = [seq for seq, _ in everything]
    assert [e.event_id for _, e in everything] == ids
    assert seqs[0] >= 1 and all(a < b for a, b in zip(seqs, seqs[1:], strict=False))
    pages, after = [], 0
    while page := store.read(after=after, limit=10):
        pages.append(page)
        after = page[-1][0]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [row for page in pages for row in page] == everything
    assert store.read(after=seqs[-1]) == [] and store.read(after=seqs[11], limit=2) == everything[12:14]
    store.append([ev("late")])
    assert [e.event_id for _, e in store.read(after=after)] == ["late"]
    with pytest.raises(ValueError, match="limit"):
        store.read(limit=0)


def test_a_batch_that_fails_part_way_stores_nothing(store: EventStore) -> None:
    store.append([ev("kept")])
    with pytest.raises(TypeError, match="Event objects"):
        store.append([ev("a"), ev("b"), {"event_id": "c"}])  # type: ignore[list-item]
    assert store.count() == 1
    assert store.append([ev("a"), ev("kept")]) == [True, False]  # nothing of the failed batch was kept


def test_two_threads_appending_at_once_lose_nothing(store: EventStore) -> None:
    flags: dict[str, list[bool]] = {"x": [], "y": []}

    def writer(name: str) -> None:
        for batch in range(40):
            # Half the ids are the thread's own, half are sent by both threads: each must be stored exactly once.
            events = [ev(f"{name}-{batch}-{i}") for i in range(5)] + [ev(f"both-{batch}-{i}") for i in range(5)]
            flags[name] += store.append(events)

    threads = [threading.Thread(target=writer, args=(name,)) for name in flags]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = store.read(limit=10_000)
    assert store.count() == len(rows) == 600 == sum(flags["x"]) + sum(flags["y"])
    assert len({e.event_id for _, e in rows}) == 600
    assert all(a[0] < b[0] for a, b in zip(rows, rows[1:], strict=False))


def test_close_is_final_and_may_be_repeated(store_url: str) -> None:
    store = open_event_store(store_url)
    store.close()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.append([ev("e")])
    with pytest.raises(RuntimeError, match="closed"):
        store.read()


def test_a_reopened_store_keeps_everything(shared_url: str) -> None:
    first = open_event_store(shared_url)
    first.append([ev("e-1", position=2, channel="web"), ev("e-2")])
    before = first.read()
    first.close()
    again = open_event_store(shared_url)
    try:
        assert again.read() == before and again.count() == 2
        assert again.append([ev("e-2"), ev("e-3")]) == [False, True]
        assert again.read()[-1][0] > before[-1][0]
    finally:
        again.close()


WRITER = """
import os, signal, sys
from finrec.events.schema import Event
from finrec.events.store import open_event_store
url, name, batches, kill = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "kill"
store = open_event_store(url)
for b in range(batches):
    store.append([Event(f"{name}-{b}-{i}", "C-1", "P-1", "view", 1_700_000_000) for i in range(10)]
                 + [Event(f"both-{b}-{i}", "C-1", "P-1", "view", 1_700_000_000) for i in range(10)])
print("appended", flush=True)
if kill:
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush, no atexit
store.close()
"""


def run_writer(url: str, name: str, batches: int, kill: bool = False) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", WRITER, url, name, str(batches), "kill" if kill else "close"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_appended_events_survive_a_kill_of_the_process(shared_url: str) -> None:
    writer = run_writer(shared_url, "killed", batches=5, kill=True)
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL and out == "appended\n", err
    store = open_event_store(shared_url)
    try:
        assert store.count() == 100
    finally:
        store.close()


def test_two_processes_appending_at_once_lose_nothing(shared_url: str) -> None:
    open_event_store(shared_url).close()  # as a service would at start-up
    writers = [run_writer(shared_url, name, batches=100) for name in ("p", "q")]
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    store = open_event_store(shared_url)
    try:
        rows = store.read()
        assert store.count() == len(rows) == len({e.event_id for _, e in rows}) == 2 * 1000 + 1000
        assert all(a[0] < b[0] for a, b in zip(rows, rows[1:], strict=False))
    finally:
        store.close()


def test_urls_pick_the_implementation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    stores = [open_event_store("memory://"), open_event_store("sqlite:///rel/dir/a.db")]
    stores.append(open_event_store(f"SQLite:///{tmp_path / 'abs.db'}"))
    try:
        assert isinstance(stores[0], MemoryEventStore) and isinstance(stores[1], SQLiteEventStore)
        assert (tmp_path / "rel" / "dir" / "a.db").is_file() and (tmp_path / "abs.db").is_file()
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "has no scheme"),
        ("events.db", "has no scheme"),
        ("postgres://db/events", "scheme 'postgres' is not supported"),
        ("memory://named", "memory:// takes none"),
        ("sqlite://events.db", "is not a SQLite file URL"),
        ("sqlite:///", "is not a SQLite file URL"),
        ("sqlite:///dir/", "is not a SQLite file URL"),
        ("sqlite:///events.db?mode=ro", "is not a SQLite file URL"),
    ],
)
def test_bad_urls_are_refused_with_the_supported_forms(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        open_event_store(url)
    assert "memory://" in str(caught.value.hint) and "sqlite:///" in str(caught.value.hint)
    assert "redis://" in str(caught.value.hint)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://user:secret@localhost:port/0", "invalid host or port"),
        ("redis://:secret@/0", "has no host"),
        ("redis://user:secret@localhost:6379/zero", "must be a database number"),
        ("redis://user:secret@localhost:6379/0?prefix=", "prefix must be given once"),
        ("redis://user:secret@localhost:6379/0?prefix=a b", "prefix must be given once"),
        ("redis://user:secret@localhost:6379/0?prefix=a&prefix=b", "prefix must be given once"),
        ("redis://user:secret@localhost:6379/0?password=secret", "unknown options 'password'"),
    ],
)
def test_bad_redis_urls_are_refused_without_showing_the_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        open_event_store(url)
    assert "redis://host:port/db" in str(caught.value.hint)
    assert "secret" not in str(caught.value)


def test_an_unreachable_redis_is_a_config_error_naming_the_address() -> None:
    with pytest.raises(ConfigError, match="no Redis server answers at 127.0.0.1:1: ") as caught:
        open_event_store("redis://user:secret@127.0.0.1:1/0?prefix=x")  # nothing listens on port 1
    assert "is Redis running? start one with `redis-server`" in str(caught.value.hint)
    assert "secret" not in str(caught.value) and caught.value.__cause__ is not None


@pytest.fixture
def redis_prefix_url() -> Iterator[str]:
    url = redis_url()
    yield url
    drop_redis_keys(url)


def test_redis_stores_are_namespaced_by_prefix(redis_prefix_url: str) -> None:
    import redis

    other_url = redis_prefix_url + "-other"
    first, other = open_event_store(redis_prefix_url), open_event_store(other_url)
    try:
        assert isinstance(first, RedisEventStore) and first.prefix == redis_prefix_url.rpartition("=")[2]
        first.append([ev("e-1")])
        assert other.append([ev("e-1"), ev("e-2")]) == [True, True] and first.count() == 1 and other.count() == 2
        with redis.Redis.from_url(REDIS, decode_responses=True) as client:
            key = f"{first.prefix}:events:"
            assert set(client.scan_iter(match=f"{first.prefix}:*")) == {key + "ids", key + "seq", key + "stream"}
            assert client.hgetall(key + "ids") == {"e-1": "1"} and client.get(key + "seq") == "1"
            fields = {"event_id": "e-1", "user_id": "C-1", "product_id": "P-1", "event_type": "click", "ts": str(TS)}
            assert client.xrange(key + "stream") == [("1-0", fields)]  # None fields are left out
    finally:
        first.close()
        other.close()
        drop_redis_keys(other_url)
    default = open_event_store(REDIS)  # opening only reads; nothing is written under the default prefix
    try:
        assert isinstance(default, RedisEventStore) and default.prefix == "finrec"
    finally:
        default.close()


def test_redis_never_reuses_numbers_and_a_failed_batch_stores_nothing(redis_prefix_url: str) -> None:
    import redis

    store = open_event_store(redis_prefix_url)
    prefix = redis_prefix_url.rpartition("=")[2]
    try:
        store.append([ev("e-1"), ev("e-2")])
        with redis.Redis.from_url(REDIS) as client:
            client.delete(f"{prefix}:events:seq")  # lost, e.g. evicted: numbering carries on after the stream
            store.append([ev("e-3")])
            assert [seq for seq, _ in store.read()] == [1, 2, 3]
            client.set(f"{prefix}:events:seq", "not a number")
            with pytest.raises(redis.ResponseError, match="does not hold a sequence number"):
                store.append([ev("e-4"), ev("e-5")])
            assert store.count() == 3 and client.hlen(f"{prefix}:events:ids") == 3  # checked before any write
            client.set(f"{prefix}:events:seq", "10")
            assert store.append([ev("e-4"), ev("e-1")]) == [True, False]
            assert [seq for seq, _ in store.read()] == [1, 2, 3, 11]
    finally:
        store.close()


def test_a_redis_prefix_holding_other_data_is_refused(redis_prefix_url: str) -> None:
    import redis

    prefix = redis_prefix_url.rpartition("=")[2]
    with redis.Redis.from_url(REDIS) as client:
        client.set(f"{prefix}:events:stream", "something else")
    with pytest.raises(ConfigError, match=f"cannot use prefix '{prefix}' .*:events:stream is a string"):
        open_event_store(redis_prefix_url)


def test_a_file_that_is_not_an_event_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("not a database, just text that is long enough " * 50)
    with pytest.raises(ConfigError, match="cannot use .* as an event store"):
        open_event_store(f"sqlite:///{tmp_path / 'notes.db'}")
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(ConfigError, match="cannot open the event store"):
        open_event_store(f"sqlite:///{tmp_path / 'dir.db'}")
