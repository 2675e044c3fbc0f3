"""Benchmark: `finrec generate` at 1M customers, 10k products, 12 months.

Each repetition runs in a fresh process so peak memory (ru_maxrss) is its own.
Reported against two references measured in the same run:
  * the issue's limits (600 s, 8 GiB): ratio = measured / limit;
  * an I/O floor: pyarrow writing the very same events table to Parquet with
    the same compression, i.e. what writing the output costs with nothing
    generated. ratio = generate / floor.

Usage::

    .venv/bin/python benchmarks/bench_generate.py [--users 1000000] [--products 10000] [--months 12] [--repeats 3]

Prints a Markdown table for docs/benchmarks.md and writes benchmarks/results/generate.json.
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

CHILD_GENERATE = """
import json, resource, sys, time
from pathlib import Path
from finrec.data.synthetic.generate import WorldConfig, generate_world
users, products, months, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
t = time.perf_counter()
s = generate_world(WorldConfig(users=users, products=products, months=months), out, overwrite=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "events": s.counts["events"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

CHILD_FLOOR = """
import json, resource, sys, time
import pyarrow.parquet as pq
src, dst = sys.argv[1], sys.argv[2]
f = pq.ParquetFile(src)
t = time.perf_counter()
w = None
for i in range(f.num_row_groups):
    tbl = f.read_row_group(i)
    if w is None:
        w = pq.ParquetWriter(dst, tbl.schema, compression="zstd")
    w.write_table(tbl)
w.close()
# Reading the row groups back is part of this floor; subtract it to keep only the write.
t_rw = time.perf_counter() - t
t = time.perf_counter()
for i in range(f.num_row_groups):
    f.read_row_group(i)
print(json.dumps({"seconds": t_rw - (time.perf_counter() - t),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(code: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--products", type=int, default=10_000)
    ap.add_argument("--months", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    gens, floors = [], []
    with tempfile.TemporaryDirectory(prefix="finrec-bench-") as tmp:
        out = Path(tmp) / "world"
        for i in range(args.repeats):
            g = run(CHILD_GENERATE, str(args.users), str(args.products), str(args.months), str(out))
            f = run(CHILD_FLOOR, str(out / "events.parquet"), str(Path(tmp) / "copy.parquet"))
            gens.append(g)
            floors.append(f)
            print(
                f"run {i + 1}: generate {g['seconds']:.1f} s, {g['peak_rss_mb']:.0f} MB; "
                f"write floor {f['seconds']:.1f} s",
                file=sys.stderr,
            )
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20

    med = statistics.median
    secs, rss = med(g["seconds"] for g in gens), med(g["peak_rss_mb"] for g in gens)
    floor = med(f["seconds"] for f in floors)
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join(["benchmarks/bench_generate.py", *sys.argv[1:]]),
        "users": args.users, "products": args.products, "months": args.months, "repeats": args.repeats,
        "events": gens[0]["events"], "dataset_mb": round(size_mb),
        "median_seconds": round(secs, 1), "median_peak_rss_mb": round(rss),
        "time_vs_limit_600s": round(secs / 600, 3), "memory_vs_limit_8gib": round(rss / 8192, 3),
        "write_floor_seconds": round(floor, 1), "time_vs_write_floor": round(secs / floor, 2),
        "runs": gens,
    }  # fmt: skip
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/generate.json").write_text(json.dumps(result, indent=1))
    print(
        f"| {args.users:,} | {args.products:,} | {args.months} | {result['events']:,} | {secs:.1f} s "
        f"({result['time_vs_limit_600s']:.2f} of 600 s) | {rss:,.0f} MB "
        f"({result['memory_vs_limit_8gib']:.2f} of 8 GiB) "
        f"| {floor:.1f} s ({result['time_vs_write_floor']:.1f}x) |"
    )


if __name__ == "__main__":
    main()
