"""The engine that runs the offline stages: embedded DuckDB (the default) or Apache Spark.

Both run one definition of every table (the DuckDB-dialect SQL of :mod:`finrec.features.queries`, translated for
Spark by sqlglot) and are held equal by parity tests (``tests/parity``). Importing this package imports neither
engine's heavy modules: :mod:`finrec.engine.spark` imports PySpark only when the Spark engine is chosen.
"""

from __future__ import annotations

from typing import Literal

ENGINES: tuple[str, ...] = ("duckdb", "spark")
EngineName = Literal["duckdb", "spark"]
