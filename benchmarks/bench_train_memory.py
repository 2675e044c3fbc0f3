"""Benchmark: time and peak memory of `finrec train`, per stage, and memory per customer.

Each training runs in a fresh process. A thread in that process samples its resident memory
(``/proc/self/statm``) every ``--interval`` seconds together with the main thread's innermost
finrec frames, so the result says not only how high memory went but what was running then. The
stage boundaries come from the seconds the manifest records (load, retrieval, sources, approval,
ranker, validation_and_refit, drift_reference run one after the other), so each stage gets its own
peak. With several worlds (``--data A --data B``), memory per customer is the slope between them:
the part of the peak that grows with the book, as opposed to the fixed cost of the process.

Usage::

    .venv/bin/python benchmarks/bench_train_memory.py --data /tmp/w1m [--data /tmp/w2m] [--out results/x.json]

Other benchmarks call :func:`measure_train` (one world) and :func:`per_customer` (several).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Stages in the order `pipeline.train` runs them, as named in the manifest's ``metrics.seconds``.
STAGES = ("load", "retrieval", "sources", "approval", "ranker", "validation_and_refit", "drift_reference")

CHILD = """
import json, os, sys, threading, time, traceback
from pathlib import Path
page = os.sysconf("SC_PAGE_SIZE")
samples, stop, main_id = [], threading.Event(), threading.get_ident()

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20

def where():
    frame = sys._current_frames().get(main_id)
    return [f"{Path(fs.filename).stem}.{fs.name}:{fs.lineno}" for fs in traceback.extract_stack(frame)
            if "finrec" in fs.filename]

def poll(interval):
    while not stop.is_set():
        samples.append((time.perf_counter(), rss_mb(), where()))
        stop.wait(interval)

threading.Thread(target=poll, args=(float(sys.argv[3]),), daemon=True).start()
from finrec.config import load_settings
from finrec import pipeline
t0 = time.perf_counter()
settings = load_settings()
over = json.loads(sys.argv[4])
if over:
    settings = settings.model_copy(update={"train": settings.train.model_copy(update=over)})
m = pipeline.train(Path(sys.argv[1]), Path(sys.argv[2]), settings, progress=False)
total = time.perf_counter() - t0
stop.set()
import resource
print(json.dumps({"t0": t0, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": total, "samples": samples, "stages": m["metrics"]["seconds"],
                  "inputs": m["inputs"], "serves": m["metrics"]["serves"],
                  "ranker_rows": m["metrics"]["training"].get("ranker", {}).get("rows"),
                  "retrieval": {k: v for k, v in m["metrics"]["training"].get("retrieval", {}).items()
                                if not isinstance(v, dict)}}))
"""


#: Frames whose callee names the step of training that runs (the step is the next frame in).
_WIRING = ("pipeline.train", "train.train_two_stage", "train._train_with_impressions",
           "train._train_without_impressions")


def _step(stack: list[str]) -> str:
    """The step a stack is in: the first frame below the wiring, without its line (``train._fit_two_tower``)."""
    inner = [f for f in stack if f.rsplit(":", 1)[0] not in _WIRING]
    if not stack:
        return "(start-up)"
    return inner[0].rsplit(":", 1)[0] if inner else stack[-1]


def measure_train(data: Path, model_dir: Path | None = None, interval: float = 0.25,
                  train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train on ``data`` in a fresh process: time and peak RSS per stage and per step, and what ran at the peak.

    ``train_overrides``: ``[train]`` settings to change (e.g. ``{"max_ranker_rows": 500_000}``). Returns
    ``{"users", "events", "seconds", "peak_rss_mb" (the process's ru_maxrss), "peak_at" (the finrec frames
    running at the highest sample), "stages": {stage: seconds} (the manifest's), "steps": {step: {"seconds",
    "peak_rss_mb", "peak_at"}}, "timeline": [(seconds, MB, step), ...]}``.
    """
    with tempfile.TemporaryDirectory(prefix="finrec-bench-mem-") as tmp:
        out = model_dir or Path(tmp) / "model"
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # as the finrec CLI sets it
        res = subprocess.run([sys.executable, "-c", CHILD, str(data), str(out), str(interval),
                              json.dumps(train_overrides or {})],
                             capture_output=True, text=True, check=False, env=env)  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"training failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    samples = r.pop("samples")
    steps: dict[str, dict[str, Any]] = {}
    timeline: list[tuple[float, int, str]] = []
    for t, mb, stack in samples:
        name = _step(stack)
        s = steps.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0, "peak_at": ""})
        s["seconds"] = round(s["seconds"] + interval, 2)
        if mb > s["peak_rss_mb"]:
            s["peak_rss_mb"], s["peak_at"] = round(mb), " < ".join(reversed(stack[-4:]))
        if not timeline or timeline[-1][2] != name or abs(timeline[-1][1] - mb) > 100:
            timeline.append((round(t - r["t0"], 1), round(mb), name))
    top = max(samples, key=lambda s: s[1])
    return {"users": r["inputs"]["users"], "events": r["inputs"]["events"], "seconds": round(r["seconds"], 1),
            "peak_rss_mb": round(max(r["ru_maxrss_mb"], top[1])), "peak_at": " < ".join(reversed(top[2][-4:])),
            "stages": r["stages"], "steps": steps, "serves": r["serves"], "ranker_rows": r["ranker_rows"],
            "retrieval": r["retrieval"], "timeline": timeline}  # fmt: skip


def per_customer(results: list[dict[str, Any]]) -> dict[str, float]:
    """Peak RSS per customer (KB) of each run, and the slope between the smallest and largest book."""
    out = {f"{r['users']}": round(r["peak_rss_mb"] * 1024 / r["users"], 3) for r in results}
    if len(results) > 1:
        a, b = min(results, key=lambda r: r["users"]), max(results, key=lambda r: r["users"])
        slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 1024 / (b["users"] - a["users"])
        out["slope_kb_per_customer"] = round(slope, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, action="append", required=True, help="A generated world (repeatable).")
    ap.add_argument("--interval", type=float, default=0.25, help="Seconds between memory samples.")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="A [train] setting to change, e.g. max_ranker_rows=500000 (JSON value).")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here too.")
    args = ap.parse_args()
    over = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    results = []
    for data in args.data:
        r = measure_train(data, interval=args.interval, train_overrides=over)
        results.append(r)
        print(f"{r['users']:,} customers, {r['events']:,} events: {r['seconds']:.0f} s, peak {r['peak_rss_mb']:,} MB"
              f" ({r['peak_rss_mb'] * 1024 / r['users']:.2f} KB/customer) at {r['peak_at']}", file=sys.stderr)
        print(f"  stages (s): {r['stages']}", file=sys.stderr)
        for name, s in r["steps"].items():
            print(f"  {name:<34} {s['seconds']:>7.1f} s {s['peak_rss_mb']:>7,} MB  {s['peak_at']}", file=sys.stderr)
    summary = {"runs": results, "per_customer_kb": per_customer(results), "overrides": over}
    print(json.dumps(summary["per_customer_kb"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
