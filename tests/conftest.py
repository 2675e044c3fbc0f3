"""Shared fixtures: small synthetic worlds, generated once per test session."""

from __future__ import annotations

import os

# Before LightGBM/PyTorch load: OpenMP's busy-waiting threads stall 20-200x when CI shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest

from finrec.data.synthetic.generate import generate_world
from finrec.testing import SMALL_WORLD, TINY_TRAIN, TINY_WORLD


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6k-customer, 60-product, 6-month world in Parquet (about a second to make)."""
    out = tmp_path_factory.mktemp("worlds") / "small"
    generate_world(SMALL_WORLD, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2k-customer, 40-product, 4-month world (well under a second to make)."""
    out = tmp_path_factory.mktemp("worlds") / "tiny"
    generate_world(TINY_WORLD, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model bundle trained on ``tiny_world`` with every stage (about 3 s)."""
    from finrec import pipeline
    from finrec.config import FinrecSettings

    out = tmp_path_factory.mktemp("models") / "tiny"
    pipeline.train(tiny_world, out, FinrecSettings(train=TINY_TRAIN), progress=False)
    return out
