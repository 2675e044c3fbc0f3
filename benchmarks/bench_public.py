"""Benchmark: finrec against simple peers on three public data sets (real data, not the synthetic world).

Each data set is converted into the data contract (benchmarks/public_data.py; the packages holding the data
are downloaded once into .cache/public-data/, see `make public-data`), split by its protocol, and every method
is trained on the same training data and scored on the same held-out items with the same exclusions:

  tafeng    (items: product subclasses, category: their class, see --tafeng-category)
            temporal: train on everything before the last 28 days; truth = for customers with history before
            the cutoff, the items first acquired in the window that they had not interacted with before;
            --exclude interacted; main metric NDCG@10 (also Recall@10, MAP@10, hit@10)
  insteval  no time: per student with >= 4 positives (click), a seeded random 25% of them held out; training
            keeps the other positives and every view; --exclude interacted; main metric NDCG@10
  ticdata   holdings: for a seeded random 30% of customers with >= 2 holdings, one held product removed;
            --exclude held; main metric MAP@3 (one relevant item each), also NDCG@10 and hit@3

Methods:
  finrec        run as a user runs it: `finrec train --data D --model-dir M`, then `finrec recommend ... --k 10
                --exclude interacted|held --output R.csv`, each timed (default settings: FINREC_* variables are
                removed and it runs in an empty folder, so no finrec.toml is picked up). Its processes are killed
                past --finrec-max-rss-gb of resident memory (the machine is shared); the run then shows as failed
  popularity    number of positive events per product
  cooccurrence  item-item cosine over customers' positive sets; score = sum over the customer's items
  ease          EASE (Steck 2019), B = I - P / diag(P), P = (X'X + lambda I)^-1; lambda picked on a validation
                split carved from the training data by the same protocol (never on the test)
  als           implicit's ALS on BM25-weighted counts of positive events, 64 factors

Positive events are click, apply, approve and hold (grade >= 2 in finrec's defaults). Metrics use binary
relevance: NDCG@k (ideal DCG over min(|truth|, k) items), Recall@k = hits / min(|truth|, k), MAP@k = average
precision at the hits / min(|truth|, k), hit@k = at least one hit. Every evaluated customer counts, a customer
without recommendations as zero. Recommendations are asked for 10 items; @3 metrics use the first three.
Intervals are 95% bootstrap intervals over customers.

Writes benchmarks/results/public.json (datasets not run this time are kept from the previous file) and
benchmarks/results/public.md, and prints the tables.
"""

from __future__ import annotations

import os

# Before numpy / implicit / LightGBM load: busy-waiting OpenMP threads stall when the 2 cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
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

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

import public_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
K = 10  # recommendations asked from every method
POSITIVE = ("click", "apply", "approve", "hold")
HOLDING = ("hold", "approve")
PEERS = ("popularity", "cooccurrence", "ease", "als")
METHODS = ("finrec", *PEERS)
EASE_LAMBDAS = (1.0, 5.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0)
MAX_DENSE_ITEMS = 8000
Truth = pd.DataFrame  # columns user_id, product_id: the held-out relevant pairs


# --------------------------------------------------------------------------------------------------------------
# Protocols: events -> (training events, truth)


def split_temporal(events: pd.DataFrame, seed: int, *, window_days: int = 28) -> tuple[pd.DataFrame, Truth]:
    """Train before the last ``window_days`` days; truth = new positive items of customers seen before."""
    del seed  # deterministic
    last_day = events["timestamp"].max().normalize()
    cutoff = last_day - pd.Timedelta(days=window_days - 1)
    before = events["timestamp"] < cutoff
    train, test = events[before], events[~before]
    seen = pd.MultiIndex.from_frame(train[["user_id", "product_id"]].drop_duplicates())
    test = test[test["event_type"].isin(POSITIVE) & test["user_id"].isin(train["user_id"].unique())]
    test = test[["user_id", "product_id"]].drop_duplicates()
    truth = test[~pd.MultiIndex.from_frame(test).isin(seen)]
    return train.reset_index(drop=True), truth.reset_index(drop=True)


def split_random_positives(
    events: pd.DataFrame, seed: int, *, share: float = 0.25, min_positives: int = 4
) -> tuple[pd.DataFrame, Truth]:
    """Per customer with ``min_positives`` positive items, a seeded random ``share`` of them held out."""
    rng = np.random.default_rng(seed)
    pos = events.loc[events["event_type"].isin(POSITIVE), ["user_id", "product_id"]].drop_duplicates()
    pos = pos.sort_values(["user_id", "product_id"], ignore_index=True)
    pos = pos.iloc[rng.permutation(len(pos))].reset_index(drop=True)
    n = pos.groupby("user_id")["product_id"].transform("size").to_numpy()
    order = pos.groupby("user_id").cumcount().to_numpy()
    n_out = np.maximum(1, np.floor(share * n)).astype(int)
    truth = pos[(n >= min_positives) & (order < n_out)]
    return _drop_pairs(events, truth), truth.sort_values(["user_id", "product_id"], ignore_index=True)


def split_hide_one(
    events: pd.DataFrame, seed: int, *, share: float = 0.3, min_holdings: int = 2
) -> tuple[pd.DataFrame, Truth]:
    """For a seeded random ``share`` of customers with ``min_holdings`` held products, one of them hidden."""
    rng = np.random.default_rng(seed)
    held = _held_pairs(events).sort_values(["user_id", "product_id"], ignore_index=True)
    counts = held.groupby("user_id").size()
    eligible = np.sort(counts.index[counts >= min_holdings].to_numpy())
    chosen = rng.choice(eligible, size=round(share * len(eligible)), replace=False)
    cand = held[held["user_id"].isin(chosen)]
    cand = cand.iloc[rng.permutation(len(cand))]
    truth = cand.drop_duplicates("user_id").sort_values("user_id", ignore_index=True)
    return _drop_pairs(events, truth), truth


def _drop_pairs(events: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    drop = pd.MultiIndex.from_frame(events[["user_id", "product_id"]]).isin(pd.MultiIndex.from_frame(pairs))
    return events[~drop].reset_index(drop=True)


def _held_pairs(events: pd.DataFrame) -> pd.DataFrame:
    """Pairs held at the end of the events: a hold or approve not followed by a close (finrec's `held`)."""
    last_hold = events[events["event_type"].isin(HOLDING)].groupby(["user_id", "product_id"])["timestamp"].max()
    last_close = events[events["event_type"] == "close"].groupby(["user_id", "product_id"])["timestamp"].max()
    closed = last_close.reindex(last_hold.index)
    still = closed.isna() | (closed < last_hold)
    return last_hold[still].reset_index()[["user_id", "product_id"]]


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    split: Callable[[pd.DataFrame, int], tuple[pd.DataFrame, Truth]]
    exclude: str  # finrec's --exclude: interacted or held
    main: str
    metrics: tuple[str, ...]


PROTOCOLS = {
    "tafeng": Protocol(
        "tafeng",
        "temporal: train before the last 28 days; truth = new items acquired in the window by known customers",
        split_temporal,
        "interacted",
        "ndcg@10",
        ("ndcg@10", "recall@10", "map@10", "hit@10"),
    ),
    "insteval": Protocol(
        "insteval",
        "no time: a seeded 25% of the positives (click) of each student with >= 4 held out",
        split_random_positives,
        "interacted",
        "ndcg@10",
        ("ndcg@10", "recall@10", "map@10", "hit@10"),
    ),
    "ticdata": Protocol(
        "ticdata",
        "holdings: one held product hidden for a seeded 30% of customers with >= 2 holdings",
        split_hide_one,
        "held",
        "map@3",
        ("map@3", "ndcg@10", "hit@3", "hit@10"),
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Metrics


def per_user_metrics(recs: dict[Any, list[Any]], truth: Truth, names: tuple[str, ...]) -> pd.DataFrame:
    """One row per customer in ``truth``, one column per metric (``ndcg@k``, ``recall@k``, ``map@k``, ``hit@k``)."""
    rel = truth.groupby("user_id")["product_id"].agg(set)
    parsed = [(n, n.split("@")[0], int(n.split("@")[1])) for n in names]
    discount = 1.0 / np.log2(np.arange(2, 2 + max(k for _, _, k in parsed)))
    rows = []
    for user, items in rel.items():
        ranked = recs.get(user, [])
        hits = np.array([p in items for p in ranked], dtype=float)
        row = {}
        for name, kind, k in parsed:
            h = hits[:k]
            denom = min(len(items), k)
            if kind == "ndcg":
                row[name] = float((h * discount[: len(h)]).sum() / discount[:denom].sum())
            elif kind == "recall":
                row[name] = float(h.sum() / denom)
            elif kind == "map":
                prec = np.cumsum(h) / np.arange(1, len(h) + 1) if len(h) else h
                row[name] = float((prec * h).sum() / denom)
            elif kind == "hit":
                row[name] = float(h.any())
            else:
                raise ValueError(f"unknown metric {name}")
        rows.append(row)
    return pd.DataFrame(rows, index=rel.index)


def summarise(per_user: pd.DataFrame, main: str, seed: int, n_boot: int = 1000) -> dict[str, Any]:
    values = per_user[main].to_numpy()
    rng = np.random.default_rng(seed)
    boots = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return {
        "metrics": {c: round(float(per_user[c].mean()), 5) for c in per_user.columns},
        "interval": [round(float(np.quantile(boots, 0.025)), 5), round(float(np.quantile(boots, 0.975)), 5)],
    }


# --------------------------------------------------------------------------------------------------------------
# Peers, on one user-item matrix built from the training events


class Matrix:
    """The training events as sparse user x item matrices over the whole catalogue, and the exclusion mask."""

    def __init__(self, events: pd.DataFrame, products: pd.Index, exclude: str) -> None:
        self.users = pd.Index(np.sort(events["user_id"].unique()))
        self.items = products
        pos = events[events["event_type"].isin(POSITIVE)]
        shape = (len(self.users), len(self.items))
        self.counts = self._matrix(pos, shape, binary=False)  # positive events per pair
        self.binary = self.counts.copy()
        self.binary.data[:] = 1.0
        if exclude == "interacted":
            self.exclude = self._matrix(events, shape, binary=True)
        elif exclude == "held":
            self.exclude = self._matrix(_held_pairs(events), shape, binary=True)
        else:
            self.exclude = sp.csr_matrix(shape, dtype=np.float32)

    def _matrix(self, df: pd.DataFrame, shape: tuple[int, int], *, binary: bool) -> sp.csr_matrix:
        r = self.users.get_indexer(df["user_id"])
        c = self.items.get_indexer(df["product_id"])
        ok = (r >= 0) & (c >= 0)
        m = sp.csr_matrix((np.ones(ok.sum(), dtype=np.float32), (r[ok], c[ok])), shape=shape)
        m.sum_duplicates()
        if binary:
            m.data[:] = 1.0
        return m

    def top_k(
        self, score: Callable[[np.ndarray], np.ndarray], users: list[Any], k: int, *, desc: str = "", batch: int = 2048
    ) -> dict[Any, list[Any]]:
        rows = self.users.get_indexer(users)
        out: dict[Any, list[Any]] = {}
        items = self.items.to_numpy()
        known = [(u, r) for u, r in zip(users, rows, strict=True) if r >= 0]
        for start in tqdm(range(0, len(known), batch), desc=desc, leave=False, disable=len(known) <= batch):
            chunk = known[start : start + batch]
            idx = np.array([r for _, r in chunk])
            s = np.array(score(idx), dtype=np.float64)  # a copy: exclusions are written in
            s[self.exclude[idx].toarray() > 0] = -np.inf
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            ps = np.take_along_axis(s, part, axis=1)
            order = np.lexsort((part, -ps), axis=1)  # by score, then item position: deterministic ties
            best = np.take_along_axis(part, order, axis=1)
            best_s = np.take_along_axis(ps, order, axis=1)
            for (u, _), b, bs in zip(chunk, best, best_s, strict=True):
                out[u] = [items[j] for j, v in zip(b, bs, strict=True) if np.isfinite(v)]
        return out


def fit_popularity(m: Matrix) -> Callable[[np.ndarray], np.ndarray]:
    pop = np.asarray(m.counts.sum(axis=0)).ravel()
    return lambda rows: np.broadcast_to(pop, (len(rows), len(pop)))


def fit_cooccurrence(m: Matrix) -> Callable[[np.ndarray], np.ndarray]:
    x = m.binary
    co = (x.T @ x).tocsr().astype(np.float64)
    norm = np.sqrt(co.diagonal())
    norm[norm == 0] = 1.0
    inv = sp.diags(1.0 / norm)
    sim = (inv @ co @ inv).tolil()
    sim.setdiag(0.0)
    sim = sim.tocsr()
    if len(m.items) <= MAX_DENSE_ITEMS:
        dense = sim.toarray().astype(np.float32)
        return lambda rows: x[rows] @ dense
    return lambda rows: (x[rows] @ sim).toarray()


def fit_ease(m: Matrix, lam: float) -> Callable[[np.ndarray], np.ndarray]:
    if len(m.items) > MAX_DENSE_ITEMS:
        raise ValueError(f"EASE needs a dense {len(m.items)} x {len(m.items)} inverse; over {MAX_DENSE_ITEMS} items")
    x = m.binary
    g = (x.T @ x).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    b32 = b.astype(np.float32)
    return lambda rows: x[rows] @ b32


def fit_als(m: Matrix, seed: int, factors: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.nearest_neighbours import bm25_weight
    from threadpoolctl import threadpool_limits

    weighted = bm25_weight(m.counts.astype(np.float32), K1=100, B=0.8).tocsr().astype(np.float32)
    with threadpool_limits(1, "blas"):  # implicit runs its own threads; nested BLAS threads only slow it
        model = AlternatingLeastSquares(
            factors=factors, regularization=0.05, iterations=15, random_state=seed, num_threads=0
        )
        model.fit(weighted, show_progress=False)
    uf, itf = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return lambda rows: uf[rows] @ itf.T


def run_peers(
    protocol: Protocol, train: pd.DataFrame, truth: Truth, products: pd.Index, seed: int, peers: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    users = sorted(truth["user_id"].unique())
    out: dict[str, dict[str, Any]] = {}
    t = time.perf_counter()
    m = Matrix(train, products, protocol.exclude)
    build_s = time.perf_counter() - t
    for name in tqdm(peers, desc=f"{protocol.name} peers", leave=False):
        t = time.perf_counter()
        extra: dict[str, Any] = {}
        if name == "popularity":
            score = fit_popularity(m)
        elif name == "cooccurrence":
            score = fit_cooccurrence(m)
        elif name == "ease":
            lam, val = tune_ease(protocol, train, products, seed)
            extra = {"lambda": lam, "validation": val}
            score = fit_ease(m, lam)
        elif name == "als":
            score = fit_als(m, seed)
        else:
            raise ValueError(name)
        recs = m.top_k(score, users, K, desc=name)
        seconds = time.perf_counter() - t + build_s
        per_user = per_user_metrics(recs, truth, protocol.metrics)
        out[name] = {**summarise(per_user, protocol.main, seed), "seconds": round(seconds, 2), **extra}
        out[name]["_per_user"] = per_user
    return out


def tune_ease(protocol: Protocol, train: pd.DataFrame, products: pd.Index, seed: int) -> tuple[float, dict[str, float]]:
    """EASE's lambda by the main metric on a validation split of the training data (same protocol, next seed)."""
    fit_events, val_truth = protocol.split(train, seed + 1)
    m = Matrix(fit_events, products, protocol.exclude)
    users = sorted(val_truth["user_id"].unique())
    scores: dict[str, float] = {}
    for lam in tqdm(EASE_LAMBDAS, desc="ease lambda", leave=False):
        recs = m.top_k(fit_ease(m, lam), users, K)
        scores[str(lam)] = round(float(per_user_metrics(recs, val_truth, (protocol.main,))[protocol.main].mean()), 5)
    best = max(EASE_LAMBDAS, key=lambda lam: (scores[str(lam)], -lam))
    return best, scores


# --------------------------------------------------------------------------------------------------------------
# finrec, through its command line


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc (0 once it is gone)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
    return total


def run_capped(cmd: list[str], *, max_rss: float, timeout: float, **kwargs: Any) -> tuple[int, float, str | None]:
    """Run ``cmd`` in its own session, killed when its process tree's RSS passes ``max_rss`` bytes or it times
    out (the machine is shared: never leave it to the kernel's OOM killer). Exit code, peak RSS, why killed."""
    import signal

    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    start, peak, why = time.monotonic(), 0, None
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        if peak > max_rss:
            why = f"killed: memory over the {max_rss / 2**30:.1f} GB cap (--finrec-max-rss-gb)"
        elif time.monotonic() - start > timeout:
            why = f"killed: over the {timeout:.0f} s time limit"
        if why:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.25)
    return proc.returncode, peak, why


def finrec_command(src: Path | None) -> list[str]:
    if src is not None:
        return [sys.executable, "-m", "finrec"]
    for exe in (ROOT / ".venv" / "bin" / "finrec", Path(sys.executable).with_name("finrec")):
        if exe.exists():
            return [str(exe)]
    return [sys.executable, "-m", "finrec"]


def run_finrec(
    protocol: Protocol,
    train_dir: Path,
    truth: Truth,
    work: Path,
    *,
    src: Path | None = None,
    max_rss_gb: float = 6.0,
    timeout: float = 7200,
) -> dict[str, Any]:
    """Train and recommend with the finrec CLI, each timed; recommendations and what the model bundle says."""
    cmd = finrec_command(src)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINREC_")}
    env["COLUMNS"] = "200"
    if src is not None:
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    cwd = work / "cwd"  # empty: no finrec.toml
    cwd.mkdir(parents=True, exist_ok=True)
    users_file = work / "users.txt"
    users_file.write_text("".join(f"{u}\n" for u in sorted(truth["user_id"].unique())))
    model, recs_file = work / "model", work / "recs.csv"
    info: dict[str, Any] = {"command": cmd[-1] if len(cmd) == 1 else " ".join(cmd[-2:])}
    seconds: dict[str, float] = {}
    peak_gb: dict[str, float] = {}
    steps = {
        "train": ["train", "--data", str(train_dir), "--model-dir", str(model)],
        "recommend": [
            "recommend", "--model-dir", str(model), "--data", str(train_dir), "--users", str(users_file),
            "--k", str(K), "--exclude", protocol.exclude, "--output", str(recs_file),
        ],
    }  # fmt: skip
    for step, args in steps.items():
        log = work / f"{step}.log"
        t = time.perf_counter()
        with log.open("w") as fh:
            code, peak, why = run_capped(
                [*cmd, *args],
                max_rss=max_rss_gb * 2**30,
                timeout=timeout,
                cwd=cwd,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        seconds[step] = round(time.perf_counter() - t, 2)
        peak_gb[step] = round(peak / 2**30, 2)
        if code != 0:
            tail = log.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-8:]
            info.update(
                seconds=seconds,
                peak_rss_gb=peak_gb,
                error=f"finrec {step} exited {code}" + (f" ({why})" if why else "") + ": " + "\n".join(tail),
            )
            return info
        if step == "train":
            manifest = json.loads((model / "manifest.json").read_text())
            mm = manifest.get("metrics", {})
            info.update(
                code_version=manifest.get("code_version"),
                stages=mm.get("stages"),
                fallbacks=mm.get("fallbacks"),
                stage_seconds=mm.get("seconds"),
            )
    seconds["total"] = round(seconds["train"] + seconds["recommend"], 2)
    info["seconds"] = seconds
    info["peak_rss_gb"] = peak_gb
    recs = pd.read_csv(recs_file, dtype={"user_id": str, "product_id": str})
    info["recs"] = recs
    return info


def _canonical(x: Any) -> str:
    """An id as text without leading zeros: what is left when a text id like 00001069 is read as a number."""
    t = str(x).strip()
    return (t.lstrip("0") or "0") if t.isdigit() else t


def _finrec_recs(recs: pd.DataFrame, train: pd.DataFrame, truth: Truth) -> tuple[dict[Any, list[Any]], list[str]]:
    """finrec's CSV as {user: [items by rank]}, its text ids mapped back to the data's ids; and notes.

    Ids are matched as text first; an id finrec wrote without the leading zeros the data has is matched by its
    number (and counted in a note), so that a formatting slip shows up as a note rather than as zero scores.
    """
    notes: list[str] = []

    def lookup(ids: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        exact = {str(i): i for i in ids}
        canon: dict[str, Any] = {}
        for i in ids:
            canon.setdefault(_canonical(i), i)
        return exact, canon

    u_exact, u_canon = lookup(truth["user_id"].unique())
    p_exact, p_canon = lookup(pd.concat([train["product_id"], truth["product_id"]]).unique())
    recs = recs.sort_values(["user_id", "rank"])
    fixed = {"user": 0, "product": 0}

    def resolve(x: str, exact: dict[str, Any], canon: dict[str, Any], kind: str) -> Any:
        if x in exact:
            return exact[x]
        if _canonical(x) in canon:
            fixed[kind] += 1
            return canon[_canonical(x)]
        return None

    out: dict[Any, list[Any]] = {}
    for u, g in recs.groupby("user_id", sort=False):
        user = resolve(str(u), u_exact, u_canon, "user")
        if user is not None:
            out[user] = [resolve(str(p), p_exact, p_canon, "product") for p in g["product_id"]]
    for kind, n in fixed.items():
        if n:
            notes.append(f"finrec recommend wrote {n:,} {kind} ids without the leading zeros they have in the data")
    return out, notes


# --------------------------------------------------------------------------------------------------------------
# One data set end to end


def run_dataset(
    name: str,
    workdir: Path,
    *,
    seed: int = 0,
    methods: tuple[str, ...] = METHODS,
    cache: Path = public_data.DEFAULT_CACHE,
    finrec_src: Path | None = None,
    max_customers: int | None = None,
    convert_options: dict[str, Any] | None = None,
    finrec_max_rss_gb: float = 6.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert, split, run every method; the result for public.json (per-user metrics under ``_per_user``)."""
    protocol = PROTOCOLS[name]
    work = workdir / name
    if work.exists():
        shutil.rmtree(work)
    t = time.perf_counter()
    data = public_data.convert(name, work / "data", cache, **(convert_options or {}))
    log(f"{name}: converted in {time.perf_counter() - t:.1f} s: {data['users']:,} users, "
        f"{data['products']:,} products, {data['events']:,} events")  # fmt: skip
    users = pd.read_parquet(work / "data" / "users.parquet")
    products = pd.read_parquet(work / "data" / "products.parquet")
    events = pd.read_parquet(work / "data" / "events.parquet")
    notes: list[str] = []
    if max_customers is not None and events["user_id"].nunique() > max_customers:
        rng = np.random.default_rng(seed)
        keep = rng.choice(np.sort(events["user_id"].unique()), size=max_customers, replace=False)
        events = events[events["user_id"].isin(keep)].reset_index(drop=True)
        users = users[users["user_id"].isin(keep)].reset_index(drop=True)
        notes.append(f"a seeded random sample of {max_customers:,} customers (with events) is used")
    train, truth = protocol.split(events, seed)
    train_dir = work / "train"
    train_dir.mkdir()
    users.to_parquet(train_dir / "users.parquet", index=False)
    products.to_parquet(train_dir / "products.parquet", index=False)
    train.to_parquet(train_dir / "events.parquet", index=False)
    split = {
        "train_events": len(train),
        "train_users": int(train["user_id"].nunique()),
        "test_users": int(truth["user_id"].nunique()),
        "test_pairs": len(truth),
        "test_items": int(truth["product_id"].nunique()),
        "test_pairs_per_user": round(len(truth) / max(1, truth["user_id"].nunique()), 2),
    }
    if name == "tafeng":
        split["test_window"] = [
            str(events.loc[events["timestamp"] > train["timestamp"].max(), "timestamp"].min().date()),
            str(events["timestamp"].max().date()),
        ]
    log(f"{name}: {split}")
    result: dict[str, Any] = {
        "protocol": protocol.description,
        "exclude": protocol.exclude,
        "main_metric": protocol.main,
        "k": K,
        "data": data,
        "split": split,
        "notes": notes,
        "methods": {},
    }
    if "finrec" in methods:
        log(f"{name}: finrec train + recommend ...")
        info = run_finrec(protocol, train_dir, truth, work, src=finrec_src, max_rss_gb=finrec_max_rss_gb)
        recs = info.pop("recs", None)
        if recs is not None:
            mapped, id_notes = _finrec_recs(recs, train, truth)
            notes.extend(id_notes)
            per_user = per_user_metrics(mapped, truth, protocol.metrics)
            info = {**summarise(per_user, protocol.main, seed), **info, "_per_user": per_user}
            info["users_without_recs"] = int(truth["user_id"].nunique() - len(mapped))
            info["mean_recs_per_user"] = round(float(np.mean([len(v) for v in mapped.values()] or [0])), 2)
        else:
            log(f"{name}: {info['error']}")
        result["methods"]["finrec"] = info
    peers = tuple(p for p in PEERS if p in methods)
    if peers:
        result["methods"].update(run_peers(protocol, train, truth, pd.Index(products["product_id"]), seed, peers))
    if "finrec" in result["methods"] and "_per_user" in result["methods"]["finrec"]:
        f = result["methods"]["finrec"]["_per_user"][protocol.main]
        for peer in peers:
            diff = f - result["methods"][peer]["_per_user"][protocol.main].reindex(f.index)
            result["methods"][peer]["finrec_minus_this"] = _paired(diff.to_numpy(), seed)
    return result


def _paired(diff: np.ndarray, seed: int, n_boot: int = 1000) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    return {
        "mean": round(float(diff.mean()), 5),
        "low": round(float(np.quantile(boots, 0.025)), 5),
        "high": round(float(np.quantile(boots, 0.975)), 5),
    }


# --------------------------------------------------------------------------------------------------------------
# Report


def strip_private(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    out["methods"] = {m: {k: v for k, v in r.items() if not k.startswith("_")} for m, r in result["methods"].items()}
    return out


def table(name: str, result: dict[str, Any]) -> list[str]:
    main = result["main_metric"]
    metrics = [main, *[m for m in PROTOCOLS[name].metrics if m != main]]
    lines = [
        f"| method | **{main}** (95% CI) | " + " | ".join(metrics[1:]) + " | seconds |",
        "| --- | ---: |" + " ---: |" * (len(metrics) - 1) + " ---: |",
    ]
    done = {m: r for m, r in result["methods"].items() if "metrics" in r}
    best = max((r["metrics"][main] for r in done.values()), default=None)
    for method, r in result["methods"].items():
        if "metrics" not in r:
            lines.append(f"| {method} | failed (see the JSON) |" + " — |" * (len(metrics) - 1) + " — |")
            continue
        v = r["metrics"][main]
        cell = f"{v:.4f} [{r['interval'][0]:.4f}, {r['interval'][1]:.4f}]"
        if v == best:
            cell = f"**{cell}**"
        secs = r["seconds"]
        secs_txt = f"{secs['total']:.1f} (train {secs['train']:.1f})" if isinstance(secs, dict) else f"{secs:.1f}"
        name_txt = method + (f" (λ={r['lambda']:g})" if "lambda" in r else "")
        others = " | ".join(f"{r['metrics'][m]:.4f}" for m in metrics[1:])
        lines.append(f"| {name_txt} | {cell} | {others} | {secs_txt} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    out = [
        "# Public-data benchmark",
        "",
        f"{results['date']}, {results['machine']}; finrec {results.get('finrec_source', '')}; `{results['command']}`.",
        "Metrics over every evaluated customer (none dropped); @3 metrics are the first three of 10.",
        "",
    ]
    for name, r in results["datasets"].items():
        d, s = r["data"], r["split"]
        item = d["item"] + (f", category: {d['category']}" if "category" in d else "")
        out += [
            f"## {name}",
            "",
            f"{r['protocol']}; `--exclude {r['exclude']}`. Data: {d['users']:,} users, {d['products']:,} products "
            f"({item}), {d['events']:,} events; training {s['train_events']:,} events; "
            f"{s['test_users']:,} evaluated customers, {s['test_pairs']:,} held-out pairs.",
            "",
            *table(name, r),
            "",
        ]
        fr = r["methods"].get("finrec", {})
        if fr.get("stages"):
            out.append(f"- finrec stages: {fr['stages']}")
        for fb in fr.get("fallbacks") or []:
            out.append(f"- finrec fallback: {fb}")
        for peer, pr in r["methods"].items():
            if "finrec_minus_this" in pr:
                c = pr["finrec_minus_this"]
                out.append(
                    f"- finrec − {peer}: {r['main_metric']} {c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"
                )
        for note in [*r.get("notes", []), *d.get("quirks", [])]:
            out.append(f"- {note}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench_public.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--datasets", default=",".join(PROTOCOLS), help="comma-separated subset of %(default)s (default: all)"
    )
    ap.add_argument("--skip-finrec", action="store_true", help="run only the peers (no finrec train/recommend)")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / "bench-workspace" / "public",
        help="where converted data, splits, finrec models, recommendations and logs go (default: %(default)s; "
        "each data set's folder is replaced)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the holdouts and the peers (default: %(default)s)")
    ap.add_argument("--cache", type=Path, default=public_data.DEFAULT_CACHE, help="downloads (default: %(default)s)")
    ap.add_argument(
        "--tafeng-customers",
        type=int,
        default=None,
        help="use a seeded random sample of this many Ta-Feng customers (default: all 32,256)",
    )
    ap.add_argument(
        "--tafeng-category",
        choices=("class", "subclass"),
        default="class",
        help="Ta-Feng products' category: the subclass's class (first four digits of its code; 179 of them) or "
        "the subclass itself, which is also the item (1,618 categories; default: %(default)s)",
    )
    ap.add_argument(
        "--finrec-commit",
        default=None,
        metavar="REF",
        help="run finrec's code as of this git commit (its src/ from `git archive`, first on PYTHONPATH) instead "
        "of the installed work tree, e.g. to measure a baseline while src/ is being changed",
    )
    ap.add_argument(
        "--finrec-max-rss-gb",
        type=float,
        default=6.0,
        help="kill finrec train/recommend when its processes' resident memory passes this (default: %(default)s GB); "
        "the run is then reported as failed",
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        ap.error(f"unknown data sets {unknown}; choose from {', '.join(PROTOCOLS)}")
    methods = PEERS if args.skip_finrec else METHODS
    finrec_src = None
    if args.finrec_commit and not args.skip_finrec:
        finrec_src = checkout_src(args.finrec_commit, args.workdir)
    out_json = args.results / "public.json"
    previous = json.loads(out_json.read_text()) if out_json.exists() else {}
    results: dict[str, Any] = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": "benchmarks/bench_public.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "finrec_source": _finrec_source(args.finrec_commit),
        "datasets": dict(previous.get("datasets", {})),
    }
    for name in names:
        r = run_dataset(
            name,
            args.workdir,
            seed=args.seed,
            methods=methods,
            cache=args.cache,
            finrec_src=finrec_src,
            finrec_max_rss_gb=args.finrec_max_rss_gb,
            max_customers=args.tafeng_customers if name == "tafeng" else None,
            convert_options={"category": args.tafeng_category} if name == "tafeng" else None,
        )
        results["datasets"][name] = {
            **strip_private(r),
            "run": {"date": results["date"], "command": results["command"]},
        }
        print()
        print(f"## {name}")
        print("\n".join(table(name, r)))
        print()
    results["datasets"] = {n: results["datasets"][n] for n in PROTOCOLS if n in results["datasets"]}
    args.results.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.results / "public.md").write_text(markdown(results))
    print(f"wrote {out_json} and {args.results / 'public.md'}")
    return 0


def checkout_src(ref: str, workdir: Path) -> Path:
    """finrec's src/ as of git commit ``ref``, extracted under ``workdir`` (the work tree is not touched)."""
    import io
    import tarfile

    commit = subprocess.run(
        ["git", "rev-parse", "--verify", ref + "^{commit}"], cwd=ROOT, capture_output=True, text=True
    )
    if commit.returncode != 0:
        raise SystemExit(f"--finrec-commit: {ref} is not a commit here: {commit.stderr.strip()}")
    dest = workdir / f"finrec-{commit.stdout.strip()[:12]}"
    if not (dest / "src" / "finrec").is_dir():
        tar = subprocess.run(
            ["git", "archive", "--format=tar", commit.stdout.strip(), "src"], cwd=ROOT, capture_output=True
        )
        with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as t:
            t.extractall(dest, filter="data")
    return dest / "src"


def _finrec_source(ref: str | None) -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        if ref is not None:
            return f"commit {git('rev-parse', '--short', ref)} (git archive, PYTHONPATH)"
        dirty = git("status", "--porcelain", "src")
        return f"work tree at {git('rev-parse', '--short', 'HEAD')}" + (" + uncommitted src/ changes" if dirty else "")
    except OSError:
        return "installed"


if __name__ == "__main__":
    sys.exit(main())
