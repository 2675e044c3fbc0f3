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
