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

from finrec.monitoring.fairness import suppress_small_groups
from finrec.monitoring.report import build_monitor_report, render_html, stored_alerts
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


_cache: weakref.WeakKeyDictionary[Service, _Cached] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _entry(service: Service) -> _Cached:
    with _cache_lock:
        entry = _cache.get(service)
        if entry is None:
            entry = _cache[service] = _Cached()
        return entry


def _build(service: Service) -> dict[str, Any]:
    rec = service.recommender
    alerts, note = stored_alerts(service.settings)
    latest = next((a for a in reversed(alerts) if a.get("kind") == "drift"), None)
    drift = _drift_of_alert(latest) if latest is not None else {"available": False, "reason": _NO_DRIFT}
    report = build_monitor_report(rec.events, service.audit_path, service.audit_key, rec.model.data.ds,
                                  service.settings, drift, alerts)  # fmt: skip
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
        report = _build(service)
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
            entry.report, entry.built = _build(service), time.monotonic()
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
