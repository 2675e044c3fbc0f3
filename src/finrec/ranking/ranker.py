"""LightGBM lambdarank over retrieved candidates (LambdaMART).

Each query is one customer at one cutoff; its rows are that customer's
candidates, labelled with graded relevance from the funnel (by default
approve/hold 4 > apply 3 > click 2 > view 1 > shown and ignored, or not shown, 0).
Queries must be contiguous: :meth:`Ranker.fit` sorts rows by query and derives
the group sizes itself, so callers cannot get the grouping wrong. Early
stopping watches NDCG@10 on held-out queries. The model is saved as LightGBM's
text format plus a JSON sidecar; no pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightgbm as lgb
import numpy as np

from finrec.errors import ArtifactError
from finrec.ranking.attribution import PathAttribution
from finrec.ranking.lightgbm_calls import predict

#: Fewer rows than this are predicted on one thread (an answer's k rows; see :meth:`Ranker.leaves`).
_ROWS_PER_THREAD = 64


@dataclass
class RankerConfig:
    # Small, heavily populated leaves and patient early stopping: funnel labels are sparse and noisy (a few
    # percent of shown rows are clicked). Measured on the default world at 20k customers against 31 leaves /
    # 20 rows / patience 50: +0.002 to +0.004 NDCG@10 on the held-out window (docs/benchmarks.md). A rate of 0.1
    # instead of 0.05 scored the same (0.0501 vs 0.0499 at 20k) with 117 trees instead of 169: half the
    # training and the request path's tree walks.
    num_leaves: int = 7
    learning_rate: float = 0.1
    n_estimators: int = 1000
    min_child_samples: int = 100
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    early_stopping_rounds: int = 100
    eval_at: int = 10
    validation_fraction: float = 0.15
    seed: int = 0
    num_threads: int = 2


@dataclass
class Ranker:
    """A lambdarank model. ``fit`` learns ``booster_``; ``predict`` scores rows."""

    config: RankerConfig = field(default_factory=RankerConfig)

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        query: np.ndarray,
        feature_names: list[str],
        categorical: list[str] | None = None,
        position: np.ndarray | None = None,
    ) -> Ranker:
        """Train on rows ``X`` with integer grades ``y``; ``query`` is the query id of each row.

        ``position`` (1-based slot each row was shown in, 0 unknown) turns on LightGBM's
        unbiased lambdarank, which learns and removes the position bias of the logged labels.
        """
        if X.ndim != 2 or X.shape[1] != len(feature_names):
            raise ValueError(f"X has shape {X.shape}, expected (n, {len(feature_names)}) for the given feature names")
        if not (len(X) == len(y) == len(query)):
            raise ValueError("X, y and query must have the same number of rows")
        cfg = self.config
        if len(query) and np.all(query[1:] >= query[:-1]):  # already grouped: no copy of X (it is the big one)
            y, pos = y.astype(np.int32), None if position is None else np.asarray(position, dtype=np.int32)
        else:
            order = np.argsort(query, kind="stable")
            X, y, query = X[order], y[order].astype(np.int32), query[order]
            pos = None if position is None else np.asarray(position, dtype=np.int32)[order]
        uq, starts = np.unique(query, return_index=True)
        sizes = np.diff(np.r_[starts, len(query)])
        rng = np.random.default_rng(cfg.seed)
        is_val_q = rng.random(len(uq)) < cfg.validation_fraction
        if cfg.validation_fraction <= 0:  # a refit with a fixed number of trees: every query trains
            is_val_q[:] = False
        elif is_val_q.all() or not is_val_q.any():
            is_val_q[:] = False
            is_val_q[: max(1, len(uq) // 7)] = len(uq) > 1
        row_val = np.repeat(is_val_q, sizes)
        params = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [cfg.eval_at],
            "num_leaves": cfg.num_leaves,
            "learning_rate": cfg.learning_rate,
            "min_data_in_leaf": cfg.min_child_samples,
            "feature_fraction": cfg.feature_fraction,
            "bagging_fraction": cfg.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": cfg.lambda_l2,
            "label_gain": [float(2**g - 1) for g in range(max(int(y.max()) + 1, 2))],
            "seed": cfg.seed,
            "deterministic": True,
            "num_threads": cfg.num_threads,
            "verbosity": -1,
        }
        cats = [c for c in (categorical or []) if c in feature_names]
        train = lgb.Dataset(
            X[~row_val], y[~row_val], group=sizes[~is_val_q], feature_name=feature_names,
            categorical_feature=cats, free_raw_data=False, position=None if pos is None else pos[~row_val],
        )  # fmt: skip
        callbacks: list[Any] = [lgb.log_evaluation(0)]
        valid_sets = []
        if is_val_q.any():
            valid = lgb.Dataset(X[row_val], y[row_val], group=sizes[is_val_q], reference=train)  # unbiased metric
            valid_sets = [valid]
            callbacks.append(lgb.early_stopping(cfg.early_stopping_rounds, verbose=False))
        self.booster_ = lgb.train(params, train, cfg.n_estimators, valid_sets=valid_sets, callbacks=callbacks)
        self.feature_names_ = list(feature_names)
        self.categorical_ = cats
        best = self.booster_.best_score.get("valid_0", {}) if valid_sets else {}
        self.validation_ndcg_ = float(best.get(f"ndcg@{cfg.eval_at}", float("nan")))
        self.best_iteration_ = int(self.booster_.best_iteration or self.booster_.current_iteration())
        self.n_queries_ = int(len(uq))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        self._check(X)
        return predict(self.booster_, X, num_iteration=self.best_iteration_, num_threads=self.config.num_threads)

    def _path_attribution(self) -> PathAttribution:
        if not hasattr(self, "_paths"):
            self._paths = PathAttribution(self.booster_, self.best_iteration_)
        return self._paths

    def leaves(self, X: np.ndarray) -> np.ndarray:
        """The leaf each row reaches in each tree (LightGBM's ``pred_leaf``): what :meth:`contributions_from_leaves`
        explains. The API asks it only for the rows it returns, after :meth:`predict` has ranked every candidate.

        A few rows walk the trees on one thread: waking a second one costs more than the walk (measured)."""
        self._check(X)
        threads = 1 if len(X) < _ROWS_PER_THREAD else self.config.num_threads
        return predict(self.booster_, X, num_iteration=self.best_iteration_, pred_leaf=True, num_threads=threads)

    def contributions_from_leaves(self, leaves: np.ndarray, projection: np.ndarray | None = None) -> np.ndarray:
        """Path contributions (n, n_features + 1) of rows given their leaves (see :meth:`leaves`); with
        ``projection`` (n_features + 1, m), the (n, m) projected sums without the bias (e.g. per reason group)."""
        return self._path_attribution().from_leaves(leaves, projection)

    def contributions(self, X: np.ndarray, method: Literal["path", "shap"] = "path") -> np.ndarray:
        """(n, n_features + 1) per-feature contributions to each score (last column: bias); rows sum to the score.

        ``path``: attribution along each row's decision paths (:mod:`finrec.ranking.attribution`): LightGBM
        finds the leaves, a table built once per model gives each leaf's contributions; about 100x cheaper
        than ``shap`` (LightGBM's exact TreeSHAP).
        """
        self._check(X)
        if method == "path":
            return self.contributions_from_leaves(self.leaves(X))
        return predict(self.booster_, X, num_iteration=self.best_iteration_, pred_contrib=True,
                       num_threads=self.config.num_threads)  # fmt: skip

    def feature_importance(self) -> dict[str, float]:
        gain = self.booster_.feature_importance("gain", iteration=self.best_iteration_)
        return dict(sorted(zip(self.feature_names_, map(float, gain), strict=True), key=lambda kv: -kv[1]))

    def _check(self, X: np.ndarray) -> None:
        if not hasattr(self, "booster_"):
            raise RuntimeError("the ranker is not fitted")
        if X.ndim != 2 or X.shape[1] != len(self.feature_names_):
            raise ValueError(f"X has {X.shape[-1]} columns, the ranker expects {len(self.feature_names_)}")

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.booster_.save_model(str(directory / "ranker.txt"), num_iteration=self.best_iteration_)
        meta = {
            "config": asdict(self.config),
            "feature_names": self.feature_names_,
            "categorical": self.categorical_,
            "validation_ndcg": self.validation_ndcg_,
            "best_iteration": self.best_iteration_,
            "n_queries": self.n_queries_,
        }
        (directory / "ranker.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path) -> Ranker:
        try:
            meta: dict[str, Any] = json.loads((directory / "ranker.json").read_text())
            booster = lgb.Booster(model_file=str(directory / "ranker.txt"))
        except (OSError, ValueError, lgb.basic.LightGBMError) as exc:
            raise ArtifactError(
                f"cannot load the ranker from {directory}: {exc}", hint="retrain with `finrec train`"
            ) from None
        r = cls(RankerConfig(**meta["config"]))
        r.booster_ = booster
        r.feature_names_ = meta["feature_names"]
        r.categorical_ = meta["categorical"]
        r.validation_ndcg_ = meta["validation_ndcg"]
        r.best_iteration_ = booster.current_iteration()
        r.n_queries_ = meta["n_queries"]
        if booster.num_feature() != len(r.feature_names_):
            raise ArtifactError(
                f"ranker in {directory} has {booster.num_feature()} features, manifest says {len(r.feature_names_)}"
            )
        return r
