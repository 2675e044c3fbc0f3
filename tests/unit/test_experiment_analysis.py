"""Experiment analysis on synthetic audit records and events with planted effects, mismatches and mistakes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from finrec.config import ExperimentSettings, FinrecSettings
from finrec.errors import FinrecError
from finrec.events.schema import Event
from finrec.experiments.analysis import analyze_configured, analyze_experiment, find_experiment
from finrec.experiments.assignment import assign_arm
from finrec.experiments.comparison import CONTROL_BETTER, NO_DIFFERENCE, TREATMENT_BETTER
from finrec.experiments.report import experiment_figure, render_text
from finrec.serving.audit import pseudonymise

KEY = bytes(range(32))
T0 = 1_717_200_000  # 2024-06-01
STOP = T0 + 30 * 86_400


def experiment(**kw: Any) -> ExperimentSettings:
    arms = kw.pop("arms", {"control": {"model": "champion", "weight": 1}, "treatment": {"model": "challenger",
                                                                                        "weight": 1}})  # fmt: skip
    return ExperimentSettings(name="ranker-v2", arms=arms, start=datetime.fromtimestamp(T0, UTC),
                              stop=datetime.fromtimestamp(STOP, UTC), **kw)  # fmt: skip


@dataclass
class World:
    """Audit records and events of customers assigned by ``assign_arm``, with per-arm behaviour planted."""

    exp: ExperimentSettings
    records: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    arms: dict[str, str] = field(default_factory=dict)

    def event(self, user: str, etype: str, ts: float, arm: str | None = None) -> None:
        self.events.append(Event(f"e{len(self.events)}", user, "P1", etype, int(ts), arm=arm))

    def answer(self, user: str, arm: str, t: float, empty: bool = False) -> None:
        items = [] if empty else [{"product_id": f"P{i}", "rank": i + 1, "score": 0.5, "reasons": []} for i in range(3)]
        self.records.append({"request_id": f"r{len(self.records)}", "ts": t, "customer": pseudonymise(user, KEY),
                             "model_version": "m1", "experiment": self.exp.name, "arm": arm, "served_at": t, "k": 3,
                             "excluded": {}, "kind": "customer", "items": items})  # fmt: skip


def build(exp: ExperimentSettings, n: int, click: dict[str, float], seed: int = 0,
          empty: dict[str, float] | None = None, approve: dict[str, float] | None = None,
          skip: Any = None) -> World:  # fmt: skip
    """``n`` customers arriving over 20 days; each gets 1-2 answers, impressions, and clicks at ``click[arm]``.

    Of those who click, 40% apply; applications are approved at ``approve[arm]`` (default 0.7).
    """
    rng = np.random.default_rng(seed)
    w = World(exp)
    for i in range(n):
        user = f"C-{i}"
        arm = assign_arm(user, exp)
        if skip is not None and skip(i, arm):
            continue
        w.arms[user] = arm
        t = T0 + i * (20 * 86_400 / n) + 0.5
        for visit in range(1 + int(rng.random() < 0.3)):
            w.answer(user, arm, t + visit * 3600, empty=rng.random() < (empty or {}).get(arm, 0.01))
            for _ in range(3):
                w.event(user, "impression", t + visit * 3600 + 1, arm)
        if rng.random() < click[arm]:
            w.event(user, "click", t + 60, arm)
            if rng.random() < 0.5:
                w.event(user, "click", t + 90, arm)  # a second click does not count twice
            if rng.random() < 0.4:
                w.event(user, "apply", t + 600, arm)
                approved = rng.random() < (approve or {}).get(arm, 0.7)
                w.event(user, "approve" if approved else "decline", t + 86_400, arm)
    return w


def analyze(w: World, **kw: Any) -> dict[str, Any]:
    return analyze_experiment(w.exp, w.records, w.events, KEY, now=T0 + 25 * 86_400, **kw)


@pytest.fixture(scope="module")
def planted() -> tuple[World, dict[str, Any]]:
    # planned for the planted lift (50%) or close to it: the mSPRT's tau follows the MDE
    w = build(experiment(min_detectable_effect=0.3), 4000, {"control": 0.10, "treatment": 0.15}, seed=1)
    return w, analyze(w)


def test_planted_lift_is_found_with_the_right_sign(planted: tuple[World, dict[str, Any]]) -> None:
    w, r = planted
    assert r["status"] == "running" and r["trustworthy"]
    assert not any("MISMATCH" in x or "arm" in x.split(":")[0] for x in r["warnings"])
    arms = r["arms"]
    assert sum(a["customers"] for a in arms.values()) == 4000
    for name, a in arms.items():  # the report counts exactly the customers who clicked, once each
        clickers = {e.user_id for e in w.events if e.event_type == "click" and w.arms[e.user_id] == name}
        assert a["customer_rates"]["click"]["rate"] == pytest.approx(len(clickers) / a["customers"])
    assert arms["control"]["customer_rates"]["click"]["rate"] == pytest.approx(0.10, abs=0.02)
    assert arms["treatment"]["customer_rates"]["click"]["rate"] == pytest.approx(0.15, abs=0.02)
    (comp,) = r["comparisons"]
    click = comp["metrics"]["click"]
    assert click["p_value"] < 0.001 and click["z"] > 0
    assert click["difference"]["low"] < 0.05 < click["difference"]["high"]
    assert click["relative_lift"]["low"] > 0
    seq = comp["sequential"]
    assert seq["p_value"] < 0.05 and 0 < seq["low"] < 0.05 < seq["high"]
    assert comp["decision"] == TREATMENT_BETTER and comp["decision_basis"] == "sequential"
    assert not r["srm"]["mismatch"]
    # looks: 20 checkpoints over the arrivals plus the final one, never losing customers
    looks = seq["looks"]
    assert len(looks) == 21
    assert all(a["customers"]["control"] <= b["customers"]["control"] for a, b in zip(looks, looks[1:], strict=False))
    assert looks[-1]["customers"] == {"control": arms["control"]["customers"],
                                      "treatment": arms["treatment"]["customers"]}  # fmt: skip
    assert r["events"]["attributed"] == r["events"]["read"] == len(w.events)
    json.dumps(r, allow_nan=False)


def test_worse_treatment_is_control_better() -> None:
    w = build(experiment(min_detectable_effect=0.3), 4000, {"control": 0.15, "treatment": 0.10}, seed=2)
    (comp,) = analyze(w)["comparisons"]
    assert comp["decision"] == CONTROL_BETTER and comp["sequential"]["high"] < 0


def test_aa_is_no_significant_difference() -> None:
    w = build(experiment(), 4000, {"control": 0.10, "treatment": 0.10}, seed=3)
    r = analyze(w)
    (comp,) = r["comparisons"]
    assert comp["decision"] == NO_DIFFERENCE
    assert comp["sequential"]["p_value"] >= 0.05 and comp["sequential"]["low"] < 0 < comp["sequential"]["high"]
    assert 0 < comp["plan"]["progress"] < 1  # 2000 per arm of the ~14k a 10% lift on 10% needs
    assert comp["plan"]["required"]["control"] > 10_000


def test_planted_sample_ratio_mismatch_is_flagged() -> None:
    # 10% of the treatment's customers lost between assignment and the log (a crashing model, say)
    w = build(experiment(), 6000, {"control": 0.10, "treatment": 0.10}, seed=4,
              skip=lambda i, arm: arm == "treatment" and i % 10 == 0)  # fmt: skip
    r = analyze(w)
    assert r["srm"]["mismatch"] and r["srm"]["p_value"] < 0.001
    assert not r["trustworthy"]
    assert "SAMPLE RATIO MISMATCH" in r["warnings"][0] and "UNTRUSTWORTHY" in r["warnings"][0]
    assert "MISMATCH" in render_text(r)


def test_weights_are_respected_by_the_srm_check() -> None:
    exp = experiment(arms={"control": {"model": "champion", "weight": 3}, "b": {"model": "challenger", "weight": 1}})
    r = analyze(build(exp, 4000, {"control": 0.1, "b": 0.1}, seed=5))
    assert not r["srm"]["mismatch"]
    assert r["arms"]["control"]["customers"] == pytest.approx(3000, abs=150)


def test_events_outside_exposure_are_not_counted(planted: tuple[World, dict[str, Any]]) -> None:
    w, before = planted
    extra = World(w.exp, list(w.records), list(w.events), dict(w.arms))
    control_user = next(u for u, a in w.arms.items() if a == "control")
    first = min(r["served_at"] for r in w.records if r["customer"] == pseudonymise(control_user, KEY))
    for i in range(5):  # clicks before the customer's first answer, and after the experiment stopped
        extra.event(control_user, "click", first - 3600 * (i + 1))
    for i in range(3):
        extra.event(control_user, "apply", STOP + i)
    for i in range(7):  # customers never exposed: within the window, and long before it
        extra.event(f"stranger-{i}", "click", T0 + 86_400)
    extra.event("stranger-x", "click", T0 - 86_400)
    after = analyze(extra)
    assert after["events"]["before_exposure"] == 5 and after["events"]["after_stop"] == 3
    assert after["events"]["not_exposed"] == 7 and after["events"]["outside_window"] == 1
    assert after["arms"] == before["arms"]


def test_click_in_the_second_of_the_answer_counts() -> None:
    exp = experiment()
    w = World(exp)
    user = "C-1"
    w.answer(user, assign_arm(user, exp), T0 + 10.7)
    w.event(user, "click", T0 + 10.9)  # stored as T0 + 10, below served_at
    r = analyze(w)
    assert r["arms"][assign_arm(user, exp)]["customer_rates"]["click"]["rate"] == 1.0


def test_guardrail_flags_a_rise_in_empty_answers() -> None:
    w = build(experiment(), 4000, {"control": 0.10, "treatment": 0.10}, seed=6,
              empty={"control": 0.02, "treatment": 0.08})  # fmt: skip
    r = analyze(w)
    g = r["comparisons"][0]["guardrails"]
    assert g["empty_answer_rate"]["flagged"] and g["empty_answer_rate"]["difference"] > 0.03
    assert any("empty answer rate of arm treatment" in x for x in r["warnings"])
    assert r["arms"]["treatment"]["empty_answer_rate"]["rate"] == pytest.approx(0.08, abs=0.015)
    assert "FLAGGED" in render_text(r)


def test_guardrail_flags_a_drop_in_approvals() -> None:
    # The treatment brings more clicks but steers customers to products they are refused for.
    w = build(experiment(), 4000, {"control": 0.2, "treatment": 0.3}, seed=9,
              approve={"control": 0.8, "treatment": 0.4})  # fmt: skip
    g = analyze(w)["comparisons"][0]["guardrails"]["approval_rate"]
    assert g["flagged"] and g["difference"] < -0.15 and g["high"] < 0


def test_customer_in_two_arms_is_an_integrity_problem() -> None:
    w = build(experiment(), 400, {"control": 0.1, "treatment": 0.1}, seed=7)
    user, arm = next(iter(w.arms.items()))
    other = next(a for a in w.exp.arms if a != arm)
    w.answer(user, other, T0 + 25 * 86_400 - 10)
    r = analyze(w)
    assert r["integrity"]["customers_in_several_arms"] == 1 and not r["trustworthy"]
    assert r["integrity"]["assignment_mismatches"] == 0  # kept in the first (the assigned) arm
    assert sum(a["customers"] for a in r["arms"].values()) == 400


def test_three_arms_split_alpha() -> None:
    exp = experiment(arms={a: {"model": "champion", "weight": 1} for a in ("control", "b", "c")},
                     min_detectable_effect=0.3)
    r = analyze(build(exp, 3000, {"control": 0.1, "b": 0.1, "c": 0.18}, seed=8))
    assert r["alpha_per_comparison"] == pytest.approx(0.025)
    decisions = {c["arm"]: c["decision"] for c in r["comparisons"]}
    assert decisions == {"b": NO_DIFFERENCE, "c": TREATMENT_BETTER}


def test_empty_inputs_and_prospects() -> None:
    exp = experiment()
    w = World(exp)
    w.records.append({"request_id": "p", "ts": T0 + 5, "served_at": T0 + 5, "customer": None, "experiment": exp.name,
                      "arm": None, "kind": "prospect", "items": []})  # fmt: skip
    r = analyze(w)
    assert r["integrity"]["prospect_records"] == 1
    assert all(a["customers"] == 0 for a in r["arms"].values())
    assert r["comparisons"][0]["decision"] == NO_DIFFERENCE and experiment_figure(r) is None
    assert "keep collecting" in render_text(r) or "no plan" in render_text(r)
    json.dumps(r, allow_nan=False)


def test_text_and_figure(planted: tuple[World, dict[str, Any]], tmp_path: Path) -> None:
    _, r = planted
    text = render_text(r)
    assert "TREATMENT BETTER (sequential)" in text and "treatment vs control" in text
    assert "customers per arm fit the weights" in text
    fig = experiment_figure(r)
    assert fig is not None and len(fig.axes) == 2
    fig.savefig(tmp_path / "exp.png")
    assert (tmp_path / "exp.png").stat().st_size > 10_000


def test_find_experiment_lists_the_configured_ones() -> None:
    exp = experiment()
    assert find_experiment([exp], "ranker-v2") is exp
    with pytest.raises(FinrecError, match="configured: ranker-v2"):
        find_experiment([exp], "nope")


def test_analyze_configured_refuses_a_missing_key(tmp_path: Path) -> None:
    settings = FinrecSettings(workspace=tmp_path, experiments=[experiment()])
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "audit.jsonl").write_text("")
    with pytest.raises(FinrecError, match="no audit key"):
        analyze_configured(settings, "ranker-v2")
    assert not (tmp_path / "audit" / "audit.key").exists()  # never created by a reader
