"""Alerts that reach people: a webhook (JSON POST with retries and a dead-letter file), the stored alert log,
and the ``alerts firing`` state that ``/metrics`` exports for Alertmanager.

An alert is about the service, never about a customer: :class:`Alert` holds a kind, a status, a one-line
title, a summary and aggregate details (feature names and their PSI/KS, rates and ratios, model versions,
counts). Builders of alerts (:mod:`finrec.jobs.tasks`) put nothing else in; :func:`check_no_customer_data`
is the test's guard.

:class:`Alerter` keeps one state per kind (``<workspace>/monitoring/alert-state.json``) and notifies on
transitions: a condition that starts firing is sent once (``status: firing``), and once more when it clears
(``status: resolved``), so a drift that lasts a week is not sent every six hours; a failed or refused retrain
is sent every time. Kinds: ``drift``, ``fairness``, ``guardrail_health``, ``retrain``.

Webhook deliveries are retried on connection errors, timeouts, 429 and 5xx (``alerts.webhook_retries``,
backoff doubling from ``alerts.webhook_backoff_seconds``); a 4xx other than 429 is not retried (the receiver
refuses the request as such). An alert that was never accepted is appended to the dead-letter file with the
reason, to be replayed (``finrec scheduler test-webhook`` checks the receiver).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from finrec.config import FinrecSettings
from finrec.monitoring.alerts import AlertLog, alerts_path

log = logging.getLogger("finrec.alerts")
KINDS = ("drift", "fairness", "guardrail_health", "retrain")


@dataclass
class Alert:
    """One notification. ``details`` holds aggregates only (see the module docstring)."""

    kind: str
    status: str  # firing | resolved
    title: str
    summary: str
    severity: str = "warning"
    details: dict[str, Any] = field(default_factory=dict)
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    source: str = "finrec"

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Delivery:
    """What became of one alert at one sink."""

    sink: str
    delivered: bool
    attempts: int
    error: str | None = None


def safe_url(url: str) -> str:
    """``scheme://host[:port]/…``: a webhook URL often carries a token in its path or query; never show it."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}/…"


class WebhookSink:
    """POSTs alerts as JSON to ``url``; see the module docstring for retries and the dead-letter file."""

    def __init__(self, url: str, dead_letter: Path, timeout: float = 5.0, retries: int = 3, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.url, self.dead_letter = url, Path(dead_letter)
        self.timeout, self.retries, self.backoff, self._sleep = timeout, retries, backoff, sleep

    @property
    def name(self) -> str:
        return f"webhook {safe_url(self.url)}"

    def send(self, alert: Alert) -> Delivery:
        payload = alert.to_payload()
        error = None
        attempts = 0
        for attempt in range(self.retries + 1):
            attempts = attempt + 1
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = httpx.post(self.url, json=payload, timeout=self.timeout,
                               headers={"User-Agent": "finrec-alerts", "Idempotency-Key": alert.id})  # fmt: skip
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {str(exc)[:120] or 'no answer'}"
                continue
            if r.status_code < 300:
                return Delivery(self.name, True, attempts)
            error = f"HTTP {r.status_code}"
            if r.status_code < 500 and r.status_code != 429:
                break  # the receiver refuses this request as such: retrying sends the same
        self._dead_letter(payload, error or "unknown")
        log.warning("alert %s (%s) not delivered to %s after %d attempt(s): %s; kept in %s", alert.id, alert.kind,
                    self.name, attempts, error, self.dead_letter)  # fmt: skip
        return Delivery(self.name, False, attempts, error)

    def _dead_letter(self, payload: dict[str, Any], error: str) -> None:
        record = {"failed_at": datetime.now(UTC).isoformat(timespec="seconds"), "sink": self.name, "error": error,
                  "alert": payload}  # fmt: skip
        self.dead_letter.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dead_letter, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps(record, default=str) + "\n").encode())
        finally:
            os.close(fd)


def state_path(workspace: Path) -> Path:
    return Path(workspace) / "monitoring" / "alert-state.json"


def read_state(workspace: Path) -> dict[str, dict[str, Any]]:
    """Per kind: ``firing``, ``since``, ``title``, ``checked_at`` (empty before the first check)."""
    try:
        data = json.loads(state_path(workspace).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Alerter:
    """Delivers alerts of one workspace to the configured sinks (see the module docstring)."""

    def __init__(self, settings: FinrecSettings, sleep: Callable[[float], None] = time.sleep) -> None:
        self.workspace = settings.workspace
        a = settings.alerts
        self.sinks: list[WebhookSink] = []
        if a.webhook_url:
            self.sinks.append(WebhookSink(a.webhook_url, a.dead_letter_path(settings.workspace),
                                          a.webhook_timeout_seconds, a.webhook_retries, a.webhook_backoff_seconds,
                                          sleep))  # fmt: skip

    def condition(self, kind: str, firing: bool, title: str, summary: str, details: dict[str, Any] | None = None,
                  severity: str = "warning", every_time: bool = False) -> list[Delivery]:  # fmt: skip
        """Report the state of a condition after a check; notifies when it starts or stops firing (or, with
        ``every_time``, whenever it fires). Returns the deliveries made (none when nothing changed)."""
        if kind not in KINDS:
            raise ValueError(f"unknown alert kind {kind!r}")
        state = read_state(self.workspace)
        was = bool(state.get(kind, {}).get("firing"))
        now = datetime.now(UTC).isoformat(timespec="seconds")
        entry = {"firing": firing, "since": state.get(kind, {}).get("since") if was == firing else now,
                 "title": title, "checked_at": now}  # fmt: skip
        state[kind] = entry
        self._write_state(state)
        if firing and (every_time or not was):
            return self.send(Alert(kind, "firing", title, summary, severity, details or {}))
        if was and not firing:
            return self.send(Alert(kind, "resolved", title, summary, "info", details or {}))
        return []

    def send(self, alert: Alert) -> list[Delivery]:
        """Store ``alert`` (drift alerts are stored by the drift check itself) and deliver it to every sink."""
        check_no_customer_data(alert.to_payload())
        if alert.kind != "drift" and alert.status == "firing":
            AlertLog(alerts_path(self.workspace)).append({"kind": alert.kind, "title": alert.title,
                                                          "summary": alert.summary, "details": alert.details})
        return [sink.send(alert) for sink in self.sinks]

    def _write_state(self, state: dict[str, Any]) -> None:
        path = state_path(self.workspace)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)


#: Keys that name a customer or hold their data; an alert must carry none of them.
_CUSTOMER_KEYS = frozenset({"user_id", "customer", "customer_id", "users", "user", "pseudonym", "request_id",
                            "profile", "income", "credit_score", "age", "gender"})  # fmt: skip


def check_no_customer_data(payload: Any, where: str = "alert") -> None:
    """Raise ``ValueError`` if ``payload`` has a key that names a customer or holds their data (a bug)."""
    if isinstance(payload, dict):
        for k, v in payload.items():
            if str(k).lower() in _CUSTOMER_KEYS:
                raise ValueError(f"{where} carries customer data under {k!r}")
            check_no_customer_data(v, f"{where}.{k}")
    elif isinstance(payload, list):
        for i, v in enumerate(payload):
            check_no_customer_data(v, f"{where}[{i}]")
