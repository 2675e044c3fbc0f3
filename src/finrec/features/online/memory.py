"""An online feature store in process memory, for tests, development and single-process runs.

Each customer's activity is a list kept sorted by ``(ts, recording number)``, so out-of-order arrivals are
inserted in place, trimming drops the front, and ``recent`` finds ``since`` by bisection. One lock around every
method makes calls atomic and the store thread-safe; nothing is shared with other processes or survives the
process, which is why the service uses SQLite or Redis once it runs more than one worker.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Sequence

from finrec.events.schema import Event
from finrec.features.online import Activity, _check_events, _check_max, _check_open, _check_position


class MemoryOnlineStore:
    """An :class:`~finrec.features.online.OnlineFeatureStore` in process memory; gone when the process ends.

    Parameters
    ----------
    max_per_user
        How many events to keep per customer (the newest by ``ts``, then recording order).

    Examples
    --------
    >>> store = MemoryOnlineStore(max_per_user=2)
    >>> store.record([Event(f"e-{i}", "C-1", "P-1", "view", 1_700_000_000 + i) for i in range(3)])
    >>> [a.ts for a in store.recent("C-1")], store.product_counts()
    ([1700000001, 1700000002], {'P-1': {'view': 3}})
    """

    def __init__(self, max_per_user: int = 500) -> None:
        self.max_per_user = _check_max(max_per_user)
        self._lock = threading.Lock()
        # Per customer: (ts, recording number, activity), sorted; the numbers are unique, so activities are never
        # compared.
        self._users: dict[str, list[tuple[int, int, Activity]]] = {}
        self._counts: dict[str, Counter[str]] = {}
        self._seq = 0
        self._position: int | None = None
        self._closed = False

    def record(self, events: Sequence[Event]) -> None:
        """Add new events to their customers' activity and their products' counts; see the contract."""
        _check_events(events)
        with self._lock:
            _check_open(self._closed)
            self._record(events)

    def position(self) -> int | None:
        """Sequence number in the event log of the last event applied (None: never set)."""
        with self._lock:
            _check_open(self._closed)
            return self._position

    def apply(self, events: Sequence[Event], after: int, upto: int) -> bool:
        """Record ``events`` and move the position from ``after`` to ``upto`` if it is at ``after``."""
        _check_events(events)
        _check_position(after, upto)
        with self._lock:
            _check_open(self._closed)
            if (self._position or 0) != after:
                return False
            self._record(events)
            self._position = upto
            return True

    def _record(self, events: Sequence[Event]) -> None:
        touched: set[str] = set()
        for event in events:
            self._seq += 1
            rows = self._users.setdefault(event.user_id, [])
            insort(rows, (event.ts, self._seq, Activity(event.ts, event.event_type, event.product_id)))
            touched.add(event.user_id)
            self._counts.setdefault(event.product_id, Counter())[event.event_type] += 1
        for user_id in touched:
            rows = self._users[user_id]
            if len(rows) > self.max_per_user:
                del rows[: len(rows) - self.max_per_user]

    def recent(self, user_id: str, since: int = 0) -> list[Activity]:
        """The customer's kept events with ``ts >= since``, by ``ts`` then recording order."""
        with self._lock:
            _check_open(self._closed)
            return self._recent(user_id, since)

    def recent_many(self, user_ids: Sequence[str], since: int = 0) -> dict[str, list[Activity]]:
        """:meth:`recent` for several customers, read under one lock (a consistent snapshot)."""
        with self._lock:
            _check_open(self._closed)
            return {user_id: self._recent(user_id, since) for user_id in user_ids}

    def product_counts(self) -> dict[str, dict[str, int]]:
        """Per product id, per event type, how many events were recorded."""
        with self._lock:
            _check_open(self._closed)
            return {product_id: dict(counts) for product_id, counts in self._counts.items()}

    def close(self) -> None:
        """Drop the data; may be called twice, other methods then raise ``RuntimeError``."""
        with self._lock:
            self._closed = True
            self._users.clear()
            self._counts.clear()

    def _recent(self, user_id: str, since: int) -> list[Activity]:
        rows = self._users.get(user_id, [])
        return [row[2] for row in rows[bisect_left(rows, since, key=_ts) :]]


def _ts(row: tuple[int, int, Activity]) -> int:
    return row[0]
