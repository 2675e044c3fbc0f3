"""Reason codes: the feature -> group mapping, top positive groups per item, the catalogue and its doc page."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from finrec.rules.eligibility import RULES
from finrec.serving.reasons import (
    REASON_CODES,
    RULE_REASONS,
    ReasonMapper,
    describe,
    feature_group,
    rule_reasons,
)

DOC = Path(__file__).parents[2] / "docs" / "reasons.md"

# Every feature the ranker is built from today (builder.py, encoding.py, twostage/model.py), with the group it must
# feed. Categories and counts appear with several names so suffixes cannot fool the patterns.
EXPECTED = {
    "user_age": "LIFE_STAGE",
    "user_income": "LIFE_STAGE",
    "user_credit_score": "LIKELY_APPROVAL",
    "user_risk_tolerance": "RISK_FIT",
    "user_marketing_consent": "ACTIVITY",
    "user_dependants": "LIFE_STAGE",
    "user_tenure_days": "LIFE_STAGE",
    "user_region": "REGIONAL_FIT",
    "user_employment_status": "LIFE_STAGE",
    **{
        f"user_{e}_{w}d": "ACTIVITY"
        for e in ("impression", "view", "click", "apply", "approve", "decline")
        for w in (30, 90, 365)
    },
    "user_days_since_last_event": "ACTIVITY",
    "user_days_since_last_click": "ACTIVITY",
    "user_n_held": "COMPLEMENTS_HOLDINGS",
    "user_holds_credit_card": "COMPLEMENTS_HOLDINGS",
    "user_holds_personal_loan": "COMPLEMENTS_HOLDINGS",
    "user_holds_high_risk_fund": "COMPLEMENTS_HOLDINGS",
    "user_affinity_credit_card": "MATCHES_INTERESTS",
    "user_affinity_mortgage": "MATCHES_INTERESTS",
    "user_affinity_pension": "MATCHES_INTERESTS",
    "product_risk_level": "RISK_FIT",
    "product_apr": "COMPETITIVE_RATE",
    "product_apy": "HIGH_YIELD",
    "product_annual_fee": "LOW_FEES",
    "product_min_credit_score": "LIKELY_APPROVAL",
    "product_min_income": "LIKELY_APPROVAL",
    "product_min_age": "LIFE_STAGE",
    "product_max_age": "LIFE_STAGE",
    "product_n_regions": "REGIONAL_FIT",
    "product_days_since_launch": "NEW_PRODUCT",
    "product_apr_vs_category": "COMPETITIVE_RATE",
    "product_apy_vs_category": "HIGH_YIELD",
    "product_annual_fee_vs_category": "LOW_FEES",
    "product_min_credit_score_vs_category": "LIKELY_APPROVAL",
    "product_min_income_vs_category": "LIKELY_APPROVAL",
    "product_impressions": "POPULAR",
    "product_clicks": "POPULAR",
    "product_applications": "POPULAR",
    "product_approvals": "POPULAR",
    "product_impressions_90d": "POPULAR",
    "product_engaged_90d": "POPULAR",
    "product_ctr": "POPULAR",
    "product_ctr_90d": "POPULAR",
    "product_apply_rate": "POPULAR",
    "product_approval_rate": "LIKELY_APPROVAL",
    "product_holders": "POPULAR",
    "product_category": "MATCHES_INTERESTS",
    "product_provider": "TRUSTED_PROVIDER",
    "credit_margin": "LIKELY_APPROVAL",
    "income_ratio": "LIKELY_APPROVAL",
    "age_margin_min_age": "LIFE_STAGE",
    "age_margin_max_age": "LIFE_STAGE",
    "risk_gap": "RISK_FIT",
    "category_affinity": "MATCHES_INTERESTS",
    "holds_category": "COMPLEMENTS_HOLDINGS",
    "holds_provider": "TRUSTED_PROVIDER",
    "pair_seen": "RECENT_INTEREST",
    "pair_clicked": "RECENT_INTEREST",
    "pair_applied": "RECENT_INTEREST",
    "pair_declined": "RECENT_INTEREST",
    "pair_days_since_seen": "RECENT_INTEREST",
    "retrieval_score": "PERSONAL_MATCH",
    "retrieval_rank": "PERSONAL_MATCH",
    "approval_odds": "LIKELY_APPROVAL",
}
NAMES = list(EXPECTED)


# --------------------------------------------------------------------------- feature -> group


@pytest.mark.parametrize("name", NAMES)
def test_every_known_feature_feeds_its_documented_group(name: str) -> None:
    assert feature_group(name) == EXPECTED[name]


@pytest.mark.parametrize(
    "name", ["shoe_size", "user_favourite_colour", "product_xyz", "", "   ", "user_", "approvals", "user_usage_score"]
)
def test_unmatched_names_fall_back_to_profile_match(name: str) -> None:
    assert feature_group(name) == "PROFILE_MATCH"


def test_bank_extras_with_telling_names_are_still_grouped() -> None:
    assert feature_group("product_monthly_fee") == "LOW_FEES"
    assert feature_group("Product_APR_Intro") == "COMPETITIVE_RATE"  # case does not matter
    assert feature_group("user_dependents") == "LIFE_STAGE"
    assert feature_group("user_launch_promo_seen") != "NEW_PRODUCT"  # launch is a product's, not a customer's


@given(st.text(max_size=40))
def test_feature_group_never_raises_and_returns_a_model_code(name: str) -> None:
    assert REASON_CODES[feature_group(name)].kind == "model"


# --------------------------------------------------------------------------- model reasons


def planted(values: dict[str, float], names: list[str], bias: float = 5.0) -> np.ndarray:
    row = np.zeros(len(names) + 1)
    for name, v in values.items():
        row[names.index(name)] = v
    row[-1] = bias
    return row[None, :]


def test_planted_contributions_give_the_positive_groups_best_first() -> None:
    mapper = ReasonMapper(NAMES)
    c = planted({"risk_gap": 2.0, "product_annual_fee_vs_category": 1.0, "product_apr": -3.0}, NAMES)
    assert mapper.model_reasons(c) == [["RISK_FIT", "LOW_FEES"]]


def test_a_group_is_judged_by_its_total_not_its_best_feature() -> None:
    mapper = ReasonMapper(NAMES)
    # credit_margin alone is the biggest single feature, but approval's total is negative.
    c = planted({"credit_margin": 3.0, "approval_odds": -3.5, "pair_seen": 0.4, "pair_clicked": 0.4}, NAMES)
    assert mapper.model_reasons(c) == [["RECENT_INTEREST"]]


def test_bias_is_ignored_and_all_negative_rows_get_no_reason() -> None:
    mapper = ReasonMapper(NAMES)
    c = planted({"risk_gap": -0.1, "product_ctr": -0.2}, NAMES, bias=100.0)
    assert mapper.model_reasons(c) == [[]]


def test_contributions_without_bias_are_accepted_and_give_the_same_reasons() -> None:
    mapper = ReasonMapper(NAMES)
    c = planted({"product_apy": 1.0, "user_age": 0.5, "holds_provider": 0.7, "retrieval_score": 0.1}, NAMES)
    assert (
        mapper.model_reasons(c[:, :-1]) == mapper.model_reasons(c) == [["HIGH_YIELD", "TRUSTED_PROVIDER", "LIFE_STAGE"]]
    )


def test_max_reasons_caps_the_list() -> None:
    mapper = ReasonMapper(NAMES)
    c = planted({"product_apy": 1.0, "user_age": 0.5, "holds_provider": 0.7}, NAMES)
    assert mapper.model_reasons(c, max_reasons=1) == [["HIGH_YIELD"]]
    assert mapper.model_reasons(c, max_reasons=0) == [[]]
    with pytest.raises(ValueError, match="max_reasons"):
        mapper.model_reasons(c, max_reasons=-1)


@pytest.mark.parametrize("shape", [(2, 2), (2, 5), (4,), (1, 2, 4)])
def test_wrong_width_or_rank_raises(shape: tuple[int, ...]) -> None:
    mapper = ReasonMapper(["risk_gap", "product_apr", "product_ctr"])  # accepts 3 or 4 columns
    with pytest.raises(ValueError, match="3 \\(features\\) or 4"):
        mapper.model_reasons(np.ones(shape))


def test_ties_break_in_catalogue_order() -> None:
    mapper = ReasonMapper(["product_ctr", "risk_gap"])
    assert mapper.model_reasons(np.array([[1.0, 1.0, 0.0]])) == [["RISK_FIT", "POPULAR"]]


def test_real_lightgbm_contributions_name_the_feature_that_drives_the_score() -> None:
    lgb = pytest.importorskip("lightgbm")
    rng = np.random.default_rng(0)
    names = ["risk_gap", "product_annual_fee", "user_xyz"]
    X = rng.normal(size=(400, 3))
    y = -np.abs(X[:, 0]) * 3 + 0.01 * rng.normal(size=400)  # score depends on risk fit only
    booster = lgb.train(
        {"objective": "regression", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
        lgb.Dataset(X, y, feature_name=names),
        num_boost_round=30,
    )
    best = np.array([[0.0, 0.0, 0.0]])  # a perfect risk fit scores above average because of risk_gap
    assert ReasonMapper(names).model_reasons(booster.predict(best, pred_contrib=True), max_reasons=1) == [["RISK_FIT"]]


contrib_cases = st.integers(1, 12).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([*NAMES, "extra_a", "extra_b"]), min_size=n, max_size=n),
        hnp.arrays(
            np.float64,
            st.tuples(st.integers(1, 6), st.sampled_from([n, n + 1])),
            elements=st.floats(-10, 10, allow_nan=False, width=32),
        ),
        st.integers(0, 5),
    )
)


@settings(max_examples=200, deadline=None)
@given(contrib_cases)
def test_reasons_are_distinct_positive_capped_and_the_true_top_groups(case) -> None:
    names, c, k = case
    mapper = ReasonMapper(names)
    codes, totals = mapper.group_contributions(c)
    reasons = mapper.model_reasons(c, max_reasons=k)
    assert len(reasons) == len(c)
    n = len(names)
    for i, got in enumerate(reasons):
        by_code = dict(zip(codes, totals[i], strict=True))
        assert len(got) == len(set(got)) <= k
        sums = [by_code[g] for g in got]
        assert all(s > 0 for s in sums)
        assert sums == sorted(sums, reverse=True)
        # Nothing left out beats what was given, and a short list means no positive group was left out.
        left_out = [v for code, v in by_code.items() if code not in got]
        if got:
            assert all(v <= sums[-1] for v in left_out)
        if len(got) < k:
            assert all(v <= 0 for v in left_out)
        # Each returned total is its features' contributions summed, bias excluded.
        for code in got:
            own = sum(c[i, j] for j in range(n) if feature_group(names[j]) == code)
            assert np.isclose(by_code[code], own)


def test_group_totals_equal_the_sum_of_their_features() -> None:
    names = ["risk_gap", "product_risk_level", "product_apr", "shoe_size"]
    c = np.array([[1.0, 2.0, -4.0, 0.5, 9.0]])
    codes, totals = ReasonMapper(names).group_contributions(c)
    assert dict(zip(codes, totals[0], strict=True)) == {"RISK_FIT": 3.0, "COMPETITIVE_RATE": -4.0, "PROFILE_MATCH": 0.5}


# --------------------------------------------------------------------------- catalogue, rules, describe


def test_codes_are_unique_upper_snake_with_short_plain_text() -> None:
    assert all(key == r.code for key, r in REASON_CODES.items())
    for r in REASON_CODES.values():
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", r.code)
        assert r.kind in ("model", "rule")
        assert 0 < len(r.text) <= 80 and r.text == r.text.strip() and not r.text.endswith(".")
        assert "_" not in r.text  # never leak a feature name to a customer
    assert len({r.text for r in REASON_CODES.values()}) == len(REASON_CODES)


def test_every_rule_reason_is_a_rule_code_and_covers_every_customer_facing_rule() -> None:
    assert set(RULE_REASONS) == set(RULES) - {"launched"}
    for code in RULE_REASONS.values():
        assert REASON_CODES[code].kind == "rule"


def test_rule_reasons_follow_rule_order_and_launched_is_silent() -> None:
    assert rule_reasons(["suitability", "launched", "credit"]) == [
        "MEETS_CREDIT_REQUIREMENT",
        "SUITABLE_FOR_RISK_PROFILE",
    ]
    assert rule_reasons([]) == []
    with pytest.raises(ValueError, match="unknown eligibility rule"):
        rule_reasons(["credit", "horoscope"])


def test_describe_gives_api_dicts_and_rejects_unknown_codes() -> None:
    assert describe(["LOW_FEES", "AVAILABLE_IN_REGION"]) == [
        {"code": "LOW_FEES", "text": REASON_CODES["LOW_FEES"].text, "kind": "model"},
        {"code": "AVAILABLE_IN_REGION", "text": REASON_CODES["AVAILABLE_IN_REGION"].text, "kind": "rule"},
    ]
    with pytest.raises(ValueError, match="NOT_A_CODE"):
        describe(["NOT_A_CODE"])


def test_doc_page_lists_every_code_with_its_text_and_kind() -> None:
    doc = DOC.read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\|\s*`([A-Z_]+)`\s*\|.*$", doc, flags=re.MULTILINE)}
    assert set(rows) == set(REASON_CODES), "docs/reasons.md and REASON_CODES disagree"
    for code, r in REASON_CODES.items():
        assert r.kind in rows[code] and r.text in rows[code], code


def test_a_reason_whose_text_the_values_contradict_is_not_given() -> None:
    """'Low fees' for a card whose fee is above its category's mean would be false: the next reason takes its place."""
    names = ["product_annual_fee_vs_category", "product_apr_vs_category", "risk_gap"]
    mapper = ReasonMapper(names)
    contrib = np.array([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1]])
    features = np.array([[1.2, -0.3, 0.0], [-0.5, 0.8, 0.0]])  # row 0: dear fee, cheap APR; row 1: the reverse
    expected = [["COMPETITIVE_RATE", "RISK_FIT"], ["LOW_FEES", "RISK_FIT"]]
    assert mapper.model_reasons(contrib, features=features) == expected
    missing = np.array([[np.nan, np.nan, -1.0]])
    assert mapper.model_reasons(contrib[:1], features=missing) == [["RISK_FIT"]]  # an unverifiable claim is not made
    too_risky = np.array([[-0.5, -0.3, 2.0]])  # risk two levels above tolerance: "fits your risk tolerance" is false
    assert "RISK_FIT" not in mapper.model_reasons(contrib[:1], features=too_risky)[0]
    assert mapper.model_reasons(contrib[:1])[0][0] == "LOW_FEES"  # without values, contributions alone decide
