"""The launcher is not part of a data-parallel two-tower: Spark's TorchDistributor and processes spawned here
train the same weights, bit for bit, for the same data, seed and number of workers."""

from __future__ import annotations

import numpy as np
import pytest

from finrec.retrieval.data_parallel import launch_local, launch_spark
from finrec.retrieval.two_tower import TwoTowerConfig, TwoTowerModel

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def test_torch_distributor_trains_the_weights_spawned_processes_train(spark: object) -> None:
    rng = np.random.default_rng(3)
    n_users, n_items = 300, 40
    user_x = rng.normal(size=(n_users, 6)).astype(np.float32)
    item_x = rng.normal(size=(n_items, 4)).astype(np.float32)
    history = rng.integers(-1, n_items, size=(n_users, 5))
    pairs = np.column_stack([rng.integers(n_users, size=700), rng.integers(n_items, size=700)])
    val = np.column_stack([np.arange(n_users), rng.integers(n_items, size=n_users)])
    args = (user_x, history, item_x, np.arange(n_items), pairs, val)
    cfg = TwoTowerConfig(max_epochs=2, recall_k=5, batch_size=128, workers=2)
    local = TwoTowerModel(cfg).fit(*args, launcher=launch_local)
    distributed = TwoTowerModel(cfg).fit(*args, launcher=launch_spark)
    assert distributed.history_[-1]["loss"] == local.history_[-1]["loss"]
    assert np.array_equal(distributed.user_embeddings(user_x, history), local.user_embeddings(user_x, history))
    assert np.array_equal(distributed.item_embeddings(item_x, np.arange(n_items)),
                          local.item_embeddings(item_x, np.arange(n_items)))  # fmt: skip
