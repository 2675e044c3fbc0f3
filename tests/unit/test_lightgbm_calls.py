"""LightGBM predictions are serialised: a shared booster predicted from several threads crashed a worker.

Two checks. Every call into a booster's prediction code, from the ranker (scores, leaves, contributions) and the
approval model, happens with :data:`~finrec.ranking.lightgbm_calls.PREDICT_LOCK` held: a stand-in booster fails
the call otherwise. And eight threads mixing those calls on one ranker, as the API's thread pool does, get exactly
what one thread gets (before the lock, the same mix died of a segmentation fault in about one run in six).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from finrec.ranking.approval import ApprovalConfig, ApprovalModel
from finrec.ranking.lightgbm_calls import PREDICT_LOCK
from finrec.ranking.ranker import Ranker, RankerConfig

NAMES = ["signal", "noise_a", "noise_b"]


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.random((n, len(NAMES)))
    y = np.minimum((X[:, 0] * 5).astype(int), 4)  # the grade follows the signal
    qid = np.repeat(np.arange(n // 10), 10)
    return X, y, qid


@pytest.fixture(scope="module")
def ranker() -> Ranker:
    X, y, qid = data(2_000, seed=1)
    return Ranker(RankerConfig(seed=0, n_estimators=40, num_threads=2)).fit(X, y, qid, NAMES)


class LockChecking:
    """A booster stand-in: each prediction call asserts the calling thread holds the lock, then delegates."""

    def __init__(self, booster: Any) -> None:
        self.booster, self.calls = booster, 0

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        assert PREDICT_LOCK._is_owned(), "a LightGBM prediction ran without the lock"  # type: ignore[attr-defined]
        self.calls += 1
        return self.booster.predict(*args, **kwargs)

    def dump_model(self, *args: Any, **kwargs: Any) -> Any:
        assert PREDICT_LOCK._is_owned(), "a LightGBM model dump ran without the lock"  # type: ignore[attr-defined]
        return self.booster.dump_model(*args, **kwargs)


def test_every_ranker_and_approval_call_holds_the_lock(ranker: Ranker) -> None:
    X = data(50, seed=2)[0]
    checking = Ranker(ranker.config)
    checking.__dict__.update({k: v for k, v in ranker.__dict__.items() if k != "_paths"})
    checking.booster_ = LockChecking(ranker.booster_)  # type: ignore[assignment]
    np.testing.assert_array_equal(checking.predict(X), ranker.predict(X))
    np.testing.assert_array_equal(checking.leaves(X), ranker.leaves(X))
    np.testing.assert_allclose(checking.contributions(X, "path"), ranker.contributions(X, "path"))
    np.testing.assert_array_equal(checking.contributions(X, "shap"), ranker.contributions(X, "shap"))
    assert checking.booster_.calls == 4  # type: ignore[attr-defined]

    rng = np.random.default_rng(3)
    A = rng.normal(size=(2_000, 2))
    approval = ApprovalModel(ApprovalConfig(n_estimators=30)).fit(A, (A[:, 0] > 0).astype(int), ["margin", "noise"])
    expected = approval.predict_proba(A[:20])
    approval.booster_ = LockChecking(approval.booster_)  # type: ignore[assignment]
    np.testing.assert_array_equal(approval.predict_proba(A[:20]), expected)
    assert approval.booster_.calls == 1  # type: ignore[attr-defined]


def test_threads_mixing_scores_leaves_and_contributions_get_what_one_thread_gets(ranker: Ranker) -> None:
    X = data(200, seed=4)[0]
    calls = {"scores": ranker.predict, "leaves": ranker.leaves, "shap": lambda rows: ranker.contributions(rows, "shap")}
    slices = [slice(i, i + 20) for i in range(0, 180, 9)]
    expected = {(name, s.start): fn(X[s]) for name, fn in calls.items() for s in slices}
    wrong: list[tuple[str, int]] = []

    def work(t: int) -> None:
        for j in range(120):
            name = list(calls)[(t + j) % 3]
            s = slices[(t * 7 + j) % len(slices)]
            if not np.array_equal(calls[name](X[s]), expected[(name, s.start)]):
                wrong.append((name, s.start))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} concurrent calls differed from the same call on one thread: {wrong[:5]}"
