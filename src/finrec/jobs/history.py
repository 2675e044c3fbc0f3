"""Job history: one row per run of a scheduled job (start, end, outcome, what it produced).

A SQLite file (``<workspace>/scheduler/history.db``, WAL) that every runner of the workspace appends to:
``finrec scheduler``, ``finrec scheduler run`` from cron, and the service's dashboard builds. A run is written
when it starts (outcome ``running``) and completed when it ends, so a crash leaves a ``running`` row that the
next holder of the job's lock marks ``abandoned``. Summaries hold aggregates and paths only, never a customer
id or attribute.

Outcomes: ``ok``, ``alert`` (the check raised one), ``skipped`` (nothing to do), ``refused`` (the promotion
gate refused the challenger), ``failed``, ``running``, ``abandoned``, ``interrupted``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finrec.storage import open_wal_database

OUTCOMES = ("ok", "alert", "skipped", "refused", "failed", "running", "abandoned", "interrupted")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL, trigger TEXT, "
    "started_at REAL NOT NULL, ended_at REAL, outcome TEXT NOT NULL, summary TEXT, runner TEXT)",
    "CREATE INDEX IF NOT EXISTS runs_job ON runs (job, id)",
)


@dataclass(frozen=True)
class JobRun:
    """One row of the history."""

    id: int
    job: str
    trigger: str | None
    started_at: float
    ended_at: float | None
    outcome: str
    summary: dict[str, Any]
    runner: str | None

    def to_dict(self) -> dict[str, Any]:
        seconds = None if self.ended_at is None else round(self.ended_at - self.started_at, 3)
        return {**self.__dict__, "seconds": seconds}


def history_path(workspace: Path) -> Path:
    """``<workspace>/scheduler/history.db``."""
    return Path(workspace) / "scheduler" / "history.db"


class JobHistory:
    """The history at ``path`` (created). Thread-safe; each call is its own transaction."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection = open_wal_database(self.path, "job history", _SCHEMA,
                                                         ["SELECT id, job, outcome FROM runs LIMIT 0"])  # fmt: skip

    def start(self, job: str, trigger: str, runner: str, when: float | None = None) -> int:
        """Record a run that starts now; returns its id."""
        with self._lock:
            cur = self._db.execute("INSERT INTO runs (job, trigger, started_at, outcome, runner) VALUES (?,?,?,?,?)",
                                   (job, trigger, time.time() if when is None else when, "running", runner))
            return int(cur.lastrowid or 0)

    def finish(self, run_id: int, outcome: str, summary: dict[str, Any]) -> None:
        """Complete a run with its outcome and summary (JSON-ready)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        with self._lock:
            self._db.execute("UPDATE runs SET ended_at = ?, outcome = ?, summary = ? WHERE id = ?",
                             (time.time(), outcome, json.dumps(summary, default=str, allow_nan=False), run_id))

    def abandon_running(self, job: str) -> int:
        """Mark ``job``'s ``running`` rows ``abandoned`` (call holding the job's lock: nobody runs it); how many."""
        with self._lock:
            cur = self._db.execute("UPDATE runs SET outcome = 'abandoned', ended_at = ? WHERE job = ? AND "
                                   "outcome = 'running'", (time.time(), job))  # fmt: skip
            return int(cur.rowcount)

    def runs(self, job: str | None = None, limit: int = 50) -> list[JobRun]:
        """The latest ``limit`` runs (of ``job``), oldest first."""
        where, args = ("WHERE job = ?", (job,)) if job else ("", ())
        with self._lock:
            sql = f"SELECT id, job, trigger, started_at, ended_at, outcome, summary, runner FROM runs {where} "
            rows = self._db.execute(sql + "ORDER BY id DESC LIMIT ?", (*args, int(limit))).fetchall()
        return [JobRun(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else {}, r[7])
                for r in reversed(rows)]  # fmt: skip

    def last(self, job: str, outcomes: tuple[str, ...] | None = None) -> JobRun | None:
        """The newest run of ``job`` (with one of ``outcomes``)."""
        runs = [r for r in self.runs(job, limit=200) if outcomes is None or r.outcome in outcomes]
        return runs[-1] if runs else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def read_history(workspace: Path, limit: int = 50) -> list[dict[str, Any]]:
    """The latest runs of the workspace as dicts (empty when there is no history yet); for the dashboard."""
    path = history_path(workspace)
    if not path.is_file():
        return []
    history = JobHistory(path)
    try:
        return [r.to_dict() for r in history.runs(limit=limit)]
    finally:
        history.close()
