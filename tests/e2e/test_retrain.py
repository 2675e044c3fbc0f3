"""``finrec retrain``: new feedback -> a new dataset version -> a challenger, evaluated beside the champion."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finrec.config import FinrecSettings
from finrec.data.dataset import load_dataset
from finrec.errors import FinrecError
from finrec.events.schema import Event
from finrec.events.store import open_event_store
from finrec.lifecycle.retrain import extend_dataset, new_events, retrain
from finrec.monitoring.alerts import AlertLog, alerts_path, read_alerts
from finrec.registry import CHALLENGER, CHAMPION, ModelRegistry
from finrec.testing import TINY_TRAIN

pytestmark = pytest.mark.slow


def feedback(world: Path, n: int, start: int, seed: int = 0) -> list[Event]:
    """``n`` impressions of random customers and products after ``start``, a third of them clicked."""
    rng = np.random.default_rng(seed)
    users = pd.read_parquet(world / "users.parquet")["user_id"].astype(str).to_numpy()
    products = pd.read_parquet(world / "products.parquet")["product_id"].astype(str).to_numpy()
    out = []
    for i in range(n):
        u, p, ts = str(rng.choice(users)), str(rng.choice(products)), start + 60 * i
        out.append(Event(f"fb-{seed}-{i}", u, p, "impression", ts, 1, f"r-{seed}-{i}", "app"))
        if i % 3 == 0:
            out.append(Event(f"fb-{seed}-{i}-c", u, p, "click", ts + 5, 1, f"r-{seed}-{i}", "app"))
    return out


def settings_for(workspace: Path, **retrain_opts: float) -> FinrecSettings:
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("FINREC_")]:
            mp.delenv(name)
        return FinrecSettings(workspace=workspace, train=TINY_TRAIN, retrain={"min_new_events": 50, **retrain_opts})


def test_new_events_keeps_only_later_events_of_known_ids() -> None:
    evs = [Event("a", "1", "p", "click", 100), Event("b", "1", "p", "click", 99), Event("c", "x", "p", "click", 100),
           Event("d", "1", "q", "click", 100)]  # fmt: skip
    kept, left = new_events(evs, 100, {"1"}, {"p"})
    assert [e.event_id for e in kept] == ["a"]
    assert left == {"before_the_data_end": 1, "unknown_customer": 1, "unknown_product": 1}


def test_extended_dataset_is_the_base_plus_the_new_events_and_passes_the_contract(tiny_world: Path,
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    base = load_dataset(tiny_world)
    start = int(base.time_range[1]) + 1
    events = feedback(tiny_world, 40, start)
    events.append(Event(str(pd.read_parquet(tiny_world / "events.parquet")["event_id"].iloc[0]), "1", "1",
                        "click", start))  # a re-delivery of an event the base holds  # fmt: skip
    out = extend_dataset(tiny_world, events, tmp_path / "extended")
    ds = load_dataset(out)  # validates against the contract first
    assert len(ds.events) == len(base.events) + len(events) - 1
    assert ds.time_range[1] == max(e.ts for e in events)
    assert ds.n_users == base.n_users and ds.n_products == base.n_products
    assert (out / "users.parquet").stat().st_ino == (tiny_world / "users.parquet").stat().st_ino  # a hard link


def test_retrain_registers_an_evaluated_challenger_and_reports_the_gate(tiny_world: Path, tiny_model: Path,
                                                                       tmp_path: Path) -> None:  # fmt: skip
    settings = settings_for(tmp_path / "ws", eval_days=10, label_days=10)
    reg = ModelRegistry.from_settings(settings)
    reg.register(tiny_model, alias=None)
    reg.promote("v1")
    with pytest.raises(FinrecError, match="no event store at"):  # the service never ran here: said clearly
        retrain(settings, progress=False)
    start = int(load_dataset(tiny_world).time_range[1]) + 1
    store = open_event_store(settings.serve.event_store_url(settings.workspace))
    store.append(feedback(tiny_world, 1500, start, seed=1) + [Event("old", "1", "1", "click", start - 10)])
    store.close()
    result = retrain(settings, progress=False)
    assert result.ran and result.challenger == "v2" and result.champion == "v1"
    assert result.new_events == 2000 and result.left_out == {"before_the_data_end": 1}
    assert reg.resolve(CHALLENGER) == "v2" and reg.resolve(CHAMPION) == "v1"  # registered, not promoted
    (k1,), (k2,) = reg.entry("v1")["evaluations"], reg.entry("v2")["evaluations"]
    assert k1 == k2  # both evaluated on the challenger's held-out window of the new data
    assert result.gate is not None and result.gate.evaluation == k1
    assert load_dataset(Path(result.dataset)).time_range[1] > start
    # The next run starts after the newest training: the same events are not new again.
    again = retrain(settings, progress=False)
    assert not again.ran and "0 new events" in again.reason


def test_retrain_if_drift_trains_only_on_a_drift_alert(tiny_world: Path, tiny_model: Path, tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "ws", eval_days=10, label_days=10)
    reg = ModelRegistry.from_settings(settings)
    reg.register(tiny_model, alias=None)
    reg.promote("v1")
    start = int(load_dataset(tiny_world).time_range[1]) + 1
    store = open_event_store(settings.serve.event_store_url(settings.workspace))
    store.append(feedback(tiny_world, 300, start, seed=2))
    store.close()
    result = retrain(settings, if_drift=True, progress=False)
    stored = [a for a in read_alerts(alerts_path(settings.workspace), None) if a.get("kind") == "drift"]
    # The check ran on the data with the new events; it trains exactly when that check alerted (and stored it).
    assert result.drift is not None or stored
    assert result.ran == bool(stored)
    if not result.ran:
        assert "no drift alert" in result.reason and reg.versions() == ["v1"]
        assert not (settings.workspace / "datasets").exists() or not any((settings.workspace / "datasets").iterdir())
        AlertLog(alerts_path(settings.workspace)).append({"kind": "drift", "time": "2999-01-01T00:00:00+00:00"})
        result = retrain(settings, if_drift=True, progress=False)  # a stored alert (from `finrec monitor`)
        assert result.ran and result.challenger == "v2" and result.drift is None
