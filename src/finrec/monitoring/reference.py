"""What the model sees: a sample of the ranker's input rows and scores, saved as the drift reference.

Drift monitoring compares the distribution of the model's inputs now with the one it was trained on.
The inputs that matter are not the raw tables but the rows the ranker actually scores for the products it
serves: customer features repeated once per served product, the product's features, the pair features,
and the retrieval score, retrieval rank and approval odds computed by the earlier stages. A change in any
of them changes what the ranker does, while a change in a product nobody is served does not.

:func:`sample_features` therefore runs the model exactly as batch recommendation does (allowed = the
configured rules and not already held; :meth:`TwoStageModel.recommend`) for a seeded sample of
customers at a cutoff, and keeps the ranker rows of the top-k served products with their ranker scores.
Training stores one such sample, at the ranker cutoff, in the bundle's ``reference/`` folder (so the
manifest checksums it); a drift check later draws another at the end of the current data.

Customers are sampled by a seeded hash of their id rather than by row number, so the same customers are
picked again as long as they exist: successive checks compare largely the same people, which removes
most of the sampling noise without hiding changes in the population. The sample is stored as Parquet
(compressed: every customer's features repeat once per served product) plus a JSON sidecar; no pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from finrec.config import FinrecSettings
from finrec.data.dataset import Dataset
from finrec.errors import ArtifactError
from finrec.features.builder import FeatureBuilder
from finrec.twostage.model import Recommendations, TwoStageModel
from finrec.twostage.train import allowed_mask, rules_for

REFERENCE_DIR = "reference"
SAMPLE_FORMAT = 1
_VALUES = "values.parquet"
_META = "sample.json"
_SCORE_COLUMN = "__score__"
_PRODUCT_COLUMN = "__product__"
_RETRAIN = "retrain to enable drift monitoring (`finrec train`)"


@dataclass
class FeatureSample:
    """Ranker input rows of served (customer, product) pairs at one cutoff, with their ranker scores.

    Attributes
    ----------
    names
        Column names of ``values`` (:meth:`FeatureSpace.tabular_names` plus the pair columns).
    values
        (n, f) float32, NaN for missing: one row per served product.
    categorical
        Names of the columns holding category codes (compared by share, not by order).
    scores
        (n,) float64 ranker scores of the served products, before the approval-odds demotion.
    cutoff
        Unix seconds; features use events strictly before it.
    n_customers
        Customers sampled (each contributes up to k rows).
    products
        (n,) int64 product row of each served row (``None``: unknown). Drift tests use it to count how
        many distinct products the rows stand for.
    history_start
        First event time of the data the sample was drawn from (``None``: unknown): how much history the
        features could see.
    """

    names: list[str]
    values: np.ndarray
    categorical: list[str]
    scores: np.ndarray
    cutoff: int
    n_customers: int
    products: np.ndarray | None = None
    history_start: int | None = None

    def column(self, name: str) -> np.ndarray:
        """The values of one feature (float64)."""
        return self.values[:, self.names.index(name)].astype(np.float64)

    def save(self, directory: Path) -> None:
        """Write ``values.parquet`` (features and ``__score__``) and ``sample.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        columns = {n: pa.array(self.values[:, j], pa.float32()) for j, n in enumerate(self.names)}
        columns[_SCORE_COLUMN] = pa.array(np.asarray(self.scores, np.float64), pa.float64())
        if self.products is not None:
            columns[_PRODUCT_COLUMN] = pa.array(np.asarray(self.products, np.int64), pa.int64())
        pq.write_table(pa.table(columns), directory / _VALUES, compression="zstd")
        meta = {"format": SAMPLE_FORMAT, "names": self.names, "categorical": self.categorical,
                "cutoff": int(self.cutoff), "n_customers": int(self.n_customers), "rows": int(len(self.scores)),
                "history_start": None if self.history_start is None else int(self.history_start)}  # fmt: skip
        (directory / _META).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path) -> FeatureSample:
        """Read a sample written by :meth:`save`; :class:`ArtifactError` if it is missing or damaged."""
        directory = Path(directory)
        meta_path, values_path = directory / _META, directory / _VALUES
        if not meta_path.is_file() or not values_path.is_file():
            raise ArtifactError(f"{directory} holds no feature sample ({_META} or {_VALUES} missing)", hint=_RETRAIN)
        try:
            meta = json.loads(meta_path.read_text())
            names, categorical = [str(n) for n in meta["names"]], [str(n) for n in meta["categorical"]]
            cutoff, n_customers, rows = int(meta["cutoff"]), int(meta["n_customers"]), int(meta["rows"])
            fmt, start = meta["format"], (None if meta.get("history_start") is None else int(meta["history_start"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{meta_path} is damaged: {exc}", hint=_RETRAIN) from None
        if fmt != SAMPLE_FORMAT:
            raise ArtifactError(f"feature sample format {fmt} is not supported (expected {SAMPLE_FORMAT})",
                                hint=_RETRAIN)  # fmt: skip
        try:
            table = pq.read_table(values_path)
        except (pa.ArrowException, OSError) as exc:
            raise ArtifactError(f"{values_path} is damaged: {exc}", hint=_RETRAIN) from None
        missing = [n for n in [*names, _SCORE_COLUMN] if n not in table.column_names]
        if missing or table.num_rows != rows:
            raise ArtifactError(f"{values_path} does not match {_META} (missing columns {missing[:5]}, "
                                f"{table.num_rows} rows, expected {rows})", hint=_RETRAIN)  # fmt: skip
        values = np.empty((rows, len(names)), dtype=np.float32)
        for j, n in enumerate(names):
            values[:, j] = table.column(n).to_numpy(zero_copy_only=False)
        scores = table.column(_SCORE_COLUMN).to_numpy(zero_copy_only=False).astype(np.float64)
        products = None
        if _PRODUCT_COLUMN in table.column_names:
            products = table.column(_PRODUCT_COLUMN).to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(names, values, categorical, scores, cutoff, n_customers, products, start)


def load_reference(model_dir: Path) -> FeatureSample:
    """The training reference of a model bundle (``<model_dir>/reference``).

    Raises
    ------
    ArtifactError
        The bundle predates drift monitoring, or its reference is damaged.
    """
    directory = Path(model_dir) / REFERENCE_DIR
    if not directory.is_dir():
        raise ArtifactError(f"model bundle {model_dir} has no drift reference (trained before drift monitoring)",
                            hint=_RETRAIN)  # fmt: skip
    return FeatureSample.load(directory)


def sample_customers(ds: Dataset, cutoff: int, n_users: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of up to ``n_users`` customers known at ``cutoff``, chosen by a seeded hash of their id.

    A customer whose ``signup_date`` is at or after the cutoff did not exist yet and is left out. The
    hash makes the choice depend on the ids, not on row order or on the other customers, so two datasets
    that share customers mostly share the sample.
    """
    users = ds.users
    known = np.ones(len(users), dtype=bool)
    if "signup_date" in users.columns:
        signup = users["signup_date"].to_numpy(dtype=np.float64)
        known = np.isnan(signup) | (signup < cutoff)
    rows = np.flatnonzero(known)
    if len(rows) <= n_users:
        return rows
    key = hashlib.sha256(f"finrec-drift-{seed}".encode()).hexdigest()[:16]  # pandas wants a 16-byte key
    h = pd.util.hash_array(users["user_id"].astype(str).to_numpy(dtype=object)[rows], hash_key=key)
    pick = np.argsort(h, kind="stable")[:n_users]
    return np.sort(rows[pick])


def served_rows(rec: Recommendations) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranker rows, ranker scores and product rows of the served products in ``rec`` (by customer, in served order).

    They come from :meth:`TwoStageModel.recommend` itself: the one feature assembly, not a copy of it.
    """
    served = rec.items >= 0
    assert rec.features is not None and rec.model_scores is not None
    return rec.features, np.asarray(rec.model_scores, dtype=np.float64), rec.items[served]


def sample_features(
    model: TwoStageModel, ds: Dataset, settings: FinrecSettings, cutoff: int, n_users: int, seed: int = 0,
    k: int = 10, block: int = 1000,
) -> FeatureSample:  # fmt: skip
    """Ranker rows of the top-``k`` products served to a seeded sample of customers at ``cutoff``.

    Parameters
    ----------
    model
        The trained model.
    ds
        The dataset whose customers, products and events define the features.
    settings
        Supplies the rules and the protected attributes (as for training and serving).
    cutoff
        Unix seconds; features use events strictly before it.
    n_users
        Customers to sample (all when fewer exist at the cutoff).
    seed
        Seed of the customer sample.
    k
        Served products per customer.
    block
        Customers scored at once (bounds memory; no loop over single customers).
    """
    builder = FeatureBuilder(ds, settings.protected_attributes)
    snap = builder.snapshot(cutoff)
    history = builder.history(cutoff, model.config.history_length)
    rules = rules_for(ds, settings)
    users = sample_customers(ds, cutoff, n_users, seed)
    names, categorical = model.space.tabular_names(model.pair_columns)
    values, scores = [np.zeros((0, len(names)), np.float32)], [np.zeros(0)]
    products = [np.zeros(0, np.int64)]
    for start in range(0, len(users), block):
        bu = users[start : start + block]
        allowed = allowed_mask(rules, snap, bu, ds.n_products)
        rec = model.recommend(builder, snap, bu, allowed, k, history)
        if not (rec.items >= 0).any():
            continue
        X, s, items = served_rows(rec)
        values.append(X.astype(np.float32))
        scores.append(s)
        products.append(items.astype(np.int64))
    first = int(ds.events.ts[0]) if len(ds.events) else None
    return FeatureSample(names, np.vstack(values), categorical, np.concatenate(scores), int(cutoff), len(users),
                         np.concatenate(products), first)  # fmt: skip
