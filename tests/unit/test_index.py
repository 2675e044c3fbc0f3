"""Candidate indexes: exact search against brute force, exclusion masks, HNSW/IVF recall, lazy imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import finrec.retrieval.index as index_module
from finrec.retrieval.index import ExactIndex, HNSWIndex, IVFIndex, make_index, recall_vs_exact


def unit_vectors(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def random_5k() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return unit_vectors(rng, 5000, 32), unit_vectors(rng, 300, 32)


def brute_force(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ items.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


# --------------------------------------------------------------------------- exact


def test_exact_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    items, queries = rng.standard_normal((500, 16)).astype(np.float32), rng.standard_normal((40, 16))
    scores, found = ExactIndex(items).search(queries.astype(np.float32), 10)
    exp_scores, exp_items = brute_force(items, queries.astype(np.float32), 10)
    assert found.dtype == np.int64 and scores.dtype == np.float32
    assert found.shape == scores.shape == (40, 10)
    assert np.array_equal(found, exp_items)
    assert np.allclose(scores, exp_scores, atol=1e-5)


def test_exact_is_the_same_in_small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    items, queries = unit_vectors(rng, 300, 8), unit_vectors(rng, 50, 8)
    whole = ExactIndex(items).search(queries, 7)
    monkeypatch.setattr(index_module, "_BLOCK_VALUES", 1000)  # 3 queries per block
    blocked = ExactIndex(items).search(queries, 7)
    assert np.array_equal(whole[1], blocked[1])
    # Same items; scores may differ in the last bit: BLAS picks kernels by matrix shape (and thread count).
    np.testing.assert_allclose(whole[0], blocked[0], rtol=0, atol=1e-6)


def test_exact_pads_when_k_exceeds_catalogue_or_allowed_items() -> None:
    rng = np.random.default_rng(3)
    items, queries = unit_vectors(rng, 5, 4), unit_vectors(rng, 3, 4)
    scores, found = ExactIndex(items).search(queries, 8)
    assert (found[:, :5] >= 0).all() and (found[:, 5:] == -1).all()
    assert np.isneginf(scores[:, 5:]).all()
    assert all(sorted(row[:5]) == list(range(5)) for row in found)

    exclude = np.zeros((3, 5), dtype=bool)
    exclude[0, [0, 1, 2]] = True  # two allowed
    exclude[1, :] = True  # none allowed
    scores, found = ExactIndex(items).search(queries, 3, exclude=exclude)
    assert set(found[0, :2]) == {3, 4} and found[0, 2] == -1 and np.isneginf(scores[0, 2])
    assert (found[1] == -1).all() and np.isneginf(scores[1]).all()
    assert (found[2] >= 0).all()


def test_exact_honours_exclude() -> None:
    rng = np.random.default_rng(4)
    items, queries = unit_vectors(rng, 200, 8), unit_vectors(rng, 30, 8)
    _, unrestricted = ExactIndex(items).search(queries, 5)
    exclude = rng.random((30, 200)) < 0.3
    exclude[np.arange(30), unrestricted[:, 0]] = True  # the best item is always excluded
    scores, found = ExactIndex(items).search(queries, 5, exclude=exclude)
    assert not exclude[np.arange(30)[:, None], found].any()
    masked = np.where(exclude, -np.inf, queries @ items.T)
    assert np.allclose(scores, -np.sort(-masked, axis=1)[:, :5], atol=1e-5)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_exact_search_properties(data: st.DataObject) -> None:
    n_items = data.draw(st.integers(1, 25), label="n_items")
    n_queries = data.draw(st.integers(1, 5), label="n_queries")
    dim = data.draw(st.integers(1, 6), label="dim")
    k = data.draw(st.integers(1, 30), label="k")
    values = st.floats(-10, 10, allow_nan=False, width=32)
    items = data.draw(hnp.arrays(np.float32, (n_items, dim), elements=values), label="items")
    queries = data.draw(hnp.arrays(np.float32, (n_queries, dim), elements=values), label="queries")
    exclude = data.draw(st.none() | hnp.arrays(np.bool_, (n_queries, n_items)), label="exclude")

    scores, found = ExactIndex(items).search(queries, k, exclude=exclude)

    assert scores.shape == found.shape == (n_queries, k)
    allowed = np.ones((n_queries, n_items), dtype=bool) if exclude is None else ~exclude
    full = queries.astype(np.float64) @ items.T.astype(np.float64)
    for q in range(n_queries):
        n_valid = min(k, int(allowed[q].sum()))
        valid, pad = found[q, :n_valid], found[q, n_valid:]
        assert ((valid >= 0) & (valid < n_items)).all()
        assert len(set(valid.tolist())) == n_valid  # no item twice
        assert allowed[q, valid].all()  # nothing excluded
        assert (pad == -1).all() and np.isneginf(scores[q, n_valid:]).all()
        assert (np.diff(scores[q, :n_valid]) <= 0).all()  # sorted descending
        best = np.sort(full[q, allowed[q]])[::-1][:n_valid]
        tol = 1e-4 * (1 + np.abs(best))
        assert np.all(np.abs(scores[q, :n_valid] - best) <= tol)  # the true top values


# --------------------------------------------------------------------------- approximate


def test_hnsw_recall_against_exact(random_5k: tuple[np.ndarray, np.ndarray]) -> None:
    items, queries = random_5k
    exact = ExactIndex(items)
    hnsw = HNSWIndex(items, M=32, ef_construction=200, ef_search=128)
    assert recall_vs_exact(hnsw, exact, queries, 10) >= 0.9
    # Scores are recomputed exactly, so they agree with exact search wherever the items agree.
    s_h, i_h = hnsw.search(queries, 10)
    s_e, i_e = exact.search(queries, 10)
    same = i_h == i_e
    assert same.mean() > 0.9
    assert np.allclose(s_h[same], s_e[same], atol=1e-6)


def test_ivf_recall_against_exact(random_5k: tuple[np.ndarray, np.ndarray]) -> None:
    items, queries = random_5k
    # Isotropic random vectors have no cluster structure, the worst case for IVF: the top-10 of a query is spread
    # over many cells, so probing half of the sqrt(n) = 71 lists is what 0.9 recall takes (~0.94 measured).
    ivf = IVFIndex(items, nprobe=36)
    assert ivf.nlist == 71
    assert recall_vs_exact(ivf, ExactIndex(items), queries, 10) >= 0.9


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_honour_exclude(kind: str, random_5k: tuple[np.ndarray, np.ndarray]) -> None:
    items, queries = random_5k
    items, queries = items[:2000], queries[:60]
    index = make_index(kind, items)  # type: ignore[arg-type]
    exact = ExactIndex(items)
    rng = np.random.default_rng(5)
    _, top = exact.search(queries, 20)
    exclude = np.zeros((60, 2000), dtype=bool)
    exclude[:20, :] = rng.random((20, 2000)) < 0.5  # random half of the catalogue
    exclude[20:40][np.arange(20)[:, None], top[20:40, :15]] = True  # the best 15 items: forces retries
    exclude[40:50, :] = True  # nothing left...
    exclude[50:60, :] = True
    exclude[50:60, :4] = False  # ... or only 4 items left
    scores, found = index.search(queries, 10, exclude=exclude)
    returned = found >= 0
    assert not exclude[np.arange(60)[:, None], np.where(returned, found, 0)][returned].any()
    assert returned[:40].all()
    assert (found[40:50] == -1).all() and np.isneginf(scores[40:50]).all()
    assert (np.sort(found[50:60, :4], axis=1) == np.arange(4)).all() and (found[50:60, 4:] == -1).all()
    assert (np.diff(scores[:40], axis=1) <= 0).all()
    # Still close to exact search under the same mask.
    _, truth = exact.search(queries[:40], 10, exclude=exclude[:40])
    overlap = np.mean([np.intersect1d(a, b).size / 10 for a, b in zip(found[:40], truth, strict=True)])
    assert overlap >= 0.9


def test_approximate_indexes_are_deterministic(random_5k: tuple[np.ndarray, np.ndarray]) -> None:
    items, queries = random_5k[0][:1500], random_5k[1][:50]
    for kind in ("hnsw", "ivf"):
        a = make_index(kind, items, seed=3)
        b = make_index(kind, items, seed=3)
        assert np.array_equal(a.search(queries, 10)[1], b.search(queries, 10)[1]), kind


def test_tiny_catalogues() -> None:
    rng = np.random.default_rng(6)
    items, queries = unit_vectors(rng, 3, 4), unit_vectors(rng, 2, 4)
    expected = ExactIndex(items).search(queries, 5)
    for kind in ("hnsw", "ivf"):
        scores, found = make_index(kind, items).search(queries, 5)
        assert np.array_equal(found, expected[1]), kind
        assert np.allclose(scores[:, :3], expected[0][:, :3])


# --------------------------------------------------------------------------- helpers and validation


def test_make_index_and_recall_helpers(random_5k: tuple[np.ndarray, np.ndarray]) -> None:
    items, queries = random_5k[0][:500], random_5k[1][:20]
    exact = make_index("exact", items)
    assert isinstance(exact, ExactIndex) and exact.n_items == 500 and exact.dim == 32
    assert recall_vs_exact(exact, ExactIndex(items), queries, 10) == 1.0
    with pytest.raises(ValueError, match="unknown index kind"):
        make_index("annoy", items)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="takes no parameters"):
        make_index("exact", items, M=3)
    with pytest.raises(ValueError, match="nlist=600 is larger"):
        IVFIndex(items, nlist=600)
    with pytest.raises(ValueError, match="ef_search"):
        HNSWIndex(items, ef_search=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ix, q: ix.search(q[:, :3], 2), "query_emb has 3 columns"),
        (lambda ix, q: ix.search(q[0], 2), "query_emb must be a 2-D"),
        (lambda ix, q: ix.search(q.astype(np.int64), 2), "query_emb must hold floating"),
        (lambda ix, q: ix.search(np.full_like(q, np.nan), 2), "query_emb contains NaN"),
        (lambda ix, q: ix.search(q, 0), "k must be a positive integer"),
        (lambda ix, q: ix.search(q, 2.5), "k must be a positive integer"),
        (lambda ix, q: ix.search(q, 2, exclude=np.zeros((3, 10))), "exclude must be a boolean mask"),
        (lambda ix, q: ix.search(q, 2, exclude=np.zeros((2, 10), bool)), r"exclude must have shape"),
    ],
)
def test_search_rejects_bad_inputs(call: object, message: str) -> None:
    rng = np.random.default_rng(7)
    index, queries = ExactIndex(unit_vectors(rng, 10, 4)), unit_vectors(rng, 3, 4)
    with pytest.raises(ValueError, match=message):
        call(index, queries)  # type: ignore[operator]


def test_index_rejects_bad_items() -> None:
    with pytest.raises(ValueError, match="item_emb contains NaN"):
        ExactIndex(np.array([[np.nan, 1.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="item_emb is empty"):
        HNSWIndex(np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="item_emb must be a 2-D"):
        IVFIndex(np.zeros(4, dtype=np.float32))


def test_importing_the_module_loads_neither_faiss_nor_hnswlib() -> None:
    code = (
        "import sys, finrec.retrieval.index, finrec.retrieval.two_tower\n"
        "assert 'faiss' not in sys.modules and 'hnswlib' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
