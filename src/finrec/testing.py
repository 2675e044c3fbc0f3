"""Small fixed worlds shared by the test suite and the docs' examples."""

from __future__ import annotations

from finrec.data.synthetic.generate import WorldConfig

#: 6k customers, 60 products, 6 months: about a second to generate, rich enough for statistics.
SMALL_WORLD = WorldConfig(users=6_000, products=60, months=6, seed=11)

#: 2k customers, 40 products, 4 months: every stage trains (no fallback) in about 3 s, for the service's tests.
TINY_WORLD = WorldConfig(users=2_000, products=40, months=4, seed=3)

#: Training settings that keep :data:`TINY_WORLD`'s model quick to train (shorter windows, fewer epochs).
TINY_TRAIN = {"max_epochs": 8, "eval_days": 30, "label_days": 30}
