"""Point-in-time features, labels, the temporal split and the feature space.

The leakage test is the important one: features at a cutoff must not change when anything at or after the
cutoff changes, and must change when an event moves from before the cutoff to after it (so the test can fail).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pandas.testing import assert_frame_equal

from finrec.data.dataset import ETYPE, Dataset, EventLog, load_dataset
from finrec.features.builder import FeatureBuilder, Snapshot
from finrec.features.encoding import FeatureSpace
from finrec.features.split import TemporalSplit

DAY = 86_400
PROTECTED = ["gender"]
ENGAGED = [ETYPE[t] for t in ("click", "apply", "approve", "decline")]


@pytest.fixture(scope="module")
def ds(small_world: Path) -> Dataset:
    return load_dataset(small_world)


@pytest.fixture(scope="module")
def cutoff(ds: Dataset) -> int:
    """The time of an engaged event 60% of the way through the log, the customer's first with that product.

    It sits exactly at the cutoff, so counting it (``<=`` instead of ``<``) would change every kind of feature,
    history included.
    """
    ev = ds.events
    engaged = np.flatnonzero(np.isin(ev.etype, ENGAGED))
    first = engaged[~pd.MultiIndex.from_arrays([ev.user[engaged], ev.product[engaged]]).duplicated()]
    c = int(ev.ts[first[np.searchsorted(first, int(len(ev) * 0.6))]])
    assert (ev.ts < c).any() and (ev.ts > c).any()
    return c


def with_events(ds: Dataset, user, product, etype, ts, position) -> Dataset:
    order = np.argsort(ts, kind="stable")
    ev = EventLog(
        np.asarray(user, np.int32)[order],
        np.asarray(product, np.int32)[order],
        np.asarray(etype, np.int8)[order],
        np.asarray(ts, np.int64)[order],
        np.asarray(position, np.int16)[order],
    )
    assert np.all(np.diff(ev.ts) >= 0)
    return dataclasses.replace(ds, events=ev)


def shifted_future(ds: Dataset, cutoff: int) -> Dataset:
    """Every event at or after the cutoff moved 30 days later (the arrays stay sorted)."""
    ev = ds.events
    ts = np.where(ev.ts >= cutoff, ev.ts + 30 * DAY, ev.ts)
    return with_events(ds, ev.user, ev.product, ev.etype, ts, ev.position)


def scrambled_future(ds: Dataset, cutoff: int) -> Dataset:
    """Every event at or after the cutoff replaced by a random event at the same time (a different future)."""
    ev = ds.events
    rng = np.random.default_rng(1)
    fut = ev.ts >= cutoff
    n = int(fut.sum())
    user, product, etype, pos = ev.user.copy(), ev.product.copy(), ev.etype.copy(), ev.position.copy()
    user[fut] = rng.integers(0, ds.n_users, n)
    product[fut] = rng.integers(0, ds.n_products, n)
    etype[fut] = rng.integers(0, len(ETYPE), n)
    pos[fut] = rng.integers(0, 6, n)
    return with_events(ds, user, product, etype, ev.ts, pos)


def sample_pairs(ds: Dataset, cutoff: int, n: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Random pairs plus pairs with history on both sides of the cutoff (where leakage would show)."""
    rng = np.random.default_rng(0)
    ev = ds.events
    near = np.flatnonzero((ev.ts >= cutoff - 30 * DAY) & (ev.ts < cutoff + 30 * DAY))
    pick = rng.choice(near, n // 2, replace=False)
    users = np.r_[rng.integers(0, ds.n_users, n // 2), ev.user[pick]].astype(np.int64)
    products = np.r_[rng.integers(0, ds.n_products, n // 2), ev.product[pick]].astype(np.int64)
    return users, products


def sorted_held(snap: Snapshot) -> pd.DataFrame:
    return snap.held.sort_values(["user", "product"]).reset_index(drop=True)


def assert_same_snapshot(a: Snapshot, b: Snapshot) -> None:
    assert_frame_equal(a.users, b.users)
    assert_frame_equal(a.products, b.products)
    assert a.user_numeric == b.user_numeric and a.user_categorical == b.user_categorical
    assert a.product_numeric == b.product_numeric and a.product_categorical == b.product_categorical
    assert_frame_equal(sorted_held(a), sorted_held(b))
    assert np.array_equal(a.category_affinity, b.category_affinity)


# --------------------------------------------------------------------------- point in time


@pytest.mark.parametrize("future", [shifted_future, scrambled_future], ids=["shifted_30d", "scrambled"])
def test_features_at_cutoff_ignore_events_at_or_after_it(ds: Dataset, cutoff: int, future) -> None:
    base = FeatureBuilder(ds, PROTECTED)
    other_ds = future(ds, cutoff)
    assert not np.array_equal(other_ds.events.ts, ds.events.ts) or not np.array_equal(
        other_ds.events.user, ds.events.user
    )
    other = FeatureBuilder(other_ds, PROTECTED)

    snap, snap2 = base.snapshot(cutoff), other.snapshot(cutoff)
    assert_same_snapshot(snap, snap2)
    users, products = sample_pairs(ds, cutoff)
    pairs = base.pair_features(snap, users, products)
    assert len(pairs.columns) > 5 and len(pairs) == len(users)
    assert_frame_equal(pairs, other.pair_features(snap2, users, products))
    assert np.array_equal(base.history(cutoff), other.history(cutoff))
    assert np.array_equal(base.history(cutoff, 5), other.history(cutoff, 5))

    # The comparison is not vacuous: features after the cutoff do see the changed future.
    later = cutoff + 20 * DAY
    assert not base.snapshot(later).users.equals(other.snapshot(later).users)


def test_moving_an_engaged_event_past_the_cutoff_changes_that_customers_features(ds: Dataset, cutoff: int) -> None:
    ev = ds.events
    # The last engaged event (click or later) before the cutoff whose (customer, product) pair has no other
    # engaged event before it, so moving it also empties that slot of the customer's history.
    engaged = np.flatnonzero((ev.ts < cutoff) & np.isin(ev.etype, ENGAGED))
    pair_counts = (
        pd.Series(1, index=pd.MultiIndex.from_arrays([ev.user[engaged], ev.product[engaged]]))
        .groupby(level=[0, 1])
        .transform("sum")
    )
    i = int(engaged[pair_counts.to_numpy() == 1][-1])
    u, p = int(ev.user[i]), int(ev.product[i])
    ts = ev.ts.copy()
    ts[i] = cutoff + DAY
    moved = with_events(ds, ev.user, ev.product, ev.etype, ts, ev.position)

    base, other = FeatureBuilder(ds, PROTECTED), FeatureBuilder(moved, PROTECTED)
    snap, snap2 = base.snapshot(cutoff), other.snapshot(cutoff)
    changed = ~(snap.users.eq(snap2.users) | (snap.users.isna() & snap2.users.isna())).all(axis=1)
    assert changed[u], "moving the customer's engaged event past the cutoff did not change their features"
    assert changed.sum() == 1, f"other customers' features changed too: {np.flatnonzero(changed)[:10]}"
    assert not snap.products.iloc[p].equals(snap2.products.iloc[p])
    pair = base.pair_features(snap, np.array([u]), np.array([p]))
    pair2 = other.pair_features(snap2, np.array([u]), np.array([p]))
    assert not pair.equals(pair2)
    h, h2 = base.history(cutoff), other.history(cutoff)
    assert p in h[u] and p not in h2[u]
    rest = np.arange(ds.n_users) != u
    assert np.array_equal(h[rest], h2[rest])


def test_feature_values_are_point_in_time(ds: Dataset, cutoff: int) -> None:
    """Spot checks against a direct count over the event arrays."""
    fb = FeatureBuilder(ds, PROTECTED)
    snap = fb.snapshot(cutoff)
    ev = ds.events.before(cutoff)
    since = cutoff - 30 * DAY
    clicks_30 = np.bincount(ev.user[(ev.etype == ETYPE["click"]) & (ev.ts >= since)], minlength=ds.n_users)
    np.testing.assert_allclose(snap.users["click_30d"].to_numpy(), np.log1p(clicks_30))
    last = np.full(ds.n_users, -1, dtype=np.int64)
    np.maximum.at(last, ev.user, ev.ts)
    want = np.where(last >= 0, (cutoff - last) / DAY, np.nan)
    np.testing.assert_allclose(snap.users["days_since_last_event"].to_numpy(), want)
    assert "gender" not in snap.users.columns  # protected
    assert (snap.users["days_since_last_event"].dropna() > 0).all()


# --------------------------------------------------------------------------- labels


def tiny_dataset(events: list[tuple[int, int, str, int]], n_users: int = 3, n_products: int = 3) -> Dataset:
    events = sorted(events, key=lambda e: e[3])
    u, p, e, t = zip(*events, strict=True) if events else ((), (), (), ())
    return Dataset(
        path=Path("."),
        users=pd.DataFrame({"user_id": [f"u{i}" for i in range(n_users)]}),
        products=pd.DataFrame({"product_id": [f"p{i}" for i in range(n_products)]}),
        events=EventLog(
            np.asarray(u, np.int32),
            np.asarray(p, np.int32),
            np.asarray([ETYPE[x] for x in e], np.int8),
            np.asarray(t, np.int64),
            np.zeros(len(events), np.int16),
        ),
        fingerprint="tiny",
    )


def test_labels_use_only_the_window_take_the_best_grade_and_drop_zero() -> None:
    start, end = 1_000, 2_000
    events = [
        (0, 0, "approve", start - 1),  # before the window
        (0, 0, "click", start),  # the window includes start
        (0, 0, "impression", start + 5),
        (0, 0, "apply", end),  # the window excludes end
        (0, 1, "impression", start + 10),  # grade 0 only: dropped
        (0, 1, "close", start + 11),  # grade 0
        (1, 0, "click", start + 20),
        (1, 0, "approve", start + 30),
        (1, 0, "view", start + 40),  # a later, lower grade does not lower the pair's grade
        (1, 2, "apply", end - 1),
        (2, 1, "hold", start - 100),  # before
        (2, 2, "view", end + 100),  # after
    ]
    grades = {"impression": 0, "view": 1, "click": 2, "apply": 3, "decline": 3, "approve": 4, "hold": 4, "close": 0}
    fb = FeatureBuilder(tiny_dataset(events))
    lab = fb.labels(start, end, grades)
    got = {(int(r.user), int(r.product)): int(r.grade) for r in lab.itertuples()}
    assert got == {(0, 0): 2, (1, 0): 4, (1, 2): 3}
    assert list(lab.columns) == ["user", "product", "grade"]
    # Grades are configuration: the same events with view worth nothing and click worth 5.
    lab2 = fb.labels(start, end, {**grades, "click": 5})
    assert {(int(r.user), int(r.product)): int(r.grade) for r in lab2.itertuples()} == {(0, 0): 5, (1, 0): 5, (1, 2): 3}
    assert fb.labels(end + 200, end + 300, grades).empty


def test_shown_and_history_on_a_tiny_log() -> None:
    events = [
        (0, 0, "impression", 10),
        (0, 1, "click", 20),
        (0, 2, "apply", 30),
        (0, 1, "click", 40),  # most recent engagement with product 1
        (1, 2, "view", 50),  # a view is not an engagement
        (2, 0, "click", 100),  # at the cutoff: excluded
    ]
    fb = FeatureBuilder(tiny_dataset(events))
    hist = fb.history(100, length=3)
    assert hist.tolist() == [[1, 2, -1], [-1, -1, -1], [-1, -1, -1]]
    assert fb.history(101, length=1).tolist() == [[1], [-1], [0]]
    shown = fb.shown(0, 100)
    assert shown[["user", "product"]].values.tolist() == [[0, 0]]


# --------------------------------------------------------------------------- temporal split


def assert_valid_split(sp: TemporalSplit, start: int, last: int, windows: int) -> None:
    assert sp.start == start and sp.end == last + 1
    cuts = sp.retrieval_cutoffs
    assert 1 <= len(cuts) <= windows
    assert sp.start < cuts[0]
    assert all(a < b for a, b in zip(cuts, cuts[1:], strict=False))
    assert cuts[-1] < sp.rank_cutoff < sp.eval_cutoff < sp.end
    assert sp.label_seconds > 0
    # Label windows never reach into the next stage's window.
    assert cuts[-1] + sp.label_seconds <= sp.rank_cutoff
    assert sp.rank_cutoff + sp.label_seconds <= sp.eval_cutoff


@pytest.mark.parametrize("days", [3650, 400, 240, 181, 90, 30, 10, 1])
def test_split_plan_orders_cutoffs(days: int) -> None:
    start = 1_704_067_200
    last = start + days * DAY
    sp = TemporalSplit.plan(start, last)
    assert_valid_split(sp, start, last, 4)
    if days >= 240:  # long enough for the configured windows: they are used as given
        assert sp.end - sp.eval_cutoff == 60 * DAY and sp.label_seconds == 60 * DAY
    else:  # shorter spans shrink every window in proportion
        assert sp.label_seconds == pytest.approx(0.2 * (days * DAY + 1), abs=1)
    d = json.loads(json.dumps(sp.to_dict()))  # how a model bundle stores it
    assert TemporalSplit(**{**d, "retrieval_cutoffs": tuple(d["retrieval_cutoffs"])}) == sp


@settings(max_examples=200, deadline=None)
@given(
    span=st.integers(3_600, 5 * 365 * DAY),
    eval_days=st.floats(1, 120),
    label_days=st.floats(1, 120),
    windows=st.integers(1, 24),
)
def test_split_plan_is_valid_for_any_span_of_an_hour_or_more(span, eval_days, label_days, windows) -> None:
    start = 1_600_000_000
    sp = TemporalSplit.plan(start, start + span, eval_days, label_days, windows)
    assert_valid_split(sp, start, start + span, windows)


# --------------------------------------------------------------------------- required columns only


def write_minimal(path: Path, n_users: int = 120, n_products: int = 15, n_events: int = 400, days: int = 60) -> Path:
    rng = np.random.default_rng(3)
    path.mkdir(parents=True)
    pd.DataFrame({"user_id": [f"C-{i}" for i in range(1, n_users + 1)]}).to_csv(path / "users.csv", index=False)
    pd.DataFrame({"product_id": [f"P-{i}" for i in range(1, n_products + 1)]}).to_csv(
        path / "products.csv", index=False
    )
    ts = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(np.sort(rng.uniform(0, days * DAY, n_events)), "s")
    pd.DataFrame(
        {
            "user_id": [f"C-{i}" for i in rng.integers(1, n_users + 1, n_events)],
            "product_id": [f"P-{i}" for i in rng.integers(1, n_products + 1, n_events)],
            "event_type": rng.choice(["impression", "view", "click", "apply", "approve"], n_events),
            "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    ).to_csv(path / "events.csv", index=False)
    return path


def test_required_columns_only_gives_behaviour_and_demand_features(tmp_path: Path) -> None:
    ds = load_dataset(write_minimal(tmp_path / "d"))
    assert list(ds.users.columns) == ["user_id"] and list(ds.products.columns) == ["product_id"]
    assert ds.users["user_id"].iloc[0] == "C-1"
    fb = FeatureBuilder(ds, PROTECTED)
    start, last = ds.time_range
    for cutoff in (start, (start + last) // 2, last + 1):
        snap = fb.snapshot(cutoff)
        assert len(snap.users) == ds.n_users and len(snap.products) == ds.n_products
        assert snap.user_categorical == [] and snap.product_categorical == []
        assert {"click_30d", "days_since_last_event", "n_held"} <= set(snap.users.columns)
        assert {"impressions", "ctr", "holders"} <= set(snap.products.columns)
        for profile in ("age", "income", "credit_score", "region", "tenure_days"):
            assert profile not in snap.users.columns
        for attr in ("category", "risk_level", "days_since_launch", "n_regions"):
            assert attr not in snap.products.columns
        assert snap.n_categories == 0
        users = np.arange(ds.n_users, dtype=np.int64)
        pairs = fb.pair_features(snap, users, users % ds.n_products)
        assert len(pairs) == ds.n_users and "pair_clicked" in pairs.columns
        assert "credit_margin" not in pairs.columns and "category_affinity" not in pairs.columns
        space = FeatureSpace.fit(snap)
        assert space.user_dense(snap).shape[0] == ds.n_users
        assert np.isfinite(space.product_dense(snap)).all()
    late = fb.snapshot(last + 1)
    assert late.users["click_365d"].sum() > 0
    assert late.products["clicks"].nunique() > 1  # log shares: products that were clicked stand out


# --------------------------------------------------------------------------- feature space


def test_feature_space_round_trip_and_missing_columns(ds: Dataset, cutoff: int) -> None:
    fb = FeatureBuilder(ds, PROTECTED)
    snap = fb.snapshot(cutoff)
    space = FeatureSpace.fit(snap)
    again = FeatureSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again == space
    assert np.array_equal(space.user_dense(snap), again.user_dense(snap))
    assert np.array_equal(space.product_dense(snap), again.product_dense(snap))
    users, products = sample_pairs(ds, cutoff, 1000)
    pairs = fb.pair_features(snap, users, products)
    cols = list(pairs.columns)
    X = space.tabular(snap, users, products, pairs, cols)
    names, categorical = space.tabular_names(cols)
    assert X.shape == (len(users), len(names)) and X.dtype == np.float32
    assert np.array_equal(X, again.tabular(snap, users, products, pairs, cols), equal_nan=True)
    assert {"user_region", "product_category"} <= set(categorical)
    dense = space.user_dense(snap)
    assert dense.dtype == np.float32 and np.isfinite(dense).all()

    # A column the space knows but the data no longer has: missing, not an error.
    gone_user, gone_product, gone_cat = "click_30d", "ctr", "region"
    lacking = dataclasses.replace(
        snap,
        users=snap.users.drop(columns=[gone_user, gone_cat]),
        products=snap.products.drop(columns=[gone_product]),
    )
    X2 = space.tabular(lacking, users, products, pairs.drop(columns=["pair_clicked"]), cols)
    assert X2.shape == X.shape
    for name in (f"user_{gone_user}", f"user_{gone_cat}", f"product_{gone_product}", "pair_clicked"):
        j = names.index(name)
        assert np.isnan(X2[:, j]).all(), name
        assert not np.isnan(X[:, j]).all(), name
    others = [
        j for j, n in enumerate(names) if n not in {"user_click_30d", "user_region", "product_ctr", "pair_clicked"}
    ]
    assert np.array_equal(X2[:, others], X[:, others], equal_nan=True)
    d2 = space.user_dense(lacking)
    assert d2.shape == dense.shape and np.isfinite(d2).all()
    assert space.product_dense(lacking).shape == space.product_dense(snap).shape


def test_holdings_follow_the_log_order_when_ownership_events_share_a_second() -> None:
    """What a customer holds is the last ownership event in the log (sorted by time, then file order), also
    between events of the same second (day-resolution data); by time alone the pick was not deterministic."""
    events = [  # tiny_dataset sorts stably by time: the list order below is the log order within a second
        (0, 0, "approve", 100), (0, 0, "close", 100),  # approved and closed in the same second: not held
        (0, 1, "close", 100), (0, 1, "hold", 100),  # closed, then held again: held
        (1, 2, "hold", 50), (1, 2, "close", 100), (1, 2, "hold", 100),  # held
        (2, 0, "hold", 100), (2, 0, "close", 100),  # not held
    ]  # fmt: skip
    expected = {0: 1.0, 1: 1.0, 2: 0.0}
    for threads in (1, 2, 4):
        fb = FeatureBuilder(tiny_dataset(events))
        fb.con.execute(f"SET threads TO {threads}")
        held = fb.snapshot(200).users["n_held"]
        assert {u: float(held.iloc[u]) for u in range(3)} == expected, threads
