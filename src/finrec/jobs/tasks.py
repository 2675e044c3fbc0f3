"""The scheduled jobs: what each does, what it reports, which alerts it raises.

Every job is a function ``(settings, alerter) -> JobOutcome`` that raises :class:`~finrec.errors.FinrecError`
for what an operator must fix; the runner (:mod:`finrec.jobs.scheduler`) records either in the history.

* ``drift-check``: the champion's drift on the service's feedback since its data ends (the new events
  appended to its dataset in a temporary folder, removed afterwards). Stores a drift alert when it alerts
  (the trigger of ``retrain`` on drift), exports PSI/KS per feature, notifies ``drift`` on a change.
* ``retrain``: :func:`finrec.lifecycle.retrain.retrain`, then the promotion gate (``schedule.promote``
  promotes a challenger that passes). A refused challenger or a failed retrain notifies ``retrain``.
* ``rollup``: folds the new events and audit records into the monitoring roll-up, exports conversion per
  model version and arm, and judges guardrail health (empty answers over ``alerts.empty_answer_rate`` in
  the last ``alerts.health_window_hours``; once firing, it clears under 80% of the threshold) and fairness
  (any flagged comparison).

Summaries and alerts hold aggregates, versions and paths, never a customer id or attribute.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finrec.config import FinrecSettings
from finrec.errors import FinrecError
from finrec.monitoring.notify import Alerter, read_state

JOBS = ("rollup", "drift-check", "retrain")


@dataclass
class JobOutcome:
    """How a job ended: ``outcome`` (ok, alert, skipped, refused) and a JSON-ready ``summary`` with a message."""

    outcome: str
    message: str
    summary: dict[str, Any] = field(default_factory=dict)

    def to_summary(self) -> dict[str, Any]:
        return {"message": self.message, **self.summary}


def _deliveries(deliveries: list[Any]) -> list[dict[str, Any]]:
    return [{"sink": d.sink, "delivered": d.delivered, "attempts": d.attempts, "error": d.error} for d in deliveries]


# -- drift-check ---------------------------------------------------------------------------------------------


def drift_check(settings: FinrecSettings, alerter: Alerter) -> JobOutcome:
    from finrec.lifecycle.retrain import collect_feedback, extend_dataset
    from finrec.monitoring.alerts import AlertLog, alerts_path
    from finrec.monitoring.drift import check_drift
    from finrec.monitoring.exported import write_section
    from finrec.registry import CHAMPION, ModelRegistry

    registry = ModelRegistry.from_settings(settings)
    champion = registry.resolve(CHAMPION)
    if champion is None:
        return JobOutcome("skipped", "no champion in the registry: nothing whose drift to check",
                          {"registry": str(registry.home)})  # fmt: skip
    feedback = collect_feedback(settings, registry)
    if not feedback.events:
        return JobOutcome("skipped", f"no new feedback since {feedback.since}", {"champion": champion})
    folder = settings.workspace / "scheduler" / "tmp" / f"drift-{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
    try:
        extend_dataset(feedback.base, feedback.events, folder, {"purpose": "drift check"})
        report = check_drift(registry.path(champion), folder, settings)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    stored = AlertLog(alerts_path(settings.workspace)).record_drift(report)
    features: list[dict[str, Any]] = [
        {"name": f.name, "psi": _finite(f.psi), "ks": _finite(f.ks), "drifted": bool(f.drifted)}
        for f in [*report.features, report.score]
    ]
    write_section(settings.workspace, "drift", {"checked_at": time.time(), "model_version": report.model_version,
                                                "alert": report.alert, "features": features})  # fmt: skip
    top = sorted((f for f in features if f["drifted"]), key=lambda f: -(f["psi"] or 0))[:10]
    title = f"drift: {len(report.drifted)} input(s) of the champion {champion} moved" if report.alert else \
        f"drift: the champion {champion}'s inputs are back within the thresholds"  # fmt: skip
    summary_text = ", ".join(f"{f['name']} (PSI {_rounded(f['psi'])}, KS {_rounded(f['ks'])})" for f in top) \
        or "no feature over the thresholds"  # fmt: skip
    deliveries = alerter.condition("drift", report.alert, title, summary_text, {
        "champion": champion, "model_version": report.model_version, "new_events": len(feedback.events),
        "drifted": top, "thresholds": {"psi": report.psi_threshold, "ks": report.ks_threshold},
    })  # fmt: skip
    summary = {"champion": champion, "model_version": report.model_version, "new_events": len(feedback.events),
               "drifted": list(report.drifted), "alert_stored": stored is not None,
               "deliveries": _deliveries(deliveries)}  # fmt: skip
    if report.alert:
        return JobOutcome("alert", f"drift alert on {len(feedback.events)} new events: "
                          f"{', '.join(report.drifted[:6])}", summary)  # fmt: skip
    return JobOutcome("ok", f"no drift on {len(feedback.events)} new events", summary)


def _rounded(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _finite(v: float) -> float | None:
    return None if v is None or v != v else float(v)


# -- retrain -------------------------------------------------------------------------------------------------


def retrain(settings: FinrecSettings, alerter: Alerter) -> JobOutcome:
    from finrec.lifecycle.retrain import retrain as run

    try:
        result = run(settings, promote=settings.schedule.promote, progress=False)
    except Exception as exc:
        reason = exc.message if isinstance(exc, FinrecError) else f"{type(exc).__name__}: {str(exc)[:200]}"
        alerter.condition("retrain", True, "retraining failed", reason, {"error": reason}, severity="critical",
                          every_time=True)  # fmt: skip
        raise
    summary: dict[str, Any] = {"new_events": result.new_events, "champion": result.champion,
                               "challenger": result.challenger, "dataset": result.dataset,
                               "seconds": result.seconds}  # fmt: skip
    if not result.ran:
        return JobOutcome("skipped", f"nothing to retrain on: {result.reason}", summary)
    gate = result.gate
    summary["gate"] = None if gate is None else gate.to_dict()
    summary["promoted"] = result.promoted
    if gate is not None and not gate.passed:
        deliveries = alerter.condition(
            "retrain", True, f"retrained challenger {result.challenger} refused by the promotion gate", gate.message,
            {"challenger": result.challenger, "champion": result.champion, "metric": gate.metric,
             "new_events": result.new_events}, every_time=True)  # fmt: skip
        summary["deliveries"] = _deliveries(deliveries)
        return JobOutcome("refused", f"challenger {result.challenger} refused by the gate: {gate.message}", summary)
    alerter.condition("retrain", False, "retraining works again", f"challenger {result.challenger} passed the gate",
                      {"challenger": result.challenger})  # fmt: skip
    verdict = "promoted to champion" if result.promoted else "registered as challenger"
    gate_text = "" if gate is None else f" (gate passes: {gate.message})"
    return JobOutcome("ok", f"{result.challenger} {verdict} on {result.new_events} new events{gate_text}", summary)


# -- rollup --------------------------------------------------------------------------------------------------


def open_rollup(settings: FinrecSettings) -> Any:
    """The workspace's roll-up of the service's stores, with its audit key (None before the service made one)."""
    from finrec.monitoring.rollup import MonitoringRollup, rollup_path, sources_of
    from finrec.serving.audit import load_or_create_key

    audit_path, key_path = settings.serve.audit_paths(settings.workspace)
    key = load_or_create_key(key_path) if key_path.is_file() else None  # only read: it exists
    days = settings.serve.request_id_max_age_days
    sources = sources_of(settings.serve.event_store_url(settings.workspace), audit_path)
    return MonitoringRollup(rollup_path(settings.workspace), key, retention_seconds=days * 86_400, sources=sources)


def read_users(data_dir: Path, attributes: list[str]) -> Any:
    """The users table's id and protected attribute columns (the rest of the dataset is not read)."""
    from finrec.data.io import column_types, open_dataset, quote_ident

    con = open_dataset(data_dir)
    try:
        present = [a for a in attributes if a in column_types(con, "users")]
        cols = ", ".join(quote_ident(c) for c in ["user_id", *present])
        users = con.execute(f'SELECT {cols} FROM users ORDER BY "__row"').df()
    finally:
        con.close()
    users["user_id"] = users["user_id"].astype(str)
    return users


def fairness_data(settings: FinrecSettings) -> Path | None:
    """The dataset whose customers fairness groups: serve.data, else the champion's training data."""
    if settings.serve.data is not None:
        return Path(settings.serve.data)
    from finrec.registry import CHAMPION, ModelRegistry

    registry = ModelRegistry.from_settings(settings)
    champion = registry.resolve(CHAMPION)
    data = registry.entry(champion).get("data", {}).get("data") if champion else None
    return Path(data) if data and Path(data).is_dir() else None


def rollup(settings: FinrecSettings, alerter: Alerter) -> JobOutcome:
    from finrec.events.store import open_existing_event_store
    from finrec.monitoring.exported import write_section

    audit_path, _ = settings.serve.audit_paths(settings.workspace)
    store_url = settings.serve.event_store_url(settings.workspace)
    if store_url.startswith("memory://"):
        return JobOutcome("skipped", "the event store is memory:// (one process's own): the service's dashboard "
                          "rolls it up itself")  # fmt: skip
    roll = open_rollup(settings)
    try:
        store = open_existing_event_store(store_url)
        try:
            update = roll.update(store, audit_path)
        finally:
            store.close()
        mon, a = settings.monitor, settings.alerts
        conv = roll.conversion(mon)
        write_section(settings.workspace, "conversion", {"totals": conv["totals"], "updated_at": time.time()})
        summary: dict[str, Any] = {**update, "impressions": sum(r["impressions"] for r in conv["totals"])}
        alerts: list[str] = []
        # guardrail health over the recent answers (service clock)
        last = roll.last_answer_ts()
        recent = roll.health_counts(since=None if last is None else last - a.health_window_hours * 3600)
        answers, empty = recent.answers, recent.empty
        rate = empty / answers if answers else None
        judged = answers >= a.health_min_answers
        # Hysteresis: once firing, it clears only under 80% of the threshold, so a rate hovering at the threshold
        # does not send "firing" and "resolved" every few minutes.
        was = bool(read_state(settings.workspace).get("guardrail_health", {}).get("firing"))
        bar = a.empty_answer_rate * (0.8 if was else 1.0)
        firing = bool(judged and rate is not None and rate > bar)
        summary["health"] = {"recent_answers": answers, "empty": empty, "empty_rate": rate, "judged": judged}
        deliveries = alerter.condition(
            "guardrail_health", firing,
            f"guardrail health: {rate:.1%} of the last {a.health_window_hours:g} h's answers are empty" if firing
            else "guardrail health: empty answers back under the threshold",
            f"{empty} of {answers} answers empty (threshold {a.empty_answer_rate:.0%}); a profile column gone "
            "missing or a rule change usually explains it" if firing else f"{empty} of {answers} answers empty",
            {"answers": answers, "empty": empty, "empty_rate": rate, "threshold": a.empty_answer_rate,
             "window_hours": a.health_window_hours})  # fmt: skip
        if firing:
            alerts.append("guardrail health")
        # fairness over the whole period
        data = fairness_data(settings)
        if data is not None and roll.key is not None:
            users = read_users(data, list(settings.protected_attributes))
            fair = roll.fairness(users, settings.protected_attributes, mon, cache_key=str(data.resolve()))
            flagged = list(fair.get("flagged") or [])
            details = {"flagged": [_fair_detail(fair, f) for f in flagged]}
            deliveries += alerter.condition(
                "fairness", bool(flagged), f"fairness: {len(flagged)} comparison(s) flagged" if flagged
                else "fairness: nothing flagged any more", "; ".join(flagged) or "nothing flagged",
                details)  # fmt: skip
            summary["fairness_flagged"] = flagged
            if flagged:
                alerts.append("fairness")
        else:
            summary["fairness"] = "skipped: no dataset (serve.data or the champion's) or no audit key yet"
        summary["deliveries"] = _deliveries(deliveries)
    finally:
        roll.close()
    message = (f"folded in {update['events_read']} events and {update['audit_records_read']} answers in "
               f"{update['seconds']} s")  # fmt: skip
    if alerts:
        return JobOutcome("alert", f"{message}; alerts: {', '.join(alerts)}", summary)
    return JobOutcome("ok", message, summary)


def _fair_detail(fair: dict[str, Any], flagged: str) -> dict[str, Any]:
    """A flagged comparison as aggregates: attribute, metric, ratio, p-value, and the two group labels compared
    (groups of at least monitor.min_group_size; no customer)."""
    attr, _, metric = flagged.partition(": ")
    res = (fair.get("attributes") or {}).get(attr, {}).get(metric, {})
    return {"attribute": attr, "metric": metric, "ratio": res.get("ratio"), "p_value": res.get("p_value"),
            "lowest_group": res.get("lowest"), "highest_group": res.get("highest")}  # fmt: skip


TASKS: dict[str, Callable[[FinrecSettings, Alerter], JobOutcome]] = {
    "rollup": rollup, "drift-check": drift_check, "retrain": retrain,
}
