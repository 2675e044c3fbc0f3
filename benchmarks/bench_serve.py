"""Benchmark: the API's speed on the default world, and what the request path adds to the model's own work.

Why: issue 4 asks that "everything the request path adds (features, guardrails, reasons, audit,
serialisation) stays within 50% of bare model work plus the trivial endpoint's time". A latency
figure alone cannot answer that, least of all on a shared 2-core machine, so one run measures on
one machine, each against references taken in the same run:

1. HTTP. ``finrec serve`` (1 worker, ``FINREC_SERVE__CLOCK=data``) under wrk:
   ``GET /recommend/{id}?k=10``, each request for a customer drawn at random from the world's
   known ids, and ``GET /health``, the trivial endpoint (HTTP stack, routing, middleware and JSON
   with no work behind them). Same server, runs interleaved, at 1 and 4 connections, each run
   repeated; medians of throughput, p50 and p99 from wrk's ``--latency`` output.
2. In process, after the server has stopped (so nothing competes), for random known customers:
   (a) bare model work: the retrieval index's search over the products the customer may be shown,
   the approval model and the LightGBM ranker's predict, on exactly the candidates the service
   ranks for that customer (inputs captured from a real request, then timed alone);
   (b) the whole ``Recommender.recommend``, with the audit log on (as served) and off, split into
   the steps of ``Answer.timings``; the rest (total minus those steps) is the guardrails and
   lookups before scoring.
3. The verdict: overhead = p50(/recommend, 1 connection) - bare model work - p50(/health,
   1 connection), and the criterion holds when overhead <= 0.5 x (bare model work + p50(/health)).

If the criterion fails (or with --profile), cProfile runs over ``Recommender.recommend`` and the
functions that take the time are printed.

The workspace (default bench-workspace/serve, git-ignored) keeps what is slow to make:
  data/      the world (``finrec generate``), reused while its manifest's generator settings match;
  model/     the bundle (``finrec train``), reused while it was trained on exactly these tables;
  wrk/       the Lua script and the customer ids it draws from;
  serve.log, audit/, events.db   the server's log, audit log and event store (reset every run);
  results.json, profile.prof     this run's figures and, when profiled, the cProfile data.

Usage::

    make bench-serve      # = .venv/bin/python benchmarks/bench_serve.py (the default world: 200k customers)
    .venv/bin/python benchmarks/bench_serve.py --users 5000 --products 60 --duration 5 --repeats 1  # quick check

Needs wrk (Debian package ``wrk``; ``make bench-serve`` installs it). Prints Markdown tables for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the finrec CLI sets it, before LightGBM loads

STEPS = ("retrieval", "features", "approval", "ranker", "guard_check", "reasons", "audit")
ENDPOINTS = ("health", "recommend")
CRITERION = 0.5


def log(msg: str) -> None:
    print(f"[bench-serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    from finrec.data.synthetic.generate import WorldConfig

    d = WorldConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path("bench-workspace/serve"),
                    help="Folder for the world, the model, the server's files and the results "
                         "(default: %(default)s).")
    ap.add_argument("--users", type=int, default=d.users,
                    help="Customers in the world (default: %(default)s, `finrec generate`'s). Smaller is for a quick "
                         "check only: the documented figures are for the default world.")
    ap.add_argument("--products", type=int, default=d.products, help="Products in the world (default: %(default)s).")
    ap.add_argument("--months", type=int, default=d.months, help="Months of events (default: %(default)s).")
    ap.add_argument("--seed", type=int, default=d.seed,
                    help="The world's seed; also seeds the sample of customers timed in process "
                         "(default: %(default)s).")
    ap.add_argument("--regenerate", action="store_true", help="Generate the world again even if it matches.")
    ap.add_argument("--retrain", action="store_true",
                    help="Train the model again even if it matches the data (e.g. after changing FINREC_TRAIN__*).")
    ap.add_argument("--k", type=int, default=10,
                    help="Products per answer, in every measurement (default: %(default)s).")
    ap.add_argument("--duration", type=int, default=20, help="Seconds of each wrk run (default: %(default)s).")
    ap.add_argument("--repeats", type=int, default=3,
                    help="wrk runs per endpoint and connection count, and in-process passes; medians are taken "
                         "over them (default: %(default)s).")
    ap.add_argument("--connections", default="1,4",
                    help="Comma-separated wrk connection counts (default: %(default)s). The criterion uses 1.")
    ap.add_argument("--threads", type=int, default=1,
                    help="wrk threads, at most the connections (default: %(default)s: the server has one worker and "
                         "the machine two cores).")
    ap.add_argument("--warmup", type=int, default=3,
                    help="Seconds of unmeasured wrk load on each endpoint before the runs (default: %(default)s).")
    ap.add_argument("--samples", type=int, default=2000,
                    help="Random customers timed in process, per pass (default: %(default)s).")
    ap.add_argument("--profile", action="store_true",
                    help="Profile Recommender.recommend with cProfile even when the criterion holds.")
    ap.add_argument("--skip-http", action="store_true",
                    help="Only the in-process measurements (no server, no wrk, no verdict); for investigating.")
    return ap.parse_args()


# -- machine ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    ram_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 1024**2
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(ram_gib, 1), "arch": platform.machine(),
            "python": platform.python_version(), "loadavg_at_start": [round(x, 2) for x in load]}  # fmt: skip


# -- world and model ------------------------------------------------------------------------------------


def finrec_cli(*args: str) -> None:
    """Run a finrec command, its progress shown as it goes; stop the benchmark if it fails."""
    cmd = [sys.executable, "-m", "finrec", *args]
    log("$ finrec " + " ".join(args))
    if subprocess.run(cmd, check=False).returncode != 0:
        raise SystemExit(f"`finrec {' '.join(args)}` failed (see above)")


def prepare(args: argparse.Namespace, ws: Path) -> tuple[Path, Path]:
    """The world and the model bundle in the workspace, made only when missing or different."""
    from finrec.artifacts import read_manifest
    from finrec.config import load_settings
    from finrec.data.contract import TABLES
    from finrec.data.dataset import fingerprint_files
    from finrec.data.synthetic.generate import WorldConfig
    from finrec.errors import FinrecError

    g = load_settings().generate  # `finrec generate` takes what the flags leave out from the settings
    cfg = WorldConfig(users=args.users, products=args.products, months=args.months, seed=args.seed, start=g.start,
                      sessions_per_month=g.sessions_per_month, slate_size=g.slate_size)  # fmt: skip
    data, model = ws / "data", ws / "model"
    try:
        same_world = read_manifest(data, "dataset")["config"]["generator"] == asdict(cfg)
    except (FinrecError, KeyError):
        same_world = False
    if same_world and not args.regenerate:
        log(f"reusing the world in {data} ({cfg.users:,} customers, {cfg.products} products, {cfg.months} months)")
    else:
        log(f"generating the world: {cfg.users:,} customers, {cfg.products} products, {cfg.months} months ...")
        finrec_cli("generate", "--out", str(data), "--users", str(cfg.users), "--products", str(cfg.products),
                   "--months", str(cfg.months), "--seed", str(cfg.seed), "--overwrite")  # fmt: skip
    fingerprint = fingerprint_files([p for p in data.iterdir() if p.is_file() and p.name.split(".")[0] in TABLES])
    try:
        same_model = read_manifest(model, "model")["inputs"].get("data_fingerprint") == fingerprint
    except (FinrecError, KeyError):
        same_model = False
    if same_model and not args.retrain:
        log(f"reusing the model in {model} (trained on these tables)")
    else:
        log("training the model (default settings; a few minutes on the default world) ...")
        finrec_cli("train", "--data", str(data), "--model-dir", str(model))
    return data, model


def customer_ids(data: Path) -> list[str]:
    """Every known customer id, as the service sees them (read from the users table, not assumed 1..N)."""
    import pandas as pd

    if (data / "users.parquet").is_file():
        ids = pd.read_parquet(data / "users.parquet", columns=["user_id"])["user_id"]
    else:
        ids = pd.read_csv(data / "users.csv", usecols=["user_id"], dtype=str)["user_id"]
    return [str(u).strip() for u in ids]


# -- the server and wrk ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 10) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"X-API-Key": API_KEY}), timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


#: The key the benchmark's server accepts (a random one per run) and wrk sends.
API_KEY = uuid.uuid4().hex + uuid.uuid4().hex


def start_server(ws: Path, data: Path, model: Path, src: Path | None = None,
                 log_name: str = "serve.log") -> tuple[subprocess.Popen[bytes], str]:  # fmt: skip
    """``finrec serve`` on the world and bundle, ready to answer. ``src``: a checkout of another revision, whose
    ``src/`` serves instead of this one (benchmarks/bench_serve_ab.py); one before API keys gets no key."""
    for stale in (ws / "audit" / "audit.jsonl", ws / "events.db"):  # the last run's answers and events
        stale.unlink(missing_ok=True)
    port = free_port()
    env = {**os.environ, "FINREC_WORKSPACE": str(ws.resolve()), "FINREC_SERVE__CLOCK": "data"}
    if src is not None:
        env["PYTHONPATH"] = str(src.resolve() / "src")
    if src is None or (src / "src" / "finrec" / "serving" / "auth.py").is_file():
        env["FINREC_SERVE__API_KEY"] = API_KEY  # every scope, no rate limit
    cmd = [sys.executable, "-m", "finrec", "serve", "--model-dir", str(model.resolve()), "--data",
           str(data.resolve()), "--port", str(port), "--workers", "1"]  # fmt: skip
    log_path = ws / log_name
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=src)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    last = 0.0
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"finrec serve exited ({proc.returncode}) before it was ready:\n{tail}")
        try:
            status, body = get_json(f"{base}/ready", timeout=5)
            if status == 200:
                log(f"server ready in {time.monotonic() - t0:.0f} s: model {body['model_version']}, "
                    f"{body['candidates']} candidates, {body['trees']} trees, clock {body['clock']}")  # fmt: skip
                return proc, base
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        waited = time.monotonic() - t0
        if waited > 1200:
            stop_server(proc)
            raise SystemExit(f"{base}/ready did not answer within 20 minutes; see {log_path}")
        if waited - last >= 10:
            log(f"waiting for {base}/ready ({waited:.0f} s; loading the data and embedding every customer) ...")
            last = waited
        time.sleep(1)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


LUA = """-- GET /recommend/{id}?k=%(k)d, each request for a customer drawn at random from the known ids (one per line).
local ids = {}
function init(args)
  for line in io.lines(%(ids)s) do ids[#ids + 1] = line end
  math.randomseed(os.time())
end
function request()
  return wrk.format("GET", "/recommend/" .. ids[math.random(#ids)] .. "?k=%(k)d")
end
"""

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"cannot read a wrk duration: {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Throughput, latency percentiles (ms) and errors from wrk's ``--latency`` report."""
    pct = {f"p{int(p)}": _ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.M)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    if not (rps and total and "p50" in pct and "p99" in pct):
        raise ValueError(f"unexpected wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(rps.group(1)), "requests": int(total.group(1)), "seconds": _ms(total.group(2)) / 1e3,
            **pct, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, sock.groups())) if sock else 0}  # fmt: skip


def run_wrk(base: str, endpoint: str, connections: int, seconds: int, args: argparse.Namespace,
            script: Path) -> dict[str, Any]:  # fmt: skip
    threads = max(1, min(args.threads, connections))
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
           "-H", f"X-API-Key: {API_KEY}"]  # fmt: skip
    cmd += ["-s", str(script), base] if endpoint == "recommend" else [f"{base}/health"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 120)
    if res.returncode != 0:
        raise SystemExit(f"wrk failed ({res.returncode}): {res.stderr or res.stdout}")
    out = parse_wrk(res.stdout)
    if out["non_2xx"] or out["socket_errors"]:
        raise SystemExit(f"wrk saw {out['non_2xx']} non-2xx answers and {out['socket_errors']} socket errors on "
                         f"/{endpoint}; the figures would not be latencies of answers:\n{res.stdout}")  # fmt: skip
    return out


def http_runs(args: argparse.Namespace, ws: Path, data: Path, model: Path, ids: list[str]) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `make bench-serve` installs it (apt-get install wrk)")
    import urllib.parse

    (ws / "wrk").mkdir(parents=True, exist_ok=True)
    ids_file = ws / "wrk" / "ids.txt"
    ids_file.write_text("".join(urllib.parse.quote(u, safe="") + "\n" for u in ids))
    script = ws / "wrk" / "recommend.lua"
    script.write_text(LUA % {"k": args.k, "ids": json.dumps(str(ids_file.resolve()))})
    conns = [int(c) for c in args.connections.split(",")]
    proc, base = start_server(ws, data, model)
    runs: list[dict[str, Any]] = []
    try:
        for uid in ids[:50]:  # some customers opted out of marketing: their answer is empty, by design
            status, body = get_json(f"{base}/recommend/{urllib.parse.quote(uid, safe='')}?k={args.k}")
            if status != 200:
                raise SystemExit(f"GET /recommend/{uid} answered {status}: {body}")
            if body["items"]:
                log(f"sanity: /recommend/{uid} gave {len(body['items'])} items from {body['candidates']} candidates")
                break
        else:
            raise SystemExit(f"none of the first 50 customers got a recommendation; see {ws / 'serve.log'}")
        for endpoint in ENDPOINTS:
            log(f"warm-up: {args.warmup} s of /{endpoint} (not measured)")
            run_wrk(base, endpoint, max(conns), args.warmup, args, script)
        plan = [(rep, c, e) for rep in range(args.repeats) for c in conns for e in ENDPOINTS]
        for i, (rep, c, endpoint) in enumerate(plan, start=1):
            log(f"wrk run {i}/{len(plan)}: /{endpoint}, {c} connection(s), {args.duration} s ...")
            r = run_wrk(base, endpoint, c, args.duration, args, script)
            load = os.getloadavg()[0]  # other work on the machine shows here: worth keeping next to each run
            runs.append({"endpoint": endpoint, "connections": c, "repeat": rep + 1, **r, "loadavg_1min": load})
            log(f"  {r['rps']:.0f} req/s, p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms ({r['requests']:,} requests; "
                f"load average {load:.2f})")
    finally:
        stop_server(proc)
        log("server stopped")
    med = statistics.median
    summary = {}
    for c in conns:
        for endpoint in ENDPOINTS:
            rs = [r for r in runs if r["endpoint"] == endpoint and r["connections"] == c]
            summary[f"{endpoint}@{c}"] = {"endpoint": endpoint, "connections": c, "runs": len(rs),
                                          **{m: med(r[m] for r in rs) for m in ("rps", "p50", "p99")}}  # fmt: skip
    return {"runs": runs, "summary": summary, "connections": conns}


# -- in process ------------------------------------------------------------------------------------------


@dataclass
class ModelInputs:
    """What the model saw for one customer in a real request: the bare work is re-run on exactly this."""

    embedding: np.ndarray | None
    allowed: np.ndarray
    n_cand: int
    approval_X: np.ndarray | None
    ranker_X: np.ndarray | None


class _Spy:
    """Stands in for the approval model or the ranker during capture: records its input, then delegates."""

    def __init__(self, real: Any, seen: dict[str, np.ndarray], key: str) -> None:
        self._real, self._seen, self._key = real, seen, key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def predict(self, X: np.ndarray) -> np.ndarray:
        self._seen[self._key] = X.copy()
        return np.asarray(self._real.predict(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        self._seen[self._key] = X.copy()
        return np.asarray(self._real.predict_proba(X))


def capture_inputs(rec: Any, uids: list[str], k: int) -> list[ModelInputs]:
    """Run each customer's real request once and keep the model's inputs (guardrails' mask, candidates' rows)."""
    served = rec.model
    model = served.model
    seen: dict[str, Any] = {}
    real_ranker, real_approval, real_audit = model.ranker, model.approval, rec.audit

    def rank(who: Any, allowed: np.ndarray, kk: int) -> Any:
        seen["who"], seen["allowed"] = who, allowed.copy()
        return type(served).rank(served, who, allowed, kk)

    served.rank = rank  # instance attribute: shadows the method for this object only, removed below
    model.ranker = _Spy(real_ranker, seen, "ranker") if real_ranker is not None else None
    model.approval = _Spy(real_approval, seen, "approval") if real_approval is not None else None
    rec.audit = None
    out = []
    try:
        for uid in uids:
            seen.clear()
            rec.recommend(uid, k)
            if "allowed" not in seen:  # nothing passed the guardrails: no model work at all
                out.append(ModelInputs(None, np.zeros(0, bool), 0, None, None))
                continue
            allowed = seen["allowed"]
            out.append(ModelInputs(seen["who"].embedding, allowed, min(max(served.n_candidates, k), len(allowed)),
                                   seen.get("approval"), seen.get("ranker")))  # fmt: skip
    finally:
        del served.rank
        model.ranker, model.approval, rec.audit = real_ranker, real_approval, real_audit
    return out


def bare_times(served: Any, inputs: list[ModelInputs]) -> dict[str, list[float]]:
    """Seconds of retrieval, approval and ranker for one pass over the customers' captured inputs."""
    model = served.model
    t_ret, t_app, t_rank = [], [], []
    for inp in inputs:
        t0 = time.perf_counter()
        if inp.n_cand:
            if served.index is not None and inp.embedding is not None:
                served.index.search(inp.embedding[None, :], inp.n_cand, exclude=~inp.allowed[None, :])
            else:  # the bundle's popularity fallback, as ServingModel.rank does it
                pop = np.where(inp.allowed, served.popularity, -np.inf)
                np.argsort(-pop, kind="stable")[: inp.n_cand]
        t1 = time.perf_counter()
        if inp.approval_X is not None:
            model.approval.predict_proba(inp.approval_X)
        t2 = time.perf_counter()
        if inp.ranker_X is not None:
            model.ranker.predict(inp.ranker_X)
        t3 = time.perf_counter()
        t_ret.append(t1 - t0)
        t_app.append(t2 - t1)
        t_rank.append(t3 - t2)
    return {"retrieval": t_ret, "approval": t_app, "ranker": t_rank}


def path_times(rec: Any, uids: list[str], k: int) -> list[dict[str, float]]:
    rows = []
    for uid in uids:
        t0 = time.perf_counter()
        answer = rec.recommend(uid, k)
        total = time.perf_counter() - t0
        steps = {s: answer.timings.get(s, 0.0) for s in STEPS}
        rows.append({"total": total, **steps, "rest": total - sum(steps.values()), "items": len(answer.body["items"])})
    return rows


def summarise_path(rows: list[dict[str, float]]) -> dict[str, Any]:
    med = statistics.median
    total = sum(r["total"] for r in rows)
    out: dict[str, Any] = {"median_ms": med(r["total"] for r in rows) * 1e3,
                           "mean_ms": total / len(rows) * 1e3, "p99_ms": float(np.percentile(
                               [r["total"] for r in rows], 99)) * 1e3, "steps": {}}  # fmt: skip
    for s in (*STEPS, "rest"):
        vals = [r[s] for r in rows]
        out["steps"][s] = {"median_ms": med(vals) * 1e3, "share": sum(vals) / total}
    return out


def in_process(args: argparse.Namespace, ws: Path, data: Path, model: Path, ids: list[str],
               http: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    from finrec.config import load_settings
    from finrec.serving.service import Service

    os.environ["FINREC_WORKSPACE"] = str(ws.resolve())  # the same settings the server had
    os.environ["FINREC_SERVE__CLOCK"] = "data"
    log("in process: loading the service (data, model, guardrail state, audit log) ...")
    t0 = time.perf_counter()
    service = Service.from_settings(load_settings(), model, data, audit=True)
    log(f"  loaded in {time.perf_counter() - t0:.0f} s")
    rec = service.recommender
    served = rec.model
    audit_log = rec.audit
    rng = np.random.default_rng(args.seed)
    uids = [ids[i] for i in rng.integers(0, len(ids), args.samples)]
    med = statistics.median
    try:
        log(f"  capturing the model's inputs for {len(uids):,} random customers ...")
        inputs = capture_inputs(rec, uids, args.k)
        n_cands = [int(inp.ranker_X.shape[0]) for inp in inputs if inp.ranker_X is not None]
        bare_times(served, inputs[:200])  # warm-up
        bare: dict[str, list[float]] = {"retrieval": [], "approval": [], "ranker": [], "total": []}
        for p in range(args.repeats):
            log(f"  bare model work, pass {p + 1}/{args.repeats} ...")
            t = bare_times(served, inputs)
            for key in ("retrieval", "approval", "ranker"):
                bare[key] += t[key]
            bare["total"] += [a + b + c for a, b, c in zip(t["retrieval"], t["approval"], t["ranker"], strict=True)]
        rows: dict[str, list[dict[str, float]]] = {"audit_on": [], "audit_off": []}
        for label, audit in (("audit_on", audit_log), ("audit_off", None)):
            rec.audit = audit
            path_times(rec, uids[:200], args.k)  # warm-up
            for p in range(args.repeats):
                log(f"  Recommender.recommend ({label.replace('_', ' ')}), pass {p + 1}/{args.repeats} ...")
                rows[label] += path_times(rec, uids, args.k)
        rec.audit = audit_log
        result = {
            "customers_sampled": len(uids), "passes": args.repeats,
            "empty_answers": sum(1 for inp in inputs if inp.n_cand == 0),
            "candidates_setting": served.n_candidates,
            "candidates_ranked": {"median": med(n_cands) if n_cands else 0, "min": min(n_cands, default=0),
                                  "max": max(n_cands, default=0)},
            "trees": int(served.model.ranker.booster_.current_iteration()) if served.model.ranker else 0,
            "trees_used": int(getattr(served.model.ranker, "best_iteration_", 0)) if served.model.ranker else 0,
            "approval_trees": int(served.model.approval.booster_.current_iteration())
            if served.model.approval is not None and served.model.approval.booster_ is not None else 0,
            "features": len(served.names),
            "bare_ms": {key: med(v) * 1e3 for key, v in bare.items()},
            "recommend": {label: summarise_path(r) for label, r in rows.items()},
        }  # fmt: skip
        result["verdict"] = verdict(http, result) if http is not None else None
        failed = result["verdict"] is not None and not result["verdict"]["holds"]
        if failed:
            log("the criterion fails: profiling the request path")
        result["profile"] = profile_recommend(rec, uids, args.k, ws) if args.profile or failed else None
        return result
    finally:
        service.close()


def profile_recommend(rec: Any, uids: list[str], k: int, ws: Path) -> dict[str, Any]:
    """cProfile over Recommender.recommend (audit on): where the request path's time goes, by function."""
    log(f"  profiling Recommender.recommend over {len(uids):,} customers (cProfile) ...")
    prof = cProfile.Profile()
    prof.enable()
    for uid in uids:
        rec.recommend(uid, k)
    prof.disable()
    prof.dump_stats(str(ws / "profile.prof"))
    texts = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(25)
        texts[key] = buf.getvalue()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]
    return {"file": str(ws / "profile.prof"), "tottime_top": [
        {"function": f"{Path(f).name}:{line}({name})", "tottime_ms_per_request": tt / len(uids) * 1e3,
         "share": tt / total} for (f, line, name), (_, _, tt, _, _) in top],  # fmt: skip
        "text": texts}


# -- report ----------------------------------------------------------------------------------------------


def verdict(http: dict[str, Any], proc: dict[str, Any]) -> dict[str, Any]:
    s = http["summary"]
    rec1, health1 = s["recommend@1"], s["health@1"]
    bare = proc["bare_ms"]["total"]
    overhead = rec1["p50"] - bare - health1["p50"]
    base = bare + health1["p50"]
    http_layer = rec1["p50"] - health1["p50"] - proc["recommend"]["audit_on"]["median_ms"]
    return {"recommend_p50_ms": rec1["p50"], "health_p50_ms": health1["p50"], "bare_model_ms": bare,
            "overhead_ms": overhead, "ratio": overhead / base, "limit": CRITERION,
            "holds": overhead / base <= CRITERION, "http_layer_ms": http_layer,
            "throughput_ratio": {c: s[f"recommend@{c}"]["rps"] / s[f"health@{c}"]["rps"] for c in http["connections"]}}


def markdown(http: dict[str, Any] | None, proc: dict[str, Any], v: dict[str, Any] | None) -> str:
    lines: list[str] = []
    if http is not None:
        lines += ["| endpoint | connections | throughput (req/s) | p50 | p99 | /recommend vs /health throughput |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for c in http["connections"]:
            for e in ENDPOINTS:
                r = http["summary"][f"{e}@{c}"]
                ratio = f"{r['rps'] / http['summary'][f'health@{c}']['rps']:.2f}x" if e == "recommend" else "—"
                path = "/recommend/{id}?k=10" if e == "recommend" else "/health"
                lines.append(f"| `{path}` | {c} | {r['rps']:,.0f} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | {ratio} |")
        lines.append("")
    b = proc["bare_ms"]
    lines += ["| in process, per request (median) | ms |", "| --- | ---: |",
              f"| bare model work: retrieval + approval + ranker | {b['total']:.3f} |",
              f"| - retrieval (index search over allowed products) | {b['retrieval']:.3f} |",
              f"| - approval model | {b['approval']:.3f} |",
              f"| - LightGBM ranker predict | {b['ranker']:.3f} |",
              f"| `Recommender.recommend`, audit on | {proc['recommend']['audit_on']['median_ms']:.3f} |",
              f"| `Recommender.recommend`, audit off | {proc['recommend']['audit_off']['median_ms']:.3f} |",
              ""]  # fmt: skip
    on = proc["recommend"]["audit_on"]["steps"]
    lines += ["| step of `Recommender.recommend` (audit on) | median ms | share of the time |", "| --- | ---: | ---: |"]
    labels = {"rest": "rest: guardrails before scoring, lookups"}
    for s in (*STEPS, "rest"):
        lines.append(f"| {labels.get(s, s)} | {on[s]['median_ms']:.3f} | {on[s]['share']:.1%} |")
    c = proc["candidates_ranked"]
    lines += ["", f"Candidates ranked per request: median {c['median']:.0f} (setting {proc['candidates_setting']}); "
              f"ranker trees {proc['trees']} ({proc['trees_used']} used at predict); approval trees "
              f"{proc['approval_trees']}; {proc['features']} features; {proc['empty_answers']} of "
              f"{proc['customers_sampled']} sampled customers had nothing left after the guardrails."]  # fmt: skip
    if v is not None:
        lines += ["", f"Criterion: overhead = p50 /recommend (c=1) {v['recommend_p50_ms']:.2f} ms - bare model work "
                  f"{v['bare_model_ms']:.2f} ms - p50 /health (c=1) {v['health_p50_ms']:.2f} ms = "
                  f"{v['overhead_ms']:.2f} ms; ratio to (bare + health) = {v['ratio']:.2f} "
                  f"(limit {v['limit']}): **{'holds' if v['holds'] else 'fails'}**. "
                  f"HTTP layer beyond the in-process path: {v['http_layer_ms']:.2f} ms."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    ws = args.workspace
    ws.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    info = machine()
    log(f"machine: {info['nproc']} cores ({info['cpu']}), {info['ram_gib']} GiB, load {info['loadavg_at_start']}")
    data, model = prepare(args, ws)
    ids = customer_ids(data)
    http = None if args.skip_http else http_runs(args, ws, data, model, ids)
    proc = in_process(args, ws, data, model, ids, http)
    v = proc.pop("verdict")
    result = {
        "date": started.date().isoformat(), "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/bench_serve.py", *sys.argv[1:]]), "machine": info,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "world": {"users": args.users, "products": args.products, "months": args.months, "seed": args.seed},
        "k": args.k, "wrk": {"duration_s": args.duration, "repeats": args.repeats, "threads": args.threads},
        "http": http, "in_process": proc, "verdict": v,
    }  # fmt: skip
    (ws / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print(markdown(http, proc, v))
    if proc["profile"] is not None:
        print("\ncProfile of Recommender.recommend, by own time:\n")
        print(proc["profile"]["text"]["tottime"])
    log(f"wrote {ws / 'results.json'}")


if __name__ == "__main__":
    main()
