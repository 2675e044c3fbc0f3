"""Two-tower candidate retrieval (Yi et al., RecSys 2019, "Sampling-bias-corrected neural modeling for large
corpus item recommendations").

Inputs are plain numpy arrays handed over by the data layer (this module never reads files):

- ``user_x`` float (n_users, d_u) and ``item_x`` float (n_items, d_i): standardised dense features;
- ``history`` int (n_users, H): item *rows* each user interacted with before the cutoff, padded with -1;
- ``item_ids`` int (n_items,): each item's row in the id-embedding table, -1 for items unknown at training time;
- ``pairs`` int (n, 2): (user_row, item_row) positives, optional ``weights`` (n,).

Model
-----
A single id-embedding table (``n_ids = max(item_ids) + 1`` rows, ``embedding_dim`` wide) is shared by both towers.

- User tower: MLP over ``[user_x, masked mean of the id embeddings of the history items]`` (zeros when the user
  has no history, or only items without an id), L2-normalised.
- Item tower: MLP over ``[item_x, id embedding]`` (zeros for id -1), L2-normalised. During training each item's id
  embedding is zeroed with probability ``id_dropout`` (not rescaled: zero means "unknown id" exactly as for a
  cold item), so the features alone must place an item; that gives cold-start items a sensible embedding.

Loss
----
In-batch sampled softmax: for a batch of B positive pairs, the logits are ``<u_i, v_j> / temperature`` for all
``i, j``; row ``i``'s label is column ``i``. Columns holding the same item as row ``i``'s positive (duplicates in
the batch) are masked to ``-inf`` so an item is never its own negative. With ``logq_correction`` every logit of
column ``j`` gets ``- log q_j`` where ``q_j`` is the probability that a random training pair has item ``j``:
batches are uniform samples of the training pairs, so this empirical frequency *is* the in-batch sampling
probability the paper's streaming estimator approximates (we can count exactly because the pairs fit in memory).
The correction is applied after the temperature scaling, to the positive column too, as in the paper.

What the correction does to popularity: without it the in-batch softmax is minimised by scores close to
``log p(item | user) - log q(item)``, i.e. popularity is *subtracted* (popular items are over-used as negatives);
with it the scores estimate ``log p(item | user)``, so popular items keep the place their frequency earns them.
The correction is a training-time device only: serving uses the plain inner product.

Per-pair ``weights`` (rescaled to mean 1 so the learning rate does not depend on their unit) multiply the
per-row losses. Training uses AdamW and stops early on validation recall@``recall_k`` computed by exact search
over all items; the best epoch's weights are kept.

Reproducibility: the weights are initialised under ``torch.manual_seed(config.seed)`` inside ``fork_rng`` (the
caller's global RNG state is left as it was), batches come from ``numpy.random.default_rng(seed)`` and id dropout
from a seeded ``torch.Generator``, so the same inputs and seed give bit-identical embeddings on the same machine
and thread count.

Threads: training and inference run torch on one intra-op thread (restored afterwards). The matrices are small
(a 512-row batch through a 128-wide MLP), so a second thread gains nothing measurable, while on a busy 2-core
machine OpenMP's spinning workers made a 2-second fit take 30-50 seconds. One thread also makes the embeddings
independent of the caller's ``torch.set_num_threads`` setting, so they are bit-identical across processes. To use
more cores, ``workers`` > 1 trains data-parallel, one process (and thread) each: ``finrec.retrieval.data_parallel``.

Artifacts (``save``/``load``) hold no pickle: ``two_tower.safetensors`` (weights and the history-row to id map)
and ``two_tower.json`` (config, shapes, training history and the weights' sha256).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from finrec import __version__
from finrec.artifacts import sha256_file
from finrec.errors import ArtifactError
from finrec.retrieval.data_parallel import Group
from finrec.retrieval.index import ExactIndex

__all__ = ["TwoTowerConfig", "TwoTowerModel", "recall_at_k"]

FORMAT = "finrec.two_tower"
FORMAT_VERSION = 1
WEIGHTS_FILE = "two_tower.safetensors"
META_FILE = "two_tower.json"
_ITEM_IDS_KEY = "meta.history_item_ids"  # extra tensor next to the state dict in the weights file

# Rows per forward pass in user_embeddings / item_embeddings: bounds memory at inference time.
INFERENCE_BATCH = 8192


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TwoTowerConfig:
    """Hyper-parameters of :class:`TwoTowerModel`; JSON-serialisable through ``to_dict``/``from_dict``."""

    embedding_dim: int = 32
    hidden: tuple[int, ...] = (128,)
    # Fixed, not learned. With L2-normalised towers the temperature sets how peaked the softmax can be, and the
    # logQ correction is added in logit units, so its weight relative to the similarity term is 1 / temperature.
    # A learned temperature drifts during training (typically downwards, sharpening until it overfits the
    # in-batch negatives), which silently changes how strongly the correction acts; the paper treats it as a
    # tuned hyper-parameter too. 0.05 gives logits in [-20, 20], comfortably above log q differences.
    temperature: float = 0.05
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    batch_size: int = 512
    max_epochs: int = 40
    patience: int = 4
    id_dropout: float = 0.2
    logq_correction: bool = True
    recall_k: int = 50
    seed: int = 0
    # Data-parallel processes (finrec.retrieval.data_parallel): each embeds its share of every batch, the
    # softmax still runs over the whole batch. Part of the model's definition: the same seed and workers give
    # the same weights whatever starts the processes; other workers, the same model up to float summation order.
    workers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for name in ("embedding_dim", "batch_size", "max_epochs", "patience", "recall_k", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TwoTowerConfig.{name} must be a positive integer, got {value!r}")
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"TwoTowerConfig.hidden must be positive layer widths, got {self.hidden!r}")
        for name in ("temperature", "learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"TwoTowerConfig.{name} must be a positive number, got {value!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise ValueError(f"TwoTowerConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.id_dropout, int | float) and 0 <= self.id_dropout < 1):
            raise ValueError(f"TwoTowerConfig.id_dropout must be in [0, 1), got {self.id_dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TwoTowerConfig.seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TwoTowerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TwoTowerConfig fields: {unknown}")
        return cls(**data)


# --------------------------------------------------------------------------- input validation


def _float_matrix(name: str, arr: Any, n_cols: int | None = None, n_rows: int | None = None) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must hold floating-point features (float32), got dtype {a.dtype}")
    if n_rows is not None and a.shape[0] != n_rows:
        raise ValueError(f"{name} has {a.shape[0]} rows, expected {n_rows}")
    if n_cols is not None and a.shape[1] != n_cols:
        raise ValueError(f"{name} has {a.shape[1]} columns, the model was trained with {n_cols}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or infinite values ({bad} rows affected)")
    return a


def _int_array(name: str, arr: Any, ndim: int) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D integer array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers (int64), got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _check_range(name: str, values: np.ndarray, low: int, high: int, what: str) -> None:
    """All ``values`` in ``[low, high)`` or ValueError naming the first offender."""
    if values.size == 0:
        return
    bad = (values < low) | (values >= high)
    if bad.any():
        first = np.argwhere(bad)[0]
        at = tuple(int(i) for i in first)
        raise ValueError(
            f"{name} has {int(bad.sum())} value(s) outside [{low}, {high}) ({what}); "
            f"first at index {at if len(at) > 1 else at[0]}: {int(values[tuple(first)])}"
        )


def _history(name: str, arr: Any, n_rows: int, n_items: int) -> np.ndarray:
    h = _int_array(name, arr, 2)
    if h.shape[0] != n_rows:
        raise ValueError(f"{name} has {h.shape[0]} rows but user_x has {n_rows}")
    _check_range(name, h, -1, n_items, f"item rows, -1 for padding, {n_items} items")
    return h


def _pairs(name: str, arr: Any, n_users: int, n_items: int, allow_empty: bool = False) -> np.ndarray:
    p = _int_array(name, arr, 2)
    if p.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2) of (user_row, item_row), got {p.shape}")
    if p.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    _check_range(f"{name}[:, 0]", p[:, 0], 0, n_users, f"user rows, {n_users} users")
    _check_range(f"{name}[:, 1]", p[:, 1], 0, n_items, f"item rows, {n_items} items")
    return p


def _weights(arr: Any, n: int) -> np.ndarray:
    w = np.asarray(arr)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},) (one per training pair), got {w.shape}")
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)) or w.dtype == np.bool_:
        raise ValueError(f"weights must be numeric, got dtype {w.dtype}")
    w = w.astype(np.float32)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    if w.sum() <= 0:
        raise ValueError("weights are all zero: nothing to learn from")
    return w


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block (see the module docstring)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------- network


def _mlp(d_in: int, hidden: tuple[int, ...], d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


class _TwoTowerNet(nn.Module):
    def __init__(self, d_user: int, d_item: int, n_ids: int, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        # At least one row so that an all-cold catalogue (n_ids == 0) still has a valid (unused) table.
        self.id_embedding = nn.Embedding(max(n_ids, 1), dim)
        # Small initial id embeddings: features drive the first epochs, ids then learn what features miss.
        nn.init.normal_(self.id_embedding.weight, std=0.1)
        self.user_mlp = _mlp(d_user + dim, hidden, dim)
        self.item_mlp = _mlp(d_item + dim, hidden, dim)

    def _ids(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Id embeddings where ``keep``, zeros elsewhere (any shape of ``ids``)."""
        emb = self.id_embedding(ids.clamp(min=0))
        return emb * keep.unsqueeze(-1).to(emb.dtype)

    def user(self, user_x: torch.Tensor, history_ids: torch.Tensor) -> torch.Tensor:
        mask = history_ids >= 0
        total = self._ids(history_ids, mask).sum(dim=1)
        mean = total / mask.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)
        return F.normalize(self.user_mlp(torch.cat([user_x, mean], dim=1)), dim=1)

    def item(self, item_x: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        mask = ids >= 0 if keep is None else (ids >= 0) & keep
        return F.normalize(self.item_mlp(torch.cat([item_x, self._ids(ids, mask)], dim=1)), dim=1)


# --------------------------------------------------------------------------- evaluation


def recall_at_k(user_emb: np.ndarray, item_emb: np.ndarray, pairs: np.ndarray, k: int) -> float:
    """Mean over users in ``pairs`` of the share of their items found in their exact top-``k`` (all items ranked).

    ``user_emb`` rows are indexed by ``pairs[:, 0]`` and ``item_emb`` rows by ``pairs[:, 1]``. Duplicate pairs
    count once. ``k`` larger than the catalogue is capped.
    """
    pairs = np.unique(np.asarray(pairs, dtype=np.int64), axis=0)
    users, inverse = np.unique(pairs[:, 0], return_inverse=True)
    _, top = ExactIndex(item_emb).search(user_emb[users], min(k, len(item_emb)))
    hit = (top[inverse] == pairs[:, 1:2]).any(axis=1)
    per_user_hits = np.bincount(inverse, weights=hit, minlength=len(users))
    per_user_total = np.bincount(inverse, minlength=len(users))
    return float(np.mean(per_user_hits / per_user_total))


# --------------------------------------------------------------------------- model


@dataclass
class _Data:
    """Training tensors, prepared once per fit."""

    user_x: torch.Tensor
    history_ids: torch.Tensor
    item_x: torch.Tensor
    item_ids: torch.Tensor
    log_q: torch.Tensor


class TwoTowerModel:
    """Two-tower retrieval model; sklearn-style (``__init__`` stores the config, learned state ends in ``_``).

    Fitted attributes: ``net_`` (the torch module), ``item_ids_`` (the id of every item row seen at fit, used to
    look up history items), ``n_user_features_``, ``n_item_features_``, ``n_items_``, ``n_ids_``, ``item_log_q_``
    (log sampling probability per item row, ``-inf`` for items without training pairs), ``history_`` (one dict
    per epoch: ``epoch`` (1-based), ``loss``, ``val_recall``, ``seconds``), ``best_epoch_`` (1-based) and
    ``best_val_recall_``.
    """

    def __init__(self, config: TwoTowerConfig | None = None) -> None:
        self.config = config if config is not None else TwoTowerConfig()

    # ------------------------------------------------------------------ training

    def fit(
        self,
        user_x: np.ndarray,
        history: np.ndarray,
        item_x: np.ndarray,
        item_ids: np.ndarray,
        pairs: np.ndarray,
        val_pairs: np.ndarray,
        weights: np.ndarray | None = None,
        progress: bool = False,
        launcher: Callable[[TwoTowerModel, Any, int], None] | None = None,
    ) -> TwoTowerModel:
        """Train on ``pairs`` and early-stop on validation recall@``recall_k`` over ``val_pairs``.

        With no ``val_pairs`` (a refit after validation chose the epochs), ``max_epochs`` epochs run and the
        last one is kept. With ``workers`` > 1 the fit runs in that many processes started by ``launcher``
        (default :func:`~finrec.retrieval.data_parallel.launch_local`; Spark's is
        :func:`~finrec.retrieval.data_parallel.launch_spark`).
        """
        cfg = self.config
        ux = _float_matrix("user_x", user_x)
        ix = _float_matrix("item_x", item_x)
        n_users, n_items = len(ux), len(ix)
        if n_users == 0 or n_items == 0:
            raise ValueError(f"need at least one user and one item, got {n_users} users and {n_items} items")
        ids = _int_array("item_ids", item_ids, 1)
        if ids.shape[0] != n_items:
            raise ValueError(f"item_ids has {ids.shape[0]} entries but item_x has {n_items} rows")
        if (ids < -1).any():
            raise ValueError(f"item_ids must be id-table rows >= 0, or -1 for unknown items; got {int(ids.min())}")
        hist = _history("history", history, n_users, n_items)
        train = _pairs("pairs", pairs, n_users, n_items)
        val = _pairs("val_pairs", val_pairs, n_users, n_items, allow_empty=True)
        w = np.ones(len(train), dtype=np.float32) if weights is None else _weights(weights, len(train))
        w = w / w.mean()

        n_ids = int(ids.max()) + 1 if (ids >= 0).any() else 0
        counts = np.bincount(train[:, 1], minlength=n_items).astype(np.float64)
        with np.errstate(divide="ignore"):
            log_q = np.log(counts / counts.sum())

        self.item_ids_ = ids
        self.n_user_features_ = ux.shape[1]
        self.n_item_features_ = ix.shape[1]
        self.n_items_ = n_items
        self.n_ids_ = n_ids
        self.item_log_q_ = log_q.astype(np.float32)

        history_ids = np.where(hist >= 0, ids[np.clip(hist, 0, None)], -1)
        data = _Data(
            user_x=torch.from_numpy(ux),
            history_ids=torch.from_numpy(history_ids),
            item_x=torch.from_numpy(ix),
            item_ids=torch.from_numpy(ids),
            # Items of a batch always have pairs, so their log q is finite.
            log_q=torch.from_numpy(np.where(np.isfinite(log_q), log_q, 0.0).astype(np.float32)),
        )
        with _one_torch_thread():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                net = _TwoTowerNet(ux.shape[1], ix.shape[1], n_ids, cfg.embedding_dim, cfg.hidden)
            self.net_ = net
            if cfg.workers == 1:
                self._train(data, train, val, w, progress)
                return self
        from finrec.retrieval import data_parallel

        shapes = {"n_user_features": ux.shape[1], "n_item_features": ix.shape[1], "n_ids": n_ids}
        initial = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
        arrays = {f.name: getattr(data, f.name).numpy() for f in fields(_Data)}
        payload = data_parallel.Payload(cfg.to_dict(), shapes, initial, arrays, train, val, w, progress)
        (launcher or data_parallel.launch_local)(self, payload, cfg.workers)
        net.eval()
        return self

    def _train(self, data: _Data, train: np.ndarray, val: np.ndarray, w: np.ndarray, progress: bool,
               group: Group | None = None) -> None:  # fmt: skip
        """The training loop, in one process or in one of a data-parallel group's (``group``: each process then
        runs it with the same batches and takes the same steps)."""
        cfg = self.config
        group = group or Group()
        net = self.net_
        rng = np.random.default_rng(cfg.seed)
        dropout_gen = torch.Generator().manual_seed(cfg.seed)
        optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        pairs_t = torch.from_numpy(train)
        w_t = torch.from_numpy(w)

        self.history_: list[dict[str, float]] = []
        best_recall, best_epoch = -math.inf, 0
        best_state = copy.deepcopy(net.state_dict())
        stale = 0
        epochs = tqdm(range(1, cfg.max_epochs + 1), desc="two-tower", unit="epoch", disable=not progress)
        for epoch in epochs:
            start = time.perf_counter()
            net.train()
            order = torch.from_numpy(rng.permutation(len(train)))
            total_loss = 0.0
            for lo in range(0, len(order), cfg.batch_size):
                idx = order[lo : lo + cfg.batch_size]
                loss = self._batch_loss(data, pairs_t[idx], w_t[idx], dropout_gen, group)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                group.sum_gradients(net.parameters())
                optimiser.step()
                total_loss += float(loss.detach()) * len(idx)
            recall = math.nan
            if len(val):
                recall = group.from_first(self._validation_recall(data, val) if group.rank == 0 else 0.0)
            record = {
                "epoch": epoch,
                "loss": group.total(total_loss) / len(train),
                "val_recall": recall,
                "seconds": time.perf_counter() - start,
            }
            self.history_.append(record)
            epochs.set_postfix(loss=f"{record['loss']:.4f}", recall=f"{recall:.4f}")
            if not len(val):  # a refit with a fixed number of epochs: the last one is kept
                best_epoch = epoch
                continue
            if recall > best_recall:
                best_recall, best_epoch, stale = recall, epoch, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        epochs.close()
        if len(val):
            net.load_state_dict(best_state)
        net.eval()
        self.best_epoch_ = best_epoch
        self.best_val_recall_ = best_recall

    def _batch_loss(
        self, data: _Data, batch: torch.Tensor, w: torch.Tensor, generator: torch.Generator, group: Group
    ) -> torch.Tensor:
        """The batch's in-batch sampled softmax (logQ-corrected; the same item elsewhere in the batch is not a
        negative for the row where it is the positive), weighted, averaged over the batch's rows.

        In a group of processes, this process's part of it: the loss of its contiguous share of the rows over
        every item of the batch (gathered from the group), divided by the whole batch's size, so that the group's
        summed gradients are the whole batch's. The batch is padded to a multiple of the group's size: padded
        rows weigh 0 and padded columns are no row's negative. One process (the group of one) takes exactly the
        steps it took before the data-parallel path existed: weights equal bit for bit."""
        cfg = self.config
        n = len(batch)
        keep = torch.rand(n, generator=generator) >= cfg.id_dropout  # the whole batch's draw, as in one process
        chunk = -(-n // group.world)
        pad = chunk * group.world - n
        if pad:
            batch = torch.cat([batch, batch[:1].expand(pad, 2)])
            keep = torch.cat([keep, torch.zeros(pad, dtype=torch.bool)])
            w = torch.cat([w, torch.zeros(pad, dtype=w.dtype)])
        users, items = batch[:, 0], batch[:, 1]
        mine = slice(group.rank * chunk, (group.rank + 1) * chunk)
        u = self.net_.user(data.user_x[users[mine]], data.history_ids[users[mine]])
        v = group.gather(self.net_.item(data.item_x[items[mine]], data.item_ids[items[mine]], keep[mine]))
        logits = u @ v.T / cfg.temperature
        if cfg.logq_correction:
            logits = logits - data.log_q[items].unsqueeze(0)
        rows = torch.arange(chunk)
        label = rows + group.rank * chunk
        masked = (items[mine].unsqueeze(1) == items.unsqueeze(0)) | (torch.arange(len(items)) >= n).unsqueeze(0)
        masked[rows, label] = False  # a row's own column: its positive (a padded row's keeps its loss finite)
        logits = logits.masked_fill(masked, -math.inf)
        per_row = F.cross_entropy(logits, label, reduction="none")
        return (per_row * w[mine]).sum() / n

    @torch.no_grad()
    def _validation_recall(self, data: _Data, val: np.ndarray) -> float:
        self.net_.eval()
        users = np.unique(val[:, 0])
        user_emb = np.zeros((len(data.user_x), self.config.embedding_dim), dtype=np.float32)
        user_emb[users] = self._embed_users(data.user_x[users], data.history_ids[users])
        item_emb = self._embed_items(data.item_x, data.item_ids)
        return recall_at_k(user_emb, item_emb, val, self.config.recall_k)

    # ------------------------------------------------------------------ inference

    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise RuntimeError("this TwoTowerModel is not fitted: call fit() or TwoTowerModel.load() first")

    @torch.no_grad()
    def _embed(self, tower: Callable[..., torch.Tensor], x: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
        """Run one tower in batches (bounded memory)."""
        out = np.empty((len(x), self.config.embedding_dim), dtype=np.float32)
        for lo in range(0, len(x), INFERENCE_BATCH):
            hi = lo + INFERENCE_BATCH
            out[lo:hi] = tower(x[lo:hi], ids[lo:hi]).numpy()
        return out

    def _embed_users(self, user_x: torch.Tensor, history_ids: torch.Tensor) -> np.ndarray:
        return self._embed(self.net_.user, user_x, history_ids)

    def _embed_items(self, item_x: torch.Tensor, item_ids: torch.Tensor) -> np.ndarray:
        return self._embed(self.net_.item, item_x, item_ids)

    def user_embeddings(self, user_x: np.ndarray, history: np.ndarray) -> np.ndarray:
        """float32 (n, embedding_dim), unit-norm. ``history`` holds rows of the item table seen at fit (or -1);
        history items without an id (cold at fit time) are ignored."""
        self._check_fitted()
        ux = _float_matrix("user_x", user_x, n_cols=self.n_user_features_)
        hist = _history("history", history, len(ux), self.n_items_)
        history_ids = np.where(hist >= 0, self.item_ids_[np.clip(hist, 0, None)], -1)
        self.net_.eval()
        with _one_torch_thread():
            return self._embed_users(torch.from_numpy(ux), torch.from_numpy(history_ids))

    def item_embeddings(self, item_x: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """float32 (n, embedding_dim), unit-norm. Items with id -1 are embedded from their features alone."""
        self._check_fitted()
        ix = _float_matrix("item_x", item_x, n_cols=self.n_item_features_)
        ids = _int_array("item_ids", item_ids, 1)
        if ids.shape[0] != len(ix):
            raise ValueError(f"item_ids has {ids.shape[0]} entries but item_x has {len(ix)} rows")
        _check_range("item_ids", ids, -1, self.n_ids_, f"id-table rows, -1 for unknown, table has {self.n_ids_}")
        self.net_.eval()
        with _one_torch_thread():
            return self._embed_items(torch.from_numpy(ix), torch.from_numpy(ids))

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path) -> None:
        """Write ``two_tower.safetensors`` and ``two_tower.json`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().clone() for name, t in self.net_.state_dict().items()}
        tensors[_ITEM_IDS_KEY] = torch.from_numpy(self.item_ids_.copy())
        tensors["meta.item_log_q"] = torch.from_numpy(self.item_log_q_.copy())
        weights_path = directory / WEIGHTS_FILE
        save_file(tensors, str(weights_path), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "finrec_version": __version__,
            "config": self.config.to_dict(),
            "shapes": {
                "n_user_features": self.n_user_features_,
                "n_item_features": self.n_item_features_,
                "n_items": self.n_items_,
                "n_ids": self.n_ids_,
            },
            "best_epoch": self.best_epoch_,
            "best_val_recall": self.best_val_recall_,
            "history": self.history_,
            "weights_sha256": sha256_file(weights_path),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path) -> TwoTowerModel:
        """Read a folder written by :meth:`save`; ArtifactError if it is missing, incomplete or corrupt."""
        from safetensors.torch import load_file

        directory = Path(directory)
        hint = "point at a folder written by TwoTowerModel.save(), or retrain the model"
        meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
        if not directory.is_dir():
            raise ArtifactError(f"two-tower model folder {directory} does not exist", hint=hint)
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise ArtifactError(f"two-tower model folder {directory} has no {path.name}", hint=hint)
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise ArtifactError(f"{meta_path} describes a {meta.get('format')!r} artifact, not {FORMAT!r}")
            if meta.get("format_version") != FORMAT_VERSION:
                raise ArtifactError(
                    f"{meta_path} has format version {meta.get('format_version')!r}; this finrec reads "
                    f"{FORMAT_VERSION}",
                    hint="retrain the model with this version of finrec",
                )
            config = TwoTowerConfig.from_dict(meta["config"])
            shapes = {k: int(v) for k, v in meta["shapes"].items()}
            expected_sha = str(meta["weights_sha256"])
            history = [dict(r) for r in meta["history"]]
            best_epoch, best_recall = int(meta["best_epoch"]), float(meta["best_val_recall"])
        except ArtifactError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"{meta_path} is not a valid two-tower description: {exc}", hint=hint) from None
        if sha256_file(weights_path) != expected_sha:
            raise ArtifactError(
                f"{weights_path} is corrupt: its sha256 does not match the one recorded in {META_FILE}", hint=hint
            )
        try:
            tensors = load_file(str(weights_path))
        except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
            raise ArtifactError(f"{weights_path} cannot be read as safetensors: {exc}", hint=hint) from None

        model = cls(config)
        try:
            item_ids = tensors.pop(_ITEM_IDS_KEY).numpy().astype(np.int64)
            log_q = tensors.pop("meta.item_log_q").numpy().astype(np.float32)
            net = _TwoTowerNet(
                shapes["n_user_features"],
                shapes["n_item_features"],
                shapes["n_ids"],
                config.embedding_dim,
                config.hidden,
            )
            net.load_state_dict(tensors, strict=True)
            if item_ids.shape != (shapes["n_items"],) or log_q.shape != (shapes["n_items"],):
                raise ValueError("item tables do not match the recorded number of items")
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ArtifactError(f"{weights_path} does not match {META_FILE}: {exc}", hint=hint) from None
        net.eval()
        model.net_ = net
        model.item_ids_ = item_ids
        model.item_log_q_ = log_q
        model.n_user_features_ = shapes["n_user_features"]
        model.n_item_features_ = shapes["n_item_features"]
        model.n_items_ = shapes["n_items"]
        model.n_ids_ = shapes["n_ids"]
        model.history_ = history
        model.best_epoch_ = best_epoch
        model.best_val_recall_ = best_recall
        return model
