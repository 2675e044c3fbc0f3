"""The candidate-source contract: fit on interactions, score customers over the whole catalogue.

A candidate source is a small estimator (scikit-learn style: ``__init__`` stores
hyperparameters, ``fit`` learns attributes ending in ``_`` and returns ``self``):

``fit(data, segments)``
    learn from :class:`~finrec.candidates.interactions.Interactions` (positives before a
    cutoff); ``segments`` is each customer row's segment code (-1 unknown) or ``None``.
``score(history, segments)``
    (n, n_products) float64 scores of ``n`` customers given their positives ``history``
    ((n, n_products) CSR, the same meaning as ``data.matrix``) and segment codes; higher
    is better. Deterministic: the same fit and inputs give the same scores.
``save(directory)`` / ``load(directory)``
    JSON for hyperparameters and ``.npz`` arrays read with ``allow_pickle=False``.

Sources never see eligibility rules or exclusions: the caller masks scores with what
the customer may be recommended. ``tests/contract/test_candidate_sources.py`` holds every
source to this contract on data with a planted answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
import scipy.sparse as sp

from finrec.candidates.interactions import Interactions
from finrec.errors import ArtifactError

__all__ = ["CandidateSource", "NotFittedError", "as_csr32", "check_params", "load_arrays", "one_row", "save_arrays"]


class NotFittedError(RuntimeError):
    """A source was asked to score or save before ``fit``."""


@runtime_checkable
class CandidateSource(Protocol):
    """See the module docstring for the contract."""

    kind: str  # stable name of the class in bundles ("popularity", "ease", ...)

    @property
    def name(self) -> str:
        """Name of this configured source (a feature name prefix), e.g. ``popularity_recent``."""
        ...

    def get_params(self) -> dict[str, Any]: ...

    def fit(self, data: Interactions, segments: np.ndarray | None = None) -> Self: ...

    def score(self, history: sp.csr_matrix, segments: np.ndarray | None = None) -> np.ndarray: ...

    def save(self, directory: Path) -> None: ...


def as_csr32(history: sp.csr_matrix) -> sp.csr_matrix:
    """``history`` as float32 CSR, without a copy when it already is one (the request path scores one customer,
    where scipy's conversions cost more than the product itself)."""
    if isinstance(history, sp.csr_matrix) and history.dtype == np.float32:
        return history
    return sp.csr_matrix(history, dtype=np.float32)


def one_row(items: np.ndarray, n_products: int) -> sp.csr_matrix:
    """A one-customer history: 1 at the (distinct) product rows ``items``."""
    cols = np.unique(np.asarray(items, dtype=np.int32))
    return sp.csr_matrix((np.ones(len(cols), np.float32), cols, np.array([0, len(cols)], dtype=np.int32)),
                         shape=(1, n_products))  # fmt: skip


def check_params(cls: type, params: dict[str, Any], allowed: set[str]) -> None:
    """Refuse unknown hyperparameters (a typo in a bundle or a setting never passes silently)."""
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"{cls.__name__} got unknown parameters {unknown}; known: {sorted(allowed)}")


def save_arrays(directory: Path, kind: str, params: dict[str, Any], arrays: dict[str, np.ndarray],
                info: dict[str, Any] | None = None) -> None:  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "source.json").write_text(json.dumps({"kind": kind, "params": params, "info": info or {}}))
    np.savez(directory / "source.npz", **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds oddly


def load_arrays(directory: Path) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    try:
        meta = json.loads((directory / "source.json").read_text())
        with np.load(directory / "source.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"cannot load the candidate source in {directory}: {exc}",
                            hint="retrain with `finrec train`") from None  # fmt: skip
    return str(meta["kind"]), dict(meta["params"]), dict(meta.get("info", {})), arrays


def csr_parts(m: sp.csr_matrix, prefix: str) -> dict[str, np.ndarray]:
    m = sp.csr_matrix(m)
    return {f"{prefix}_data": m.data, f"{prefix}_indices": m.indices, f"{prefix}_indptr": m.indptr,
            f"{prefix}_shape": np.asarray(m.shape, dtype=np.int64)}  # fmt: skip


def csr_from(arrays: dict[str, np.ndarray], prefix: str) -> sp.csr_matrix:
    shape = tuple(int(v) for v in arrays[f"{prefix}_shape"])
    return sp.csr_matrix((arrays[f"{prefix}_data"], arrays[f"{prefix}_indices"], arrays[f"{prefix}_indptr"]),
                         shape=shape)  # fmt: skip
