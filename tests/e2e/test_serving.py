"""The online request path: the same answers as the offline model, and guardrails no model can get around.

* Serving computes the ranker's inputs by lookups instead of the offline queries; the tests hold the two
  equal, feature by feature, so what was evaluated is what is served.
* The guardrail property tests plant an adversarial model (a candidate index that ignores the exclusion
  mask and a ranker that scores the forbidden products highest) and check every answer against an
  oracle written here from the raw tables, independent of :mod:`finrec.rules`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finrec.config import FinrecSettings
from finrec.data.dataset import load_dataset
from finrec.events.schema import Event
from finrec.events.store import MemoryEventStore
from finrec.features.builder import FeatureBuilder
from finrec.features.online import Activity
from finrec.pipeline import load_model
from finrec.serving.guardrails import DAY, GUARDRAILS, GuardrailPolicy, LiveState
from finrec.serving.recommender import Recommender, UnknownCustomerError
from finrec.serving.scoring import ServingModel
from finrec.serving.state import ServingData
from finrec.twostage.train import allowed_mask

CATEGORIES_WITH_SUITABILITY = ("investment_fund", "pension")


@pytest.fixture(scope="module")
def served(tiny_world: Path, tiny_model: Path) -> ServingModel:
    ds = load_dataset(tiny_world)
    model, manifest = load_model(tiny_model)
    return ServingModel(model, manifest, ServingData(ds, FinrecSettings()))


def make_recommender(served: ServingModel, policy: GuardrailPolicy | None = None) -> Recommender:
    live = LiveState(policy or GuardrailPolicy())
    live.seed(served.data)
    return Recommender(served, live, MemoryEventStore(), None, clock=lambda: float(served.data.cutoff))


# --------------------------------------------------------------------------- offline == online


def test_pair_features_equal_the_offline_builder(served: ServingModel) -> None:
    data = served.data
    rng = np.random.default_rng(0)
    users = rng.integers(0, data.n_users, 400)
    items = rng.integers(0, data.n_products, 400)
    # Include pairs with history, where the lookup has work to do.
    with_history = np.flatnonzero(np.diff(data.pair_ptr) > 0)[:50]
    users = np.r_[users, with_history]
    items = np.r_[items, data.pair_product[data.pair_ptr[with_history]]]
    offline = data.builder.pair_features(data.snap, users, items)
    cols = [c for c in served.pair_columns if c in offline.columns]
    assert {"credit_margin", "holds_category", "pair_seen", "pair_days_since_seen"} <= set(cols)
    online = np.vstack([data.pair_block(int(u), np.array([i]), cols) for u, i in zip(users, items, strict=True)])
    # Compared as the ranker reads them (float32; the table stores the history features in float32).
    np.testing.assert_array_equal(online.astype(np.float32), offline[cols].to_numpy(np.float32))


def test_served_answers_are_the_offline_models_answers(served: ServingModel) -> None:
    data, model = served.data, served.model
    users = np.arange(0, data.n_users, 7)
    allowed = allowed_mask(data.rules, data.snap, users, data.n_products)
    offline = model.recommend(data.builder, data.snap, users, allowed, 10,
                              data.history(model.config.history_length))  # fmt: skip
    same = 0
    names, _ = model.space.tabular_names(model.pair_columns)
    assert any(n.startswith("src_") for n in names), "the bundle's ranker should read the candidate sources"
    served_per_user = np.cumsum(np.r_[0, (offline.items >= 0).sum(axis=1)])
    assert offline.features is not None
    for j, u in enumerate(users):
        online = served.rank(served.customer(int(u)), allowed[j], 10)
        expected = offline.items[j][offline.items[j] >= 0]
        if not np.array_equal(online.items, expected):
            continue
        same += 1
        # The ranker's inputs of the served items equal the offline rows of the same pairs (every column: the
        # retrieval and source scores and ranks as well), as the ranker reads them (float32).
        rows = offline.features[served_per_user[j] : served_per_user[j + 1]]
        np.testing.assert_allclose(online.features, rows.astype(np.float32), rtol=2e-5, atol=1e-6)
    # Embeddings of one customer and of a batch differ in the last float bits, which can swap two
    # near-tied candidates; anything beyond that would be a skew between the two paths.
    assert same >= 0.97 * len(users), f"{same} of {len(users)} identical"


def test_a_prospect_is_encoded_like_a_customer_without_history(tiny_world: Path, tiny_model: Path) -> None:
    ds = load_dataset(tiny_world)
    model, manifest = load_model(tiny_model)
    early = ServingModel(model, manifest, ServingData(ds, FinrecSettings(), cutoff=int(ds.time_range[0])))
    row = 5
    profile = {c: ds.users[c].iloc[row] for c in ("age", "income", "credit_score", "risk_tolerance", "region",
                                                 "employment_status", "dependants", "marketing_consent")}  # fmt: skip
    prospect, customer = early.prospect(profile), early.customer(row)
    names = early.names[: early.n_user]
    differs = [n for n, a, b in zip(names, prospect.tabular, customer.tabular, strict=True)
               if not (a == b or (np.isnan(a) and np.isnan(b)))]  # fmt: skip
    assert differs == ["user_tenure_days"]  # a prospect joins today; everything else is the same customer
    cols = [c for c in early.pair_columns if c not in ("retrieval_score", "retrieval_rank", "approval_odds")]
    items = np.arange(ds.n_products)
    np.testing.assert_array_equal(early.data.pair_block(-1, items, cols, profile),
                                  early.data.pair_block(row, items, cols))  # fmt: skip


# --------------------------------------------------------------------------- the oracle


def oracle_allowed(served: ServingModel, profile: dict[str, Any], now: float) -> np.ndarray:
    """What the rules allow, from the raw product table (independent of finrec.rules)."""
    P = served.data.ds.products
    ok = np.ones(len(P), dtype=bool)

    def num(v: Any) -> float:
        return float("nan") if v is None else float(v)

    for user_col, prod_col, below_fails in (("credit_score", "min_credit_score", True), ("income", "min_income", True),
                                            ("age", "min_age", True), ("age", "max_age", False)):  # fmt: skip
        limit = P[prod_col].to_numpy(np.float64)
        v = num(profile.get(user_col))
        has = ~np.isnan(limit)
        if np.isnan(v):
            ok &= ~has
        else:
            ok &= ~has | ((v >= limit) if below_fails else (v <= limit))
    region = profile.get("region")
    spec = P["regions"].fillna("*").astype(str)
    ok &= np.array([s.strip() == "*" or (region is not None and region in [r.strip() for r in s.split(",")])
                    for s in spec])  # fmt: skip
    ok &= P["launch_date"].to_numpy(np.float64) <= now
    risk = P["risk_level"].to_numpy(np.float64)
    applies = P["category"].isin(CATEGORIES_WITH_SUITABILITY).to_numpy() & ~np.isnan(risk)
    tol = num(profile.get("risk_tolerance"))
    ok &= ~applies | (~np.isnan(tol) & (risk <= tol))
    if profile.get("marketing_consent") == 0:
        ok[:] = False
    return ok


class AdversarialIndex:
    """Ignores the exclusion mask and returns the forbidden products first."""

    def __init__(self, forbidden_first: np.ndarray) -> None:
        self.order = forbidden_first

    def search(self, q: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        items = self.order[:k]
        return np.linspace(1, 0, len(items))[None, :], items[None, :]


class AdversarialRanker:
    """Scores what the guardrails removed highest (it receives whatever reaches it)."""

    def __init__(self, inner: Any, badness: np.ndarray, served: ServingModel) -> None:
        self.inner, self.badness, self.served = inner, badness, served
        self.feature_names_ = inner.feature_names_
        self.booster_ = inner.booster_

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.inner.predict(X)) + 1e3 * self.badness[: len(X)]

    def contributions(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.inner.contributions(X))

    def leaves(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.inner.leaves(X))

    def contributions_from_leaves(self, leaves: np.ndarray, projection: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(self.inner.contributions_from_leaves(leaves, projection))


profiles = st.fixed_dictionaries({
    "age": st.one_of(st.none(), st.integers(16, 90)),
    "income": st.one_of(st.none(), st.floats(0, 400_000)),
    "credit_score": st.one_of(st.none(), st.floats(300, 850)),
    "risk_tolerance": st.one_of(st.none(), st.integers(1, 5)),
    "region": st.one_of(st.none(), st.sampled_from(["capital", "north", "south", "east", "west", "nowhere"])),
    "marketing_consent": st.one_of(st.none(), st.sampled_from([0.0, 1.0])),
})  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(profile=profiles, k=st.integers(1, 50), adversarial=st.booleans())
def test_no_prospect_is_ever_served_a_product_the_rules_forbid(
    served: ServingModel, profile: dict[str, Any], k: int, adversarial: bool
) -> None:
    rec = make_recommender(served)
    now = rec.clock()
    ok = oracle_allowed(served, profile, now)
    original = (served.index, served.model.ranker)
    try:
        if adversarial:
            forbidden_first = np.argsort(ok, kind="stable")  # every forbidden product before any allowed one
            served.index = AdversarialIndex(forbidden_first)
            served.model.ranker = AdversarialRanker(original[1], (~ok[forbidden_first]).astype(float), served)
        answer = rec.recommend_prospect(profile, k)
    finally:
        served.index, served.model.ranker = original
    rows = [served.data.product_row[it["product_id"]] for it in answer.body["items"]]
    assert all(ok[r] for r in rows), [it["product_id"] for it in answer.body["items"] if not ok[served.data.product_row[it["product_id"]]]]  # noqa: E501
    assert len(rows) == len(set(rows)) and len(rows) <= min(k, int(ok.sum()))  # shorter, never back-filled
    assert sum(answer.body["excluded"].values()) == served.data.n_products - int(ok.sum())
    if not adversarial:
        assert answer.violations == 0
        assert len(rows) == min(k, int(ok.sum()), served.n_candidates)  # every survivor can be served


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.integers(0, 1999), declines=st.lists(st.integers(0, 39), max_size=5),
       shown=st.lists(st.integers(0, 39), max_size=12), days_ago=st.integers(0, 40))  # fmt: skip
def test_held_declined_and_overexposed_products_are_never_served(
    served: ServingModel, user: int, declines: list[int], shown: list[int], days_ago: int
) -> None:
    policy = GuardrailPolicy(cooling_off_days=30, frequency_cap=3, frequency_window_days=7)
    rec = make_recommender(served, policy)
    uid = served.data.ds.users["user_id"].astype(str).iloc[user]
    now = rec.clock()
    t = int(now - days_ago * DAY)
    pid = served.data.product_ids
    rec.live.record([Event(f"d{i}", uid, pid[p], "decline", t) for i, p in enumerate(declines)]
                    + [Event(f"s{i}", uid, pid[p], "impression", t) for i, p in enumerate(shown)])  # fmt: skip
    answer = rec.recommend(uid, 50)
    served_rows = {served.data.product_row[it["product_id"]] for it in answer.body["items"]}
    assert not served_rows & set(served.data.held(user).tolist())
    if days_ago <= 30:
        assert not served_rows & set(declines)
    if days_ago <= 7:
        assert not served_rows & {p for p in shown if shown.count(p) >= 3}
    assert set(answer.body["excluded"]) <= set(GUARDRAILS)


def test_unknown_customer_and_out_of_range_k_are_clear_errors(served: ServingModel) -> None:
    rec = make_recommender(served)
    with pytest.raises(UnknownCustomerError, match="not known"):
        rec.recommend("no-such-customer", 10)
    with pytest.raises(Exception, match="out of range"):
        rec.recommend("1", 0)


def test_reasons_never_claim_what_the_item_contradicts(served: ServingModel) -> None:
    """A prospect holds nothing, so 'complements what you hold' or 'a provider you bank with' would be false."""
    rec = make_recommender(served)
    answer = rec.recommend_prospect({"age": 40, "income": 60_000, "credit_score": 720, "risk_tolerance": 3,
                                     "region": "capital", "marketing_consent": 1.0}, 20)  # fmt: skip
    assert answer.body["items"]
    codes = {r["code"] for it in answer.body["items"] for r in it["reasons"]}
    assert not codes & {"COMPLEMENTS_HOLDINGS", "TRUSTED_PROVIDER", "RECENT_INTEREST", "MATCHES_INTERESTS"}
    assert all(it["reasons"] for it in answer.body["items"])


# --------------------------------------------------------------------------- live events


def test_live_events_change_features_as_the_offline_builder_would(tiny_world: Path, tiny_model: Path) -> None:
    """Overlaying live events equals recomputing the snapshot with those events in the data."""
    ds = load_dataset(tiny_world)
    model, manifest = load_model(tiny_model)
    data = ServingData(ds, FinrecSettings())
    served = ServingModel(model, manifest, data)
    T, now = data.cutoff, data.cutoff + 20
    ev = ds.events
    # A customer who holds something and has no event near a window's edge (20 s of ageing would move it).
    edges = np.concatenate([ev.ts[(ev.ts >= T - w * DAY - 30) & (ev.ts < T - w * DAY + 30)] for w in (30, 90, 365)])
    near_edge = set(ev.user[np.isin(ev.ts, edges)].tolist())
    u = next(int(r) for r in np.unique(data.held_user) if int(r) not in near_edge)
    pid = data.product_ids
    held0 = int(data.held(u)[0])
    others = [p for p in range(data.n_products) if p not in set(data.held(u).tolist())][:4]
    plan = [("impression", others[0]), ("impression", others[0]), ("click", others[0]), ("apply", others[1]),
            ("decline", others[1]), ("view", others[2]), ("approve", others[3]), ("close", held0),
            ("impression", others[2]), ("click", others[2])]  # fmt: skip
    activity = [Activity(T + 1 + i, t, pid[p]) for i, (t, p) in enumerate(plan)]
    who = served.customer(u, activity, now)

    etype = {t: i for i, t in enumerate(("impression", "view", "click", "apply", "approve", "decline", "hold",
                                         "close"))}  # fmt: skip
    from finrec.data.dataset import ETYPE, EventLog

    assert all(ETYPE[t] == i for t, i in etype.items())
    appended = EventLog(
        np.r_[ev.user, np.full(len(plan), u)].astype(ev.user.dtype),
        np.r_[ev.product, [p for _, p in plan]].astype(ev.product.dtype),
        np.r_[ev.etype, [ETYPE[t] for t, _ in plan]].astype(ev.etype.dtype),
        np.r_[ev.ts, [a.ts for a in activity]].astype(ev.ts.dtype),
        np.r_[ev.position, np.zeros(len(plan))].astype(ev.position.dtype),
    )
    ds2 = replace(ds, events=appended)
    builder2 = FeatureBuilder(ds2, FinrecSettings().protected_attributes)
    snap2 = builder2.snapshot(now)
    names = list(model.space.user_numeric)
    expected = model.space.user_tabular(snap2.users, np.array([u])).astype(np.float32)[0][: len(names)]
    got = who.tabular[: len(names)]
    timely = [i for i, n in enumerate(names) if "days" in n]  # static features of time age by 20 s offline
    exact = [i for i in range(len(names)) if i not in timely]
    np.testing.assert_array_equal(got[exact], expected[exact], err_msg=str([names[i] for i in exact]))
    np.testing.assert_allclose(got[timely], expected[timely], atol=1e-3)
    assert {"click_30d", "n_held"} <= set(names) and got[names.index("n_held")] == len(data.held(u))  # +1 -1

    cols = [c for c in served.pair_columns if c not in ("retrieval_score", "retrieval_rank", "approval_odds")]
    items = np.arange(data.n_products)
    off = builder2.pair_features(snap2, np.full(len(items), u), items)
    online = data.pair_block(u, items, cols, live=who.live).astype(np.float32)
    offline = np.column_stack([off[c].to_numpy(np.float64) if c in off else np.full(len(items), np.nan)
                               for c in cols]).astype(np.float32)  # fmt: skip
    timely = [j for j, c in enumerate(cols) if "days" in c]
    exact = [j for j in range(len(cols)) if j not in timely]
    np.testing.assert_array_equal(online[:, exact], offline[:, exact])
    np.testing.assert_allclose(online[:, timely], offline[:, timely], atol=1e-3)

    length = model.config.history_length
    hist = builder2.history(now, length)[[u]]
    mapped = np.where(hist >= 0, served.train_rows[np.maximum(hist, 0)], -1)
    expected_emb = model.retriever.user_embeddings(model.space.user_dense(snap2)[[u]], mapped)[0]
    np.testing.assert_allclose(who.embedding, expected_emb, atol=1e-4)
    assert not np.allclose(who.embedding, served.user_emb[u], atol=1e-3)  # the events did move the customer


def test_the_data_clock_is_shared_by_workers_and_restarts(tmp_path: Path) -> None:
    """Events stamped by the data clock must not be 'in the future' for another worker or after a restart."""
    import time

    from finrec.serving.service import make_clock

    state = tmp_path / "clock.json"
    first = make_clock("data", 1_700_000_000, state)
    time.sleep(0.3)
    second = make_clock("data", 1_700_000_000, state)  # another worker, or the same service restarted later
    assert abs(first() - second()) < 0.05
    assert 1_700_000_000 <= first() < 1_700_000_000 + 60
    fresh = make_clock("data", 1_800_000_000, state)  # new data: its clock starts at its own end
    assert 1_800_000_000 <= fresh() < 1_800_000_000 + 5


def test_a_faster_data_clock_compresses_time_and_never_goes_back(tmp_path: Path) -> None:
    import time

    from finrec.serving.service import make_clock

    state = tmp_path / "clock.json"
    slow = make_clock("data", 1_700_000_000, state)
    time.sleep(0.2)
    fast = make_clock("data", 1_700_000_000, state, speed=3600)  # restarted at an hour per second
    t0 = fast()
    assert t0 >= slow() - 0.05  # re-anchored where the slow clock had got to, not back at the data's end
    time.sleep(0.5)
    assert 1_000 < fast() - t0 < 3_600  # about half an hour of data time in half a second
    again = make_clock("data", 1_700_000_000, state, speed=3600)  # another worker at the same speed agrees
    assert abs(again() - fast()) < 60
