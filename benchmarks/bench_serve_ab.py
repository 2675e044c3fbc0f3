"""Benchmark: `/recommend` latency of this code against another revision, both served at once, runs interleaved.

Why: a latency budget ("no more than 1.25x today's p50") compares two revisions, and this machine is shared: run
one revision's benchmark after the other's and the load moves between them (the same code measured 4.7 and
7.4 ms ten minutes apart). Here both servers run side by side, each with the bundle its own code trained, and wrk
alternates between them in short runs (the first of each round swapped every round), so both see the same
load; the verdict is the median of the per-round ratios, with every round's figures kept.

Each side needs a workspace prepared by its own code's ``benchmarks/bench_serve.py`` (the world in ``data/`` and
the bundle in ``model/``); the baseline revision is a checkout of it, typically a git worktree::

    git worktree add /tmp/baseline 80abd85
    (cd /tmp/baseline && PYTHONPATH=src ../<this repo>/.venv/bin/python benchmarks/bench_serve.py \
        --workspace <this repo>/bench-workspace/serve-80abd85 --skip-http)     # world + bundle of the baseline
    .venv/bin/python benchmarks/bench_serve.py --skip-http                     # world + bundle of this code
    .venv/bin/python benchmarks/bench_serve_ab.py --baseline /tmp/baseline \
        --baseline-workspace bench-workspace/serve-80abd85 --rounds 8

A baseline without API keys (before docs/security.md) is started without one; wrk's key header is ignored there.
Needs wrk (``make bench-serve`` installs it). Prints a Markdown table for docs/benchmarks.md and writes
``<workspace>/ab.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _bench_serve() -> Any:
    spec = importlib.util.spec_from_file_location("bench_serve", HERE / "bench_serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bs = _bench_serve()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--baseline", type=Path, required=True,
                    help="A checkout of the revision to compare against (its src/ is put on PYTHONPATH).")
    ap.add_argument("--baseline-workspace", type=Path, required=True,
                    help="The baseline's workspace: data/ and model/ made by the baseline's own bench_serve.py.")
    ap.add_argument("--workspace", type=Path, default=Path("bench-workspace/serve"),
                    help="This code's workspace, prepared by bench_serve.py (default: %(default)s).")
    ap.add_argument("--rounds", type=int, default=8, help="Rounds; each runs wrk once on each side (default: 8).")
    ap.add_argument("--duration", type=int, default=10, help="Seconds of each wrk run (default: %(default)s).")
    ap.add_argument("--k", type=int, default=10, help="Products per answer (default: %(default)s).")
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # what bench_serve.run_wrk reads
    args = ap.parse_args()
    for what, path in (("--baseline", args.baseline / "src" / "finrec"),
                       ("--baseline-workspace", args.baseline_workspace / "model"),
                       ("--workspace", args.workspace / "model")):  # fmt: skip
        if not path.exists():
            ap.error(f"{what}: {path} does not exist (see the usage above: each workspace is prepared by its own "
                     "code's bench_serve.py)")  # fmt: skip
    if args.rounds < 2 or args.duration < 2:
        ap.error("--rounds and --duration must be at least 2")
    return args


def main() -> None:
    args = parse_args()
    ids = bs.customer_ids(args.workspace / "data")
    script_dir = args.workspace / "wrk"
    script_dir.mkdir(parents=True, exist_ok=True)
    (script_dir / "ids.txt").write_text("\n".join(ids) + "\n")
    script = script_dir / "recommend_ab.lua"
    script.write_text(bs.LUA % {"k": args.k, "ids": json.dumps(str((script_dir / "ids.txt").resolve()))})
    sides = {"baseline": (args.baseline, args.baseline_workspace), "this code": (None, args.workspace)}
    procs: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    try:
        bases = {}
        for name, (src, ws) in sides.items():
            bs.log(f"starting {name} ({src}) ...")
            procs[name], bases[name] = bs.start_server(ws, ws / "data", ws / "model", src, f"serve-ab-{name}.log")
        for base in bases.values():  # warm-up, not measured
            bs.run_wrk(base, "recommend", 1, 3, args, script)
        order = list(sides)
        for r in range(args.rounds):
            row: dict[str, Any] = {"round": r + 1}
            for name in order if r % 2 == 0 else order[::-1]:
                out = bs.run_wrk(bases[name], "recommend", 1, args.duration, args, script)
                row[name] = {"p50": out["p50"], "p99": out["p99"], "rps": out["rps"],
                             "load": os.getloadavg()[0]}  # fmt: skip
            row["ratio"] = row["this code"]["p50"] / row["baseline"]["p50"]
            bs.log(f"round {r + 1}/{args.rounds}: p50 baseline {row['baseline']['p50']:.2f} ms, this code "
                   f"{row['this code']['p50']:.2f} ms, ratio {row['ratio']:.3f}")  # fmt: skip
            rows.append(row)
    finally:
        for p in procs.values():
            bs.stop_server(p)
    ratios = sorted(r["ratio"] for r in rows)
    med = {name: statistics.median(r[name]["p50"] for r in rows) for name in sides}
    result = {"machine": bs.machine(), "baseline": str(args.baseline), "rounds": rows,
              "median_p50_ms": med, "median_ratio": statistics.median(ratios),
              "ratio_range": [ratios[0], ratios[-1]]}  # fmt: skip
    (args.workspace / "ab.json").write_text(json.dumps(result, indent=1))
    print("| round | baseline p50 | this code p50 | ratio |\n| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['round']} | {r['baseline']['p50']:.2f} ms | {r['this code']['p50']:.2f} ms | {r['ratio']:.3f} |")
    print(f"| median | {med['baseline']:.2f} ms | {med['this code']:.2f} ms | **{result['median_ratio']:.3f}** |")
    print(f"\nper-round ratios from {ratios[0]:.3f} to {ratios[-1]:.3f}; wrote {args.workspace / 'ab.json'}")


if __name__ == "__main__":
    main()
