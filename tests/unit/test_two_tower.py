"""Two-tower retrieval model: outcomes on planted data, logQ correction, cold start, persistence, validation.

Planted world: 2,000 users and 300 items in 10 latent tastes (30 items each). Features are noisy one-hots of the
taste (noise sd 0.5, plus 6 pure-noise columns). Each user's positives (history, training and validation) are
drawn from the items of their taste, and in every taste 3 "head" items are 20x as likely as the 27 others, so
head items are 60/87 = 69% of all positives.

Reference points for recall@20 on the validation pairs:
- random ranking: 20/300 = 0.067;
- knowing the taste but not popularity (any 20 of the 30 taste items): 0.667;
- Bayes optimum (the 3 head items plus 17 of the tail): (3*20 + 17) / 87 = 0.885.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from finrec.errors import ArtifactError
from finrec.retrieval.data_parallel import Group
from finrec.retrieval.index import ExactIndex
from finrec.retrieval.two_tower import META_FILE, WEIGHTS_FILE, TwoTowerConfig, TwoTowerModel, recall_at_k

N_TASTES = 10
N_HEAD = 3  # head items per taste
HEAD_WEIGHT = 20.0
N_FEATURES = N_TASTES + 6


@dataclass
class World:
    user_x: np.ndarray
    history: np.ndarray
    item_x: np.ndarray
    item_ids: np.ndarray
    pairs: np.ndarray
    val_pairs: np.ndarray
    user_taste: np.ndarray
    item_taste: np.ndarray
    head: np.ndarray  # bool per item


def noisy_one_hot(rng: np.random.Generator, labels: np.ndarray, noise: float = 0.5) -> np.ndarray:
    x = np.zeros((len(labels), N_FEATURES), dtype=np.float32)
    x[np.arange(len(labels)), labels] = 1.0
    return x + rng.normal(0.0, noise, x.shape).astype(np.float32)


def make_world(seed: int = 0, n_users: int = 2000, n_items: int = 300, n_train: int = 5, n_val: int = 2) -> World:
    rng = np.random.default_rng(seed)
    item_taste = np.arange(n_items) % N_TASTES
    head = np.arange(n_items) // N_TASTES < N_HEAD
    popularity = np.where(head, HEAD_WEIGHT, 1.0)
    user_taste = rng.integers(N_TASTES, size=n_users)
    members = [np.flatnonzero(item_taste == t) for t in range(N_TASTES)]
    probs = [popularity[m] / popularity[m].sum() for m in members]

    def draw(n: int) -> np.ndarray:
        return np.stack([rng.choice(members[t], size=n, p=probs[t]) for t in user_taste])

    history = draw(5)
    lengths = rng.integers(0, 6, size=n_users)  # some users have no history at all
    history[np.arange(5)[None, :] >= lengths[:, None]] = -1
    users = np.repeat(np.arange(n_users), n_train)
    val_users = np.repeat(np.arange(n_users), n_val)
    return World(
        user_x=noisy_one_hot(rng, user_taste),
        history=history.astype(np.int64),
        item_x=noisy_one_hot(rng, item_taste),
        item_ids=np.arange(n_items, dtype=np.int64),
        pairs=np.stack([users, draw(n_train).ravel()], axis=1).astype(np.int64),
        val_pairs=np.stack([val_users, draw(n_val).ravel()], axis=1).astype(np.int64),
        user_taste=user_taste,
        item_taste=item_taste,
        head=head,
    )


def fit(world: World, **config: object) -> TwoTowerModel:
    cfg = TwoTowerConfig(**{"recall_k": 20, **config})  # type: ignore[arg-type]
    return TwoTowerModel(cfg).fit(
        world.user_x, world.history, world.item_x, world.item_ids, world.pairs, world.val_pairs
    )


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


@pytest.fixture(scope="module")
def model(world: World) -> TwoTowerModel:
    return fit(world)  # logQ on: the default


@pytest.fixture(scope="module")
def model_no_logq(world: World) -> TwoTowerModel:
    return fit(world, logq_correction=False)


@pytest.fixture(scope="module")
def tiny() -> World:
    return make_world(seed=7, n_users=200, n_items=40, n_train=3, n_val=1)


def embeddings(model: TwoTowerModel, world: World) -> tuple[np.ndarray, np.ndarray]:
    return model.user_embeddings(world.user_x, world.history), model.item_embeddings(world.item_x, world.item_ids)


# --------------------------------------------------------------------------- planted signal


def test_recall_far_above_random_and_near_optimum(model: TwoTowerModel, world: World) -> None:
    users, items = embeddings(model, world)
    recall = recall_at_k(users, items, world.val_pairs, 20)
    random_baseline = 20 / len(items)
    assert recall > 5 * random_baseline
    # Above what a popularity-blind taste classifier can reach (0.667), close to the 0.885 optimum.
    assert recall > 0.8
    assert recall == pytest.approx(model.best_val_recall_, abs=1e-9)


def test_retrieves_the_planted_taste(model: TwoTowerModel, world: World) -> None:
    users, items = embeddings(model, world)
    _, top = ExactIndex(items).search(users, 10)
    same_taste = world.item_taste[top] == world.user_taste[:, None]
    assert same_taste.mean() > 0.9
    assert np.allclose(np.linalg.norm(users, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(items, axis=1), 1, atol=1e-5)
    assert users.dtype == np.float32 and items.dtype == np.float32
    assert users.shape == (len(world.user_x), 32) and items.shape == (len(world.item_x), 32)


def test_training_history_and_early_stopping(model: TwoTowerModel) -> None:
    cfg = model.config
    history = model.history_
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    recalls = [h["val_recall"] for h in history]
    best = int(np.argmax(recalls)) + 1
    assert model.best_epoch_ == best
    assert model.best_val_recall_ == max(recalls)
    assert history[-1]["loss"] < history[0]["loss"]
    # Either it ran out of epochs, or it stopped exactly `patience` epochs after the best one.
    assert len(history) == cfg.max_epochs or len(history) - best == cfg.patience


def test_logq_correction_restores_popularity(model: TwoTowerModel, model_no_logq: TwoTowerModel, world: World) -> None:
    """Without the correction, popular items are over-used as in-batch negatives and pushed down.

    The uncorrected in-batch softmax learns scores ~ log p(item|user) - log q(item): popularity is subtracted,
    so the head items lose their place at the top. With the correction the scores estimate log p(item|user),
    and the top-10 holds the head share an oracle would: the 3 head items of the user's taste out of 10 = 0.3.
    """
    share, recall = {}, {}
    for name, m in (("logq", model), ("plain", model_no_logq)):
        users, items = embeddings(m, world)
        _, top = ExactIndex(items).search(users, 10)
        share[name] = world.head[top].mean()
        recall[name] = recall_at_k(users, items, world.val_pairs, 20)
    oracle_share = N_HEAD / 10
    assert share["logq"] > share["plain"] + 0.05
    assert abs(share["logq"] - oracle_share) < 0.05
    assert abs(share["logq"] - oracle_share) < abs(share["plain"] - oracle_share)
    # Recall stays comparable (in fact better: the planted positives are popularity-skewed).
    assert recall["logq"] > recall["plain"] - 0.02
    assert recall["plain"] > 0.6


def test_cold_start_item_lands_with_its_taste(model: TwoTowerModel, world: World) -> None:
    """A new item (id -1) with the feature prototype of taste t ranks in the top 10% for users of taste t."""
    n_items = len(world.item_x)
    prototypes = np.zeros((N_TASTES, N_FEATURES), dtype=np.float32)
    prototypes[np.arange(N_TASTES), np.arange(N_TASTES)] = 1.0
    items = model.item_embeddings(
        np.vstack([world.item_x, prototypes]), np.concatenate([world.item_ids, np.full(N_TASTES, -1)])
    )
    users = model.user_embeddings(world.user_x, world.history)
    scores = users @ items.T
    top_decile = 0.1 * n_items
    all_ranks = []
    for t in range(N_TASTES):
        rows = scores[world.user_taste == t]
        # 0-based rank of the cold item among the warm catalogue.
        ranks = (rows[:, :n_items] > rows[:, [n_items + t]]).sum(axis=1)
        assert np.median(ranks) < top_decile, f"taste {t}: median rank {np.median(ranks)}"
        all_ranks.append(ranks)
    assert np.mean(np.concatenate(all_ranks) < top_decile) > 0.9


# --------------------------------------------------------------------------- persistence


def test_save_load_gives_identical_embeddings(model: TwoTowerModel, world: World, tmp_path: Path) -> None:
    model.save(tmp_path / "tt")
    assert sorted(p.name for p in (tmp_path / "tt").iterdir()) == sorted([META_FILE, WEIGHTS_FILE])
    loaded = TwoTowerModel.load(tmp_path / "tt")
    assert loaded.config == model.config
    assert loaded.history_ == model.history_
    assert loaded.best_epoch_ == model.best_epoch_
    for a, b in zip(embeddings(model, world), embeddings(loaded, world), strict=True):
        assert np.array_equal(a, b)
    meta = json.loads((tmp_path / "tt" / META_FILE).read_text())
    assert meta["config"]["hidden"] == [128]  # plain JSON, no pickle anywhere


def test_load_rejects_missing_or_corrupt_files(tiny: World, tmp_path: Path) -> None:
    m = fit(tiny, max_epochs=1)
    folder = tmp_path / "tt"
    m.save(folder)

    with pytest.raises(ArtifactError, match="does not exist"):
        TwoTowerModel.load(tmp_path / "nowhere")

    weights = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match=WEIGHTS_FILE) as err:
        TwoTowerModel.load(folder)
    assert err.value.hint

    corrupt = bytearray(weights)
    corrupt[-5] ^= 0xFF
    (folder / WEIGHTS_FILE).write_bytes(bytes(corrupt))
    with pytest.raises(ArtifactError, match="corrupt"):
        TwoTowerModel.load(folder)

    # Garbage whose checksum matches (e.g. the file and the JSON both overwritten) is still caught on reading.
    (folder / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    meta = json.loads((folder / META_FILE).read_text())
    from finrec.artifacts import sha256_file

    meta["weights_sha256"] = sha256_file(folder / WEIGHTS_FILE)
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="safetensors"):
        TwoTowerModel.load(folder)

    (folder / WEIGHTS_FILE).write_bytes(weights)
    (folder / META_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid"):
        TwoTowerModel.load(folder)

    (folder / META_FILE).unlink()
    with pytest.raises(ArtifactError, match=META_FILE):
        TwoTowerModel.load(folder)


def test_load_rejects_weights_of_another_shape(tiny: World, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    fit(tiny, max_epochs=1).save(a)
    fit(tiny, max_epochs=1, embedding_dim=8).save(b)
    (a / WEIGHTS_FILE).write_bytes((b / WEIGHTS_FILE).read_bytes())
    meta = json.loads((a / META_FILE).read_text())
    meta["weights_sha256"] = json.loads((b / META_FILE).read_text())["weights_sha256"]
    (a / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="does not match"):
        TwoTowerModel.load(a)


# --------------------------------------------------------------------------- reproducibility, weights, details


def test_same_seed_same_embeddings_and_global_state_untouched(tiny: World) -> None:
    rng_state = torch.get_rng_state()
    threads = torch.get_num_threads()
    a, b = fit(tiny, max_epochs=3), fit(tiny, max_epochs=3)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.get_num_threads() == threads
    for x, y in zip(embeddings(a, tiny), embeddings(b, tiny), strict=True):
        assert np.array_equal(x, y)
    c = fit(tiny, max_epochs=3, seed=1)
    assert not np.array_equal(embeddings(a, tiny)[1], embeddings(c, tiny)[1])


def test_weights_are_relative(tiny: World) -> None:
    cfg = TwoTowerConfig(max_epochs=2, recall_k=10)
    args = (tiny.user_x, tiny.history, tiny.item_x, tiny.item_ids, tiny.pairs, tiny.val_pairs)
    plain = TwoTowerModel(cfg).fit(*args)
    scaled = TwoTowerModel(cfg).fit(*args, weights=np.full(len(tiny.pairs), 3.0, dtype=np.float32))
    assert np.array_equal(embeddings(plain, tiny)[0], embeddings(scaled, tiny)[0])
    graded = np.where(np.arange(len(tiny.pairs)) % 2 == 0, 1.0, 2.0).astype(np.float32)
    other = TwoTowerModel(cfg).fit(*args, weights=graded)
    assert not np.array_equal(embeddings(plain, tiny)[0], embeddings(other, tiny)[0])


def test_an_item_twice_in_a_batch_is_not_its_own_negative(tiny: World) -> None:
    m = fit(tiny, max_epochs=1, id_dropout=0.0)
    n_items = len(tiny.item_x)
    data_x = torch.from_numpy(tiny.user_x)
    from finrec.retrieval.two_tower import _Data

    data = _Data(
        user_x=data_x,
        history_ids=torch.from_numpy(np.where(tiny.history >= 0, tiny.item_ids[tiny.history], -1)),
        item_x=torch.from_numpy(tiny.item_x),
        item_ids=torch.from_numpy(tiny.item_ids),
        log_q=torch.zeros(n_items),
    )
    gen = torch.Generator().manual_seed(0)
    w = torch.ones(4)
    with torch.no_grad():
        # Four users, one item: every other column is the same item, so all are masked and the loss is 0.
        same = torch.tensor([[0, 5], [1, 5], [2, 5], [3, 5]])
        assert float(m._batch_loss(data, same, w, gen, Group())) == pytest.approx(0.0, abs=1e-6)
        # Two distinct items, each twice: a row's positive counts once, the other item twice (it was sampled
        # twice as a negative, which is what logQ accounts for).
        mixed = torch.tensor([[0, 5], [1, 5], [2, 6], [3, 6]])
        u = m.net_.user(data.user_x[:4], data.history_ids[:4])
        v = m.net_.item(data.item_x[[5, 6]], data.item_ids[[5, 6]])
        s = u @ v.T / m.config.temperature  # (4 users, 2 items)
        positive = torch.tensor([0, 0, 1, 1])
        pos = s[torch.arange(4), positive]
        neg = s[torch.arange(4), 1 - positive]
        expected = (torch.logsumexp(torch.stack([pos, neg, neg], dim=1), dim=1) - pos).mean()
        assert float(m._batch_loss(data, mixed, w, gen, Group())) == pytest.approx(float(expected), rel=1e-5)


def test_cold_items_in_training_catalogue_and_progress(tiny: World, capsys: pytest.CaptureFixture[str]) -> None:
    ids = tiny.item_ids.copy()
    ids[::4] = -1  # a quarter of the catalogue has no id, some of them among the positives
    m = TwoTowerModel(TwoTowerConfig(max_epochs=2, recall_k=10)).fit(
        tiny.user_x, tiny.history, tiny.item_x, ids, tiny.pairs, tiny.val_pairs, progress=True
    )
    assert m.n_ids_ == int(ids.max()) + 1
    assert np.isfinite(m.item_embeddings(tiny.item_x, ids)).all()
    assert "two-tower" in capsys.readouterr().err
    # Every item cold: features alone.
    cold = TwoTowerModel(TwoTowerConfig(max_epochs=1, recall_k=10)).fit(
        tiny.user_x, tiny.history, tiny.item_x, np.full(len(ids), -1), tiny.pairs, tiny.val_pairs
    )
    assert cold.n_ids_ == 0
    assert np.isfinite(cold.user_embeddings(tiny.user_x, tiny.history)).all()


def test_config_round_trips_through_json() -> None:
    cfg = TwoTowerConfig(hidden=[64, 32], temperature=0.1)  # type: ignore[arg-type]
    assert cfg.hidden == (64, 32)
    assert TwoTowerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TwoTowerConfig.from_dict({"embeding_dim": 3})


@pytest.mark.parametrize(
    ("field", "value"),
    [("embedding_dim", 0), ("temperature", 0.0), ("id_dropout", 1.0), ("hidden", (0,)), ("batch_size", 1.5),
     ("workers", 0)],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TwoTowerConfig(**{field: value})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- data-parallel training


@pytest.mark.slow
def test_workers_take_the_one_process_steps(tiny: World, tmp_path: Path) -> None:
    """Processes that each embed a share of every batch (three pad each batch: 512 and 88 rows are not multiples
    of 3) take one process's steps: its losses, early stopping and embeddings, up to float summation order
    (without the gathered negatives each process's softmax would see a third of the batch, and the loss would
    differ by far more). The same workers twice give the same weights bit for bit, and a bundle says how many."""
    one = fit(tiny, max_epochs=3)
    models = {k: fit(tiny, max_epochs=3, workers=k) for k in (2, 3)}
    for k, m in models.items():
        np.testing.assert_allclose([h["loss"] for h in m.history_], [h["loss"] for h in one.history_], rtol=1e-5)
        assert [h["val_recall"] for h in m.history_] == [h["val_recall"] for h in one.history_], k
        assert m.best_epoch_ == one.best_epoch_
        for a, b in zip(embeddings(m, tiny), embeddings(one, tiny), strict=True):
            assert np.abs(a - b).max() < 1e-3, k
    again = fit(tiny, max_epochs=3, workers=2)
    for a, b in zip(embeddings(again, tiny), embeddings(models[2], tiny), strict=True):
        assert np.array_equal(a, b)
    models[2].save(tmp_path)
    assert json.loads((tmp_path / META_FILE).read_text())["config"]["workers"] == 2
    assert TwoTowerModel.load(tmp_path).config.workers == 2


@pytest.mark.slow
def test_a_failed_process_is_a_clear_error(tiny: World) -> None:
    """A data-parallel process that fails (here: weights of another shape than its network) ends the fit with
    an error naming the process, what it raised and what to change, not a traceback of the child."""
    from finrec.errors import FinrecError
    from finrec.retrieval import data_parallel

    def broken(model: TwoTowerModel, payload: data_parallel.Payload, workers: int) -> None:
        payload.shapes["n_item_features"] += 1
        data_parallel.launch_local(model, payload, workers)

    failed = r"process \d of the two-tower's 2 data-parallel processes failed: .*size"
    with pytest.raises(FinrecError, match=failed) as err:
        TwoTowerModel(TwoTowerConfig(max_epochs=1, recall_k=5, workers=2)).fit(
            tiny.user_x, tiny.history, tiny.item_x, tiny.item_ids, tiny.pairs, tiny.val_pairs, launcher=broken
        )
    assert "two_tower_workers" in (err.value.hint or "")


# --------------------------------------------------------------------------- input validation


def _args(w: World) -> dict[str, np.ndarray]:
    return {
        "user_x": w.user_x,
        "history": w.history,
        "item_x": w.item_x,
        "item_ids": w.item_ids,
        "pairs": w.pairs,
        "val_pairs": w.val_pairs,
    }


def _nan_user_x(w: World) -> dict[str, np.ndarray]:
    x = w.user_x.copy()
    x[3, 2] = np.nan
    return {"user_x": x}


BAD_FIT_INPUTS = {
    "nan features": (_nan_user_x, "user_x contains NaN"),
    "int features": (lambda w: {"item_x": w.item_x.astype(np.int64)}, "item_x must hold floating"),
    "1-d features": (lambda w: {"user_x": w.user_x[:, 0]}, "user_x must be a 2-D"),
    "float history": (lambda w: {"history": w.history.astype(np.float32)}, "history must hold integers"),
    "history rows": (lambda w: {"history": w.history[:-1]}, "history has 199 rows"),
    "history range": (lambda w: {"history": np.full_like(w.history, 40)}, r"history has .* outside \[-1, 40\)"),
    "pair item range": (lambda w: {"pairs": w.pairs + [0, 100]}, r"pairs\[:, 1\] has"),
    "pair user range": (lambda w: {"val_pairs": w.val_pairs - [1, 0]}, r"val_pairs\[:, 0\] has"),
    "pair shape": (lambda w: {"pairs": w.pairs[:, :1]}, r"pairs must have shape \(n, 2\)"),
    "empty pairs": (lambda w: {"pairs": w.pairs[:0]}, "pairs is empty"),
    "ids length": (lambda w: {"item_ids": w.item_ids[:-1]}, "item_ids has 39 entries"),
    "ids range": (lambda w: {"item_ids": w.item_ids - 2}, "item_ids must be id-table rows"),
}


def test_without_validation_pairs_a_refit_runs_every_epoch_and_keeps_the_last(world: World) -> None:
    """A refit after early stopping chose the epochs: no validation, the epochs asked for, the last kept."""
    args = {**_args(world), "val_pairs": world.val_pairs[:0]}
    refit = TwoTowerModel(TwoTowerConfig(max_epochs=3, patience=1)).fit(**args)
    assert [h["epoch"] for h in refit.history_] == [1, 2, 3] and refit.best_epoch_ == 3
    assert all(np.isnan(h["val_recall"]) for h in refit.history_)
    again = TwoTowerModel(TwoTowerConfig(max_epochs=3, patience=1)).fit(**args)  # the same seed, the same towers
    assert np.array_equal(embeddings(refit, world)[0], embeddings(again, world)[0])
    # ... and they learnt the planted taste: held-out recall far above random (20 of 300 items).
    assert recall_at_k(*embeddings(refit, world), world.val_pairs, 20) > 5 * 20 / len(world.item_x)


@pytest.mark.parametrize("case", sorted(BAD_FIT_INPUTS))
def test_fit_rejects_bad_inputs(tiny: World, case: str) -> None:
    change, message = BAD_FIT_INPUTS[case]
    args = {**_args(tiny), **change(tiny)}
    with pytest.raises(ValueError, match=message):
        TwoTowerModel(TwoTowerConfig(max_epochs=1)).fit(**args)


@pytest.mark.parametrize(
    ("weights", "message"),
    [(np.ones(3), r"weights must have shape"), ("negative", "non-negative"), ("zero", "all zero")],
)
def test_fit_rejects_bad_weights(tiny: World, weights: object, message: str) -> None:
    n = len(tiny.pairs)
    if isinstance(weights, str):
        weights = np.zeros(n, dtype=np.float32) if weights == "zero" else -np.ones(n, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        TwoTowerModel(TwoTowerConfig(max_epochs=1)).fit(**_args(tiny), weights=weights)  # type: ignore[arg-type]


def test_embedding_methods_validate(tiny: World) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        TwoTowerModel().user_embeddings(tiny.user_x, tiny.history)
    m = fit(tiny, max_epochs=1)
    with pytest.raises(ValueError, match="user_x has 15 columns"):
        m.user_embeddings(tiny.user_x[:, 1:], tiny.history)
    with pytest.raises(ValueError, match="history has"):
        m.user_embeddings(tiny.user_x, np.full_like(tiny.history, 99))
    with pytest.raises(ValueError, match="item_ids has"):
        m.item_embeddings(tiny.item_x, tiny.item_ids + 1)  # id 40 is beyond the 40-row table
    with pytest.raises(ValueError, match="item_x contains NaN"):
        m.item_embeddings(np.full_like(tiny.item_x, np.inf), tiny.item_ids)
    # Small batches of new users work; an empty batch gives an empty array.
    assert m.user_embeddings(tiny.user_x[:0], tiny.history[:0]).shape == (0, 32)
