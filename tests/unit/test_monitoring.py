"""Monitoring: Wilson intervals, conversion attribution, guardrail health, fairness tests, the HTML page."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from finrec.config import FinrecSettings, MonitorSettings
from finrec.data.dataset import Dataset, EventLog
from finrec.events.schema import Event
from finrec.events.store import open_event_store
from finrec.monitoring.conversion import bucket_start, compute_conversion, wilson_interval
from finrec.monitoring.fairness import FairnessAccumulator, compare_groups, group_labels
from finrec.monitoring.health import guardrail_health
from finrec.monitoring.report import build_monitor_report, render_html
from finrec.serving.audit import pseudonymise

KEY = bytes(range(32))
DAY = 86_400
T0 = 1_717_200_000 - 1_717_200_000 % DAY  # midnight UTC, 2024-06-01
MON = MonitorSettings()


def write_audit(path: Path, records: list[dict[str, Any]], torn: bool = False) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if torn:
            f.write('{"request_id": "half-writ')
    return path


def answer(rid: str, ts: float, mv: str = "m1", arm: str | None = None, items: int = 3, customer: str | None = "c",
           excluded: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    return {"request_id": rid, "ts": ts, "model_version": mv, "arm": arm, "kind": "customer", "customer": customer,
            "items": [{"product_id": f"P{i}", "rank": i + 1, "score": 1.0, "reasons": []} for i in range(items)],
            "excluded": excluded or {}, **extra}  # fmt: skip


class Events:
    """Builds events with unique ids."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(self, n: int, etype: str, ts: int, user: str = "u1", product: str = "P0", **kw: Any) -> None:
        for _ in range(n):
            self.events.append(Event(f"e{len(self.events)}", user, product, etype, ts, **kw))

    def store(self) -> Any:
        s = open_event_store("memory://")
        s.append(self.events)
        return s


# -- Wilson -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "confidence", "expected"),
    [  # published values (Wilson 1927 score interval, as tabulated by standard calculators)
        (8, 10, 0.95, (0.4902, 0.9433)),
        (0, 10, 0.95, (0.0, 0.2775)),
        (50, 100, 0.95, (0.4038, 0.5962)),
        (1, 1, 0.95, (0.2065, 1.0)),
        (8, 10, 0.90, (0.5408, 0.9314)),
    ],
)
def test_wilson_interval_known_values(successes: int, n: int, confidence: float, expected: tuple[float, float]) -> None:
    low, high = wilson_interval(successes, n, confidence)
    assert (round(low, 4), round(high, 4)) == expected


def test_wilson_interval_edges() -> None:
    lo, hi = wilson_interval(3, 20)
    lo2, hi2 = wilson_interval(17, 20)
    assert math.isclose(lo, 1 - hi2) and math.isclose(hi, 1 - lo2)  # symmetric in successes <-> failures
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert wilson_interval(5, 10, 0.99)[1] - wilson_interval(5, 10, 0.99)[0] > wilson_interval(5, 10, 0.9)[1] - (
        wilson_interval(5, 10, 0.9)[0]
    )
    for bad in ((11, 10), (-1, 10), (1, -1)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_week_buckets_start_on_monday() -> None:
    sunday, monday = 1_717_286_400, 1_717_372_800  # 2024-06-02 (Sun), 2024-06-03 (Mon), 00:00 UTC
    assert bucket_start(sunday + 5, "week") == monday - 7 * DAY
    assert bucket_start(monday + 3 * DAY, "week") == monday
    assert bucket_start(monday + 3_700, "hour") == monday + 3_600


# -- conversion -------------------------------------------------------------------------------------------


def test_conversion_counts_per_model_and_arm_with_attribution(tmp_path: Path) -> None:
    audit = write_audit(tmp_path / "audit.jsonl", [
        answer("r1", T0 + 100, "m1", "A"), answer("r2", T0 + 200, "m1", "B"),
        answer("r3", T0 + DAY + 100, "m2", "A"), answer("r4", T0 + DAY + 200, "m2", "B"),
        answer("unused", T0 + 300, "m9", "Z"),
    ], torn=True)  # fmt: skip
    ev = Events()
    # r1: events carry their own model_version and arm; a click a day later still counts for the answer's day.
    ev.add(10, "impression", T0 + 110, request_id="r1", model_version="m1", arm="A")
    ev.add(3, "click", T0 + 120, request_id="r1", model_version="m1", arm="A")
    ev.add(1, "click", T0 + DAY + 5, request_id="r1", model_version="m1", arm="A")
    ev.add(2, "apply", T0 + 130, request_id="r1", model_version="m1", arm="A")
    ev.add(1, "approve", T0 + 140, request_id="r1", model_version="m1", arm="A")
    # r2: only the request_id: model version and arm come from the audit record.
    ev.add(5, "impression", T0 + 210, request_id="r2")
    ev.add(1, "click", T0 + 220, request_id="r2")
    # r3: a model version but no arm: the arm comes from the audit record.
    ev.add(8, "impression", T0 + DAY + 110, request_id="r3", model_version="m2")
    ev.add(2, "click", T0 + DAY + 120, request_id="r3", model_version="m2")
    ev.add(1, "approve", T0 + DAY + 130, request_id="r3", model_version="m2")
    # r4: request ids only.
    ev.add(4, "impression", T0 + DAY + 210, request_id="r4")
    ev.add(4, "click", T0 + DAY + 220, request_id="r4")
    # Not attributable: no request id, or one the audit log does not know; and non-funnel types are ignored.
    ev.add(2, "impression", T0 + 50)
    ev.add(1, "impression", T0 + 60, request_id="nope")
    ev.add(3, "view", T0 + 70, request_id="r1")
    ev.add(2, "decline", T0 + 80, request_id="r1")
    seen: list[str] = []
    conv = compute_conversion(ev.store(), audit, MON, event_sinks=[lambda e: seen.append(e.event_id)])
    assert len(seen) == len(ev.events) == conv["events"]["events"]

    totals = {(r["model_version"], r["arm"]): r for r in conv["totals"]}
    assert set(totals) == {("m1", "A"), ("m1", "B"), ("m2", "A"), ("m2", "B"), (None, None)}
    counts = {k: (r["impressions"], r["clicks"], r["applications"], r["approvals"]) for k, r in totals.items()}
    assert counts == {("m1", "A"): (10, 4, 2, 1), ("m1", "B"): (5, 1, 0, 0), ("m2", "A"): (8, 2, 0, 1),
                      ("m2", "B"): (4, 4, 0, 0), (None, None): (3, 0, 0, 0)}  # fmt: skip
    m1a = totals[("m1", "A")]
    assert m1a["click_rate"]["rate"] == 0.4 and m1a["apply_rate"]["rate"] == 0.2 and m1a["approve_rate"]["rate"] == 0.1
    lo, hi = wilson_interval(4, 10, 0.95)
    assert (m1a["click_rate"]["low"], m1a["click_rate"]["high"]) == (lo, hi)
    assert totals[("m2", "B")]["click_rate"] == {"rate": 1.0, "low": wilson_interval(4, 4)[0], "high": 1.0}

    series = {(r["bucket"], r["model_version"], r["arm"]): r for r in conv["series"]}
    assert series[("2024-06-01", "m1", "A")]["clicks"] == 4  # the late click sits in its answer's bucket
    assert series[("2024-06-02", "m2", "A")]["impressions"] == 8
    assert ("2024-06-02", "m1", "A") not in series
    assert conv["events"] == {"events": 50, "funnel_events": 45, "attributed_via_audit": 5 + 1 + 4 + 4,
                              "request_id_not_in_audit": 1, "unattributed": 3}  # fmt: skip
    assert conv["audit"] == {"records": 5, "skipped_lines": 1, "answers_referenced": 5, "answers_found": 4}


def test_answers_are_bucketed_on_the_service_clock_of_their_events(tmp_path: Path) -> None:
    """Under a data clock the audit's wall time (ts) is years after served_at, the time its events carry."""
    wall = T0 + 900 * DAY
    audit = write_audit(tmp_path / "audit.jsonl", [answer("r1", wall, "m1", served_at=T0 + 100)])
    ev = Events()
    ev.add(4, "impression", T0 + 110, request_id="r1")
    ev.add(1, "click", T0 + 120, request_id="r1")
    conv = compute_conversion(ev.store(), audit, MON)
    assert [(r["bucket"], r["impressions"], r["clicks"]) for r in conv["series"]] == [("2024-06-01", 4, 1)]


def test_conversion_hourly_buckets_and_empty_store(tmp_path: Path) -> None:
    ev = Events()
    ev.add(2, "impression", T0 + 10, model_version="m1")
    ev.add(1, "click", T0 + 3_610, model_version="m1")
    conv = compute_conversion(ev.store(), None, MonitorSettings(bucket="hour"))
    assert [(r["bucket"], r["impressions"], r["clicks"]) for r in conv["series"]] == [
        ("2024-06-01T00:00Z", 2, 0), ("2024-06-01T01:00Z", 0, 1)]  # fmt: skip
    assert conv["series"][1]["click_rate"]["rate"] is None
    empty = compute_conversion(open_event_store("memory://"), tmp_path / "missing.jsonl", MON)
    assert empty["totals"] == [] and empty["audit"]["records"] == 0


# -- health -----------------------------------------------------------------------------------------------


def test_guardrail_health_figures(tmp_path: Path) -> None:
    audit = write_audit(tmp_path / "audit.jsonl", [
        answer("a", T0, "m1", items=3, excluded={"region": 4, "held": 1}),
        answer("b", T0 + 1, "m1", items=0, excluded={"marketing_opt_out": 20}),
        answer("c", T0 + 2, "m2", items=10, excluded={"region": 2, "held": 0}),
        answer("d", T0 + 3, "m2", items=2, k=2, excluded={"region": 0}),
        {**answer("e", T0 + 4, "m2", items=1, customer=None), "kind": "prospect"},
    ], torn=True)  # fmt: skip
    catalogue = [f"P{i}" for i in range(20)]
    h = guardrail_health(audit, catalogue)
    assert h["answers"] == 5 and h["kinds"] == {"customer": 4, "prospect": 1}
    assert h["empty"] == {"count": 1, "rate": 0.2}
    # Only "d" says its k (2, and it got 2): the others cannot be judged short without knowing what was asked.
    assert h["short"] == {"count": 0, "rate": 0.0, "answers_with_k": 1} and h["k_recorded"] == 1
    assumed = guardrail_health(audit, catalogue, default_k=10)["short"]  # 3, 0 and 1 items against k=10
    assert assumed == {"count": 3, "rate": 0.6, "answers_with_k": 5}
    assert h["items_per_answer"]["mean"] == 16 / 5
    assert h["items_per_answer"]["distribution"] == {"0": 1, "1": 1, "2": 1, "3": 1, "10": 1}
    assert h["removed"] == {"region": {"sum": 6, "mean": 1.2}, "held": {"sum": 1, "mean": 0.2},
                            "marketing_opt_out": {"sum": 20, "mean": 4.0}}  # fmt: skip
    assert h["coverage"]["distinct_products"] == 10 and h["coverage"]["coverage"] == 0.5
    per = h["coverage"]["per_model_version"]
    assert per["m1"]["distinct_products"] == 3 and per["m2"]["coverage"] == 0.5
    assert h["answers_by_model_version"] == {"m1": 2, "m2": 3}
    assert h["skipped_lines"] == 1


# -- fairness ---------------------------------------------------------------------------------------------


def users_frame(groups: dict[str, int], age: bool = False) -> pd.DataFrame:
    gender = [g for g, n in groups.items() for _ in range(n)]
    frame = pd.DataFrame({"user_id": [str(i) for i in range(len(gender))], "gender": gender})
    if age:
        frame["age"] = np.resize([19.0, 30.0, 42.0, 60.0, 70.0, np.nan], len(frame))
    return frame


def decisions(users: pd.DataFrame, approval: dict[str, float]) -> FairnessAccumulator:
    """Each customer gets one approve or decline, so that each group's approval rate is exactly as planted."""
    acc = FairnessAccumulator()
    for g, part in users.groupby("gender"):
        n_approved = round(approval[str(g)] * len(part))
        for j, uid in enumerate(part["user_id"]):
            etype = "approve" if j < n_approved else "decline"
            acc.add_event(Event(f"{uid}-{etype}", uid, "P1", etype, T0))
            acc.add_event(Event(f"{uid}-imp", uid, "P1", "impression", T0))
        for uid in part["user_id"]:
            acc.add_answer(answer(f"r{uid}", T0, items=2, customer=pseudonymise(uid, KEY)))
    return acc


def test_planted_approval_disparity_is_flagged() -> None:
    users = users_frame({"F": 500, "M": 500, "X": 10})
    acc = decisions(users, {"F": 0.4, "M": 0.8, "X": 0.1})
    res = acc.result(users, KEY, ["gender", "religion"], MON)
    g = res["attributes"]["gender"]
    by = {r["group"]: r for r in g["groups"]}
    assert by["F"]["approval"]["rate"] == 0.4 and by["M"]["approval"]["rate"] == 0.8
    assert by["X"]["decisions"] == 10 and by["X"]["customers"] == 10  # reported ...
    app = g["approval"]
    assert app["excluded_groups"] == ["X"] and sorted(app["tested_groups"]) == ["F", "M"]  # ... but not tested
    assert app["ratio"] == pytest.approx(0.5) and app["lowest"] == "F" and app["highest"] == "M"
    assert app["p_value"] < 1e-10 and app["flagged"]
    assert g["exposure"]["ratio"] == 1.0 and not g["exposure"]["flagged"]  # everyone got items
    assert by["F"]["exposure"]["rate"] == 1.0 and by["F"]["items_per_answer"] == 2.0
    assert by["F"]["application_rate"] == 0.0 and by["F"]["impressions"] == 500
    assert res["flagged"] == ["gender: approval"] and res["missing_attributes"] == ["religion"]
    assert res["unmatched_answers"] == 0 and res["unmatched_events"] == 0


def test_equal_rates_are_not_flagged_and_exposure_disparity_is() -> None:
    users = users_frame({"F": 500, "M": 500})
    acc = FairnessAccumulator()
    for g, part in users.groupby("gender"):
        for j, uid in enumerate(part["user_id"]):
            etype = "approve" if j % 10 < 6 else "decline"  # 60% in both groups
            acc.add_event(Event(f"{uid}-d", uid, "P1", etype, T0))
            empty = g == "F" and j % 2 == 0  # half of the women get nothing
            acc.add_answer(answer(f"r{uid}", T0, items=0 if empty else 3, customer=pseudonymise(uid, KEY)))
    acc.add_answer(answer("stranger", T0, customer=pseudonymise("not-a-customer", KEY)))
    acc.add_event(Event("x", "not-a-customer", "P1", "approve", T0))
    res = acc.result(users, KEY, ["gender"], MON)
    g = res["attributes"]["gender"]
    assert g["approval"]["ratio"] == 1.0 and g["approval"]["p_value"] > 0.5 and not g["approval"]["flagged"]
    assert g["exposure"]["ratio"] == pytest.approx(0.5) and g["exposure"]["flagged"]
    assert res["flagged"] == ["gender: exposure"]
    assert res["unmatched_answers"] == 1 and res["unmatched_events"] == 1
    no_key = acc.result(users, None, ["gender"], MON)  # without the audit key exposure is unknown, never flagged
    assert not no_key["exposure_available"] and no_key["attributes"]["gender"]["exposure"]["ratio"] is None


def test_a_large_gap_on_few_customers_is_not_significant() -> None:
    mon = MonitorSettings(min_group_size=1)
    res = compare_groups({"a": 1, "b": 3}, {"a": 3, "b": 3}, mon)
    assert res["ratio"] == pytest.approx(1 / 3) and res["p_value"] > mon.fairness_alpha and not res["flagged"]
    only_one = compare_groups({"a": 100, "b": 1}, {"a": 200, "b": 5}, MON)
    assert only_one["ratio"] is None and only_one["excluded_groups"] == ["b"] and "fewer than two" in only_one["note"]
    all_zero = compare_groups({"a": 0, "b": 0}, {"a": 50, "b": 50}, MON)
    assert all_zero["p_value"] == 1.0 and all_zero["ratio"] is None and not all_zero["flagged"]


def test_numeric_attributes_are_banded() -> None:
    labels, how, order = group_labels(pd.Series([19.0, 25.0, 34.0, 35.0, 64.0, 65.0, np.nan]), "age")
    assert labels.tolist() == ["<25", "25-34", "25-34", "35-49", "50-64", "65+", "missing"]
    assert how.startswith("bands") and order == ["<25", "25-34", "35-49", "50-64", "65+", "missing"]
    incomes = pd.Series(np.arange(100, dtype=float))
    labels, how, order = group_labels(incomes, "income")
    assert len(set(labels)) == 4 and how.startswith("quartile") and order[0].startswith("<") and len(order) == 5
    labels, how, _ = group_labels(pd.Series([0.0, 1.0, 1.0, np.nan]), "dependants")
    assert labels.tolist() == ["0", "1", "1", "missing"] and how == "values"
    labels, _, order = group_labels(pd.Series(["M", None, " ", "F"], dtype=object), "gender")
    assert labels.tolist() == ["M", "missing", "missing", "F"] and order == ["F", "M", "missing"]


# -- the report and its page --------------------------------------------------------------------------------


def tiny_dataset(tmp_path: Path, users: pd.DataFrame) -> Dataset:
    products = pd.DataFrame({"product_id": [f"P{i}" for i in range(10)]})
    empty = EventLog(*(np.empty(0, dtype=t) for t in (np.int32, np.int32, np.int8, np.int64, np.int16)))
    return Dataset(tmp_path, users, products, empty, fingerprint="fp-test")


DRIFT = {"model_version": "m2", "reference_cutoff": T0 - 30 * DAY, "current_cutoff": T0, "psi_threshold": 0.2,
         "ks_threshold": 0.1, "drifted": ["income"], "alert": True,
         "features": [{"name": "age", "psi": 0.01, "ks": 0.02, "drifted": False},
                      {"name": "income", "psi": 0.5, "ks": 0.3, "drifted": True}],
         "score": {"name": "__score__", "psi": 0.05, "ks": 0.04, "drifted": False}}  # fmt: skip


def test_report_and_self_contained_page(tmp_path: Path) -> None:
    users = users_frame({"F": 60, "M": 60}, age=True)
    audit = write_audit(tmp_path / "audit.jsonl", [
        answer(f"r{u}", T0 + i * 3_000, "model-v1" if i % 2 else "model-v2", customer=pseudonymise(u, KEY),
               excluded={"region": 3, "held": 1}) for i, u in enumerate(users["user_id"])
    ])  # fmt: skip
    ev = Events()
    for i, u in enumerate(users["user_id"]):
        ev.add(1, "impression", T0 + i * 3_000 + 5, user=u, request_id=f"r{u}")
        ev.add(i % 3 == 0, "click", T0 + i * 3_000 + 9, user=u, request_id=f"r{u}")
        ev.add(1, "approve" if i % 2 else "decline", T0 + i * 3_000 + 20, user=u, request_id=f"r{u}")
    settings = FinrecSettings(protected_attributes=["gender", "age"])
    alerts = [{"time": "2024-06-01T00:00Z", "kind": "drift", "message": "income drifted <b>"}]
    report = build_monitor_report(ev.store(), audit, KEY, tiny_dataset(tmp_path, users), settings, DRIFT, alerts)
    json.dumps(report, allow_nan=False)  # JSON-ready: no NaN anywhere
    assert {r["model_version"] for r in report["conversion"]["totals"]} == {"model-v1", "model-v2"}
    assert sum(r["impressions"] for r in report["conversion"]["totals"]) == 120
    age = report["fairness"]["attributes"]["age"]
    assert report["health"]["answers"] == 120 and age["grouping"].startswith("bands")
    assert [g["group"] for g in age["groups"]] == ["<25", "25-34", "35-49", "50-64", "65+", "missing"]

    page = render_html(report, refresh_seconds=30)
    assert page.count("<img ") >= 3 and "model-v2" in page and "Drift alert: income" in page
    assert "income drifted &lt;b&gt;" in page and "income drifted <b>" not in page  # text is escaped
    assert 'http-equiv="refresh" content="30"' in page
    external = re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, flags=re.I)
    assert external == [], external
    assert "<script" not in page and "@import" not in page and "url(" not in page


def test_report_without_dataset_audit_or_drift(tmp_path: Path) -> None:
    ev = Events()
    ev.add(3, "impression", T0, model_version="m1")
    report = build_monitor_report(ev.store(), tmp_path / "none.jsonl", None, None, FinrecSettings(),
                                  drift={"available": False, "reason": "the bundle has no reference"})  # fmt: skip
    page = render_html(report)
    assert "drift: not available (the bundle has no reference)" in page
    assert "Not available (no dataset" in page and "No answers in the audit log yet" in page
    assert any("no audit log" in n for n in report["notes"])
    assert "drift: not available (no drift check" in render_html({**report, "drift": None})


def test_monitor_command_errors_and_minimal_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from finrec.cli import app
    from finrec.errors import FinrecError

    for name in [k for k in __import__("os").environ if k.startswith("FINREC_")]:
        monkeypatch.delenv(name)
    ws = tmp_path / "ws"
    monkeypatch.setenv("FINREC_WORKSPACE", str(ws))
    out = tmp_path / "out"

    def run() -> Any:
        return CliRunner().invoke(app, ["monitor", "--output", str(out)])

    def refused(fragment: str) -> None:
        res = run()
        assert isinstance(res.exception, FinrecError), res.output
        assert fragment in res.exception.message and res.exception.hint

    refused("no audit log")
    (ws / "audit").mkdir(parents=True)
    write_audit(ws / "audit" / "audit.jsonl", [answer("r1", T0, "m1", customer=pseudonymise("1", KEY))])
    refused("no audit key")
    (ws / "audit" / "audit.key").write_text(KEY.hex())
    (ws / "audit" / "audit.key").chmod(0o600)
    refused("no event store")
    store = open_event_store(f"sqlite:///{ws / 'events.db'}")
    store.append([Event("e1", "1", "P0", "impression", T0, request_id="r1"),
                  Event("e2", "1", "P0", "click", T0 + 5, request_id="r1")])  # fmt: skip
    store.close()
    res = run()  # no dataset and no model: conversion and health only, and it says so
    assert res.exit_code == 0, res.output
    report = json.loads((out / "monitor.json").read_text())
    total = report["conversion"]["totals"][0]
    assert total["clicks"] == 1 and total["model_version"] == "m1"
    assert report["fairness"]["available"] is False and report["drift"]["available"] is False
    assert "drift: not available (no model bundle given" in res.output and "fairness" in res.output
    assert (out / "index.html").read_text().count("<img ") >= 2


def test_dashboard_routes_serve_and_refresh_the_report(tiny_model: Path, tiny_world: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import time
    import warnings

    from starlette.exceptions import StarletteDeprecationWarning

    from finrec.serving.app import create_app
    from finrec.serving.routes import dashboard
    from finrec.serving.service import Service
    from finrec.testing import TEST_API_KEY, TEST_HEADERS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StarletteDeprecationWarning)
        from fastapi.testclient import TestClient

    for name in [k for k in __import__("os").environ if k.startswith("FINREC_")]:
        monkeypatch.delenv(name)
    settings = FinrecSettings(workspace=tmp_path, serve={"clock": "data", "api_key": TEST_API_KEY})
    svc = Service.from_settings(settings, tiny_model, tiny_world)
    monkeypatch.setattr(dashboard, "CACHE_SECONDS", 3600.0)
    try:
        with TestClient(create_app(settings, service=svc), headers=TEST_HEADERS) as client:
            body = client.get("/recommend/7", params={"k": 3}).json()
            item = body["items"][0]["product_id"]

            def post(etype: str) -> None:
                event = {"event_id": f"{etype}-1", "user_id": "7", "product_id": item, "event_type": etype,
                         "request_id": body["request_id"]}  # fmt: skip
                assert client.post("/events", json=[event]).json()["accepted"] == 1

            post("impression")
            from finrec.monitoring.alerts import alerts_path  # the alert file a drift check appends to

            stored = {"time": "2024-06-01T00:00:00+00:00", "kind": "drift", "model_version": body["model_version"],
                      "drifted": [{"name": "user_income", "psi": 0.4, "ks": 0.2}]}  # fmt: skip
            alerts_path(tmp_path).parent.mkdir(parents=True)
            alerts_path(tmp_path).write_text(json.dumps(stored) + "\n")
            report = client.get("/dashboard.json").json()
            assert report["alerts"] == [stored]
            assert report["drift"]["alert"] and report["drift"]["drifted"] == ["user_income"]
            [row] = report["conversion"]["totals"]
            assert (row["model_version"], row["impressions"], row["clicks"]) == (body["model_version"], 1, 0)
            page = client.get("/dashboard")
            assert page.headers["content-type"].startswith("text/html") and body["model_version"] in page.text
            post("click")
            assert client.get("/dashboard.json").json()["created_at"] == report["created_at"]  # cached
            monkeypatch.setattr(dashboard, "CACHE_SECONDS", 0.0)
            stale = client.get("/dashboard.json").json()  # served at once while a fresh one is built
            assert stale["conversion"]["totals"][0]["clicks"] == 0
            deadline = time.monotonic() + 30
            while client.get("/dashboard.json").json()["conversion"]["totals"][0]["clicks"] == 0:
                assert time.monotonic() < deadline, "the dashboard was never rebuilt"
                time.sleep(0.05)
            monkeypatch.setattr(dashboard, "CACHE_SECONDS", 3600.0)
            while dashboard._entry(svc).refreshing:  # no rebuild may outlive the service's stores
                time.sleep(0.05)
    finally:
        svc.close()
