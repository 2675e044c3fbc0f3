"""The pipeline learns on data shapes our synthetic world does not have, through the commands users run.

Each dataset has a planted answer a simple peer cannot see:

* monthly holdings snapshots (a bank's "next product" data): everyone holds the current account, so
  holdings popularity is useless; what customers *add* depends on what they hold (a card holder adds
  the card's insurance, a savings holder adds a deposit); half the customers give next month's
  snapshot, the other half's additions are what we predict;
* implicit positives at one single time (no dates at all): two tastes of products, some of each
  customer's hidden.

finrec must beat popularity on each, and its own validation must say it does not serve anything
worse than popularity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finrec import pipeline
from finrec.config import FinrecSettings

pytestmark = pytest.mark.slow

PRODUCTS = ["current", "card", "card_insurance", "savings", "deposit", "loan", "mortgage", "pension"]
#: What a customer holding the key product adds next month (with probability 0.6).
NEXT = {"card": "card_insurance", "savings": "deposit", "loan": "mortgage"}


def _map_at_k(recs: pd.DataFrame, truth: dict[str, set[str]], k: int) -> float:
    ranked = recs.sort_values(["user_id", "rank"]).groupby("user_id")["product_id"].apply(list).to_dict()
    scores = []
    for user, items in truth.items():
        got = [str(p) for p in ranked.get(user, [])][:k]
        hits, ap = 0, 0.0
        for i, p in enumerate(got, start=1):
            if p in items:
                hits += 1
                ap += hits / i
        scores.append(ap / min(len(items), k))
    return float(np.mean(scores))


def write_snapshots(path: Path, n: int = 3000, seed: int = 0) -> tuple[Path, dict[str, set[str]], list[str]]:
    rng = np.random.default_rng(seed)
    users = [f"c{i:05d}" for i in range(n)]
    rows, truth = [], {}
    t0, t1 = "2026-01-31", "2026-02-28"
    for i, u in enumerate(users):
        held = {"current"} | {p for p in ("card", "savings", "loan", "pension") if rng.random() < 0.35}
        adds = {NEXT[p] for p in held if p in NEXT and rng.random() < 0.6}
        if rng.random() < 0.15:
            adds.add(str(rng.choice(PRODUCTS[1:])))
        adds -= held
        rows += [(u, p, "hold", t0) for p in sorted(held)]
        if i % 2 == 0:  # these customers also send next month's snapshot
            rows += [(u, p, "hold", t1) for p in sorted(held | adds)]
        elif adds:
            truth[u] = adds
    path.mkdir(parents=True)
    pd.DataFrame({"user_id": users, "age": rng.integers(18, 80, n)}).to_csv(path / "users.csv", index=False)
    pd.DataFrame({"product_id": PRODUCTS}).to_csv(path / "products.csv", index=False)
    pd.DataFrame(rows, columns=["user_id", "product_id", "event_type", "timestamp"]).to_csv(
        path / "events.csv", index=False
    )
    return path, truth, users[1::2]


def write_undated(path: Path, n: int = 1500, seed: int = 1) -> tuple[Path, dict[str, set[str]], list[str]]:
    rng = np.random.default_rng(seed)
    users = [f"u{i}" for i in range(n)]
    items = [f"i{j}" for j in range(60)]
    rows, truth = [], {}
    for u in users:
        taste = rng.integers(0, 2)
        pool = np.arange(30) + 30 * taste
        # Popular items of the other taste too, so popularity alone is a poor answer.
        picks = set(rng.choice(pool, 8, replace=False).tolist()) | set(rng.choice(60, 2, replace=False).tolist())
        picks_l = sorted(picks)
        hidden = set(rng.choice(picks_l, 2, replace=False).tolist())
        truth[u] = {items[j] for j in hidden}
        rows += [(u, items[j], "click", "2024-05-01") for j in picks_l if j not in hidden]
    path.mkdir(parents=True)
    pd.DataFrame({"user_id": users}).to_csv(path / "users.csv", index=False)
    pd.DataFrame({"product_id": items}).to_csv(path / "products.csv", index=False)
    pd.DataFrame(rows, columns=["user_id", "product_id", "event_type", "timestamp"]).to_csv(
        path / "events.csv", index=False
    )
    return path, truth, users


def _popularity(data: Path, truth: dict[str, set[str]], exclude_held: pd.DataFrame, k: int) -> float:
    ev = pd.read_csv(data / "events.csv", dtype=str)
    order = ev.groupby("product_id")["user_id"].nunique().sort_values(ascending=False).index.tolist()
    had = exclude_held.groupby("user_id")["product_id"].apply(set).to_dict()
    rows = []
    for u in truth:
        ranked = [p for p in order if p not in had.get(u, set())][:k]
        rows += [(u, r + 1, p) for r, p in enumerate(ranked)]
    return _map_at_k(pd.DataFrame(rows, columns=["user_id", "rank", "product_id"]), truth, k)


@pytest.mark.parametrize("shape", ["snapshots", "undated"])
def test_finrec_beats_popularity_on_shapes_the_synthetic_world_lacks(shape: str, tmp_path: Path) -> None:
    if shape == "snapshots":
        data, truth, ask = write_snapshots(tmp_path / "data")
        k, exclude = 3, "held"
    else:
        data, truth, ask = write_undated(tmp_path / "data")
        k, exclude = 10, "interacted"
    s = FinrecSettings()
    manifest = pipeline.train(data, tmp_path / "model", s, progress=False)
    v = manifest["metrics"]["validation"]
    assert v["plan"]["kind"] == ("temporal" if shape == "snapshots" else "holdout"), v["plan"]
    served = v["table"][manifest["metrics"]["serves"]]["ndcg@10"]
    assert served >= v["table"]["popularity"]["ndcg@10"], "the guard served something worse than popularity"
    users = tmp_path / "users.txt"
    users.write_text("\n".join(ask) + "\n")
    pipeline.recommend(tmp_path / "model", data, users, k, tmp_path / "recs.parquet", s, exclude=exclude,
                       progress=False)  # fmt: skip
    recs = pd.read_parquet(tmp_path / "recs.parquet")
    recs["user_id"] = recs["user_id"].astype(str)
    recs["product_id"] = recs["product_id"].astype(str)
    ev = pd.read_csv(data / "events.csv", dtype=str)
    finrec = _map_at_k(recs, truth, k)
    popularity = _popularity(data, truth, ev, k)
    assert finrec > popularity + 0.05, f"finrec MAP@{k} {finrec:.3f} vs popularity {popularity:.3f}"
    if shape == "snapshots":
        assert "transitions" in manifest["metrics"]["training"]["sources"]["fitted"]
