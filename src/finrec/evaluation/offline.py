"""``finrec evaluate``: the trained model against baselines and, on synthetic data, the oracle.

Evaluation customers are those with a relevant event (grade >= ``min_grade``,
a click by default) in the held-out window after ``eval_cutoff``; features use
only what happened before it. Every model ranks the same *allowed* products
(eligible, suitable, not already held), so the comparison is the one the
service would face:

* ``random``: a random order of allowed products;
* ``popularity``: most engaged-with products before the cutoff, ignoring rules;
* ``popularity_eligible``: the same, among allowed products;
* ``two_tower``: retrieval scores alone;
* ``two_stage``: retrieval, then the ranker (the model as served);
* ``oracle`` (synthetic data only): true conversion propensity from the ground truth.

Metrics per customer are averaged with percentile-bootstrap 95% intervals and
broken down by customer segment. Note that logged relevance only exists for
what the logging policy showed; on synthetic data ``true_conversion@k`` (the
expected conversions of the top k under the ground truth, position-weighted)
measures quality free of that exposure bias.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from finrec.config import FinrecSettings
from finrec.data.dataset import ETYPE, Dataset
from finrec.evaluation.bootstrap import paired_bootstrap_diff, summarise
from finrec.evaluation.metrics import Relevance, evaluate_rankings
from finrec.features.builder import FeatureBuilder
from finrec.features.split import TemporalSplit
from finrec.twostage.model import TwoStageModel
from finrec.twostage.train import allowed_mask, held_mask, rules_for

BLOCK = 2_000
MODELS = ("random", "popularity", "popularity_eligible", "two_tower", "two_stage", "oracle")


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best finite scores per row, best first; -1 pads."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-s, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    return np.where(np.isfinite(np.take_along_axis(s, order, axis=1)), top, -1)


def _segments(ds: Dataset, users: np.ndarray, had_history: np.ndarray) -> dict[str, np.ndarray]:
    seg: dict[str, np.ndarray] = {"history": np.where(had_history, "returning", "new")}
    if "age" in ds.users.columns:
        age = ds.users["age"].to_numpy(np.float64)[users]
        seg["age_band"] = np.asarray(pd.cut(age, [0, 30, 45, 60, 200], labels=["<30", "30-44", "45-59", "60+"],
                                            right=False).astype(str))  # fmt: skip
    if "income" in ds.users.columns:
        inc = ds.users["income"].to_numpy(np.float64)[users]
        q = np.nanquantile(inc, [1 / 3, 2 / 3]) if np.isfinite(inc).any() else [0, 0]
        seg["income_band"] = np.where(
            np.isnan(inc), "unknown", np.where(inc < q[0], "low", np.where(inc < q[1], "mid", "high"))
        )
    return seg


def evaluate_model(
    ds: Dataset,
    model: TwoStageModel,
    settings: FinrecSettings,
    ground_truth: Path | None = None,
    progress: bool = True,
    split: TemporalSplit | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the evaluation; returns (report dict, matplotlib figures by title).

    ``split`` fixes the held-out window (``eval_cutoff`` to ``end``); by default it is the model's own, the
    window after everything it was trained on. Models compared against each other (a champion and its
    challenger) must be evaluated on the same window.
    """
    e, t = settings.evaluate, settings.train
    t0 = time.perf_counter()
    if split is None:
        split = TemporalSplit(**model.config.split) if model.config.split is not None else TemporalSplit.plan(
            *ds.time_range, t.eval_days, t.label_days, t.max_retrieval_windows)  # fmt: skip
    builder = FeatureBuilder(ds, settings.protected_attributes)
    rules = rules_for(ds, settings)
    snap = builder.snapshot(split.eval_cutoff)
    history = builder.history(split.eval_cutoff, model.config.history_length)
    labels = builder.labels(split.eval_cutoff, split.end, dict(settings.events.grades))
    labels = labels[labels["grade"] >= e.min_grade]
    held = set(zip(snap.held["user"].to_numpy(), snap.held["product"].to_numpy(), strict=True))
    labels = labels[[(u, p) not in held for u, p in zip(labels["user"], labels["product"], strict=True)]]
    users = np.unique(labels["user"].to_numpy())
    rng = np.random.default_rng(t.seed)
    if len(users) > e.max_users:
        users = np.sort(rng.choice(users, e.max_users, replace=False))
    if not len(users):
        raise ValueError("no customer has a relevant event in the evaluation window: nothing to evaluate")
    qpos = pd.Index(users).get_indexer(labels["user"].to_numpy())
    keep = qpos >= 0
    rel = Relevance.from_pairs(
        len(users), qpos[keep], labels["product"].to_numpy()[keep], labels["grade"].to_numpy()[keep]
    )

    n_cand = model.config.n_candidates
    k = e.k
    ev_before = ds.events.before(split.eval_cutoff)
    engaged = ev_before.etype >= ETYPE["click"]
    pop = np.log1p(np.bincount(ev_before.product[engaged], minlength=ds.n_products)).astype(np.float64)
    pop += 1e-6 * np.log1p(np.bincount(ev_before.product, minlength=ds.n_products))  # tie-break by exposure
    had_history = np.isin(users, np.unique(ev_before.user))

    truth = _load_truth(ground_truth, ds, split, snap.held) if ground_truth is not None else None
    ranked: dict[str, list[np.ndarray]] = {m: [] for m in MODELS if m != "oracle" or truth is not None}
    retrieved: list[np.ndarray] = []
    true_gain: dict[str, list[np.ndarray]] = {m: [] for m in ranked}
    blocks = range(0, len(users), BLOCK)
    for start in tqdm(blocks, desc="evaluating", unit="block", disable=not progress):
        bu = users[start : start + BLOCK]
        allowed = allowed_mask(rules, snap, bu, ds.n_products)
        not_held = ~held_mask(snap, bu, ds.n_products)
        noise = rng.random((len(bu), ds.n_products))
        ranked["random"].append(_top_k(np.where(allowed, noise, -np.inf), k))
        ranked["popularity"].append(_top_k(np.where(not_held, pop[None, :], -np.inf), k))
        ranked["popularity_eligible"].append(_top_k(np.where(allowed, pop[None, :], -np.inf), k))
        rec = model.recommend(builder, snap, bu, allowed, k, history, n_candidates=n_cand, with_features=False)
        ranked["two_stage"].append(rec.items)
        ranked["two_tower"].append(rec.candidates[:, :k])
        retrieved.append(rec.candidates)
        if truth is not None:
            prop = truth["matrix"](bu)
            ranked["oracle"].append(_top_k(np.where(allowed, prop, -np.inf), k))
            for m in ranked:
                top = ranked[m][-1]
                w = np.arange(1, top.shape[1] + 1, dtype=np.float64) ** -truth["position_bias"]
                g = np.where(top >= 0, np.take_along_axis(prop, np.maximum(top, 0), axis=1), 0.0)
                true_gain[m].append((g * w).sum(axis=1))

    per_user: dict[str, dict[str, Any]] = {}
    for m, parts in ranked.items():
        r = np.vstack(parts)
        per_user[m] = evaluate_rankings(r, rel, ds.n_products, k=k, recall_ks=(k,), min_grade=e.min_grade)
        if truth is not None:
            per_user[m][f"true_conversion@{k}"] = np.concatenate(true_gain[m])
    rec_n = evaluate_rankings(np.vstack(retrieved), rel, ds.n_products, k=k, recall_ks=(n_cand,), min_grade=e.min_grade)
    per_user["two_tower"][f"recall@{n_cand}"] = rec_n[f"recall@{n_cand}"]
    per_user["two_stage"][f"recall@{n_cand}"] = rec_n[f"recall@{n_cand}"]

    models = {m: summarise(v, n_boot=e.bootstrap, seed=t.seed) for m, v in per_user.items()}
    nd = f"ndcg@{k}"
    comparisons = {}
    for a, b in (("two_stage", "two_tower"), ("two_tower", "popularity"), ("two_stage", "popularity_eligible"),
                 ("two_stage", "oracle")):  # fmt: skip
        if a in per_user and b in per_user:
            x, y = per_user[a][nd], per_user[b][nd]
            ok = ~(np.isnan(x) | np.isnan(y))
            diff, lo, hi, p = paired_bootstrap_diff(x[ok], y[ok], n_boot=e.bootstrap, seed=t.seed)
            comparisons[f"{a} - {b}"] = {"metric": nd, "mean_diff": diff, "low": lo, "high": hi, "p_value": p}
    segments: dict[str, dict[str, Any]] = {}
    for name, labels_ in _segments(ds, users, had_history).items():
        segments[name] = {}
        for value in sorted(set(labels_.tolist())):
            mask = labels_ == value
            segments[name][value] = {
                m: summarise({nd: per_user[m][nd][mask]}, n_boot=max(100, e.bootstrap // 5), seed=t.seed)
                for m in per_user
            }
    report: dict[str, Any] = {
        "title": "finrec offline evaluation",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": {
            "path": str(ds.path),
            "fingerprint": ds.fingerprint,
            "users": ds.n_users,
            "products": ds.n_products,
            "events": len(ds.events),
        },  # fmt: skip
        "model": {"n_candidates": n_cand, "stages": model.stages(), "k": k, "min_grade": e.min_grade},
        "split": {
            "eval_cutoff": _iso(split.eval_cutoff),
            "end": _iso(split.end),
            "evaluated_users": int(len(users)),
            "relevant_pairs": int(rel.n_pairs),
        },  # fmt: skip
        "models": models,
        "comparisons": comparisons,
        "segments": segments,
        "notes": _notes(models, k, truth is not None),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return report, _figures(model)


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _notes(models: dict[str, Any], k: int, has_truth: bool) -> list[str]:
    nd = f"ndcg@{k}"
    notes = []
    if "oracle" in models and "two_stage" in models:
        ratio = models["two_stage"][nd]["mean"] / max(models["oracle"][nd]["mean"], 1e-12)
        notes.append(f"two_stage reaches {ratio:.2f} of the oracle's {nd} (logged relevance).")
        tc = f"true_conversion@{k}"
        if tc in models["two_stage"]:
            r2 = models["two_stage"][tc]["mean"] / max(models["oracle"][tc]["mean"], 1e-12)
            notes.append(
                f"two_stage reaches {r2:.2f} of the oracle's expected conversions in the top {k} (ground truth)."
            )
    notes.append(
        "Logged relevance exists only for products the logging policy showed; a model that learns exposure "
        "can look better on logged metrics than the oracle, which knows true appeal but not exposure."
    )
    if not has_truth:
        notes.append("No ground truth: the oracle and true-conversion metrics need a synthetic dataset.")
    return notes


def _load_truth(path: Path, ds: Dataset, split: TemporalSplit, held: pd.DataFrame) -> dict[str, Any]:
    """The oracle's propensities at the evaluation cutoff; ``held`` is the snapshot's (user, product) holdings."""
    from finrec.data.synthetic.truth import GroundTruth

    gt = GroundTruth.load(path)
    uid = ds.users["user_id"].to_numpy()
    try:
        truth_users = gt.user_index(np.asarray([int(u) for u in uid]))
        truth_products = gt.product_index(np.asarray([int(p) for p in ds.products["product_id"]]))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"the ground truth at {path} does not describe this dataset: {exc}") from None
    start = pd.Timestamp(gt.info.start, tz="UTC")
    cut = pd.Timestamp(split.eval_cutoff, unit="s", tz="UTC")
    month = (cut.year - start.year) * 12 + cut.month - start.month
    day = int((cut - start).days)
    held_cat = np.zeros((ds.n_users, len(gt.info.categories)), dtype=np.int8)
    held_cat[held["user"].to_numpy(), gt.products["category"][truth_products[held["product"].to_numpy()]]] = 1

    def matrix(users: np.ndarray) -> np.ndarray:
        full = gt.propensity_matrix(gt.users["user_id"][truth_users[users]], held=held_cat[users], month=month, day=day)
        return full[:, truth_products]

    return {"matrix": matrix, "position_bias": gt.coef.position_bias}


def _figures(model: TwoStageModel) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    if model.approval is not None and model.approval.report_.get("raw"):
        from finrec.ranking.approval import reliability_figure

        rep = model.approval.report_
        figs["Approval odds: reliability (held-out applications)"] = reliability_figure(
            rep["raw"], rep.get("calibrated")
        )
    return figs
