"""The synthetic world: determinism, funnel consistency and the statistical properties it promises."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from finrec.artifacts import read_manifest
from finrec.data.synthetic import params as P
from finrec.data.synthetic.generate import WorldConfig, generate_world
from finrec.data.synthetic.truth import GroundTruth
from finrec.errors import ArtifactError, FinrecError
from finrec.testing import SMALL_WORLD as SMALL

TABLE_FILES = ("users.parquet", "products.parquet", "events.parquet", "ground_truth/users/part-00000.parquet",
               "ground_truth/products.parquet", "ground_truth/world.json")  # fmt: skip


def _digest(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in TABLE_FILES}


def _con(world: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for t in ("users", "products", "events"):
        con.execute(f"CREATE VIEW {t} AS SELECT * FROM read_parquet('{world / (t + '.parquet')}')")
    return con


# -- determinism ------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(small_world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_world(SMALL, again, progress=False)
    assert _digest(again) == _digest(small_world)


def test_other_seed_gives_other_world(small_world: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate_world(dataclasses.replace(SMALL, seed=SMALL.seed + 1), other, progress=False)
    a, b = _digest(other), _digest(small_world)
    differ = {k for k in a if a[k] != b[k]}
    assert {"users.parquet", "events.parquet", "products.parquet"} <= differ


# -- contents ---------------------------------------------------------------------------------


def test_manifest_counts_match_tables(small_world: Path) -> None:
    m = read_manifest(small_world, "dataset")
    con = _con(small_world)
    counts = m["metrics"]["counts"]
    assert counts["users"] == con.execute("SELECT count(*) FROM users").fetchone()[0] == SMALL.users
    assert counts["products"] == con.execute("SELECT count(*) FROM products").fetchone()[0] == SMALL.products
    assert counts["events"] == con.execute("SELECT count(*) FROM events").fetchone()[0]
    for path, meta in m["files"].items():
        assert hashlib.sha256((small_world / path).read_bytes()).hexdigest() == meta["sha256"]


def test_catalogue_covers_every_category_and_rules_vary(small_world: Path) -> None:
    con = _con(small_world)
    cats = {r[0] for r in con.execute("SELECT DISTINCT category FROM products").fetchall()}
    assert cats == set(P.CATEGORIES)
    spread = con.execute(
        "SELECT count(DISTINCT min_credit_score), count(DISTINCT apr), count(DISTINCT provider) FROM products"
    ).fetchone()
    assert spread[0] >= 5 and spread[1] >= 10 and spread[2] >= 5


def test_customer_distributions_are_correlated_as_in_life(small_world: Path) -> None:
    u = _con(small_world).execute("SELECT * FROM users").df().dropna()
    assert stats.spearmanr(u["income"], u["credit_score"]).statistic > 0.25
    assert stats.spearmanr(u["age"], u["risk_tolerance"]).statistic < -0.15
    retired = u.loc[u["employment_status"] == "retired", "age"]
    students = u.loc[u["employment_status"] == "student", "age"]
    assert retired.median() > 60 > 30 > students.median()


def test_events_lie_in_the_period_and_funnel_is_consistent(small_world: Path) -> None:
    con = _con(small_world)
    lo, hi = con.execute("SELECT min(timestamp), max(timestamp) FROM events").fetchone()
    start = pd.Timestamp(SMALL.start, tz="UTC")
    assert lo >= start and hi < start + pd.DateOffset(months=SMALL.months)
    # Every later funnel step has the earlier one in the same request, for the same product.
    for later, earlier in (
        ("view", "impression"),
        ("click", "view"),
        ("apply", "click"),
        ("approve", "apply"),
        ("decline", "apply"),
    ):
        orphans = con.execute(f"""
            SELECT count(*) FROM events l WHERE l.event_type = '{later}' AND NOT EXISTS (
              SELECT 1 FROM events e WHERE e.event_type = '{earlier}' AND e.request_id = l.request_id
                AND e.product_id = l.product_id AND e.timestamp <= l.timestamp)""").fetchone()[0]
        assert orphans == 0, f"{orphans} {later} events without a preceding {earlier}"
    # A request is one customer's; ids are unique.
    assert (
        con.execute(
            "SELECT count(*) FROM (SELECT request_id FROM events WHERE request_id IS NOT NULL "
            "GROUP BY 1 HAVING count(DISTINCT user_id) > 1)"
        ).fetchone()[0]
        == 0
    )
    assert con.execute("SELECT count(*) - count(DISTINCT event_id) FROM events").fetchone()[0] == 0


def test_nobody_ineligible_is_ever_approved(small_world: Path) -> None:
    con = _con(small_world)
    bad = con.execute("""
        SELECT count(*) FROM events e JOIN users u USING (user_id) JOIN products p USING (product_id)
        WHERE e.event_type = 'approve' AND (u.credit_score < p.min_credit_score OR u.income < p.min_income
           OR u.age < p.min_age OR u.age > p.max_age OR e.timestamp::DATE < p.launch_date
           OR (p.regions <> '*' AND NOT list_contains(string_split(p.regions, ','), u.region::VARCHAR)))
    """).fetchone()[0]
    assert bad == 0
    # The same holds against the hidden true profile (missing values in the table hide nothing).
    gt = GroundTruth.load(small_world / "ground_truth")
    ap = con.execute("SELECT user_id, product_id, timestamp FROM events WHERE event_type = 'approve'").df()
    assert len(ap) > 100
    day = (ap["timestamp"] - pd.Timestamp(SMALL.start, tz="UTC")).dt.days.to_numpy()
    assert gt.eligible(gt.user_index(ap["user_id"]), gt.product_index(ap["product_id"]), day).all()


def test_declines_happen_and_approval_rises_with_credit_score(small_world: Path) -> None:
    df = (
        _con(small_world)
        .execute("""
        SELECT u.credit_score, e.event_type = 'approve' AS approved FROM events e
        JOIN users u USING (user_id) JOIN products p USING (product_id)
        WHERE e.event_type IN ('approve', 'decline')
          AND p.category IN ('credit_card', 'personal_loan', 'auto_loan', 'mortgage')
          AND u.credit_score IS NOT NULL
    """)
        .df()
    )
    df["band"] = pd.qcut(df["credit_score"], 4, labels=False, duplicates="drop")
    rate = df.groupby("band")["approved"].mean().to_numpy()
    assert np.all(np.diff(rate) > 0), rate
    assert 0.1 < 1 - df["approved"].mean() < 0.7  # a real share of credit applications is declined


def test_click_through_falls_with_position(small_world: Path) -> None:
    ctr = (
        _con(small_world)
        .execute("""
        SELECT position,
               count(*) FILTER (WHERE event_type = 'click') / count(*) FILTER (WHERE event_type = 'impression')
        FROM events WHERE position IS NOT NULL GROUP BY 1 ORDER BY 1
    """)
        .fetchall()
    )
    rates = np.array([r[1] for r in ctr])
    assert len(rates) == SMALL.slate_size
    assert np.all(np.diff(rates) < 0), rates
    assert rates[0] > 2 * rates[-1]


def test_products_in_one_category_differ_in_conversion(small_world: Path) -> None:
    """Observed: within each category conversion rates differ beyond chance (chi-square)."""
    df = (
        _con(small_world)
        .execute("""
        SELECT p.category, product_id, count(*) FILTER (WHERE event_type = 'impression') AS shown,
               count(*) FILTER (WHERE event_type IN ('click')) AS clicked
        FROM events JOIN products p USING (product_id) GROUP BY ALL HAVING shown > 0
    """)
        .df()
    )
    significant = 0
    for _, g in df.groupby("category"):
        if len(g) < 2:
            continue
        table = np.stack([g["clicked"], g["shown"] - g["clicked"]])
        if stats.chi2_contingency(table).pvalue < 1e-3:
            significant += 1
    assert significant >= 7


def test_true_appeal_is_not_category_alone(small_world: Path) -> None:
    """Truth: much of the variance of mean propensity lies between products of the same category."""
    gt = GroundTruth.load(small_world / "ground_truth")
    users = gt.users["user_id"][:500]
    mean_prop = gt.propensity_matrix(users).mean(axis=0)
    cat = gt.products["category"]
    within = sum(((mean_prop[cat == c] - mean_prop[cat == c].mean()) ** 2).sum() for c in np.unique(cat))
    total = ((mean_prop - mean_prop.mean()) ** 2).sum()
    assert within / total > 0.3
    # ...and customers disagree: the best product differs between customers.
    top = gt.propensity_matrix(users).argmax(axis=1)
    assert len(np.unique(top)) >= 10


def test_generator_follows_its_ground_truth(small_world: Path) -> None:
    """Products' observed click rate per view tracks the truth's mean click probability."""
    con = _con(small_world)
    gt = GroundTruth.load(small_world / "ground_truth")
    views = con.execute("SELECT user_id, product_id, request_id FROM events WHERE event_type = 'view'").df()
    clicks = con.execute(
        "SELECT DISTINCT request_id, product_id, 1 AS clicked FROM events WHERE event_type = 'click'"
    ).df()
    views = views.merge(clicks, on=["request_id", "product_id"], how="left").fillna({"clicked": 0})
    util = gt.utility(gt.user_index(views["user_id"]), gt.product_index(views["product_id"]))
    views["p_click"] = gt.click_prob(util)
    by = views.groupby("product_id")[["clicked", "p_click"]].mean()
    assert stats.spearmanr(by["clicked"], by["p_click"]).statistic > 0.7


def test_ground_truth_round_trip_and_pairwise_equals_matrix(small_world: Path) -> None:
    gt = GroundTruth.load(small_world / "ground_truth")
    users = gt.users["user_id"][:7]
    mat = gt.propensity_matrix(users, month=2)
    uu = np.repeat(users, gt.n_products)
    pp = np.tile(gt.products["product_id"], len(users))
    np.testing.assert_allclose(gt.propensity(uu, pp, month=2).reshape(mat.shape), mat)
    assert ((mat >= 0) & (mat <= 1)).all()
    # Ineligible pairs have zero propensity.
    elig = gt.eligible(gt.user_index(uu), gt.product_index(pp)).reshape(mat.shape)
    assert (mat[~elig] == 0).all() and (mat[elig] > 0).all()
    with pytest.raises(KeyError, match="not in the ground truth"):
        gt.propensity([10**9], [1])


def test_holding_a_category_saturates_it(small_world: Path) -> None:
    gt = GroundTruth.load(small_world / "ground_truth")
    users = gt.users["user_id"][:200]
    none = np.zeros((len(users), P.N_CAT), dtype=np.int8)
    card = none.copy()
    card[:, P.CAT["credit_card"]] = 1
    is_card = gt.products["category"] == P.CAT["credit_card"]
    before = gt.propensity_matrix(users, held=none)[:, is_card].mean()
    after = gt.propensity_matrix(users, held=card)[:, is_card].mean()
    assert after < 0.3 * before


@pytest.mark.slow
def test_drift_shifts_demand_from_deposits_to_loans(tmp_path: Path) -> None:
    base = dataclasses.replace(SMALL, users=8_000, months=8)
    shares = {}
    for name, drift in (("plain", None), ("drift", 5)):
        out = tmp_path / name
        generate_world(dataclasses.replace(base, drift_month=drift, drift_strength=1.5), out, progress=False)
        shares[name] = (
            _con(out)
            .execute("""
            SELECT month(timestamp) >= 5 AS late,
                   avg((category IN ('savings', 'term_deposit'))::INT) AS deposit_share
            FROM events JOIN products USING (product_id) WHERE event_type = 'apply' GROUP BY 1 ORDER BY 1
        """)
            .fetchall()
        )
    (_, plain_early), (_, plain_late) = shares["plain"]
    (_, drift_early), (_, drift_late) = shares["drift"]
    assert drift_early == pytest.approx(plain_early, abs=0.02)  # same seed: identical before the shock
    assert drift_late < plain_late - 0.05


def test_csv_format_holds_the_same_world(tmp_path: Path) -> None:
    cfg = WorldConfig(users=500, products=20, months=2, seed=3)
    generate_world(cfg, tmp_path / "pq", progress=False)
    generate_world(dataclasses.replace(cfg, format="csv"), tmp_path / "csv", progress=False)
    a = pd.read_parquet(tmp_path / "pq" / "events.parquet")
    b = pd.read_csv(tmp_path / "csv" / "events.csv")
    assert len(a) == len(b)
    assert (a["event_type"].astype(str).to_numpy() == b["event_type"].to_numpy()).all()
    assert (pd.to_datetime(b["timestamp"], utc=True).to_numpy() == a["timestamp"].to_numpy()).all()


# -- bad parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"products": 5}, "at least 10"),
        ({"start": "2026-13-01"}, "not a date"),
        ({"start": "2099-01-01"}, "in the future"),
        ({"drift_month": 99}, "--drift-month"),
        ({"missing_rate": 0.9}, "--missing-rate"),
    ],
)
def test_bad_parameters_are_refused_with_a_reason(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(FinrecError, match=message):
        generate_world(dataclasses.replace(SMALL, **change), tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "w"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    cfg = WorldConfig(users=50, products=10, months=1)
    with pytest.raises(ArtifactError, match="--overwrite"):
        generate_world(cfg, out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    generate_world(cfg, out, overwrite=True, progress=False)
    assert not (out / "precious.txt").exists() and (out / "events.parquet").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    users=st.integers(1, 300),
    products=st.integers(10, 40),
    months=st.integers(1, 3),
    slate=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_small_world_is_consistent(
    tmp_path_factory: pytest.TempPathFactory, users: int, products: int, months: int, slate: int, seed: int
) -> None:
    out = tmp_path_factory.mktemp("hyp") / "w"
    cfg = WorldConfig(users=users, products=products, months=months, slate_size=slate, seed=seed)
    summary = generate_world(cfg, out, progress=False)
    con = _con(out)
    assert con.execute("SELECT count(*) FROM users").fetchone()[0] == users
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == summary.counts["events"]
    assert con.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0] <= slate
    unknown = con.execute("""SELECT count(*) FROM events WHERE user_id NOT IN (SELECT user_id FROM users)
                         OR product_id NOT IN (SELECT product_id FROM products)""").fetchone()[0]
    assert unknown == 0
