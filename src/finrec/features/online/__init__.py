"""The online feature store: what the latest events say about each customer and product, at request time.

The model's features are frozen when it is trained; between retrains only recent events can tell the service that
a customer just applied for a card or keeps coming back to mortgages. ``POST /events`` stores accepted events in
the event store (the durable log, :mod:`finrec.events.store`) and passes the new ones to this store, which keeps
them in the shape a recommendation reads on every request: each customer's newest activity in time order, and
per product a count of each event type.

The event and the next request usually reach different workers (processes, or hosts behind a load balancer), so
the store is shared: what ``record`` wrote is visible to every reader of the same URL as soon as it returns, well
within the second before the customer asks again. It is a derived view, not a log: it keeps at most
``max_per_user`` events per customer, does not de-duplicate (the event store already has) and can be rebuilt by
replaying the event log, so it needs no durability of its own beyond what its backend gives.

:class:`OnlineFeatureStore` is the interface and its docstring the contract, which
``tests/contract/test_online_store.py`` checks against every implementation. :func:`open_online_store` picks one
by URL:

* ``memory://``: :class:`~finrec.features.online.memory.MemoryOnlineStore`, one process; tests and development.
* ``sqlite:///relative/path/online.db`` or ``sqlite:////absolute/path/online.db``:
  :class:`~finrec.features.online.sqlite.SQLiteOnlineStore`, shared by the processes of one host.
* ``redis://host:port/db`` (``rediss://`` for TLS, ``redis://user:password@host:port/db``), optionally with
  ``?prefix=name`` (default ``finrec``): :class:`~finrec.features.online.redis.RedisOnlineStore`, shared by any
  number of hosts. Needs the ``redis`` extra.

Examples
--------
>>> store = open_online_store("memory://")
>>> store.record([Event("e-1", "C-1", "P-1", "click", 1_700_000_060),
...               Event("e-2", "C-1", "P-2", "view", 1_700_000_000)])
>>> [(a.ts, a.event_type, a.product_id) for a in store.recent("C-1")]
[(1700000000, 'view', 'P-2'), (1700000060, 'click', 'P-1')]
>>> store.recent("C-1", since=1_700_000_030)
[Activity(ts=1700000060, event_type='click', product_id='P-1')]
>>> store.product_counts()
{'P-1': {'click': 1}, 'P-2': {'view': 1}}
>>> store.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from finrec.errors import ConfigError
from finrec.events.schema import Event
from finrec.storage import parse_store_url

SUPPORTED_URLS = (
    "memory://, sqlite:///relative/path/online.db, sqlite:////absolute/path/online.db "
    "or redis://host:6379/0 (optionally ?prefix=name)"
)
MAX_TS = 2**53  # timestamps must be below this in magnitude: Redis scores are doubles, exact only up to 2**53

__all__ = ["SUPPORTED_URLS", "Activity", "OnlineFeatureStore", "open_online_store"]


@dataclass(frozen=True, slots=True)
class Activity:
    """One recorded event of a customer: when (unix seconds, UTC), what and on which product."""

    ts: int
    event_type: str
    product_id: str


class OnlineFeatureStore(Protocol):
    """Recent activity per customer and event counts per product, shared by every worker that opens the same URL.

    The contract every implementation keeps:

    * No de-duplication: every event passed to :meth:`record` is counted and kept. Callers pass only the events
      the event store reported as newly stored (``EventStore.append`` returned ``True``), so a retried request
      does not count twice; this store never looks at ``event_id``.
    * Validated first: :meth:`record` checks every event (an :class:`Event`, text ids and event type, an integer
      ``ts`` with ``abs(ts) < 2**53``) before writing any, and raises ``TypeError``/``ValueError`` with nothing
      written.
    * Atomic per call per customer: a reader sees all of a call's events for a customer or none of them (the
      implementations here make the whole call atomic, product counts included).
    * Visible: when :meth:`record` returns, every reader of the same URL sees its events: other threads, other
      store objects and, for SQLite and Redis, other processes (and other hosts, for Redis).
    * Newest kept: each customer keeps at most ``max_per_user`` events, the newest by ``(ts, recording order)``;
      older ones are dropped when a call records past the limit. Events may arrive out of time order, so an event
      older than all of a full customer's kept events is dropped at once.
    * Ordered: :meth:`recent` lists a customer's kept events with ``ts >= since`` by ``ts``, and events with equal
      ``ts`` in recording order (a call's events in their order in the call; calls in the order they returned).
    * Counted: :meth:`product_counts` has, per product and event type, the number of events ever recorded; the
      counts are not trimmed.
    * Positioned: the store keeps the sequence number of the last event-log entry applied to it
      (:meth:`position`, None until one is set). :meth:`apply` records events and moves the position from
      ``after`` to ``upto`` in one atomic step, and does neither (returning False) if the stored position (0 when
      unset) is not ``after``; so processes sharing the store apply each entry of the log once
      (:mod:`finrec.features.online.follow`).
    * Shareable: an instance may be used by many threads at once. :meth:`close` releases resources and may be
      called twice; every other method then raises ``RuntimeError``.
    """

    max_per_user: int

    def record(self, events: Sequence[Event]) -> None:
        """Add new events to their customers' recent activity and their products' counts."""
        ...

    def recent(self, user_id: str, since: int = 0) -> list[Activity]:
        """The customer's kept events with ``ts >= since``, oldest first; ``[]`` for an unknown customer."""
        ...

    def recent_many(self, user_ids: Sequence[str], since: int = 0) -> dict[str, list[Activity]]:
        """:meth:`recent` for several customers in one call (one round trip for Redis), keyed by user id."""
        ...

    def product_counts(self) -> dict[str, dict[str, int]]:
        """Per product id, per event type, how many events were recorded."""
        ...

    def position(self) -> int | None:
        """Sequence number in the event log of the last event applied (None: never set)."""
        ...

    def apply(self, events: Sequence[Event], after: int, upto: int) -> bool:
        """:meth:`record` ``events`` and move the position from ``after`` to ``upto``, atomically, if it is at
        ``after``; False (nothing written) if it is not."""
        ...

    def close(self) -> None:
        """Release resources; the store cannot be used afterwards."""
        ...


def open_online_store(url: str, max_per_user: int = 500, timeout: float = 5.0) -> OnlineFeatureStore:
    """Open the online feature store a URL names.

    Parameters
    ----------
    url
        ``memory://``, ``sqlite:///relative/path/online.db``, ``sqlite:////absolute/path/online.db`` or
        ``redis://host:port/db`` (``rediss://`` for TLS), optionally with ``?prefix=name``.
    max_per_user
        How many events to keep per customer (the newest); at least 1. Stores opened on the same URL should agree,
        as each trims to its own limit when it records.
    timeout
        Seconds one call may wait (a Redis command, a SQLite lock) before it raises.

    Returns
    -------
    OnlineFeatureStore
        A ``MemoryOnlineStore``, ``SQLiteOnlineStore`` or ``RedisOnlineStore``.

    Raises
    ------
    ConfigError
        If the URL is malformed or its scheme unsupported, ``max_per_user`` is not a positive integer, the SQLite
        file cannot be used or the Redis server cannot be reached. Redis URLs are never echoed (passwords).
    """
    if isinstance(url, str):  # as before: text first, then the limit, then the URL's form
        _check_max(max_per_user)
    kind, path = parse_store_url(url, "online store", SUPPORTED_URLS)
    if kind == "redis":
        from finrec.features.online.redis import RedisOnlineStore

        return RedisOnlineStore(url, max_per_user=max_per_user, connect_timeout=timeout)
    if kind == "memory":
        from finrec.features.online.memory import MemoryOnlineStore

        return MemoryOnlineStore(max_per_user=max_per_user)
    from finrec.features.online.sqlite import SQLiteOnlineStore

    assert path is not None
    return SQLiteOnlineStore(path, max_per_user=max_per_user, busy_timeout_ms=int(timeout * 1000))


def _check_max(max_per_user: int) -> int:
    """``max_per_user`` if it is a positive integer, else ConfigError (it usually comes from the settings)."""
    if type(max_per_user) is not int or max_per_user < 1:
        raise ConfigError(
            f"max_per_user must be a positive integer, got {max_per_user!r}",
            hint="keep a few hundred events per customer, e.g. 500",
        )
    return max_per_user


def _check_events(events: Sequence[Event]) -> Sequence[Event]:
    """The events, after checking all of them, so that a bad item raises before anything is written."""
    for event in events:
        if not isinstance(event, Event):
            raise TypeError(f"record takes Event objects only, got {type(event).__name__}")
        for name in ("user_id", "event_type", "product_id"):
            if not isinstance(getattr(event, name), str):
                raise TypeError(f"Event.{name} must be text, got {type(getattr(event, name)).__name__}")
        if type(event.ts) is not int:
            raise TypeError(f"Event.ts must be an integer (unix seconds), got {type(event.ts).__name__}")
        if not -MAX_TS < event.ts < MAX_TS:
            raise ValueError(f"Event.ts {event.ts} is out of range; unix seconds are expected")
    return events


def _check_position(after: int, upto: int) -> None:
    if type(after) is not int or type(upto) is not int or not 0 <= after <= upto:
        raise ValueError(f"positions must be integers with 0 <= after <= upto, got {after!r}, {upto!r}")


def _check_open(closed: bool) -> None:
    if closed:
        raise RuntimeError("the online feature store is closed")
