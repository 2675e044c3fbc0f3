"""Benchmark: what a monitoring build (``/dashboard``, ``finrec monitor``) costs as the history grows.

Why: issue 14 asks that "a dashboard build costs the same after a year as after a day". For each history length
(events in the store; one answer in the audit log per 10 events, as the closed-loop simulation produces) the
same run measures:

* **full re-read** (today's ``finrec monitor --full``, and the dashboard before the roll-up):
  :func:`finrec.monitoring.report.build_monitor_report` over the whole event store and audit log;
* **roll-up build** (what ``/dashboard`` and ``finrec monitor`` do now): with the history already folded in,
  ``--new`` more events and a tenth as many answers arrive, then
  :meth:`~finrec.monitoring.rollup.MonitoringRollup.update` plus
  :func:`~finrec.monitoring.report.build_rollup_report` (conversion, guardrail health and fairness);
* **catch-up**: the roll-up's one-off first update over the whole history (once, when a service first adopts it).

Every build includes fairness over the same customers (``--customers``; the pseudonyms are hashed once per
process and cached, as in the service). Events spread over 180 days, 2 model versions x 2 arms; 8 in 10 cite
their answer's request id. Medians of ``--repeats`` runs (the full re-read at the largest size: ``--full-repeats``).

Usage::

    .venv/bin/python benchmarks/bench_monitoring.py                                 # 100k, 1M, 5M events
    .venv/bin/python benchmarks/bench_monitoring.py --sizes 20000 100000 --repeats 2    # quick check

The stores are kept under bench-workspace/monitoring (git-ignored) between runs. Prints a Markdown table for
docs/benchmarks.md and writes benchmarks/results/monitoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finrec.config import FinrecSettings
from finrec.data.dataset import Dataset, EventLog
from finrec.events.schema import Event
from finrec.events.store import SQLiteEventStore
from finrec.monitoring.report import build_monitor_report, build_rollup_report
from finrec.monitoring.rollup import MonitoringRollup
from finrec.serving.audit import pseudonymise, pseudonymise_request

KEY = bytes(range(32))
T0 = 1_760_000_000
SPAN = 180 * 86_400
FUNNEL = ("impression", "impression", "impression", "view", "click", "apply", "approve", "decline")


class History:
    """Writes answers and their events, in time order, to an audit log and a SQLite event store."""

    def __init__(self, folder: Path, customers: int, seed: int = 7) -> None:
        self.folder, self.customers = folder, customers
        self.rng = random.Random(seed)
        self.n_answers = self.n_events = 0
        folder.mkdir(parents=True, exist_ok=True)
        self.store = SQLiteEventStore(folder / "events.db")
        self.audit = folder / "audit.jsonl"

    def add(self, events: int, start: float, end: float) -> None:
        rng, batch = self.rng, []
        with open(self.audit, "a") as audit:
            lines = []
            for _ in range(events // 10):
                rid, user = f"r{self.n_answers}", f"c{rng.randrange(self.customers)}"
                self.n_answers += 1
                ts = start + (end - start) * rng.random()
                mv, arm = rng.choice(("v1", "v2")), rng.choice(("A", "B"))
                items = [{"product_id": f"P{rng.randrange(300)}", "rank": j + 1, "score": 0.5, "reasons": ["popular"]}
                         for j in range(rng.choice((0, 3, 5, 5, 5)))]  # fmt: skip
                lines.append(json.dumps({"request": pseudonymise_request(rid, KEY), "ts": ts, "served_at": ts,
                                         "model_version": mv, "arm": arm, "kind": "customer",
                                         "customer": pseudonymise(user, KEY), "k": 5, "items": items,
                                         "excluded": {"eligibility": rng.randrange(40), "held": rng.randrange(3)}}))
                for etype in FUNNEL + ("impression", "impression"):  # 10 events per answer
                    own = rng.random() < 0.2
                    batch.append(Event(f"e{self.n_events}", user, f"P{rng.randrange(300)}", etype,
                                       int(ts) + rng.randrange(3600),
                                       request_id=rid if rng.random() < 0.8 else None,
                                       model_version=mv if own else None, arm=arm if own else None))  # fmt: skip
                    self.n_events += 1
                if len(batch) >= 50_000:
                    self.store.append(batch)
                    batch = []
            audit.write("\n".join(lines) + ("\n" if lines else ""))
        if batch:
            self.store.append(batch)


def dataset(customers: int) -> Dataset:
    users = pd.DataFrame({"user_id": [f"c{i}" for i in range(customers)],
                          "gender": np.random.default_rng(1).choice(["f", "m"], customers)})  # fmt: skip
    products = pd.DataFrame({"product_id": [f"P{i}" for i in range(300)]})
    empty = EventLog(*(np.empty(0, dtype=t) for t in (np.int32, np.int32, np.int8, np.int64, np.int16)))
    return Dataset(Path("bench"), users, products, empty, fingerprint=f"bench-{customers}")


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    ap.add_argument("--customers", type=int, default=200_000)
    ap.add_argument("--new", type=int, default=10_000, help="Events arriving between two builds.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-repeats", type=int, default=1, help="Full re-reads at the largest size.")
    ap.add_argument("--workspace", type=Path, default=Path("bench-workspace/monitoring"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/monitoring.json"))
    args = ap.parse_args()
    settings = FinrecSettings(workspace=args.workspace)
    ds = dataset(args.customers)
    rows = []
    for size in sorted(args.sizes):
        folder = args.workspace / f"h{size}"
        shutil.rmtree(folder, ignore_errors=True)
        history = History(folder, args.customers)
        t, _ = timed(lambda h=history, size=size: h.add(size, T0, T0 + SPAN))
        print(f"{size:,} events written in {t:.1f} s", flush=True)
        full_runs = []
        for _ in range(args.repeats if size != max(args.sizes) else args.full_repeats):
            seconds, report = timed(lambda h=history: build_monitor_report(h.store, h.audit, KEY, ds, settings))
            full_runs.append(seconds)
        events_seen = report["sources"]["events"]
        rollup = MonitoringRollup(folder / "rollup.db", KEY)
        catch_up, _ = timed(lambda h=history, r=rollup: r.update(h.store, h.audit))
        build_runs, end = [], T0 + SPAN
        for _ in range(args.repeats):
            history.add(args.new, end, end + 3600)
            end += 3600
            seconds, rolled = timed(lambda h=history, r=rollup: build_rollup_report(
                r, ds, settings, update=r.update(h.store, h.audit)))  # fmt: skip
            build_runs.append(seconds)
        assert rolled["health"]["answers"] > 0 and rolled["fairness"]["attributes"]["gender"]["groups"]
        row = {"events": events_seen, "answers": report["sources"]["audit_records"],
               "full_seconds": full_runs, "full_median": statistics.median(full_runs),
               "rollup_catch_up_seconds": round(catch_up, 2), "rollup_build_seconds": build_runs,
               "rollup_median": statistics.median(build_runs), "rollup_rows": rollup.sizes()}  # fmt: skip
        row["ratio"] = row["full_median"] / row["rollup_median"]
        rollup.close()
        history.store.close()
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "date": datetime.now(UTC).strftime("%Y-%m-%d")}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "customers": args.customers, "new_per_build": args.new,
                                     "rows": rows}, indent=1))  # fmt: skip
    print("\n| events in the store | answers in the audit log | full re-read (median) | roll-up build (median) | "
          "ratio | roll-up catch-up (once) |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['events']:,} | {r['answers']:,} | {r['full_median']:.2f} s | {r['rollup_median']:.3f} s | "
              f"{r['ratio']:.0f}x | {r['rollup_catch_up_seconds']:.1f} s |")
    print(f"\nmachine: {machine}")


if __name__ == "__main__":
    main()
