"""One estimator contract for every learned model (scikit-learn's check_estimator, implicit's test mixin).

Each model below is fitted on a small planted problem and must: return itself from ``fit``; refuse to
predict before it is fitted; give the same outputs after save then load (no pickle); give the same
outputs for the same seed; refuse unknown configuration keys. Candidate sources have the same contract
in ``tests/contract/test_candidate_sources.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from finrec.ranking.approval import ApprovalConfig, ApprovalModel
from finrec.ranking.ranker import Ranker, RankerConfig
from finrec.retrieval.two_tower import TwoTowerConfig, TwoTowerModel


@dataclass
class Case:
    make: Callable[[int], Any]  # seed -> unfitted model
    fit: Callable[[Any], Any]  # fits on the planted data, returns what fit returned
    predict: Callable[[Any], np.ndarray]
    load: Callable[[Path], Any]
    config_from: Callable[[dict[str, Any]], Any]  # builds a config from a dict (must refuse unknown keys)


def _ranker_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1200, 4))
    y = (X[:, 0] > 0.5).astype(int) + (X[:, 0] > 1.2).astype(int)  # relevance planted on feature 0
    return X, y, np.repeat(np.arange(120), 10)


def _approval_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1500, 3))
    y = (rng.random(1500) < 1 / (1 + np.exp(-2 * X[:, 0]))).astype(int)
    return X, y


def _tower_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    n_users, n_items = 300, 20
    taste = rng.integers(0, 2, n_users)
    pairs = np.column_stack([np.arange(n_users).repeat(3),
                             (taste.repeat(3) * 10 + rng.integers(0, 10, n_users * 3))])  # fmt: skip
    return {"user_x": np.column_stack([taste, 1 - taste]).astype(np.float32),
            "history": np.full((n_users, 2), -1), "item_x": np.eye(n_items, 4, dtype=np.float32),
            "item_ids": np.arange(n_items), "pairs": pairs[:700], "val_pairs": pairs[700:]}  # fmt: skip


RX, RY, RQ = _ranker_data()
AX, AY = _approval_data()
TD = _tower_data()

CASES = {
    "ranker": Case(
        make=lambda seed: Ranker(RankerConfig(seed=seed, n_estimators=30)),
        fit=lambda m: m.fit(RX, RY, RQ, ["a", "b", "c", "d"]),
        predict=lambda m: m.predict(RX[:50]),
        load=Ranker.load,
        config_from=lambda d: RankerConfig(**d),
    ),
    "approval": Case(
        make=lambda seed: ApprovalModel(ApprovalConfig(seed=seed, n_estimators=30)),
        fit=lambda m: m.fit(AX, AY, ["a", "b", "c"]),
        predict=lambda m: m.predict_proba(AX[:50]),
        load=ApprovalModel.load,
        config_from=ApprovalConfig.from_dict,
    ),
    "two_tower": Case(
        make=lambda seed: TwoTowerModel(TwoTowerConfig(embedding_dim=8, max_epochs=3, seed=seed, recall_k=5)),
        fit=lambda m: m.fit(**TD),
        predict=lambda m: m.item_embeddings(TD["item_x"], TD["item_ids"]),
        load=TwoTowerModel.load,
        config_from=TwoTowerConfig.from_dict,
    ),
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


def test_fit_returns_self(case: Case) -> None:
    m = case.make(0)
    assert case.fit(m) is m


def test_an_unfitted_model_refuses_to_predict(case: Case) -> None:
    with pytest.raises((RuntimeError, ValueError, AttributeError)):
        case.predict(case.make(0))


def test_save_then_load_gives_the_same_outputs(case: Case, tmp_path: Path) -> None:
    m = case.make(0)
    case.fit(m)
    m.save(tmp_path / "m")
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pickle"))
    np.testing.assert_allclose(case.predict(case.load(tmp_path / "m")), case.predict(m), rtol=1e-6, atol=1e-7)


def test_the_same_seed_gives_the_same_outputs(case: Case) -> None:
    a, b = case.make(3), case.make(3)
    case.fit(a)
    case.fit(b)
    np.testing.assert_array_equal(case.predict(a), case.predict(b))


def test_unknown_configuration_keys_are_refused(case: Case) -> None:
    with pytest.raises((TypeError, ValueError)):
        case.config_from({"seed": 0, "no_such_setting": 1})


def test_the_ranker_learns_the_planted_relevance() -> None:
    m = Ranker(RankerConfig(seed=0, n_estimators=50)).fit(RX, RY, RQ, ["a", "b", "c", "d"])
    assert max(m.feature_importance(), key=m.feature_importance().get) == "a"
