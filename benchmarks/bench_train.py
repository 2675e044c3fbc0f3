"""Benchmark: features + training of the two-stage model (`finrec train`) at scale.

Generates a world (default 1M customers, 10k products, 12 months) unless --data is given,
then, each in a fresh process so peak memory (ru_maxrss) is its own:
  * reference: validating and loading the dataset (what every command pays first);
  * `pipeline.train`: validation, loading, point-in-time features, two-tower, approval odds, ranker.
Reports medians over --repeats, the ratio train / reference, and the per-stage seconds
the model manifest records.

Usage::

    .venv/bin/python benchmarks/bench_train.py [--users 1000000] [--products 10000] [--repeats 1] [--data DIR]

Writes benchmarks/results/train.json and prints a Markdown row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

CHILD_LOAD = """
import json, resource, sys, time
from pathlib import Path
from finrec.data.dataset import load_dataset
t = time.perf_counter()
ds = load_dataset(Path(sys.argv[1]))
print(json.dumps({"seconds": time.perf_counter() - t, "events": len(ds.events),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

CHILD_TRAIN = """
import json, resource, sys, time
from pathlib import Path
from finrec.config import load_settings
from finrec import pipeline
t = time.perf_counter()
m = pipeline.train(Path(sys.argv[1]), Path(sys.argv[2]), load_settings(), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "stages": m["metrics"]["seconds"],
                  "training": {k: {a: b for a, b in v.items() if not isinstance(b, dict | list)}
                               for k, v in m["metrics"]["training"].items()},
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

CHILD_GENERATE = """
import sys
from pathlib import Path
from finrec.data.synthetic.generate import WorldConfig, generate_world
generate_world(WorldConfig(users=int(sys.argv[1]), products=int(sys.argv[2]), months=int(sys.argv[3])),
               Path(sys.argv[4]), overwrite=True, progress=False)
"""


def run(code: str, *args: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # as the finrec CLI sets it
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--products", type=int, default=10_000)
    ap.add_argument("--months", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--data", type=Path, default=None, help="Existing dataset (skips generation).")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="finrec-bench-train-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "world"
            print(f"generating {args.users:,} customers ...", file=sys.stderr)
            run(CHILD_GENERATE, str(args.users), str(args.products), str(args.months), str(data))
        loads, trains = [], []
        for i in range(args.repeats):
            ld = run(CHILD_LOAD, str(data))
            tr = run(CHILD_TRAIN, str(data), str(Path(tmp) / f"model{i}"))
            loads.append(ld)
            trains.append(tr)
            line = f"run {i + 1}: load {ld['seconds']:.1f} s {ld['peak_rss_mb']:.0f} MB; "
            line += f"train {tr['seconds']:.1f} s {tr['peak_rss_mb']:.0f} MB {tr['stages']}"
            print(line, file=sys.stderr)

    med = statistics.median
    t_train, t_load = med(r["seconds"] for r in trains), med(r["seconds"] for r in loads)
    rss = med(r["peak_rss_mb"] for r in trains)
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join(["benchmarks/bench_train.py", *sys.argv[1:]]),
        "users": args.users, "products": args.products, "months": args.months, "repeats": args.repeats,
        "events": loads[0]["events"],
        "median_train_seconds": round(t_train, 1), "median_train_peak_rss_mb": round(rss),
        "median_load_seconds": round(t_load, 1), "train_vs_load": round(t_train / t_load, 1),
        "stages": trains[0]["stages"], "training": trains[0]["training"], "runs": trains,
    }  # fmt: skip
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/train.json").write_text(json.dumps(result, indent=1))
    print(
        f"| {args.users:,} | {args.products:,} | {result['events']:,} | {t_train:.0f} s | {rss:,.0f} MB "
        f"| {t_load:.0f} s ({result['train_vs_load']}x) | {result['stages']} |"
    )


if __name__ == "__main__":
    main()
