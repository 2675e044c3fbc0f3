"""Benchmark: stateless replicas reading customers materialised in Redis (issue 13, serving at scale).

Why: a worker that builds the whole customer snapshot at start-up cannot reach 100M customers; a replica that
reads each customer's record from Redis (``serve.customer_features``, ``finrec materialize``) should start in the
same time and memory whatever the number of customers, and a second replica should add throughput. One run:

1. For each world (``--users``, e.g. 50k and 400k customers): generate and train if missing, ``finrec
   materialize`` it into Redis (time kept), then start one replica in Redis mode and, as the reference, one in
   the in-memory mode (the whole snapshot): seconds from process start to ``/ready`` answering 200, and the
   replica's resident memory then (VmRSS) and at its peak during start-up (VmHWM), from /proc.
2. On the largest world: throughput of 1 replica and of 2 replicas (separate processes on separate ports, each
   with its own wrk; the two wrk runs at once add up to what a load balancer spreading connections over the two
   would see). ``GET /recommend/{id}``, customers drawn at random from the world; rounds alternate the order
   (1, 2, 2, 1, ...); medians over rounds; the ratio 2 vs 1.

Why separate processes and not ``finrec serve --workers 2``: a load balancer sends requests to independent
replicas, each started alone, each with its own memory, maybe on another host; ``--workers`` forks workers from
one parent that share one listening socket (the kernel balances accepts). Both read the same Redis the same way,
but only separate processes show a replica's own start-up time and memory.

The machine has 2 cores shared with other work, and wrk needs CPU too: with 2 replicas, 4 busy processes share 2
cores, so the 2-vs-1 ratio is a floor of what 2 hosts would give (nearer 2 when each replica has its own core).

Usage: python benchmarks/bench_replicas.py --users 50000 400000 --redis redis://127.0.0.1:6379/7
Results: benchmarks/results/replicas.json (and a Markdown table on stdout).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
#: Training settings that keep the benchmark's models quick to train (the figures are about serving).
FAST_TRAIN = {"FINREC_TRAIN__MAX_EPOCHS": "8", "FINREC_TRAIN__EVAL_DAYS": "30", "FINREC_TRAIN__LABEL_DAYS": "30",
              "FINREC_TRAIN__SERVE": "stack"}  # fmt: skip


def _bench_serve() -> Any:
    spec = importlib.util.spec_from_file_location("bench_serve", HERE / "bench_serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module
    spec.loader.exec_module(module)
    return module


bs = _bench_serve()
log = bs.log


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path("bench-workspace/replicas"),
                    help="Folder of the worlds, models and servers' files (default: %(default)s).")  # fmt: skip
    ap.add_argument("--users", type=int, nargs="+", default=[50_000, 400_000],
                    help="Customers of each world (default: %(default)s).")  # fmt: skip
    ap.add_argument("--months", type=int, default=6, help="Months of events per world (default: %(default)s).")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/7",
                    help="Redis for the customers, events and online features (default: %(default)s); the "
                    "benchmark's keys are under the prefix finrec-bench and deleted at the end.")  # fmt: skip
    ap.add_argument("--duration", type=int, default=20, help="Seconds per wrk round (default: %(default)s).")
    ap.add_argument("--rounds", type=int, default=4, help="Rounds of 1 and 2 replicas (default: %(default)s).")
    ap.add_argument("--connections", type=int, default=4,
                    help="wrk connections in all, split over the replicas (default: %(default)s).")  # fmt: skip
    ap.add_argument("--skip-memory-mode", action="store_true", help="Leave out the in-memory reference.")
    return ap.parse_args()


def finrec(env: dict[str, str], *args: str) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "finrec", *args], check=True, env={**os.environ, **env})
    return time.monotonic() - t0


def prepare(ws: Path, users: int, months: int) -> tuple[Path, Path]:
    data, model = ws / f"world{users}", ws / f"model{users}"
    env = {"FINREC_WORKSPACE": str(ws / f"train{users}"), **FAST_TRAIN}
    if not (data / "manifest.json").is_file():
        log(f"generating {users} customers")
        finrec(env, "generate", "--users", str(users), "--months", str(months), "--seed", "5", "--out", str(data),
               "--overwrite")  # fmt: skip
    if not (model / "manifest.json").is_file():
        log(f"training on {users} customers")
        finrec(env, "train", "--data", str(data), "--model-dir", str(model))
    return data, model


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def start(ws: Path, data: Path, model: Path, env: dict[str, str], name: str) -> tuple[Any, str, float]:
    """A ``finrec serve`` process (one worker) and the seconds it took to answer /ready."""
    home = ws / name
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    port = bs.free_port()
    full = {**os.environ, "FINREC_WORKSPACE": str(home.resolve()), "FINREC_SERVE__API_KEY": bs.API_KEY, **env}
    cmd = [sys.executable, "-m", "finrec", "serve", "--model-dir", str(model.resolve()), "--data",
           str(data.resolve()), "--port", str(port), "--workers", "1"]  # fmt: skip
    t0 = time.monotonic()
    with open(home / "serve.log", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full)
    base = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited ({proc.returncode}):\n{(home / 'serve.log').read_text()[-3000:]}")
        try:
            status, _ = bs.get_json(f"{base}/ready", timeout=5)
            if status == 200:
                return proc, base, time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > 1800:
            bs.stop_server(proc)
            raise SystemExit(f"{name} not ready in 30 minutes")
        time.sleep(0.2)


def wrk(bases: list[str], connections: int, seconds: int, script: Path) -> float:
    """Requests per second over ``bases``, one wrk each, all at once (connections split evenly)."""
    each = max(1, connections // len(bases))
    procs = [subprocess.Popen(["wrk", "-t1", f"-c{each}", f"-d{seconds}s", "--latency", "--timeout", "10s",
                               "-H", f"X-API-Key: {bs.API_KEY}", "-s", str(script), b],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for b in bases]  # fmt: skip
    total = 0.0
    for p in procs:
        out, err = p.communicate(timeout=seconds + 120)
        r = bs.parse_wrk(out)
        if p.returncode or r["non_2xx"] or r["socket_errors"]:
            raise SystemExit(f"wrk: {r['non_2xx']} non-2xx, {r['socket_errors']} socket errors:\n{out}{err}")
        total += r["rps"]
    return total


def main() -> None:
    args = parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    ws = args.workspace.resolve()
    ws.mkdir(parents=True, exist_ok=True)
    prefix = "finrec-bench"
    url = f"{args.redis}?prefix={prefix}"
    shared = {"FINREC_SERVE__EVENT_STORE": url, "FINREC_SERVE__ONLINE_STORE": url}
    redis_mode = {**shared, "FINREC_SERVE__CUSTOMER_FEATURES": url}
    results: dict[str, Any] = {"machine": bs.machine(), "args": {k: str(v) for k, v in vars(args).items()},
                               "worlds": {}}  # fmt: skip
    try:
        largest: tuple[Path, Path] | None = None
        for users in sorted(args.users):
            data, model = prepare(ws, users, args.months)
            largest = (data, model)
            seconds = finrec({"FINREC_WORKSPACE": str(ws / "mat")}, "materialize", "--data", str(data),
                             "--model-dir", str(model), "--redis", url, "--no-progress")  # fmt: skip
            row: dict[str, Any] = {"materialize_seconds": round(seconds, 1)}
            modes = [("redis", redis_mode)] + ([] if args.skip_memory_mode else [("memory", shared)])
            for mode, env in modes:
                proc, _, ready = start(ws, data, model, env, f"{mode}{users}")
                mem = memory_kb(proc.pid)
                bs.stop_server(proc)
                row[mode] = {"ready_seconds": round(ready, 2), "rss_mb": round(mem["VmRSS"] / 1024),
                             "peak_rss_mb": round(mem["VmHWM"] / 1024)}  # fmt: skip
                log(f"{users} customers, {mode}: ready in {ready:.1f} s, RSS {mem['VmRSS'] / 1024:.0f} MB "
                    f"(peak {mem['VmHWM'] / 1024:.0f} MB)")  # fmt: skip
            results["worlds"][str(users)] = row
        assert largest is not None
        results["throughput"] = throughput(args, ws, *largest, redis_mode)
    finally:
        import redis

        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=10_000))
        for i in range(0, len(keys), 10_000):
            client.unlink(*keys[i : i + 10_000])
    out = HERE / "results" / "replicas.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(markdown(results))


def throughput(args: argparse.Namespace, ws: Path, data: Path, model: Path, env: dict[str, str]) -> dict[str, Any]:
    import pandas as pd

    users = pd.read_parquet(data / "users.parquet", columns=["user_id"])["user_id"].astype(str)
    ids = users.sample(min(20_000, len(users)), random_state=0).tolist()
    ids_file = ws / "ids.txt"
    ids_file.write_text("".join(urllib.parse.quote(u, safe="") + "\n" for u in ids))
    script = ws / "recommend.lua"
    script.write_text(bs.LUA % {"k": 10, "ids": json.dumps(str(ids_file))})
    a, base_a, _ = start(ws, data, model, env, "replica-a")
    b, base_b, _ = start(ws, data, model, env, "replica-b")
    rps: dict[int, list[float]] = {1: [], 2: []}
    try:
        wrk([base_a, base_b], args.connections, 5, script)  # warm-up, not measured
        for r in range(args.rounds):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                bases = [base_a] if n == 1 else [base_a, base_b]
                got = wrk(bases, args.connections, args.duration, script)
                rps[n].append(got)
                log(f"round {r + 1}: {n} replica(s): {got:.0f} req/s (load average {os.getloadavg()[0]:.2f})")
    finally:
        bs.stop_server(a)
        bs.stop_server(b)
    med = {n: statistics.median(v) for n, v in rps.items()}
    return {"rps": rps, "median_rps": med, "ratio_2_vs_1": round(med[2] / med[1], 2),
            "connections": args.connections, "seconds": args.duration}  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    lines = ["| customers | materialise (s) | redis: ready (s) | redis: RSS / peak (MB) | memory: ready (s) | "
             "memory: RSS / peak (MB) |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for users, row in results["worlds"].items():
        r, m = row["redis"], row.get("memory", {})
        lines.append(f"| {int(users):,} | {row['materialize_seconds']} | {r['ready_seconds']} | {r['rss_mb']} / "
                     f"{r['peak_rss_mb']} | {m.get('ready_seconds', '-')} | {m.get('rss_mb', '-')} / "
                     f"{m.get('peak_rss_mb', '-')} |")  # fmt: skip
    t = results["throughput"]
    lines += ["", f"throughput (GET /recommend, {t['connections']} connections in all, {t['seconds']} s rounds): "
              f"1 replica {t['median_rps'][1]:.0f} req/s, 2 replicas {t['median_rps'][2]:.0f} req/s, "
              f"ratio {t['ratio_2_vs_1']} (rounds: {t['rps']})"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
