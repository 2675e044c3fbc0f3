"""The selection guard's rule: the simplest tier within one standard error of the best; in a tier, the better mean."""

from __future__ import annotations

import numpy as np

from finrec.twostage.train import choose_one_se

METHODS = ["popularity", "ease", "two_tower", "stack"]
TIERS = [0, 4, 5, 5]


def scores(means: dict[str, float], seed: int = 0, n: int = 2_000, noise: float = 0.2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.random(n)
    out = {}
    for m, mu in means.items():
        z = rng.normal(0, noise, n)
        out[m] = base + mu + z - z.mean()  # noise of mean zero: the means are exactly base's plus mu
    return out


def test_in_the_learned_tier_the_better_mean_serves_even_within_one_se() -> None:
    # two_tower and stack differ by far less than one SE (0.2 * sqrt(2) / sqrt(2000) ~ 0.0063).
    per_user = scores({"popularity": 0.0, "ease": 0.1, "two_tower": 0.300, "stack": 0.302})
    table: dict[str, dict[str, float]] = {}
    assert choose_one_se(METHODS, per_user, TIERS, table) == "stack"
    assert table["two_tower"]["se_vs_best"] > 0.002  # so the lead was within one SE
    per_user = scores({"popularity": 0.0, "ease": 0.1, "two_tower": 0.302, "stack": 0.300})
    assert choose_one_se(METHODS, per_user, TIERS) == "two_tower"


def test_a_simpler_tier_within_one_se_still_wins() -> None:
    per_user = scores({"popularity": 0.0, "ease": 0.299, "two_tower": 0.295, "stack": 0.300})
    assert choose_one_se(METHODS, per_user, TIERS) == "ease"


def test_a_clearly_better_learned_model_serves_and_popularity_is_the_floor() -> None:
    assert choose_one_se(METHODS, scores({"popularity": 0.0, "ease": 0.1, "two_tower": 0.2, "stack": 0.3}),
                         TIERS) == "stack"  # fmt: skip
    assert choose_one_se(METHODS, scores({"popularity": 0.3, "ease": 0.1, "two_tower": 0.2, "stack": 0.25}),
                         TIERS) == "popularity"  # fmt: skip
