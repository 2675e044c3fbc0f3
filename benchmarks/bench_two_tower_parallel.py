"""Benchmark: the two-tower trained in 1 and in N data-parallel processes (``[train] two_tower_workers``).

Why: each process runs torch on one thread (two_tower's note on threads), so a single-process fit uses one core;
``finrec.retrieval.data_parallel`` splits every batch over processes. This measures, on the same planted data,
the seconds per epoch (the training loop alone, as rank 0 times it) and the whole fit's wall time (spawning
the processes and copying the tensors to them included), for each number of workers, alternating the settings
run after run so that all see the same machine load; medians, and the ratio to one process. It also reports
each setting's validation recall, which must match one process's (the same model up to float rounding).

Data: ``--users`` customers in 10 latent tastes, 300 items, ``--pairs`` positive pairs (finrec's default
``max_retrieval_pairs`` is 400,000), features noisy one-hots of the taste, histories of 20.

Usage::

    .venv/bin/python benchmarks/bench_two_tower_parallel.py [--workers 1 2] [--repeats 3] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import UTC, datetime

import numpy as np

from finrec.retrieval.two_tower import TwoTowerConfig, TwoTowerModel

N_TASTES, N_ITEMS, HISTORY = 10, 300, 20


def planted(users: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    taste = rng.integers(N_TASTES, size=users)
    item_taste = np.arange(N_ITEMS) % N_TASTES
    members = [np.flatnonzero(item_taste == t) for t in range(N_TASTES)]

    def draw(who: np.ndarray, n: int) -> np.ndarray:
        offset = rng.integers(len(members[0]), size=(len(who), n))
        return np.stack([members[t] for t in range(N_TASTES)])[taste[who]][np.arange(len(who))[:, None], offset]

    def one_hot(labels: np.ndarray) -> np.ndarray:
        x = np.zeros((len(labels), N_TASTES + 6), dtype=np.float32)
        x[np.arange(len(labels)), labels] = 1.0
        return x + rng.normal(0.0, 0.5, x.shape).astype(np.float32)

    who = rng.integers(users, size=pairs)
    val_who = rng.choice(users, size=min(users, 20_000), replace=False)
    return (one_hot(taste), draw(np.arange(users), HISTORY), one_hot(item_taste), np.arange(N_ITEMS),
            np.column_stack([who, draw(who, 1)[:, 0]]), np.column_stack([val_who, draw(val_who, 1)[:, 0]]))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Settings compared (default: 1 2).")
    ap.add_argument("--users", type=int, default=250_000, help="Customers (default: %(default)s).")
    ap.add_argument("--pairs", type=int, default=400_000, help="Training pairs (default: %(default)s).")
    ap.add_argument("--epochs", type=int, default=3, help="Epochs a fit runs (default: %(default)s).")
    ap.add_argument("--repeats", type=int, default=3, help="Fits per setting (default: %(default)s).")
    args = ap.parse_args()
    data = planted(args.users, args.pairs)
    seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    epoch: dict[int, list[float]] = {w: [] for w in args.workers}
    recall: dict[int, float] = {}
    for r in range(args.repeats):
        for w in args.workers if r % 2 == 0 else args.workers[::-1]:
            cfg = TwoTowerConfig(max_epochs=args.epochs, patience=args.epochs, recall_k=20, workers=w)
            t0 = time.perf_counter()
            model = TwoTowerModel(cfg).fit(*data)
            seconds[w].append(time.perf_counter() - t0)
            epoch[w].extend(h["seconds"] for h in model.history_)
            recall[w] = model.best_val_recall_
            print(f"repeat {r + 1}, {w} worker(s): {seconds[w][-1]:.1f} s, recall@20 {recall[w]:.4f}", flush=True)
    base = args.workers[0]
    print(f"\n{datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} cores; {args.users:,} users, "
          f"{args.pairs:,} pairs, {args.epochs} epochs, {args.repeats} fits per setting, alternating; load average "
          f"{os.getloadavg()[0]:.2f} at the end\n")  # fmt: skip
    print(f"| workers | seconds per epoch (median) | fit (median) | epoch: {base} worker(s) / this | recall@20 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for w in args.workers:
        e, f = statistics.median(epoch[w]), statistics.median(seconds[w])
        print(f"| {w} | {e:.1f} s | {f:.1f} s | {statistics.median(epoch[base]) / e:.2f}x | {recall[w]:.4f} |")


if __name__ == "__main__":
    main()
