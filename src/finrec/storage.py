"""Plumbing shared by the stores that are opened by URL: reading the URL, and a SQLite file in WAL mode.

The event store and the online feature store accept the same URLs (``memory://``,
``sqlite:///path``, ``redis://...``) and keep their embedded data in SQLite the same
way; the rules live here once, each store names itself in the messages.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from finrec.errors import ConfigError

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


def open_wal_database(path: Path, what: str, schema: Sequence[str], probes: Sequence[str],
                      busy_timeout_ms: int = 10_000) -> sqlite3.Connection:  # fmt: skip
    """A SQLite connection in WAL mode with ``schema`` created and ``probes`` (queries of its tables) run.

    One connection for every thread (callers hold a lock: a sqlite3 connection is not thread-safe); no implicit
    transactions (``isolation_level=None``), so callers say where each begins and ends. WAL lets readers run while
    a batch is written and other processes wait on SQLite's file locks instead of failing. ``synchronous=NORMAL``
    writes each committed transaction to the WAL before COMMIT returns but skips the fsync: the data sits in the
    operating system's page cache, which survives the death of the process (SIGKILL included) and is lost only
    if the machine itself goes down before the next checkpoint; FULL would pay an fsync per commit for that.

    Raises
    ------
    ConfigError
        The file cannot be opened, or is not (and cannot become) a ``what``: tables of these names made by
        something else fail a probe now rather than at the first write.
    """
    hint = f"check that {path.parent} is writable and {path.name} is an {what} (or a new file)"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"cannot open the {what} {path}: {exc}", hint=hint) from exc
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL is needed (use memory:// for RAM)")
        db.execute("PRAGMA synchronous = NORMAL")
        for statement in [*schema, *probes]:
            db.execute(statement)
    except sqlite3.Error as exc:
        db.close()
        raise ConfigError(f"cannot use {path} as an {what}: {exc}", hint=hint) from exc
    return db
