"""Why was this product recommended? Stable reason codes with plain-language text.

A customer shown a card or a loan is owed a reason they can understand, and
the bank needs one it can audit and keep answering the same way for years.
Raw feature names cannot do this: they change with every dataset, and "0.31 on
``product_annual_fee_vs_category``" means nothing to a customer. So every
reason is a **code** from a fixed catalogue (:data:`REASON_CODES`) with one
short sentence. Codes are published once and never renamed or reused; new ones
may be added.

Two kinds of reasons:

* **model** reasons say what drove the ranker's score. LightGBM's
  ``predict(X, pred_contrib=True)`` splits each score into one additive
  contribution per feature (plus a bias). :class:`ReasonMapper` sums these per
  reason group and keeps the groups with the largest *positive* totals: a group
  that pushed the score down is never given as a reason for it.
* **rule** reasons say which eligibility and suitability rules the product
  passed for this customer (:data:`RULE_REASONS`, :func:`rule_reasons`).

Features map to groups by name (:func:`feature_group`), because a bank's own
data adds columns we cannot list in advance. The patterns below are tried in
order on the lower-cased name and the first match wins; anything unmatched
falls back to ``PROFILE_MATCH``. Order matters where names overlap: holdings
and affinity come first because their suffix is a category name (``user_holds_credit_card``
is about holdings, not credit), and ``LIKELY_APPROVAL`` comes before ``POPULAR`` so
``product_approval_rate`` counts as approval while ``product_approvals`` counts as demand.

Examples
--------
>>> feature_group("user_holds_credit_card"), feature_group("product_apr_vs_category"), feature_group("shoe_size")
('COMPLEMENTS_HOLDINGS', 'COMPETITIVE_RATE', 'PROFILE_MATCH')
>>> mapper = ReasonMapper(["risk_gap", "product_annual_fee", "product_apr"])
>>> mapper.model_reasons(np.array([[0.5, 0.2, -0.9, 1.0]]))  # last column: bias, ignored
[['RISK_FIT', 'LOW_FEES']]
>>> [r["text"] for r in describe(["RISK_FIT"])]
['Fits your risk tolerance']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from finrec.rules.eligibility import RULES

FALLBACK = "PROFILE_MATCH"


@dataclass(frozen=True)
class ReasonCode:
    """One published reason: a stable code, the sentence shown to the customer, and its kind."""

    code: str
    text: str
    kind: Literal["model", "rule"]


def _catalogue(*entries: tuple[str, str, Literal["model", "rule"]]) -> dict[str, ReasonCode]:
    return {code: ReasonCode(code, text, kind) for code, text, kind in entries}


#: Every reason code. Append only: a published code is never renamed, reworded in meaning, or reused.
REASON_CODES: dict[str, ReasonCode] = _catalogue(
    ("RISK_FIT", "Fits your risk tolerance", "model"),
    ("LOW_FEES", "Low fees compared with similar products", "model"),
    ("COMPETITIVE_RATE", "Competitive borrowing rate compared with similar products", "model"),
    ("HIGH_YIELD", "Good return on your money compared with similar products", "model"),
    ("LIKELY_APPROVAL", "You are likely to qualify", "model"),
    ("MATCHES_INTERESTS", "Matches the kinds of products you have shown interest in", "model"),
    ("COMPLEMENTS_HOLDINGS", "Complements the products you already hold", "model"),
    ("TRUSTED_PROVIDER", "From a provider you already bank with", "model"),
    ("PERSONAL_MATCH", "Chosen for customers with interests like yours", "model"),
    ("RECENT_INTEREST", "You have looked at this product before", "model"),
    ("POPULAR", "Popular with our customers", "model"),
    ("LIFE_STAGE", "Suits your stage of life", "model"),
    ("NEW_PRODUCT", "A new product", "model"),
    ("ACTIVITY", "Based on how you use your accounts with us", "model"),
    ("REGIONAL_FIT", "A good fit for customers in your area", "model"),
    ("PROFILE_MATCH", "Fits your overall profile", "model"),
    ("MEETS_CREDIT_REQUIREMENT", "You meet the credit score requirement", "rule"),
    ("MEETS_INCOME_REQUIREMENT", "You meet the income requirement", "rule"),
    ("MEETS_AGE_REQUIREMENT", "You meet the age requirement", "rule"),
    ("AVAILABLE_IN_REGION", "Available where you live", "rule"),
    ("SUITABLE_FOR_RISK_PROFILE", "Suitable for your risk profile", "rule"),
)

#: Eligibility rule name -> reason code. ``launched`` has none: every product offered has launched,
#: so it tells the customer nothing about why this product suits them.
RULE_REASONS: dict[str, str] = {
    "credit": "MEETS_CREDIT_REQUIREMENT",
    "income": "MEETS_INCOME_REQUIREMENT",
    "age": "MEETS_AGE_REQUIREMENT",
    "region": "AVAILABLE_IN_REGION",
    "suitability": "SUITABLE_FOR_RISK_PROFILE",
}

# (code, pattern) in priority order, matched with re.search on the lower-cased name. `(^|_)x(_|$)` matches
# x as a whole underscore-separated token, so "apr" does not fire on "approval" nor "apy" on "apply".
_FEATURE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("TRUSTED_PROVIDER", r"^holds_provider$"),
    ("COMPLEMENTS_HOLDINGS", r"^(user_)?holds_|^user_n_held$"),
    ("MATCHES_INTERESTS", r"^user_affinity_|^category_affinity$|^product_category$"),
    ("TRUSTED_PROVIDER", r"(^|_)provider(_|$)"),
    ("PERSONAL_MATCH", r"^retrieval_(score|rank)$"),
    ("RECENT_INTEREST", r"^pair_"),
    ("RISK_FIT", r"(^|_)risk(_|$)"),
    ("LOW_FEES", r"(^|_)fees?(_|$)"),
    ("HIGH_YIELD", r"(^|_)(apy|yield)(_|$)"),
    ("COMPETITIVE_RATE", r"(^|_)apr(_|$)"),
    ("LIKELY_APPROVAL", r"credit_(score|margin)|income_ratio|approval_(odds|rate)|min_income"),
    ("NEW_PRODUCT", r"^product_.*launch"),
    ("POPULAR", r"^product_(ctr|apply_rate|impressions|clicks|applications|approvals|engaged|holders)"),
    ("ACTIVITY", r"^user_(impression|view|click|apply|approve|decline|hold|close)s?_"),
    ("ACTIVITY", r"^user_days_since_|^user_marketing"),
    ("LIFE_STAGE", r"(^|_)(age|income)(_|$)|^age_margin_|^user_(dependants|dependents|employment|tenure)"),
    ("REGIONAL_FIT", r"(^|_)regions?(_|$)"),
)
_COMPILED = tuple((code, re.compile(pattern)) for code, pattern in _FEATURE_PATTERNS)


#: Facts a reason's text asserts, checked against the item's feature values (any one check suffices).
_CLAIMS: dict[str, tuple[tuple[str, str, float], ...]] = {
    "LOW_FEES": (("product_annual_fee_vs_category", "<=", 0.0), ("product_annual_fee", "==", 0.0)),
    "COMPETITIVE_RATE": (("product_apr_vs_category", "<=", 0.0),),
    "HIGH_YIELD": (("product_apy_vs_category", ">=", 0.0),),
    "RISK_FIT": (("risk_gap", "<=", 0.0),),
    "LIKELY_APPROVAL": (("approval_odds", ">=", 0.5), ("credit_margin", ">=", 0.0)),
    "MATCHES_INTERESTS": (("category_affinity", ">", 0.0),),
    "COMPLEMENTS_HOLDINGS": (("user_n_held", ">", 0.0),),
    "TRUSTED_PROVIDER": (("holds_provider", ">", 0.0),),
    "RECENT_INTEREST": (("pair_seen", ">", 0.0), ("pair_clicked", ">", 0.0)),
    "NEW_PRODUCT": (("product_days_since_launch", "<=", 90.0),),
}
_OPS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "<=": np.less_equal, ">=": np.greater_equal, "==": np.equal, ">": np.greater,
}


def feature_group(name: str) -> str:
    """The model reason code a feature feeds.

    Parameters
    ----------
    name
        A ranker feature name; any string (unknown names are expected: banks add their own columns).

    Returns
    -------
    str
        The code of the first pattern in the module's ordered list that matches, else ``"PROFILE_MATCH"``.
        Never raises.
    """
    key = str(name).strip().lower()
    for code, pattern in _COMPILED:
        if pattern.search(key):
            return code
    return FALLBACK


class ReasonMapper:
    """Turns per-feature ranker contributions into the top model reason codes per item.

    The feature -> group mapping is resolved once here, as a (n_features, n_groups) 0/1 matrix, so
    each request is one matrix product and one argsort whatever the number of features.

    Parameters
    ----------
    feature_names
        The ranker's feature names, in the column order of its input (and of ``pred_contrib`` output).
    """

    def __init__(self, feature_names: list[str]) -> None:
        self.feature_names = list(feature_names)
        groups = [feature_group(n) for n in self.feature_names]
        # Catalogue order, so ties between groups break the same way for every model and dataset.
        present = set(groups)
        self.codes = [c for c in REASON_CODES if c in present]
        index = {c: j for j, c in enumerate(self.codes)}
        self.group_index = np.array([index[g] for g in groups], dtype=np.int64)
        #: (n_features + 1, n_groups) 0/1: per-feature contributions (bias last, mapped nowhere) times this are the
        #: group totals.
        self.projection = np.zeros((len(self.feature_names) + 1, len(self.codes)))
        self.projection[np.arange(len(groups)), self.group_index] = 1.0
        col = {n: j for j, n in enumerate(self.feature_names)}
        # Resolved once, as arrays, so a request checks every claim in a few vector operations: each check's
        # feature column, comparison and threshold, and which group it vouches for (any one check suffices).
        claimed = [(self.codes.index(code), checks) for code, checks in _CLAIMS.items() if code in self.codes]
        self._claim_groups = np.array([g for g, _ in claimed], dtype=np.int64)
        checks = [(i, col[name], op, v) for i, (_, cs) in enumerate(claimed) for name, op, v in cs if name in col]
        self._check_col = np.array([c[1] for c in checks], dtype=np.int64)
        self._check_value = np.array([c[3] for c in checks], dtype=np.float64)
        self._check_ops = [(_OPS[op], np.array([c[2] == op for c in checks], dtype=bool)) for op in _OPS]
        self._check_of_claim = np.zeros((len(checks), len(claimed)))
        self._check_of_claim[np.arange(len(checks)), [c[0] for c in checks]] = 1.0

    def group_contributions(self, contributions: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Sum per-feature contributions per reason group.

        Parameters
        ----------
        contributions
            ``(n_items, n_features + 1)`` from ``pred_contrib=True`` (last column the bias, ignored),
            or ``(n_items, n_features)`` without the bias.

        Returns
        -------
        codes, totals
            The group codes (catalogue order) and a ``(n_items, len(codes))`` array of summed contributions.

        Raises
        ------
        ValueError
            If ``contributions`` is not 2-D with ``n_features`` or ``n_features + 1`` columns.
        """
        c = np.asarray(contributions, dtype=np.float64)
        n = len(self.feature_names)
        if c.ndim != 2 or c.shape[1] not in (n, n + 1):
            raise ValueError(
                f"contributions must be 2-D with {n} (features) or {n + 1} (features + bias) columns, "
                f"got shape {c.shape}; was the ranker trained on other features than this mapper?"
            )
        return list(self.codes), c[:, :n] @ self.projection[:n]

    def claims_hold(self, features: np.ndarray) -> np.ndarray:
        """(n_items, n_groups) bool: False where a group's text would state something the item's values deny.

        A positive contribution only says a feature raised the score, not that the product is cheap or that
        the customer holds anything: "Low fees" is said only when the fee is at or below its category's mean
        (or zero), "Competitive rate" when the APR is, "Good returns" when the yield is at or above it,
        "Complements the products you already hold" only to someone who holds one, "From a provider you
        already bank with" only when that is so, and so on (``_CLAIMS``). A claim that cannot be checked
        (the value is missing) is not made.
        """
        x = np.asarray(features, dtype=np.float64)
        ok = np.ones((len(x), len(self.codes)), dtype=bool)
        v = x[:, self._check_col]
        passed = np.zeros(v.shape, dtype=bool)
        with np.errstate(invalid="ignore"):
            for op, which in self._check_ops:
                if which.any():
                    passed[:, which] = op(v[:, which], self._check_value[which])
        passed &= ~np.isnan(v)
        ok[:, self._claim_groups] = (passed.astype(np.float64) @ self._check_of_claim) > 0
        return ok

    def model_reasons(
        self, contributions: np.ndarray, max_reasons: int = 3, features: np.ndarray | None = None
    ) -> list[list[str]]:
        """The reason codes that most raised each item's score, best first.

        Parameters
        ----------
        contributions
            As for :meth:`group_contributions`.
        max_reasons
            At most this many codes per item (0 gives empty lists).
        features
            The items' feature values (the ranker's input rows); when given, reasons whose text the values
            contradict are dropped (:meth:`claims_hold`).

        Returns
        -------
        list of list of str
            Per item, codes of groups with a summed contribution > 0, in descending order of that sum
            (ties: catalogue order). An item whose every group pulled its score down gets no model reason.
        """
        return self.reasons_from_totals(self.group_contributions(contributions)[1], max_reasons, features)

    def reasons_from_totals(
        self, totals: np.ndarray, max_reasons: int = 3, features: np.ndarray | None = None
    ) -> list[list[str]]:
        """:meth:`model_reasons` from group totals ``(n_items, n_groups)`` (per-feature contributions times
        :attr:`projection`, or the ranker's leaves summed in group space)."""
        if max_reasons < 0:
            raise ValueError(f"max_reasons must be >= 0, got {max_reasons}")
        codes = self.codes
        totals = np.asarray(totals, dtype=np.float64)
        if totals.ndim != 2 or totals.shape[1] != len(codes):
            raise ValueError(f"group totals must be 2-D with {len(codes)} columns ({codes}), got shape {totals.shape}")
        if features is not None:
            totals = np.where(self.claims_hold(features), totals, -np.inf)
        k = min(max_reasons, len(codes))
        order = np.argsort(-totals, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(totals, order, axis=1)
        return [
            [codes[j] for j, v in zip(row, vals, strict=True) if v > 0] for row, vals in zip(order, top, strict=True)
        ]


def rule_reasons(passed: Iterable[str]) -> list[str]:
    """Reason codes for the eligibility rules a product passed, in :data:`finrec.rules.eligibility.RULES` order.

    Pass only rules that were *active* for this customer and product: a rule switched off for lack of
    data was not passed, and saying "you meet the income requirement" when none was checked is false.

    Raises
    ------
    ValueError
        For a name that is not an eligibility rule.
    """
    names = set(passed)
    unknown = names - set(RULES)
    if unknown:
        raise ValueError(f"unknown eligibility rule(s) {sorted(unknown)}; known: {list(RULES)}")
    return [RULE_REASONS[r] for r in RULES if r in names and r in RULE_REASONS]


def describe(codes: Iterable[str]) -> list[dict[str, str]]:
    """Codes as ``{"code", "text", "kind"}`` dicts, in the given order, for the API response.

    Raises
    ------
    ValueError
        For a code not in :data:`REASON_CODES`.
    """
    out = []
    for code in codes:
        reason = REASON_CODES.get(code)
        if reason is None:
            raise ValueError(f"unknown reason code {code!r}")
        out.append({"code": reason.code, "text": reason.text, "kind": reason.kind})
    return out
