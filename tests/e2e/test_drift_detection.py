"""Drift is detected when the generator injects drift, and not when it does not (on the same seed).

Two worlds from one seed and size differ only from the drift month on: in one, deposits lose appeal and
loans gain it (the generator's rate shock). A model is trained on the world without drift, with windows
short enough that its reference (the ranker cutoff) lies before the drift month; the check then draws
the current sample at the end of each world. The world without drift still moves in the meantime:
seasonal activity, product launches, a longer history. None of that may alert.

The shock is strong (4 logits) because this world is small: the rate shock moves demand *between*
categories, which the comparable features see only through customers' total engagement (30/90-day
clicks and applications) and through product rates, of which 40 products give ~20 independent units.
(The all-history category shares that see it best are time-trending by construction.) On five seeds,
4.0 alerts on all, 3.0 on four; 1.0 is within what seasonality moves in three months.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from finrec import pipeline
from finrec.config import FinrecSettings
from finrec.data.synthetic.generate import WorldConfig, generate_world
from finrec.monitoring.alerts import AlertLog, read_alerts
from finrec.monitoring.drift import DriftReport, check_drift

pytestmark = pytest.mark.slow

DRIFT_MONTH = 6  # June 2024: the world runs January to August
WORLD = {"users": 3_000, "products": 40, "months": 8, "seed": 5}
SETTINGS = FinrecSettings(train={"max_epochs": 8, "eval_days": 60, "label_days": 45})
STRENGTH = 4.0
#: What a shift of demand from deposits to loans can plausibly move: customers' engagement (and, loans
#: being credit, declines and approvals), holdings of those categories, product demand, the model's outputs.
PLAUSIBLE = re.compile(
    r"^(user_(click|apply|approve|decline)_\d+d"
    r"|user_holds_(savings|term_deposit|credit_card|personal_loan|auto_loan|mortgage|investment_fund)"
    r"|product_(engaged|ctr)_90d|src_popularity_recent(_rank)?|approval_odds|retrieval_score|score)$"
)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drift")
    generate_world(WorldConfig(**WORLD), root / "plain", progress=False)  # type: ignore[arg-type]
    generate_world(WorldConfig(**WORLD, drift_month=DRIFT_MONTH, drift_strength=STRENGTH), root / "drift",  # type: ignore[arg-type]
                   progress=False)  # fmt: skip
    manifest = pipeline.train(root / "plain", root / "model", SETTINGS, progress=False)
    drift_starts = datetime(2024, DRIFT_MONTH, 1, tzinfo=UTC).timestamp()
    assert manifest["config"]["split"]["rank_cutoff"] < drift_starts, "the reference must precede the drift"
    return {"plain": root / "plain", "drift": root / "drift", "model": root / "model"}


@pytest.fixture(scope="module")
def reports(worlds: dict[str, Path]) -> dict[str, DriftReport]:
    return {w: check_drift(worlds["model"], worlds[w], SETTINGS) for w in ("plain", "drift")}


def test_no_alert_without_drift(reports: dict[str, DriftReport]) -> None:
    report = reports["plain"]
    assert not report.alert, f"false alert on {report.drifted}"
    assert report.drifted == []
    # Time-trending and exposure features did move, and are reported, but do not alert.
    moved = [f for f in report.features if f.excluded and f.psi > report.psi_threshold]
    assert {f.excluded for f in moved} == {"time-trending", "exposure"}


def test_alert_with_drift_names_what_a_rate_shock_moves(reports: dict[str, DriftReport]) -> None:
    report = reports["drift"]
    assert report.alert and report.drifted
    assert all(PLAUSIBLE.match(name) for name in report.drifted), report.drifted
    assert {"user_click_90d", "user_apply_90d"} & set(report.drifted)  # customers engage more (loans attract)
    by = {f.name: f for f in [*report.features, report.score]}
    assert all(by[n].psi > report.psi_threshold or by[n].ks > report.ks_threshold for n in report.drifted)


def test_both_checks_compare_against_the_same_reference(reports: dict[str, DriftReport]) -> None:
    plain, drift = reports["plain"], reports["drift"]
    assert plain.reference_cutoff == drift.reference_cutoff < plain.current_cutoff == drift.current_cutoff
    assert plain.model_version == drift.model_version is not None


def test_the_drift_alert_is_stored(reports: dict[str, DriftReport], tmp_path: Path) -> None:
    log = AlertLog(tmp_path / "alerts.jsonl")
    assert log.record_drift(reports["plain"]) is None
    log.record_drift(reports["drift"])
    (alert,) = read_alerts(log.path, limit=10)
    assert alert["kind"] == "drift" and [d["name"] for d in alert["drifted"]] == reports["drift"].drifted
