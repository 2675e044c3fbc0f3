"""The trained two-stage recommender: retrieve with the two-tower model, rank with LightGBM.

:class:`TwoStageModel` is what a model bundle holds and what ``finrec recommend``,
``finrec evaluate`` and (later) the service load. Given the customers' features
at a cutoff it

1. embeds customers and products and retrieves the ``n_candidates`` best
   *allowed* products (the caller's mask: eligibility, suitability, exclusions),
2. builds pair features for those candidates and scores them with the ranker
   (the retrieval score and rank and the approval odds are features),
3. demotes products whose approval odds fall below the threshold (a decline
   costs the customer a hard credit inquiry) and returns the top k.

When training found too little signal for a stage, the bundle records a
fallback (popularity retrieval, or retrieval order without a ranker) and the
model says so; it never fails on a sparse dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finrec.candidates.interactions import Interactions, rows_of
from finrec.candidates.source_set import SourceSet, ranks_among
from finrec.errors import ArtifactError
from finrec.features.builder import FeatureBuilder, Snapshot
from finrec.features.encoding import FeatureSpace
from finrec.ranking.approval import ApprovalModel
from finrec.ranking.ranker import Ranker
from finrec.retrieval.index import make_index
from finrec.retrieval.two_tower import TwoTowerModel
from finrec.twostage.bundle import BundleConfig

BUNDLE_FORMAT = 1
PAIR_COLUMNS_EXTRA = ("retrieval_score", "retrieval_rank", "approval_odds")
APPROVAL_PAIR_COLUMNS = ("credit_margin", "income_ratio", "age_margin_min_age", "age_margin_max_age", "risk_gap")
APPROVAL_USER_COLUMNS = ("age", "income", "credit_score", "risk_tolerance")


@dataclass
class Recommendations:
    """Top-k per customer: product rows (-1 pads), final scores, approval odds, retrieval candidates."""

    items: np.ndarray  # (n, k) int64
    scores: np.ndarray  # (n, k) float64
    approval: np.ndarray  # (n, k) float64
    candidates: np.ndarray  # (n, n_candidates) int64 retrieved (for Recall@N)
    features: np.ndarray | None = None  # (served, n_features) ranker inputs of the served items, customer by rank
    model_scores: np.ndarray | None = None  # (served,) what ordered them (ranker score, before demotion)


class TwoStageModel:
    def __init__(
        self,
        space: FeatureSpace,
        product_ids: list[str],
        retriever: TwoTowerModel | None,
        ranker: Ranker | None,
        approval: ApprovalModel | None,
        pair_columns: list[str],
        popularity: np.ndarray,
        config: BundleConfig,
        sources: SourceSet | None = None,
        serve: str = "stack",
    ):
        self.space = space
        self.product_ids = product_ids
        self.retriever = retriever
        self.ranker = ranker
        self.approval = approval
        self.pair_columns = pair_columns
        self.popularity = popularity  # per training product row, log-scale engaged count
        self.config = config
        # Candidate sources fitted at ``config["sources_cutoff"]`` on ``config["sources_events"]`` events (the
        # bundle's: all the data); at any other cutoff they are refitted there (they are point-in-time features).
        self.sources = sources
        # What answers: "stack" (candidates from every source, ordered by the ranker) or one source alone
        # ("two_tower" or a source name), as the training plan's selection guard chose on validation.
        self.serve = serve
        # Per-snapshot work that every block of customers shares: product embeddings, candidate indexes,
        # positives and sources. One entry; a new snapshot replaces it. The
        # snapshot itself is kept so its id cannot be reused while the entry lives.
        self._cache: tuple[Snapshot, dict[str, Any]] | None = None

    def _snapshot_cache(self, snap: Snapshot) -> dict[str, Any]:
        if self._cache is None or self._cache[0] is not snap:
            self._cache = (snap, {})
        return self._cache[1]

    def stages(self) -> dict[str, str]:
        """What each stage is in this bundle (a fallback says so)."""
        retrieval = ["two_tower"] if self.retriever is not None else []
        retrieval += self.sources.names if self.sources is not None else []
        return {
            "retrieval": (" + ".join(retrieval) + ("" if self.retriever is not None else " (two-tower: fallback)"))
            if retrieval else "popularity (fallback)",
            "ranking": "lightgbm_lambdarank" if self.ranker is not None else "retrieval order (fallback)",
            "approval_odds": "lightgbm+isotonic" if self.approval is not None else "not used",
        }

    # -- candidate sources ----------------------------------------------------------------------
    def positives(self, builder: FeatureBuilder, snap: Snapshot) -> Interactions:
        """Positives of every customer before the snapshot's cutoff (what the sources score from)."""
        cache = self._snapshot_cache(snap)
        if "interactions" not in cache:
            cache["interactions"] = Interactions.from_events(
                builder.ds.events, builder.ds.n_users, builder.ds.n_products, self.config.grades,
                self.config.min_grade, cutoff=snap.cutoff)  # fmt: skip
        inter: Interactions = cache["interactions"]
        return inter

    def set_retriever(self, retriever: TwoTowerModel) -> None:
        """Serve ``retriever`` from now on (a refit): the old towers' cached embeddings and indexes are dropped."""
        self.retriever = retriever
        self._cache = None

    def release_snapshot(self) -> None:
        """Drop what was kept for the last snapshot (it and its positives, sources, embeddings, indexes)."""
        self._cache = None

    def set_sources(self, snap: Snapshot, sources: SourceSet) -> None:
        """Use ``sources`` (fitted at this snapshot's cutoff) for this snapshot."""
        self._snapshot_cache(snap)["sources"] = sources

    def sources_at(self, builder: FeatureBuilder, snap: Snapshot) -> SourceSet | None:
        """The sources fitted at the snapshot's cutoff: the bundle's own when that is where they were fitted,
        else the same sources refitted on the events before the cutoff (never on what comes after it)."""
        if self.sources is None:
            return None
        cache = self._snapshot_cache(snap)
        if "sources" not in cache:
            n_before = int(np.searchsorted(builder.ds.events.ts, snap.cutoff, side="left"))
            if self.config.sources_fitted_at(snap.cutoff, n_before):
                cache["sources"] = self.sources
            else:
                inter = self.positives(builder, snap)
                cache["sources"] = self.sources.refit(inter, self.sources.segment_codes(builder.ds.users))
        found: SourceSet = cache["sources"]
        return found

    def source_candidates(self, n_candidates: int) -> int:
        """Candidates each source adds (the two-tower adds ``n_candidates``): a share of the budget, at least 20,
        so that several sources do not multiply the ranker's work per request."""
        n_sources = len(self.sources.names) if self.sources is not None else 1
        if self.retriever is None:
            return max(20, n_candidates // max(1, min(n_sources, 2)))
        return max(20, n_candidates // max(1, n_sources))

    def source_scores(self, builder: FeatureBuilder, snap: Snapshot, users: np.ndarray) -> dict[str, np.ndarray]:
        """Every source's (len(users), n_products) scores at the snapshot."""
        sources = self.sources_at(builder, snap)
        if sources is None:
            return {}
        history = rows_of(self.positives(builder, snap).matrix, users)
        seg = sources.segment_codes(builder.ds.users)
        return sources.scores(history, None if seg is None else seg[users])

    # -- helpers --------------------------------------------------------------------------------
    def product_rows(self, builder: FeatureBuilder) -> np.ndarray:
        """Row of each current product in the training catalogue (-1: new since training)."""
        return pd.Index(self.product_ids).get_indexer(builder.ds.products["product_id"].astype(str))

    def item_embeddings(self, builder: FeatureBuilder, snap: Snapshot) -> np.ndarray:
        assert self.retriever is not None
        cache = self._snapshot_cache(snap)
        if "items" not in cache:
            cache["items"] = self.retriever.item_embeddings(self.space.product_dense(snap), self.product_rows(builder))
        items: np.ndarray = cache["items"]
        return items

    def _index(self, builder: FeatureBuilder, snap: Snapshot, kind: str) -> Any:
        cache = self._snapshot_cache(snap)
        key = f"index:{kind}"
        if key not in cache:
            cache[key] = make_index(kind, self.item_embeddings(builder, snap))  # type: ignore[arg-type]
        return cache[key]

    def user_embeddings(
        self, builder: FeatureBuilder, snap: Snapshot, users: np.ndarray, history: np.ndarray
    ) -> np.ndarray:
        assert self.retriever is not None
        # The requested customers' rows only: a cached matrix of every customer's would make memory grow with the
        # book wherever a sample of customers is scored (training, validation, the drift reference).
        ux = self.space.user_dense(snap.users.iloc[users])
        # History holds current product rows; the model's id table is indexed by training rows.
        rows = self.product_rows(builder)
        h = history[users]
        mapped = np.where(h >= 0, rows[np.maximum(h, 0)], -1)
        return self.retriever.user_embeddings(ux, mapped)

    def popularity_scores(self, builder: FeatureBuilder) -> np.ndarray:
        rows = self.product_rows(builder)
        return np.where(rows >= 0, self.popularity[np.maximum(rows, 0)], 0.0)

    def approval_features(self, names: list[str]) -> list[int]:
        keep = {f"user_{c}" for c in APPROVAL_USER_COLUMNS} | set(APPROVAL_PAIR_COLUMNS)
        return [i for i, n in enumerate(names) if n in keep or (n.startswith("product_") and n != "product_provider")]

    def full_scores(
        self, builder: FeatureBuilder, snap: Snapshot, users: np.ndarray, history: np.ndarray
    ) -> np.ndarray:
        """(len(users), n_products) retrieval scores of every product (popularity when there is no retriever)."""
        if self.retriever is None:
            return np.broadcast_to(self.popularity_scores(builder), (len(users), builder.ds.n_products)).copy()
        ue = self.user_embeddings(builder, snap, users, history)
        return (ue @ self.item_embeddings(builder, snap).T).astype(np.float64)

    # -- stages ---------------------------------------------------------------------------------
    def retrieve(
        self,
        builder: FeatureBuilder,
        snap: Snapshot,
        users: np.ndarray,
        allowed: np.ndarray,
        n_candidates: int,
        history: np.ndarray,
        index_kind: str = "exact",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, items) of the best ``n_candidates`` allowed products per customer; -1 pads."""
        if self.retriever is None:
            pop = self.popularity_scores(builder)
            scores = np.where(allowed, pop[None, :], -np.inf)
            k = min(n_candidates, scores.shape[1])
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            s = np.take_along_axis(scores, top, axis=1)
            return s, np.where(np.isfinite(s), top, -1)
        index = self._index(builder, snap, index_kind)
        q = self.user_embeddings(builder, snap, users, history)
        k = min(n_candidates, allowed.shape[1])
        scores, items = index.search(q, k, exclude=~allowed)
        return scores.astype(np.float64), items.astype(np.int64)

    def tabular(
        self, builder: FeatureBuilder, snap: Snapshot, users: np.ndarray, items: np.ndarray, ret_score: np.ndarray,
        ret_rank: np.ndarray, extra: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[str]]:  # fmt: skip
        pairs = builder.pair_features(snap, users, items)
        pairs["retrieval_score"] = ret_score
        pairs["retrieval_rank"] = ret_rank
        pairs["approval_odds"] = np.nan
        for c in list(extra or {}):  # popped: the caller's columns are freed as the frame takes them
            pairs[c] = extra.pop(c)  # type: ignore[union-attr]
        names, _ = self.space.tabular_names(self.pair_columns)
        X = self.space.tabular(snap, users, items, pairs, self.pair_columns)
        if self.approval is not None and "approval_odds" in names:
            cols = self.approval_features(names)
            X[:, names.index("approval_odds")] = self.approval.predict_proba(X[:, cols])
        return X, names

    def pair_rows(
        self, builder: FeatureBuilder, snap: Snapshot, users: np.ndarray, allowed: np.ndarray, history: np.ndarray,
        q: np.ndarray, items: np.ndarray, src: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, list[str]]:  # fmt: skip
        """Ranker rows of pairs (``users[q[i]]``, ``items[i]``): one assembly for training, batch and evaluation.

        Retrieval score and rank are exact over the customer's allowed products, as are each source's.
        """
        score_all = np.where(allowed, self.full_scores(builder, snap, users, history), -np.inf)
        rank_all = ranks_among(score_all, allowed)
        ret_score = score_all[q, items]
        ret_score = np.where(np.isfinite(ret_score), ret_score, np.nan)
        extra = SourceSet.features(src, allowed, q, items) if src else {}
        return self.tabular(builder, snap, users[q], items, ret_score, rank_all[q, items].astype(np.float64), extra)

    def recommend(
        self,
        builder: FeatureBuilder,
        snap: Snapshot,
        users: np.ndarray,
        allowed: np.ndarray,
        k: int,
        history: np.ndarray,
        n_candidates: int | None = None,
        index_kind: str | None = None,
        demote_below: float | None = None,
        serve: str | None = None,
        with_features: bool = True,
    ) -> Recommendations:
        """Top ``k`` allowed products for each customer row in ``users`` (``allowed``: (len(users), n_products)).

        ``serve`` overrides what answers (``stack``, ``two_tower``, ``popularity`` or a source name); by
        default the bundle's choice. The served items' ranker rows come back with them (drift reference)
        unless ``with_features`` is false (a single source then costs one masked sort).
        """
        serve = serve or self.serve
        n_candidates = n_candidates or self.config.n_candidates
        demote_below = self.config.demote_below if demote_below is None else demote_below
        index_kind = index_kind or self.config.index  # the bundle's [train] index
        src = self.source_scores(builder, snap, users)
        n = len(users)
        if serve != "stack" and (serve in src or serve == "popularity" or self.retriever is None):
            scores = src.get(serve, np.broadcast_to(self.popularity_scores(builder), (n, builder.ds.n_products)))
            top = top_k(np.where(allowed, scores, -np.inf), k)
            s = np.where(top >= 0, np.take_along_axis(scores, np.maximum(top, 0), axis=1), np.nan)
            served = top >= 0
            if not with_features:
                return Recommendations(top, s, np.full(top.shape, np.nan), top)
            q = np.repeat(np.arange(n), k)[served.ravel()]
            X, _ = self.pair_rows(builder, snap, users, allowed, history, q, top[served], src)
            return Recommendations(top, s, np.full(top.shape, np.nan), top, X, s[served])
        ret_s, ret_i = self.retrieve(builder, snap, users, allowed, max(n_candidates, k), history, index_kind)
        if serve == "two_tower":
            top = ret_i[:, :k]
            s = np.where(top >= 0, ret_s[:, :k], np.nan)
            served = top >= 0
            if not with_features:
                return Recommendations(top, s, np.full(top.shape, np.nan), ret_i)
            q = np.repeat(np.arange(n), top.shape[1])[served.ravel()]
            X, _ = self.pair_rows(builder, snap, users, allowed, history, q, top[served], src)
            return Recommendations(top, s, np.full(top.shape, np.nan), ret_i, X, s[served])
        cand_rows = merge_candidates(src, allowed, self.source_candidates(n_candidates),
                                     [r[r >= 0] for r in ret_i] if self.retriever is not None or not src else None)
        width = max([len(r) for r in cand_rows] + [k, 1])
        cand = np.full((n, width), -1, dtype=np.int64)
        for j, r in enumerate(cand_rows):
            cand[j, : len(r)] = r
        valid = cand >= 0
        q = np.repeat(np.arange(n), width)[valid.ravel()]
        qi = cand.ravel()[valid.ravel()]
        final = np.full((n, width), -np.inf)
        raw = np.full((n, width), np.nan)
        odds = np.full((n, width), np.nan)
        X = np.zeros((0, 0))
        if len(q):
            X, names = self.pair_rows(builder, snap, users, allowed, history, q, qi, src)
            raw[valid], final[valid], odds[valid] = score_candidates(self.ranker, X, names, demote_below)
        order = np.argsort(-final, axis=1, kind="stable")[:, :k]
        items = np.take_along_axis(cand, order, axis=1)
        scores = np.take_along_axis(final, order, axis=1)
        approval = np.take_along_axis(odds, order, axis=1)
        raw_top = np.take_along_axis(raw, order, axis=1)
        items = np.where(np.isfinite(scores), items, -1)
        if items.shape[1] < k:
            pad = ((0, 0), (0, k - items.shape[1]))
            items = np.pad(items, pad, constant_values=-1)
            scores, approval, raw_top = (np.pad(a, pad, constant_values=np.nan) for a in (scores, approval, raw_top))
            order = np.pad(order, pad, constant_values=0)
        served = items >= 0
        row_of = np.full((n, width), -1, dtype=np.int64)
        row_of[valid] = np.arange(int(valid.sum()))
        feats = X[np.take_along_axis(row_of, order, axis=1)[served]] if len(q) else None
        return Recommendations(items, np.where(served, scores, np.nan), approval, ret_i, feats, raw_top[served])

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": BUNDLE_FORMAT,
            "feature_space": self.space.to_dict(),
            "product_ids": self.product_ids,
            "pair_columns": self.pair_columns,
            "popularity": self.popularity.tolist(),
            "config": self.config.to_dict(),
            "serve": self.serve,
            "stages": {
                "sources": self.sources is not None,
                "retriever": self.retriever is not None,
                "ranker": self.ranker is not None,
                "approval": self.approval is not None,
            },
        }
        (directory / "model.json").write_text(json.dumps(meta))
        if self.retriever is not None:
            self.retriever.save(directory / "two_tower")
        if self.ranker is not None:
            self.ranker.save(directory / "ranker")
        if self.approval is not None:
            self.approval.save(directory / "approval")
        if self.sources is not None:
            self.sources.save(directory / "sources")

    @classmethod
    def load(cls, directory: Path) -> TwoStageModel:
        path = Path(directory) / "model.json"
        if not path.is_file():
            raise ArtifactError(f"{directory} is not a finrec model bundle (model.json missing)",
                                hint="train one with `finrec train --data DIR --model-dir OUT`")  # fmt: skip
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path} is corrupt: {exc}", hint="retrain with `finrec train`") from None
        if meta.get("format") != BUNDLE_FORMAT:
            raise ArtifactError(f"model bundle format {meta.get('format')} is not supported (expected {BUNDLE_FORMAT})",
                                hint="retrain with this version of finrec")  # fmt: skip
        stages = meta["stages"]
        return cls(
            space=FeatureSpace.from_dict(meta["feature_space"]),
            product_ids=meta["product_ids"],
            retriever=TwoTowerModel.load(directory / "two_tower") if stages["retriever"] else None,
            ranker=Ranker.load(directory / "ranker") if stages["ranker"] else None,
            approval=ApprovalModel.load(directory / "approval") if stages["approval"] else None,
            pair_columns=meta["pair_columns"],
            popularity=np.asarray(meta["popularity"], dtype=np.float64),
            config=BundleConfig.from_dict(meta["config"]),
            sources=SourceSet.load(directory / "sources") if stages.get("sources") else None,
            serve=str(meta.get("serve", "stack")),
        )


# -- the ranking core: what batch scoring, evaluation, training's guard and the API all call -------------------
def merge_candidates(src: dict[str, np.ndarray], allowed: np.ndarray, per_source: int,
                     retrieved: list[np.ndarray] | None) -> list[np.ndarray]:  # fmt: skip
    """Each customer row's candidates: every source's ``per_source`` best allowed products, with the retriever's.

    ``retrieved`` (valid product rows per customer, or None without a retriever) alone when there is no source.
    """
    if not src:
        return list(retrieved) if retrieved is not None else [np.empty(0, np.int64) for _ in range(len(allowed))]
    merged = SourceSet.candidates(src, allowed, per_source)
    if retrieved is None:
        return merged
    return [np.union1d(m, r) for m, r in zip(merged, retrieved, strict=True)]


def approval_odds_of(X: np.ndarray, names: list[str]) -> np.ndarray:
    """The approval odds column of ranker rows ``X`` as float64 (NaN when the bundle has no approval model)."""
    if "approval_odds" not in names:
        return np.full(len(X), np.nan)
    return X[:, names.index("approval_odds")].astype(np.float64)


def score_candidates(
    ranker: Ranker | None, X: np.ndarray, names: list[str], demote_below: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw score, final score, approval odds) of candidate rows ``X`` (columns ``names``).

    The ranker's score (the retrieval rank's opposite without a ranker); likely declines (approval odds below
    ``demote_below``) go below every other candidate, keeping their relative order: a decline costs the customer
    a hard credit inquiry.
    """
    raw = -X[:, names.index("retrieval_rank")].astype(np.float64) if ranker is None else ranker.predict(X)
    odds = approval_odds_of(X, names)
    final = np.where(np.nan_to_num(odds, nan=1.0) < demote_below, raw - 1e6, raw)
    return raw, final, odds


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best finite scores per row, best first (ties: lower row first); -1 pads."""
    k_eff = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]
    top = np.where(np.isfinite(np.take_along_axis(scores, order, axis=1)), order, -1)
    if k_eff < k:
        top = np.pad(top, ((0, 0), (0, k - k_eff)), constant_values=-1)
    return top
