"""What every command module shares: the consoles and the resolved settings."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from finrec.config import FinrecSettings

out = Console()
err = Console(stderr=True)


def settings_of(ctx: typer.Context) -> FinrecSettings:
    """The settings the root callback resolved (``--config``, ``FINREC_*``), for a command's context."""
    settings: FinrecSettings = ctx.find_root().obj["settings"]
    return settings


def open_events_for_reading(url: str) -> Any:
    """Open an event store to read it (:func:`finrec.events.store.open_existing_event_store`), warning that a
    ``memory://`` store is empty in a new process."""
    from finrec.events.store import open_existing_event_store

    if url.startswith("memory://"):
        err.print("[yellow]warning[/]: a memory:// event store is empty in a new process; conversion will be empty")
    return open_existing_event_store(url)


def is_store_error(exc: Exception) -> bool:
    """Whether ``exc`` comes from an event store's driver (a file, a connection): reported, not a bug."""
    import sqlite3

    return isinstance(exc, sqlite3.Error | ConnectionError | OSError) or type(exc).__module__.startswith("redis")


#: Help of every command's ``--engine`` option.
ENGINE_HELP = (
    "Engine of this stage: duckdb (embedded, one machine) or spark (Apache Spark: [engine] spark_master, local[2] "
    "by default; needs `pip install 'finrec[spark]'` and Java 17). Default: [engine] name, duckdb."
)


def engine_of(ctx: typer.Context, engine: str | None) -> str:
    """The engine a command runs on: its ``--engine`` flag, else ``[engine] name``; an unknown name is refused."""
    from finrec.engine import ENGINES
    from finrec.errors import FinrecError

    name = engine or settings_of(ctx).engine.name
    if name not in ENGINES:
        raise FinrecError(f"unknown --engine {name!r}", hint=f"use one of: {', '.join(ENGINES)}")
    return name
