"""Benchmark: model quality on the default synthetic world, plus training time and memory.

Generates the default world (or uses --data), trains with default settings and evaluates,
each step in this process; prints the metrics of every model with 95% bootstrap intervals,
the paired differences, the share of the oracle reached, and the training time and peak
memory (ru_maxrss of this process, which includes generation and evaluation).

Usage::

    .venv/bin/python benchmarks/bench_quality.py [--users 100000] [--seed 7] [--data DIR]

Writes benchmarks/results/quality.json and prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    from finrec import pipeline
    from finrec.config import load_settings
    from finrec.data.synthetic.generate import WorldConfig, generate_world

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=WorldConfig().users)
    ap.add_argument("--seed", type=int, default=WorldConfig().seed)
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args()
    settings = load_settings()
    with tempfile.TemporaryDirectory(prefix="finrec-bench-quality-") as tmp:
        data = args.data or Path(tmp) / "world"
        if args.data is None:
            generate_world(WorldConfig(users=args.users, seed=args.seed), data, progress=False)
        t = time.perf_counter()
        manifest = pipeline.train(data, Path(tmp) / "model", settings, progress=False)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        report = pipeline.evaluate(Path(tmp) / "model", data, Path(tmp) / "report.json", settings, progress=False)
        eval_s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    k = report["model"]["k"]
    metrics = [f"ndcg@{k}", f"map@{k}", "mrr", f"hit_rate@{k}", f"coverage@{k}", f"true_conversion@{k}"]
    lines = ["| model | " + " | ".join(metrics) + " |", "| --- |" + " ---: |" * len(metrics)]
    for name, vals in report["models"].items():
        cells = []
        for m in metrics:
            v = vals.get(m)
            if v is None:
                cells.append("—")
            elif "low" in v:
                cells.append(f"{v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]")
            else:
                cells.append(f"{v['mean']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": "benchmarks/bench_quality.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "train_seconds": round(train_s, 1), "evaluate_seconds": round(eval_s, 1), "peak_rss_mb": round(rss),
        "stages_seconds": manifest["metrics"]["seconds"], "training": manifest["metrics"]["training"],
        "fallbacks": manifest["metrics"]["fallbacks"], "split": report["split"],
        "models": report["models"], "comparisons": report["comparisons"], "notes": report["notes"],
    }  # fmt: skip
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/quality.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n".join(lines))
    print()
    for name, c in report["comparisons"].items():
        print(
            f"- {name}: {c['metric']} {c['mean_diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}], p={c['p_value']:.3f}"
        )
    for note in report["notes"]:
        print(f"- {note}")
    print(f"- evaluated customers: {report['split']['evaluated_users']:,}")
    print(
        f"- train {train_s:.0f} s ({manifest['metrics']['seconds']}), evaluate {eval_s:.0f} s, peak RSS {rss:,.0f} MB"
    )


if __name__ == "__main__":
    main()
