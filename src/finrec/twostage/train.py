"""Training the two-stage model from a dataset: wiring only, the modelling lives in its stage.

Every dataset gets a validation plan that fits its shape, several candidate sources, a ranker
and a selection guard:

* **With impressions** (a logged funnel: our synthetic world, a bank's logged offers): the temporal
  split of :mod:`finrec.features.split`. The two-tower learns from the retrieval windows; the
  candidate sources are fitted at the ranker cutoff; the ranker learns from what customers were
  *shown* in the ranker window (a product never shown is unknown, not rejected).
* **Without impressions** (implicit positives, holdings snapshots): the plan of
  :mod:`finrec.features.plan` (temporal where customers come back after a cutoff, else a
  per-customer holdout). The ranker learns from each source's candidates with sampled
  unlabelled negatives, graded by what the customer did next.

Either way the validation customers are split in two: the ranker learns from the first part;
popularity, every source alone, the two-tower and the full stack are then scored on the second
part, and the bundle serves the best of them (never something worse than popularity on its own
validation). Finally the sources are refitted on all the data (and, without impressions, the
ranker on every validation customer with the number of trees chosen), so the served model has
seen the latest behaviour.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from finrec.candidates.base import CandidateSource
from finrec.candidates.interactions import Interactions
from finrec.candidates.item_item import MAX_EASE_PRODUCTS, EASESource, ItemKNNSource, gram
from finrec.candidates.popularity import PopularitySource, SegmentPopularitySource
from finrec.candidates.source_set import SourceSet, feature_names, ranks_among
from finrec.candidates.transitions import TransitionSource
from finrec.config import FinrecSettings
from finrec.data.dataset import ETYPE, Dataset
from finrec.evaluation.metrics import Relevance, evaluate_rankings
from finrec.features.builder import FeatureBuilder, Snapshot
from finrec.features.encoding import FeatureSpace
from finrec.features.plan import ValidationPlan
from finrec.features.split import TemporalSplit
from finrec.ranking.approval import ApprovalConfig, ApprovalModel
from finrec.ranking.ranker import Ranker, RankerConfig
from finrec.retrieval.two_tower import TwoTowerConfig, TwoTowerModel
from finrec.rules.eligibility import ProductRules, SuitabilityPolicy
from finrec.twostage.bundle import BundleConfig
from finrec.twostage.model import PAIR_COLUMNS_EXTRA, TwoStageModel, top_k

MIN_RETRIEVAL_PAIRS = 50
MIN_RANKER_QUERIES = 20
#: Share of the validation customers kept out of the ranker to choose what is served, and at most how many.
GUARD_SHARE = 0.25
MAX_GUARD_CUSTOMERS = 30_000
#: Customers used to choose a source's hyperparameters (EASE's penalty, the segment column).
MAX_TUNE_CUSTOMERS = 5_000
#: Customers whose recall early-stops the two-tower, at most (a seeded sample above: the recall of 100k customers
#: is as decisive as that of more, and their features would otherwise grow with the book).
MAX_RETRIEVAL_VALIDATION_CUSTOMERS = 100_000
BLOCK = 2_000
GUARD_K = 10


@dataclass
class TrainingReport:
    split: TemporalSplit
    metrics: dict[str, Any] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)  # the plan and the selection guard's table


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


def _new_model(ds: Dataset, settings: FinrecSettings, space: FeatureSpace, retriever: TwoTowerModel | None,
               pair_columns: list[str], popularity: np.ndarray, split: TemporalSplit) -> TwoStageModel:  # fmt: skip
    t = settings.train
    return TwoStageModel(space, ds.products["product_id"].astype(str).tolist(), retriever, None, None, pair_columns,
                         popularity, BundleConfig(n_candidates=t.n_candidates, demote_below=t.demote_below,
                                                  index=t.index, history_length=t.history_length,
                                                  split=split.to_dict(), grades=dict(settings.events.grades),
                                                  min_grade=t.retrieval_min_grade))  # fmt: skip


def train_two_stage(
    ds: Dataset, settings: FinrecSettings, progress: bool = True
) -> tuple[TwoStageModel, TrainingReport]:
    """Train every stage; stages without enough signal fall back and say so in the report."""
    t = settings.train
    n_imp = int((ds.events.etype == ETYPE["impression"]).sum())
    with_impressions = n_imp >= 1_000 and n_imp >= 0.05 * len(ds.events)
    if t.model == "popularity" or with_impressions:
        model, report = _train_with_impressions(ds, settings, progress)
    else:
        model, report = _train_without_impressions(ds, settings, progress)
    if model.ranker is None and model.retriever is None and model.sources is None:
        model.serve = "popularity"  # what answers then, and what the manifest and `finrec train` say
    model.release_snapshot()  # the training snapshot (a frame of every customer) is not the model's to keep
    return model, report


# -- shared steps --------------------------------------------------------------------------------------
def _two_tower_launcher(name: str) -> Any:
    """What starts a data-parallel two-tower's processes (``[train] two_tower_launcher``); None: the default."""
    if name == "spark":
        from finrec.engine.spark import require_pyspark
        from finrec.retrieval.data_parallel import launch_spark

        require_pyspark()
        return launch_spark
    return None


def _fit_two_tower(builder: FeatureBuilder, split: TemporalSplit, space: FeatureSpace, settings: FinrecSettings,
                   report: TrainingReport, progress: bool, exclude: np.ndarray | None = None,
                   epochs: int | None = None, known: Snapshot | None = None) -> TwoTowerModel | None:  # fmt: skip
    """The two-tower on the retrieval windows of ``split``, early-stopped on its ranker window.

    ``exclude``: customers kept out of the early stopping (the selection guard's: a model whose epochs were
    chosen on them would look better to the guard than it is). ``epochs``: a refit for that many epochs,
    without a validation window (the refit's windows end where the held-out one begins). ``known``: a snapshot
    the caller holds, used where a window's cutoff is its own instead of building it again.

    Memory follows the sample: the positive pairs of every window are read first (a few bytes each) and sampled
    down to ``max_retrieval_pairs``; then each window's snapshot is built in turn, only the sampled customers'
    features are kept from it, and it is dropped before the next one.
    """
    t, ds = settings.train, builder.ds
    grades = dict(settings.events.grades)

    def snapshot(cutoff: int) -> Snapshot:
        return known if known is not None and known.cutoff == cutoff else builder.snapshot(cutoff)

    windows: list[tuple[int, np.ndarray, int]] = []  # cutoff, its customers, their first training row
    pair_parts, weight_parts = [], []
    offset = 0
    for cutoff in split.retrieval_cutoffs:
        pos = _positives(builder, cutoff, cutoff + split.label_seconds, grades, t.retrieval_min_grade)
        users = np.unique(pos["user"].to_numpy())
        if not len(users):
            continue
        row = pd.Index(users).get_indexer(pos["user"].to_numpy()) + offset
        windows.append((cutoff, users, offset))
        pair_parts.append(np.column_stack([row, pos["product"].to_numpy()]))
        weight_parts.append(pos["grade"].to_numpy(np.float32))
        offset += len(users)
    if epochs is None:
        val_pos = _positives(builder, split.rank_cutoff, split.eval_cutoff, grades, t.retrieval_min_grade)
    else:  # a refit: no validation window (nothing is read from the one that follows its last window)
        val_pos = pd.DataFrame({"user": np.empty(0, np.int64), "product": np.empty(0, np.int64)})
    if exclude is not None and len(exclude):
        val_pos = val_pos[~np.isin(val_pos["user"].to_numpy(), exclude)]
    val_users = np.unique(val_pos["user"].to_numpy())
    if len(val_users) > MAX_RETRIEVAL_VALIDATION_CUSTOMERS:  # early stopping on a seeded sample of them
        val_users = np.sort(np.random.default_rng(t.seed + 4).choice(val_users, MAX_RETRIEVAL_VALIDATION_CUSTOMERS,
                                                                     replace=False))  # fmt: skip
        val_pos = val_pos[np.isin(val_pos["user"].to_numpy(), val_users)]
        report.metrics.setdefault("retrieval", {})["sampled_validation_customers"] = MAX_RETRIEVAL_VALIDATION_CUSTOMERS
    n_pairs = sum(len(p) for p in pair_parts)
    if n_pairs < MIN_RETRIEVAL_PAIRS or (epochs is None and not len(val_users)):
        report.fallbacks.append(f"retrieval: two-tower not used: only {n_pairs} positive pairs in the retrieval "
                                f"windows (need {MIN_RETRIEVAL_PAIRS}) or none in its validation window; candidates "
                                "come from the other sources")  # fmt: skip
        return None
    pairs = np.vstack(pair_parts).astype(np.int64)
    weights = np.concatenate(weight_parts)
    if len(pairs) > t.max_retrieval_pairs:  # a seeded sample bounds an epoch's time on large event logs
        keep = np.sort(np.random.default_rng(t.seed).choice(len(pairs), t.max_retrieval_pairs, replace=False))
        pairs, weights = pairs[keep], weights[keep]
        report.metrics.setdefault("retrieval", {})["sampled_pairs"] = int(t.max_retrieval_pairs)
    # Features of the customer-windows the sample kept, in their order (rows renumbered, so the model learns
    # exactly what it would from every customer-window's features).
    used = np.unique(pairs[:, 0])
    pairs[:, 0] = np.searchsorted(used, pairs[:, 0])
    ux_parts, hist_parts = [], []
    item_x: np.ndarray | None = None
    last = split.retrieval_cutoffs[-1] if len(split.retrieval_cutoffs) else None
    for cutoff, users, first in windows:
        rows = users[used[(used >= first) & (used < first + len(users))] - first]
        if not len(rows) and cutoff != last:
            continue
        snap = snapshot(cutoff)
        ux_parts.append(space.user_dense(snap.users.iloc[rows]))
        hist_parts.append(builder.history(cutoff, t.history_length)[rows])
        if cutoff == last:
            item_x = space.product_dense(snap)
        del snap
    if item_x is None and last is not None:  # no positives in the last window: products still read at its cutoff
        item_x = space.product_dense(snapshot(last))
    if len(val_users) or item_x is None:
        rank_snap = snapshot(split.rank_cutoff)
        ux_parts.append(space.user_dense(rank_snap.users.iloc[val_users]))
        hist_parts.append(builder.history(split.rank_cutoff, t.history_length)[val_users])
        item_x = space.product_dense(rank_snap) if item_x is None else item_x
        del rank_snap
    ux, hist = np.vstack(ux_parts), np.vstack(hist_parts)
    del ux_parts, hist_parts
    val_pairs = np.column_stack(
        [pd.Index(val_users).get_indexer(val_pos["user"].to_numpy()) + len(used), val_pos["product"].to_numpy()]
    ).astype(np.int64)
    # Early stopping needs a recall that can still improve: N candidates of a catalogue not much
    # bigger than N is recall 1.0 from the first epoch. Cap N at a tenth of the catalogue.
    recall_k = max(1, min(t.n_candidates, ds.n_products // 10))
    cfg = TwoTowerConfig(embedding_dim=t.embedding_dim, max_epochs=epochs or t.max_epochs, seed=t.seed,
                         recall_k=recall_k, workers=t.two_tower_workers)  # fmt: skip
    retriever = TwoTowerModel(cfg).fit(
        ux, hist, item_x, np.arange(ds.n_products, dtype=np.int64), pairs, val_pairs,
        weights=weights, progress=progress, launcher=_two_tower_launcher(t.two_tower_launcher),
    )  # fmt: skip
    if epochs is not None:
        report.metrics.setdefault("retrieval", {})["refit"] = {"train_pairs": int(len(pairs)), "epochs": epochs,
                                                               "windows_up_to": int(split.retrieval_cutoffs[-1])}
        return retriever
    report.metrics["retrieval"] = {**report.metrics.get("retrieval", {}),
        "train_pairs": int(len(pairs)),
        "val_pairs": int(len(val_pairs)),
        "best_epoch": int(retriever.best_epoch_),
        "workers": cfg.workers,
        f"val_recall@{cfg.recall_k}": float(max(h["val_recall"] for h in retriever.history_)),
    }
    return retriever


def _fit_approval(model: TwoStageModel, builder: FeatureBuilder, snap: Snapshot, settings: FinrecSettings,
                  report: TrainingReport) -> None:  # fmt: skip
    """Approval odds from every decided application before the snapshot's cutoff."""
    ev = builder.ds.events.before(snap.cutoff)
    decided = (ev.etype == ETYPE["approve"]) | (ev.etype == ETYPE["decline"])
    if not decided.any() or not (ev.etype[decided] == ETYPE["decline"]).any():
        report.fallbacks.append("approval odds: no approve and decline events; approval odds are not used")
        return
    which = np.flatnonzero(decided)
    limit = settings.train.max_approval_applications
    if len(which) > limit:  # a seeded sample, in time order, bounds the table on large books
        which = np.sort(np.random.default_rng(settings.train.seed).choice(which, limit, replace=False))
        report.metrics.setdefault("approval", {})["sampled_applications"] = int(limit)
    du, dp = ev.user[which].astype(np.int64), ev.product[which].astype(np.int64)
    y = (ev.etype[which] == ETYPE["approve"]).astype(int)
    X, names = model.tabular(builder, snap, du, dp, np.zeros(len(du)), np.zeros(len(du)),
                             _zero_sources(model, len(du)))  # fmt: skip
    cols = model.approval_features(names)
    approval = ApprovalModel(ApprovalConfig(seed=settings.train.seed)).fit(
        X[:, cols], y, [names[i] for i in cols], categorical=[n for n in ("product_category",) if n in names],
        time_order=ev.ts[which],
    )  # fmt: skip
    report.metrics["approval"] = {**report.metrics.get("approval", {}), "applications": int(len(y)),
                                  **approval.report_}  # fmt: skip
    if approval.fallback_reason_:
        report.fallbacks.append(f"approval odds: {approval.fallback_reason_}")
    model.approval = approval


def _zero_sources(model: TwoStageModel, n: int) -> dict[str, np.ndarray]:
    """Source columns for rows that are not ranked (the approval model never reads them)."""
    return {c: np.full(n, np.nan) for c in model.pair_columns if c.startswith("src_")}


def _source_plan(ds: Dataset, settings: FinrecSettings) -> list[str]:
    """Which sources to try, from ``[train] sources``; item-item CF is EASE up to MAX_EASE_PRODUCTS."""
    out = []
    for name in settings.train.sources:
        if name == "item_cf":
            out.append("ease" if ds.n_products <= min(MAX_EASE_PRODUCTS, settings.train.max_ease_products)
                       else "item_knn")  # fmt: skip
        else:
            out.append(name)
    return out


#: Customers, their answer, their allowed products, and the positives at the cutoff the answer follows (sources
#: are fitted on those to choose their hyperparameters; the chosen ones are then fitted where they serve).
Tune = tuple[np.ndarray, Relevance, np.ndarray, Interactions]


def _tune_ndcg(tune: Tune, n_products: int, scores: np.ndarray) -> float:
    """NDCG@10 of ``scores`` (rows of the tuning customers) on their answer."""
    v = _tune_per_user(tune, n_products, scores)
    return float(np.nanmean(v)) if np.isfinite(v).any() else 0.0


def _tune_per_user(tune: Tune, n_products: int, scores: np.ndarray) -> np.ndarray:
    """Per-customer NDCG@10 of ``scores`` on the tuning customers' answer."""
    _, rel, allowed, _ = tune
    top = top_k(np.where(allowed, scores, -np.inf), GUARD_K)
    return np.asarray(evaluate_rankings(top, rel, n_products, k=GUARD_K, recall_ks=(GUARD_K,))[f"ndcg@{GUARD_K}"])


def _fit_segment(ds: Dataset, inter: Interactions, settings: FinrecSettings, tune: Tune | None,
                 info: dict[str, Any]) -> tuple[SegmentPopularitySource, str, list[str]]:  # fmt: skip
    """Segment popularity on the categorical customer column that validates best."""
    cols = SourceSet.segment_candidates(ds.users, set(settings.protected_attributes))
    if not cols:
        raise ValueError("no categorical customer column with 2 to 64 values")
    best: tuple[float, str, list[str], SegmentPopularitySource] | None = None
    for c in cols:
        vocab = sorted(ds.users[c].dropna().astype(str).unique().tolist())
        codes = SourceSet([], c, vocab).segment_codes(ds.users)
        assert codes is not None
        value = 0.0
        if tune is not None:
            users, tuned = tune[0], SegmentPopularitySource(c).fit(tune[3], codes)
            value = _tune_ndcg(tune, ds.n_products, tuned.score(tune[3].matrix[users], codes[users]))
        if best is None or value > best[0]:
            best = (value, c, vocab, SegmentPopularitySource(c).fit(inter, codes))
    assert best is not None
    info["segment"] = {"column": best[1], "tried": cols}
    return best[3], best[1], best[2]


def _fit_ease(ds: Dataset, inter: Interactions, tune: Tune | None, info: dict[str, Any]) -> EASESource:
    """EASE with the penalty (relative to the mean product count) that validates best."""
    g_tune = gram(tune[3].matrix) if tune is not None else None
    # A finer grid where an inverse is cheap.
    if ds.n_products <= 3_000:
        grid = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4]
    elif ds.n_products <= 8_000:
        grid = [0.1, 0.4, 1.6]
    else:
        grid = [0.5]
    per_user: dict[float, np.ndarray] = {}
    tuning = tune is not None and len(grid) > 1

    def consider(c: float) -> None:  # one penalty's per-customer NDCG (the fit is dropped: n x n floats each)
        if tune is not None and tuning:
            per_user[c] = _tune_per_user(tune, ds.n_products, EASESource(l2=c).fit(tune[3], g=g_tune).score(
                tune[3].matrix[tune[0]]))  # fmt: skip
        else:
            per_user[c] = np.zeros(1)

    for c in grid if tuning else grid[:1]:
        consider(c)
    # The penalty that validates best; at the grid's edge the walk goes on while it improves. (Breiman's
    # one-standard-error rule, the strongest penalty within one SE of the best, was measured too: it
    # over-regularised on InstEval and CoIL 2000, -0.010 and -0.004, docs/model.md.)
    def mean(c: float) -> float:
        return float(np.nanmean(per_user[c])) if np.isfinite(per_user[c]).any() else 0.0

    def choice() -> float:
        return max(sorted(per_user), key=mean)

    for _ in range(4 if tuning else 0):
        chosen, top, bottom = choice(), max(per_user), min(per_user)
        if chosen not in (top, bottom):
            break
        before = mean(chosen)
        consider(top * 2 if chosen == top else bottom / 2)
        if mean(choice()) <= before:
            break
    chosen = choice() if tuning else grid[0]
    # The absolute penalty the chosen l2 amounts to on the tuning data (see EASESource): kept by every refit.
    penalty = chosen * (float(np.mean(np.diag(g_tune))) or 1.0) if g_tune is not None and tuning else None
    src = EASESource(l2=chosen, penalty=penalty).fit(inter)
    info["ease"] = {"l2_over_mean_count": chosen, "penalty": src.penalty_,
                    "tried": {str(c): round(float(np.nanmean(v)), 5) for c, v in sorted(per_user.items())}}  # fmt: skip
    return src


def _fit_sources(ds: Dataset, inter: Interactions, settings: FinrecSettings, report: TrainingReport,
                 tune: Tune | None) -> SourceSet:  # fmt: skip
    """Fit every configured source on ``inter``; ``tune`` = (users, answer, allowed) chooses hyperparameters."""
    fitted: list[CandidateSource] = []
    info: dict[str, Any] = {}
    seg_column: str | None = None
    seg_vocab: list[str] | None = None
    for name in _source_plan(ds, settings):
        try:
            src: CandidateSource
            if name == "popularity":
                src = PopularitySource("all").fit(inter)
            elif name == "recent":
                src = PopularitySource("recent").fit(inter)
                if inter.recent.nnz in (0, inter.matrix.nnz):
                    raise ValueError("every positive is recent (or none is): the same as all-time popularity")
            elif name == "additions":
                pop = PopularitySource("additions").fit(inter)
                if pop.n_events_ < 20:
                    raise ValueError(f"only {pop.n_events_} dated additions")
                src = pop
            elif name == "segment":
                src, seg_column, seg_vocab = _fit_segment(ds, inter, settings, tune, info)
            elif name == "ease":
                src = _fit_ease(ds, inter, tune, info)
            elif name == "item_knn":
                src = ItemKNNSource().fit(inter)
            elif name == "transitions":
                src = TransitionSource(seed=settings.train.seed).fit(inter)
            else:
                raise ValueError(f"unknown source {name!r}")
        except ValueError as exc:
            report.metrics.setdefault("sources_skipped", {})[name] = str(exc)
            continue
        fitted.append(src)
    report.metrics["sources"] = {"fitted": [s.name for s in fitted], **info}
    return SourceSet(fitted, seg_column, seg_vocab)


def _answer(users: np.ndarray, targets: pd.DataFrame) -> Relevance:
    q = pd.Index(users).get_indexer(targets["user"].to_numpy())
    m = q >= 0
    return Relevance.from_pairs(len(users), q[m], targets["product"].to_numpy()[m], targets["grade"].to_numpy()[m])


def _split_customers(users: np.ndarray, max_ranker: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation customers -> (ranker customers, guard customers), seeded."""
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(users)
    n_guard = min(MAX_GUARD_CUSTOMERS, max(1, int(len(users) * GUARD_SHARE)))
    guard, rank = np.sort(perm[:n_guard]), np.sort(perm[n_guard : n_guard + max_ranker])
    return rank, guard


def _allowed_new(rules: ProductRules, model: TwoStageModel, builder: FeatureBuilder, snap: Snapshot,
                 users: np.ndarray, positives: Interactions | None = None) -> np.ndarray:  # fmt: skip
    """Allowed products that are new to the customer: rules passed, not held, no positive before the cutoff.

    ``positives``: the positives at the snapshot's cutoff when the caller has them (default: the model's).
    """
    ok = allowed_mask(rules, snap, users, builder.ds.n_products)
    had = (positives or model.positives(builder, snap)).matrix[users]
    ok[had.nonzero()] = False
    return ok


def _use_sources(model: TwoStageModel, sources: SourceSet, base_columns: list[str], snap: Snapshot) -> None:
    """Make fitted ``sources`` the model's (at ``snap``), their scores and ranks ranker columns; none: nothing."""
    if sources.sources:
        model.sources = sources
        model.pair_columns = [*base_columns, *feature_names(sources.names)]
        model.set_sources(snap, sources)


def _guard(model: TwoStageModel, builder: FeatureBuilder, snap: Snapshot, users: np.ndarray, allowed: np.ndarray,
           targets: pd.DataFrame, report: TrainingReport, progress: bool, forced: str = "auto") -> str:  # fmt: skip
    """Score popularity, each source, the two-tower and the stack on held-out customers; the best serves.

    ``forced = "stack"`` (``[train] serve``) serves the stack whatever the table says (the table still says it).
    """
    history = builder.history(snap.cutoff, model.config.history_length)
    methods = ["popularity"] if model.sources is None else [*model.sources_at(builder, snap).names]  # type: ignore[union-attr]
    if "popularity" not in methods:
        methods.insert(0, "popularity")
    if model.retriever is not None:
        methods.append("two_tower")
    if model.ranker is not None:
        methods.append("stack")
    rel = _answer(users, targets)
    ranked: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for start in tqdm(range(0, len(users), BLOCK), desc="validating", unit="block", disable=not progress):
        bu, ba = users[start : start + BLOCK], allowed[start : start + BLOCK]
        for m in methods:
            ranked[m].append(model.recommend(builder, snap, bu, ba, GUARD_K, history, serve=m,
                                             with_features=False).items)  # fmt: skip
    table: dict[str, dict[str, float]] = {}
    key = f"ndcg@{GUARD_K}"
    per_user: dict[str, np.ndarray] = {}
    for m in methods:
        r = evaluate_rankings(np.vstack(ranked[m]), rel, builder.ds.n_products, k=GUARD_K, recall_ks=(GUARD_K,))
        table[m] = {name: float(np.nanmean(v)) for name, v in r.items()
                    if isinstance(v, np.ndarray) and np.isfinite(v).any()}  # fmt: skip
        per_user[m] = np.asarray(r[key], dtype=np.float64)
    best = choose_one_se(methods, per_user, [_complexity(model, m) for m in methods], table)
    report.validation["table"] = table
    report.validation["customers"] = int(len(users))
    report.validation["metric"] = key
    report.validation["rule"] = ("the simplest method whose NDCG@10 is within one standard error (paired, over "
                                 "customers) of the best; the two-tower and the stack are one tier")  # fmt: skip
    report.validation["popularity"] = table["popularity"].get(key, 0.0)
    if forced == "stack" and "stack" in methods and best != "stack":
        report.validation["chosen"] = best
        report.validation["rule"] += "; [train] serve = stack overrides it"
        best = "stack"
    report.validation["serves"] = best
    return best


def _complexity(model: TwoStageModel, method: str) -> int:
    """Order of simplicity for the one-standard-error rule: fewer learned parameters first.

    The two-tower and the stack share a tier: both learn from the same windows and are judged on the same
    customers, and the stack reads the two-tower's score and rank (it is the two-tower plus what the ranker adds).
    Between them the better mean serves. Measured: with them in two tiers, the two-tower served whenever the
    stack's lead was within one SE (10,000 guard customers at 200k, 1,565 at 20k), and both times the stack was
    better on the later held-out window, in NDCG and in expected conversions (docs/benchmarks.md).
    """
    if method in ("stack", "two_tower"):
        return 5
    if method == "popularity" or model.sources is None:
        return 0
    kind = model.sources.get(method).kind
    return {"popularity": 1, "segment_popularity": 2, "transitions": 3, "item_knn": 4, "ease": 4}.get(kind, 9)


def choose_one_se(methods: list[str], per_user: dict[str, np.ndarray], complexity: list[int],
                  table: dict[str, dict[str, float]] | None = None) -> str:  # fmt: skip
    """The simplest method whose mean is within one standard error of the best's (Breiman's one-SE rule).

    Methods of the same ``complexity`` are one tier: within the simplest admissible tier the better mean wins.

    The standard error is that of the paired per-customer difference with the best method, so a more
    complex model serves only when it is better by more than validation noise. ``table`` (by method)
    gets each method's ``se_vs_best``.

    >>> rng = np.random.default_rng(0)
    >>> base = rng.random(400)
    >>> noise = rng.normal(0, 0.1, 400)  # per-customer differences: a mean gain of 0.001 is noise
    >>> choose_one_se(["simple", "complex"], {"simple": base, "complex": base + 0.001 + noise}, [0, 1])
    'simple'
    >>> choose_one_se(["simple", "complex"], {"simple": base, "complex": base + 0.05 + noise}, [0, 1])
    'complex'
    """
    means = {m: float(np.nanmean(per_user[m])) if np.isfinite(per_user[m]).any() else 0.0 for m in methods}
    best = max(methods, key=lambda m: (means[m], -complexity[methods.index(m)]))
    ok = []
    for m, c in zip(methods, complexity, strict=True):
        d = per_user[best] - per_user[m]
        d = d[np.isfinite(d)]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        if table is not None:
            table.setdefault(m, {})["se_vs_best"] = se
        if means[m] >= means[best] - se:
            ok.append((c, -means[m], methods.index(m), m))
    return min(ok)[3]  # the simplest tier within one SE; in it, the better mean


def validation_lines(v: dict[str, Any]) -> list[str]:
    """The selection guard's table as text lines (what ``finrec train`` prints), best first."""
    if not v.get("table"):
        return []
    key = v["metric"]
    lines = [f"validation ({v.get('plan', {}).get('kind', 'temporal')}, {v['customers']} customers): {key}"]
    for m, row in sorted(v["table"].items(), key=lambda kv: -kv[1].get(key, 0.0)):
        mark = "  <- serves" if m == v["serves"] else ""
        lines.append(f"  {m:<28} {row.get(key, float('nan')):.4f}   map@{GUARD_K} {row.get(f'map@{GUARD_K}', 0):.4f}"
                     f"   recall@{GUARD_K} {row.get(f'recall@{GUARD_K}', 0):.4f}{mark}")  # fmt: skip
    return lines


def _refit_sources(model: TwoStageModel, ds: Dataset) -> None:
    """Sources refitted on every event: what batch scoring and the API use."""
    if model.sources is None:
        return
    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_products, model.config.grades,
                                     model.config.min_grade)  # fmt: skip
    model.sources = model.sources.refit(inter, model.sources.segment_codes(ds.users))
    model.config = model.config.with_sources_fit(inter.cutoff, len(ds.events))


# -- with impressions --------------------------------------------------------------------------------
def _train_with_impressions(ds: Dataset, settings: FinrecSettings,
                            progress: bool) -> tuple[TwoStageModel, TrainingReport]:  # fmt: skip
    t = settings.train
    grades = dict(settings.events.grades)
    split = TemporalSplit.plan(*ds.time_range, t.eval_days, t.label_days, t.max_retrieval_windows)
    report = TrainingReport(split)
    report.validation["plan"] = {"kind": "temporal", "reason": "logged impressions: the ranker learns from what "
                                 "was shown in the window before the held-out one"}  # fmt: skip
    builder = FeatureBuilder(ds, settings.protected_attributes)
    rules = rules_for(ds, settings)
    clock = time.perf_counter()
    rank_snap = builder.snapshot(split.rank_cutoff)
    space = FeatureSpace.fit(rank_snap)
    # Validation customers: positives in the ranker window of products they do not hold (what `finrec evaluate`
    # counts on its window: with a logged funnel, coming back to an offer is engagement too); a part of them,
    # kept out of the ranker and out of the two-tower's early stopping, chooses what serves.
    labels = builder.labels(split.rank_cutoff, split.eval_cutoff, grades)
    new = labels[labels["grade"] >= t.retrieval_min_grade]
    held_keys = rank_snap.held["user"].to_numpy(np.int64) * ds.n_products + rank_snap.held["product"].to_numpy()
    new = new[~np.isin(new["user"].to_numpy(np.int64) * ds.n_products + new["product"].to_numpy(), held_keys)]
    shown_users = builder.shown(split.rank_cutoff, split.eval_cutoff)["user"].to_numpy()
    q_all = np.unique(np.concatenate([labels["user"].to_numpy(), shown_users]))
    guard_users = np.empty(0, np.int64)
    if t.model == "two_stage" and len(np.unique(new["user"])) >= 2 * MIN_RANKER_QUERIES:
        _, guard_users = _split_customers(np.unique(new["user"].to_numpy()), 0, t.seed)
    retriever = None
    if t.model == "two_stage":
        retriever = _fit_two_tower(builder, split, space, settings, report, progress, exclude=guard_users,
                                   known=rank_snap)
    else:
        report.fallbacks.append("retrieval: [train] model = popularity; candidates come from popularity among "
                                "allowed products")  # fmt: skip
    report.seconds["retrieval"] = time.perf_counter() - clock

    clock = time.perf_counter()
    ev = ds.events.before(split.rank_cutoff)
    popularity = np.log1p(np.bincount(ev.product[ev.etype >= ETYPE["click"]], minlength=ds.n_products)).astype(float)
    base_columns = [*_pair_columns(builder, rank_snap), *PAIR_COLUMNS_EXTRA]
    model = _new_model(ds, settings, space, retriever, base_columns, popularity, split)
    if t.model == "two_stage":
        inter = model.positives(builder, rank_snap)
        tune_users = np.setdiff1d(np.unique(new["user"].to_numpy()), guard_users)[:MAX_TUNE_CUSTOMERS]
        tune = None
        if len(tune_users):
            tune = (tune_users, _answer(tune_users, new), allowed_mask(rules, rank_snap, tune_users, ds.n_products),
                    inter)
        sources = _fit_sources(ds, inter, settings, report, tune)
        _use_sources(model, sources, base_columns, rank_snap)
    report.seconds["sources"] = time.perf_counter() - clock

    clock = time.perf_counter()
    _fit_approval(model, builder, rank_snap, settings, report)
    report.seconds["approval"] = time.perf_counter() - clock

    # Ranker on the ranker window: what each (non-guard) customer was shown.
    clock = time.perf_counter()
    labels = labels[labels["grade"] >= t.ranker_min_grade]
    shown = builder.shown(split.rank_cutoff, split.eval_cutoff)
    q_users = np.setdiff1d(q_all, guard_users)
    rng = np.random.default_rng(t.seed)
    if len(q_users) > t.max_ranker_queries:
        q_users = np.sort(rng.choice(q_users, t.max_ranker_queries, replace=False))
    ranker = None
    categorical = space.tabular_names(model.pair_columns)[1]
    rows: Rows | None = None

    def window_rows(snap: Snapshot, users: np.ndarray, lab: pd.DataFrame, seen: pd.DataFrame,
                    so_far: Rows | None = None) -> Rows:  # fmt: skip
        """The ranker's rows of ``users`` at ``snap``: what they were shown (or the candidates), graded by ``lab``.

        Whole customers are kept to ``max_ranker_rows`` with the rows ``so_far`` (a seeded sample when they
        would not fit): memory follows the budget, whatever the number of customers.
        """
        per_user = _rows_per_customer(users, lab, seen if t.ranker_rows == "shown" else None, t.ranker_negatives)
        budget = t.max_ranker_rows - (len(so_far[1]) if so_far is not None else 0)
        kept = _whole_customers_within(users, per_user, budget, t.seed + 3)
        if len(kept) < len(users):
            report.metrics.setdefault("ranker_budget", {})[str(int(snap.cutoff))] = {
                "customers": int(len(users)), "kept": int(len(kept)), "max_rows": int(t.max_ranker_rows)}
        if not len(kept):
            names = space.tabular_names(model.pair_columns)[0]
            return (np.zeros((0, len(names)), np.float32), np.zeros(0, np.int32), np.zeros(0, np.int64),
                    np.zeros(0, np.int64), names)  # fmt: skip
        users = kept
        allowed = allowed_mask(rules, snap, users, ds.n_products)
        history = builder.history(snap.cutoff, t.history_length)
        if t.ranker_rows == "shown":
            return _ranker_rows(model, builder, snap, users, allowed, history, lab, seen)
        lab = lab[lab["grade"] >= t.retrieval_min_grade]
        return _candidate_rows(model, builder, snap, users, allowed, history, lab, t.n_candidates,
                               t.ranker_negatives, rng)  # fmt: skip

    if t.model == "two_stage" and len(q_users) >= MIN_RANKER_QUERIES:
        rows = window_rows(rank_snap, q_users, labels, shown)
        # Earlier windows too (``ranker_windows``), each with features at its own cutoff and the same customers'
        # budget: on a small book the latest window alone leaves the ranker a few thousand customers. Their
        # retrieval scores are in-sample (the two-tower learnt from those windows), which only makes the ranker
        # lean less on them than it could; the guard below judges the result on the latest window.
        for w in range(1, t.ranker_windows):
            c0 = split.rank_cutoff - w * split.label_seconds
            if c0 - split.start < split.label_seconds:  # the features need history before the cutoff
                break
            w_labels = builder.labels(c0, c0 + split.label_seconds, grades)
            w_labels = w_labels[w_labels["grade"] >= t.ranker_min_grade]
            w_shown = builder.shown(c0, c0 + split.label_seconds)
            w_users = np.setdiff1d(np.unique(np.concatenate([w_labels["user"].to_numpy(), w_shown["user"].to_numpy()])),
                                   guard_users)  # fmt: skip
            # The customers' budget covers every window, and so does the rows'.
            budget = t.max_ranker_queries - (int(rows[2].max()) + 1 if len(rows[2]) else 0)
            if len(w_users) > budget:
                w_users = np.sort(rng.choice(w_users, max(budget, 0), replace=False))
            if len(rows[1]) >= t.max_ranker_rows:
                break
            if len(w_users) < MIN_RANKER_QUERIES:
                break
            rows = _stack_rows(rows, window_rows(builder.snapshot(c0), w_users, w_labels, w_shown, rows))
            report.validation["plan"].setdefault("earlier_ranker_cutoffs", []).append(int(c0))
        X, y, qid, pos, names = rows
        keep = pd.Series(y).groupby(qid).transform("nunique").to_numpy() > 1  # queries with something to rank
        if pd.unique(qid[keep]).size >= MIN_RANKER_QUERIES:
            position = pos[keep] if t.position_debias and (pos[keep] > 0).any() else None
            rows = (X[keep], y[keep], qid[keep], pos[keep], names)
            del X  # the unfiltered rows are freed before LightGBM copies them
            ranker = Ranker(RankerConfig(seed=t.seed)).fit(*rows[:3], names, categorical, position=position)
            report.metrics["ranker"] = _ranker_metrics(ranker, len(rows[1]), rows=t.ranker_rows)
    if ranker is None and t.model == "popularity":
        report.fallbacks.append("ranker: [train] model = popularity; products are ordered by popularity")
    elif ranker is None:
        report.fallbacks.append(f"ranker: fewer than {MIN_RANKER_QUERIES} customers with graded events in the ranker "
                                "window; products are ordered by retrieval score")  # fmt: skip
    model.ranker = ranker
    report.seconds["ranker"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if len(guard_users) and t.model == "two_stage":
        allowed = allowed_mask(rules, rank_snap, guard_users, ds.n_products)
        model.serve = _guard(model, builder, rank_snap, guard_users, allowed, new, report, progress, t.serve)
        if ranker is not None and rows is not None and t.ranker_rows == "shown":
            # The guard's customers join the ranker's (their rows of the latest window), with the trees chosen.
            # (Measured with shown rows, the default; `ranker_rows = "retrieved"` keeps the ranker as it is.)
            # The two parts are freed once stacked: the refit's table is the one copy LightGBM reads from.
            rows = _stack_rows(rows, window_rows(rank_snap, np.intersect1d(guard_users, q_all), labels, shown, rows))
            model.ranker = _refit_ranker(ranker, rows, categorical, position=t.position_debias)
            rows = None
    if retriever is not None and t.refit_two_tower:
        # The served two-tower learns from the latest window too (the one the ranker and the guard used), for
        # the epochs early stopping chose: it would otherwise be a window staler than everything else served.
        windows = (*split.retrieval_cutoffs, split.rank_cutoff)[-t.max_retrieval_windows :]
        refit = _fit_two_tower(builder, replace(split, retrieval_cutoffs=windows), space, settings, report, progress,
                               epochs=retriever.best_epoch_, known=rank_snap)  # fmt: skip
        if refit is not None:
            model.set_retriever(refit)
    _refit_sources(model, ds)
    report.seconds["validation_and_refit"] = time.perf_counter() - clock
    return model, report


# -- without impressions -------------------------------------------------------------------------------
def _train_without_impressions(ds: Dataset, settings: FinrecSettings,
                               progress: bool) -> tuple[TwoStageModel, TrainingReport]:  # fmt: skip
    """Sources, an optional two-tower and a ranker on source candidates; the guard chooses what serves.

    Temporal data with enough signal is validated *forward in time*: the ranker learns at an earlier
    cutoff (what customers newly took between it and the plan's cutoff) and the guard judges every
    method after the plan's cutoff, so a ranker that learnt one season's habits is caught. Otherwise
    (a holdout, or one cutoff only) the validation customers are split: the ranker learns from 75%,
    the guard judges on the rest.
    """
    t = settings.train
    grades = dict(settings.events.grades)
    clock = time.perf_counter()
    plan = ValidationPlan.choose(ds, grades, t.retrieval_min_grade, t.validation, t.seed)
    split = TemporalSplit.plan(*ds.time_range, t.eval_days, t.label_days, t.max_retrieval_windows)
    report = TrainingReport(split)
    earlier = plan.earlier(ds, grades, t.retrieval_min_grade)
    report.validation["plan"] = plan.to_dict()
    if earlier is not None:
        # Features at a cutoff read only events before it, so one builder over the data serves both cutoffs.
        builder = FeatureBuilder(ds, settings.protected_attributes)
        rank_cut, rank_targets = earlier.cutoff, earlier.targets
        rank_users = np.unique(rank_targets["user"].to_numpy())
        if len(rank_users) > t.max_ranker_queries:
            rng0 = np.random.default_rng(t.seed)
            rank_users = np.sort(rng0.choice(rank_users, t.max_ranker_queries, replace=False))
        guard_users = np.unique(plan.targets["user"].to_numpy())
        if len(guard_users) > MAX_GUARD_CUSTOMERS:
            guard_users = np.sort(np.random.default_rng(t.seed + 1).choice(guard_users, MAX_GUARD_CUSTOMERS,
                                                                           replace=False))  # fmt: skip
        report.validation["plan"]["reason"] = (
            plan.reason + f"; forward in time: the ranker learns from {earlier.n_customers} customers' new "
            f"products after an earlier cutoff, and every method is judged after the later one")
        report.validation["plan"]["ranker_cutoff"] = int(rank_cut)
    elif plan.kind == "temporal":
        # One later window only (two holdings snapshots, say): the validation customers are split three
        # ways. The sources also learn from what a third of them did after the cutoff (so that additions
        # exist to learn transitions from); the ranker learns from another third's answers, the guard judges
        # on the rest; the last two are seen only up to the cutoff.
        users = np.unique(plan.targets["user"].to_numpy())
        perm = np.random.default_rng(t.seed + 2).permutation(users)
        evaluated = np.sort(perm[len(perm) // 3 :])
        rank_users, guard_users = _split_customers(evaluated, t.max_ranker_queries, t.seed)
        keep = plan.keep | ~np.isin(ds.events.user, evaluated)
        vds = replace(ds, events=ds.events.select(keep))
        builder = FeatureBuilder(vds, settings.protected_attributes)
        rank_cut = int(vds.events.ts[-1]) + 1
        rank_targets = plan.targets
        plan = replace(plan, cutoff=rank_cut)
        report.validation["plan"]["reason"] = (
            plan.reason + f"; customers split: the sources also learn from {len(perm) - len(evaluated)} customers' "
            "later events, the ranker and the guard from the others' answers")
    else:
        vds = replace(ds, events=ds.events.select(plan.keep))
        builder = FeatureBuilder(vds, settings.protected_attributes)
        rank_cut, rank_targets = plan.cutoff, plan.targets
        rank_users, guard_users = _split_customers(np.unique(plan.targets["user"].to_numpy()), t.max_ranker_queries,
                                                   t.seed)  # fmt: skip
        report.validation["plan"]["reason"] = plan.reason
    rules = rules_for(ds, settings)
    snap = builder.snapshot(rank_cut)
    space = FeatureSpace.fit(snap)
    retriever = None
    if plan.kind == "temporal" and rank_cut - ds.time_range[0] > 1:
        inner = TemporalSplit.plan(ds.time_range[0], rank_cut - 1, t.eval_days, t.label_days,
                                   t.max_retrieval_windows)  # fmt: skip
        retriever = _fit_two_tower(builder, inner, space, settings, report, progress, known=snap)
    else:
        report.fallbacks.append("retrieval: two-tower not trained (it learns from time windows; this data's "
                                "validation is a holdout); candidates come from the other sources")  # fmt: skip
    report.seconds["retrieval"] = time.perf_counter() - clock

    clock = time.perf_counter()
    ev = builder.ds.events.before(rank_cut)
    popularity = np.log1p(np.bincount(ev.product[ev.etype >= ETYPE["click"]], minlength=ds.n_products)).astype(float)
    base_columns = [*_pair_columns(builder, snap), *PAIR_COLUMNS_EXTRA]
    model = _new_model(ds, settings, space, retriever, base_columns, popularity, split)
    inter = model.positives(builder, snap)
    gsnap = builder.snapshot(plan.cutoff) if plan.cutoff != rank_cut else snap
    if earlier is not None:
        # Forward in time, hyperparameters are chosen on the latest window (the closest to what the bundle will
        # face), on the guard's customers: a choice that favours a source there only makes the guard stricter
        # with the stack.
        tune_users = guard_users[:MAX_TUNE_CUSTOMERS]
        t_inter = Interactions.from_events(ds.events, ds.n_users, ds.n_products, grades, t.retrieval_min_grade,
                                           cutoff=plan.cutoff)  # fmt: skip
        t_allowed = _allowed_new(rules, model, builder, gsnap, tune_users, positives=t_inter)
        tune: Tune = (tune_users, _answer(tune_users, plan.targets), t_allowed, t_inter)
    else:
        tune_users = rank_users[:MAX_TUNE_CUSTOMERS]
        tune = (tune_users, _answer(tune_users, rank_targets), _allowed_new(rules, model, builder, snap, tune_users),
                inter)
    sources = _fit_sources(ds, inter, settings, report, tune if len(tune_users) else None)
    _use_sources(model, sources, base_columns, snap)
    report.seconds["sources"] = time.perf_counter() - clock

    clock = time.perf_counter()
    _fit_approval(model, builder, snap, settings, report)
    report.seconds["approval"] = time.perf_counter() - clock

    clock = time.perf_counter()
    rng = np.random.default_rng(t.seed)
    ranker = None
    rows = None
    if len(rank_users) >= MIN_RANKER_QUERIES and model.sources is not None:
        history = builder.history(snap.cutoff, t.history_length)
        allowed = _allowed_new(rules, model, builder, snap, rank_users)
        rows = _candidate_rows(model, builder, snap, rank_users, allowed, history, rank_targets, t.n_candidates,
                               t.ranker_negatives, rng)  # fmt: skip
        # Forward in time, earlier windows too (each with features at its own cutoff): a ranker that has seen
        # several periods leans less on one period's habits.
        window = earlier
        for _ in range(t.ranker_windows - 1):
            window = window.earlier(ds, grades, t.retrieval_min_grade) if window is not None else None
            if window is None:
                break
            w_users = np.unique(window.targets["user"].to_numpy())
            budget = t.max_ranker_queries - int(rows[2].max()) - 1  # the customers' budget covers every window
            if budget < MIN_RANKER_QUERIES:
                break
            if len(w_users) > budget:
                w_users = np.sort(rng.choice(w_users, budget, replace=False))
            w_snap = builder.snapshot(window.cutoff)
            w_rows = _candidate_rows(model, builder, w_snap, w_users,
                                     _allowed_new(rules, model, builder, w_snap, w_users),
                                     builder.history(w_snap.cutoff, t.history_length), window.targets,
                                     t.n_candidates, t.ranker_negatives, rng)  # fmt: skip
            rows = _stack_rows(rows, w_rows)
            report.validation["plan"].setdefault("earlier_ranker_cutoffs", []).append(int(window.cutoff))
        X, y, qid, _, names = rows
        keep = pd.Series(y).groupby(qid).transform("nunique").to_numpy() > 1
        if pd.unique(qid[keep]).size >= MIN_RANKER_QUERIES:
            ranker = Ranker(RankerConfig(seed=t.seed)).fit(
                X[keep], y[keep], qid[keep], names, space.tabular_names(model.pair_columns)[1]
            )
            report.metrics["ranker"] = _ranker_metrics(ranker, int(keep.sum()), rows="candidates")
    if ranker is None:
        report.fallbacks.append(f"ranker: fewer than {MIN_RANKER_QUERIES} validation customers with a positive among "
                                "the candidates; the best single source serves")  # fmt: skip
    model.ranker = ranker
    report.seconds["ranker"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if len(guard_users):
        g_allowed = _allowed_new(rules, model, builder, gsnap, guard_users)
        model.serve = _guard(model, builder, gsnap, guard_users, g_allowed, plan.targets, report, progress, t.serve)
    # Refit: the ranker on every validation customer (forward in time: the later window too) with the trees
    # chosen, the sources on all the data.
    if ranker is not None and rows is not None and len(guard_users):
        g_history = builder.history(gsnap.cutoff, t.history_length)
        g_allowed = _allowed_new(rules, model, builder, gsnap, guard_users)
        g_rows = _candidate_rows(model, builder, gsnap, guard_users, g_allowed, g_history, plan.targets,
                                 t.n_candidates, t.ranker_negatives, rng)  # fmt: skip
        model.ranker = _refit_ranker(ranker, _stack_rows(rows, g_rows), space.tabular_names(model.pair_columns)[1])
    _refit_sources(model, ds)
    report.seconds["validation_and_refit"] = time.perf_counter() - clock
    return model, report


Rows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]  # X, grades, query, position, names


def _rows_per_customer(users: np.ndarray, labels: pd.DataFrame, shown: pd.DataFrame | None,
                       negatives: int) -> np.ndarray:  # fmt: skip
    """Ranker rows each of ``users`` will have: shown or graded products (``shown`` given), else at most their
    graded candidates plus ``negatives`` unlabelled ones (:func:`_candidate_rows`)."""
    if shown is not None:
        pairs = pd.concat([shown[["user", "product"]], labels[["user", "product"]]]).drop_duplicates()
        return pairs["user"].value_counts().reindex(users, fill_value=0).to_numpy(np.int64)
    return labels["user"].value_counts().reindex(users, fill_value=0).to_numpy(np.int64) + negatives


def _whole_customers_within(users: np.ndarray, rows: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Whole customers whose ``rows`` add up to at most ``budget``: all when they fit, else a seeded sample.

    >>> _whole_customers_within(np.array([3, 5, 9]), np.array([4, 4, 4]), 12, 0).tolist()
    [3, 5, 9]
    >>> len(_whole_customers_within(np.array([3, 5, 9]), np.array([4, 4, 4]), 11, 0))
    2
    """
    if int(rows.sum()) <= budget:
        return users
    order = np.random.default_rng(seed).permutation(len(users))
    fits = np.cumsum(rows[order]) <= budget  # a prefix of the shuffled customers
    return np.sort(users[order[fits]])


def _stack_rows(a: Rows, b: Rows) -> Rows:
    """Ranker rows of two sets of queries, one after the other (``b``'s query ids moved past ``a``'s)."""
    shift = int(a[2].max()) + 1 if len(a[2]) else 0
    return (np.vstack([a[0], b[0]]), np.concatenate([a[1], b[1]]), np.concatenate([a[2], b[2] + shift]),
            np.concatenate([a[3], b[3]]), a[4])  # fmt: skip


def _refit_ranker(ranker: Ranker, rows: Rows, categorical: list[str], position: bool = False) -> Ranker:
    """The ranker refitted on ``rows`` (every validation customer) with the number of trees early stopping chose."""
    X, y, qid, pos, names = rows
    keep = pd.Series(y).groupby(qid).transform("nunique").to_numpy() > 1
    cfg = replace(ranker.config, n_estimators=max(ranker.best_iteration_, 1), validation_fraction=0.0)
    pos_kept = pos[keep] if position and (pos[keep] > 0).any() else None
    refit = Ranker(cfg).fit(X[keep], y[keep], qid[keep], names, categorical, position=pos_kept)
    refit.validation_ndcg_ = ranker.validation_ndcg_
    return refit


def _ranker_metrics(ranker: Ranker, n_rows: int, rows: str) -> dict[str, Any]:
    return {"queries": int(ranker.n_queries_), "rows": n_rows, "row_kind": rows,
            "validation_ndcg@10": ranker.validation_ndcg_, "trees": ranker.best_iteration_,
            "top_features": dict(list(ranker.feature_importance().items())[:10])}  # fmt: skip


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
    extra: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(users), BLOCK):
        m = (q >= start) & (q < start + BLOCK)
        block = users[start : start + BLOCK]
        src = model.source_scores(builder, snap, block)
        for c, v in SourceSet.features(src, allowed[start : start + BLOCK], q[m] - start, items[m]).items():
            extra.setdefault(c, []).append(v)
    columns = {c: np.concatenate(extra.pop(c)) for c in list(extra)}
    X, names = model.tabular(builder, snap, users[q], items, score, rank.astype(np.float64), columns)
    return X, rows["grade"].to_numpy(np.int32), q, rows["position"].to_numpy(np.int64), names


def _candidate_rows(
    model: TwoStageModel, builder: FeatureBuilder, snap: Snapshot, users: np.ndarray, allowed: np.ndarray,
    history: np.ndarray, labels: pd.DataFrame, n_candidates: int, negatives: int, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:  # fmt: skip
    """Every source's candidates per customer with their grade in ``labels`` (0: no positive), as served.

    Only candidates are used, as at serving time (adding missed positives would make "not a
    candidate" a marker of "engaged"); unlabelled ones are sampled down to ``negatives``.
    """
    grade = labels.assign(q=pd.Index(users).get_indexer(labels["user"].to_numpy()))
    grade = grade[grade["q"] >= 0]
    parts_x, parts_y, parts_q = [], [], []
    names: list[str] = []
    for start in range(0, len(users), BLOCK):
        bu, ba = users[start : start + BLOCK], allowed[start : start + BLOCK]
        src = model.source_scores(builder, snap, bu)
        _, ret_i = model.retrieve(builder, snap, bu, ba, n_candidates, history)
        per = model.source_candidates(n_candidates)
        cand = SourceSet.candidates(src, ba, per) if src else [r[r >= 0] for r in ret_i]
        if src and model.retriever is not None:
            cand = [np.union1d(c, r[r >= 0]) for c, r in zip(cand, ret_i, strict=True)]
        rows = pd.DataFrame({"q": np.repeat(np.arange(len(bu)), [len(c) for c in cand]) + start,
                             "product": np.concatenate(cand) if cand else np.empty(0, np.int64)})  # fmt: skip
        rows = rows.merge(grade[["q", "product", "grade"]], on=["q", "product"], how="left")
        rows["grade"] = rows["grade"].fillna(0).astype(np.int32)
        unlabelled = rows["grade"] == 0
        draw = pd.Series(rng.random(len(rows)), index=rows.index).where(unlabelled)
        rows = rows[~unlabelled | (draw.groupby(rows["q"]).rank(method="first") <= negatives)]
        q, items = rows["q"].to_numpy() - start, rows["product"].to_numpy(np.int64)
        full = np.where(ba, model.full_scores(builder, snap, bu, history), -np.inf)
        rank_all = ranks_among(full, ba)
        extra = SourceSet.features(src, ba, q, items) if src else {}
        score = np.where(np.isfinite(full[q, items]), full[q, items], np.nan)
        X, names = model.tabular(builder, snap, bu[q], items, score, rank_all[q, items].astype(np.float64), extra)
        parts_x.append(X)
        parts_y.append(rows["grade"].to_numpy(np.int32))
        parts_q.append(q + start)
    X = np.vstack(parts_x) if parts_x else np.zeros((0, len(names)))
    qid = np.concatenate(parts_q) if parts_q else np.empty(0, np.int64)
    return X, np.concatenate(parts_y), qid, np.zeros(len(qid), dtype=np.int64), names
