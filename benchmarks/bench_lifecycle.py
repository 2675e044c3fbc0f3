"""Benchmark: how fast a promotion or a rollback serves, and what experiment routing adds to a request.

Why: issue 6 asks that a running server follows alias changes without a restart and that "a rollback takes
effect within seconds". Both are measured in one process on one machine, each against a reference taken in the
same run:

1. Alias changes, against the polling interval (``registry.poll_seconds``, default 2 s: what every *other*
   process waits at most before it looks):
   (a) promotion to a version not loaded yet: ``Service.refresh`` loads the bundle beside the serving one,
       verifies every file's checksum, warms it up and swaps it in;
   (b) rollback to the version just replaced: it is still loaded (the service keeps the last two), so the
       swap is a pointer assignment.
   Each is repeated; medians, and ratios to the interval.
2. Routing, against a request without experiments: ``Recommender.recommend`` for random known customers with
   one experiment of two arms (SHA-256 assignment, the arm's model) and without; the median per request and
   the ratio.

Usage::

    .venv/bin/python benchmarks/bench_lifecycle.py                       # 20k customers, 100 products
    .venv/bin/python benchmarks/bench_lifecycle.py --users 5000 --repeats 3   # quick check

The workspace (default bench-workspace/lifecycle, git-ignored) keeps the world and the two bundles between runs.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from finrec import pipeline  # noqa: E402
from finrec.config import FinrecSettings  # noqa: E402
from finrec.data.synthetic.generate import WorldConfig, generate_world  # noqa: E402
from finrec.registry import ModelRegistry  # noqa: E402
from finrec.serving.service import Service  # noqa: E402


def prepare(ws: Path, users: int, products: int) -> tuple[Path, Path, Path]:
    world, m1, m2 = ws / f"world-{users}-{products}", ws / f"m1-{users}-{products}", ws / f"m2-{users}-{products}"
    if not world.is_dir():
        generate_world(WorldConfig(users=users, products=products, months=6, seed=5), world, progress=False)
    if not m1.is_dir():
        pipeline.train(world, m1, FinrecSettings(workspace=ws), progress=False)
    if not m2.is_dir():
        pipeline.train(world, m2, FinrecSettings(workspace=ws, train={"seed": 1}), progress=False)
    return world, m1, m2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20_000, help="Customers of the world.")
    ap.add_argument("--products", type=int, default=100, help="Products of the world.")
    ap.add_argument("--repeats", type=int, default=7, help="Promotions and rollbacks timed (medians reported).")
    ap.add_argument("--requests", type=int, default=2_000, help="Requests timed per routing variant.")
    ap.add_argument("--workspace", type=Path, default=Path("bench-workspace/lifecycle"))
    args = ap.parse_args()
    ws = args.workspace
    ws.mkdir(parents=True, exist_ok=True)
    world, m1, m2 = prepare(ws, args.users, args.products)
    root = ws / "registry"
    shutil.rmtree(root, ignore_errors=True)
    reg = ModelRegistry(root)
    reg.register(m1, alias=None)
    reg.promote("v1")
    reg.register(m2)
    exp = [{"name": "bench", "arms": {"a": {"model": "champion", "weight": 1}, "b": {"model": "challenger",
                                                                                    "weight": 1}}}]  # fmt: skip
    base = {"workspace": ws / "serve", "registry": {"root": root}, "serve": {"clock": "data"}}
    svc = Service.from_settings(FinrecSettings(**base), data_dir=world, audit=False, watch=False)
    promote_s, rollback_s = [], []
    for _ in range(args.repeats):
        svc._cache.clear()  # a promotion to a version not loaded: the cold path
        reg.promote("v2", force=True)
        t0 = time.perf_counter()
        svc.refresh()
        promote_s.append(time.perf_counter() - t0)
        reg.rollback()
        t0 = time.perf_counter()
        svc.refresh()
        rollback_s.append(time.perf_counter() - t0)
    poll = FinrecSettings(**base).registry.poll_seconds
    svc.close()
    reg.set_alias("challenger", "v2")  # promoting v2 cleared it; the experiment's second arm serves it

    rng = np.random.default_rng(0)
    users = [str(u) for u in rng.integers(1, args.users + 1, args.requests)]
    per_request = {}
    for name, experiments in (("no experiment", []), ("experiment, 2 arms", exp)):
        s = Service.from_settings(FinrecSettings(**base, experiments=experiments), data_dir=world, audit=False,
                                  watch=False)  # fmt: skip
        rec = s.recommender
        for u in users[:200]:
            rec.recommend(u, 10)  # warm up
        times = []
        for u in users:
            t0 = time.perf_counter()
            rec.recommend(u, 10)
            times.append(time.perf_counter() - t0)
        per_request[name] = statistics.median(times)
        s.close()

    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d')}; world {args.users} customers, {args.products} products.\n")
    print("| what | median | reference (same run) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    pm, rm = statistics.median(promote_s), statistics.median(rollback_s)
    print(f"| promotion to a version not loaded (load, verify, warm up, swap) | {pm * 1000:.0f} ms | poll interval "
          f"{poll:.1f} s | {pm / poll:.3f} |")
    print(f"| rollback to the version just replaced (kept loaded) | {rm * 1000:.2f} ms | poll interval {poll:.1f} s "
          f"| {rm / poll:.5f} |")
    a, b = per_request["no experiment"], per_request["experiment, 2 arms"]
    print(f"| Recommender.recommend with a 2-arm experiment | {b * 1000:.3f} ms | without: {a * 1000:.3f} ms "
          f"| {b / a:.3f} |")
    print(f"\npromotion runs (s): {[round(x, 3) for x in promote_s]}; rollback runs (ms): "
          f"{[round(x * 1000, 2) for x in rollback_s]}")


if __name__ == "__main__":
    main()
