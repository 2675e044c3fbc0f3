"""Every candidate source holds to one contract (finrec.candidates.base), on data with a planted answer.

The world: two groups of customers. Group A takes products 0, 1, 2 (in that order over time), group B
takes 3, 4, 5; products 6-9 are taken by a few customers of both groups. So a group-A customer who has
0 and 1 should be offered 2 first (item-item CF), a customer who has 0 adds 1 next (transitions), and a
customer's segment (the group) points at its group's products (segment popularity).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from finrec.candidates.base import CandidateSource, NotFittedError
from finrec.candidates.interactions import Interactions
from finrec.candidates.item_item import EASESource, ItemKNNSource
from finrec.candidates.popularity import PopularitySource, SegmentPopularitySource
from finrec.candidates.source_set import KINDS, SourceSet, source_from_config
from finrec.candidates.transitions import TransitionSource
from finrec.data.dataset import ETYPE, EventLog

N_USERS, N_PRODUCTS, DAY = 400, 10, 86_400
GRADES = {"impression": 0, "view": 1, "click": 2, "apply": 3, "decline": 3, "approve": 4, "hold": 4, "close": 0}


def planted(seed: int = 0) -> tuple[EventLog, np.ndarray]:
    rng = np.random.default_rng(seed)
    u, p, t = [], [], []
    group = (np.arange(N_USERS) >= N_USERS // 2).astype(np.int64)
    for user in range(N_USERS):
        base = 0 if group[user] == 0 else 3
        n_take = rng.integers(1, 4)  # a prefix of the group's sequence: 1, 2 or 3 products
        for step in range(n_take):
            u.append(user)
            p.append(base + step)
            t.append(1_700_000_000 + (step * 30 + int(rng.integers(0, 5))) * DAY)
        if rng.random() < 0.1:
            u.append(user)
            p.append(int(rng.integers(6, 10)))
            t.append(1_700_000_000 + int(rng.integers(0, 90)) * DAY)
    order = np.argsort(t, kind="stable")
    ev = EventLog(np.asarray(u, np.int32)[order], np.asarray(p, np.int32)[order],
                  np.full(len(u), ETYPE["hold"], np.int8), np.asarray(t, np.int64)[order],
                  np.zeros(len(u), np.int16))  # fmt: skip
    return ev, group


def data(seed: int = 0) -> tuple[Interactions, np.ndarray]:
    ev, group = planted(seed)
    return Interactions.from_events(ev, N_USERS, N_PRODUCTS, GRADES, 2), group


def history(*products: int) -> sp.csr_matrix:
    x = np.zeros((1, N_PRODUCTS), np.float32)
    x[0, list(products)] = 1
    return sp.csr_matrix(x)


SOURCES = {
    "popularity": lambda: PopularitySource("all"),
    "popularity_recent": lambda: PopularitySource("recent"),
    "popularity_additions": lambda: PopularitySource("additions"),
    "segment": lambda: SegmentPopularitySource("group"),
    "ease": lambda: EASESource(l2=0.1),
    "item_knn": lambda: ItemKNNSource(neighbours=5),
    "transitions": lambda: TransitionSource(shrinkage=5.0),
}


@pytest.fixture(params=sorted(SOURCES))
def make(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return SOURCES[request.param]


def test_fit_returns_self_and_scores_the_whole_catalogue(make) -> None:  # type: ignore[no-untyped-def]
    inter, group = data()
    src = make()
    assert isinstance(src, CandidateSource)
    assert src.fit(inter, group) is src
    h = sp.vstack([history(0), history(3, 4), history()]).tocsr()
    s = src.score(h, np.array([0, 1, -1]))
    assert s.shape == (3, N_PRODUCTS) and s.dtype == np.float64 and np.isfinite(s).all()


def test_an_unfitted_source_refuses_to_score_or_save(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = make()
    with pytest.raises(NotFittedError):
        src.score(history(0), np.array([0]))
    with pytest.raises(NotFittedError):
        src.save(tmp_path / "s")


def test_save_then_load_gives_the_same_scores_without_pickle(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inter, group = data()
    src = make().fit(inter, group)
    src.save(tmp_path / "s")
    with np.load(tmp_path / "s" / "source.npz", allow_pickle=False) as z:  # would raise on pickled objects
        assert all(z[k].dtype != object for k in z.files)
    back = KINDS[src.kind].load(tmp_path / "s")
    h = sp.vstack([history(0, 1), history(5)]).tocsr()
    np.testing.assert_array_equal(back.score(h, np.array([0, 1])), src.score(h, np.array([0, 1])))
    assert back.get_params() == src.get_params()


def test_same_data_same_seed_same_scores(make) -> None:  # type: ignore[no-untyped-def]
    a = make().fit(*data(3))
    b = make().fit(*data(3))
    h = sp.vstack([history(0), history(3)]).tocsr()
    np.testing.assert_array_equal(a.score(h, np.array([0, 1])), b.score(h, np.array([0, 1])))


def test_unknown_parameters_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    src = make()
    with pytest.raises((ValueError, TypeError)):
        source_from_config(src.kind, {**src.get_params(), "typo": 1})


def test_item_item_sources_complete_the_planted_sequence() -> None:
    inter, _ = data()
    for src in (EASESource(l2=0.1).fit(inter), ItemKNNSource(neighbours=5).fit(inter)):
        s = src.score(history(0, 1))[0]
        s[[0, 1]] = -np.inf
        assert int(np.argmax(s)) == 2, src.name
        s = src.score(history(3))[0]
        s[3] = -np.inf
        assert int(np.argmax(s)) in (4, 5), src.name


def test_an_absolute_ease_penalty_survives_refits_on_more_data(tmp_path: Path) -> None:
    """Validated on part of the data, refitted on all of it: the prior's strength stays, as in ridge regression."""
    small, _ = data(seed=1)
    full, _ = data(seed=2)
    relative = EASESource(l2=0.5)
    assert relative.fit(small).penalty_ != pytest.approx(EASESource(l2=0.5).fit(full).penalty_)
    kept = EASESource(l2=0.5, penalty=relative.penalty_)
    assert kept.fit(full).penalty_ == relative.penalty_
    sset = SourceSet([kept], None, None)
    sset.save(tmp_path / "s")
    again = SourceSet.load(tmp_path / "s").refit(full, None)
    assert again.get("ease").penalty_ == relative.penalty_  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="penalty > 0"):
        EASESource(penalty=0.0)


def test_transitions_learn_what_customers_add_next() -> None:
    inter, _ = data()
    src = TransitionSource(shrinkage=5.0).fit(inter)
    s = src.score(history(0))[0]
    s[0] = -np.inf
    assert int(np.argmax(s)) == 1  # customers holding 0 add 1 next (not 2, which comes after 1)
    s = src.score(history(3, 4))[0]
    s[[3, 4]] = -np.inf
    assert int(np.argmax(s)) == 5


def test_additions_popularity_differs_from_holdings_popularity() -> None:
    inter, _ = data()
    held = PopularitySource("all").fit(inter).score(history())[0]
    added = PopularitySource("additions").fit(inter).score(history())[0]
    assert int(np.argmax(held)) in (0, 3)  # everyone starts with the first product of their group
    assert int(np.argmax(added)) in (1, 4)  # what people add is the second


def test_segment_popularity_points_at_the_segments_products() -> None:
    inter, group = data()
    src = SegmentPopularitySource("group").fit(inter, group)
    s = src.score(sp.vstack([history(), history()]).tocsr(), np.array([0, 1]))
    assert int(np.argmax(s[0])) in (0, 1, 2) and int(np.argmax(s[1])) in (3, 4, 5)


def test_transitions_refuse_undated_holdings() -> None:
    ev, _ = planted()
    flat = EventLog(ev.user, ev.product, ev.etype, np.full(len(ev), ev.ts[0]), ev.position)
    inter = Interactions.from_events(flat, N_USERS, N_PRODUCTS, GRADES, 2)
    assert len(inter.add_user) == 0
    with pytest.raises(ValueError, match="additions"):
        TransitionSource().fit(inter)


def test_a_source_set_round_trips_and_refits_at_any_cutoff(tmp_path: Path) -> None:
    inter, group = data()
    users = pd.DataFrame({"user_id": [str(i) for i in range(N_USERS)], "group": np.where(group == 0, "a", "b")})
    sset = SourceSet([PopularitySource("all").fit(inter), SegmentPopularitySource("group").fit(inter, group),
                      TransitionSource().fit(inter)], "group", ["a", "b"])  # fmt: skip
    np.testing.assert_array_equal(sset.segment_codes(users), group)
    sset.save(tmp_path / "set")
    back = SourceSet.load(tmp_path / "set")
    assert back.names == sset.names and back.segment_vocab == ["a", "b"]
    h = sp.vstack([history(0), history(3)]).tocsr()
    for name, s in sset.scores(h, group[[0, 300]]).items():
        np.testing.assert_array_equal(back.scores(h, group[[0, 300]])[name], s)
    # Before the first addition there is nothing to learn transitions from: the set keeps the name, scores 0.
    ev, _ = planted()
    early = Interactions.from_events(ev, N_USERS, N_PRODUCTS, GRADES, 2, cutoff=int(ev.ts[0]) + DAY)
    refit = sset.refit(early, group)
    assert refit.names == sset.names
    assert not refit.scores(h, group[[0, 300]])["transitions"].any()
    allowed = np.ones((2, N_PRODUCTS), bool)
    allowed[:, 0] = False
    cands = SourceSet.candidates(sset.scores(h, group[[0, 300]]), allowed, 2)
    assert all(0 not in c for c in cands)


def test_one_customer_is_scored_and_merged_exactly_as_in_a_batch() -> None:
    """The request path scores one customer at a time through fast paths: they must equal the batch path bit
    for bit, ties included (offline equals online)."""
    inter, group = data()
    rng = np.random.default_rng(5)
    sources = [make().fit(inter, group) for make in SOURCES.values()]
    rows = inter.matrix[:40]
    allowed = rng.random((40, N_PRODUCTS)) < 0.7
    for src in sources:
        batch = src.score(rows, group[:40])
        for i in range(40):
            np.testing.assert_array_equal(src.score(rows[i], group[i : i + 1])[0], batch[i])
    scores = {s.name: s.score(rows, group[:40]) for s in sources}
    scores["flat"] = np.zeros((40, N_PRODUCTS))  # every product tied
    batch_c = SourceSet.candidates(scores, allowed, 3)
    for i in range(40):
        one = SourceSet.candidates({k: v[i : i + 1] for k, v in scores.items()}, allowed[i : i + 1], 3)[0]
        np.testing.assert_array_equal(one, batch_c[i])
    # and each pair's source scores and ranks (every source ranked in one call for one customer)
    q = np.repeat(np.arange(40), [len(c) for c in batch_c])
    batch_f = SourceSet.features(scores, allowed, q, np.concatenate(batch_c))
    for i in range(40):
        one_f = SourceSet.features({k: v[i : i + 1] for k, v in scores.items()}, allowed[i : i + 1],
                                   np.zeros(len(batch_c[i]), np.int64), batch_c[i])  # fmt: skip
        assert set(one_f) == set(batch_f)
        for name, values in one_f.items():
            np.testing.assert_array_equal(values, batch_f[name][q == i])


def test_interactions_from_pairs_are_those_from_events() -> None:
    """What Spark hands over (a row per customer-product pair: first positive, positives in the recent window)
    builds the same interactions as every positive event does, repeats and non-positive events included."""
    ev, _ = planted(3)
    rng = np.random.default_rng(3)
    again = rng.random(len(ev.user)) < 0.3  # some pairs have several positives, some events are only views
    etype = np.where(rng.random(len(ev.user)) < 0.2, ETYPE["view"], ETYPE["hold"]).astype(np.int8)
    order = np.argsort(np.concatenate([ev.ts, ev.ts[again] + 40 * DAY]), kind="stable")
    log = EventLog(*(np.concatenate([a, a[again]])[order] for a in (ev.user, ev.product)),
                   np.concatenate([etype, np.full(int(again.sum()), ETYPE["approve"], np.int8)])[order],
                   np.concatenate([ev.ts, ev.ts[again] + 40 * DAY])[order],
                   np.zeros(len(order), np.int16))  # fmt: skip
    cutoff = int(log.ts[len(log.ts) * 3 // 4])
    want = Interactions.from_events(log, N_USERS, N_PRODUCTS, GRADES, 2, cutoff=cutoff)
    frame = pd.DataFrame({"u": log.user, "p": log.product, "ts": log.ts, "e": log.etype})
    pos = frame[(frame.ts < cutoff) & frame.e.isin([ETYPE["hold"], ETYPE["approve"]])]
    pos = pos.assign(recent=(pos.ts >= cutoff - 90 * DAY).astype(int))
    agg = pos.groupby(["u", "p"], as_index=False).agg(first=("ts", "min"), recent=("recent", "sum")).sample(frac=1.0,
                                                                                                           random_state=1)
    got = Interactions.from_pairs(agg.u.to_numpy(), agg.p.to_numpy(), agg["first"].to_numpy(), agg.recent.to_numpy(),
                                  N_USERS, N_PRODUCTS, cutoff)  # fmt: skip
    assert got.cutoff == want.cutoff and got.n_positives == want.n_positives > 0
    assert (got.matrix != want.matrix).nnz == 0 and (got.recent != want.recent).nnz == 0 and want.recent.nnz > 0
    for f in ("add_user", "add_product", "add_ts", "first_user", "first_product", "first_ts"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
    assert len(want.add_user) > 0
