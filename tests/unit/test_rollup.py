"""The monitoring roll-up: the same figures as a full re-read, however the history is cut into updates."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_monitoring import DAY, KEY, T0, tiny_dataset

from finrec.config import FinrecSettings
from finrec.events.schema import Event
from finrec.events.store import open_event_store
from finrec.monitoring.report import build_monitor_report, build_rollup_report
from finrec.monitoring.rollup import MonitoringRollup
from finrec.serving.audit import pseudonymise, pseudonymise_request

SETTINGS = FinrecSettings(monitor={"bucket": "day", "min_group_size": 5, "min_reported_group_size": 1})


def history(seed: int, n_answers: int = 400) -> tuple[list[dict[str, Any]], list[Event], pd.DataFrame]:
    """Answers (audit records as the service writes them: keyed hashes) and the events that follow them: some
    carry their model version and arm, some only the request id, some cite no answer or an unknown one."""
    rng = random.Random(seed)
    users = pd.DataFrame({"user_id": [f"c{i}" for i in range(60)], "gender": ["f", "m", "x"] * 20})
    answers, events = [], []
    for i in range(n_answers):
        rid, user = f"r{i}", f"c{rng.randrange(60)}"
        ts = T0 + rng.randrange(5 * DAY)
        mv, arm = rng.choice(["v1", "v2"]), rng.choice(["A", "B", None])
        n_items = rng.choice([0, 2, 3])
        answers.append({"request": pseudonymise_request(rid, KEY), "ts": ts + 1, "served_at": ts, "model_version": mv,
                        "arm": arm, "kind": "customer", "customer": pseudonymise(user, KEY), "k": 3,
                        "items": [{"product_id": f"P{j}", "rank": j + 1} for j in range(n_items)],
                        "excluded": {"eligibility": rng.randrange(3), "held": rng.randrange(2)}})  # fmt: skip
        for etype in ("impression", "click", "apply", "approve", "decline")[: rng.randrange(6)]:
            own = rng.random() < 0.3
            events.append(Event(f"e{len(events)}", user, "P1", etype, ts + rng.randrange(2 * DAY),
                                request_id=rid if rng.random() < 0.9 else None,
                                model_version=mv if own else None, arm=arm if own else None))  # fmt: skip
    for _ in range(30):  # events citing an answer the audit log does not hold
        events.append(Event(f"e{len(events)}", "c1", "P2", "impression", T0 + rng.randrange(5 * DAY),
                            request_id=f"gone-{rng.random()}"))  # fmt: skip
    events.sort(key=lambda e: e.ts)
    return answers, events, users


def append_audit(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    conv = report["conversion"]
    health = {k: v for k, v in report["health"].items() if k not in ("skipped_lines",)}
    return {"totals": conv["totals"], "series": conv["series"], "events": conv["events"], "health": health,
            "fairness": report["fairness"]}  # fmt: skip


@pytest.mark.parametrize("cuts", [1, 3, 7])
def test_rollup_in_any_number_of_updates_equals_the_full_re_read(tmp_path: Path, cuts: int) -> None:
    answers, events, users = history(seed=cuts)
    dataset = tiny_dataset(tmp_path, users)
    audit = tmp_path / "audit.jsonl"
    audit.touch()
    store = open_event_store("memory://")
    rollup = MonitoringRollup(tmp_path / "rollup.db", KEY)
    a_parts = [answers[i * len(answers) // cuts:(i + 1) * len(answers) // cuts] for i in range(cuts)]
    e_parts = [events[i * len(events) // cuts:(i + 1) * len(events) // cuts] for i in range(cuts)]
    for a, e in zip(a_parts, e_parts, strict=True):
        append_audit(audit, a)
        store.append(e)
        rollup.update(store, audit, batch=97)  # small batches: several transactions per update
    full = build_monitor_report(store, audit, KEY, dataset, SETTINGS)
    rolled = build_rollup_report(rollup, dataset, SETTINGS)
    assert comparable(rolled) == comparable(full)
    assert full["conversion"]["totals"] and full["fairness"]["attributes"]["gender"]["groups"]
    assert rolled["sources"]["events"] == len(events) and rolled["sources"]["audit_records"] == len(answers)


def test_an_update_reads_only_what_is_new_and_a_rotated_log_from_its_start(tmp_path: Path) -> None:
    answers, events, users = history(seed=11, n_answers=100)
    audit = tmp_path / "audit.jsonl"
    append_audit(audit, answers[:60])
    store = open_event_store("memory://")
    store.append(events)
    rollup = MonitoringRollup(tmp_path / "rollup.db", KEY)
    first = rollup.update(store, audit)
    assert first["events_read"] == len(events) and first["audit_records_read"] == 60
    again = rollup.update(store, audit)
    assert again["events_read"] == 0 and again["audit_records_read"] == 0  # nothing new, nothing read
    with open(audit, "a") as f:
        f.write(json.dumps(answers[60]) + "\n" + '{"request": "half-writ')  # a record being written
    assert rollup.update(store, audit)["audit_records_read"] == 1  # the torn one waits until it is whole
    audit.rename(tmp_path / "audit.jsonl.1")  # logrotate: rename; the service opens a new file
    append_audit(audit, answers[61:])
    assert rollup.update(store, audit)["audit_records_read"] == len(answers) - 61
    rollup.close()
    reopened = MonitoringRollup(tmp_path / "rollup.db", KEY)  # the position survives a restart
    assert reopened.update(store, audit) == {**reopened.update(store, audit), "seconds": pytest.approx(0, abs=1)}
    assert reopened.health_counts().answers == len(answers)


def test_a_new_audit_key_or_other_stores_start_the_rollup_again(tmp_path: Path) -> None:
    answers, events, _ = history(seed=5, n_answers=50)
    audit = tmp_path / "audit.jsonl"
    append_audit(audit, answers)
    store = open_event_store("memory://")
    store.append(events)
    MonitoringRollup(tmp_path / "r.db", KEY, sources="sqlite:///a.db|/x/audit.jsonl").update(store, audit)
    same = MonitoringRollup(tmp_path / "r.db", KEY, sources="sqlite:///a.db|/x/audit.jsonl")
    assert same.position()["event_seq"] == len(events)  # the same stores: it continues
    other = MonitoringRollup(tmp_path / "r.db", bytes(32), sources="sqlite:///a.db|/x/audit.jsonl")
    assert other.position()["event_seq"] == 0 and other.health_counts().answers == 0
    other.update(store, audit)
    elsewhere = MonitoringRollup(tmp_path / "r.db", bytes(32), sources="redis://other:6379/0|/y/audit.jsonl")
    assert elsewhere.position()["event_seq"] == 0  # another service's stores: it starts again


def test_the_file_holds_no_customer_id(tmp_path: Path) -> None:
    answers, events, _ = history(seed=3, n_answers=80)
    audit = tmp_path / "audit.jsonl"
    append_audit(audit, answers)
    store = open_event_store("memory://")
    store.append(events)
    rollup = MonitoringRollup(tmp_path / "r.db", KEY)
    rollup.update(store, audit)
    dump = "\n".join(rollup._db.iterdump())
    assert "'c1'" not in dump and not any(f"'{e.user_id}'" in dump for e in events)
    assert pseudonymise("c1", KEY) in dump  # customers are there only as keyed pseudonyms


def test_the_page_shows_the_latest_job_runs_newest_first(tmp_path: Path) -> None:
    from finrec.monitoring.report import render_html

    answers, events, users = history(seed=2, n_answers=30)
    audit = tmp_path / "audit.jsonl"
    append_audit(audit, answers)
    store = open_event_store("memory://")
    store.append(events)
    rollup = MonitoringRollup(None, KEY)
    jobs = [{"id": 1, "job": "drift-check", "trigger": "every 6 h", "started_at": T0, "ended_at": T0 + 9,
             "seconds": 9.0, "outcome": "alert", "summary": {"message": "drift alert on 4000 new events: <b>"}},
            {"id": 2, "job": "retrain", "trigger": "drift alert of x", "started_at": T0 + 10, "ended_at": T0 + 70,
             "seconds": 60.0, "outcome": "refused", "summary": {"message": "v2 refused by the gate"}}]  # fmt: skip
    report = build_rollup_report(rollup, tiny_dataset(tmp_path, users), SETTINGS, jobs=jobs,
                                 update=rollup.update(store, audit))  # fmt: skip
    page = render_html(report)
    assert "Scheduled jobs" in page and page.index("v2 refused by the gate") < page.index("drift alert on 4000")
    assert "&lt;b&gt;" in page and "<b>" not in page  # escaped
    empty = render_html({**report, "jobs": []})
    assert "No job has run yet" in empty and "finrec scheduler" in empty
