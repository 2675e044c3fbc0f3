"""`finrec features` on the embedded engine: the pair history written in pieces is the whole table, and a cutoff
before every event still writes every table with its columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from finrec.config import FinrecSettings
from finrec.data.dataset import load_dataset
from finrec.features.builder import FeatureBuilder
from finrec.features.export import TABLES, export_features


def test_the_pair_history_in_pieces_is_the_whole_table(tiny_world: Path) -> None:
    ds = load_dataset(tiny_world)
    b = FeatureBuilder(ds)
    cutoff = int(ds.time_range[1]) + 1
    users, products, whole = b.pair_history_table(cutoff)
    pieces = list(b.pair_history_chunks(cutoff, rows=997))  # a size that does not divide the table
    assert len(pieces) == -(-len(users) // 997) > 2 and all(len(p[0]) <= 997 for p in pieces)
    assert np.array_equal(np.concatenate([p[0] for p in pieces]), users)
    assert np.array_equal(np.concatenate([p[1] for p in pieces]), products)
    pd.testing.assert_frame_equal(pd.concat([p[2] for p in pieces], ignore_index=True), whole)


def test_a_cutoff_before_every_event_writes_empty_tables_with_their_columns(tiny_world: Path, tmp_path: Path) -> None:
    ds = load_dataset(tiny_world)
    first = int(ds.time_range[0])
    manifest = export_features(tiny_world, tmp_path / "early", FinrecSettings(), cutoff=first, engine="duckdb")
    rows = manifest["metrics"]["rows"]
    assert all(rows[t] == 0 for t in TABLES if t != "demand") and rows["demand"] == ds.n_products
    full = export_features(tiny_world, tmp_path / "full", FinrecSettings(), engine="duckdb")
    for name in TABLES:
        early = pd.read_parquet(tmp_path / "early" / f"{name}.parquet")
        later = pd.read_parquet(tmp_path / "full" / f"{name}.parquet")
        assert list(early.columns) == list(later.columns), name
        assert len(later) == full["metrics"]["rows"][name] > 0, name
