"""Ranking metrics: hand-computed values, properties, a slow reference, and the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finrec.evaluation.bootstrap import bootstrap_ci, paired_bootstrap_diff, summarise
from finrec.evaluation.metrics import (
    Relevance,
    catalogue_coverage,
    dedupe_ranked,
    evaluate_rankings,
    hit_rate_at_k,
    map_at_k,
    mrr,
    ndcg_at_k,
    recall_at_k,
)

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
D = [1 / math.log2(i + 1) for i in range(1, 12)]  # D[i] discounts 0-based position i


# -- a 3-user example computed by hand ------------------------------------------------------------------

# user 0: item 1 grade 3, item 4 grade 1;            ranked 1, 2, 4   -> gains 3, 0, 1
# user 1: items 0 and 3 grade 2, item 5 grade 1;      ranked 2, 3, -1  -> gains 0, 2, 0 (padding)
# user 2: nothing relevant;                           ranked 0, 1, 2
HAND_RANKED = np.array([[1, 2, 4], [2, 3, -1], [0, 1, 2]])


@pytest.fixture
def hand() -> Relevance:
    # Item 4 of user 0 is given twice (the max grade counts); a grade-0 pair is not relevant.
    return Relevance.from_pairs(
        3,
        user=[0, 0, 0, 1, 1, 1, 2, 1],
        item=[1, 4, 4, 0, 3, 5, 2, 3],
        grade=[3, 0.5, 1, 2, 2, 1, 0, 2],
    )


def test_from_pairs_builds_sorted_csr_keeping_the_max_grade(hand: Relevance) -> None:
    assert hand.indptr.tolist() == [0, 2, 5, 5]
    assert hand.items.tolist() == [1, 4, 0, 3, 5]
    assert hand.grades.tolist() == [3, 1, 2, 2, 1]
    assert hand.grades.dtype == np.float32 and hand.items.dtype == np.int64
    assert hand.n_relevant().tolist() == [2, 3, 0]
    assert hand.n_relevant(2).tolist() == [1, 2, 0]
    assert hand.gains(HAND_RANKED).tolist() == [[3, 0, 1], [0, 2, 0], [0, 0, 0]]


def test_hand_computed_ndcg(hand: Relevance) -> None:
    dcg0, idcg0 = 7 * D[0] + 1 * D[2], 7 * D[0] + 1 * D[1]  # 2^3 - 1 = 7, 2^1 - 1 = 1
    dcg1, idcg1 = 3 * D[1], 3 * D[0] + 3 * D[1] + 1 * D[2]
    got = ndcg_at_k(HAND_RANKED, hand, k=3)
    np.testing.assert_allclose(got[:2], [dcg0 / idcg0, dcg1 / idcg1], rtol=1e-12)
    assert math.isnan(got[2])
    linear = ndcg_at_k(HAND_RANKED, hand, k=3, gain="linear")
    np.testing.assert_allclose(linear[0], (3 + 1 * D[2]) / (3 + 1 * D[1]), rtol=1e-12)
    # @1: user 0's first item is its best; user 1's is not relevant.
    np.testing.assert_allclose(ndcg_at_k(HAND_RANKED, hand, k=1)[:2], [1.0, 0.0])
    # IDCG looks at the best k grades even when ranked has fewer columns than k.
    np.testing.assert_allclose(ndcg_at_k(HAND_RANKED[:, :2], hand, k=3)[0], 7 * D[0] / idcg0)


def test_hand_computed_binary_metrics(hand: Relevance) -> None:
    ap = map_at_k(HAND_RANKED, hand, k=3)
    np.testing.assert_allclose(ap[:2], [(1 / 1 + 2 / 3) / 2, (1 / 2) / 3])
    # AP is normalised by min(k, n_relevant): user 1 has 3 relevant items.
    np.testing.assert_allclose(map_at_k(HAND_RANKED, hand, k=1)[:2], [1.0, 0.0])
    np.testing.assert_allclose(map_at_k(HAND_RANKED, hand, k=2)[:2], [1 / 2, (1 / 2) / 2])
    np.testing.assert_allclose(mrr(HAND_RANKED, hand)[:2], [1.0, 0.5])
    np.testing.assert_allclose(hit_rate_at_k(HAND_RANKED, hand, k=1)[:2], [1.0, 0.0])
    np.testing.assert_allclose(hit_rate_at_k(HAND_RANKED, hand, k=3)[:2], [1.0, 1.0])
    np.testing.assert_allclose(recall_at_k(HAND_RANKED, hand, k=1)[:2], [1 / 2, 0.0])
    np.testing.assert_allclose(recall_at_k(HAND_RANKED, hand, k=3)[:2], [2 / 2, 1 / 3])
    # Only grade >= 2 counts: user 0 has one relevant item, user 1 two.
    np.testing.assert_allclose(map_at_k(HAND_RANKED, hand, k=3, min_grade=2)[:2], [1.0, (1 / 2) / 2])
    np.testing.assert_allclose(recall_at_k(HAND_RANKED, hand, k=3, min_grade=2)[:2], [1.0, 1 / 2])
    np.testing.assert_allclose(mrr(HAND_RANKED, hand, min_grade=3)[:2], [1.0, np.nan])
    for f in (map_at_k, hit_rate_at_k, recall_at_k):
        assert math.isnan(f(HAND_RANKED, hand, k=3)[2])
    assert math.isnan(mrr(HAND_RANKED, hand)[2])


def test_hand_computed_coverage() -> None:
    assert catalogue_coverage(HAND_RANKED, n_items=6, k=3) == pytest.approx(5 / 6)  # items 0-4 appear
    assert catalogue_coverage(HAND_RANKED, n_items=6, k=1) == pytest.approx(3 / 6)  # items 1, 2, 0
    with pytest.raises(ValueError, match="n_items"):
        catalogue_coverage(HAND_RANKED, n_items=4, k=3)


def test_evaluate_rankings_names_and_agreement(hand: Relevance) -> None:
    out = evaluate_rankings(HAND_RANKED, hand, n_items=6, k=2, recall_ks=(1, 3, 100))
    assert list(out) == ["ndcg@2", "map@2", "mrr", "hit_rate@2", "recall@1", "recall@3", "recall@100", "coverage@2"]
    np.testing.assert_array_equal(out["ndcg@2"], ndcg_at_k(HAND_RANKED, hand, 2))
    np.testing.assert_array_equal(out["map@2"], map_at_k(HAND_RANKED, hand, 2))
    np.testing.assert_array_equal(out["mrr"], mrr(HAND_RANKED, hand))
    np.testing.assert_array_equal(out["hit_rate@2"], hit_rate_at_k(HAND_RANKED, hand, 2))
    np.testing.assert_array_equal(out["recall@100"], recall_at_k(HAND_RANKED, hand, 3))  # beyond width = padding
    assert out["coverage@2"] == pytest.approx(4 / 6)
    assert isinstance(out["coverage@2"], float)


def test_perfect_and_reversed_rankings() -> None:
    rel = Relevance.from_pairs(1, user=[0, 0, 0], item=[7, 2, 5], grade=[1, 3, 2])
    perfect = np.array([[2, 5, 7]])
    assert ndcg_at_k(perfect, rel, 3)[0] == pytest.approx(1.0)
    assert ndcg_at_k(perfect, rel, 2)[0] == pytest.approx(1.0)
    assert ndcg_at_k(perfect[:, ::-1], rel, 3)[0] < 1.0
    assert map_at_k(perfect, rel, 3)[0] == pytest.approx(1.0)
    assert map_at_k(perfect[:, ::-1], rel, 3, min_grade=2)[0] < 1.0


def test_padding_and_unknown_items_are_not_relevant() -> None:
    rel = Relevance.from_pairs(2, user=[0, 1], item=[3, 0], grade=[2, 1])
    ranked = np.array([[-1, 99, 3, -1], [-1, -1, -1, -1]], dtype=np.int32)
    for method in ("dense", "search"):
        assert rel.gains(ranked, method=method).tolist() == [[0, 0, 2, 0], [0, 0, 0, 0]]
    assert mrr(ranked, rel).tolist() == [1 / 3, 0.0]
    assert ndcg_at_k(ranked, rel, 4)[1] == 0.0


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="user indices"):
        Relevance.from_pairs(2, user=[2], item=[0], grade=[1])
    with pytest.raises(ValueError, match="twice"):
        Relevance(indptr=[0, 2], items=[1, 1], grades=[1, 2])
    with pytest.raises(ValueError, match="> 0"):
        Relevance(indptr=[0, 1], items=[1], grades=[0])
    rel = Relevance.from_pairs(2, user=[0], item=[0], grade=[1])
    with pytest.raises(ValueError, match="rows"):
        ndcg_at_k(np.zeros((3, 2), dtype=np.int64), rel, 2)
    with pytest.raises(ValueError, match="integer"):
        ndcg_at_k(np.zeros((2, 2)), rel, 2)
    with pytest.raises(ValueError, match="k must"):
        ndcg_at_k(np.zeros((2, 2), dtype=np.int64), rel, 0)
    with pytest.raises(ValueError, match="min_grade"):
        map_at_k(np.zeros((2, 2), dtype=np.int64), rel, 2, min_grade=0)


def test_constructor_sorts_items_within_users() -> None:
    rel = Relevance(indptr=[0, 2, 3], items=[5, 1, 0], grades=[1, 2, 3])
    assert rel.items.tolist() == [1, 5, 0] and rel.grades.tolist() == [2, 1, 3]
    u, i, g = rel.to_pairs()
    assert Relevance.from_pairs(2, u, i, g).items.tolist() == rel.items.tolist()


def test_dedupe_ranked_keeps_first_occurrence() -> None:
    ranked = np.array([[3, 1, 3, -1, -1, 1], [2, 2, 2, 0, -1, 5]])
    assert dedupe_ranked(ranked).tolist() == [[3, 1, -1, -1, -1, -1], [2, -1, -1, 0, -1, 5]]


# -- a slow reference on random data --------------------------------------------------------------------


def _reference(ranked: np.ndarray, pairs: dict[tuple[int, int], float], n_users: int, k: int, gain: str) -> dict:
    """Per-user loops straight from the definitions."""
    out: dict[str, list[float]] = {"ndcg": [], "map": [], "mrr": [], "recall": []}
    for u in range(n_users):
        grades = {i: g for (uu, i), g in pairs.items() if uu == u}
        if not grades:
            for v in out.values():
                v.append(math.nan)
            continue
        f = (lambda g: 2.0**g - 1) if gain == "exponential" else (lambda g: g)
        row = [int(i) for i in ranked[u]]
        dcg = sum(f(grades.get(i, 0.0)) / math.log2(pos + 2) for pos, i in enumerate(row[:k]))
        best = sorted(grades.values(), reverse=True)[:k]
        idcg = sum(f(g) / math.log2(pos + 2) for pos, g in enumerate(best))
        out["ndcg"].append(dcg / idcg)
        hits, precisions = 0, []
        for pos, i in enumerate(row[:k]):
            if i in grades:
                hits += 1
                precisions.append(hits / (pos + 1))
        out["map"].append(sum(precisions) / min(k, len(grades)))
        out["recall"].append(hits / len(grades))
        first = next((pos for pos, i in enumerate(row) if i in grades), None)
        out["mrr"].append(0.0 if first is None else 1 / (first + 1))
    return {m: np.array(v) for m, v in out.items()}


@pytest.mark.parametrize("gain", ["exponential", "linear"])
@pytest.mark.parametrize("method", ["dense", "search"])
def test_matches_slow_reference_on_random_data(gain: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import finrec.evaluation.metrics as M

    # Small blocks so several row blocks (and dense sub-blocks) are exercised.
    monkeypatch.setattr(M, "_BLOCK_CELLS", 64)
    monkeypatch.setattr(M, "_DENSE_CELLS", 200)
    monkeypatch.setattr(M, "_DENSE_MAX_ITEMS", 10**9 if method == "dense" else 0)
    rng = np.random.default_rng(42)
    n_users, n_items, width, k = 300, 40, 15, 10
    n_pairs = 900
    user, item = rng.integers(0, n_users, n_pairs), rng.integers(0, n_items, n_pairs)
    grade = rng.integers(0, 5, n_pairs).astype(float)
    pairs: dict[tuple[int, int], float] = {}
    for u, i, g in zip(user.tolist(), item.tolist(), grade.tolist(), strict=True):
        if g > 0:
            pairs[(u, i)] = max(g, pairs.get((u, i), 0.0))
    rel = Relevance.from_pairs(n_users, user, item, grade)
    ranked = np.argsort(rng.random((n_users, n_items)), axis=1)[:, :width]
    ranked[rng.random(ranked.shape) < 0.1] = -1  # some padding
    ref = _reference(ranked, pairs, n_users, k, gain)
    got = evaluate_rankings(ranked, rel, n_items, k=k, recall_ks=(k,), gain=gain)  # type: ignore[arg-type]
    np.testing.assert_allclose(got[f"ndcg@{k}"], ref["ndcg"], rtol=1e-10)
    np.testing.assert_allclose(got[f"map@{k}"], ref["map"], rtol=1e-10)
    np.testing.assert_allclose(got["mrr"], ref["mrr"], rtol=1e-10)
    np.testing.assert_allclose(got[f"recall@{k}"], ref["recall"], rtol=1e-10)
    np.testing.assert_array_equal(np.isnan(got[f"ndcg@{k}"]), [not any(p[0] == u for p in pairs) for u in range(300)])


# -- properties -------------------------------------------------------------------------------------------


@st.composite
def problems(draw: st.DrawFn) -> tuple[Relevance, np.ndarray, dict[tuple[int, int], float], int]:
    """A relevance set and a ranking of distinct items per user (padded with -1)."""
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 12))
    width = draw(st.integers(1, 8))
    pairs = draw(
        st.dictionaries(
            st.tuples(st.integers(0, n_users - 1), st.integers(0, n_items - 1)),
            st.integers(1, 4).map(float),
            max_size=n_users * n_items,
        )
    )
    rows = []
    for _ in range(n_users):
        row = draw(st.lists(st.integers(0, n_items - 1), unique=True, max_size=width))
        rows.append(row + [-1] * (width - len(row)))
    keys = list(pairs)
    rel = Relevance.from_pairs(n_users, [u for u, _ in keys], [i for _, i in keys], [pairs[p] for p in keys])
    return rel, np.array(rows, dtype=np.int64).reshape(n_users, width), pairs, n_items


def _all_metrics(ranked: np.ndarray, rel: Relevance, n_items: int, k: int, min_grade: float | None) -> dict:
    return evaluate_rankings(ranked, rel, n_items, k=k, recall_ks=(1, k, 50), min_grade=min_grade)


@PROPS
@given(problems(), st.integers(1, 10), st.sampled_from([None, 2.0, 4.0]))
def test_every_metric_is_in_unit_interval(p: tuple, k: int, min_grade: float | None) -> None:
    rel, ranked, _, n_items = p
    for name, v in _all_metrics(ranked, rel, n_items, k, min_grade).items():
        values = np.atleast_1d(np.asarray(v, dtype=float))
        finite = values[~np.isnan(values)]
        assert np.all((finite >= 0) & (finite <= 1 + 1e-12)), name
    nan_ndcg = np.isnan(ndcg_at_k(ranked, rel, k))
    np.testing.assert_array_equal(nan_ndcg, rel.n_relevant() == 0)
    np.testing.assert_array_equal(np.isnan(mrr(ranked, rel, min_grade)), rel.n_relevant(min_grade) == 0)


@PROPS
@given(problems(), st.integers(1, 10), st.sampled_from(["exponential", "linear"]))
def test_ideal_ranking_has_ndcg_one(p: tuple, k: int, gain: str) -> None:
    rel, _, pairs, _ = p
    n = rel.n_users
    width = max(1, int(rel.n_relevant().max(initial=0)))
    ideal = np.full((n, width), -1, dtype=np.int64)
    for u in range(n):
        mine = sorted(((g, i) for (uu, i), g in pairs.items() if uu == u), reverse=True)
        ideal[u, : len(mine)] = [i for _, i in mine]
    got = ndcg_at_k(ideal, rel, k, gain=gain)  # type: ignore[arg-type]
    has = rel.n_relevant() > 0
    np.testing.assert_allclose(got[has], 1.0, rtol=1e-9)
    assert np.all(np.isnan(got[~has]))
    np.testing.assert_allclose(recall_at_k(ideal, rel, max(k, width))[has], 1.0)


@PROPS
@given(problems(), st.integers(1, 10), st.data())
def test_moving_a_better_item_up_never_lowers_scores(p: tuple, k: int, data: st.DataObject) -> None:
    rel, ranked, _, n_items = p
    width = ranked.shape[1]
    if width < 2:
        return
    u = data.draw(st.integers(0, rel.n_users - 1))
    i = data.draw(st.integers(0, width - 2))
    j = data.draw(st.integers(i + 1, width - 1))
    g = rel.gains(ranked)[u]
    if g[j] < g[i]:  # only promote an item at least as relevant as the one it swaps with
        return
    swapped = ranked.copy()
    swapped[u, [i, j]] = ranked[u, [j, i]]
    before = _all_metrics(ranked, rel, n_items, k, None)
    after = _all_metrics(swapped, rel, n_items, k, None)
    for name in before:
        if name.startswith("coverage"):
            continue
        b, a = before[name][u], after[name][u]
        assert (np.isnan(a) and np.isnan(b)) or a >= b - 1e-12, name


@PROPS
@given(problems(), st.integers(1, 10), st.randoms(use_true_random=False))
def test_results_invariant_to_user_order(p: tuple, k: int, random: object) -> None:
    rel, ranked, _, n_items = p
    n = rel.n_users
    perm = np.arange(n)
    random.shuffle(perm)  # type: ignore[attr-defined]
    new_id = np.empty(n, dtype=np.int64)
    new_id[perm] = np.arange(n)  # old user perm[j] becomes user j
    u, i, g = rel.to_pairs()
    rel2 = Relevance.from_pairs(n, new_id[u], i, g)
    before = _all_metrics(ranked, rel, n_items, k, 2.0)
    after = _all_metrics(ranked[perm], rel2, n_items, k, 2.0)
    for name, v in before.items():
        if isinstance(v, float):
            assert after[name] == v
        else:
            np.testing.assert_array_equal(after[name], v[perm])


# -- bootstrap --------------------------------------------------------------------------------------------


def test_bootstrap_interval_covers_true_mean_about_95_percent() -> None:
    rng = np.random.default_rng(7)
    reps, hits = 200, 0
    for r in range(reps):
        x = rng.normal(1.0, 2.0, size=100)
        _, low, high = bootstrap_ci(x, n_boot=400, level=0.95, seed=r)
        hits += low <= 1.0 <= high
    assert 0.9 <= hits / reps <= 0.99


def test_bootstrap_interval_basics() -> None:
    x = np.array([0.2, 0.4, np.nan, 0.9])
    mean, low, high = bootstrap_ci(x, n_boot=200)
    assert mean == pytest.approx(0.5) and low <= mean <= high
    assert bootstrap_ci(x, n_boot=200, seed=3) == bootstrap_ci(x, n_boot=200, seed=3)
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([np.nan])))
    assert bootstrap_ci(np.array([0.3]), n_boot=50) == (0.3, 0.3, 0.3)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(np.ones(3), level=95)


def test_bootstrap_scales_to_a_million_values() -> None:
    rng = np.random.default_rng(0)
    hits = (rng.random(1_000_000) < 0.3).astype(float)  # few distinct values: multinomial path
    mean, low, high = bootstrap_ci(hits, n_boot=1000)
    se = math.sqrt(0.3 * 0.7 / 1e6)
    assert low < mean < high
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.15)
    cont = rng.random(1_000_000)  # all distinct: index resampling in chunks
    mean, low, high = bootstrap_ci(cont, n_boot=12)
    assert low < mean < high and high - low < 0.002


def test_multinomial_and_index_resampling_agree() -> None:
    import finrec.evaluation.bootstrap as B

    x = np.random.default_rng(1).integers(0, 5, 4000) / 4
    fast = bootstrap_ci(x, n_boot=2000, seed=1)
    old = B._MAX_DISTINCT
    try:
        B._MAX_DISTINCT = 0
        slow = bootstrap_ci(x, n_boot=2000, seed=1)
    finally:
        B._MAX_DISTINCT = old
    assert fast[0] == slow[0]
    np.testing.assert_allclose(fast[1:], slow[1:], atol=0.004)


def test_paired_diff_detects_a_planted_difference_and_not_a_null_one() -> None:
    rng = np.random.default_rng(3)
    base = rng.random(3000)
    better = np.clip(base + 0.05 + rng.normal(0, 0.1, 3000), 0, 1)
    diff, low, high, p = paired_bootstrap_diff(better, base, n_boot=1000)
    assert 0 < low < diff < high and p < 0.01
    same = np.clip(base + rng.normal(0, 0.1, 3000), 0, 1)
    diff, low, high, p = paired_bootstrap_diff(same, np.clip(base + rng.normal(0, 0.1, 3000), 0, 1), n_boot=1000)
    assert low < 0 < high and p > 0.05
    assert paired_bootstrap_diff(base, base, n_boot=100)[3] == 1.0
    # Under the null, p < 0.05 about 5% of the time.
    rejections = 0
    for r in range(100):
        a, b = rng.normal(size=200), rng.normal(size=200)
        rejections += paired_bootstrap_diff(a, b, n_boot=200, seed=r)[3] < 0.05
    assert rejections <= 12
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap_diff(np.ones(3), np.ones(4))


def test_paired_diff_drops_users_missing_in_either() -> None:
    a = np.array([1.0, np.nan, 0.5, 0.25])
    b = np.array([0.5, 0.5, np.nan, 0.25])
    assert paired_bootstrap_diff(a, b, n_boot=50)[0] == pytest.approx(0.25)


def test_summarise_drops_nan_and_passes_floats_through(hand: Relevance) -> None:
    per_user = evaluate_rankings(HAND_RANKED, hand, n_items=6, k=3, recall_ks=(3,))
    s = summarise(per_user, n_boot=100)
    assert set(s) == set(per_user)
    assert s["coverage@3"] == {"mean": pytest.approx(5 / 6)}
    assert s["ndcg@3"]["n"] == 2
    assert s["mrr"]["mean"] == pytest.approx(0.75)
    assert s["mrr"]["low"] <= 0.75 <= s["mrr"]["high"]
    empty = summarise({"x": np.array([np.nan, np.nan])}, n_boot=10)["x"]
    assert empty["n"] == 0 and math.isnan(empty["mean"])
