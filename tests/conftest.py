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


@pytest.fixture(scope="session")
def spark() -> object:
    """One local[2] Spark session for every Spark test (it takes 6-15 s to start); skipped without PySpark or Java."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        pytest.skip("PySpark is not installed: `pip install -e '.[spark]'` (make test installs it)")
    from finrec.config import EngineSettings
    from finrec.engine.spark import java_available, spark_session

    if not java_available():
        pytest.skip("no Java here: the Spark tests need Java 17 (`make spark-deps` installs Debian's)")
    session = spark_session(EngineSettings(name="spark", spark_master="local[2]", spark_partitions=4,
                                           spark_driver_memory="2g"))  # fmt: skip
    yield session
    session.stop()
