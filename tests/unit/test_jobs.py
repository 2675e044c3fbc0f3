"""Scheduled jobs and alerts without a service: when a job is due, the history, webhook retries and the
dead-letter file, notifying on transitions, no customer data in an alert, the Prometheus figures."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from finrec.config import FinrecSettings
from finrec.errors import ConfigError
from finrec.jobs.history import JobHistory
from finrec.jobs.locks import FileJobLock
from finrec.jobs.scheduler import Scheduler, due, run_job
from finrec.jobs.tasks import JobOutcome
from finrec.monitoring.alerts import AlertLog, alerts_path, read_alerts
from finrec.monitoring.exported import MonitoringCollector, write_section
from finrec.monitoring.notify import Alert, Alerter, WebhookSink, check_no_customer_data, read_state


class Receiver:
    """A local webhook receiver: answers each POST with the next status of ``statuses`` (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.received: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(json.loads(body))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(statuses: list[int] | None = None) -> Receiver:
        made.append(Receiver(statuses or []))
        return made[-1]

    yield make
    for r in made:
        r.server.shutdown()


def settings(tmp_path: Path, **kw: Any) -> FinrecSettings:
    return FinrecSettings(workspace=tmp_path / "ws", **kw)


# -- webhook ---------------------------------------------------------------------------------------------


def test_webhook_retries_5xx_and_429_then_delivers(tmp_path: Path, receiver: Any) -> None:
    r = receiver([503, 429])
    waits: list[float] = []
    sink = WebhookSink(r.url, tmp_path / "dead.jsonl", retries=3, backoff=0.5, sleep=waits.append)
    delivery = sink.send(Alert("drift", "firing", "t", "s", details={"drifted": [{"name": "income", "psi": 0.4}]}))
    assert delivery.delivered and delivery.attempts == 3
    assert waits == [0.5, 1.0]  # backoff doubles
    assert [p["id"] for p in r.received] == [r.received[0]["id"]] * 3  # the same alert, so receivers can dedupe
    assert r.received[0]["kind"] == "drift" and r.received[0]["details"]["drifted"][0]["name"] == "income"
    assert not (tmp_path / "dead.jsonl").exists()
    assert "secret" not in sink.name  # a token in the URL is never shown


def test_an_unreachable_or_refusing_webhook_lands_in_the_dead_letter_file(tmp_path: Path, receiver: Any) -> None:
    dead = tmp_path / "dead.jsonl"
    down = WebhookSink("http://127.0.0.1:9/hook", dead, timeout=1, retries=2, sleep=lambda s: None)
    d = down.send(Alert("retrain", "firing", "retraining failed", "boom"))
    assert not d.delivered and d.attempts == 3 and "ConnectError" in (d.error or "")
    r = receiver([400, 400])
    refused = WebhookSink(r.url, dead, retries=5, sleep=lambda s: None).send(Alert("drift", "firing", "t", "s"))
    assert not refused.delivered and refused.attempts == 1  # a 4xx is not retried: the same request fails again
    lines = [json.loads(x) for x in dead.read_text().splitlines()]
    assert [x["alert"]["kind"] for x in lines] == ["retrain", "drift"] and lines[1]["error"] == "HTTP 400"
    assert oct(dead.stat().st_mode & 0o777) == "0o600"


def test_alerter_notifies_when_a_condition_starts_and_stops_firing(tmp_path: Path, receiver: Any) -> None:
    r = receiver()
    alerter = Alerter(settings(tmp_path, alerts={"webhook_url": r.url}))
    assert alerter.condition("fairness", False, "ok", "nothing flagged") == []  # never fired: nothing to say
    assert [d.delivered for d in alerter.condition("fairness", True, "flagged", "gender: approval")] == [True]
    assert alerter.condition("fairness", True, "flagged", "gender: approval") == []  # still firing: said already
    assert read_state(tmp_path / "ws")["fairness"]["firing"]
    alerter.condition("fairness", False, "ok", "nothing flagged")
    assert [p["status"] for p in r.received] == ["firing", "resolved"]
    alerter.condition("retrain", True, "refused", "worse", every_time=True)
    alerter.condition("retrain", True, "refused", "worse", every_time=True)
    assert [p["kind"] for p in r.received].count("retrain") == 2  # each refusal is news
    stored = [a["kind"] for a in read_alerts(alerts_path(tmp_path / "ws"))]
    assert stored == ["fairness", "retrain", "retrain"]  # firing alerts are stored for the dashboard


def test_no_alert_carries_customer_data() -> None:
    check_no_customer_data({"details": {"drifted": [{"name": "user_income", "psi": 0.3}], "attribute": "gender"}})
    for bad in ({"details": {"user_id": "42"}}, {"details": {"rows": [{"customer": "abc"}]}}):
        with pytest.raises(ValueError, match="customer data"):
            check_no_customer_data(bad)


@pytest.mark.parametrize("url", ["ftp://host/x", "hooks.example.com", "http://"])
def test_a_bad_webhook_url_is_refused_with_an_example(tmp_path: Path, url: str) -> None:
    from finrec.config import load_settings

    cfg = tmp_path / "finrec.toml"
    cfg.write_text(f'[alerts]\nwebhook_url = "{url}"\n')
    with pytest.raises(ConfigError, match=r"alerts.webhook_url.*https://hooks.example.com"):
        load_settings(cfg)


# -- when jobs are due, and the history ------------------------------------------------------------------


def test_interval_jobs_are_due_first_at_once_then_after_their_interval(tmp_path: Path) -> None:
    s = settings(tmp_path, schedule={"drift_check_every_hours": 2, "rollup_every_minutes": 5})
    assert due("drift-check", s, None, now=1000.0) == "every 2 h (first run)"
    assert due("drift-check", s, 1000.0, now=1000.0 + 7199) is None
    assert due("drift-check", s, 1000.0, now=1000.0 + 7200) == "every 2 h"
    assert due("rollup", s, 1000.0, now=1300.0) == "every 5 min"
    off = settings(tmp_path, schedule={"drift_check_every_hours": None})
    assert due("drift-check", off, None) is None


def test_retrain_is_due_after_a_drift_alert_newer_than_the_last_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finrec.jobs.scheduler as sched

    s = settings(tmp_path, schedule={"retrain_on_drift": True, "retrain_every_days": 7})
    monkeypatch.setattr(sched, "last_training", lambda settings, last: 1_000_000.0)
    assert due("retrain", s, None, now=1_000_000.0 + 3600) is None  # no alert, not a week yet
    AlertLog(alerts_path(s.workspace)).append({"kind": "drift", "time": "1970-01-12T13:46:41+00:00"})  # 1000001
    assert due("retrain", s, None, now=1_000_000.0 + 3600).startswith("drift alert of")
    assert due("retrain", settings(tmp_path, schedule={"retrain_on_drift": False}), None, 1_000_000.0 + 3600) is None
    assert due("retrain", s, None, now=1_000_000.0 + 7 * 86_400) == "every 7 d"


def test_a_drift_alert_waits_for_the_interval_after_the_last_retrain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While drift persists, every check against the freshly retrained champion alerts again: at most one
    drift-triggered retrain per ``drift_retrain_min_hours``, and the waiting alert is acted on afterwards."""
    import finrec.jobs.scheduler as sched

    s = settings(tmp_path, schedule={"retrain_on_drift": True, "drift_retrain_min_hours": 6})
    ran = 1_000_000.0  # the retrain job's last start, which is also the last training
    monkeypatch.setattr(sched, "last_training", lambda settings, last: ran)
    AlertLog(alerts_path(s.workspace)).append({"kind": "drift", "time": "1970-01-12T14:46:40+00:00"})  # ran + 1 h
    assert due("retrain", s, ran, now=ran + 2 * 3600) is None  # alerted again 1 h after the retrain: it waits
    assert due("retrain", s, ran, now=ran + 6 * 3600 - 1) is None
    assert due("retrain", s, ran, now=ran + 6 * 3600).startswith("drift alert of 1970-01-12T14:46:40")
    assert due("retrain", s, None, now=ran + 2 * 3600).startswith("drift alert of")  # never retrained: at once
    at_once = settings(tmp_path, schedule={"retrain_on_drift": True, "drift_retrain_min_hours": 0})
    assert due("retrain", at_once, ran, now=ran + 2 * 3600).startswith("drift alert of")


def test_a_negative_drift_retrain_interval_is_refused_naming_the_setting(tmp_path: Path) -> None:
    from finrec.config import load_settings

    cfg = tmp_path / "finrec.toml"
    cfg.write_text("[schedule]\ndrift_retrain_min_hours = -1\n")
    with pytest.raises(ConfigError, match=r"schedule.drift_retrain_min_hours"):
        load_settings(cfg)


def test_a_job_runs_once_per_due_time_and_every_run_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finrec.jobs.scheduler as sched

    calls: list[float] = []

    def slow_rollup(settings: Any, alerter: Any) -> JobOutcome:
        calls.append(time.time())
        time.sleep(0.3)
        return JobOutcome("ok", "folded in 3 events")

    monkeypatch.setitem(sched.TASKS, "rollup", slow_rollup)
    s = settings(tmp_path, schedule={"rollup_every_minutes": 60})
    lock = FileJobLock(tmp_path / "locks")
    history = JobHistory(tmp_path / "history.db")
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(run_job("rollup", s, lock, history, Alerter(s)).status))
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(results).count("ok") == 1
    assert set(results) <= {"ok", "busy", "not_due"}
    (run,) = history.runs("rollup")
    assert run.outcome == "ok" and run.trigger == "every 1 h (first run)" and run.summary["message"] == \
        "folded in 3 events" and run.ended_at is not None and run.ended_at >= run.started_at  # fmt: skip
    forced = run_job("rollup", s, lock, history, Alerter(s), force=True)
    assert forced.status == "ok" and forced.trigger == "by hand" and len(calls) == 2


def test_a_failing_job_is_recorded_and_the_scheduler_carries_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finrec.jobs.scheduler as sched

    def broken(settings: Any, alerter: Any) -> JobOutcome:
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(sched.TASKS, "rollup", broken)
    monkeypatch.setitem(sched.TASKS, "drift-check", lambda s, a: JobOutcome("alert", "drift on income"))
    s = settings(tmp_path, schedule={"rollup_every_minutes": 1, "drift_check_every_hours": 1,
                                     "retrain_on_drift": False, "tick_seconds": 0.1})  # fmt: skip
    history = JobHistory(tmp_path / "history.db")
    seen: list[Any] = []
    Scheduler(s, FileJobLock(tmp_path / "locks"), history, Alerter(s), report=seen.append).run(max_rounds=2)
    assert [(r.job, r.status) for r in seen] == [("rollup", "failed"), ("drift-check", "alert")]  # once each
    assert "disk on fire" in history.runs("rollup")[0].summary["message"]


def test_a_run_left_running_by_a_dead_runner_is_marked_abandoned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finrec.jobs.scheduler as sched

    monkeypatch.setitem(sched.TASKS, "rollup", lambda s, a: JobOutcome("skipped", "nothing new"))
    history = JobHistory(tmp_path / "history.db")
    history.start("rollup", "every 5 min", "dead-host:1")
    s = settings(tmp_path)
    run_job("rollup", s, FileJobLock(tmp_path / "locks"), history, Alerter(s), force=True)
    assert [r.outcome for r in history.runs("rollup")] == ["abandoned", "skipped"]


# -- Prometheus ------------------------------------------------------------------------------------------


def test_drift_conversion_and_alerts_firing_are_exported(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    write_section(ws, "drift", {"checked_at": 5.0, "features": [{"name": "user_income", "psi": 0.41, "ks": 0.2},
                                                                 {"name": "product_kind", "psi": 0.01, "ks": None}]})
    write_section(ws, "conversion", {"totals": [{"model_version": "v1", "arm": "A", "impressions": 200,
                                                 "click_rate": {"rate": 0.25}, "apply_rate": {"rate": None},
                                                 "approve_rate": {"rate": 0.05}}]})  # fmt: skip
    Alerter(settings(tmp_path)).condition("drift", True, "drift", "user_income")
    registry = CollectorRegistry()
    registry.register(MonitoringCollector(ws))
    text = generate_latest(registry).decode()
    assert 'finrec_drift_psi{feature="user_income"} 0.41' in text
    assert 'finrec_drift_ks{feature="product_kind"}' not in text  # no KS for a categorical feature
    assert 'finrec_conversion_rate{arm="A",model_version="v1",rate="click"} 0.25' in text
    assert 'finrec_conversion_impressions{arm="A",model_version="v1"} 200.0' in text
    assert 'finrec_alert_firing{kind="drift"} 1.0' in text and 'finrec_alert_firing{kind="fairness"} 0.0' in text


# -- the roll-up job end to end on a workspace ---------------------------------------------------------------


def test_rollup_job_alerts_on_empty_answers_and_clears_with_hysteresis(tmp_path: Path, receiver: Any) -> None:
    from finrec.events.schema import Event
    from finrec.events.store import open_event_store
    from finrec.jobs.tasks import rollup
    from finrec.monitoring.exported import read_section
    from finrec.serving.audit import load_or_create_key, pseudonymise, pseudonymise_request

    r = receiver()
    s = settings(tmp_path, alerts={"webhook_url": r.url, "health_min_answers": 10, "empty_answer_rate": 0.2})
    audit = s.workspace / "audit" / "audit.jsonl"
    key = load_or_create_key(audit.with_name("audit.key"))
    store = open_event_store(f"sqlite:///{s.workspace / 'events.db'}")
    t0 = 1_760_000_000

    def serve(n: int, empty_every: int, start: int) -> None:
        with open(audit, "a") as f:
            for i in range(start, start + n):
                items = [] if i % empty_every == 0 else [{"product_id": "P1", "rank": 1}]
                f.write(json.dumps({"request": pseudonymise_request(f"r{i}", key), "ts": t0 + i, "served_at": t0 + i,
                                    "model_version": "v1", "kind": "customer", "customer": pseudonymise("c7", key),
                                    "items": items}) + "\n")  # fmt: skip
        store.append([Event(f"e{i}", "c7", "P1", "impression", t0 + i, request_id=f"r{i}")
                      for i in range(start, start + n)])

    serve(40, 2, 0)  # half the answers empty
    first = rollup(s, Alerter(s))
    assert first.outcome == "alert" and first.summary["health"]["empty_rate"] == 0.5
    serve(60, 1_000_000, 40)  # none empty: 20 of 100 = 20%, not over the threshold, but firing clears under 16%
    assert rollup(s, Alerter(s)).outcome == "alert"
    serve(100, 1_000_000, 100)  # none empty: 20 of 200 = 10%
    assert rollup(s, Alerter(s)).outcome == "ok"
    assert [(a["kind"], a["status"]) for a in r.received] == [("guardrail_health", "firing"),
                                                               ("guardrail_health", "resolved")]
    sent = json.dumps(r.received)  # no customer id (as a word: alerts carry random hex keys) and no pseudonym
    assert re.search(r"\bc7\b", sent) is None and pseudonymise("c7", key) not in sent
    totals = read_section(s.workspace, "conversion")["totals"]
    assert totals[0]["model_version"] == "v1" and totals[0]["impressions"] == 200  # attributed via the audit log
