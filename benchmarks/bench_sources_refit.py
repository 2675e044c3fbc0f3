"""Benchmark: the driver's memory when Spark refits a bundle's candidate sources on every customer.

``finrec train --engine spark`` (on its sample) and ``finrec recommend --engine spark`` (with a bundle fitted on
other data) refit the candidate sources on every customer's positives (:func:`finrec.engine.batch.sources_at`).
What the driver receives for that grew with the customer base: at 10M customers the train's Python took 13.8 GB.

This compares two versions of finrec's code on the same data and bundle, each in a process of its own with a
Spark session of its own (local mode): for each, the driver's peak resident memory (``ru_maxrss`` of the Python
process; the JVM is another process) above what it held before the refit, the refit's wall time, and a digest of
the refitted sources' files, so that the versions are seen to fit the same sources. ``--embedded`` adds the
reference: the same refit on the embedded engine, which holds every event. The bundle must have been
fitted on other data than ``--data`` (or at another cutoff), else there is nothing to refit and the script says so.

Usage::

    git worktree add /tmp/finrec-before <commit before the change>
    PYSPARK_PYTHON=$PWD/.venv/bin/python .venv/bin/python benchmarks/bench_sources_refit.py \\
        --data /work/bench/scale/duckdb-1000000/data --model /work/bench/model-50k \\
        --code before=/tmp/finrec-before/src after=src --repeats 1

Prints a Markdown table; ``--results`` writes the runs as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def _child(data: Path, model_dir: Path, driver_memory: str, keep: Path | None) -> dict[str, Any]:
    """One refit in this process: the measurements as a dict (printed as JSON by ``--child``)."""
    from finrec.config import EngineSettings
    from finrec.data.dataset import load_table
    from finrec.data.io import find_table
    from finrec.engine.batch import _with_uid, sources_at
    from finrec.engine.spark import spark_session
    from finrec.features.spark import SparkEventTables, _read_raw
    from finrec.twostage.model import TwoStageModel

    spark = spark_session(EngineSettings(name="spark", spark_driver_memory=driver_memory), "bench-sources-refit")
    model = TwoStageModel.load(model_dir)
    products, _ = load_table(data, "products")
    tables = SparkEventTables(spark, data)
    try:
        cutoff, n_events = tables.span()
        if model.config.sources_fitted_at(cutoff, n_events):
            raise SystemExit("the bundle's sources were fitted on this data: nothing to refit; pass a bundle "
                             "trained on other data")  # fmt: skip
        users = _with_uid(_read_raw(spark, find_table(data, "users")))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        sources = sources_at(tables, model, users, products, cutoff, n_events)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        tables.close()
        spark.stop()
    return {"seconds": round(seconds, 1), "rss_before_mb": round(before / 1024), "peak_rss_mb": round(peak / 1024),
            "refit_rss_mb": round((peak - before) / 1024), "events": n_events,
            "sources_sha256": _digest(sources, keep)}  # fmt: skip


def _child_embedded(data: Path, model_dir: Path, keep: Path | None) -> dict[str, Any]:
    """The same refit on the embedded engine (the reference): every event in memory, rows in the users table's
    order, as `finrec recommend` does with a bundle fitted on other data."""
    from finrec.candidates.interactions import Interactions
    from finrec.data.dataset import load_dataset
    from finrec.twostage.model import TwoStageModel

    model = TwoStageModel.load(model_dir)
    assert model.sources is not None, "the bundle has no candidate sources"
    ds = load_dataset(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_products, model.config.grades,
                                     model.config.min_grade)  # fmt: skip
    sources = model.sources.refit(inter, model.sources.segment_codes(ds.users))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(seconds, 1), "rss_before_mb": round(before / 1024), "peak_rss_mb": round(peak / 1024),
            "refit_rss_mb": round((peak - before) / 1024), "events": len(ds.events),
            "sources_sha256": _digest(sources, keep)}  # fmt: skip


def _digest(sources: Any, keep: Path | None) -> str:
    """sha256 of the sources' saved files (saved under ``keep`` when given)."""
    with tempfile.TemporaryDirectory() as tmp:
        where = keep or Path(tmp)
        sources.save(where)
        digest = hashlib.sha256()
        for p in sorted(where.rglob("*")):
            if p.is_file():
                digest.update(p.relative_to(where).as_posix().encode() + p.read_bytes())
        return digest.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a dataset folder (finrec generate's output)")
    ap.add_argument("--model", type=Path, required=True,
                    help="a bundle trained on other data than --data (same catalogue), so that its sources refit")
    ap.add_argument("--code", nargs="+", default=["current=src"], metavar="NAME=SRC",
                    help="versions to compare: a name and the src folder of a checkout of finrec (default: this one)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each version, interleaved; medians reported")
    ap.add_argument("--driver-memory", default="4g", help="Spark driver's heap (spark.driver.memory)")
    ap.add_argument("--results", type=Path, default=None, help="write the runs as JSON here")
    ap.add_argument("--keep", type=Path, default=None,
                    help="save each version's refitted sources under KEEP/<version> (to compare them source by source)")
    ap.add_argument("--embedded", action="store_true",
                    help="also refit on the embedded engine with this checkout (the reference: every event in "
                    "memory); reported as the version 'embedded'")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.embedded:
            print(json.dumps(_child_embedded(args.data, args.model, args.keep)))
        else:
            print(json.dumps(_child(args.data, args.model, args.driver_memory, args.keep)))
        return

    versions = dict(v.split("=", 1) for v in args.code)
    if args.embedded:
        versions["embedded"] = str(Path(__file__).resolve().parent.parent / "src")
    runs: list[dict[str, Any]] = []
    for r in range(args.repeats):
        for name, src in versions.items():
            env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
            argv = [sys.executable, __file__, "--child", "--data", str(args.data), "--model", str(args.model),
                    "--driver-memory", args.driver_memory]  # fmt: skip
            if args.keep:
                argv += ["--keep", str(args.keep / name)]
            if name == "embedded":
                argv.append("--embedded")
            print(f"{name} (run {r + 1} of {args.repeats}) ...", file=sys.stderr, flush=True)
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            runs.append({"version": name, "src": src, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(f"  {runs[-1]}", file=sys.stderr, flush=True)

    print("| version | refit wall time (median) | driver peak RSS | of which the refit | sources digest |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name in versions:
        mine = [x for x in runs if x["version"] == name]
        print(f"| {name} | {statistics.median(x['seconds'] for x in mine):.1f} s "
              f"| {statistics.median(x['peak_rss_mb'] for x in mine):,} MB "
              f"| {statistics.median(x['refit_rss_mb'] for x in mine):,} MB "
              f"| {mine[0]['sources_sha256'][:12]} |")  # fmt: skip
    groups: dict[str, list[str]] = {}
    for x in runs:
        if x["version"] not in groups.setdefault(x["sources_sha256"], []):
            groups[x["sources_sha256"]].append(x["version"])
    print("\nversions that fitted the same sources, bit for bit: " + "; ".join(" = ".join(g) for g in groups.values()))
    if args.results:
        args.results.write_text(json.dumps({
            "date": datetime.now(UTC).date().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "command": " ".join(["benchmarks/bench_sources_refit.py", *sys.argv[1:]]), "runs": runs,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
