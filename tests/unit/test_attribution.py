"""Path attribution: an exact decomposition of LightGBM's scores, following its own split rules.

The contributions must add up to ``booster.predict(raw_score=True)`` on any input, which only holds if every
row walks down exactly the branches LightGBM takes: numerical splits with each missing-value mode, categorical
splits, NaN and negative categories. Planted data checks that the credit goes where the signal is.
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from finrec.ranking.attribution import PathAttribution
from finrec.ranking.ranker import Ranker, RankerConfig


def _booster(zero_as_missing: bool = False, use_missing: bool = True, seed: int = 0) -> tuple[lgb.Booster, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 3000
    X = np.column_stack([rng.normal(size=n), rng.normal(size=n), rng.integers(0, 12, n).astype(float),
                         rng.normal(size=n), np.where(rng.random(n) < 0.3, 0.0, rng.normal(size=n))])  # fmt: skip
    X[rng.random(X.shape) < 0.15] = np.nan
    y = 3 * np.nan_to_num(X[:, 0]) + np.isin(X[:, 2], [1, 4, 7]) * 2 + 0.5 * np.nan_to_num(X[:, 4]) + rng.normal(size=n)
    params = {"objective": "regression", "num_leaves": 15, "verbosity": -1, "seed": seed, "min_data_in_leaf": 5,
              "zero_as_missing": zero_as_missing, "use_missing": use_missing, "max_cat_to_onehot": 2}  # fmt: skip
    data = lgb.Dataset(X, y, categorical_feature=[2], free_raw_data=False)
    return lgb.train(params, data, 60), X


@pytest.mark.parametrize("zero_as_missing, use_missing", [(False, True), (True, True), (False, False)])
def test_contributions_add_up_to_the_models_scores_on_any_input(zero_as_missing: bool, use_missing: bool) -> None:
    booster, X = _booster(zero_as_missing, use_missing)
    paths = PathAttribution(booster)
    rng = np.random.default_rng(1)
    probe = rng.normal(size=(2000, X.shape[1])) * 4  # negative and unseen categories, values between thresholds
    probe[rng.random(probe.shape) < 0.2] = np.nan
    probe[rng.random(probe.shape) < 0.1] = 0.0
    for rows in (X, probe):
        contrib = paths.contributions(rows)
        np.testing.assert_allclose(contrib.sum(axis=1), booster.predict(rows, raw_score=True), atol=1e-9)
        assert np.all(contrib[:, -1] == contrib[0, -1])  # the bias is the same for every row


def test_the_credit_goes_to_the_features_that_carry_the_signal() -> None:
    booster, X = _booster()
    contrib = PathAttribution(booster).contributions(X[:500])
    shap = booster.predict(X[:500], pred_contrib=True)
    strong = np.abs(contrib[:, :-1]).mean(axis=0)
    assert strong.argmax() == 0 and strong[1] < 0.2 * strong[0] and strong[3] < 0.2 * strong[0]  # noise features
    # Path attribution and TreeSHAP mostly agree on the feature that moved a score most.
    agree = (np.abs(contrib[:, :-1]).argmax(axis=1) == np.abs(shap[:, :-1]).argmax(axis=1)).mean()
    assert agree > 0.9


def test_leaf_table_lookup_equals_the_walk_and_the_ranker_uses_it() -> None:
    booster, X = _booster()
    paths = PathAttribution(booster)
    leaves = booster.predict(X, pred_leaf=True)
    np.testing.assert_allclose(paths.from_leaves(leaves), paths.contributions(X), atol=1e-12)

    rng = np.random.default_rng(0)
    Xr = rng.normal(size=(600, 3)).astype(np.float32)
    y = (Xr[:, 0] > 0).astype(int) + (Xr[:, 0] > 1)
    ranker = Ranker(RankerConfig(n_estimators=30, min_child_samples=5)).fit(Xr, y, np.repeat(np.arange(60), 10),
                                                                           ["a", "b", "c"])  # fmt: skip
    path = ranker.contributions(Xr[:10])
    shap = ranker.contributions(Xr[:10], method="shap")
    np.testing.assert_allclose(path.sum(axis=1), ranker.predict(Xr[:10]), atol=1e-6)
    np.testing.assert_allclose(path.sum(axis=1), shap.sum(axis=1), atol=1e-6)
    leaves = ranker.leaves(Xr[:10])  # what the API asks for the rows it returns
    np.testing.assert_allclose(ranker.contributions_from_leaves(leaves), path, atol=1e-12)
    # projected onto groups (the reasons' group totals): the same sums as projecting the per-feature contributions,
    # from a table projected once per projection object
    projection = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # a, b -> group 0; c -> 1; bias -> none
    grouped = ranker.contributions_from_leaves(leaves, projection)
    np.testing.assert_allclose(grouped, path[:, :-1] @ projection[:-1], atol=1e-12)
    np.testing.assert_allclose(ranker.contributions_from_leaves(ranker.leaves(Xr[10:20]), projection),
                               ranker.contributions(Xr[10:20]) @ projection, atol=1e-12)  # fmt: skip
    other = projection[:, ::-1].copy()  # another projection is not served from the first one's table
    np.testing.assert_allclose(ranker.contributions_from_leaves(leaves, other), grouped[:, ::-1], atol=1e-12)
