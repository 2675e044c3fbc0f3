"""Benchmark: approximate candidate indexes against exact search, on a trained model's real embeddings.

Loads a model bundle and its dataset, embeds every product and a sample of customers at the
end of the data, then for each index kind measures build time, the median time to search
all sampled customers (5 repeats), and recall@N against exact search in the same run,
with and without an eligibility mask. Exact search is the reference: time ratios are
index / exact.

Usage::

    .venv/bin/python benchmarks/bench_index.py --model-dir M --data D [--users 5000] [--n 100]

Writes benchmarks/results/index.json and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    from finrec.config import load_settings
    from finrec.data.dataset import load_dataset
    from finrec.features.builder import FeatureBuilder
    from finrec.retrieval.index import ExactIndex, make_index
    from finrec.twostage.model import TwoStageModel
    from finrec.twostage.train import allowed_mask, rules_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--users", type=int, default=5000, help="Customers sampled as queries.")
    ap.add_argument("--n", type=int, default=100, help="Candidates retrieved (N of recall@N).")
    args = ap.parse_args()

    settings = load_settings()
    ds = load_dataset(args.data)
    model = TwoStageModel.load(args.model_dir)
    builder = FeatureBuilder(ds, settings.protected_attributes)
    cutoff = ds.time_range[1] + 1
    snap = builder.snapshot(cutoff)
    history = builder.history(cutoff, model.config.history_length)
    rng = np.random.default_rng(0)
    users = np.sort(rng.choice(ds.n_users, min(args.users, ds.n_users), replace=False))
    q = model.user_embeddings(builder, snap, users, history)
    items = model.item_embeddings(builder, snap)
    allowed = allowed_mask(rules_for(ds, settings), snap, users, ds.n_products)

    def timed_search(index, exclude):  # type: ignore[no-untyped-def]
        times = []
        for _ in range(5):
            t = time.perf_counter()
            _, found = index.search(q, args.n, exclude=exclude)
            times.append(time.perf_counter() - t)
        return statistics.median(times), found

    exact = ExactIndex(items)
    rows = []
    for masked in (False, True):
        exclude = ~allowed if masked else None
        t_exact, ref = timed_search(exact, exclude)
        rows.append(
            {"index": "exact", "masked": masked, "build_s": 0.0, "search_s": t_exact, "recall": 1.0, "ratio": 1.0}
        )
        for kind, params in (("hnsw", {}), ("ivf", {}), ("ivf", {"nprobe": 50})):
            t = time.perf_counter()
            index = make_index(kind, items, **params)  # type: ignore[arg-type]
            build = time.perf_counter() - t
            t_search, found = timed_search(index, exclude)
            valid = ref >= 0
            hits = [
                len(set(f[f >= 0]) & set(r[v])) / max(v.sum(), 1) for f, r, v in zip(found, ref, valid, strict=True)
            ]
            name = kind + (f" nprobe={params['nprobe']}" if params else "")
            rows.append({"index": name, "masked": masked, "build_s": build, "search_s": t_search,
                         "recall": float(np.mean(hits)), "ratio": t_search / t_exact})  # fmt: skip
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": "benchmarks/bench_index.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "products": ds.n_products, "queries": int(len(users)), "n": args.n, "dim": int(items.shape[1]), "rows": rows,
    }  # fmt: skip
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/index.json").write_text(json.dumps(result, indent=1))
    print(f"{ds.n_products:,} products, {len(users):,} queries, N={args.n}, dim {items.shape[1]}")
    print("| index | eligibility mask | build | search (median of 5) | vs exact | recall@N vs exact |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['index']} | {'yes' if r['masked'] else 'no'} | {r['build_s']:.2f} s | {r['search_s']:.3f} s "
              f"| {r['ratio']:.2f}x | {r['recall']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
