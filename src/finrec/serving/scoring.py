"""A model bundle prepared for one-customer requests: retrieval, ranking and approval odds, vectorised.

:class:`ServingModel` does at load time everything that is the same for every
request (customer and product embeddings, the customer and product blocks of
the ranker's features, the candidate index), so a request is: one masked
inner-product search over the catalogue, a lookup of the candidates' pair
features, the approval model and the ranker on those candidates only, and the
ranker's per-feature contributions for the k returned items (their reasons).
No Python loop over the catalogue and no DataFrame on the request path.

It computes exactly what :meth:`TwoStageModel.recommend` computes offline for
the same customers (a test compares them item by item), so what was evaluated
is what is served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import pandas as pd

from finrec.candidates.base import one_row
from finrec.candidates.source_set import SourceSet, ranks_among
from finrec.errors import ArtifactError
from finrec.features.online import Activity
from finrec.retrieval.index import make_index
from finrec.serving.online import LiveCustomer, overlay
from finrec.serving.records import CustomerRecord
from finrec.serving.state import ServingData
from finrec.twostage.model import TwoStageModel, approval_odds_of, merge_candidates, score_candidates, top_k

_EMBED_BLOCK = 50_000


def version_of(manifest: dict[str, Any]) -> str:
    """A bundle's model version, from its manifest."""
    return str(manifest.get("metrics", {}).get("model_version") or "unversioned")


@dataclass
class CustomerArrays:
    """Every customer of a :class:`ServingData` in one model's encodings: what a record takes from the model."""

    tabular: np.ndarray  # (n_users, n_user_features) float32, the ranker's customer block
    dense: np.ndarray | None  # (n_users, n_dense) float32, the two-tower's customer input
    embedding: np.ndarray | None  # (n_users, dim) float32
    positives: Any  # (n_users, n_products) CSR of positives at the cutoff, None without candidate sources
    segments: np.ndarray | None  # (n_users,) segment codes (-1 unknown), None without a segment column

    def record(self, data: ServingData, row: int, history_length: int) -> CustomerRecord:
        """The record of the customer at ``row``: the data's part and this model's."""
        base = data.customer_record(row, history_length)
        positives = np.sort(self.positives[row].indices).astype(np.int64) if self.positives is not None else None
        return replace(
            base, tabular=self.tabular[row], dense=None if self.dense is None else self.dense[row],
            embedding=None if self.embedding is None else self.embedding[row],
            positives=base.positives if positives is None else positives,
            segment=None if self.segments is None else int(self.segments[row]),
        )  # fmt: skip


def encode_customers(model: TwoStageModel, data: ServingData, sources: SourceSet | None) -> CustomerArrays:
    """Every customer of ``data`` in ``model``'s encodings (none for a service without the customers' rows)."""
    builder, snap = data.builder, data.snap
    all_users = np.arange(data.n_users)
    tab = model.space.user_tabular(snap.users, all_users).astype(np.float32)
    dense = emb = None
    if model.retriever is not None:
        dense = model.space.user_dense(snap)  # kept to re-embed a customer with live events
        history = data.history(model.config.history_length)
        emb = np.vstack([
            model.user_embeddings(builder, snap, all_users[s : s + _EMBED_BLOCK], history)
            for s in range(0, data.n_users, _EMBED_BLOCK)
        ]) if data.n_users else np.zeros((0, model.retriever.config.embedding_dim), np.float32)  # fmt: skip
    positives = model.positives(builder, snap).matrix if sources is not None and data.n_users else None
    segments = sources.segment_codes(data.ds.users) if sources is not None else None
    return CustomerArrays(tab, dense, emb, positives, segments)


class CustomerLookup(Protocol):
    """Where a service without the customers' snapshot finds each customer's record (one per model version)."""

    def find(self, user_id: str) -> CustomerRecord | None:
        """The customer's record, None for an id that is not a customer."""
        ...

    def known(self, user_ids: list[str]) -> set[str]:
        """Which of the ids are customers."""
        ...


@dataclass
class Ranked:
    """One customer's ranked answer: product rows best first, with what the audit and the reasons need."""

    items: np.ndarray  # (m,) int64, m <= k
    scores: np.ndarray  # (m,) final ranker scores (demoted ones lowered)
    approval: np.ndarray  # (m,) approval odds, NaN when not modelled
    features: np.ndarray  # (m, n_features) float32 ranker inputs of the returned items
    n_candidates: int  # candidates retrieved and ranked
    timings: dict[str, float]  # seconds per step
    leaves: np.ndarray | None = None  # (m, n_trees) ranker leaves of the returned items (their reasons)


@dataclass
class CustomerInputs:
    """What the model needs about one customer: a known customer's record or a prospect's profile."""

    record: CustomerRecord | None  # None for a prospect
    embedding: np.ndarray | None  # (dim,) float32; None without a retriever
    tabular: np.ndarray  # (n_user_features,) float32
    profile: dict[str, Any] | None = None
    live: LiveCustomer | None = None  # live events since the cutoff (holdings, affinity, pair counts)


class ServingModel:
    """A :class:`TwoStageModel` bound to a :class:`ServingData`, ready for requests.

    Parameters
    ----------
    model, manifest
        The bundle and its manifest (the version comes from the manifest).
    data
        The customers' and products' state; shared by successive models on reload.
    """

    def __init__(self, model: TwoStageModel, manifest: dict[str, Any], data: ServingData,
                 customers: CustomerLookup | None = None) -> None:  # fmt: skip
        self.model = model
        self.manifest = manifest
        self.data = data
        self.version = version_of(manifest)
        self.n_candidates = model.config.n_candidates
        self.demote_below = model.config.demote_below
        snap, builder = data.snap, data.builder
        self.names, _ = model.space.tabular_names(model.pair_columns)
        if model.ranker is not None and model.ranker.feature_names_ != self.names:
            raise ArtifactError("the bundle's ranker features do not match its feature space",
                                hint="the bundle is inconsistent; retrain with `finrec train`")  # fmt: skip
        self.n_user = len(model.space.user_numeric) + len(model.space.user_vocab)
        self.pair_columns = list(model.pair_columns)
        self.approval_cols = model.approval_features(self.names) if model.approval is not None else []
        self.odds_col = self.names.index("approval_odds") if "approval_odds" in self.names else -1
        # Customers come from the data's arrays, or one per request from ``customers`` (materialised in Redis).
        self.customers = customers
        if data.catalogue is not None and customers is None:
            raise ArtifactError("a service without the customers' snapshot needs their materialised records",
                                hint="set serve.customer_features to the Redis URL `finrec materialize` wrote to")
        if data.catalogue is not None and model.sources is not None:
            model.set_sources(snap, model.sources)  # `finrec materialize` checked that they are the snapshot's
        self.user_column = {c: j for j, c in enumerate(model.space.user_numeric)}  # position in user_tab
        self.dense_columns = model.space.user_dense_columns()
        self.train_rows = model.product_rows(builder)  # current product row -> the two-tower's id row (-1: new)
        self.product_tab = model.space.product_tabular(snap.products, np.arange(data.n_products)).astype(np.float32)
        self.index: Any = None
        self.history_length = model.config.history_length if model.retriever is not None else 0
        if model.retriever is not None:
            self.index = make_index(model.config.index, model.item_embeddings(builder, snap))  # type: ignore[arg-type]
        self.popularity = model.popularity_scores(builder)
        self.item_emb = model.item_embeddings(builder, snap) if model.retriever is not None else None
        # Candidate sources at the data's cutoff (the bundle's own fit when the data is the one it was trained on).
        self.sources = model.sources_at(builder, snap)
        enc = encode_customers(model, data, self.sources)
        self.user_tab, self.user_dense, self.user_emb = enc.tabular, enc.dense, enc.embedding
        self.positives, self.segments = enc.positives, enc.segments
        self.serve = model.serve

    # -- customers ----------------------------------------------------------------------------------
    def record(self, row: int) -> CustomerRecord:
        """The record of the customer at ``row`` of the data: what `finrec materialize` writes for them."""
        return CustomerArrays(self.user_tab, self.user_dense, self.user_emb, self.positives,
                              self.segments).record(self.data, row, self.history_length)  # fmt: skip

    def lookup(self, user_id: str) -> CustomerRecord | None:
        """A known customer's record (None: not a customer of the data); may raise
        :class:`~finrec.storage.StoreUnavailable` when the records live in Redis."""
        if self.customers is not None:
            return self.customers.find(user_id)
        row = self.data.user_row(user_id)
        return None if row < 0 else self.record(row)

    def known(self, user_ids: list[str]) -> set[str]:
        """Which of ``user_ids`` are customers (one round trip when the records live in Redis)."""
        if self.customers is not None:
            return self.customers.known(user_ids)
        return {u for u in user_ids if self.data.user_row(u) >= 0}

    @property
    def n_customers(self) -> int:
        return self.data.n_customers

    def customer(self, record: CustomerRecord | int, activity: list[Activity] | None = None,
                 now: float | None = None) -> CustomerInputs:  # fmt: skip
        """A known customer's inputs (a record, or the data's row of one): the snapshot's, with their live events
        since the cutoff applied if any."""
        if not isinstance(record, CustomerRecord):
            record = self.record(int(record))
        if activity:
            return overlay(self, record, activity, float(self.data.cutoff if now is None else now))
        return CustomerInputs(record, record.embedding, record.tabular)

    def prospect(self, profile: dict[str, Any]) -> CustomerInputs:
        frame = self.data.prospect_frame(profile)
        tab = self.model.space.user_tabular(frame, np.zeros(1, np.int64)).astype(np.float32)[0]
        emb = None
        if self.model.retriever is not None:
            dense = self.model.space.user_dense(frame)
            hist = np.full((1, self.model.config.history_length), -1, dtype=np.int64)
            emb = self.model.retriever.user_embeddings(dense, hist)[0]
        return CustomerInputs(None, emb, tab, dict(profile))

    # -- the request path ---------------------------------------------------------------------------
    def _source_scores(self, who: CustomerInputs) -> dict[str, np.ndarray]:
        """Every source's (1, n_products) scores for one customer: positives at the cutoff plus live ones."""
        if self.sources is None:
            return {}
        n = self.data.n_products
        mine = who.record.positives if who.record is not None else np.empty(0, np.int64)
        if who.live is not None and who.live.positives is not None and len(who.live.positives):
            mine = np.union1d(mine, who.live.positives)
        history = one_row(mine, n)
        if who.record is not None:
            seg = None if who.record.segment is None else np.array([who.record.segment])
        else:
            column = self.sources.segment_column
            seg = None if column is None else np.array([self.sources.code_of((who.profile or {}).get(column))])
        return self.sources.scores(history, seg)

    def _retrieval_scores(self, who: CustomerInputs) -> np.ndarray:
        """The two-tower's score of every product (popularity without a two-tower), as offline."""
        if self.item_emb is not None and who.embedding is not None:
            return (who.embedding[None, :] @ self.item_emb.T).astype(np.float64)[0]
        return np.asarray(self.popularity, dtype=np.float64)

    # -- the request path ---------------------------------------------------------------------------
    def rank(self, who: CustomerInputs, allowed: np.ndarray, k: int) -> Ranked:
        """The best ``k`` products among ``allowed`` (bool, one per product) for one customer.

        Only allowed products are ever retrieved, so nothing the guardrails removed can be scored,
        whatever the models do. Fewer than ``k`` allowed products give a shorter answer. The candidates,
        features and order are those of :meth:`TwoStageModel.recommend` for the same customer.
        """
        t0 = time.perf_counter()
        n_cand = min(max(self.n_candidates, k), len(allowed))
        src = self._source_scores(who)
        single = self.serve != "stack" and (self.serve in src or self.serve == "popularity"
                                            or self.index is None)  # fmt: skip
        per_source = self.model.source_candidates(self.n_candidates)
        if single or self.serve == "two_tower":
            if self.serve == "two_tower" and self.index is not None:
                order_by = self._retrieval_scores(who)
            else:
                order_by = src[self.serve][0] if self.serve in src else np.asarray(self.popularity, np.float64)
            masked = np.where(allowed, order_by, -np.inf)
            items = top_k(masked[None, :], k)[0]
            items = items[items >= 0]
            final = masked[items]
        elif self.index is not None and who.embedding is not None:
            s, i = self.index.search(who.embedding[None, :], n_cand, exclude=~allowed[None, :])
            i = i[0].astype(np.int64)
            items = merge_candidates(src, allowed[None, :], per_source, [i[(i >= 0) & np.isfinite(s[0])]])[0]
        else:
            retrieved = None
            if not src:  # popularity retrieval (the bundle's fallback)
                top = top_k(np.where(allowed, self.popularity, -np.inf)[None, :], n_cand)[0]
                retrieved = [top[top >= 0]]
            items = merge_candidates(src, allowed[None, :], per_source, retrieved)[0]
        t1 = time.perf_counter()
        n = len(items)
        X = np.empty((n, len(self.names)), dtype=np.float32)
        X[:, : self.n_user] = who.tabular
        X[:, self.n_user : self.n_user + self.product_tab.shape[1]] = self.product_tab[items]
        pairs = self.data.pair_block(who.record, items, self.pair_columns, who.profile, who.live)
        ret_all = np.where(allowed, self._retrieval_scores(who), -np.inf)
        ret_rank = ranks_among(ret_all[None, :], allowed[None, :])[0]
        extra = SourceSet.features(src, allowed[None, :], np.zeros(n, np.int64), items) if src else {}
        for j, c in enumerate(self.pair_columns):
            if c == "retrieval_score":
                pairs[:, j] = np.where(np.isfinite(ret_all[items]), ret_all[items], np.nan)
            elif c == "retrieval_rank":
                pairs[:, j] = ret_rank[items]
            elif c in extra:
                pairs[:, j] = extra[c]
        X[:, self.n_user + self.product_tab.shape[1] :] = pairs
        t2 = time.perf_counter()
        if self.model.approval is not None and self.odds_col >= 0 and n:
            X[:, self.odds_col] = self.model.approval.predict_proba(X[:, self.approval_cols])
        t3 = time.perf_counter()
        leaves = None
        if single or self.serve == "two_tower":
            order = np.arange(n)  # already in the serving source's order
            odds = approval_odds_of(X, self.names)
        else:
            # The ranking core batch scoring uses; then the leaves of the rows returned only (their reasons).
            ranker = self.model.ranker if n else None
            _, final, odds = score_candidates(ranker, X, self.names, self.demote_below)
            order = np.argsort(-final, kind="stable")[:k]
            if ranker is not None:
                leaves = ranker.leaves(X[order])
        t4 = time.perf_counter()
        timings = {"retrieval": t1 - t0, "features": t2 - t1, "approval": t3 - t2, "ranker": t4 - t3}
        # Candidates considered: a single source scores every allowed product (as many as retrieval would take).
        considered = min(n_cand, int(allowed.sum())) if single or self.serve == "two_tower" else n
        return Ranked(items[order], final[order], odds[order], X[order], considered, timings,
                      leaves)  # fmt: skip

    def contributions(self, features: np.ndarray, leaves: np.ndarray | None = None,
                      projection: np.ndarray | None = None) -> np.ndarray | None:  # fmt: skip
        """Per-feature contributions of the ranker to each row's score (None without a ranker); with
        ``projection`` (n_features + 1, m), their projected sums (the reasons' group totals)."""
        ranker = self.model.ranker
        if ranker is None or not len(features):
            return None
        if leaves is not None:
            return ranker.contributions_from_leaves(leaves, projection)
        contrib = ranker.contributions(features)
        return contrib if projection is None else contrib @ projection

    def warm_up(self, records: list[CustomerRecord]) -> None:
        """Score a few customers end to end, so the first real request pays no lazy initialisation."""
        for r in records:
            out = self.rank(self.customer(r), np.ones(self.data.n_products, dtype=bool), 10)
            if not np.all(np.isfinite(out.scores)):
                raise ArtifactError(f"model {self.version} produced non-finite scores during warm-up",
                                    hint="the bundle is broken; retrain with `finrec train`")  # fmt: skip
            self.contributions(out.features[:1])

    def describe(self) -> dict[str, Any]:
        ranker = self.model.ranker
        return {
            "model_version": self.version,
            "stages": self.model.stages(),
            "candidates": self.n_candidates,
            "trees": int(ranker.booster_.current_iteration()) if ranker is not None else 0,
            "features": len(self.names),
            "products": self.data.n_products,
            "customers": self.data.n_customers,
            "data_fingerprint": self.data.ds.fingerprint,
            "data_cutoff": pd.Timestamp(self.data.cutoff, unit="s", tz="UTC").isoformat(),
        }
