"""Synthetic customers with realistic joint distributions.

Age drives employment; age and employment drive income; income and age drive
credit score (with a wide spread); age and income drive risk tolerance. Life
stage (hidden) follows from age, employment and a family draw, and shows in the
observable ``dependants`` column. Each customer also has hidden traits only the
ground truth knows: a latent taste vector, price/yield/fee sensitivities and an
activity level.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from finrec.data.contract import EMPLOYMENT_STATUSES
from finrec.data.synthetic import params as P

EMP = {s: i for i, s in enumerate(EMPLOYMENT_STATUSES)}


@dataclass
class Customers:
    """True attributes of a block of customers (arrays of equal length)."""

    user_id: np.ndarray
    age: np.ndarray
    employment: np.ndarray  # index into EMPLOYMENT_STATUSES
    income: np.ndarray
    credit_score: np.ndarray
    risk_tolerance: np.ndarray
    region: np.ndarray  # index into params.REGIONS
    stage: np.ndarray  # index into params.LIFE_STAGES
    dependants: np.ndarray
    consent: np.ndarray
    gender: np.ndarray  # index into params.GENDERS
    signup_days_before: np.ndarray
    latent: np.ndarray  # (n, LATENT_DIM)
    price_sens: np.ndarray
    yield_sens: np.ndarray
    fee_sens: np.ndarray
    activity: np.ndarray

    def __len__(self) -> int:
        return len(self.user_id)

    def take(self, idx: np.ndarray) -> Customers:
        return Customers(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def _choice_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of a (n, k) probability matrix."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cum[:, -1:]
    return (u > cum).sum(axis=1)


def make_customers(first_id: int, n: int, rng: np.random.Generator) -> Customers:
    """Draw ``n`` customers with ids ``first_id .. first_id + n - 1``."""
    age = np.rint(18 + rng.beta(1.6, 2.3, n) * 72).astype(np.int16)

    # Employment by age band.
    probs = np.empty((n, len(EMPLOYMENT_STATUSES)))
    young, old = age < 23, age >= 66
    mid = ~(young | old)
    probs[young] = [0.33, 0.02, 0.1, 0.55, 0.0]
    probs[mid] = [0.78, 0.12, 0.07, 0.03, 0.0]
    probs[old] = [0.08, 0.05, 0.0, 0.0, 0.87]
    probs[mid & (age >= 60)] = [0.55, 0.12, 0.05, 0.0, 0.28]
    employment = _choice_rows(rng, probs).astype(np.int8)

    base_log_income = np.array([10.75, 10.85, 9.7, 9.3, 10.2])[employment]
    age_curve = 0.35 * (1 - ((age - 50) / 32.0) ** 2)
    sigma = np.where(employment == EMP["self_employed"], 0.75, 0.5)
    log_income = base_log_income + age_curve + sigma * rng.standard_normal(n)
    income = np.exp(log_income).astype(np.float32)

    credit = 640 + 55 * (log_income - 10.5) + 1.3 * (age - 40) + 62 * rng.standard_normal(n)
    credit = np.clip(np.rint(credit), 300, 850).astype(np.float32)

    risk_latent = -0.035 * (age - 45) + 0.55 * (log_income - 10.5) + 0.9 * rng.standard_normal(n)
    risk_tolerance = (np.searchsorted([-1.2, -0.4, 0.4, 1.2], risk_latent) + 1).astype(np.int8)

    region = rng.choice(len(P.REGIONS), size=n, p=P.REGION_WEIGHTS).astype(np.int8)

    # Life stage: student / retired from employment, family from a draw peaking at 30-45.
    p_family = 0.65 * np.exp(-(((age - 38) / 11.0) ** 2))
    family = rng.random(n) < p_family
    stage = np.where(age < 35, P.STAGE["young_adult"], P.STAGE["established"])
    stage = np.where(age >= 56, P.STAGE["pre_retirement"], stage)
    stage = np.where(family, P.STAGE["family"], stage)
    stage = np.where(employment == EMP["student"], P.STAGE["student"], stage)
    stage = np.where((employment == EMP["retired"]) | (age >= 68), P.STAGE["retired"], stage).astype(np.int8)
    dependants = np.where(stage == P.STAGE["family"], 1 + rng.poisson(0.8, n), (rng.random(n) < 0.04).astype(int))

    consent = rng.random(n) < 0.82
    gender = rng.choice(len(P.GENDERS), size=n, p=P.GENDER_WEIGHTS).astype(np.int8)
    tenure_days = rng.exponential(3 * 365, n)
    max_tenure = (age - 16) * 365.0
    signup_days_before = np.minimum(tenure_days, max_tenure).astype(np.int32) + 1

    latent = rng.standard_normal((n, P.LATENT_DIM)).astype(np.float32)
    # Lower incomes are more price sensitive; everyone varies.
    price_sens = np.exp(0.35 * (10.6 - log_income) + 0.35 * rng.standard_normal(n) - 0.3).astype(np.float32)
    yield_sens = np.exp(0.2 * (age - 45) / 20 + 0.35 * rng.standard_normal(n) - 0.4).astype(np.float32)
    fee_sens = np.exp(0.3 * (10.6 - log_income) + 0.35 * rng.standard_normal(n) - 0.5).astype(np.float32)
    activity = rng.lognormal(-0.18, 0.6, n).astype(np.float32)  # mean ~1

    return Customers(
        user_id=np.arange(first_id, first_id + n, dtype=np.int64),
        age=age,
        employment=employment,
        income=income,
        credit_score=credit,
        risk_tolerance=risk_tolerance,
        region=region,
        stage=stage,
        dependants=dependants.astype(np.int8),
        consent=consent,
        gender=gender,
        signup_days_before=signup_days_before,
        latent=latent,
        price_sens=price_sens,
        yield_sens=yield_sens,
        fee_sens=fee_sens,
        activity=activity,
    )
