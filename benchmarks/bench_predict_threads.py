"""Benchmark: LightGBM's predict on one and two threads, at the sizes one request asks for.

Why: the API scores ~100 candidates with the ranker and then asks for the leaves of the k rows it returns
(their reasons); ``Ranker.leaves`` uses one thread below 64 rows. This measures the choice on the bundle the
serving benchmark trained, with ``OMP_WAIT_POLICY=PASSIVE`` as the finrec CLI (and so the service) sets it:
calls alternate between the settings so both see the same machine load; medians and p90 per setting, and the
ratio of one thread to two. Rows are random normal values in the ranker's columns (every path of the trees is
reachable; the cost of a walk does not depend on which leaf it ends in).

Usage (after ``benchmarks/bench_serve.py`` made the bundle)::

    .venv/bin/python benchmarks/bench_predict_threads.py [--model bench-workspace/serve/model] [--calls 400]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the finrec CLI sets it, before LightGBM loads

import numpy as np  # noqa: E402

from finrec.twostage.model import TwoStageModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("bench-workspace/serve/model"),
                    help="A bundle with a ranker (default: %(default)s, made by bench_serve.py).")  # fmt: skip
    ap.add_argument("--calls", type=int, default=400, help="Calls per setting and size (default: %(default)s).")
    ap.add_argument("--candidates", type=int, default=105, help="Rows a request ranks (default: %(default)s).")
    ap.add_argument("--k", type=int, default=10, help="Rows a request returns (default: %(default)s).")
    args = ap.parse_args()
    if not (args.model / "manifest.json").is_file():
        ap.error(f"--model: no bundle at {args.model}; run benchmarks/bench_serve.py first (it trains one)")
    ranker = TwoStageModel.load(args.model).ranker
    if ranker is None:
        ap.error(f"--model: the bundle at {args.model} has no ranker")
    booster, trees = ranker.booster_, ranker.best_iteration_
    X = np.random.default_rng(0).normal(size=(args.candidates, len(ranker.feature_names_))).astype(np.float32)
    cases = {
        f"scores of {args.candidates} rows": lambda n: booster.predict(X, num_iteration=trees, num_threads=n),
        f"leaves of {args.k} rows": lambda n: booster.predict(X[: args.k], num_iteration=trees, pred_leaf=True,
                                                               num_threads=n),
    }  # fmt: skip
    times: dict[tuple[str, int], list[float]] = {(c, n): [] for c in cases for n in (1, 2)}
    for i in range(args.calls):
        for case, call in cases.items():
            for n in (1, 2) if i % 2 == 0 else (2, 1):
                t0 = time.perf_counter()
                call(n)
                times[(case, n)].append(time.perf_counter() - t0)
    print(f"{trees} trees, {len(ranker.feature_names_)} features, {args.calls} alternating calls per setting; "
          f"load average {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| call | 1 thread (median, p90) | 2 threads (median, p90) | 1 thread / 2 threads |")
    print("| --- | ---: | ---: | ---: |")
    for case in cases:
        one, two = (statistics.median(times[(case, n)]) * 1e3 for n in (1, 2))
        p90 = [float(np.percentile(times[(case, n)], 90)) * 1e3 for n in (1, 2)]
        print(f"| {case} | {one:.3f} ms, {p90[0]:.3f} | {two:.3f} ms, {p90[1]:.3f} | {one / two:.2f} |")


if __name__ == "__main__":
    main()
