"""Training's memory follows its sample: budgets bound what is built, and budgets that hold the sample change nothing.

Each test trains on the session's ``tiny_world`` (a few seconds a training), watching what the stages are given:
the ranker's rows per customer, and the customers whose features the two-tower receives.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import finrec.twostage.train as train_module
from finrec.config import FinrecSettings
from finrec.data.dataset import Dataset, load_dataset
from finrec.retrieval.two_tower import TwoTowerModel
from finrec.testing import TINY_TRAIN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_ds(tiny_world: Path) -> Dataset:
    return load_dataset(tiny_world)


class Watch:
    """Records the ranker's rows per (cutoff, customer) and what each two-tower fit is given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ranker_rows: list[dict[tuple[int, int], int]] = []  # one per call: (cutoff, customer) -> rows
        self.tables: list[int] = []  # rows of every table the ranker is fitted on
        self.two_tower: list[dict[str, Any]] = []
        ranker_rows, fit, ranker_fit = train_module._ranker_rows, TwoTowerModel.fit, train_module.Ranker.fit

        def spy_rows(model: Any, builder: Any, snap: Any, users: np.ndarray, *a: Any, **k: Any) -> Any:
            out = ranker_rows(model, builder, snap, users, *a, **k)
            counts = np.bincount(out[2], minlength=len(users))
            self.ranker_rows.append({(snap.cutoff, int(u)): int(c) for u, c in zip(users, counts, strict=True)})
            return out

        def spy_fit(tower: TwoTowerModel, user_x: np.ndarray, history: np.ndarray, item_x: np.ndarray,
                    item_ids: np.ndarray, pairs: np.ndarray, val_pairs: np.ndarray,
                    **k: Any) -> TwoTowerModel:  # fmt: skip
            self.two_tower.append({"rows": len(user_x), "pairs": pairs.copy(), "val_pairs": val_pairs.copy()})
            return fit(tower, user_x, history, item_x, item_ids, pairs, val_pairs, **k)

        def spy_ranker_fit(ranker: Any, X: np.ndarray, *a: Any, **k: Any) -> Any:
            self.tables.append(len(X))
            return ranker_fit(ranker, X, *a, **k)

        monkeypatch.setattr(train_module, "_ranker_rows", spy_rows)
        monkeypatch.setattr(TwoTowerModel, "fit", spy_fit)
        monkeypatch.setattr(train_module.Ranker, "fit", spy_ranker_fit)


def train(ds: Dataset, monkeypatch: pytest.MonkeyPatch, **train: Any) -> tuple[Any, Any, Watch]:
    with monkeypatch.context() as m:
        watch = Watch(m)
        model, report = train_module.train_two_stage(ds, FinrecSettings(train={**TINY_TRAIN, **train}), progress=False)
    return model, report, watch


@pytest.fixture(scope="module")
def unbounded(tiny_ds: Dataset) -> Iterator[tuple[Any, Any, Watch]]:
    with pytest.MonkeyPatch.context() as m:
        yield train(tiny_ds, m)


def test_ranker_table_stays_within_its_row_budget_and_keeps_whole_customers(
    tiny_ds: Dataset, unbounded: tuple[Any, Any, Watch], monkeypatch: pytest.MonkeyPatch
) -> None:
    full = {k: v for call in unbounded[2].ranker_rows for k, v in call.items()}
    budget = 1_500
    assert sum(full.values()) > 2 * budget  # the budget binds
    _, report, watch = train(tiny_ds, monkeypatch, max_ranker_rows=budget)
    assert watch.tables and all(n <= budget for n in watch.tables)  # the ranker and its refit
    kept = {k: v for call in watch.ranker_rows for k, v in call.items()}
    cutoffs = [next(iter(call))[0] for call in watch.ranker_rows if call]
    windows = 1 + sum(1 for a, b in zip(cutoffs, cutoffs[1:], strict=False) if b < a)  # then the guard's refit
    assert sum(sum(call.values()) for call in watch.ranker_rows[:windows]) <= budget
    assert len(kept) >= train_module.MIN_RANKER_QUERIES
    assert all(full[k] == v for k, v in kept.items())  # each kept customer with every one of their rows
    assert report.metrics["ranker_budget"] and report.metrics["ranker"]["rows"] <= budget


def test_budgets_that_hold_the_sample_change_nothing(
    tiny_ds: Dataset, unbounded: tuple[Any, Any, Watch], monkeypatch: pytest.MonkeyPatch
) -> None:
    model0, report0, watch0 = unbounded
    exact = sum(n for call in watch0.ranker_rows for n in call.values())  # every row built, all windows
    model, report, _ = train(tiny_ds, monkeypatch, max_ranker_rows=exact)
    assert "ranker_budget" not in report.metrics
    assert report.validation["table"] == report0.validation["table"]
    X = np.random.default_rng(0).normal(size=(50, len(model0.ranker.feature_names_)))
    np.testing.assert_array_equal(model.ranker.predict(X), model0.ranker.predict(X))


def test_two_tower_gets_features_of_the_sampled_customers_only(
    tiny_ds: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, report, watch = train(tiny_ds, monkeypatch, max_retrieval_pairs=1_000)
    assert report.metrics["retrieval"]["sampled_pairs"] == 1_000
    for fit in watch.two_tower:  # the validated towers and the refit
        assert len(fit["pairs"]) <= 1_000
        used = np.union1d(fit["pairs"][:, 0], fit["val_pairs"][:, 0])
        assert fit["rows"] == len(used)  # one row per sampled customer-window, none for anyone else
