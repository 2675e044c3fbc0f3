"""Eligibility and suitability rules: each rule on tiny hand-made frames, then a property test.

The property test checks :meth:`ProductRules.allowed` against a slow reference written here in
plain Python, one (customer, product) pair at a time, straight from the rules' documented meaning:

* a rule is active only when both tables have its columns;
* an empty rule value on a product means "no such rule";
* an empty customer attribute that an active rule needs fails it (never guess in the customer's favour).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from finrec.rules.eligibility import RULES, ProductRules, SuitabilityPolicy

NAN = float("nan")
DAY = 86_400


def allowed(users: pd.DataFrame, products: pd.DataFrame, policy: SuitabilityPolicy | None = None, at=None):
    rules = ProductRules.from_frames(users, products, policy)
    return rules.allowed(np.arange(len(users)), at=at)


def failures(users: pd.DataFrame, products: pd.DataFrame, policy: SuitabilityPolicy | None = None, at=None):
    rules = ProductRules.from_frames(users, products, policy)
    return rules.failures(np.arange(len(users)), at=at)


# --------------------------------------------------------------------------- single rules


def test_credit_rule_is_inclusive_and_nan_minimum_means_no_rule() -> None:
    users = pd.DataFrame({"credit_score": [700.0, 600.0, 599.0]})
    products = pd.DataFrame({"min_credit_score": [600.0, NAN, 750.0]})
    assert allowed(users, products).tolist() == [
        [True, True, False],
        [True, True, False],  # exactly the minimum passes
        [False, True, False],
    ]
    fail = failures(users, products)
    assert set(fail) == {"credit"}


def test_income_rule() -> None:
    users = pd.DataFrame({"income": [30_000.0, 80_000.0, 0.0]})
    products = pd.DataFrame({"min_income": [50_000.0, 30_000.0, NAN]})
    assert allowed(users, products).tolist() == [
        [False, True, True],
        [True, True, True],
        [False, False, True],
    ]
    assert set(failures(users, products)) == {"income"}


def test_min_and_max_age_inclusive() -> None:
    users = pd.DataFrame({"age": [17.0, 18.0, 40.0, 65.0, 66.0]})
    products = pd.DataFrame({"min_age": [18.0, NAN, 18.0], "max_age": [NAN, 65.0, 65.0]})
    assert allowed(users, products).tolist() == [
        [False, True, False],
        [True, True, True],
        [True, True, True],
        [True, True, True],
        [True, False, False],
    ]
    assert set(failures(users, products)) == {"age"}


def test_min_age_alone() -> None:
    users = pd.DataFrame({"age": [17.0, 30.0]})
    products = pd.DataFrame({"min_age": [18.0, NAN]})
    assert allowed(users, products).tolist() == [[False, True], [True, True]]


def test_max_age_alone() -> None:
    users = pd.DataFrame({"age": [30.0, 80.0]})
    products = pd.DataFrame({"max_age": [65.0, NAN]})
    rules = ProductRules.from_frames(users, products)
    assert rules.n_products == 2
    assert rules.allowed(np.arange(2)).tolist() == [[True, True], [False, True]]


def test_region_rule_star_lists_unknown_and_missing_regions() -> None:
    users = pd.DataFrame({"region": ["N", "S", "X", None, NAN]})  # X: a region no product lists
    products = pd.DataFrame({"regions": ["*", "N", "S, N", None, "N,E"]})  # None: offered everywhere
    assert allowed(users, products).tolist() == [
        [True, True, True, True, True],
        [True, False, True, True, False],
        [True, False, False, True, False],
        [True, False, False, True, False],
        [True, False, False, True, False],
    ]
    assert set(failures(users, products)) == {"region"}


def test_region_rule_inactive_when_every_product_is_everywhere() -> None:
    users = pd.DataFrame({"region": ["N", None]})
    products = pd.DataFrame({"regions": ["*", None], "min_income": [NAN, NAN]})
    assert allowed(users, products).all()
    assert "region" not in failures(users, products)


def test_launch_date_removes_products_launched_after_at() -> None:
    t = 1_700_000_000
    users = pd.DataFrame({"age": [30.0]})
    products = pd.DataFrame({"launch_date": [float(t - DAY), float(t), float(t + 1), NAN]})
    assert allowed(users, products, at=t).tolist() == [[True, True, False, True]]
    assert "launched" in failures(users, products, at=t)
    # Without a time there is nothing to compare with: no launch rule.
    assert allowed(users, products).all()
    assert "launched" not in failures(users, products)


def test_suitability_applies_only_to_configured_categories() -> None:
    users = pd.DataFrame({"risk_tolerance": [2.0, 5.0, NAN]})
    products = pd.DataFrame(
        {
            "category": ["investment_fund", "pension", "credit_card", "investment_fund"],
            "risk_level": [4.0, 2.0, 5.0, NAN],
        }
    )
    assert allowed(users, products).tolist() == [
        [False, True, True, True],  # the credit card's risk level is not about suitability
        [True, True, True, True],
        [False, False, True, True],  # missing tolerance fails every product the rule applies to
    ]
    assert set(failures(users, products)) == {"suitability"}


def test_suitability_categories_none_applies_to_every_product_with_a_risk_level() -> None:
    users = pd.DataFrame({"risk_tolerance": [2.0]})
    products = pd.DataFrame({"category": ["investment_fund", "credit_card", "savings"], "risk_level": [3.0, 5.0, NAN]})
    policy = SuitabilityPolicy(categories=None)
    assert allowed(users, products, policy).tolist() == [[False, False, True]]
    # categories=None also works without a category column.
    assert allowed(users, products[["risk_level"]], policy).tolist() == [[False, False, True]]


def test_suitability_max_above_tolerance() -> None:
    users = pd.DataFrame({"risk_tolerance": [2.0]})
    products = pd.DataFrame({"category": ["pension"] * 4, "risk_level": [2.0, 3.0, 4.0, 5.0]})
    assert allowed(users, products, SuitabilityPolicy(max_above_tolerance=0)).tolist() == [[True, False, False, False]]
    assert allowed(users, products, SuitabilityPolicy(max_above_tolerance=1)).tolist() == [[True, True, False, False]]
    assert allowed(users, products, SuitabilityPolicy(max_above_tolerance=2)).tolist() == [[True, True, True, False]]


def test_missing_user_attribute_fails_each_active_rule() -> None:
    users = pd.DataFrame({"credit_score": [NAN], "income": [NAN], "age": [NAN], "region": [None]})
    products = pd.DataFrame(
        {
            "min_credit_score": [500.0, NAN, NAN, NAN, NAN, NAN],
            "min_income": [NAN, 1.0, NAN, NAN, NAN, NAN],
            "min_age": [NAN, NAN, 18.0, NAN, NAN, NAN],
            "max_age": [NAN, NAN, NAN, 99.0, NAN, NAN],
            "regions": ["*", "*", "*", "*", "N", "*"],
        }
    )
    assert allowed(users, products).tolist() == [[False, False, False, False, False, True]]
    fail = failures(users, products)
    assert fail["credit"].tolist() == [[True, False, False, False, False, False]]
    assert fail["income"].tolist() == [[False, True, False, False, False, False]]
    assert fail["age"].tolist() == [[False, False, True, True, False, False]]
    assert fail["region"].tolist() == [[False, False, False, False, True, False]]


def test_rule_whose_user_column_is_absent_is_inactive() -> None:
    users = pd.DataFrame({"age": [30.0]})  # no credit_score, income, region or risk_tolerance column
    products = pd.DataFrame(
        {
            "min_credit_score": [900.0],
            "min_income": [1e9],
            "regions": ["nowhere"],
            "category": ["pension"],
            "risk_level": [5.0],
            "min_age": [18.0],
        }
    )
    fail = failures(users, products)
    assert set(fail) == {"age"}
    assert allowed(users, products).tolist() == [[True]]


def test_rule_whose_product_column_is_absent_is_inactive() -> None:
    users = pd.DataFrame({"credit_score": [NAN], "income": [NAN], "age": [NAN], "risk_tolerance": [NAN]})
    products = pd.DataFrame({"launch_date": [0.0, 0.0]})
    assert set(failures(users, products, at=10)) == {"launched"}
    assert allowed(users, products, at=10).tolist() == [[True, True]]


def test_failures_keys_are_rules_and_allowed_is_their_conjunction() -> None:
    rng = np.random.default_rng(0)
    n_users, n_products = 50, 30
    users = pd.DataFrame(
        {
            "credit_score": np.where(rng.random(n_users) < 0.1, NAN, rng.integers(300, 850, n_users)),
            "income": np.where(rng.random(n_users) < 0.1, NAN, rng.integers(0, 100_000, n_users)),
            "age": np.where(rng.random(n_users) < 0.1, NAN, rng.integers(16, 90, n_users)),
            "risk_tolerance": np.where(rng.random(n_users) < 0.1, NAN, rng.integers(1, 6, n_users)),
            "region": rng.choice(np.array(["N", "S", "E", None], dtype=object), n_users),
        }
    )
    products = pd.DataFrame(
        {
            "min_credit_score": np.where(rng.random(n_products) < 0.4, NAN, rng.integers(300, 800, n_products)),
            "min_income": np.where(rng.random(n_products) < 0.4, NAN, rng.integers(0, 80_000, n_products)),
            "min_age": np.where(rng.random(n_products) < 0.4, NAN, rng.integers(16, 30, n_products)),
            "max_age": np.where(rng.random(n_products) < 0.4, NAN, rng.integers(50, 90, n_products)),
            "regions": rng.choice(np.array(["*", "N", "S,E", None], dtype=object), n_products),
            "launch_date": rng.integers(0, 100, n_products).astype(float),
            "category": rng.choice(["pension", "savings", "investment_fund"], n_products),
            "risk_level": rng.integers(1, 6, n_products).astype(float),
        }
    )
    rules = ProductRules.from_frames(users, products)
    idx = np.arange(n_users)
    fail = rules.failures(idx, at=50)
    assert set(fail) <= set(RULES)
    assert set(fail) == set(RULES)  # every rule is active on these frames
    expected = np.ones((n_users, n_products), dtype=bool)
    for name, f in fail.items():
        assert f.shape == (n_users, n_products) and f.dtype == bool, name
        assert f.any(), f"rule {name} removed nothing: the frames do not exercise it"
        expected &= ~f
    got = rules.allowed(idx, at=50)
    assert np.array_equal(got, expected)
    # A subset of users in any order gives the matching rows.
    sub = np.array([7, 3, 3, 0])
    assert np.array_equal(rules.allowed(sub, at=50), got[sub])


# --------------------------------------------------------------------------- property: the reference


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def reference_allowed(
    users: pd.DataFrame, products: pd.DataFrame, policy: SuitabilityPolicy, at: int | None
) -> np.ndarray:
    """Slow, pair-by-pair reading of the rules."""
    out = np.ones((len(users), len(products)), dtype=bool)
    for i in range(len(users)):
        u = users.iloc[i]
        for j in range(len(products)):
            p = products.iloc[j]
            ok = True

            def minimum(user_col: str, product_col: str, u=u, p=p) -> bool:
                if user_col not in users.columns or product_col not in products.columns:
                    return True
                rule = p[product_col]
                if _missing(rule):
                    return True
                value = u[user_col]
                return not _missing(value) and value >= rule

            ok &= minimum("credit_score", "min_credit_score")
            ok &= minimum("income", "min_income")
            ok &= minimum("age", "min_age")
            if "age" in users.columns and "max_age" in products.columns and not _missing(p["max_age"]):
                ok &= not _missing(u["age"]) and u["age"] <= p["max_age"]
            if "region" in users.columns and "regions" in products.columns:
                spec = p["regions"]
                if not _missing(spec) and spec.strip() != "*":
                    offered = {r.strip() for r in spec.split(",")}
                    ok &= not _missing(u["region"]) and u["region"] in offered
            if at is not None and "launch_date" in products.columns and not _missing(p["launch_date"]):
                ok &= p["launch_date"] <= at
            suit_active = (
                "risk_level" in products.columns
                and "risk_tolerance" in users.columns
                and (policy.categories is None or "category" in products.columns)
            )
            if suit_active and not _missing(p["risk_level"]):
                applies = policy.categories is None or p["category"] in policy.categories
                if applies:
                    tol = u["risk_tolerance"]
                    ok &= not _missing(tol) and p["risk_level"] <= tol + policy.max_above_tolerance
            out[i, j] = ok
    return out


REGIONS = ["N", "S", "E", "W"]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[pd.DataFrame, pd.DataFrame, SuitabilityPolicy, int | None]:
    n_users = draw(st.integers(1, 6))
    n_products = draw(st.integers(1, 6))

    def num(lo: int, hi: int) -> st.SearchStrategy:
        # Small integer ranges make ties (value == minimum) common.
        return st.one_of(st.just(NAN), st.integers(lo, hi).map(float))

    def column(strategy: st.SearchStrategy, n: int) -> list:
        return draw(st.lists(strategy, min_size=n, max_size=n))

    user_cols = {
        "credit_score": num(0, 4),
        "income": num(0, 4),
        "age": num(15, 20),
        "risk_tolerance": num(1, 5),
        "region": st.sampled_from([*REGIONS, "X", None, NAN]),
    }
    region_lists = st.lists(st.sampled_from(REGIONS), min_size=1, max_size=3, unique=True)
    product_cols = {
        "min_credit_score": num(0, 4),
        "min_income": num(0, 4),
        "min_age": num(15, 20),
        "max_age": num(15, 20),
        "regions": st.one_of(
            st.sampled_from(["*", None]),
            st.tuples(region_lists, st.sampled_from([",", ", "])).map(lambda t: t[1].join(t[0])),
        ),
        "category": st.sampled_from(["investment_fund", "pension", "savings", None]),
        "risk_level": num(1, 5),
    }
    chosen_users = draw(st.sets(st.sampled_from(sorted(user_cols)), min_size=1))
    chosen_products = draw(st.sets(st.sampled_from(sorted(product_cols))))
    users = pd.DataFrame({c: column(user_cols[c], n_users) for c in sorted(chosen_users)})
    for c in ("credit_score", "income", "age", "risk_tolerance"):
        if c in users:
            users[c] = users[c].astype(float)
    if "region" in users:
        users["region"] = users["region"].astype(object)
    products = pd.DataFrame(index=pd.RangeIndex(n_products))
    if draw(st.booleans()):
        products["launch_date"] = column(num(0, 4), n_products)
    for c in sorted(chosen_products):
        products[c] = column(product_cols[c], n_products)
        if c not in ("regions", "category"):
            products[c] = products[c].astype(float)
        else:
            products[c] = products[c].astype(object)
    categories = draw(st.sampled_from([None, ("investment_fund", "pension"), ("savings",)]))
    policy = SuitabilityPolicy(categories=categories, max_above_tolerance=draw(st.integers(0, 2)))
    at = draw(st.one_of(st.none(), st.integers(0, 4)))
    return users, products, policy, at


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_allowed_matches_pair_by_pair_reference(world) -> None:
    users, products, policy, at = world
    rules = ProductRules.from_frames(users, products, policy)
    got = rules.allowed(np.arange(len(users)), at=at)
    want = reference_allowed(users, products, policy, at)
    assert got.shape == want.shape
    leaked = np.argwhere(got & ~want)
    assert not len(leaked), (
        f"ineligible/unsuitable (user, product) pairs allowed: {leaked.tolist()}\n{users}\n{products}\n{policy} at={at}"
    )
    blocked = np.argwhere(~got & want)
    assert not len(blocked), f"eligible pairs blocked: {blocked.tolist()}\n{users}\n{products}\n{policy} at={at}"


@given(worlds())
def test_one_profile_gets_the_rules_of_its_row(world) -> None:
    """``with_profile`` (a request's one customer, no frame) removes what the customer's row of the frame does."""
    users, products, policy, at = world
    rules = ProductRules.from_frames(users, products, policy)
    for row in range(len(users)):
        profile = {c: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                   for c, v in users.iloc[row].items()}  # fmt: skip
        got = rules.with_profile(profile).failures(np.array([0]), at=at)
        want = rules.failures(np.array([row]), at=at)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name}, row {row}: {profile}")
