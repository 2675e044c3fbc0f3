"""A synthetic catalogue of financial offers from many providers.

Every category has its own pricing (APR for credit, APY for deposits, fees and
premiums), eligibility rules (minimum credit score and income, age limits,
regional availability) and risk level, all varying within the category. Hidden
per-product appeal (``quality``) and a latent vector make products of the same
category differ in true appeal beyond what their price shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finrec.data.synthetic import params as P

_PREFIXES = (
    "North", "Ash", "Bel", "Cal", "Dun", "Elm", "Fair", "Glen", "Har", "Iver", "Kel", "Lark", "Mer", "Oak",
    "Pen", "Quay", "Ros", "Sil", "Thorn", "Val", "Wren", "York", "Brae", "Corr", "Drum", "Firth", "Stone",
)  # fmt: skip
_SUFFIXES = ("bank", "trust", "capital", "mutual", "finance", "credit", "savings", "partners", "money", "invest")

_TIERS = {
    "current_account": ("Everyday", "Plus", "Premier", "Student", "Basic", "Reward"),
    "savings": ("Easy Access", "Bonus", "Regular", "Green", "Online", "Loyalty"),
    "term_deposit": ("Fixed", "Bond", "Growth", "Select"),
    "credit_card": ("Classic", "Rewards", "Cashback", "Platinum", "Travel", "Balance Transfer", "Builder"),
    "personal_loan": ("Flex", "Standard", "Home Improvement", "Consolidation"),
    "auto_loan": ("Car", "Green Car", "Used Car"),
    "mortgage": ("Fixed", "Tracker", "First Home", "Remortgage", "Offset"),
    "insurance": ("Home", "Life", "Travel", "Income Protection", "Car", "Health"),
    "investment_fund": ("Index", "Balanced", "Growth", "Income", "Emerging Markets", "Ethical"),
    "pension": ("Personal", "Stakeholder", "Self-Invested", "Lifestyle"),
}
_LABELS = {c: c.replace("_", " ").title() for c in P.CATEGORIES}


@dataclass
class Catalogue:
    """True attributes of every product, indexed 0..M-1 (product_id = index + 1)."""

    product_id: np.ndarray
    category: np.ndarray
    provider: np.ndarray  # index into provider_names
    provider_names: list[str]
    brand: np.ndarray  # per provider appeal
    provider_size: np.ndarray  # per provider market share (logging policy weights)
    name: np.ndarray  # object array of str
    risk_level: np.ndarray
    apr: np.ndarray  # nan where not applicable
    apy: np.ndarray
    annual_fee: np.ndarray
    min_credit_score: np.ndarray  # nan = no rule
    min_income: np.ndarray
    min_age: np.ndarray  # float, nan = no rule
    max_age: np.ndarray
    regions: np.ndarray  # object array: "*" or "north,south"
    region_ok: np.ndarray  # (M, n_regions) bool
    launch_day: np.ndarray  # days after the start of the simulated period (negative: before)
    term_months: np.ndarray  # nan where not applicable
    quality: np.ndarray
    latent: np.ndarray  # (M, LATENT_DIM)

    def __len__(self) -> int:
        return len(self.product_id)


def _allocate(n: int, share: np.ndarray) -> np.ndarray:
    """Products per category: proportional to ``share``, at least one each (largest remainder)."""
    if n < len(share):
        raise ValueError(f"need at least {len(share)} products, one per category; got {n}")
    raw = share / share.sum() * (n - len(share))
    counts = np.floor(raw).astype(int) + 1
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def _zscore_within(values: np.ndarray, category: np.ndarray) -> np.ndarray:
    """Standardise within each category; 0 where a value is missing or the category has no spread."""
    out = np.zeros(len(values))
    for c in np.unique(category):
        m = (category == c) & ~np.isnan(values)
        if m.sum() > 1 and np.nanstd(values[m]) > 0:
            out[m] = (values[m] - values[m].mean()) / values[m].std()
    return out


def make_catalogue(n_products: int, n_days: int, rng: np.random.Generator) -> Catalogue:
    """Draw ``n_products`` offers; ``n_days`` is the length of the simulated period."""
    counts = _allocate(n_products, P.CATEGORY_SHARE)
    category = np.repeat(np.arange(P.N_CAT), counts).astype(np.int8)
    rng.shuffle(category)
    M = n_products

    n_prov = int(np.clip(M // 12, 6, len(_PREFIXES) * len(_SUFFIXES)))
    combos = [(a, b) for a in _PREFIXES for b in _SUFFIXES]
    pick = rng.choice(len(combos), size=n_prov, replace=False)
    provider_names = [f"{combos[i][0]}{combos[i][1]}".capitalize() for i in pick]
    provider_size = 1.0 / np.arange(1, n_prov + 1) ** 0.8
    provider_size /= provider_size.sum()
    brand = rng.normal(0, P.BRAND_SD, n_prov)
    provider = rng.choice(n_prov, size=M, p=provider_size).astype(np.int32)

    def cat_is(*names: str) -> np.ndarray:
        return np.isin(category, [P.CAT[n] for n in names])

    nan = np.full(M, np.nan)
    u = rng.random(M)

    risk_level = np.ones(M)
    risk_level[cat_is("credit_card", "personal_loan", "auto_loan")] = 2
    risk_level[cat_is("mortgage")] = 3
    inv = cat_is("investment_fund")
    risk_level[inv] = rng.integers(2, 6, inv.sum())
    pen = cat_is("pension")
    risk_level[pen] = rng.integers(2, 5, pen.sum())

    apr = nan.copy()
    for c, lo, hi in (("credit_card", 14, 29), ("personal_loan", 6, 19), ("auto_loan", 4, 11), ("mortgage", 3, 7.5)):
        m = cat_is(c)
        apr[m] = np.round(lo + (hi - lo) * u[m], 2)

    apy = nan.copy()
    deposit_rates: tuple[tuple[str, float, float], ...] = (
        ("savings", 0.5, 4.5),
        ("term_deposit", 2.0, 5.5),
        ("current_account", 0.0, 1.0),
    )
    for c, lo_apy, hi_apy in deposit_rates:
        m = cat_is(c)
        apy[m] = np.round(lo_apy + (hi_apy - lo_apy) * rng.random(m.sum()), 2)
    cur = cat_is("current_account")
    apy[cur & (rng.random(M) < 0.5)] = 0.0

    fee = np.zeros(M)
    fee[cur] = rng.choice([0, 0, 60, 120, 180], size=cur.sum())
    card = cat_is("credit_card")
    fee[card] = np.where(rng.random(card.sum()) < 0.5, 0, np.round(rng.uniform(25, 450, card.sum()), -1))
    ins = cat_is("insurance")
    fee[ins] = np.round(rng.lognormal(6.0, 0.6, ins.sum()), 0)
    fee[inv] = np.round(rng.uniform(0, 250, inv.sum()), 0)
    fee[pen] = np.round(rng.uniform(0, 150, pen.sum()), 0)
    mort = cat_is("mortgage")
    fee[mort] = rng.choice([0, 499, 999, 1499], size=mort.sum())

    # Eligibility: stricter rules tend to come with better prices (a real trade-off).
    price_rank = np.where(np.isnan(apr), 0.5, 1 - _zscore_within(apr, category).clip(-2, 2) / 4 - 0.5)
    min_credit = nan.copy()
    for c, lo, hi in (
        ("credit_card", 560, 760),
        ("personal_loan", 580, 720),
        ("auto_loan", 560, 700),
        ("mortgage", 620, 740),
    ):
        m = cat_is(c)
        t = np.clip(0.6 * price_rank[m] + 0.4 * rng.random(m.sum()), 0, 1)
        min_credit[m] = np.round(lo + (hi - lo) * t, -1)
    premium_cur = cur & (fee >= 120)
    min_credit[premium_cur] = 600

    min_income = nan.copy()
    premium_card = card & (fee > 150)
    min_income[premium_card] = np.round(rng.uniform(30_000, 100_000, premium_card.sum()), -3)
    for c, lo, hi in (("personal_loan", 12_000, 30_000), ("mortgage", 25_000, 60_000), ("auto_loan", 12_000, 25_000)):
        m = cat_is(c)
        min_income[m] = np.round(rng.uniform(lo, hi, m.sum()), -3)
    min_income[premium_cur] = 40_000

    min_age = np.full(M, 18.0)
    max_age = nan.copy()
    student_like = cur & (rng.random(M) < 0.15)
    max_age[student_like] = 25
    max_age[mort] = rng.choice([65, 70, 75], size=mort.sum())
    max_age[pen] = rng.choice([60, 65], size=pen.sum())
    max_age[ins] = rng.choice([70, 75, 80, np.nan], size=ins.sum())
    min_age[cat_is("personal_loan", "auto_loan", "mortgage")] = 21
    min_age[rng.random(M) < 0.05] = np.nan  # some offers state no minimum age

    n_reg = len(P.REGIONS)
    regional = rng.random(M) < 0.15
    region_ok = np.ones((M, n_reg), dtype=bool)
    regions = np.full(M, "*", dtype=object)
    for i in np.flatnonzero(regional):
        k = int(rng.integers(1, 4))
        chosen = np.sort(rng.choice(n_reg, size=k, replace=False))
        region_ok[i] = False
        region_ok[i, chosen] = True
        regions[i] = ",".join(P.REGIONS[j] for j in chosen)

    # Most offers exist before the period starts; a fifth launch during it (cold start).
    launch_day = np.where(
        rng.random(M) < 0.8,
        -rng.integers(1, 5 * 365, M),
        rng.integers(0, max(n_days - 14, 1), M),
    ).astype(np.int32)

    term = nan.copy()
    term[cat_is("term_deposit")] = rng.choice([6, 12, 24, 36, 60], size=cat_is("term_deposit").sum())
    for c, choices in (
        ("personal_loan", [12, 24, 36, 48, 60]),
        ("auto_loan", [24, 36, 48, 60, 72, 84]),
        ("mortgage", [180, 240, 300, 360]),
    ):
        m = cat_is(c)
        term[m] = rng.choice(choices, size=m.sum())

    tiers = [rng.choice(_TIERS[P.CATEGORIES[c]]) for c in category]
    names = np.array(
        [
            f"{provider_names[p]} {t} {_LABELS[P.CATEGORIES[c]]}"
            for p, t, c in zip(provider, tiers, category, strict=True)
        ],
        dtype=object,
    )
    # Disambiguate repeated names with a series number, as real product ranges do.
    seen: dict[str, int] = {}
    for k, nm in enumerate(names.tolist()):
        seen[nm] = seen.get(nm, 0) + 1
        if seen[nm] > 1:
            names[k] = f"{nm} {seen[nm]}"

    return Catalogue(
        product_id=np.arange(1, M + 1, dtype=np.int64),
        category=category,
        provider=provider,
        provider_names=provider_names,
        brand=brand,
        provider_size=provider_size,
        name=names,
        risk_level=risk_level.astype(np.int8),
        apr=apr,
        apy=apy,
        annual_fee=fee,
        min_credit_score=min_credit,
        min_income=min_income,
        min_age=min_age,
        max_age=max_age,
        regions=regions,
        region_ok=region_ok,
        launch_day=launch_day,
        term_months=term,
        quality=rng.normal(0, P.QUALITY_SD, M),
        latent=rng.standard_normal((M, P.LATENT_DIM)).astype(np.float32),
    )
