"""The LightGBM lambdarank ranker on planted data: it learns the signal, groups queries itself, persists.

Planted queries: each query has ``ROWS`` candidates in a random order; feature 0 (``signal``) determines the
grade: a row's signal lies in the ``1/ROWS``-wide band of its rank in the query (uniform inside the band), and
the grade follows the rank: the best row is grade 4, the next two grade 3, then three grade 2, four grade 1 and
the rest 0. The other features are pure noise. A ranker that learned the signal puts the planted best first in
almost every query (NDCG@10 near 1); a random order gets NDCG@10 around 0.4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finrec.errors import ArtifactError
from finrec.ranking.ranker import Ranker, RankerConfig

ROWS = 20
GRADE_BY_RANK = np.array([4, 3, 3, 2, 2, 2, 1, 1, 1, 1] + [0] * (ROWS - 10))
NAMES = ["signal", "noise_a", "noise_b", "noise_c", "noise_d"]
# One thread: these tests are about what the ranker learns, and LightGBM's OpenMP threads slow down by 100x or
# more when another process competes for the cores (busy-waiting at every barrier); the default two threads
# run in the end-to-end tests.
CONFIG = RankerConfig(seed=0, num_threads=1)


def planted(n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X, grades and query ids (random, non-contiguous integers) with queries laid out contiguously."""
    rng = np.random.default_rng(seed)
    X = rng.random((n_queries * ROWS, len(NAMES)))
    rank = np.argsort(rng.random((n_queries, ROWS)), axis=1)  # each row's rank in its query, 0 = best
    X[:, 0] = ((ROWS - 1 - rank + rng.random(rank.shape)) / ROWS).ravel()
    y = GRADE_BY_RANK[rank].ravel()
    qid = np.repeat(rng.choice(10**9, n_queries, replace=False), ROWS)
    return X, y, qid


def ndcg_at(scores: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over queries; ``scores`` and ``y`` are (n_queries, ROWS)."""
    gain = 2.0 ** y.astype(float) - 1
    disc = 1 / np.log2(np.arange(2, k + 2))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    dcg = (np.take_along_axis(gain, order, axis=1) * disc).sum(axis=1)
    ideal = (-np.sort(-gain, axis=1)[:, :k] * disc).sum(axis=1)
    return float(np.mean(dcg / ideal))


def quality(ranker: Ranker, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(share of queries whose top-scored row is the planted best, mean NDCG@10) on contiguous queries."""
    s = ranker.predict(X).reshape(-1, ROWS)
    yy = y.reshape(-1, ROWS)
    top1 = float(np.mean(yy[np.arange(len(s)), s.argmax(axis=1)] == GRADE_BY_RANK[0]))
    return top1, ndcg_at(s, yy)


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return planted(300, seed=99)


@pytest.fixture(scope="module")
def fitted() -> Ranker:
    X, y, qid = planted(400, seed=1)
    return Ranker(CONFIG).fit(X, y, qid, NAMES)


def test_learns_the_planted_signal(fitted: Ranker, test_set) -> None:
    X, y, _ = test_set
    top1, ndcg = quality(fitted, X, y)
    assert top1 > 0.9, top1
    assert ndcg > 0.9, ndcg
    rng = np.random.default_rng(0)
    assert ndcg_at(rng.random((len(X) // ROWS, ROWS)), y.reshape(-1, ROWS)) < 0.6  # the bar is not trivial
    importance = fitted.feature_importance()
    assert next(iter(importance)) == "signal"
    assert importance["signal"] > 10 * max(importance[n] for n in NAMES[1:])
    assert fitted.n_queries_ == 400
    assert 0.9 < fitted.validation_ndcg_ <= 1.0
    assert fitted.best_iteration_ >= 1


def test_contributions_sum_to_the_score(fitted: Ranker, test_set) -> None:
    X = test_set[0][:200]
    contrib = fitted.contributions(X)
    assert contrib.shape == (200, len(NAMES) + 1)
    np.testing.assert_allclose(contrib.sum(axis=1), fitted.predict(X), rtol=1e-6, atol=1e-6)


def test_row_order_does_not_matter_the_ranker_groups_by_query_itself(fitted: Ranker, test_set) -> None:
    X, y, qid = planted(400, seed=1)
    perm = np.random.default_rng(5).permutation(len(X))
    shuffled = Ranker(CONFIG).fit(X[perm], y[perm], qid[perm], NAMES)
    assert shuffled.n_queries_ == 400
    Xt, yt, _ = test_set
    top1, ndcg = quality(shuffled, Xt, yt)
    top1_ref, ndcg_ref = quality(fitted, Xt, yt)
    assert top1 > 0.9, top1
    assert abs(ndcg - ndcg_ref) < 0.02, (ndcg, ndcg_ref)
    assert abs(top1 - top1_ref) < 0.05, (top1, top1_ref)


def test_position_argument_unbiased_lambdarank_still_learns(test_set) -> None:
    X, y, qid = planted(400, seed=2)
    # Shown positions 1..ROWS in random order per query (a logging policy unrelated to the signal).
    rng = np.random.default_rng(3)
    position = np.concatenate([rng.permutation(ROWS) + 1 for _ in range(400)])
    ranker = Ranker(CONFIG).fit(X, y, qid, NAMES, position=position)
    top1, ndcg = quality(ranker, *test_set[:2])
    assert top1 > 0.9, top1
    assert ndcg > 0.9, ndcg


def test_save_load_gives_identical_predictions(fitted: Ranker, test_set, tmp_path: Path) -> None:
    fitted.save(tmp_path / "r")
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"ranker.txt", "ranker.json"}
    loaded = Ranker.load(tmp_path / "r")
    X = test_set[0]
    assert np.array_equal(loaded.predict(X), fitted.predict(X))
    assert loaded.feature_names_ == NAMES
    assert loaded.feature_importance().keys() == fitted.feature_importance().keys()
    assert loaded.n_queries_ == fitted.n_queries_
    assert loaded.config == fitted.config


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "ranker.txt").write_text("this is not a LightGBM model\n"),
        lambda d: (d / "ranker.txt").write_bytes((d / "ranker.txt").read_bytes()[:200]),
        lambda d: (d / "ranker.txt").unlink(),
        lambda d: (d / "ranker.json").write_text("{not json"),
        lambda d: (d / "ranker.json").unlink(),
    ],
    ids=["garbage_model", "truncated_model", "missing_model", "corrupt_json", "missing_json"],
)
def test_damaged_model_files_raise_artifact_error(fitted: Ranker, tmp_path: Path, damage) -> None:
    d = tmp_path / "r"
    fitted.save(d)
    damage(d)
    with pytest.raises(ArtifactError):
        Ranker.load(d)


def test_load_from_missing_folder_raises_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        Ranker.load(tmp_path / "nothing")


def test_wrong_column_count_raises_value_error(fitted: Ranker, test_set) -> None:
    X = test_set[0]
    with pytest.raises(ValueError, match="columns"):
        fitted.predict(X[:, :-1])
    with pytest.raises(ValueError):
        fitted.predict(np.hstack([X, X[:, :1]]))
    with pytest.raises(ValueError):
        fitted.predict(X[0])  # one row must still be 2-D
    with pytest.raises(ValueError):
        fitted.contributions(X[:, :2])


def test_fit_validates_its_inputs() -> None:
    X, y, qid = planted(30, seed=4)
    with pytest.raises(ValueError):
        Ranker().fit(X, y, qid, NAMES[:-1])
    with pytest.raises(ValueError):
        Ranker().fit(X, y[:-1], qid, NAMES)
    with pytest.raises(ValueError):
        Ranker().fit(X, y, qid[:-1], NAMES)
    with pytest.raises(RuntimeError):
        Ranker().predict(X)
