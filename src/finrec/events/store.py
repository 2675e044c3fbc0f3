"""The event log behind ``POST /events``: append-only, idempotent on ``event_id``, read back in arrival order.

Senders retry after timeouts and dropped connections, so the same event arrives more than once; the log stores
each ``event_id`` once and tells the caller which events were new. Consumers (online features, monitoring) tail
the log with :meth:`EventStore.read`, remembering the last sequence number they saw, so sequence numbers must
never be reordered or reused.

:class:`EventStore` is the interface and its docstring the contract, which ``tests/contract/test_event_store.py``
checks against every implementation. :func:`open_event_store` picks one by URL:

* ``memory://``: :class:`MemoryEventStore`, one process, lost on exit; for tests and development.
* ``sqlite:///relative/path/events.db`` or ``sqlite:////absolute/path/events.db``: :class:`SQLiteEventStore`,
  a file shared by the threads and processes of one host (not over a network file system).
* ``redis://host:port/db`` (or ``rediss://`` for TLS, ``redis://user:password@host:port/db`` with a password),
  optionally with ``?prefix=name`` to namespace the keys (default ``finrec``): :class:`RedisEventStore`, a log in
  one Redis server shared by any number of hosts. Needs the ``redis`` extra (``pip install 'finrec[redis]'``).

Examples
--------
>>> store = open_event_store("memory://")
>>> event = Event("e-1", "C-1", "P-1", "click", 1_700_000_000)
>>> store.append([event, event])
[True, False]
>>> [(seq, e.event_id) for seq, e in store.read()]
[(1, 'e-1')]
>>> store.close()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import fields
from operator import attrgetter
from pathlib import Path
from typing import Protocol

from finrec.errors import ConfigError, FinrecError
from finrec.events.schema import Event
from finrec.storage import open_wal_database, parse_store_url

SUPPORTED_URLS = (
    "memory://, sqlite:///relative/path/events.db, sqlite:////absolute/path/events.db "
    "or redis://host:6379/0 (optionally ?prefix=name)"
)
_COLUMNS = tuple(f.name for f in fields(Event))
_fields_of = attrgetter(*_COLUMNS)  # a tuple in column order; dataclasses.astuple deep-copies and is slower
_REQUIRED_COLUMNS = frozenset(f.name for f in fields(Event) if f.default is not None)

log = logging.getLogger(__name__)


class EventStore(Protocol):
    """An append-only log of events, idempotent on ``event_id``.

    The contract every implementation keeps:

    * Idempotent: an ``event_id`` is stored at most once, ever. The first copy stored wins; later copies, in a
      later call or later in the same call, are ignored and reported as ``False``. Content is not compared.
    * Atomic: a call to :meth:`append` stores all of its new events or, if it raises, none of them.
    * Durable: when :meth:`append` returns, its events survive a kill of the process (SIGKILL), though not
      necessarily a power loss or an operating-system crash. :class:`MemoryEventStore` is the exception.
    * Ordered: each stored event gets a sequence number >= 1, strictly increasing in storage order but not
      necessarily contiguous. Numbers are never reused, and no event becomes visible after one with a higher
      number, so a consumer calling ``read(after=last_seen)`` in a loop sees every event exactly once.
    * Shareable: an instance may be used by many threads at once; stores opened from the same URL (by other
      processes, too, where the backend allows it) see the same log.
    * :meth:`close` releases resources and may be called twice; other methods then raise ``RuntimeError``.
    """

    def append(self, events: Sequence[Event]) -> list[bool]:
        """Store a batch; one flag per event, ``True`` if newly stored, ``False`` if its ``event_id`` already was."""
        ...

    def read(self, after: int = 0, limit: int = 10_000) -> list[tuple[int, Event]]:
        """Up to ``limit`` events with sequence numbers greater than ``after``, as ``(seq, event)`` in order."""
        ...

    def count(self) -> int:
        """Number of events stored."""
        ...

    def close(self) -> None:
        """Release resources; the store cannot be used afterwards."""
        ...


class MemoryEventStore:
    """An :class:`EventStore` in process memory: atomic, ordered and thread-safe, but gone when the process ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: list[tuple[int, Event]] = []  # sequence number = position + 1
        self._ids: set[str] = set()
        self._closed = False

    def append(self, events: Sequence[Event]) -> list[bool]:
        with self._lock:
            _check_open(self._closed)
            # Decide everything before changing anything, so a bad item leaves the log as it was.
            fresh: dict[str, Event] = {}
            flags = []
            for event in events:
                _row(event)  # the same type check as SQLite's
                new = event.event_id not in self._ids and event.event_id not in fresh
                if new:
                    fresh[event.event_id] = event
                flags.append(new)
            self._log.extend(enumerate(fresh.values(), start=len(self._log) + 1))
            self._ids.update(fresh)
            return flags

    def read(self, after: int = 0, limit: int = 10_000) -> list[tuple[int, Event]]:
        start = max(after, 0)
        with self._lock:
            _check_open(self._closed)
            return self._log[start : start + _check_limit(limit)]

    def count(self) -> int:
        with self._lock:
            _check_open(self._closed)
            return len(self._log)

    def close(self) -> None:
        self._closed = True


class SQLiteEventStore:
    """An :class:`EventStore` in one SQLite file, shared by the threads and processes of one host.

    Parameters
    ----------
    path
        The database file; created with its parent directories if missing. Relative paths start at the
        working directory.
    busy_timeout_ms
        How long an append waits for another process's write to finish before it fails with
        ``sqlite3.OperationalError`` ("database is locked").
    durability
        ``process``: an appended batch survives a kill of the process (``synchronous=NORMAL``). ``power``: a
        power loss or an OS crash too (``synchronous=FULL``: an fsync per append).
    """

    def __init__(self, path: str | Path, busy_timeout_ms: int = 10_000, durability: str = "process") -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one connection for all threads; sqlite3 connections are not thread-safe
        self._closed = False
        # seq is an explicit AUTOINCREMENT key: numbers are never reused (not even after deleting the newest rows)
        # and VACUUM cannot renumber them, as it may an implicit rowid. UNIQUE on event_id is the idempotency key
        # that INSERT OR IGNORE relies on, exactly as a PRIMARY KEY would be.
        schema = (
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "event_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL, product_id TEXT NOT NULL, "
            "event_type TEXT NOT NULL, ts INTEGER NOT NULL, position INTEGER, request_id TEXT, "
            "channel TEXT, arm TEXT, model_version TEXT)",
        )
        probe = f"SELECT {', '.join(_COLUMNS)} FROM events LIMIT 0"  # an older or foreign table
        self._db = open_wal_database(self.path, "event store", schema, (probe,), busy_timeout_ms,
                                     synchronous=_SYNCHRONOUS[_check_durability(durability)])  # fmt: skip
        self._insert = f"INSERT OR IGNORE INTO events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        self._select = f"SELECT seq, {', '.join(_COLUMNS)} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"

    def append(self, events: Sequence[Event]) -> list[bool]:
        with self._lock:
            _check_open(self._closed)
            # IMMEDIATE takes the write lock up front: a writer waiting in busy_timeout cannot deadlock with
            # another process upgrading a read transaction, and seq order equals commit order, which read relies on.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                flags = [self._db.execute(self._insert, _row(e)).rowcount == 1 for e in events]
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return flags

    def read(self, after: int = 0, limit: int = 10_000) -> list[tuple[int, Event]]:
        with self._lock:
            _check_open(self._closed)
            rows = self._db.execute(self._select, (max(after, 0), _check_limit(limit))).fetchall()
        return [(row[0], Event(*row[1:])) for row in rows]

    def count(self) -> int:
        with self._lock:
            _check_open(self._closed)
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()


_SYNCHRONOUS = {"process": "NORMAL", "power": "FULL"}


def _check_durability(durability: str) -> str:
    if durability not in _SYNCHRONOUS:
        raise ConfigError(f"durability must be 'process' or 'power', got {durability!r}",
                          hint="set [events] durability")  # fmt: skip
    return durability


def open_event_store(url: str, durability: str = "process", timeout: float | None = None) -> EventStore:
    """Open the event store a URL names.

    Parameters
    ----------
    url
        ``memory://``, ``sqlite:///relative/path/events.db``, ``sqlite:////absolute/path/events.db`` or
        ``redis://host:port/db`` (``rediss://`` for TLS), optionally with ``?prefix=name``.
    durability
        ``process`` (the contract's) or ``power``: an append survives a power loss too (SQLite
        ``synchronous=FULL``; a Redis server is refused unless it runs with ``appendfsync always``).
    timeout
        Seconds one call may wait (a Redis command, a SQLite lock) before it raises (default 5 and 10).

    Returns
    -------
    EventStore
        A :class:`MemoryEventStore`, :class:`SQLiteEventStore` or :class:`RedisEventStore`.

    Raises
    ------
    ConfigError
        If the URL is malformed, its scheme is not supported, the SQLite file cannot be opened or the Redis server
        cannot be used.
    """
    kind, path = parse_store_url(url, "event store", SUPPORTED_URLS)
    if kind == "redis":
        from finrec.events.redis_store import RedisEventStore  # redis-py is imported only by those who use it

        _check_durability(durability)
        return RedisEventStore(url, **({} if timeout is None else {"connect_timeout": timeout}),
                               durability=durability)  # fmt: skip
    if kind == "memory":
        return MemoryEventStore()
    assert path is not None
    busy = {} if timeout is None else {"busy_timeout_ms": int(timeout * 1000)}
    return SQLiteEventStore(path, durability=durability, **busy)


def open_existing_event_store(url: str) -> EventStore:
    """Open an event store to read what is in it: a missing SQLite file is an error, not a new empty store.

    Raises
    ------
    FinrecError
        No store at a ``sqlite:///`` path, or the store cannot be opened (a driver missing, a server down).
    """
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise FinrecError(f"no event store at {url}", hint="pass the URL the service writes to "
                          "(serve.event_store), or point FINREC_WORKSPACE at the service's workspace")  # fmt: skip
    try:
        return open_event_store(url)
    except FinrecError:
        raise
    except Exception as exc:  # a driver missing, a server down
        raise FinrecError(f"cannot open the event store {url}: {type(exc).__name__}: {exc}",
                          hint="check the URL and that the store is reachable") from None  # fmt: skip


def _row(event: Event) -> tuple[object, ...]:
    if not isinstance(event, Event):
        raise TypeError(f"append takes Event objects only, got {type(event).__name__}")
    return _fields_of(event)


def _check_open(closed: bool) -> None:
    if closed:
        raise RuntimeError("the event store is closed")


def _check_limit(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return limit
