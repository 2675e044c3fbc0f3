"""The monitoring dashboard: conversion, guardrail health, fairness and stored alerts of the running service.

``GET /dashboard`` is the page ``finrec monitor`` writes (:func:`finrec.monitoring.report.render_html`), built
from this service's own event store, audit log and customers; ``GET /dashboard.json`` is its data. Building
reads the whole event store and audit log (seconds for hundreds of thousands of events), so the handlers are
sync (FastAPI runs them in its threadpool, never on the event loop) and the result is cached: the first request
builds it (concurrent ones wait for that build rather than start their own); once older than
:data:`CACHE_SECONDS`, requests get the last report at once while one background thread builds the next.

Drift is not computed here: a check runs the model on thousands of customers. The page shows the drift
report of the latest stored drift alert when there is one, else says how to run a check.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from finrec.jobs.history import read_history
from finrec.monitoring.exported import write_section
from finrec.monitoring.fairness import suppress_small_groups
from finrec.monitoring.report import build_rollup_report, render_html, stored_alerts
from finrec.monitoring.rollup import MonitoringRollup, rollup_path, sources_of
from finrec.serving.paths import scrub_value
from finrec.serving.routes.deps import MonitorCaller, MonitorPageCaller, ServiceDep
from finrec.serving.service import Service

router = APIRouter(tags=["monitoring"])
log = logging.getLogger("finrec.serving")

#: A report is rebuilt at most this often; the page itself asks the browser to reload every REFRESH_SECONDS.
CACHE_SECONDS = 5.0
REFRESH_SECONDS = 60
_NO_DRIFT = "the dashboard does not run drift checks (they score thousands of customers); run `finrec monitor " \
    "--model-dir MODEL --data DATA` or the scheduled drift check, whose alerts then show here"  # fmt: skip


@dataclass
class _Cached:
    lock: threading.Lock = field(default_factory=threading.Lock)
    built: float = -float("inf")
    report: dict[str, Any] | None = None
    html: str | None = None
    refreshing: bool = False
    rollup: MonitoringRollup | None = None
    job_lock: Any = None


_cache: weakref.WeakKeyDictionary[Service, _Cached] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _entry(service: Service) -> _Cached:
    with _cache_lock:
        entry = _cache.get(service)
        if entry is None:
            entry = _cache[service] = _Cached()
        return entry


def _fold(service: Service, entry: _Cached) -> tuple[MonitoringRollup, dict[str, Any] | None]:
    """The service's roll-up, with what is new folded in when no other runner is folding it now."""
    settings = service.settings
    memory = settings.serve.event_store_url(settings.workspace).startswith("memory://")
    if entry.rollup is None:
        days = settings.serve.request_id_max_age_days
        sources = sources_of(settings.serve.event_store_url(settings.workspace), service.audit_path)
        entry.rollup = MonitoringRollup(None if memory else rollup_path(settings.workspace), service.audit_key,
                                        retention_seconds=days * 86_400, sources=sources)  # fmt: skip
    if memory:  # the store lives in this process: so does its roll-up, and nobody else folds it
        return entry.rollup, entry.rollup.update(service.recommender.events, service.audit_path)
    if entry.job_lock is None:
        from finrec.jobs.locks import open_job_lock

        s = settings.schedule
        entry.job_lock = open_job_lock(s.lock, settings.workspace, settings.serve.event_store, s.lock_seconds)
    lease = entry.job_lock.try_acquire("rollup")
    if lease is None:
        return entry.rollup, None
    with lease:
        return entry.rollup, entry.rollup.update(service.recommender.events, service.audit_path)


def _build(service: Service, entry: _Cached) -> dict[str, Any]:
    rec = service.recommender
    alerts, note = stored_alerts(service.settings)
    latest = next((a for a in reversed(alerts) if a.get("kind") == "drift"), None)
    drift = _drift_of_alert(latest) if latest is not None else {"available": False, "reason": _NO_DRIFT}
    rollup, update = _fold(service, entry)
    try:
        jobs = read_history(service.settings.workspace)
    except Exception:  # the history is a footnote: a damaged one must not take the page with it
        log.exception("cannot read the job history")
        jobs = []
    report = build_rollup_report(rollup, rec.model.data.ds, service.settings, drift, alerts, jobs, update)
    try:  # /metrics exports the same conversion rates (finrec_conversion_rate)
        write_section(service.settings.workspace, "conversion", {"totals": report["conversion"]["totals"]})
    except OSError:
        log.warning("cannot write the conversion figures for /metrics")
    report["title"] = "finrec monitoring: live service"
    report["model_version"] = rec.model.version
    if note:
        report["notes"].append(note)
    suppress_small_groups(report, service.settings.monitor.min_reported_group_size)
    scrubbed: dict[str, Any] = scrub_value(report)  # type: ignore[assignment]  # no server paths in an answer
    return scrubbed


def _drift_of_alert(alert: dict[str, Any]) -> dict[str, Any]:
    """The drift section from a stored drift alert (:meth:`finrec.monitoring.alerts.AlertLog.record_drift`)."""
    feats = [f for f in alert.get("drifted") or [] if isinstance(f, dict)]
    keys = ("model_version", "reference_cutoff", "current_cutoff", "thresholds")
    facts: dict[str, Any] = {k: alert[k] for k in keys if k in alert}
    return {"alert": True, "drifted": [str(f.get("name")) for f in feats], "features": feats,
            "source": f"the latest stored drift alert, of {alert.get('time', 'unknown time')}", **facts}  # fmt: skip


def _refresh(service: Service, entry: _Cached) -> None:
    try:
        report = _build(service, entry)
    except Exception:  # keep serving the last report; the next request tries again
        log.exception("dashboard rebuild failed")
        with entry.lock:
            entry.refreshing = False
        return
    with entry.lock:
        entry.report, entry.html, entry.built, entry.refreshing = report, None, time.monotonic(), False


def _cached(service: Service, html: bool) -> tuple[dict[str, Any], str | None]:
    entry = _entry(service)
    with entry.lock:
        if entry.report is None:
            entry.report, entry.built = _build(service, entry), time.monotonic()
        elif time.monotonic() - entry.built > CACHE_SECONDS and not entry.refreshing:
            entry.refreshing = True
            threading.Thread(target=_refresh, args=(service, entry), name="finrec-dashboard", daemon=True).start()
        if html and entry.html is None:
            entry.html = render_html(entry.report, refresh_seconds=REFRESH_SECONDS)
        return entry.report, entry.html


@router.get("/dashboard", response_class=HTMLResponse, openapi_extra={"x-scopes": ["monitor"]})
def dashboard(caller: MonitorPageCaller, service: ServiceDep) -> HTMLResponse:
    """Monitoring page (HTML, self-contained): conversion per model and arm, guardrail health, fairness, alerts.

    In a browser, give an API key with the `monitor` scope as the password when it asks (any user name).
    """
    _, page = _cached(service, html=True)
    return HTMLResponse(page or "", headers={"Cache-Control": "no-store"})


@router.get("/dashboard.json", openapi_extra={"x-scopes": ["monitor"]})
def dashboard_json(caller: MonitorCaller, service: ServiceDep) -> dict[str, Any]:
    """The data behind /dashboard, as JSON (the same as `finrec monitor` writes to monitor.json)."""
    report, _ = _cached(service, html=False)
    return report
