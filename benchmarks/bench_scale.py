"""Benchmark: how the offline stages scale with the number of customers, on each engine.

Every (stage, engine, customers) runs as a ``finrec`` command in a fresh process. Measured from outside:

* wall time of the command;
* peak memory of its whole process tree (the command, Spark's JVM, its Python workers), sampled from /proc
  every 0.2 s: the peak of the tree's summed PSS (proportional set size: a page shared by n processes counts
  1/n in each, so forked Python workers are not counted several times), and of its summed RSS;
* CPU time of the tree (user + system, each process as last sampled): on a shared machine wall time follows
  the other work, CPU time much less.

From the runs of a stage on an engine at several sizes: the exponent of time in customers (the slope of
log time on log customers, 1 = linear) and memory per customer.

Stages form a registry (:data:`STAGES`): a stage is a name, a description and the command it runs for an engine
and a size, given the working folder of that size (``generate`` writes the dataset the later stages read).

Usage::

    .venv/bin/python benchmarks/bench_scale.py --customers 1000000 2000000 --engines duckdb spark \\
        --stages generate --work /work/bench-scale [--products 10000] [--months 12] [--clean]

Writes ``<work>/results.json`` (or ``--results``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SAMPLE_SECONDS = 0.2
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Context:
    """Where a run's inputs and outputs are, and the world's other parameters."""

    work: Path  # <work>/<engine>-<customers>
    engine: str
    customers: int
    products: int
    months: int
    seed: int
    model: Path | None = None  # a bundle for recommend/evaluate (default: the one this size's train stage wrote)
    recommend_users: int | None = None  # customers the recommend stage scores (default: every one)
    redis: str = "redis://127.0.0.1:6379/12"

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def bundle(self) -> Path:
        return self.model or self.work / "model"


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    argv: Callable[[Context], list[str]]  # the finrec command line (after `finrec`)
    metrics: Callable[[Context, dict[str, Any]], dict[str, Any]] = lambda ctx, before: {}  # figures read afterwards
    before: Callable[[Context], dict[str, Any]] = lambda ctx: {}  # what metrics compares with, read before the run


def _generate_argv(ctx: Context) -> list[str]:
    return ["generate", "--engine", ctx.engine, "--users", str(ctx.customers), "--products", str(ctx.products),
            "--months", str(ctx.months), "--seed", str(ctx.seed), "--out", str(ctx.data), "--overwrite",
            "--no-validate"]  # fmt: skip


def _redis_before(ctx: Context) -> dict[str, Any]:
    """Empty the benchmark's own Redis database, then read the server's memory: the materialize stage's baseline."""
    import redis

    client = redis.Redis.from_url(ctx.redis, socket_timeout=600)
    client.flushdb()
    return {"used_memory": int(client.info("memory")["used_memory"])}


def _redis_metrics(ctx: Context, before: dict[str, Any]) -> dict[str, Any]:
    """Keys written and Redis's memory growth (records and per-key overhead), then the database emptied again so
    that the next size starts from nothing and the server gives the memory back."""
    import redis

    client = redis.Redis.from_url(ctx.redis, socket_timeout=600)
    keys, used = int(client.dbsize()), int(client.info("memory")["used_memory"])
    client.flushdb(asynchronous=True)  # 4M keys: a blocking FLUSHDB outlasted the client's wait and lost the run
    with contextlib.suppress(redis.RedisError):  # without jemalloc the memory comes back as the allocator decides
        client.execute_command("MEMORY PURGE")  # jemalloc gives the freed pages back: the next stage has them
    grown = used - before["used_memory"]
    return {"redis_keys": keys, "redis_used_mb": round(grown / 2**20),
            "redis_bytes_per_customer": round(grown / max(1, ctx.customers))}  # fmt: skip


def _generate_metrics(ctx: Context, before: dict[str, Any]) -> dict[str, Any]:
    manifest = json.loads((ctx.data / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in ctx.data.rglob("*") if p.is_file())
    return {"events": manifest["metrics"]["counts"]["events"], "dataset_mb": round(size / 2**20)}


def _every_customer(ctx: Context) -> Path:
    """A users file listing the customers the recommend stage scores: every one, or the first --recommend-users."""
    import pyarrow.dataset as pds

    path = ctx.work / f"users-{ctx.recommend_users or 'all'}.txt"
    if not path.is_file():
        users = ctx.data / "users" if (ctx.data / "users").is_dir() else ctx.data / "users.parquet"
        ids = pds.dataset(users, format="parquet").to_table(columns=["user_id"]).column("user_id").to_pylist()
        path.write_text("\n".join(str(v) for v in ids[: ctx.recommend_users]) + "\n")
    return path


def _output_rows(path: Path) -> dict[str, Any]:
    import pyarrow.dataset as pds

    return {"rows": pds.dataset(path, format="parquet").count_rows()} if path.exists() else {}


#: The stages, in the order they run for one size and engine.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("generate", "finrec generate: the synthetic world at this size", _generate_argv, _generate_metrics),
        Stage("features", "finrec features: the event-log feature tables at the end of the data, keyed by id",
              lambda c: ["features", "--engine", c.engine, "-d", str(c.data), "-o", str(c.work / "features"),
                         "--overwrite"]),
        Stage("train", "finrec train: every stage of the model (on Spark: a sample of whole customers, "
              "[engine] sample_customers)",
              lambda c: ["train", "--engine", c.engine, "-d", str(c.data), "-m", str(c.work / "model")]),
        Stage("recommend", "finrec recommend: top 10 for every customer of the base (or --recommend-users of them)",
              lambda c: ["recommend", "--engine", c.engine, "-d", str(c.data), "-m", str(c.bundle),
                         "-u", str(_every_customer(c)), "-o", str(c.work / "recommendations.parquet")],
              lambda c, _: _output_rows(c.work / "recommendations.parquet")),
        Stage("evaluate", "finrec evaluate: the held-out window against baselines and the oracle",
              lambda c: ["evaluate", "--engine", c.engine, "-d", str(c.data), "-m", str(c.bundle),
                         "-o", str(c.work / "report.json")]),
        # Materialize reads the bundle this size's train stage wrote, whatever --model says: a bundle's candidate
        # sources must have been fitted on the data materialised (a replica cannot refit them), and finrec refuses
        # any other bundle.
        Stage("materialize", "finrec materialize: every customer's serving record into Redis (a db of its own), "
              "for the bundle this size's train stage wrote",
              lambda c: ["materialize", "--engine", c.engine, "-d", str(c.data), "-m", str(c.work / "model"),
                         "--redis", c.redis, "--no-progress"], _redis_metrics, _redis_before),
    )
}


# -- measuring ----------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process on the machine."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # it ended meanwhile
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # the name may hold spaces and parentheses
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _tree(root: int) -> list[int]:
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process so far, in clock ticks; 0 if it has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def _memory(pid: int) -> tuple[int, int, str]:
    """(RSS, PSS) in bytes and the program name of a process; zeros if it has ended."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        pss = rss
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
        with open(f"/proc/{pid}/comm") as f:
            name = f.read().strip()
    except (OSError, ValueError):
        return 0, 0, ""
    return rss, pss, name


def measure(argv: list[str], log: Path) -> dict[str, Any]:
    """Run ``argv``; its wall time, exit code and the peak memory of its process tree."""
    peak_rss = peak_pss = 0
    peak_by_program: dict[str, int] = {}
    ticks: dict[int, int] = {}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            rss = pss = 0
            by_program: dict[str, int] = {}
            for pid in _tree(proc.pid):
                ticks[pid] = max(ticks.get(pid, 0), _cpu_ticks(pid))
                r, p, name = _memory(pid)
                rss, pss = rss + r, pss + p
                kind = "java" if name == "java" else "python" if name.startswith("python") else "other"
                by_program[kind] = by_program.get(kind, 0) + p
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            for kind, p in by_program.items():
                peak_by_program[kind] = max(peak_by_program.get(kind, 0), p)
            time.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - start
    mb = 2**20
    return {
        "seconds": round(seconds, 1),
        "exit_code": proc.returncode,
        "cpu_seconds": round(sum(ticks.values()) / os.sysconf("SC_CLK_TCK"), 1),
        "peak_pss_mb": round(peak_pss / mb),
        "peak_rss_mb": round(peak_rss / mb),
        "peak_pss_mb_by_program": {k: round(v / mb) for k, v in sorted(peak_by_program.items())},
    }


# -- fits and report ----------------------------------------------------------------------------


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (None with fewer than two sizes)."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for stage, engine in sorted({(r["stage"], r["engine"]) for r in runs if r["exit_code"] == 0}):
        rs = sorted((r for r in runs if (r["stage"], r["engine"]) == (stage, engine) and r["exit_code"] == 0),
                    key=lambda r: r["customers"])  # fmt: skip
        xs = [r["customers"] for r in rs]
        t, m = slope(xs, [r["seconds"] for r in rs]), slope(xs, [r["peak_pss_mb"] for r in rs])
        out.append({"stage": stage, "engine": engine, "customers": xs,
                    "time_exponent": None if t is None else round(t, 3),
                    "memory_exponent": None if m is None else round(m, 3)})  # fmt: skip
    return out


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| stage | engine | customers | time (CPU) | peak memory (PSS; RSS) | per customer | of which JVM |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in runs:
        if r["exit_code"] != 0:
            lines.append(f"| {r['stage']} | {r['engine']} | {r['customers']:,} | failed ({r['exit_code']}) | | | |")
            continue
        per = r["peak_pss_mb"] * 2**20 / r["customers"]
        jvm = r["peak_pss_mb_by_program"].get("java")
        cpu = f" ({r['cpu_seconds']:.0f} s)" if "cpu_seconds" in r else ""
        lines.append(f"| {r['stage']} | {r['engine']} | {r['customers']:,} | {r['seconds']:.1f} s{cpu} "
                     f"| {r['peak_pss_mb']:,} MB; {r['peak_rss_mb']:,} MB | {per:,.0f} B "
                     f"| {'-' if jvm is None else f'{jvm:,} MB'} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, nargs="+", default=[1_000_000, 2_000_000],
                    help="sizes of the customer base to run, each in a folder of its own under --work")
    ap.add_argument("--engines", nargs="+", choices=("duckdb", "spark"), default=["duckdb", "spark"],
                    help="engines to run each stage on (spark: local mode, settings from FINREC_ENGINE__*)")
    ap.add_argument("--stages", nargs="+", choices=tuple(STAGES), default=list(STAGES),
                    help="stages to run, always in the pipeline's order (generate writes what the others read)")
    ap.add_argument("--products", type=int, default=300, help="catalogue size of the generated worlds")
    ap.add_argument("--model", type=Path, default=None,
                    help="bundle for recommend and evaluate (default: what this size's train stage wrote); the "
                    "catalogue depends on --products and --seed only, so one bundle serves every size")
    ap.add_argument("--months", type=int, default=12, help="months of events of the generated worlds")
    ap.add_argument("--seed", type=int, default=7, help="seed of the generated worlds")
    ap.add_argument("--recommend-users", type=int, default=None,
                    help="customers the recommend stage scores (default: every customer of the base)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12", help="Redis of the materialize stage")
    ap.add_argument("--work", type=Path, default=Path("/tmp/finrec-bench-scale"), help="datasets and logs")
    ap.add_argument("--results", type=Path, default=None, help="JSON results (default: <work>/results.json)")
    ap.add_argument("--clean", action="store_true", help="delete each size's data once its stages have run")
    args = ap.parse_args()
    results = args.results or args.work / "results.json"
    stages = [STAGES[s] for s in STAGES if s in args.stages]  # registry order, whatever the flags' order

    runs: list[dict[str, Any]] = []
    for customers in sorted(args.customers):
        for engine in args.engines:
            ctx = Context(args.work / f"{engine}-{customers}", engine, customers, args.products, args.months,
                          args.seed, args.model, args.recommend_users, args.redis)  # fmt: skip
            ctx.work.mkdir(parents=True, exist_ok=True)
            for stage in stages:
                argv = [sys.executable, "-m", "finrec", *stage.argv(ctx)]
                print(f"{stage.name} on {engine} at {customers:,} customers ...", file=sys.stderr, flush=True)
                run = {"stage": stage.name, "engine": engine, "customers": customers,
                       "command": " ".join(["finrec", *argv[3:]])}  # fmt: skip
                before = stage.before(ctx)
                run |= measure(argv, ctx.work / f"{stage.name}.log")
                if run["exit_code"] == 0:
                    run |= stage.metrics(ctx, before)
                print(f"  {run['seconds']:.1f} s, peak {run['peak_pss_mb']:,} MB PSS", file=sys.stderr, flush=True)
                runs.append(run)
                _write(results, args, runs)
            if args.clean:
                shutil.rmtree(ctx.data, ignore_errors=True)
    print(table(runs))
    for s in summarise(runs):
        print(f"{s['stage']} on {s['engine']}: time ~ customers^{s['time_exponent']}, "
              f"peak memory ~ customers^{s['memory_exponent']}")  # fmt: skip


def _write(path: Path, args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join(["benchmarks/bench_scale.py", *sys.argv[1:]]),
        "world": {"products": args.products, "months": args.months, "seed": args.seed},
        "stages": {s.name: s.description for s in STAGES.values()},
        "runs": runs,
        "fits": summarise(runs),
    }
    path.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
