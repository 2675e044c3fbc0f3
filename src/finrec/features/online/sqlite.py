"""An online feature store in one SQLite file, shared by the worker processes of one host.

A host running several API workers needs them to agree on what a customer just did, without running a server:
SQLite's file locks give that. WAL mode lets the many readers (one ``recent`` per recommendation) run while a
``record`` writes, and ``synchronous=NORMAL`` skips the fsync per commit: the store is a view that the event log
can rebuild, so surviving a kill of the process (which NORMAL does) is enough. Each ``record`` is one
``BEGIN IMMEDIATE`` transaction that inserts, trims the touched customers and bumps the counters, so readers in
every process see all of it or none of it.

Tables:

* ``activity(user_id, ts, seq, event_type, product_id)``: one row per kept event; ``seq`` is the rowid, so it
  grows in recording order (a new rowid is above every existing one, even after trimming deleted the largest),
  and the index on ``(user_id, ts)``, which SQLite extends with the rowid, serves both the reads by
  ``(ts, seq)`` and the trimming.
* ``product_counts(product_id, event_type, n)``: keyed by ``(product_id, event_type)``, bumped by an UPSERT.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from finrec.events.schema import Event
from finrec.features.online import Activity, _check_events, _check_max, _check_open, _check_position
from finrec.storage import open_wal_database

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS activity (user_id TEXT NOT NULL, ts INTEGER NOT NULL, seq INTEGER PRIMARY KEY, "
    "event_type TEXT NOT NULL, product_id TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS activity_user_ts ON activity (user_id, ts)",
    "CREATE TABLE IF NOT EXISTS product_counts (product_id TEXT NOT NULL, event_type TEXT NOT NULL, "
    "n INTEGER NOT NULL, PRIMARY KEY (product_id, event_type)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS online_position (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL)",
)
_INSERT = "INSERT INTO activity (user_id, ts, event_type, product_id) VALUES (?, ?, ?, ?)"
# Everything of the customer past the newest max_per_user rows by (ts, seq).
_TRIM = (
    "DELETE FROM activity WHERE seq IN (SELECT seq FROM activity WHERE user_id = ? "
    "ORDER BY ts DESC, seq DESC LIMIT -1 OFFSET ?)"
)
_COUNT = (
    "INSERT INTO product_counts (product_id, event_type, n) VALUES (?, ?, ?) "
    "ON CONFLICT (product_id, event_type) DO UPDATE SET n = n + excluded.n"
)
_RECENT = "SELECT ts, event_type, product_id FROM activity WHERE user_id = ? AND ts >= ? ORDER BY ts, seq"


class SQLiteOnlineStore:
    """An :class:`~finrec.features.online.OnlineFeatureStore` in a SQLite file (not on a network file system).

    Parameters
    ----------
    path
        The database file; created with its parent directories if missing. It may be the event store's file:
        the table names differ.
    max_per_user
        How many events to keep per customer (the newest by ``ts``, then recording order).
    busy_timeout_ms
        How long a call waits for another process's write before failing with ``sqlite3.OperationalError``.

    Raises
    ------
    ConfigError
        If the file cannot be created or opened, or holds tables of the same names with other columns.
    """

    def __init__(self, path: str | Path, max_per_user: int = 500, busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        self.max_per_user = _check_max(max_per_user)
        self._lock = threading.Lock()  # one connection for every thread; a sqlite3 connection is not thread-safe
        self._closed = False
        # Tables of these names made by something else fail a probe now rather than at the first record.
        probes = ("SELECT user_id, ts, seq, event_type, product_id FROM activity LIMIT 0",
                  "SELECT product_id, event_type, n FROM product_counts LIMIT 0")  # fmt: skip
        self._db = open_wal_database(self.path, "online store", _SCHEMA, probes, busy_timeout_ms)

    def record(self, events: Sequence[Event]) -> None:
        """Add new events to their customers' activity and their products' counts, in one transaction."""
        _check_events(events)
        rows = [(e.user_id, e.ts, e.event_type, e.product_id) for e in events]
        users = [(user_id, self.max_per_user) for user_id in dict.fromkeys(e.user_id for e in events)]
        counts = Counter((e.product_id, e.event_type) for e in events)
        with self._lock:
            _check_open(self._closed)
            if not rows:
                return
            self._write(rows, users, counts, None)

    def position(self) -> int | None:
        """Sequence number in the event log of the last event applied (None: never set)."""
        with self._lock:
            _check_open(self._closed)
            row = self._db.execute("SELECT seq FROM online_position WHERE id = 0").fetchone()
        return None if row is None else int(row[0])

    def apply(self, events: Sequence[Event], after: int, upto: int) -> bool:
        """Record ``events`` and move the position from ``after`` to ``upto``, in one transaction, if it is at
        ``after``."""
        _check_events(events)
        _check_position(after, upto)
        rows = [(e.user_id, e.ts, e.event_type, e.product_id) for e in events]
        users = [(user_id, self.max_per_user) for user_id in dict.fromkeys(e.user_id for e in events)]
        counts = Counter((e.product_id, e.event_type) for e in events)
        with self._lock:
            _check_open(self._closed)
            return self._write(rows, users, counts, (after, upto))

    def _write(self, rows: list[tuple[str, int, str, str]], users: list[tuple[str, int]],
               counts: Counter[tuple[str, str]], move: tuple[int, int] | None) -> bool:  # fmt: skip
        # IMMEDIATE takes the write lock up front, so rowids (seq) follow commit order across processes and a
        # writer waiting in busy_timeout cannot deadlock with another upgrading a read transaction.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if move is not None:
                row = self._db.execute("SELECT seq FROM online_position WHERE id = 0").fetchone()
                if (0 if row is None else int(row[0])) != move[0]:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute("INSERT OR REPLACE INTO online_position (id, seq) VALUES (0, ?)", (move[1],))
            self._db.executemany(_INSERT, rows)
            self._db.executemany(_TRIM, users)
            self._db.executemany(_COUNT, [(p, t, n) for (p, t), n in counts.items()])
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return True

    def recent(self, user_id: str, since: int = 0) -> list[Activity]:
        """The customer's kept events with ``ts >= since``, by ``ts`` then recording order."""
        with self._lock:
            _check_open(self._closed)
            return [Activity(*row) for row in self._db.execute(_RECENT, (user_id, since))]

    def recent_many(self, user_ids: Sequence[str], since: int = 0) -> dict[str, list[Activity]]:
        """:meth:`recent` for several customers, read in one transaction (a consistent snapshot)."""
        with self._lock:
            _check_open(self._closed)
            self._db.execute("BEGIN")
            try:
                return {u: [Activity(*row) for row in self._db.execute(_RECENT, (u, since))] for u in user_ids}
            finally:
                self._db.execute("COMMIT")  # a read-only transaction: ends the snapshot

    def product_counts(self) -> dict[str, dict[str, int]]:
        """Per product id, per event type, how many events were recorded."""
        counts: dict[str, dict[str, int]] = {}
        with self._lock:
            _check_open(self._closed)
            for product_id, event_type, n in self._db.execute("SELECT product_id, event_type, n FROM product_counts"):
                counts.setdefault(product_id, {})[event_type] = n
        return counts

    def close(self) -> None:
        """Close the connection; may be called twice, other methods then raise ``RuntimeError``."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
