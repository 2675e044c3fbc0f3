"""Small fixed worlds shared by the test suite and the docs' examples."""

from __future__ import annotations

from finrec.data.synthetic.generate import WorldConfig

#: 6k customers, 60 products, 6 months: about a second to generate, rich enough for statistics.
SMALL_WORLD = WorldConfig(users=6_000, products=60, months=6, seed=11)
