"""Training the two-stage model from a dataset: wiring only, the modelling lives in its stage.

Steps, each on the temporal split of :mod:`finrec.features.split`:

1. the two-tower retriever on the retrieval windows (features at each cutoff,
   positives in the following label window), early-stopped on recall in the
   ranker window (out of time);
2. approval odds on every decided application before the ranker cutoff;
3. the LightGBM ranker on the ranker window: the retriever's candidates for
   each sampled customer plus what they were shown, labelled with their
   highest funnel grade, with retrieval score and approval odds as features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from finrec.config import FinrecSettings
from finrec.data.dataset import ETYPE, Dataset
from finrec.features.builder import FeatureBuilder, Snapshot
from finrec.features.encoding import FeatureSpace
from finrec.features.split import TemporalSplit
from finrec.ranking.approval import ApprovalConfig, ApprovalModel
from finrec.ranking.ranker import Ranker, RankerConfig
from finrec.retrieval.two_tower import TwoTowerConfig, TwoTowerModel
from finrec.rules.eligibility import ProductRules, SuitabilityPolicy
from finrec.twostage.model import PAIR_COLUMNS_EXTRA, TwoStageModel

MIN_RETRIEVAL_PAIRS = 50
MIN_RANKER_QUERIES = 20


@dataclass
class TrainingReport:
    split: TemporalSplit
    metrics: dict[str, Any] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def rules_for(ds: Dataset, settings: FinrecSettings, users: pd.DataFrame | None = None) -> ProductRules:
    """The configured rules over the dataset's products, for its customers or the given ``users`` frame."""
    r = settings.rules
    cats = tuple(r.suitability_categories) if r.suitability_categories is not None else None
    policy = SuitabilityPolicy(cats, r.max_risk_above_tolerance)
    return ProductRules.from_frames(ds.users if users is None else users, ds.products, policy)


def held_mask(snap: Snapshot, users: np.ndarray, n_products: int) -> np.ndarray:
    """(len(users), n_products) bool: what each customer holds at the snapshot."""
    held = np.zeros((len(users), n_products), dtype=bool)
    pos = pd.Index(users).get_indexer(snap.held["user"].to_numpy())
    m = pos >= 0
    held[pos[m], snap.held["product"].to_numpy()[m]] = True
    return held


def allowed_mask(rules: ProductRules, snap: Snapshot, users: np.ndarray, n_products: int,
                 exclude: str = "held", interacted: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Products each customer may be recommended at the snapshot: rules passed and not excluded.

    ``exclude``: ``held`` (default) removes what the customer holds; ``interacted`` also removes
    the (user, product) pairs in ``interacted``; ``none`` removes nothing.
    """
    ok = rules.allowed(users, at=snap.cutoff)
    if exclude in ("held", "interacted"):
        ok &= ~held_mask(snap, users, n_products)
    if exclude == "interacted" and interacted is not None:
        pos = pd.Index(users).get_indexer(interacted[:, 0])
        m = pos >= 0
        ok[pos[m], interacted[m, 1]] = False
    return ok


def _positives(builder: FeatureBuilder, start: int, end: int, grades: dict[str, int], min_grade: int) -> pd.DataFrame:
    lab = builder.labels(start, end, grades)
    pos = lab[lab["grade"] >= min_grade]
    if len(pos) < MIN_RETRIEVAL_PAIRS:  # sparse data: take any positive grade
        pos = lab
    return pos


def train_two_stage(
    ds: Dataset, settings: FinrecSettings, progress: bool = True
) -> tuple[TwoStageModel, TrainingReport]:
    """Train every stage; stages without enough signal fall back and say so in the report."""
    t = settings.train
    grades = dict(settings.events.grades)
    split = TemporalSplit.plan(*ds.time_range, t.eval_days, t.label_days, t.max_retrieval_windows)
    report = TrainingReport(split)
    builder = FeatureBuilder(ds, settings.protected_attributes)
    rules = rules_for(ds, settings)
    clock = time.perf_counter()

    # 1. Retrieval.
    snaps = [builder.snapshot(c) for c in split.retrieval_cutoffs]
    rank_snap = builder.snapshot(split.rank_cutoff)
    space = FeatureSpace.fit(rank_snap)
    ux_parts, hist_parts, pair_parts, weight_parts = [], [], [], []
    offset = 0
    for snap in snaps:
        pos = _positives(builder, snap.cutoff, snap.cutoff + split.label_seconds, grades, t.retrieval_min_grade)
        users = np.unique(pos["user"].to_numpy())
        if not len(users):
            continue
        row = pd.Index(users).get_indexer(pos["user"].to_numpy()) + offset
        ux_parts.append(space.user_dense(snap)[users])
        hist_parts.append(builder.history(snap.cutoff, t.history_length)[users])
        pair_parts.append(np.column_stack([row, pos["product"].to_numpy()]))
        weight_parts.append(pos["grade"].to_numpy(np.float32))
        offset += len(users)
    val_pos = _positives(builder, split.rank_cutoff, split.eval_cutoff, grades, t.retrieval_min_grade)
    val_users = np.unique(val_pos["user"].to_numpy())
    rank_history = builder.history(split.rank_cutoff, t.history_length)
    retriever: TwoTowerModel | None = None
    n_pairs = sum(len(p) for p in pair_parts)
    if t.model == "two_stage" and n_pairs >= MIN_RETRIEVAL_PAIRS and len(val_users):
        ux = np.vstack([*ux_parts, space.user_dense(rank_snap)[val_users]])
        hist = np.vstack([*hist_parts, rank_history[val_users]])
        pairs = np.vstack(pair_parts).astype(np.int64)
        val_pairs = np.column_stack(
            [pd.Index(val_users).get_indexer(val_pos["user"].to_numpy()) + offset, val_pos["product"].to_numpy()]
        ).astype(np.int64)
        item_x = space.product_dense(snaps[-1])
        # Early stopping needs a recall that can still improve: N candidates of a catalogue not much
        # bigger than N is recall 1.0 from the first epoch. Cap N at a tenth of the catalogue.
        recall_k = max(1, min(t.n_candidates, ds.n_products // 10))
        cfg = TwoTowerConfig(embedding_dim=t.embedding_dim, max_epochs=t.max_epochs, seed=t.seed, recall_k=recall_k)
        retriever = TwoTowerModel(cfg).fit(
            ux, hist, item_x, np.arange(ds.n_products, dtype=np.int64), pairs, val_pairs,
            weights=np.concatenate(weight_parts), progress=progress,
        )  # fmt: skip
        report.metrics["retrieval"] = {
            "train_pairs": int(len(pairs)),
            "val_pairs": int(len(val_pairs)),
            "best_epoch": int(retriever.best_epoch_),
            f"val_recall@{cfg.recall_k}": float(max(h["val_recall"] for h in retriever.history_)),
        }
    elif t.model == "popularity":
        report.fallbacks.append("retrieval: [train] model = popularity; candidates come from popularity among "
                                "allowed products")  # fmt: skip
    else:
        report.fallbacks.append(
            f"retrieval: only {n_pairs} positive pairs in the retrieval windows (need {MIN_RETRIEVAL_PAIRS}); "
            "candidates come from popularity among allowed products"
        )
    report.seconds["retrieval"] = time.perf_counter() - clock

    # 2. Approval odds from decided applications before the ranker cutoff.
    clock = time.perf_counter()
    ev = ds.events.before(split.rank_cutoff)
    decided = (ev.etype == ETYPE["approve"]) | (ev.etype == ETYPE["decline"])
    pair_columns = [*_pair_columns(builder, rank_snap), *PAIR_COLUMNS_EXTRA]
    popularity = np.log1p(np.bincount(ev.product[ev.etype >= ETYPE["click"]], minlength=ds.n_products)).astype(float)
    model = TwoStageModel(space, ds.products["product_id"].astype(str).tolist(), retriever, None, None, pair_columns,
                          popularity, {"n_candidates": t.n_candidates, "demote_below": t.demote_below,
                                       "index": t.index, "history_length": t.history_length,
                                       "split": split.to_dict()})  # fmt: skip
    approval = None
    if decided.any():
        du, dp = ev.user[decided].astype(np.int64), ev.product[decided].astype(np.int64)
        y = (ev.etype[decided] == ETYPE["approve"]).astype(int)
        X, names = model.tabular(builder, rank_snap, du, dp, np.zeros(len(du)), np.zeros(len(du)))
        cols = model.approval_features(names)
        approval = ApprovalModel(ApprovalConfig(seed=t.seed)).fit(
            X[:, cols],
            y,
            [names[i] for i in cols],
            categorical=[n for n in ("product_category",) if n in names],
            time_order=ev.ts[decided],
        )
        report.metrics["approval"] = {"applications": int(len(y)), **approval.report_}
        if approval.fallback_reason_:
            report.fallbacks.append(f"approval odds: {approval.fallback_reason_}")
    else:
        report.fallbacks.append("approval odds: no approve/decline events; approval odds are not used")
    model.approval = approval
    report.seconds["approval"] = time.perf_counter() - clock

    # 3. Ranker on the ranker window.
    clock = time.perf_counter()
    labels = builder.labels(split.rank_cutoff, split.eval_cutoff, grades)
    labels = labels[labels["grade"] >= t.ranker_min_grade]
    shown = builder.shown(split.rank_cutoff, split.eval_cutoff)
    q_users = np.unique(np.concatenate([labels["user"].to_numpy(), shown["user"].to_numpy()]))
    rng = np.random.default_rng(t.seed)
    if len(q_users) > t.max_ranker_queries:
        q_users = np.sort(rng.choice(q_users, t.max_ranker_queries, replace=False))
    ranker = None
    if t.model == "two_stage" and len(q_users) >= MIN_RANKER_QUERIES:
        allowed = allowed_mask(rules, rank_snap, q_users, ds.n_products)
        if t.ranker_rows == "shown":
            X, y, qid, pos, names = _ranker_rows(
                model, builder, rank_snap, q_users, allowed, rank_history, labels, shown
            )
        else:
            lab = labels[labels["grade"] >= t.retrieval_min_grade]
            X, y, qid, pos, names = _retrieved_rows(
                model, builder, rank_snap, q_users, allowed, rank_history, lab, t.n_candidates, t.ranker_negatives, rng
            )
        keep = pd.Series(y).groupby(qid).transform("nunique").to_numpy() > 1  # queries with something to rank
        if pd.unique(qid[keep]).size >= MIN_RANKER_QUERIES:
            position = pos[keep] if t.position_debias and (pos[keep] > 0).any() else None
            ranker = Ranker(RankerConfig(seed=t.seed)).fit(
                X[keep], y[keep], qid[keep], names, space.tabular_names(pair_columns)[1], position=position
            )
            report.metrics["ranker"] = {
                "queries": int(ranker.n_queries_), "rows": int(keep.sum()),
                "validation_ndcg@10": ranker.validation_ndcg_, "trees": ranker.best_iteration_,
                "top_features": dict(list(ranker.feature_importance().items())[:10]),
            }  # fmt: skip
    if ranker is None and t.model == "popularity":
        report.fallbacks.append("ranker: [train] model = popularity; products are ordered by popularity")
    elif ranker is None:
        report.fallbacks.append(f"ranker: fewer than {MIN_RANKER_QUERIES} customers with graded events in the ranker "
                                "window; products are ordered by retrieval score")  # fmt: skip
    model.ranker = ranker
    report.seconds["ranker"] = time.perf_counter() - clock
    return model, report


def _pair_columns(builder: FeatureBuilder, snap: Snapshot) -> list[str]:
    probe = builder.pair_features(snap, np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
    return list(probe.columns)


def _ranker_rows(
    model: TwoStageModel, builder: FeatureBuilder, snap: Snapshot, users: np.ndarray, allowed: np.ndarray,
    history: np.ndarray, labels: pd.DataFrame, shown: pd.DataFrame,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:  # fmt: skip
    """Rows for the ranker: what each customer was shown (or engaged with) in the window, with grades.

    Only shown products have a label: the funnel grades start at "shown and ignored" (0). A product
    that was never shown is not a negative, it is unknown; training on it would teach the ranker to
    predict what the logging policy showed instead of what customers want. Each row's retrieval
    score and rank are exact, over all allowed products, as the retriever would rank them at the
    cutoff, so nothing in the features marks a row as "shown". Returns X, grades, query, position, names.
    """
    upos = pd.Index(users)
    rows = pd.concat([shown[["user", "product", "position"]], labels[["user", "product"]].assign(position=0)])
    rows = rows.groupby(["user", "product"], as_index=False)["position"].max()
    rows["q"] = upos.get_indexer(rows["user"].to_numpy())
    rows = rows[rows["q"] >= 0]
    rows = rows.merge(labels[["user", "product", "grade"]], on=["user", "product"], how="left")
    rows["grade"] = rows["grade"].fillna(0)
    rows = rows.sort_values(["q", "product"], kind="stable").reset_index(drop=True)
    q, items = rows["q"].to_numpy(), rows["product"].to_numpy(np.int64)
    score = np.empty(len(rows))
    rank = np.empty(len(rows))
    for start in range(0, len(users), 1000):
        block = np.arange(start, min(start + 1000, len(users)))
        s = model.full_scores(builder, snap, users[block], history)
        s = np.where(allowed[block], s, -np.inf)
        r = np.argsort(np.argsort(-s, axis=1, kind="stable"), axis=1) + 1
        m = (q >= block[0]) & (q <= block[-1])
        score[m] = s[q[m] - start, items[m]]
        rank[m] = r[q[m] - start, items[m]]
    score = np.where(np.isfinite(score), score, np.nan)  # shown but not allowed now (e.g. held since)
    X, names = model.tabular(builder, snap, users[q], items, score, rank.astype(np.float64))
    return X, rows["grade"].to_numpy(np.int32), q, rows["position"].to_numpy(np.int64), names


def _retrieved_rows(
    model: TwoStageModel, builder: FeatureBuilder, snap: Snapshot, users: np.ndarray, allowed: np.ndarray,
    history: np.ndarray, labels: pd.DataFrame, n_candidates: int, negatives: int, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:  # fmt: skip
    """The retriever's top candidates per customer with their grade in the window (unshown = 0).

    Only retrieved candidates are used, as at serving time (adding missed positives would make
    "not retrieved" a marker of "engaged"); unlabelled ones are sampled down to ``negatives``.
    """
    ret_s, ret_i = model.retrieve(builder, snap, users, allowed, n_candidates, history)
    n, c = ret_i.shape
    rows = pd.DataFrame({"q": np.repeat(np.arange(n), c), "product": ret_i.ravel(), "score": ret_s.ravel(),
                         "rank": np.tile(np.arange(1, c + 1), n).astype(float)})  # fmt: skip
    rows = rows[rows["product"] >= 0]
    grade = labels.assign(q=pd.Index(users).get_indexer(labels["user"].to_numpy()))
    rows = rows.merge(grade[["q", "product", "grade"]], on=["q", "product"], how="left")
    rows["grade"] = rows["grade"].fillna(0)
    unlabelled = rows["grade"] == 0
    draw = pd.Series(rng.random(len(rows)), index=rows.index).where(unlabelled)
    rows = rows[~unlabelled | (draw.groupby(rows["q"]).rank(method="first") <= negatives)]
    q, items = rows["q"].to_numpy(), rows["product"].to_numpy(np.int64)
    X, names = model.tabular(
        builder, snap, users[q], items, rows["score"].to_numpy(np.float64), rows["rank"].to_numpy()
    )
    return X, rows["grade"].to_numpy(np.int32), q, np.zeros(len(q), dtype=np.int64), names
