"""An online feature store in Redis, shared by every worker on every host that can reach the server.

When the API runs on several hosts, the event and the next recommendation usually reach different machines;
Redis is the shared memory between them, and its sorted sets fit "the newest N events of a customer, by time"
exactly: ZADD inserts out-of-order events in place, ZREMRANGEBYRANK trims, ZRANGEBYSCORE reads from ``since``.

Keys, all under ``prefix`` (default ``finrec``; the event store's keys are ``<prefix>:events:*``):

* ``<prefix>:online:user:<user_id>``: a sorted set per customer, scored by ``ts``. Each member is
  ``<seq>|<JSON [ts, event_type, product_id]>`` with ``seq`` zero-padded to 20 digits: it makes members unique
  (two identical events stay two) and, since Redis orders equal scores by member, puts events with the same
  ``ts`` in recording order. JSON keeps any text, ``|`` and ``:`` included, decodable.
* ``<prefix>:online:seq``: the counter the ``seq`` numbers come from, shared by every client, so recording order
  holds across processes and hosts.
* ``<prefix>:online:product:<product_id>``: a hash per product, event type -> count (HINCRBY).
* ``<prefix>:online:products``: the set of product ids that have a hash, for :meth:`product_counts`.
* ``<prefix>:online:position``: the event log's sequence number of the last event applied (``apply``).

A ``record`` takes its ``seq`` numbers with one INCRBY, then sends everything else as one MULTI/EXEC pipeline, so
no reader sees part of a call. (A Lua script could do both in one round trip; MULTI/EXEC keeps the writes in plain
commands that any Redis, proxy or ACL profile allows, for one extra round trip.) Numbers taken by a call that then
fails are skipped, which is harmless. EXEC does not roll back: if a command fails inside it (a key of the wrong
type under the prefix), the others still apply and redis-py raises ``ResponseError``.

Like the event store, this module leaves Redis persistence to the server's configuration; the store can be
rebuilt from the event log. The URL is parsed by the event store's own (private) ``_parse_redis_url``, imported
rather than copied so both stores accept exactly the same URLs.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from finrec.errors import ConfigError
from finrec.events.redis_store import _REDIS_HINT, _parse_redis_url
from finrec.events.schema import Event
from finrec.features.online import SUPPORTED_URLS, Activity, _check_events, _check_max, _check_open, _check_position

_SEQ_DIGITS = 20  # 10**20 > 2**64: Redis counters never outgrow the padding, so members sort by number


class RedisOnlineStore:
    """An :class:`~finrec.features.online.OnlineFeatureStore` in a Redis server; see the module for the key layout.

    Parameters
    ----------
    url
        ``redis://[[user]:password@]host[:port][/db][?prefix=name]``, or ``rediss://`` for TLS.
    max_per_user
        How many events to keep per customer (the newest by ``ts``, then recording order).
    ttl_days
        If set, each customer's key expires this many days after the customer's last recorded event, so the
        activity of customers who went quiet stops taking memory. ``None`` (the default) keeps it until trimmed.
        Product counts never expire. Not settable through the URL.
    connect_timeout
        Seconds to wait for a connection; also the limit on each command.

    Raises
    ------
    ConfigError
        If the URL is malformed, the redis package is missing, or the server does not answer or refuses the
        credentials or the database. The URL's password never appears in the message.
    """

    def __init__(
        self, url: str, max_per_user: int = 500, ttl_days: float | None = None, connect_timeout: float = 5.0
    ) -> None:
        scheme, host, port, db, password, prefix = _parse_redis_url(url)
        self.max_per_user = _check_max(max_per_user)
        if ttl_days is not None and not (isinstance(ttl_days, int | float) and ttl_days * 86_400 >= 1):
            raise ConfigError(f"ttl_days must be None or positive, got {ttl_days!r}", hint="e.g. ttl_days=30")
        self._ttl = None if ttl_days is None else int(ttl_days * 86_400)
        self.prefix = prefix
        self.address = f"{host}:{port}/{db}"  # for messages; never the URL, which may hold a password
        self._seq_key = f"{prefix}:online:seq"
        self._position_key = f"{prefix}:online:position"
        self._products_key = f"{prefix}:online:products"
        self._lock = threading.Lock()
        self._closed = False
        try:
            import redis
        except ImportError as exc:
            raise ConfigError(
                "redis:// online stores need the redis package, which is not installed",
                hint="install it with `pip install 'finrec[redis]'`, or use " + SUPPORTED_URLS,
            ) from exc
        split = urlsplit(url.strip())
        plain = urlunsplit((scheme, split.netloc, split.path, "", ""))  # redis-py rejects ?prefix
        self._pool = redis.ConnectionPool.from_url(
            plain, decode_responses=True, socket_connect_timeout=connect_timeout, socket_timeout=connect_timeout
        )
        # Any: redis-py's hints allow bytes and None everywhere; decode_responses=True makes replies str.
        self._redis: Any = cast(Any, redis.Redis(connection_pool=self._pool))
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            self._pool.disconnect()
            raise _config_error(exc, redis, host, port, db, password) from exc

    def record(self, events: Sequence[Event]) -> None:
        """Add new events to their customers' activity and their products' counts, atomically (MULTI/EXEC)."""
        _check_events(events)
        _check_open(self._closed)
        if not events:
            return
        pipe = self._redis.pipeline(transaction=True)
        self._queue(pipe, events)
        pipe.execute()

    def position(self) -> int | None:
        """Sequence number in the event log of the last event applied (None: never set)."""
        _check_open(self._closed)
        value = self._redis.get(self._position_key)
        return None if value is None else int(value)

    def apply(self, events: Sequence[Event], after: int, upto: int) -> bool:
        """Record ``events`` and move the position from ``after`` to ``upto`` in one MULTI/EXEC, if it is at
        ``after`` (WATCH: a change of the position by another client in between makes EXEC write nothing)."""
        import redis

        _check_events(events)
        _check_position(after, upto)
        _check_open(self._closed)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.watch(self._position_key)
            current = pipe.get(self._position_key)
            if (0 if current is None else int(current)) != after:
                pipe.unwatch()
                return False
            first = int(self._redis.incrby(self._seq_key, len(events))) - len(events) + 1 if events else 0
            pipe.multi()
            if events:
                self._queue(pipe, events, first)
            pipe.set(self._position_key, str(upto))
            try:
                pipe.execute()
            except redis.WatchError:
                return False
        return True

    def _queue(self, pipe: Any, events: Sequence[Event], first: int | None = None) -> None:
        if first is None:
            first = int(self._redis.incrby(self._seq_key, len(events))) - len(events) + 1
        members: dict[str, dict[str, int]] = {}
        for seq, event in enumerate(events, start=first):
            body = json.dumps([event.ts, event.event_type, event.product_id], ensure_ascii=False, separators=(",", ":"))
            members.setdefault(event.user_id, {})[f"{seq:0{_SEQ_DIGITS}d}|{body}"] = event.ts
        counts = Counter((e.product_id, e.event_type) for e in events)
        for user_id, scored in members.items():
            key = self._user_key(user_id)
            pipe.zadd(key, scored)
            pipe.zremrangebyrank(key, 0, -(self.max_per_user + 1))  # all but the newest max_per_user
            if self._ttl is not None:
                pipe.expire(key, self._ttl)
        for (product_id, event_type), n in counts.items():
            pipe.hincrby(self._product_key(product_id), event_type, n)
        pipe.sadd(self._products_key, *{product_id for product_id, _ in counts})

    def recent(self, user_id: str, since: int = 0) -> list[Activity]:
        """The customer's kept events with ``ts >= since``, by ``ts`` then recording order."""
        _check_open(self._closed)
        return _decode(self._redis.zrangebyscore(self._user_key(user_id), since, "+inf"))

    def recent_many(self, user_ids: Sequence[str], since: int = 0) -> dict[str, list[Activity]]:
        """:meth:`recent` for several customers in one round trip (one MULTI/EXEC, so a consistent snapshot)."""
        _check_open(self._closed)
        unique = list(dict.fromkeys(user_ids))
        if not unique:
            return {}
        pipe = self._redis.pipeline(transaction=True)
        for user_id in unique:
            pipe.zrangebyscore(self._user_key(user_id), since, "+inf")
        return {user_id: _decode(members) for user_id, members in zip(unique, pipe.execute(), strict=True)}

    def product_counts(self) -> dict[str, dict[str, int]]:
        """Per product id, per event type, how many events were recorded (two round trips)."""
        _check_open(self._closed)
        product_ids = sorted(self._redis.smembers(self._products_key))
        pipe = self._redis.pipeline(transaction=False)
        for product_id in product_ids:
            pipe.hgetall(self._product_key(product_id))
        replies = pipe.execute() if product_ids else []
        return {
            product_id: {event_type: int(n) for event_type, n in counts.items()}
            for product_id, counts in zip(product_ids, replies, strict=True)
        }

    def close(self) -> None:
        """Close the connections; may be called twice, other methods then raise ``RuntimeError``."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._pool.disconnect()

    def _user_key(self, user_id: str) -> str:
        return f"{self.prefix}:online:user:{user_id}"

    def _product_key(self, product_id: str) -> str:
        return f"{self.prefix}:online:product:{product_id}"


def _decode(members: list[str]) -> list[Activity]:
    """Activities from sorted-set members ``<seq>|<JSON [ts, event_type, product_id]>``."""
    return [Activity(*json.loads(member[_SEQ_DIGITS + 1 :])) for member in members]


def _config_error(exc: Exception, redis: Any, host: str, port: int, db: int, password: str | None) -> ConfigError:
    """The ConfigError for a server that cannot be used, naming host and port but never the password."""
    text = str(exc)
    if password:  # redis-py's messages hold no password, but make sure
        text = text.replace(password, "***").replace(unquote(password), "***")
    errors = redis.exceptions
    if isinstance(exc, errors.AuthenticationError | errors.AuthorizationError):
        return ConfigError(f"Redis at {host}:{port} refused the credentials: {text}", hint="fix them in the URL")
    if isinstance(exc, errors.ConnectionError | errors.TimeoutError):
        return ConfigError(
            f"no Redis server answers at {host}:{port}: {text}", hint=f"is Redis running? {_REDIS_HINT} in the URL"
        )
    return ConfigError(
        f"Redis at {host}:{port} (database {db}) cannot hold the online store: {text}",
        hint="check the database number in the URL (0-15 on a default server) and the user's permissions",
    )
