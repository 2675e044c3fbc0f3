"""The fixed shape of the synthetic financial world: categories, life stages, effect tables.

Everything here is a constant the ground-truth model reads; nothing is random.
The numbers are chosen so that the funnel rates look like a bank's (a few percent
click-through, a third of applications declined for credit products) and so that
every interpretable effect in ``truth.py`` is strong enough to learn but none
dominates: category alone explains only part of the preference.
"""

from __future__ import annotations

import numpy as np

from finrec.data.contract import KNOWN_CATEGORIES

CATEGORIES: tuple[str, ...] = KNOWN_CATEGORIES
N_CAT = len(CATEGORIES)
CAT = {c: i for i, c in enumerate(CATEGORIES)}

#: Share of the catalogue in each category (normalised in catalogue.py).
CATEGORY_SHARE = np.array([0.07, 0.12, 0.10, 0.16, 0.12, 0.08, 0.10, 0.10, 0.09, 0.06])

CREDIT_CATEGORIES = ("credit_card", "personal_loan", "auto_loan", "mortgage")
LOAN_CATEGORIES = ("personal_loan", "auto_loan", "mortgage")
DEPOSIT_CATEGORIES = ("savings", "term_deposit")
RISKY_CATEGORIES = ("investment_fund", "pension")

IS_CREDIT = np.array([c in CREDIT_CATEGORIES for c in CATEGORIES])
IS_RISKY = np.array([c in RISKY_CATEGORIES for c in CATEGORIES])

LIFE_STAGES: tuple[str, ...] = ("student", "young_adult", "family", "established", "pre_retirement", "retired")
N_STAGE = len(LIFE_STAGES)
STAGE = {s: i for i, s in enumerate(LIFE_STAGES)}

REGIONS: tuple[str, ...] = ("capital", "north", "south", "east", "west", "central", "coast", "islands")
REGION_WEIGHTS = np.array([0.22, 0.15, 0.15, 0.12, 0.12, 0.11, 0.09, 0.04])

GENDERS: tuple[str, ...] = ("F", "M", "X")
GENDER_WEIGHTS = np.array([0.495, 0.49, 0.015])

CHANNELS: tuple[str, ...] = ("app", "web", "email", "branch")
CHANNEL_WEIGHTS = np.array([0.5, 0.3, 0.15, 0.05])

#: Base appeal of each category (logit scale), before any customer effect.
CATEGORY_BASE = np.array([-0.6, 0.2, -0.2, 0.1, -0.3, -0.5, -0.6, -0.3, -0.2, -0.5])

# Life-stage need: rows are LIFE_STAGES, columns CATEGORIES (logit shifts).
#                      cur   sav  term  card  pers  auto  mort  ins   inv   pen
NEED = np.array(
    [
        [1.2, 0.3, -1.2, 0.5, -0.6, -1.0, -2.5, -0.8, -0.6, -1.5],  # student
        [0.6, 0.6, -0.3, 0.8, 0.5, 0.6, -0.4, -0.2, 0.2, -0.3],  # young_adult
        [0.2, 0.3, -0.2, 0.3, 0.4, 0.7, 1.3, 1.1, -0.1, 0.3],  # family
        [0.0, 0.4, 0.4, 0.2, -0.1, 0.2, 0.2, 0.5, 0.7, 0.8],  # established
        [-0.2, 0.6, 0.9, -0.2, -0.6, -0.3, -0.9, 0.4, 0.6, 1.1],  # pre_retirement
        [-0.3, 0.8, 1.3, -0.6, -1.3, -0.9, -2.5, 0.3, 0.2, -1.6],  # retired
    ]
)

# Complementarity: holding row category shifts the appeal of column category.
# The diagonal is saturation (already holding one), the strongest effect.
COMP = np.zeros((len(CATEGORIES), len(CATEGORIES)))
for _a, _b, _v in (
    ("current_account", "savings", 0.4),
    ("current_account", "credit_card", 0.35),
    ("savings", "term_deposit", 0.35),
    ("savings", "investment_fund", 0.3),
    ("mortgage", "insurance", 0.9),
    ("auto_loan", "insurance", 0.5),
    ("investment_fund", "pension", 0.35),
    ("term_deposit", "investment_fund", 0.25),
    ("credit_card", "personal_loan", 0.2),
):
    COMP[CAT[_a], CAT[_b]] = _v
np.fill_diagonal(COMP, -2.6)
COMP[CAT["insurance"], CAT["insurance"]] = -1.2  # several policies are common
COMP[CAT["investment_fund"], CAT["investment_fund"]] = -0.8

# Seasonality of category appeal by calendar month (Jan..Dec), logit shifts.
SEASON = np.zeros((len(CATEGORIES), 12))
SEASON[CAT["mortgage"]] = 0.25 * np.sin((np.arange(12) - 2) / 12 * 2 * np.pi)  # spring/summer
SEASON[CAT["credit_card"], [10, 11]] = 0.3  # holiday spending
SEASON[CAT["savings"], [0, 3]] = 0.25  # new year, tax year
SEASON[CAT["insurance"], 0] = 0.2
SEASON[CAT["auto_loan"], [2, 8]] = 0.2  # new plates

#: Relative activity (sessions) by calendar month.
ACTIVITY_SEASON = np.array([1.15, 1.0, 1.0, 1.05, 0.95, 0.9, 0.85, 0.85, 1.0, 1.05, 1.1, 1.2])

#: Share of each life stage's sessions targeted by the logging policy to a category,
#: a noisy version of NEED the bank's marketing team would use.
TARGETING_SHARPNESS = 0.6
#: Share of slots the logging policy fills uniformly at random (exploration).
EXPLORATION = 0.4

# Effect sizes of the ground-truth utility.
LATENT_DIM = 6
LATENT_WEIGHT = 0.7  # weight of the collaborative (latent taste) term
QUALITY_SD = 0.55  # product appeal within a category, beyond price
BRAND_SD = 0.3
MAIN_PROVIDER_AFFINITY = 0.6  # customers prefer their main bank's products
RISK_MISMATCH = 0.45  # per squared step of risk above tolerance (risky categories)
RISK_DISTANCE = 0.15  # per step of distance either way (risky categories)

# Funnel.
POSITION_BIAS = 0.9  # P(view | position k) = k ** -POSITION_BIAS
CLICK_BIAS = -2.2  # P(click | view) = sigmoid(u + CLICK_BIAS)
APPLY_SLOPE = 0.8
APPLY_BIAS = -1.6  # P(apply | click) = sigmoid(APPLY_SLOPE * u + APPLY_BIAS)
#: Applicants self-select: P(apply | click) is scaled by floor + (1 - floor) * P(approve | apply).
SELF_SELECTION_FLOOR = 0.25
APPROVE_NON_CREDIT = 0.985  # eligible applications for non-credit products
CREDIT_MARGIN_SCALE = 35.0  # credit points above the minimum per logit step
CREDIT_APPROVE_BIAS = 0.4

#: Monthly hazard that a holding is closed, by category.
CLOSE_HAZARD = np.array([0.004, 0.012, 0.05, 0.01, 0.04, 0.025, 0.004, 0.012, 0.015, 0.003])

#: Categories whose appeal a ``rate_shock`` drift moves, and the sign of the move:
#: demand shifts from deposits to loans.
DRIFT_SHIFT = np.array([0.0, -1.0, -1.0, 0.5, 1.0, 1.0, 1.0, 0.0, -0.3, 0.0])

#: Logit of holding a product of each category when the period starts (plus NEED).
INITIAL_HOLDING = np.array([2.4, -0.5, -1.6, -0.7, -2.0, -2.1, -1.4, -0.6, -1.8, -1.1])
#: Categories where a new product replaces the old one (a switch closes the old holding).
SWITCH_CATEGORIES = tuple(c for c in CATEGORIES if c not in ("insurance", "investment_fund"))
