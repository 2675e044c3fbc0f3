"""The event store on Redis: Streams for the log, a hash for idempotency, one Lua script per batch.

Implements :class:`~finrec.events.store.EventStore` (the contract is written there and checked by
``tests/contract/test_event_store.py``); opened by :func:`~finrec.events.store.open_event_store` for
``redis://`` and ``rediss://`` URLs. Kept apart from the embedded stores so that importing the package
never imports redis-py.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from finrec.errors import ConfigError
from finrec.events.schema import Event
from finrec.events.store import _COLUMNS, _REQUIRED_COLUMNS, SUPPORTED_URLS, _check_limit, _check_open, _row

log = logging.getLogger(__name__)

_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_REDIS_HINT = "start one with `redis-server` (or `docker run -d -p 6379:6379 redis:7`), or fix the host and port"


# Appends one batch. Redis runs a script atomically: no command of any other client (another thread, process or
# host appending, a consumer reading) runs between its first and last line. So a batch is visible all at once or
# not at all, its sequence numbers come from a counter that only this script moves, and any batch that runs later
# gets higher numbers: with the stream id <seq>-0, no event can appear after one with a higher number, and a
# consumer paging with XRANGE never skips one. Numbers are contiguous as long as only this script writes, but that
# is not promised. The effects reach replicas and the AOF wrapped in MULTI/EXEC, so they stay all-or-nothing there.
#
# Redis does not roll back the writes of a script that fails half-way, though, so everything that could make a
# write fail is checked before the first write. (Legacy EVAL scripts are refused for lack of memory only at their
# first write, never half-way.) The caller has already checked the events' types in Python.
#
# KEYS: 1 the id hash (event_id -> seq), 2 the sequence counter, 3 the stream.
# ARGV[1]: the batch as a JSON array with one array per event: its event_id, then its field names and values
# alternating, all strings. (One JSON argument rather than one argument per string: redis-py packs arguments in
# pure Python, which took three quarters of an append's time; json.dumps is C.)
# Returns one flag per event: 1 if stored now, 0 if its event_id was already stored (earlier in the batch, too).
_APPEND_LUA = """
local ids, counter, stream = KEYS[1], KEYS[2], KEYS[3]
local kinds = {'hash', 'string', 'stream'}
for k = 1, 3 do
  local kind = redis.call('TYPE', KEYS[k])['ok']
  if kind ~= 'none' and kind ~= kinds[k] then
    return redis.error_reply('finrec: ' .. KEYS[k] .. ' is a ' .. kind .. ', not a ' .. kinds[k])
  end
end
local seq = tonumber(redis.call('GET', counter) or '0')
if seq == nil or seq < 0 or seq ~= math.floor(seq) then
  return redis.error_reply('finrec: ' .. counter .. ' does not hold a sequence number')
end
-- Never below the stream's last id (the counter may have been deleted or evicted): numbers are not reused and
-- no XADD below can fail for an id that is too small.
if redis.call('EXISTS', stream) == 1 then
  local info = redis.call('XINFO', 'STREAM', stream)
  for k = 1, #info, 2 do
    if info[k] == 'last-generated-id' then
      local last = tonumber(string.match(info[k + 1], '^(%d+)-'))
      if last > seq then seq = last end
    end
  end
end
local batch = cjson.decode(ARGV[1])
for i = 1, #batch do
  local event = batch[i]
  local ok = type(event) == 'table' and #event >= 3 and #event % 2 == 1
  for k = 1, ok and #event or 0 do
    ok = ok and type(event[k]) == 'string'
  end
  if not ok then
    return redis.error_reply('finrec: event ' .. i .. ' of the batch is not an array of strings of odd length')
  end
end
local start, flags = seq, {}
for i = 1, #batch do
  local event = batch[i]
  local id = string.format('%d', seq + 1)
  if redis.call('HSETNX', ids, event[1], id) == 1 then
    redis.call('XADD', stream, id .. '-0', unpack(event, 2))
    seq = seq + 1
    flags[i] = 1
  else
    flags[i] = 0
  end
end
if seq ~= start then
  redis.call('SET', counter, string.format('%d', seq))
end
return flags
"""


class RedisEventStore:
    """An :class:`EventStore` in a Redis server, shared by every thread, process and host that can reach it.

    Keys, all under ``prefix`` (default ``finrec``, so several logs can share one database):

    * ``<prefix>:events:stream``: the log, a stream. Event ``seq`` is the entry with id ``<seq>-0``; its fields
      are the event's, as text, with ``None`` fields left out.
    * ``<prefix>:events:ids``: a hash from each ``event_id`` ever stored to its ``seq``; the idempotency key.
    * ``<prefix>:events:seq``: the last sequence number handed out.

    One Lua script stores a batch (see ``_APPEND_LUA``), which makes it atomic, idempotent and ordered across
    every client at once. The keys have no expiry; run Redis with ``maxmemory-policy noeviction`` (or a
    ``volatile-*`` policy), since an evicted id hash would silently end idempotency.

    Durability. When :meth:`append` returns, the batch is in the Redis server's memory, so it survives a kill of
    the *client* process (the contract's promise). Whether it survives a restart or crash of the *Redis server*
    depends on that server's persistence, which this class does not change: with ``appendonly yes`` and
    ``appendfsync always`` Redis writes the batch to its append-only file and fsyncs it before answering; with
    ``appendfsync everysec`` (the usual choice) up to about a second of appends can be lost if the Redis host
    goes down; with RDB snapshots only, everything since the last snapshot is lost if Redis dies, and with no
    persistence at all (``--save "" --appendonly no``, common in development) everything is lost when Redis
    stops. Opening a store logs a warning when the server reports ``aof_enabled:0``. ``WAIT``/``WAITAOF`` are not
    used: ``WAIT`` only counts replicas, and ``WAITAOF`` needs Redis 7.2 and would add a round trip per batch
    that an ``appendfsync always`` server makes unnecessary.

    Commands are not retried: after a dropped connection or a timeout (``redis.ConnectionError``,
    ``redis.TimeoutError``) a batch may or may not have been stored. Sending it again is safe, as append is
    idempotent, though events the lost attempt stored are then reported as already stored (``False``).

    Parameters
    ----------
    url
        ``redis://[[user]:password@]host[:port][/db][?prefix=name]``, or ``rediss://`` for TLS.
    connect_timeout
        Seconds to wait for a connection; also the limit on each command (``socket_timeout``).
    durability
        ``power``: refuse a server that does not run with ``appendonly yes`` and ``appendfsync always`` (an
        acknowledged batch must survive a power loss of the Redis host). ``process``: warn without the AOF.

    Raises
    ------
    ConfigError
        If the URL is malformed, the redis package is missing, the server does not answer or refuses the
        credentials or the database, or the keys under the prefix hold something other than an event log.
    """

    def __init__(self, url: str, connect_timeout: float = 5.0, durability: str = "process") -> None:
        scheme, host, port, db, password, prefix = _parse_redis_url(url)
        self.prefix = prefix
        self.address = f"{host}:{port}/{db}"  # for messages; never the URL, which may hold a password
        self._keys = [f"{prefix}:events:ids", f"{prefix}:events:seq", f"{prefix}:events:stream"]
        self._stream = self._keys[2]
        self._lock = threading.Lock()
        self._closed = False
        try:
            import redis
        except ImportError as exc:
            raise ConfigError(
                "redis:// event stores need the redis package, which is not installed",
                hint="install it with `pip install 'finrec[redis]'`, or use " + SUPPORTED_URLS,
            ) from exc
        split = urlsplit(url.strip())
        plain = urlunsplit((scheme, split.netloc, split.path, "", ""))  # without ?prefix, which redis-py rejects
        self._pool = redis.ConnectionPool.from_url(
            plain, decode_responses=True, socket_connect_timeout=connect_timeout, socket_timeout=connect_timeout
        )
        # Any: redis-py's hints allow bytes and None everywhere; decode_responses=True makes replies str.
        self._redis: Any = cast(Any, redis.Redis(connection_pool=self._pool))
        try:
            kinds = [self._redis.type(key) for key in self._keys]
            self._append = self._redis.register_script(_APPEND_LUA)
            self._redis.script_load(_APPEND_LUA)  # fails now, not at the first append, if scripting is not allowed
            aof = self._redis.info("persistence").get("aof_enabled")
        except redis.RedisError as exc:
            self._pool.disconnect()
            text = str(exc)  # redis-py's messages hold no password, but make sure
            if password:
                text = text.replace(password, "***").replace(unquote(password), "***")
            where = f"Redis at {host}:{port}"
            if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError):
                message, hint = f"{where} refused the credentials: {text}", "fix the user and password in the URL"
            elif isinstance(exc, redis.ConnectionError | redis.TimeoutError):
                message = f"no Redis server answers at {host}:{port}: {text}"
                hint = f"is Redis running? {_REDIS_HINT} in the URL"
            else:
                message = f"{where} (database {db}) cannot hold the event store: {text}"
                hint = "check the database number in the URL (0-15 on a default server) and that the user may run "
                hint += "EVAL, EVALSHA, SCRIPT, XADD, XRANGE, XINFO, XLEN, HSETNX, GET, SET, TYPE, EXISTS and INFO"
            raise ConfigError(message, hint=hint) from exc
        wrong = [f"{key} is a {kind}" for key, kind, want in zip(self._keys, kinds, _KINDS, strict=True)
                 if kind not in ("none", want)]
        if wrong:
            self._pool.disconnect()
            raise ConfigError(
                f"cannot use prefix {prefix!r} in Redis at {self.address} as an event store: {'; '.join(wrong)}",
                hint="choose another prefix with ?prefix=name in the event store URL",
            )
        if durability == "power":
            try:
                fsync = self._redis.config_get("appendfsync").get("appendfsync")
            except redis.RedisError:
                fsync = None  # CONFIG may be refused to this user (managed Redis): then it cannot be checked
            if aof != 1 or fsync != "always":
                self._pool.disconnect()
                seen = f"aof_enabled:{aof}, appendfsync {fsync or 'unknown (CONFIG GET refused)'}"
                raise ConfigError(
                    f"[events] durability = \"power\" needs a Redis server that fsyncs every write, but the one at "
                    f"{host}:{port} runs with {seen}",
                    hint="configure it with `appendonly yes` and `appendfsync always` (and let this user run "
                    "CONFIG GET), or set durability = \"process\"",
                )
        if aof == 0:
            log.warning(
                "the Redis server at %s runs without the append-only file (aof_enabled:0): stored events are lost "
                "if Redis restarts; configure it with `appendonly yes` and `appendfsync everysec` or `always`",
                f"{host}:{port}",
            )

    def append(self, events: Sequence[Event]) -> list[bool]:
        _check_open(self._closed)
        if not events:
            return []
        # _redis_fields and the UTF-8 encoding raise before anything is sent, so a bad item stores nothing.
        batch = json.dumps([_redis_fields(event) for event in events], ensure_ascii=False, separators=(",", ":"))
        flags = self._append(keys=self._keys, args=[batch.encode()])
        if len(flags) != len(events):  # pragma: no cover - a script or server that does not keep its side
            raise RuntimeError(f"the append script returned {len(flags)} flags for {len(events)} events")
        return [flag == 1 for flag in flags]

    def read(self, after: int = 0, limit: int = 10_000) -> list[tuple[int, Event]]:
        _check_open(self._closed)
        # Ids are <seq>-0, so the first id past `after` is <after + 1>-0 (inclusive; "(" needs Redis 6.2).
        entries = self._redis.xrange(self._stream, f"{max(after, 0) + 1}-0", "+", count=_check_limit(limit))
        return [(int(entry_id.partition("-")[0]), _event_from_redis(values)) for entry_id, values in entries]

    def count(self) -> int:
        _check_open(self._closed)
        return int(self._redis.xlen(self._stream))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._pool.disconnect()


_KINDS = ("hash", "string", "stream")  # the Redis types of RedisEventStore._keys, in order


def _parse_redis_url(url: str) -> tuple[str, str, int, int, str | None, str]:
    """``(scheme, host, port, db, password, prefix)`` of a Redis URL; messages never show the URL (its password)."""
    hint = "write redis://host:port/db, e.g. redis://localhost:6379/0, optionally with ?prefix=name"
    try:
        split = urlsplit(url.strip())
        port = split.port or 6379
    except ValueError:  # a port that is not a number
        raise ConfigError("the redis:// event store URL has an invalid host or port", hint=hint) from None
    host = split.hostname
    if not host:
        raise ConfigError("the redis:// event store URL has no host", hint=hint)
    path = split.path.strip("/")
    if not path.isdigit() and path != "":
        raise ConfigError("the redis:// event store URL's path must be a database number such as /0", hint=hint)
    query = parse_qs(split.query, keep_blank_values=True)
    if set(query) - {"prefix"}:
        names = ", ".join(sorted(repr(name) for name in set(query) - {"prefix"}))
        raise ConfigError(f"the redis:// event store URL has unknown options {names}; only prefix is known", hint=hint)
    prefixes = query.get("prefix", ["finrec"])
    if len(prefixes) != 1 or not _PREFIX.fullmatch(prefixes[0]):
        raise ConfigError(
            "the redis:// event store URL's prefix must be given once, as 1-100 letters, digits or _ . : -", hint=hint
        )
    return split.scheme.lower(), host, port, int(path or 0), split.password, prefixes[0]


def _redis_fields(event: Event) -> list[str]:
    """The ``event_id``, then the event's non-None fields as alternating names and values, all text."""
    pairs: list[str] = []
    for name, value in zip(_COLUMNS, _row(event), strict=True):
        if value is None:
            if name in _REQUIRED_COLUMNS:  # NOT NULL in SQLite; and event_id must come second
                raise TypeError(f"Event.{name} must not be None")
            continue
        if isinstance(value, str):
            pairs += (name, value)
        elif isinstance(value, int):
            pairs += (name, str(int(value)))  # int(): a bool is stored as 1 or 0, as SQLite stores it
        else:
            raise TypeError(f"Event.{name} must be text or an integer, got {type(value).__name__}")
    return [pairs[1], *pairs]


def _event_from_redis(values: dict[str, str]) -> Event:
    get, position = values.get, values.get("position")
    return Event(
        values["event_id"], values["user_id"], values["product_id"], values["event_type"], int(values["ts"]),
        None if position is None else int(position),
        get("request_id"), get("channel"), get("arm"), get("model_version"),
    )
