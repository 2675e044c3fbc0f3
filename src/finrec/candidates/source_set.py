"""Several candidate sources used together: their scores, their candidates, their features for the ranker.

:class:`SourceSet` holds fitted sources (and the customer segment column some of them use).
For a block of customers it gives every source's scores over the catalogue; from them

* ``candidates``: the union of each source's best ``n`` allowed products (merged, one row per
  product, so the ranker sees each candidate once);
* ``features``: for (customer, product) pairs, each source's score and the product's rank
  among the customer's allowed products by that score (``src_<name>`` and ``src_<name>_rank``);
  ranks are comparable across fits on more or less data, scores carry the strength.

Sources are features of a cutoff: the training plan fits them on what it may see, and the
bundle holds them refitted on all the data, which is what batch scoring and the API use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from finrec.candidates.base import CandidateSource
from finrec.candidates.interactions import Interactions
from finrec.candidates.item_item import EASESource, ItemKNNSource
from finrec.candidates.popularity import FlatSource, PopularitySource, SegmentPopularitySource
from finrec.candidates.transitions import TransitionSource
from finrec.errors import ArtifactError

KINDS: dict[str, Any] = {
    "popularity": PopularitySource,
    "segment_popularity": SegmentPopularitySource,
    "ease": EASESource,
    "item_knn": ItemKNNSource,
    "transitions": TransitionSource,
    "flat": FlatSource,
}
MAX_SEGMENTS = 64


def source_from_config(kind: str, params: dict[str, Any]) -> CandidateSource:
    if kind not in KINDS:
        raise ValueError(f"unknown candidate source kind {kind!r}; known: {sorted(KINDS)}")
    src: CandidateSource = KINDS[kind](**params)
    return src


def feature_names(names: list[str]) -> list[str]:
    """The ranker columns of sources ``names``: score and rank of each."""
    return [c for n in names for c in (f"src_{n}", f"src_{n}_rank")]


def ranks_among(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """1-based rank of every product among each row's allowed products by score (ties: lower row first)."""
    s = np.where(allowed, scores, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    ranks = np.empty_like(order)
    if len(order) == 1:  # one customer (a request): plain indexing, without put_along_axis's set-up
        ranks[0, order[0]] = np.arange(1, s.shape[1] + 1)
    else:
        np.put_along_axis(ranks, order, np.arange(1, s.shape[1] + 1)[None, :], axis=1)
    return ranks


def segment_codes(users: pd.DataFrame, column: str, vocab: list[str]) -> np.ndarray:
    """Code of each customer's ``column`` value in ``vocab`` (-1 unknown, missing, or no such column): what a
    segment-aware source reads of a profile. A function of the row alone, so any engine can apply it per piece."""
    if column not in users.columns:
        return np.full(len(users), -1, dtype=np.int64)
    vals = users[column].astype(object).where(users[column].notna(), None)
    return pd.Index(vocab).get_indexer(vals.map(lambda v: None if v is None else str(v)))


class SourceSet:
    """Fitted candidate sources, by name, in a fixed order."""

    def __init__(self, sources: list[CandidateSource], segment_column: str | None = None,
                 segment_vocab: list[str] | None = None) -> None:  # fmt: skip
        self.sources = list(sources)
        self.segment_column = segment_column
        self.segment_vocab = list(segment_vocab or [])

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def get(self, name: str) -> CandidateSource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    # -- segments --------------------------------------------------------------------------------
    @staticmethod
    def segment_candidates(users: pd.DataFrame, exclude: set[str]) -> list[str]:
        """Categorical customer columns usable as segments: text with 2..64 values, most rows known."""
        out = []
        for c in users.columns:
            if c in exclude or c == "user_id" or pd.api.types.is_numeric_dtype(users[c]):
                continue
            s = users[c]
            n = s.nunique(dropna=True)
            if 2 <= n <= MAX_SEGMENTS and s.notna().mean() >= 0.5:
                out.append(c)
        return out

    def segment_codes(self, users: pd.DataFrame) -> np.ndarray | None:
        """Segment code of each row of a customers frame (-1 unknown), or None without a segment column."""
        if self.segment_column is None:
            return None
        return segment_codes(users, self.segment_column, self.segment_vocab)

    def code_of(self, value: Any) -> int:
        if value is None or self.segment_column is None:
            return -1
        try:
            return self.segment_vocab.index(str(value))
        except ValueError:
            return -1

    # -- scoring -----------------------------------------------------------------------------------
    def scores(self, history: sp.csr_matrix, segments: np.ndarray | None) -> dict[str, np.ndarray]:
        return {s.name: s.score(history, segments) for s in self.sources}

    @staticmethod
    def candidates(scores: dict[str, np.ndarray], allowed: np.ndarray, n: int) -> list[np.ndarray]:
        """Per customer row: the union of every source's ``n`` best allowed products (sorted product rows)."""
        rows: list[np.ndarray] = []
        tops = []
        if allowed.shape[0] == 1:  # one customer (a request): every source in one call, a row each (same ties)
            if not scores:
                return [np.empty(0, np.int64)]
            stacked_scores = np.vstack([s[0] for s in scores.values()])  # exact upcast: same order, same ties
            k = min(n, stacked_scores.shape[1])
            masked = np.where(allowed, stacked_scores, -np.inf)
            part = np.argpartition(-masked, k - 1, axis=1)[:, :k] if k < masked.shape[1] else np.tile(
                np.arange(masked.shape[1]), (len(masked), 1))  # fmt: skip
            return [np.unique(part[allowed[0][part]])]
        for s in scores.values():
            k = min(n, s.shape[1])
            masked = np.where(allowed, s, -np.inf)
            part = np.argpartition(-masked, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(
                np.arange(s.shape[1]), (s.shape[0], 1))  # fmt: skip
            ok = np.take_along_axis(allowed, part, axis=1)
            tops.append(np.where(ok, part, -1))
        stacked = np.hstack(tops) if tops else np.full((allowed.shape[0], 0), -1)
        for i in range(allowed.shape[0]):
            r = np.unique(stacked[i])
            rows.append(r[r >= 0])
        return rows

    @staticmethod
    def features(scores: dict[str, np.ndarray], allowed: np.ndarray, q: np.ndarray,
                 items: np.ndarray) -> dict[str, np.ndarray]:  # fmt: skip
        """``src_<name>`` and ``src_<name>_rank`` of pairs (row ``q[i]`` of the block, product ``items[i]``)."""
        out: dict[str, np.ndarray] = {}
        one = None  # one customer (a request): every source's ranks in one call, a row each
        if allowed.shape[0] == 1 and scores:
            one = ranks_among(np.vstack([s[0] for s in scores.values()]),
                              np.broadcast_to(allowed, (len(scores), allowed.shape[1])))  # fmt: skip
        for j, (name, s) in enumerate(scores.items()):  # float32: what the ranker reads (the same cast as earlier)
            ranks = ranks_among(s, allowed) if one is None else one[j : j + 1]
            out[f"src_{name}"] = s[q, items].astype(np.float32)
            out[f"src_{name}_rank"] = ranks[q, items].astype(np.float32)
        return out

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        entries = [{"name": s.name, "kind": s.kind, "dir": f"{i:02d}_{s.name}"} for i, s in enumerate(self.sources)]
        for s, entry in zip(self.sources, entries, strict=True):
            s.save(directory / entry["dir"])
        index = {"sources": entries, "segment_column": self.segment_column, "segment_vocab": self.segment_vocab}
        (directory / "sources.json").write_text(json.dumps(index, indent=1))

    @classmethod
    def load(cls, directory: Path) -> SourceSet:
        try:
            index = json.loads((directory / "sources.json").read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read the candidate sources in {directory}: {exc}",
                                hint="retrain with `finrec train`") from None  # fmt: skip
        sources = []
        for entry in index["sources"]:
            kind = entry["kind"]
            if kind not in KINDS:
                raise ArtifactError(f"unknown candidate source kind {kind!r} in {directory}",
                                    hint="this bundle needs a newer finrec; retrain with this version")  # fmt: skip
            sources.append(KINDS[kind].load(directory / entry["dir"]))
        return cls(sources, index.get("segment_column"), index.get("segment_vocab"))

    def refit(self, data: Interactions, segments: np.ndarray | None) -> SourceSet:
        """The same sources (same hyperparameters) fitted on other interactions: a new set.

        A source that cannot be fitted on them (say, no dated additions before an early cutoff) scores
        every product 0 there, so the set keeps its names and the ranker its columns.
        """
        fresh: list[CandidateSource] = []
        for s in self.sources:
            try:
                fresh.append(source_from_config(s.kind, s.get_params()).fit(data, segments))
            except ValueError:
                fresh.append(FlatSource(s.name, data.n_products))
        return SourceSet(fresh, self.segment_column, self.segment_vocab)
