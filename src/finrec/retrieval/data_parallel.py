"""Data-parallel training of the two-tower: the process group a fit runs in, and the launchers that start one.

Each of ``workers`` processes holds the whole training data (a sample: see ``[train] max_retrieval_pairs``) and
the same initial weights. For every global batch of ``batch_size`` pairs, drawn the same way in every process, a
process embeds its contiguous share of the rows, gathers the item embeddings of the whole batch from the others
(an all-gather through which gradients flow back to their owners), and
takes the in-batch softmax of its rows over every item of the batch. The gradients are summed over the processes
(``all_reduce``), so every process takes the same optimiser step: the loss, the negatives and the step are those
of one process training on the whole batch, computed in pieces. The weights differ from a single process's only
in the order floats are summed, so the number of workers is part of the model's definition (kept in the
bundle's ``two_tower.json`` and manifest); the launcher is not.

A process reads its place from the environment, as ``torchrun`` sets it (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``): the same function runs under :func:`launch_local` (processes spawned on this
machine: what ``finrec train`` uses) and under Spark's ``TorchDistributor`` (:func:`launch_spark`), and gives
bit-identical weights under both (``tests/parity/test_two_tower_parallel.py``). Collectives use gloo (CPU).

Written here rather than with ``DistributedDataParallel``: the towers are two modules called through their own
methods, not one ``forward``, which DDP's gradient hooks need, and one flat ``all_reduce`` per step of a model
this small is all DDP's bucketing would do.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:  # pragma: no cover
    from finrec.retrieval.two_tower import TwoTowerModel

_RESULT_WEIGHTS = "weights.safetensors"
_RESULT_META = "result.json"


def _world() -> dist.ProcessGroup:
    group = dist.group.WORLD
    assert group is not None, "the process group is initialised before any collective"
    return group


@dataclass(frozen=True)
class Group:
    """The processes a fit runs in: one (rank 0 of 1: every collective is the identity) or a gloo group."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Group:
        """Join the group ``torchrun``'s variables describe (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(rank=dist.get_rank(), world=dist.get_world_size())

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every process's ``local`` rows (equal shapes), in rank order; gradients flow back to each owner."""
        if self.world == 1:
            return local
        from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

        return wait_tensor(all_gather_single_autograd(local, gather_dim=0, group=_world()))

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient with its sum over the processes (one flat all_reduce)."""
        if self.world == 1:
            return
        params = list(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        at = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[at : at + n].view_as(g).clone()
            at += n

    def total(self, value: float) -> float:
        """``value`` summed over the processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def from_first(self, value: float) -> float:
        """Rank 0's ``value``, in every process (what rank 0 alone computed, such as the validation recall)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, src=0)
        return float(t.item())


@dataclass
class Payload:
    """What each process trains from, as numpy arrays: pickled to each process whole. Torch tensors would go
    through shared memory (/dev/shm), which containers often cap at 64 MB."""

    config: dict[str, Any]
    shapes: dict[str, int]
    initial: dict[str, np.ndarray]
    data: dict[str, np.ndarray]  # the fields of two_tower._Data
    train: np.ndarray
    val: np.ndarray
    weights: np.ndarray
    progress: bool


def train_shard(payload: Payload, out_dir: str) -> None:
    """One process of a data-parallel fit (its place from the environment); rank 0 writes the result to
    ``out_dir``. The entry point of every launcher."""
    from safetensors.torch import save_file

    from finrec.retrieval.two_tower import TwoTowerConfig, TwoTowerModel, _Data, _TwoTowerNet

    torch.set_num_threads(1)  # one process a core: see two_tower's note on threads
    group = Group.from_env()
    try:
        cfg = TwoTowerConfig.from_dict(payload.config)
        s = payload.shapes
        net = _TwoTowerNet(s["n_user_features"], s["n_item_features"], s["n_ids"], cfg.embedding_dim, cfg.hidden)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in payload.initial.items()})
        model = TwoTowerModel(cfg)
        model.net_ = net
        data = _Data(**{k: torch.from_numpy(v) for k, v in payload.data.items()})
        model._train(data, payload.train, payload.val, payload.weights,
                     payload.progress and group.rank == 0, group)  # fmt: skip
        if group.rank == 0:
            out = Path(out_dir)
            save_file({k: v.detach().contiguous().clone() for k, v in net.state_dict().items()},
                      str(out / _RESULT_WEIGHTS))  # fmt: skip
            (out / _RESULT_META).write_text(json.dumps({
                "history": model.history_, "best_epoch": model.best_epoch_, "best_val_recall": model.best_val_recall_,
            }))  # fmt: skip
    finally:
        if group.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def read_result(model: TwoTowerModel, out_dir: Path) -> None:
    """Load what rank 0 wrote into ``model`` (its ``net_`` already built with the same shapes)."""
    from safetensors.torch import load_file

    meta_path = out_dir / _RESULT_META
    if not meta_path.is_file():
        raise RuntimeError("the data-parallel two-tower fit ended without a result from its first process")
    model.net_.load_state_dict(load_file(str(out_dir / _RESULT_WEIGHTS)))
    meta = json.loads(meta_path.read_text())
    model.history_ = [dict(r) for r in meta["history"]]
    model.best_epoch_ = int(meta["best_epoch"])
    model.best_val_recall_ = float(meta["best_val_recall"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned(rank: int, world: int, port: int, payload: Payload, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    train_shard(payload, out_dir)


def launch_local(model: TwoTowerModel, payload: Payload, workers: int) -> None:
    """Train ``model`` in ``workers`` processes spawned on this machine, then load the result into it.

    Spawned, not forked: the caller may hold DuckDB's and OpenMP's threads, which a forked child inherits locked.
    """
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    from finrec.errors import FinrecError

    with tempfile.TemporaryDirectory(prefix="finrec-two-tower-") as out:
        try:
            mp.start_processes(_spawned, args=(workers, _free_port(), payload, out), nprocs=workers, join=True,
                               start_method="spawn")  # fmt: skip
        except ProcessException as exc:  # a process raised, or was killed (out of memory: SIGKILL)
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise FinrecError(f"process {exc.error_index} of the two-tower's {workers} data-parallel processes "
                              f"failed: {last}",
                              hint="each process holds the training tensors: lower [train] two_tower_workers "
                              "(1 trains in this process) or max_retrieval_pairs") from None  # fmt: skip
        read_result(model, Path(out))


def launch_spark(model: TwoTowerModel, payload: Payload, workers: int) -> None:
    """Train ``model`` in ``workers`` processes started by Spark's ``TorchDistributor`` (local mode: on the
    driver, as ``torchrun`` does), then load the result into it."""
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    from finrec.errors import FinrecError

    if SparkSession.getActiveSession() is None:
        raise FinrecError("[train] two_tower_launcher = \"spark\" needs a Spark session, and none is running",
                          hint="train with --engine spark, or set [train] two_tower_launcher = \"local\"")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="finrec-two-tower-") as out:
        TorchDistributor(num_processes=workers, local_mode=True, use_gpu=False).run(train_shard, payload, out)
        read_result(model, Path(out))
