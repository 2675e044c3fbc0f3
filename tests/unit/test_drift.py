"""Drift measures (PSI, KS), the comparison of two feature samples, the stored reference and the alert log.

Synthetic samples are built with numpy so each test knows exactly which features were shifted; the tests on
``tiny_model`` check that the reference written at training is what the model serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from finrec.config import FinrecSettings
from finrec.data.dataset import load_dataset
from finrec.errors import ArtifactError
from finrec.features.builder import FeatureBuilder
from finrec.monitoring.alerts import AlertLog, read_alerts
from finrec.monitoring.drift import bin_edges, compare, effective_products, ks, psi, psi_categorical
from finrec.monitoring.reference import (
    REFERENCE_DIR,
    FeatureSample,
    load_reference,
    sample_customers,
    sample_features,
)
from finrec.pipeline import load_model
from finrec.testing import TINY_TRAIN
from finrec.twostage.train import allowed_mask, rules_for

DAY = 86_400
N = 5000
NAMES = [f"user_f{i}" for i in range(7)] + ["user_segment"]
SHIFTED, MISSING = ("user_f1", "user_f4"), "user_f6"


def make_sample(values: np.ndarray, names: list[str] | None = None, categorical: tuple[str, ...] = ("user_segment",),
                cutoff: int = 100 * DAY, **kw: object) -> FeatureSample:  # fmt: skip
    names = names or NAMES
    scores = kw.pop("scores", values[:, 0].astype(np.float64))
    return FeatureSample(list(names), values.astype(np.float32), list(categorical), np.asarray(scores), cutoff,
                         len(values), **kw)  # type: ignore[arg-type]  # fmt: skip


def planted(seed: int) -> tuple[FeatureSample, FeatureSample]:
    """Two samples of 8 features; the current one has f1 and f4 shifted by 0.5 sd and f6 missing far more often."""
    rng = np.random.default_rng(seed)

    def draw(shift: bool) -> np.ndarray:
        x = rng.normal(size=(N, len(NAMES)))
        x[:, -1] = rng.choice(4, N, p=[0.4, 0.3, 0.2, 0.1])  # categorical codes
        x[rng.random(N) < 0.02, 6] = np.nan  # 2% missing everywhere...
        if shift:
            x[:, [1, 4]] += 0.5
            x[rng.random(N) < 0.25, 6] = np.nan  # ...a quarter of f6 in the current sample
        return x

    return make_sample(draw(False)), make_sample(draw(True), cutoff=190 * DAY)


# --------------------------------------------------------------------------- measures


def test_psi_is_zero_for_identical_samples_and_grows_with_a_shift() -> None:
    x = np.random.default_rng(0).normal(size=20_000)
    assert psi(x, x) == 0.0
    values = [psi(x, x + d) for d in (0.0, 0.1, 0.25, 0.5, 1.0)]
    assert values == sorted(values)
    assert values[1] < 0.05 < 0.2 < values[4]


def test_psi_is_roughly_symmetric_and_small_between_samples_of_one_distribution() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=10_000), rng.normal(0.5, 1.0, size=10_000)
    assert psi(a, b) == pytest.approx(psi(b, a), rel=0.25)
    assert psi(a, rng.normal(size=10_000)) < 0.01


def test_bin_edges_never_split_a_repeated_value() -> None:
    x = np.repeat([0.0, 1.0, 2.0, 5.0], [600, 200, 150, 50])
    edges = bin_edges(x)
    assert not np.isin(edges, x).any()
    assert psi(x, x + 1e-9) == 0.0  # a repeated value moving a hair does not change bins


def test_psi_categorical() -> None:
    ref = np.repeat([0.0, 1.0, 2.0], [500, 300, 200])
    assert psi_categorical(ref, ref[::-1]) == 0.0
    assert psi_categorical(ref, np.repeat([0.0, 1.0, 2.0], [300, 300, 400])) > 0.2
    assert psi_categorical(ref, np.append(ref, np.full(100, 7.0))) > 0.2  # a category never seen before


def test_a_change_in_the_missing_share_is_detected_by_psi() -> None:
    rng = np.random.default_rng(2)
    ref, cur = rng.normal(size=10_000), rng.normal(size=10_000)
    ref[:200] = np.nan
    cur[:2000] = np.nan
    assert psi(ref, cur) > 0.2
    assert ks(ref, cur)[0] < 0.05  # the non-missing values did not move
    assert psi(np.full(100, np.nan), np.full(100, np.nan)) == 0.0


def test_ks_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=3000), rng.normal(0.2, 1.0, size=2000)
    expected = stats.ks_2samp(a, b)
    assert ks(a, b) == pytest.approx((expected.statistic, expected.pvalue))
    a[:10] = np.nan  # missing values are left out
    assert ks(a, b)[0] == pytest.approx(stats.ks_2samp(a[10:], b).statistic)
    assert ks(np.full(5, np.nan), b) == (0.0, 1.0)


# --------------------------------------------------------------------------- compare


@pytest.mark.parametrize("seed", range(8))
def test_compare_flags_exactly_the_planted_features(seed: int) -> None:
    ref, cur = planted(seed)
    report = compare(ref, cur, psi_threshold=0.2, ks_threshold=0.1)
    assert sorted(report.drifted) == sorted([*SHIFTED, MISSING])  # the score (f0) did not move
    assert report.alert
    by = {f.name: f for f in report.features}
    assert by[MISSING].missing_current > 0.2 > by[MISSING].missing_reference
    assert all(by[n].ks > 0.1 for n in SHIFTED)
    assert np.isnan(by["user_segment"].ks) and not by["user_segment"].drifted
    json.dumps(report.to_dict(), allow_nan=False)


def test_compare_reports_nothing_for_two_samples_of_one_distribution() -> None:
    ref, _ = planted(0)
    same, _ = planted(1)
    report = compare(ref, same, 0.2, 0.1)
    assert not report.alert and report.drifted == []
    assert max(f.psi for f in report.features) < 0.05


def test_time_trending_and_exposure_features_are_reported_but_never_alert() -> None:
    names = ["user_tenure_days", "product_days_since_launch", "user_impression_30d", "user_click_365d",
             "user_affinity_savings", "product_ctr", "user_age"]  # fmt: skip
    rng = np.random.default_rng(4)
    x = rng.normal(size=(N, len(names)))
    shifted = x + 3.0  # everything moved a lot
    start = 0
    ref = make_sample(x, names, (), cutoff=200 * DAY, history_start=start, scores=np.zeros(N))
    cur = make_sample(shifted, names, (), cutoff=300 * DAY, history_start=start, scores=np.zeros(N))
    report = compare(ref, cur, 0.2, 0.1)
    by = {f.name: f for f in report.features}
    assert by["user_tenure_days"].excluded == by["product_days_since_launch"].excluded == "time-trending"
    assert by["user_click_365d"].excluded == "time-trending"  # a year's window on 200 days of history
    assert by["user_affinity_savings"].excluded == by["product_ctr"].excluded == "time-trending"  # all history
    assert by["user_impression_30d"].excluded == "exposure"
    assert report.drifted == ["user_age"]
    assert all(f.psi > 1 and not f.drifted for f in report.features if f.excluded)
    # With more than a year of history the 365-day count is a window like any other.
    ref.history_start = cur.history_start = -400 * DAY
    assert "user_click_365d" in compare(ref, cur, 0.2, 0.1).drifted


def test_product_features_need_more_than_chance_among_the_products_served() -> None:
    """12 products whose values jitter are noise, however many rows serve them; 3000 that all move are drift."""
    rng = np.random.default_rng(5)

    def samples(n_products: int, shift: float) -> tuple[FeatureSample, FeatureSample]:
        value = rng.normal(size=n_products)
        products = rng.integers(0, n_products, N)
        moved = value + rng.normal(0, 0.6, n_products) + shift  # each product's value jitters
        ref = make_sample(value[products, None], ["product_ctr_90d"], (), products=products, scores=np.zeros(N))
        cur = make_sample(moved[products, None], ["product_ctr_90d"], (), products=products, scores=np.zeros(N))
        return ref, cur

    few = compare(*samples(12, 0.0), 0.2, 0.1)
    many = compare(*samples(3000, 0.5), 0.2, 0.1)
    assert few.features[0].ks > 0.1 and not few.alert
    assert many.features[0].ks > 0.1 and many.drifted == ["product_ctr_90d"]
    assert effective_products(np.repeat([0, 1], [50, 50])) == pytest.approx(2.0)


# --------------------------------------------------------------------------- reference


def test_feature_sample_round_trip(tmp_path: Path) -> None:
    ref, _ = planted(0)
    ref.products, ref.history_start = np.arange(N) % 7, 12345
    ref.save(tmp_path / "s")
    back = FeatureSample.load(tmp_path / "s")
    assert back.names == ref.names and back.categorical == ref.categorical
    np.testing.assert_array_equal(back.values, ref.values)  # NaN in the same places
    np.testing.assert_array_equal(back.scores, ref.scores)
    np.testing.assert_array_equal(back.products, ref.products)
    assert (back.cutoff, back.n_customers, back.history_start) == (ref.cutoff, ref.n_customers, 12345)


@pytest.mark.parametrize("damage", ["truncate", "json", "missing", "rows"])
def test_damaged_sample_raises_artifact_error(tmp_path: Path, damage: str) -> None:
    ref, _ = planted(0)
    folder = tmp_path / "s"
    ref.save(folder)
    values, meta = folder / "values.parquet", folder / "sample.json"
    if damage == "truncate":
        values.write_bytes(values.read_bytes()[:200])
    elif damage == "json":
        meta.write_text("{not json")
    elif damage == "missing":
        values.unlink()
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "rows": 3}))
    with pytest.raises(ArtifactError) as err:
        FeatureSample.load(folder)
    assert err.value.hint and "retrain" in err.value.hint


def test_a_bundle_without_reference_says_to_retrain(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no drift reference") as err:
        load_reference(tmp_path)
    assert "retrain to enable drift monitoring" in str(err.value)


def test_training_writes_a_checksummed_reference_of_what_the_model_serves(tiny_model: Path, tiny_world: Path) -> None:
    model, manifest = load_model(tiny_model)
    assert {f"{REFERENCE_DIR}/values.parquet", f"{REFERENCE_DIR}/sample.json"} <= set(manifest["files"])
    assert "drift_reference" in manifest["metrics"]["seconds"]
    ref = load_reference(tiny_model)
    assert ref.cutoff == manifest["config"]["split"]["rank_cutoff"]
    assert ref.names == model.space.tabular_names(model.pair_columns)[0]
    assert 0 < len(ref.scores) <= 10 * ref.n_customers

    # Redraw a few customers by hand, as batch recommendation serves them: same products, same ranker scores.
    settings = FinrecSettings(train=TINY_TRAIN)
    ds = load_dataset(tiny_world)
    sample = sample_features(model, ds, settings, ref.cutoff, n_users=50, seed=3, k=5)
    again = sample_features(model, ds, settings, ref.cutoff, n_users=50, seed=3, k=5, block=7)
    # Seeded, and the block size does not matter (beyond float rounding of the retrieval scores).
    np.testing.assert_allclose(sample.values, again.values, rtol=1e-5, atol=1e-6)
    builder = FeatureBuilder(ds, settings.protected_attributes)
    snap = builder.snapshot(ref.cutoff)
    history = builder.history(ref.cutoff, model.config.history_length)
    users = sample_customers(ds, ref.cutoff, 50, seed=3)
    rec = model.recommend(builder, snap, users, allowed_mask(rules_for(ds, settings), snap, users, ds.n_products), 5,
                          history)  # fmt: skip
    served = rec.items >= 0
    np.testing.assert_array_equal(sample.products, rec.items[served])
    kept = rec.scores[served] > -1e5  # demoted products carry a -1e6 offset in the served score
    np.testing.assert_allclose(sample.scores[kept], rec.scores[served][kept], rtol=1e-6)


# --------------------------------------------------------------------------- alerts


def test_alert_log_appends_and_survives_a_torn_line(tmp_path: Path) -> None:
    ref, cur = planted(0)
    report = compare(ref, cur, 0.2, 0.1, model_version="v1")
    log = AlertLog(tmp_path / "alerts" / "alerts.jsonl")
    assert log.record_drift(compare(ref, ref, 0.2, 0.1)) is None  # nothing drifted, nothing written
    written = log.record_drift(report)
    assert written is not None and written["kind"] == "drift"
    log.append({"kind": "drift", "model_version": "v2", "drifted": []})
    with open(log.path, "a") as f:
        f.write('{"kind": "drift", "model_ver')  # a crash mid-write
    alerts = read_alerts(log.path, limit=10)
    assert [a["model_version"] for a in alerts] == ["v1", "v2"]
    assert {d["name"] for d in alerts[0]["drifted"]} == set(report.drifted)
    assert alerts[0]["thresholds"] == {"psi": 0.2, "ks": 0.1, "alpha": report.alpha} and "time" in alerts[0]
    assert read_alerts(log.path, limit=1)[0]["model_version"] == "v2"
    assert read_alerts(tmp_path / "none.jsonl", limit=5) == []
