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

from finrec.errors import ArtifactError
from finrec.features.builder import FeatureBuilder, Snapshot
from finrec.features.encoding import FeatureSpace
from finrec.ranking.approval import ApprovalModel
from finrec.ranking.ranker import Ranker
from finrec.retrieval.index import make_index
from finrec.retrieval.two_tower import TwoTowerModel

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
        config: dict[str, Any],
    ):
        self.space = space
        self.product_ids = product_ids
        self.retriever = retriever
        self.ranker = ranker
        self.approval = approval
        self.pair_columns = pair_columns
        self.popularity = popularity  # per training product row, log-scale engaged count
        self.config = config
        # Per-snapshot work that every block of customers shares: dense customer features,
        # product embeddings, candidate indexes. One entry; a new snapshot replaces it. The
        # snapshot itself is kept so its id cannot be reused while the entry lives.
        self._cache: tuple[Snapshot, dict[str, Any]] | None = None

    def _snapshot_cache(self, snap: Snapshot) -> dict[str, Any]:
        if self._cache is None or self._cache[0] is not snap:
            self._cache = (snap, {})
        return self._cache[1]

    def stages(self) -> dict[str, str]:
        """What each stage is in this bundle (a fallback says so)."""
        return {
            "retrieval": "two_tower" if self.retriever is not None else "popularity (fallback)",
            "ranking": "lightgbm_lambdarank" if self.ranker is not None else "retrieval order (fallback)",
            "approval_odds": "lightgbm+isotonic" if self.approval is not None else "not used",
        }

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
        cache = self._snapshot_cache(snap)
        if "user_dense" not in cache:
            cache["user_dense"] = self.space.user_dense(snap)
        ux = cache["user_dense"][users]
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
        ret_rank: np.ndarray,
    ) -> tuple[np.ndarray, list[str]]:  # fmt: skip
        pairs = builder.pair_features(snap, users, items)
        pairs["retrieval_score"] = ret_score
        pairs["retrieval_rank"] = ret_rank
        pairs["approval_odds"] = np.nan
        names, _ = self.space.tabular_names(self.pair_columns)
        X = self.space.tabular(snap, users, items, pairs, self.pair_columns)
        if self.approval is not None and "approval_odds" in names:
            cols = self.approval_features(names)
            X[:, names.index("approval_odds")] = self.approval.predict_proba(X[:, cols])
        return X, names

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
    ) -> Recommendations:
        """Top ``k`` allowed products for each customer row in ``users`` (``allowed``: (len(users), n_products))."""
        n_candidates = n_candidates or int(self.config.get("n_candidates", 100))
        demote_below = self.config.get("demote_below", 0.2) if demote_below is None else demote_below
        index_kind = index_kind or str(self.config.get("index", "exact"))  # the bundle's [train] index
        ret_s, ret_i = self.retrieve(builder, snap, users, allowed, max(n_candidates, k), history, index_kind)
        n, c = ret_i.shape
        valid = ret_i >= 0
        qu = np.repeat(users, c)[valid.ravel()]
        qi = ret_i.ravel()[valid.ravel()]
        rank = np.tile(np.arange(1, c + 1), n)[valid.ravel()].astype(np.float64)
        final = np.full((n, c), -np.inf)
        odds = np.full((n, c), np.nan)
        if len(qu):
            X, names = self.tabular(builder, snap, qu, qi, ret_s.ravel()[valid.ravel()], rank)
            score = self.ranker.predict(X) if self.ranker is not None else -rank
            if "approval_odds" in names:
                odds[valid] = X[:, names.index("approval_odds")]
            # Demote likely declines below every other candidate, keeping their relative order.
            low = np.nan_to_num(odds[valid], nan=1.0) < demote_below
            final[valid] = np.where(low, score - 1e6, score)
        order = np.argsort(-final, axis=1, kind="stable")[:, :k]
        items = np.take_along_axis(np.where(valid, ret_i, -1), order, axis=1)
        scores = np.take_along_axis(final, order, axis=1)
        approval = np.take_along_axis(odds, order, axis=1)
        items = np.where(np.isfinite(scores), items, -1)
        return Recommendations(items, np.where(items >= 0, scores, np.nan), approval, ret_i)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": BUNDLE_FORMAT,
            "feature_space": self.space.to_dict(),
            "product_ids": self.product_ids,
            "pair_columns": self.pair_columns,
            "popularity": self.popularity.tolist(),
            "config": self.config,
            "stages": {
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
            config=meta["config"],
        )
