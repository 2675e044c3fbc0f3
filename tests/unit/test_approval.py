"""Approval odds: calibrated P(approve | apply) on planted data, fallback, persistence, reports, figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finrec.errors import ArtifactError
from finrec.ranking.approval import (
    BOOSTER_FILE,
    META_FILE,
    ApprovalConfig,
    ApprovalModel,
    calibration_report,
    reliability_figure,
)

FEATURES = ["credit", "min_credit", "margin", "noise"]


# --------------------------------------------------------------------------- planted data


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Applications with a known approval probability.

    credit ~ N(650, 70), product minimum in {580, 640, 700},
    P(approve) = sigmoid((credit - min) / 30 + 0.5), and 0 below min - 40 (hard rule).
    Columns: credit, min_credit, margin, noise; about 5% of credit (and so margin) is NaN.
    """
    rng = np.random.default_rng(seed)
    credit = rng.normal(650.0, 70.0, n)
    minimum = rng.choice([580.0, 640.0, 700.0], n)
    margin = credit - minimum
    p_true = 1.0 / (1.0 + np.exp(-(margin / 30.0 + 0.5)))
    p_true[credit < minimum - 40.0] = 0.0
    y = (rng.random(n) < p_true).astype(int)
    noise = rng.normal(size=n)
    missing = rng.random(n) < 0.05
    credit_obs, margin_obs = credit.copy(), margin.copy()
    credit_obs[missing] = np.nan
    margin_obs[missing] = np.nan
    return np.column_stack([credit_obs, minimum, margin_obs, noise]), y, p_true


@pytest.fixture(scope="module")
def trained() -> ApprovalModel:
    X, y, _ = planted(20_000, seed=1)
    return ApprovalModel(ApprovalConfig()).fit(X, y, FEATURES)


@pytest.fixture(scope="module")
def fresh() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return planted(20_000, seed=2)


def test_planted_discrimination_and_calibration(trained: ApprovalModel, fresh: tuple) -> None:
    X, y, _ = fresh
    p_cal = trained.predict_proba(X)
    p_raw = trained.predict_proba(X, calibrated=False)
    cal, raw = calibration_report(y, p_cal), calibration_report(y, p_raw)
    base_brier = y.mean() * (1 - y.mean())

    assert cal["auc"] > 0.85
    assert cal["ece"] < 0.03
    assert cal["brier"] <= raw["brier"] + 0.003
    assert cal["brier"] < 0.5 * base_brier


def test_planted_predictions_rise_with_margin_and_respect_the_hard_rule(trained: ApprovalModel, fresh: tuple) -> None:
    X, _, p_true = fresh
    p = trained.predict_proba(X)
    margin = X[:, 2]
    known = ~np.isnan(margin)
    edges = np.quantile(margin[known], np.linspace(0, 1, 11))
    decile = np.clip(np.searchsorted(edges, margin[known], side="right") - 1, 0, 9)
    means = np.array([p[known][decile == k].mean() for k in range(10)])
    assert np.all(np.diff(means) >= -0.005), means  # non-decreasing (the lowest deciles are all ~0)
    assert means[-1] - means[0] > 0.9
    assert np.all(np.diff(means[2:]) > 0), means
    # Below min - 40 an application is always declined: the model should say so.
    hard = known & (p_true == 0.0)
    assert p[hard].mean() < 0.02


def test_predictions_are_probabilities_even_with_missing_features(trained: ApprovalModel, fresh: tuple) -> None:
    X, _, _ = fresh
    X = X.copy()
    X[:50] = np.nan
    p = trained.predict_proba(X)
    assert p.shape == (X.shape[0],)
    assert np.all(np.isfinite(p)) and p.min() >= 0.0 and p.max() <= 1.0


def test_report_describes_the_fit(trained: ApprovalModel) -> None:
    r = trained.report_
    assert trained.fallback_reason_ is None and r["fallback_reason"] is None
    assert r["n_train"] + r["n_calibration"] == 20_000
    assert r["n_calibration"] == 5_000
    assert r["split"] == "random"
    assert r["calibration"] == "isotonic"
    assert 1 <= r["best_iteration"] <= 400
    assert r["raw"]["n"] == r["calibrated"]["n"] == 5_000
    assert r["calibrated"]["ece"] <= r["raw"]["ece"] + 1e-9  # isotonic is fitted on this very split
    json.dumps(r)
    x, y = trained.calibration_x_, trained.calibration_y_
    assert x is not None and y is not None
    assert np.all(np.diff(x) > 0)
    assert np.all(np.diff(y) >= 0)
    assert y.min() >= 0 and y.max() <= 1


def test_time_order_holds_out_the_latest_applications() -> None:
    X, y, _ = planted(2_000, seed=5)
    time_order = np.random.default_rng(0).permutation(2_000)  # row i happened at time time_order[i]
    cfg = ApprovalConfig(n_estimators=50, calibration_fraction=0.25)
    model = ApprovalModel(cfg).fit(X, y, FEATURES, time_order=time_order)
    latest = time_order >= 1_500
    assert model.report_["split"] == "time_order"
    assert model.report_["n_calibration"] == 500
    assert model.report_["raw"]["base_rate"] == pytest.approx(y[latest].mean())


def test_fit_is_deterministic_and_calibration_none_returns_raw() -> None:
    X, y, _ = planted(3_000, seed=6)
    cfg = ApprovalConfig(n_estimators=60, calibration="none", seed=3)
    a = ApprovalModel(cfg).fit(X, y, FEATURES)
    b = ApprovalModel(cfg).fit(X, y, FEATURES)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert a.calibration_x_ is None and a.report_["calibrated"] is None
    np.testing.assert_array_equal(a.predict_proba(X), a.predict_proba(X, calibrated=False))


def test_categorical_features_train_and_round_trip(tmp_path: Path) -> None:
    X, y, _ = planted(3_000, seed=7)
    category = np.random.default_rng(1).integers(0, 4, size=(X.shape[0], 1)).astype(float)
    Xc = np.hstack([X, category])
    names = [*FEATURES, "category"]
    model = ApprovalModel(ApprovalConfig(n_estimators=60)).fit(Xc, y, names, categorical=["category"])
    loaded = ApprovalModel.load(model.save(tmp_path / "m"))
    assert loaded.categorical_ == ["category"]
    np.testing.assert_array_equal(model.predict_proba(Xc), loaded.predict_proba(Xc))


# --------------------------------------------------------------------------- fallback


@pytest.mark.parametrize(
    ("y", "reason_word"),
    [
        (np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1]), "min_applications"),
        (np.ones(200, dtype=int), "approved"),
        (np.zeros(200, dtype=int), "declined"),
    ],
    ids=["ten-rows", "all-approved", "all-declined"],
)
def test_fallback_predicts_the_smoothed_base_rate(y: np.ndarray, reason_word: str, tmp_path: Path) -> None:
    X = np.random.default_rng(0).normal(size=(y.size, len(FEATURES)))
    model = ApprovalModel().fit(X, y, FEATURES)
    expected = (y.sum() + 1) / (y.size + 2)
    assert model.fallback_reason_ is not None and reason_word in model.fallback_reason_
    assert model.report_["fallback_reason"] == model.fallback_reason_
    assert model.report_["constant_prediction"] == pytest.approx(expected)
    p = model.predict_proba(np.random.default_rng(1).normal(size=(7, len(FEATURES))))
    np.testing.assert_allclose(p, expected)
    json.dumps(model.report_)

    loaded = ApprovalModel.load(model.save(tmp_path / "fallback"))
    assert loaded.fallback_reason_ == model.fallback_reason_
    assert not (tmp_path / "fallback" / BOOSTER_FILE).exists()
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


def test_empty_training_set_falls_back_to_one_half() -> None:
    model = ApprovalModel().fit(np.zeros((0, 2)), np.zeros(0), ["a", "b"])
    assert model.fallback_reason_ is not None
    assert model.predict_proba(np.zeros((3, 2))).tolist() == [0.5, 0.5, 0.5]


# --------------------------------------------------------------------------- persistence


def test_save_load_gives_identical_predictions(trained: ApprovalModel, fresh: tuple, tmp_path: Path) -> None:
    X, _, _ = fresh
    folder = trained.save(tmp_path / "approval")
    assert sorted(p.name for p in folder.iterdir()) == sorted([META_FILE, BOOSTER_FILE])
    loaded = ApprovalModel.load(folder)
    np.testing.assert_array_equal(loaded.predict_proba(X), trained.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict_proba(X, calibrated=False), trained.predict_proba(X, calibrated=False))
    assert loaded.config == trained.config
    assert loaded.feature_names_ == FEATURES
    assert loaded.report_ == json.loads(json.dumps(trained.report_))


def _saved(trained: ApprovalModel, tmp_path: Path) -> Path:
    return trained.save(tmp_path / "approval")


def test_load_missing_folder_or_files_raises_artifact_error(trained: ApprovalModel, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist") as info:
        ApprovalModel.load(tmp_path / "nowhere")
    assert info.value.hint

    folder = _saved(trained, tmp_path)
    (folder / BOOSTER_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        ApprovalModel.load(folder)
    (folder / META_FILE).unlink()
    with pytest.raises(ArtifactError, match=META_FILE):
        ApprovalModel.load(folder)


@pytest.mark.parametrize(
    "damage",
    ["truncate_booster", "garbage_booster", "garbage_json", "json_missing_key", "wrong_version"],
)
def test_load_corrupt_files_raises_artifact_error(trained: ApprovalModel, tmp_path: Path, damage: str) -> None:
    folder = _saved(trained, tmp_path)
    booster, meta = folder / BOOSTER_FILE, folder / META_FILE
    if damage == "truncate_booster":
        booster.write_text(booster.read_text()[:500])
    elif damage == "garbage_booster":
        booster.write_bytes(b"\x00\xff not a model")
    elif damage == "garbage_json":
        meta.write_text('{"kind": "finrec.appr')
    elif damage == "json_missing_key":
        data = json.loads(meta.read_text())
        del data["feature_names"]
        meta.write_text(json.dumps(data))
    elif damage == "wrong_version":
        data = json.loads(meta.read_text())
        data["format_version"] = 999
        meta.write_text(json.dumps(data))
    with pytest.raises(ArtifactError) as info:
        ApprovalModel.load(folder)
    assert info.value.hint and "re-train" in str(info.value)


def test_corrupt_booster_without_checksum_is_still_caught(trained: ApprovalModel, tmp_path: Path) -> None:
    folder = _saved(trained, tmp_path)
    data = json.loads((folder / META_FILE).read_text())
    data["booster_sha256"] = None
    (folder / META_FILE).write_text(json.dumps(data))
    (folder / BOOSTER_FILE).write_text("tree\nversion=v4\nnum_class=oops\n")
    with pytest.raises(ArtifactError, match="not a valid LightGBM model"):
        ApprovalModel.load(folder)


# --------------------------------------------------------------------------- validation


def test_wrong_feature_count_names_the_expected_features(trained: ApprovalModel) -> None:
    with pytest.raises(ValueError, match=r"expects 4.*'credit', 'min_credit', 'margin', 'noise'"):
        trained.predict_proba(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="two-dimensional"):
        trained.predict_proba(np.zeros(4))


def test_dataframe_with_other_columns_is_rejected(trained: ApprovalModel) -> None:
    import pandas as pd

    df = pd.DataFrame(np.zeros((2, 4)), columns=["min_credit", "credit", "margin", "noise"])
    with pytest.raises(ValueError, match="in this order"):
        trained.predict_proba(df)
    ok = pd.DataFrame(np.zeros((2, 4)), columns=FEATURES)
    assert trained.predict_proba(ok).shape == (2,)


@pytest.mark.parametrize(
    ("X", "y", "names", "match"),
    [
        (np.zeros((5, 2)), np.zeros(4), ["a", "b"], "5 rows but y has 4"),
        (np.zeros((5, 2)), np.zeros((5, 1)), ["a", "b"], "one-dimensional"),
        (np.zeros((5, 2)), np.array([0, 1, 2, 1, 0]), ["a", "b"], "only 0"),
        (np.zeros((5, 2)), np.array([0, 1, np.nan, 1, 0]), ["a", "b"], "only 0"),
        (np.zeros((5, 2)), np.array(["yes", "no", "no", "no", "yes"]), ["a", "b"], "0/1"),
        (np.zeros((5, 2)), np.zeros(5), ["a"], "2 columns but 1 feature names"),
        (np.zeros((5, 2)), np.zeros(5), ["a", "a"], "unique"),
        (np.zeros(5), np.zeros(5), ["a"], "two-dimensional"),
    ],
)
def test_fit_rejects_bad_input(X: np.ndarray, y: np.ndarray, names: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ApprovalModel().fit(X, y, names)


def test_fit_rejects_unknown_categorical_and_bad_time_order() -> None:
    X, y = np.zeros((5, 2)), np.array([0, 1, 0, 1, 1])
    with pytest.raises(ValueError, match="categorical"):
        ApprovalModel().fit(X, y, ["a", "b"], categorical=["c"])
    with pytest.raises(ValueError, match="time_order"):
        ApprovalModel().fit(X, y, ["a", "b"], time_order=np.arange(4))


def test_unfitted_model_refuses_to_predict_or_save(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        ApprovalModel().predict_proba(np.zeros((1, 2)))
    with pytest.raises(RuntimeError, match="not fitted"):
        ApprovalModel().save(tmp_path)


def test_config_round_trips_through_json_and_is_validated() -> None:
    cfg = ApprovalConfig(num_leaves=7, calibration="none", seed=4)
    assert ApprovalConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="calibration_fraction"):
        ApprovalConfig(calibration_fraction=1.0)
    with pytest.raises(ValueError, match="calibration must be"):
        ApprovalConfig(calibration="platt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown ApprovalConfig keys"):
        ApprovalConfig.from_dict({"num_leaf": 3})


# --------------------------------------------------------------------------- calibration report


def test_report_on_perfectly_calibrated_probabilities_has_small_ece() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=50_000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    r = calibration_report(y, p)
    assert r["ece"] < 0.01
    assert r["binning"] == "equal_frequency" and r["n_bins"] == 10
    assert sum(b["count"] for b in r["bins"]) == p.size
    assert [b["p_mean"] for b in r["bins"]] == sorted(b["p_mean"] for b in r["bins"])
    assert r["brier"] == pytest.approx(1 / 6, abs=0.01)  # E[p(1-p)] for p ~ U(0, 1)
    assert 0.8 < r["auc"] < 0.9
    json.dumps(r)


def test_report_detects_miscalibration_and_handles_a_single_class() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(size=20_000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    overconfident = np.clip(0.5 + 1.5 * (p - 0.5), 0, 1)
    assert calibration_report(y, overconfident)["ece"] > 0.05

    r = calibration_report(np.ones(5), np.full(5, 0.7))
    assert r["auc"] is None and r["ece"] == pytest.approx(0.3)
    assert r["log_loss"] == pytest.approx(-np.log(0.7))
    json.dumps(r)


def test_report_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        calibration_report(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="at least one row"):
        calibration_report(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_report(np.zeros(2), np.array([0.5, 1.5]))


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 1), st.floats(0.0, 1.0)), min_size=1, max_size=60),
    n_bins=st.integers(1, 15),
)
def test_report_invariants(data: list[tuple[int, float]], n_bins: int) -> None:
    y = np.array([d[0] for d in data])
    p = np.array([d[1] for d in data])
    r = calibration_report(y, p, n_bins=n_bins)
    assert sum(b["count"] for b in r["bins"]) == len(data)
    assert r["n_bins"] == min(n_bins, len(data))
    assert 0.0 <= r["ece"] <= 1.0 and 0.0 <= r["brier"] <= 1.0
    assert np.isfinite(r["log_loss"])
    json.dumps(r, allow_nan=False)


# --------------------------------------------------------------------------- figure


def test_reliability_figure_saves_to_png(trained: ApprovalModel, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = reliability_figure(trained.report_["raw"], trained.report_["calibrated"])
    assert isinstance(fig, Figure)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("calibrated" in label and "ECE" in label and "Brier" in label for label in labels)
    out = tmp_path / "reliability.png"
    fig.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    only_raw = reliability_figure(calibration_report(np.array([0, 1, 1]), np.array([0.2, 0.6, 0.9])))
    only_raw.savefig(tmp_path / "raw.png")
    assert len(only_raw.axes[0].get_legend_handles_labels()[1]) == 2  # diagonal + raw
