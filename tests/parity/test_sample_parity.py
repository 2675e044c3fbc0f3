"""A Spark sample of whole customers is the embedded dataset restricted to them, with the statistics of all.

When the sample holds every customer it is the dataset `load_dataset` reads, row for row; when it holds some,
each kept customer has every event of theirs and the same features as in the full dataset (the catalogue's
statistics count every customer), so a model learns from them what it would learn in a run holding all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finrec import pipeline
from finrec.candidates.interactions import Interactions
from finrec.config import FinrecSettings
from finrec.data.dataset import load_dataset
from finrec.features.builder import FeatureBuilder
from finrec.testing import TINY_TRAIN

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def _same_frame(a, b) -> None:  # type: ignore[no-untyped-def]
    assert list(a.columns) == list(b.columns)
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), c
        else:
            assert list(x) == list(y), c


def test_a_sample_of_everyone_is_the_embedded_dataset(spark: object, tiny_world: Path) -> None:
    from finrec.engine.sample import CustomerSample

    full = load_dataset(tiny_world)
    with CustomerSample(spark, tiny_world, max_customers=10**7) as ds:  # type: ignore[arg-type]
        _same_frame(full.users, ds.users)
        _same_frame(full.products, ds.products)
        for f in ("user", "product", "etype", "ts", "position"):
            assert np.array_equal(getattr(full.events, f), getattr(ds.events, f)), f
        assert ds.fingerprint == full.fingerprint
        cutoff = full.time_range[1] + 1
        _same_frame(FeatureBuilder(full).catalogue_stats(cutoff), ds.catalogue_stats(cutoff))  # type: ignore[misc]


def test_sampled_customers_keep_their_events_and_features(spark: object, tiny_world: Path) -> None:
    from finrec.engine.sample import CustomerSample

    full = load_dataset(tiny_world)
    with CustomerSample(spark, tiny_world, max_customers=500, seed=3) as ds:  # type: ignore[arg-type]
        assert 350 <= ds.n_users <= 650  # about the share asked for, drawn by hash
        rows = full.user_rows(ds.users["user_id"])
        assert (rows >= 0).all()
        kept = np.isin(full.events.user, rows)
        assert len(ds.events) == int(kept.sum())  # whole customers: every event of theirs, no other
        cutoff = full.time_range[1] + 1 - 20 * 86_400
        a, b = FeatureBuilder(full, ["gender"]).snapshot(cutoff), FeatureBuilder(ds, ["gender"]).snapshot(cutoff)
        _same_frame(a.users.iloc[rows].reset_index(drop=True), b.users)
        _same_frame(a.products, b.products)
        again = CustomerSample(spark, tiny_world, max_customers=500, seed=3)  # type: ignore[arg-type]
        with again as ds2:
            assert list(ds2.users["user_id"]) == list(ds.users["user_id"])  # the same seed, the same customers


def test_a_model_trained_on_a_sample_has_its_sources_fitted_on_everyone(
    spark: object, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`finrec train --engine spark` learns from a sample, then fits the candidate sources on every customer at the
    end of the whole data: batch scoring, `finrec materialize` and the API take them as they are (a bundle whose
    sources were the sample's was refused by materialize), and they are what an embedded refit on all gives.

    The transitions source samples additions by customer row past a cap (300,000; here 40): Spark's rows follow
    the users table as the embedded engine's do, so both draw the same additions (numbered in another order, the
    Spark refit of a 1M-customer world fitted other transitions)."""
    from finrec.candidates import transitions
    from finrec.engine.sample import CustomerSample

    monkeypatch.setattr(transitions, "MAX_ADDITIONS", 40)

    sample = CustomerSample(spark, tiny_world, max_customers=500, seed=3)  # type: ignore[arg-type]
    with sample as ds:
        n_sampled = len(ds.events)
        pipeline.train(tiny_world, tmp_path / "m", FinrecSettings(train=TINY_TRAIN), progress=False, dataset=ds,
                       fit_sources=sample.fit_sources_on_everyone)  # fmt: skip
    model, manifest = pipeline.load_model(tmp_path / "m")
    assert model.sources is not None and manifest["inputs"]["events"] == n_sampled
    full = load_dataset(tiny_world)
    cutoff = full.time_range[1] + 1
    assert n_sampled < len(full.events)
    assert (model.config.sources_cutoff, model.config.sources_events) == (cutoff, len(full.events))
    builder = FeatureBuilder(full)
    snap = builder.snapshot(cutoff)
    assert model.sources_at(builder, snap) is model.sources  # taken as they are: nothing to refit, nothing refused
    users = np.arange(full.n_users)
    got = model.source_scores(builder, snap, users)
    inter = Interactions.from_events(full.events, full.n_users, full.n_products, model.config.grades,
                                     model.config.min_grade)  # fmt: skip
    model.set_sources(snap, model.sources.refit(inter, model.sources.segment_codes(full.users)))
    want = model.source_scores(builder, snap, users)
    assert sorted(got) == sorted(want) and len(got) >= 2
    (trans,) = [src for src in model.sources.sources if src.kind == "transitions"]
    assert trans.n_additions_ == 40  # the cap bound: a sample of the additions was drawn
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-9, err_msg=name)
