"""Monitoring roll-up: conversion, guardrail health and fairness as aggregates that grow with time buckets and
customers, never with history, updated from where the last update stopped.

:meth:`MonitoringRollup.update` reads only what is new: the event store after the last sequence number it
folded in, and the audit log from its last byte offset (a rotated log, with another inode or a smaller size,
is read from its start). Each batch is folded in one SQLite transaction together with the new position, so an
update that dies half-way is continued, not double-counted. A report (:meth:`conversion`, :meth:`health`,
:meth:`fairness`) then reads the aggregates: per hour bucket (any ``monitor.bucket`` is a sum of hours) x
model version x arm for conversion; per hour bucket for the guardrail-health counters; per customer (keyed
pseudonym) for fairness; the (model version, product) pairs served for coverage. Its cost depends on the
number of hours, versions and customers, not on the number of events or answers ever seen.

Attribution is as in :mod:`finrec.monitoring.conversion`, with one bound: the answers of the last
``retention_seconds`` (service clock; ``serve.request_id_max_age_days`` by default, the age past which the
service refuses events citing an answer) are kept to attribute events by ``request_id``. An event whose
answer is not in the log yet waits (``pending``) for ``grace_seconds`` of wall time, then counts in its own
bucket as "request_id not in audit", as the full scan counts it.

The file (``<workspace>/monitoring/rollup.db``) holds aggregates and keyed pseudonyms (of customers, of
request ids), never a raw customer id: it is as sensitive as the audit log, not as the event log. A changed
audit key or an older layout starts it again from the beginning of both stores.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finrec.config import MonitorSettings
from finrec.events.schema import Event
from finrec.events.store import EventStore
from finrec.monitoring.conversion import _FUNNEL_INDEX, ConversionCounter, bucket_start
from finrec.monitoring.fairness import _EVENT_INDEX, fairness_of_tallies, pseudonym_rows
from finrec.monitoring.health import HealthAccumulator
from finrec.serving.audit import pseudonymise, pseudonymise_request

LAYOUT = 1
HOUR = 3_600
_STATS = ("events", "funnel_events", "attributed_via_audit", "request_id_not_in_audit", "unattributed",
          "audit_records", "audit_skipped")  # fmt: skip
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS conversion (hour INTEGER, mv TEXT, arm TEXT, c0 INTEGER, c1 INTEGER, c2 INTEGER, "
    "c3 INTEGER, PRIMARY KEY (hour, mv, arm))",
    "CREATE TABLE IF NOT EXISTS pending (request TEXT, mv TEXT, arm TEXT, own INTEGER, c0 INTEGER, c1 INTEGER, "
    "c2 INTEGER, c3 INTEGER, seen REAL, PRIMARY KEY (request, mv, arm, own))",
    "CREATE TABLE IF NOT EXISTS answers (request TEXT PRIMARY KEY, mv TEXT, arm TEXT, ts REAL)",
    "CREATE INDEX IF NOT EXISTS answers_ts ON answers (ts)",
    "CREATE TABLE IF NOT EXISTS health (hour INTEGER, name TEXT, key TEXT, value INTEGER, "
    "PRIMARY KEY (hour, name, key))",
    "CREATE TABLE IF NOT EXISTS served (mv TEXT, product TEXT, PRIMARY KEY (mv, product))",
    "CREATE TABLE IF NOT EXISTS fair (who TEXT PRIMARY KEY, a INTEGER, i INTEGER, e INTEGER, imp INTEGER, "
    "app INTEGER, appr INTEGER, dec INTEGER)",
)
_TABLES = ("meta", "stats", "conversion", "pending", "answers", "health", "served", "fair")


def rollup_path(workspace: Path) -> Path:
    """``<workspace>/monitoring/rollup.db``."""
    return Path(workspace) / "monitoring" / "rollup.db"


def sources_of(event_store_url: str, audit_path: Path | None) -> str:
    """The identity of the stores a roll-up folds (see :class:`MonitoringRollup`)."""
    return f"{event_store_url.strip()}|{'' if audit_path is None else Path(audit_path).resolve()}"


def _hour(ts: float) -> int:
    t = int(ts)
    return t - t % HOUR


def _none(v: str) -> str | None:
    return v or None


class _Delta:
    """What one batch adds, folded into the tables by :meth:`MonitoringRollup._flush`."""

    def __init__(self) -> None:
        self.conv: dict[tuple[int, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.pending: dict[tuple[str, str, str, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.health: Counter[tuple[int, str, str]] = Counter()
        self.served: set[tuple[str, str]] = set()
        self.answers: dict[str, tuple[str, str, float | None]] = {}
        self.fair: dict[str, list[int]] = defaultdict(lambda: [0] * 7)
        self.stats: Counter[str] = Counter()
        self.meta: dict[str, str] = {}


class MonitoringRollup:
    """The roll-up in ``path`` (``None``: in memory, for a ``memory://`` event store that lives per process).

    Parameters
    ----------
    key
        The audit key: matches events' request ids to the audit log's keyed hashes, and keys fairness tallies
        by the customer's pseudonym. Without it fairness and attribution through the audit log are off.
    retention_seconds, grace_seconds
        See the module docstring.
    sources
        What the roll-up is of (:func:`sources_of`: the event store's URL and the audit log's path): a roll-up of
        other stores starts again from their beginning rather than continue at a position that is not theirs.
    """

    def __init__(self, path: Path | None, key: bytes | None, retention_seconds: float = 30 * 86_400,
                 grace_seconds: float = 300.0, sources: str = "") -> None:  # fmt: skip
        self.path = path
        self.key = key
        self.retention = float(retention_seconds)
        self.grace = float(grace_seconds)
        self._lock = threading.Lock()
        if path is None:
            self._db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            for statement in _SCHEMA:
                self._db.execute(statement)
        else:
            from finrec.storage import open_wal_database

            self._db = open_wal_database(Path(path), "monitoring roll-up", _SCHEMA,
                                         ["SELECT name FROM meta LIMIT 0"])  # fmt: skip
        fingerprint = "none" if key is None else hashlib.sha256(b"finrec-rollup" + key).hexdigest()[:16]
        of = hashlib.sha256(sources.encode()).hexdigest()[:16]  # a Redis URL may hold a password: never stored
        meta = self._meta()
        if meta and (meta.get("layout") != str(LAYOUT) or meta.get("key") != fingerprint or meta.get("of") != of):
            with self._tx():
                for t in _TABLES:
                    self._db.execute(f"DELETE FROM {t}")
        with self._tx():
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 [("layout", str(LAYOUT)), ("key", fingerprint), ("of", of)])  # fmt: skip

    # -- plumbing ------------------------------------------------------------------------------------------

    def _tx(self) -> Any:
        db = self._db

        class _Tx:
            def __enter__(self) -> None:
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind: object, *rest: object) -> None:
                db.execute("COMMIT" if kind is None else "ROLLBACK")

        return _Tx()

    def _meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT name, value FROM meta").fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def position(self) -> dict[str, Any]:
        """Where the next update starts: event sequence number, audit log inode and offset."""
        m = self._meta()
        return {"event_seq": int(m.get("event_seq", 0)), "audit_file": m.get("audit_file"),
                "audit_offset": int(m.get("audit_offset", 0))}  # fmt: skip

    # -- update --------------------------------------------------------------------------------------------

    def update(self, events: EventStore, audit_path: Path | None, batch: int = 50_000) -> dict[str, Any]:
        """Fold in what is new in ``audit_path`` and ``events``; returns counts read and seconds."""
        t0 = time.perf_counter()
        with self._lock:
            audit_read = self._update_audit(audit_path, batch)
            events_read = self._update_events(events, batch)
            resolved, expired = self._resolve(expire=True)
            self._prune()
        return {"events_read": events_read, "audit_records_read": audit_read, "resolved": resolved,
                "expired": expired, "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip

    def _update_audit(self, audit_path: Path | None, batch: int) -> int:
        if audit_path is None:
            return 0
        try:
            f = open(audit_path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return 0
        read = 0
        with f:
            st = os.fstat(f.fileno())
            ident = f"{st.st_dev}:{st.st_ino}"
            pos = self.position()
            offset = pos["audit_offset"] if pos["audit_file"] == ident and st.st_size >= pos["audit_offset"] else 0
            f.seek(offset)
            delta = _Delta()
            n = 0
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a record being written: read it next time, whole
                offset += len(line)
                self._add_answer(line, delta)
                n += 1
                if n >= batch:
                    delta.meta.update(audit_file=ident, audit_offset=str(offset))
                    self._flush(delta)
                    read, n, delta = read + n, 0, _Delta()
            delta.meta.update(audit_file=ident, audit_offset=str(offset))
            self._flush(delta)
        return read + n

    def _add_answer(self, line: bytes, d: _Delta) -> None:
        rec: Any = None
        if line.startswith(b"{"):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
        if not isinstance(rec, dict):
            d.stats["audit_skipped"] += 1
            return
        d.stats["audit_records"] += 1
        ts = rec.get("served_at", rec.get("ts"))
        ts = float(ts) if isinstance(ts, int | float) else None
        hour = _hour(ts) if ts is not None else 0
        mv = str(rec.get("model_version") or "")
        arm = str(rec.get("arm") or "")
        request = rec.get("request")
        if not isinstance(request, str) and isinstance(rec.get("request_id"), str):  # an older log: the raw id
            raw = rec["request_id"]
            request = raw if self.key is None else pseudonymise_request(raw, self.key)
        if isinstance(request, str):
            d.answers[request] = (mv, arm, ts)
        # guardrail health, as HealthAccumulator.add counts it
        items = rec.get("items")
        if type(items) is not list:
            items = []
        n = len(items)
        h = d.health
        h[(hour, "answers", "")] += 1
        h[(hour, "kind", str(rec.get("kind") or "unknown"))] += 1
        h[(hour, "model", mv or "unknown")] += 1
        h[(hour, "items", "")] += n
        h[(hour, "n_items", str(n))] += 1
        h[(hour, "empty", "")] += n == 0
        k = rec.get("k")
        if type(k) is int and k > 0:
            h[(hour, "k_recorded", "")] += 1
            h[(hour, "k_known", "")] += 1
            h[(hour, "short", "")] += n < k
        excluded = rec.get("excluded")
        if type(excluded) is dict:
            for rule, count in excluded.items():
                if type(count) is int and count:
                    h[(hour, "removed", str(rule))] += count
        for it in items:
            if type(it) is dict and it.get("product_id") is not None:
                d.served.add((mv or "unknown", str(it["product_id"])))
        who = rec.get("customer")
        if isinstance(who, str):
            t = d.fair[who]
            t[0] += 1
            t[1] += n
            t[2] += n > 0
        wall = rec.get("ts")  # first and last answer as HealthAccumulator reports them: the wall clock
        if isinstance(wall, int | float):
            d.meta["first_ts"] = repr(min(wall, float(d.meta.get("first_ts", wall))))
            d.meta["last_ts"] = repr(max(wall, float(d.meta.get("last_ts", wall))))
        if ts is not None:
            d.meta["last_served"] = repr(max(ts, float(d.meta.get("last_served", ts))))

    def _update_events(self, events: EventStore, batch: int) -> int:
        after = self.position()["event_seq"]
        read = 0
        while True:
            chunk = events.read(after=after, limit=batch)
            if not chunk:
                return read
            delta = _Delta()
            for _, e in chunk:
                self._add_event(e, delta)
            after = chunk[-1][0]
            delta.meta["event_seq"] = str(after)
            self._flush(delta)
            self._resolve(expire=False)
            read += len(chunk)

    def _add_event(self, e: Event, d: _Delta) -> None:
        d.stats["events"] += 1
        if self.key is not None:
            fi = _EVENT_INDEX.get(e.event_type)
            if fi is not None:
                d.fair[pseudonymise(e.user_id, self.key)][3 + fi] += 1
        i = _FUNNEL_INDEX.get(e.event_type)
        if i is None:
            return
        d.stats["funnel_events"] += 1
        own = _hour(e.ts)
        mv, arm = e.model_version or "", e.arm or ""
        if e.request_id:
            request = e.request_id if self.key is None else pseudonymise_request(e.request_id, self.key)
            d.pending[(request, mv, arm, own)][i] += 1
        else:
            d.stats["unattributed"] += not mv
            d.conv[(own, mv, arm)][i] += 1

    def _flush(self, d: _Delta) -> None:
        db = self._db
        now = time.time()
        with self._tx():
            if {"first_ts", "last_ts", "last_served"} & d.meta.keys():
                m = self._meta()
                for name, pick in (("first_ts", min), ("last_ts", max), ("last_served", max)):
                    if name in m and name in d.meta:
                        d.meta[name] = repr(pick(float(m[name]), float(d.meta[name])))
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(d.meta.items()))
            db.executemany("INSERT INTO stats VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + "
                           "excluded.value", list(d.stats.items()))  # fmt: skip
            db.executemany("INSERT INTO conversion VALUES (?,?,?,?,?,?,?) ON CONFLICT (hour, mv, arm) DO UPDATE SET "
                           "c0 = c0 + excluded.c0, c1 = c1 + excluded.c1, c2 = c2 + excluded.c2, "
                           "c3 = c3 + excluded.c3", [(*k, *c) for k, c in d.conv.items()])  # fmt: skip
            db.executemany("INSERT INTO pending VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (request, mv, arm, own) DO "
                           "UPDATE SET c0 = c0 + excluded.c0, c1 = c1 + excluded.c1, c2 = c2 + excluded.c2, "
                           "c3 = c3 + excluded.c3", [(*k, *c, now) for k, c in d.pending.items()])  # fmt: skip
            db.executemany("INSERT OR REPLACE INTO answers VALUES (?,?,?,?)",
                           [(r, *a) for r, a in d.answers.items()])  # fmt: skip
            db.executemany("INSERT INTO health VALUES (?,?,?,?) ON CONFLICT (hour, name, key) DO UPDATE SET "
                           "value = value + excluded.value", [(*k, v) for k, v in d.health.items() if v])  # fmt: skip
            db.executemany("INSERT OR IGNORE INTO served VALUES (?, ?)", list(d.served))
            db.executemany("INSERT INTO fair VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (who) DO UPDATE SET a = a + "
                           "excluded.a, i = i + excluded.i, e = e + excluded.e, imp = imp + excluded.imp, "
                           "app = app + excluded.app, appr = appr + excluded.appr, dec = dec + excluded.dec",
                           [(w, *t) for w, t in d.fair.items()])  # fmt: skip

    def _resolve(self, expire: bool) -> tuple[int, int]:
        """Attribute the waiting events whose answers are known; with ``expire``, count those that waited
        longer than the grace period in their own bucket. Returns (resolved, expired) event counts."""
        db = self._db
        found = db.execute("SELECT p.request, p.mv, p.arm, p.own, p.c0, p.c1, p.c2, p.c3, a.mv, a.arm, a.ts "
                           "FROM pending p JOIN answers a ON a.request = p.request").fetchall()  # fmt: skip
        stale = db.execute("SELECT request, mv, arm, own, c0, c1, c2, c3 FROM pending WHERE seen < ?",
                           (time.time() - self.grace,)).fetchall() if expire else []  # fmt: skip
        if not found and not stale:
            return 0, 0
        d = _Delta()
        resolved = expired = 0
        for _, mv, arm, own, c0, c1, c2, c3, amv, aarm, ats in found:
            n = c0 + c1 + c2 + c3
            resolved += n
            if not mv and amv:
                d.stats["attributed_via_audit"] += n
            mv, arm = mv or amv, arm or aarm
            hour = _hour(ats) if ats is not None else own
            d.stats["unattributed"] += n if not mv else 0
            t = d.conv[(hour, mv, arm)]
            for j, c in enumerate((c0, c1, c2, c3)):
                t[j] += c
        keys = {r[0] for r in found}
        for request, mv, arm, own, c0, c1, c2, c3 in stale:
            if request in keys:
                continue
            n = c0 + c1 + c2 + c3
            expired += n
            if not mv or not arm:
                d.stats["request_id_not_in_audit"] += n
            d.stats["unattributed"] += n if not mv else 0
            t = d.conv[(own, mv, arm)]
            for j, c in enumerate((c0, c1, c2, c3)):
                t[j] += c
        self._flush(d)
        with self._tx():
            db.execute("DELETE FROM pending WHERE request IN (SELECT request FROM answers)")
            if stale:
                db.executemany("DELETE FROM pending WHERE request = ? AND mv = ? AND arm = ? AND own = ?",
                               [r[:4] for r in stale])  # fmt: skip
        return resolved, expired

    def _prune(self) -> None:
        last = self._meta().get("last_served")
        if last is not None:
            with self._tx():
                self._db.execute("DELETE FROM answers WHERE ts < ?", (float(last) - self.retention,))

    # -- reading -------------------------------------------------------------------------------------------

    def _stats(self) -> Counter[str]:
        return Counter(dict(self._db.execute("SELECT name, value FROM stats").fetchall()))

    def conversion(self, monitor: MonitorSettings, since: float | None = None) -> dict[str, Any]:
        """The conversion section, as :func:`finrec.monitoring.conversion.compute_conversion` returns it.

        Events still waiting for their answer count in their own bucket, as the full scan counts them."""
        with self._lock:
            rows = self._db.execute("SELECT hour, mv, arm, c0, c1, c2, c3 FROM conversion WHERE hour >= ?",
                                    (since if since is not None else -(2**62),)).fetchall()  # fmt: skip
            waiting = self._db.execute("SELECT mv, arm, own, c0, c1, c2, c3 FROM pending").fetchall()
            stats = self._stats()
            answers = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        counter = ConversionCounter(monitor.bucket)
        for hour, mv, arm, *c in rows:
            t = counter.counts[(bucket_start(hour, monitor.bucket), _none(mv), _none(arm))]
            for j in range(4):
                t[j] += c[j]
        for mv, arm, own, *c in waiting:
            n = sum(c)
            stats["request_id_not_in_audit"] += n if not mv or not arm else 0
            stats["unattributed"] += n if not mv else 0
            t = counter.counts[(bucket_start(own, monitor.bucket), _none(mv), _none(arm))]
            for j in range(4):
                t[j] += c[j]
        counter.stats.update({k: stats[k] for k in _STATS[:5]})
        out = counter.summary(monitor.confidence)
        out["audit"] = {"records": stats["audit_records"], "skipped_lines": stats["audit_skipped"],
                        "answers_kept": int(answers), "waiting_events": sum(sum(r[3:]) for r in waiting)}  # fmt: skip
        return out

    def health_counts(self, since: float | None = None) -> HealthAccumulator:
        """A :class:`HealthAccumulator` holding the counts of the answers served at or after ``since``."""
        acc = HealthAccumulator()
        with self._lock:
            rows = self._db.execute("SELECT name, key, SUM(value) FROM health WHERE hour >= ? GROUP BY name, key",
                                    (since if since is not None else -(2**62),)).fetchall()  # fmt: skip
            served = self._db.execute("SELECT mv, product FROM served").fetchall()
            meta = self._meta()
        for name, key, value in rows:
            value = int(value)
            if name in ("answers", "empty", "short", "k_recorded", "k_known", "items"):
                setattr(acc, name, value)
            elif name == "kind":
                acc.kinds[key] = value
            elif name == "model":
                acc.by_model[key] = value
            elif name == "n_items":
                acc.item_counts[int(key)] = value
            elif name == "removed":
                acc.removed[key] = value
        if since is None:
            for mv, product in served:
                acc.served.add(product)
                acc.served_by_model[mv].add(product)
            for name in ("first_ts", "last_ts"):
                if name in meta:
                    value = float(meta[name])
                    setattr(acc, name, int(value) if value.is_integer() else value)
        return acc

    def last_answer_ts(self) -> float | None:
        """When the newest answer was served, on the service's clock (that of the hour buckets)."""
        last = self._meta().get("last_served")
        return None if last is None else float(last)

    def fairness(self, users: pd.DataFrame, attributes: Sequence[str], monitor: MonitorSettings,
                 cache_key: str | None = None) -> dict[str, Any]:  # fmt: skip
        """The fairness section (:func:`finrec.monitoring.fairness.fairness_of_tallies`) over every answer and
        event so far."""
        ids = users["user_id"].astype(str).tolist()
        per = np.zeros((len(ids), 7), dtype=np.int64)
        unmatched_answers = unmatched_events = 0
        if self.key is not None:
            with self._lock:
                tallies = self._db.execute("SELECT who, a, i, e, imp, app, appr, dec FROM fair").fetchall()
            rows = pseudonym_rows(ids, self.key, cache_key)
            for who, *t in tallies:
                r = rows.get(who, -1)
                if r < 0:
                    unmatched_answers += t[0]
                    unmatched_events += sum(t[3:])
                else:
                    per[r] = t
        return fairness_of_tallies(per, users, self.key is not None, attributes, monitor, unmatched_answers,
                                   unmatched_events)  # fmt: skip

    def sizes(self) -> dict[str, int]:
        """Rows per table: what a report reads (for the benchmark and the page's footnote)."""
        with self._lock:
            return {t: int(self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in _TABLES}

