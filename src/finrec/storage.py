"""Plumbing shared by the stores that are opened by URL: reading the URL, and a SQLite file in WAL mode.

The event store and the online feature store accept the same URLs (``memory://``,
``sqlite:///path``, ``redis://...``) and keep their embedded data in SQLite the same
way; the rules live here once, each store names itself in the messages.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from finrec.errors import ConfigError, FinrecError

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreUnavailable(FinrecError):
    """A store cannot be used now (down, slow, locked): the API answers 503 with ``Retry-After``."""

    def __init__(self, message: str, hint: str | None = None, retry_after: int = 5) -> None:
        super().__init__(message, hint or f"retry in {retry_after} s; the operator is told by the logs and /ready")
        self.retry_after = max(1, int(retry_after))


def store_unavailable(exc: BaseException, retry_after: int = 5) -> StoreUnavailable | None:
    """The :class:`StoreUnavailable` an exception from a store's driver means, or None if it means a bug.

    Connection and timeout errors (Redis, sockets) and SQLite's operational errors (locked, busy, I/O, cannot
    open) are outages; anything else is not.
    """
    if isinstance(exc, StoreUnavailable):
        return exc
    kind = type(exc).__name__
    module = type(exc).__module__
    if module.startswith("redis"):
        if kind in ("ConnectionError", "TimeoutError", "BusyLoadingError", "ReadOnlyError", "TryAgainError",
                    "ClusterDownError", "MasterDownError"):  # fmt: skip
            return StoreUnavailable(f"a Redis store is unavailable: {kind}", retry_after=retry_after)
        return None
    if isinstance(exc, sqlite3.OperationalError):
        return StoreUnavailable(f"a SQLite store is unavailable: {_first_line(exc)}", retry_after=retry_after)
    if isinstance(exc, TimeoutError | ConnectionError):
        return StoreUnavailable(f"a store is unavailable: {kind}", retry_after=retry_after)
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


class CircuitBreaker:
    """Fail fast while a store is down: after ``failures`` outages in a row, calls raise at once for
    ``reset_seconds``; then one call is let through to try it (half-open), and a success closes the circuit.

    Only outages (:func:`store_unavailable`) count; other errors pass through untouched.

    >>> breaker = CircuitBreaker("online store", failures=1, reset_seconds=60)
    >>> def down(): raise TimeoutError()
    >>> for fn in (down, lambda: 1):
    ...     try:
    ...         breaker.call(fn)
    ...     except StoreUnavailable as exc:
    ...         print(exc.message)
    the online store is unavailable: a store is unavailable: TimeoutError
    the online store is unavailable (failing fast for 60 s after 1 failures)
    """

    def __init__(self, name: str, failures: int = 3, reset_seconds: float = 5.0) -> None:
        self.name = name
        self.failures = failures
        self.reset_seconds = reset_seconds
        self._lock = threading.Lock()
        self._count = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def open(self) -> bool:
        with self._lock:
            return self._opened_at is not None and time.monotonic() - self._opened_at < self.reset_seconds

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        retry = max(1, math.ceil(self.reset_seconds))
        with self._lock:
            if self._opened_at is not None:
                waited = time.monotonic() - self._opened_at
                if waited < self.reset_seconds or self._trial:
                    raise StoreUnavailable(f"the {self.name} is unavailable (failing fast for "
                                           f"{self.reset_seconds:g} s after {self._count} failures)",
                                           retry_after=max(1, math.ceil(self.reset_seconds - waited)))  # fmt: skip
                self._trial = True  # half-open: this call tries the store; the others keep failing fast
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            outage = store_unavailable(exc, retry)
            with self._lock:
                self._trial = False
                if outage is None:
                    raise
                self._count += 1
                if self._count >= self.failures:
                    if self._opened_at is None:
                        log.error("store unavailable; failing fast", extra={"store": self.name,
                                                                             "error": outage.message})  # fmt: skip
                    self._opened_at = time.monotonic()
            raise StoreUnavailable(f"the {self.name} is unavailable: {outage.message}", retry_after=retry) from exc
        with self._lock:
            if self._opened_at is not None:
                log.info("store available again", extra={"store": self.name})
            self._count, self._opened_at, self._trial = 0, None, False
        return result

_SQLITE_HINT = "write sqlite:/// (three slashes) and a file path, with four slashes for an absolute path: "


def parse_store_url(url: object, what: str, supported: str) -> tuple[str, str | None]:
    """``(scheme, path)`` of a store URL: ``("redis", None)``, ``("memory", None)`` or ``("sqlite", path)``.

    ``redis``/``rediss`` URLs are returned without a look inside (they may hold a password, never echoed);
    anything else malformed raises :class:`ConfigError` naming ``what`` ("event store", ...) with ``supported``.
    """
    hint = f"use {supported}"
    if not isinstance(url, str):
        raise ConfigError(f"the {what} URL must be text, got {type(url).__name__}", hint=hint)
    scheme, sep, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss"):
        return "redis", None
    if not sep or not scheme:
        raise ConfigError(f"the {what} URL {url!r} has no scheme", hint=hint)
    if scheme == "memory":
        if rest:
            raise ConfigError(f"the {what} URL {url!r} has a path, but memory:// takes none", hint=hint)
        return "memory", None
    if scheme == "sqlite":
        path = rest[1:]
        if not rest.startswith("/") or not path or path.endswith("/") or "?" in path:
            raise ConfigError(f"the {what} URL {url!r} is not a SQLite file URL", hint=_SQLITE_HINT + supported)
        return "sqlite", path
    raise ConfigError(f"the {what} URL scheme {scheme!r} is not supported", hint=hint)


def private_file(path: Path) -> None:
    """Make ``path`` (created empty when missing) readable and writable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("made %s private (mode %04o -> 0600)", path, mode)
    finally:
        os.close(fd)


def open_wal_database(path: Path, what: str, schema: Sequence[str], probes: Sequence[str],
                      busy_timeout_ms: int = 10_000, synchronous: str = "NORMAL") -> sqlite3.Connection:  # fmt: skip
    """A SQLite connection in WAL mode with ``schema`` created and ``probes`` (queries of its tables) run.

    One connection for every thread (callers hold a lock: a sqlite3 connection is not thread-safe); no implicit
    transactions (``isolation_level=None``), so callers say where each begins and ends. WAL lets readers run while
    a batch is written and other processes wait on SQLite's file locks instead of failing. ``synchronous=NORMAL``
    writes each committed transaction to the WAL before COMMIT returns but skips the fsync: the data sits in the
    operating system's page cache, which survives the death of the process (SIGKILL included) and is lost only
    if the machine itself goes down before the next checkpoint; FULL would pay an fsync per commit for that.
    ``synchronous="FULL"`` does pay it, for stores that must survive a power loss (``[events] durability``). The
    file is made private (0600) before SQLite opens it; its -wal and -shm files take the same mode.

    Raises
    ------
    ConfigError
        The file cannot be opened, or is not (and cannot become) a ``what``: tables of these names made by
        something else fail a probe now rather than at the first write.
    """
    hint = f"check that {path.parent} is writable and {path.name} is an {what} (or a new file)"
    try:
        private_file(path)  # SQLite gives its -wal and -shm files the database file's mode
        for side in ("-wal", "-shm"):
            if Path(f"{path}{side}").exists():
                private_file(Path(f"{path}{side}"))
        db = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"cannot open the {what} {path}: {exc}", hint=hint) from exc
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL is needed (use memory:// for RAM)")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        for statement in [*schema, *probes]:
            db.execute(statement)
    except sqlite3.Error as exc:
        db.close()
        raise ConfigError(f"cannot use {path} as an {what}: {exc}", hint=hint) from exc
    return db


class Guarded:
    """A store whose every method call goes through a :class:`CircuitBreaker` (``close`` excepted).

    >>> class Store:
    ...     max_per_user = 5
    ...     def count(self): return 3
    >>> g = Guarded(Store(), CircuitBreaker("event store"))
    >>> g.count(), g.max_per_user
    (3, 5)
    """

    def __init__(self, store: Any, breaker: CircuitBreaker) -> None:
        self._store = store
        self.breaker = breaker

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name == "close" or name.startswith("_") or not callable(attr):
            return attr
        return lambda *args, **kwargs: self.breaker.call(attr, *args, **kwargs)
