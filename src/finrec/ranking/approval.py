"""Approval odds: the probability that an application would be approved, P(approve | apply).

A declined application costs the customer a hard credit inquiry, so finrec
estimates, for each (customer, product) candidate, how likely an application is
to succeed. The number is a ranker feature, is shown to customers, and demotes
products below a threshold, so it must be a *calibrated* probability, not just a
good ordering.

The model is a LightGBM binary classifier trained on past applications
(approve=1, decline=0), followed by an isotonic calibration map:

1. the last ``calibration_fraction`` of the rows (by ``time_order`` when given,
   else a seeded random subset) is held out; LightGBM trains on the rest and
   stops early on the held-out log loss;
2. an isotonic regression from the raw score to the outcome is fitted on the
   held-out rows and kept as two arrays (thresholds ``x -> y``), applied with
   linear interpolation and clipped at both ends;
3. :func:`calibration_report` describes raw and calibrated predictions on the
   held-out rows (``report_``).

With too few applications, or only one outcome, the model does not fail: it
predicts the smoothed base rate ``(approved + 1) / (n + 2)`` for everyone and
says why in ``fallback_reason_``.

Artifacts hold no pickle: the booster is LightGBM's text format and everything
else is JSON.

Missing values are ``NaN`` and are handled natively by LightGBM. Categorical
features must be coded as non-negative integers (stored as floats); LightGBM
treats negative codes as missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from finrec.errors import ArtifactError
from finrec.ranking.lightgbm_calls import predict

if TYPE_CHECKING:  # pragma: no cover
    import lightgbm as lgb
    from matplotlib.figure import Figure

__all__ = ["ApprovalConfig", "ApprovalModel", "calibration_report", "reliability_figure"]

#: File names inside a saved model folder.
META_FILE = "approval.json"
BOOSTER_FILE = "approval_booster.txt"
#: Bumped when the saved layout changes incompatibly.
FORMAT_VERSION = 1
_KIND = "finrec.approval"
#: Probabilities are clipped to [eps, 1 - eps] inside the log loss only.
_LOGLOSS_EPS = 1e-15


# --------------------------------------------------------------------------- config


#: Highest approval odds the calibrated model reports.
MAX_ODDS = 0.99


@dataclass
class ApprovalConfig:
    """Hyper-parameters of :class:`ApprovalModel`; plain values only, so it is JSON as-is.

    ``n_estimators`` is the maximum number of boosting rounds; early stopping
    (``early_stopping_rounds`` without improvement of the held-out log loss)
    usually ends training sooner. ``num_threads`` is LightGBM's thread count.
    """

    num_leaves: int = 15
    learning_rate: float = 0.05
    n_estimators: int = 400
    min_child_samples: int = 20
    early_stopping_rounds: int = 30
    calibration: Literal["isotonic", "none"] = "isotonic"
    calibration_fraction: float = 0.25
    min_applications: int = 50
    seed: int = 0
    num_threads: int = 2

    def __post_init__(self) -> None:
        problems = []
        if self.num_leaves < 2:
            problems.append(f"num_leaves must be >= 2, got {self.num_leaves}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.n_estimators < 1:
            problems.append(f"n_estimators must be >= 1, got {self.n_estimators}")
        if self.min_child_samples < 1:
            problems.append(f"min_child_samples must be >= 1, got {self.min_child_samples}")
        if self.early_stopping_rounds < 1:
            problems.append(f"early_stopping_rounds must be >= 1, got {self.early_stopping_rounds}")
        if self.calibration not in ("isotonic", "none"):
            problems.append(f"calibration must be 'isotonic' or 'none', got {self.calibration!r}")
        if not 0.0 < self.calibration_fraction < 1.0:
            problems.append(f"calibration_fraction must be strictly between 0 and 1, got {self.calibration_fraction}")
        if self.min_applications < 0:
            problems.append(f"min_applications must be >= 0, got {self.min_applications}")
        if self.num_threads < 1:
            problems.append(f"num_threads must be >= 1, got {self.num_threads}")
        if problems:
            raise ValueError("invalid ApprovalConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApprovalConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error (a typo should not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ApprovalConfig keys: {unknown}; known keys: {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------- calibration report


def _brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2))


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    q = np.clip(p, _LOGLOSS_EPS, 1.0 - _LOGLOSS_EPS)
    return float(-np.mean(y * np.log(q) + (1.0 - y) * np.log1p(-q)))


def calibration_report(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Calibration and discrimination of probabilities ``p`` against outcomes ``y`` (0/1).

    Returns a JSON-ready dict (Python floats and ints only):

    ``n``, ``base_rate`` (mean of ``y``), ``mean_prediction``, ``brier``,
    ``log_loss`` (``p`` clipped to ``[1e-15, 1 - 1e-15]``), ``auc`` (ROC AUC, or
    ``None`` when ``y`` has a single class), ``ece``, ``binning``, ``n_bins``
    and ``bins``.

    ECE (expected calibration error) uses **equal-frequency** bins: the rows are
    sorted by ``p`` (stable sort, so tied predictions keep their input order)
    and cut into ``min(n_bins, n)`` contiguous groups of (nearly) equal size;
    ``ece = sum(count / n * |y_rate - p_mean|)`` over the groups. Equal-frequency
    bins keep every bin populated when predictions crowd near 0 or 1, which
    equal-width bins do not. ``bins`` lists ``{"p_mean", "y_rate", "count"}`` per
    group, in increasing ``p_mean``, for a reliability diagram.

    >>> r = calibration_report(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), n_bins=2)
    >>> r["auc"], r["bins"][0]["count"], round(r["ece"], 3)
    (1.0, 2, 0.15)
    """
    y_arr = np.asarray(y, dtype=float).ravel()
    p_arr = np.asarray(p, dtype=float).ravel()
    if y_arr.shape != p_arr.shape:
        raise ValueError(f"y and p must have the same length, got {y_arr.size} and {p_arr.size}")
    if y_arr.size == 0:
        raise ValueError("calibration_report needs at least one row")
    if not np.isin(y_arr, (0.0, 1.0)).all():
        raise ValueError("y must contain only 0 (decline) and 1 (approve)")
    if not np.isfinite(p_arr).all() or p_arr.min() < 0.0 or p_arr.max() > 1.0:
        raise ValueError("p must contain finite probabilities in [0, 1]")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")

    n = int(y_arr.size)
    order = np.argsort(p_arr, kind="stable")
    bins: list[dict[str, Any]] = []
    ece = 0.0
    for idx in np.array_split(order, min(n_bins, n)):
        p_mean = float(p_arr[idx].mean())
        y_rate = float(y_arr[idx].mean())
        bins.append({"p_mean": p_mean, "y_rate": y_rate, "count": int(idx.size)})
        ece += idx.size / n * abs(y_rate - p_mean)

    auc: float | None = None
    if 0.0 < y_arr.mean() < 1.0:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(y_arr, p_arr))

    return {
        "n": n,
        "base_rate": float(y_arr.mean()),
        "mean_prediction": float(p_arr.mean()),
        "brier": _brier(y_arr, p_arr),
        "log_loss": _log_loss(y_arr, p_arr),
        "auc": auc,
        "ece": float(ece),
        "binning": "equal_frequency",
        "n_bins": len(bins),
        "bins": bins,
    }


# --------------------------------------------------------------------------- model


def _as_labels(y: Any, n: int) -> np.ndarray:
    y_arr = np.asarray(y)
    if y_arr.ndim != 1:
        raise ValueError(f"y must be one-dimensional (n,), got shape {y_arr.shape}")
    if y_arr.shape[0] != n:
        raise ValueError(f"X has {n} rows but y has {y_arr.shape[0]}; they must match")
    try:
        y_float = y_arr.astype(float)
    except (TypeError, ValueError):
        raise ValueError(f"y must hold 0/1 labels (1 = approved), got dtype {y_arr.dtype}") from None
    bad = ~np.isin(y_float, (0.0, 1.0))
    if bad.any():
        examples = sorted({str(v) for v in y_arr[bad][:5].tolist()})
        raise ValueError(
            f"y must hold only 0 (declined) and 1 (approved); {int(bad.sum())} labels are not, e.g. {examples}"
        )
    return y_float


def _as_matrix(X: Any) -> np.ndarray:
    try:
        X_arr = np.asarray(X, dtype=float)
    except (TypeError, ValueError):
        raise ValueError("X must be a numeric matrix (n_rows, n_features); use NaN for missing values") from None
    if X_arr.ndim != 2:
        raise ValueError(f"X must be two-dimensional (n_rows, n_features), got shape {X_arr.shape}")
    return X_arr


class ApprovalModel:
    """Calibrated approval odds, P(approve | apply), for (customer, product) feature rows.

    sklearn-style: the constructor only stores the config, :meth:`fit` returns
    ``self``, learned state ends with ``_``:

    ``feature_names_``, ``categorical_``
        the training columns, in order; prediction requires the same columns.
    ``booster_``
        the LightGBM booster, truncated to its best iteration (``None`` in fallback).
    ``best_iteration_``
        the number of boosting rounds kept (0 in fallback).
    ``calibration_x_``, ``calibration_y_``
        the isotonic map (raw score thresholds -> probability), or ``None``
        when predictions are not recalibrated.
    ``base_rate_``
        the smoothed training approval rate ``(approved + 1) / (n + 2)``.
    ``fallback_reason_``
        ``None`` for a trained model; otherwise why the model predicts the
        constant ``base_rate_``.
    ``report_``
        how the model was fitted and how well it is calibrated (JSON-ready).
    """

    def __init__(self, config: ApprovalConfig | None = None) -> None:
        self.config = config if config is not None else ApprovalConfig()

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        feature_names: Sequence[str],
        categorical: Sequence[str] = (),
        time_order: np.ndarray | None = None,
    ) -> ApprovalModel:
        """Train on past applications: ``X`` (n, d) features, ``y`` (n,) 1 = approved, 0 = declined.

        ``categorical`` names the columns of ``feature_names`` that hold
        integer category codes. With ``time_order`` (n,) (timestamps or any
        sortable key) the most recent rows are held out for early stopping and
        calibration, which mimics deployment; without it the held-out rows are
        a random subset drawn with ``config.seed``.
        """
        cfg = self.config
        X_arr = _as_matrix(X)
        n, d = X_arr.shape
        names = [str(f) for f in feature_names]
        if len(names) != d:
            raise ValueError(f"X has {d} columns but {len(names)} feature names were given: {names}")
        if len(set(names)) != len(names):
            dupes = sorted({f for f in names if names.count(f) > 1})
            raise ValueError(f"feature names must be unique; repeated: {dupes}")
        cats = [str(c) for c in categorical]
        unknown = [c for c in cats if c not in names]
        if unknown:
            raise ValueError(f"categorical features {unknown} are not among the feature names {names}")
        y_arr = _as_labels(y, n)
        order_arr: np.ndarray | None = None
        if time_order is not None:
            order_arr = np.asarray(time_order)
            if order_arr.shape != (n,):
                raise ValueError(f"time_order must have shape ({n},) like y, got {order_arr.shape}")

        self.feature_names_ = names
        self.categorical_ = cats
        self.base_rate_ = float((y_arr.sum() + 1.0) / (n + 2.0))
        self.booster_: lgb.Booster | None = None
        self.best_iteration_ = 0
        self.calibration_x_: np.ndarray | None = None
        self.calibration_y_: np.ndarray | None = None
        self.fallback_reason_: str | None = None

        n_approved = int(y_arr.sum())
        if n < cfg.min_applications:
            return self._fall_back(f"only {n} applications, fewer than min_applications={cfg.min_applications}", y_arr)
        if n_approved in (0, n):
            outcome = "approved" if n_approved == n else "declined"
            return self._fall_back(f"all {n} applications were {outcome}: a single outcome class", y_arr)

        n_cal = min(n - 1, max(1, int(round(cfg.calibration_fraction * n))))
        if order_arr is not None:
            perm = np.argsort(order_arr, kind="stable")
            split = "time_order"
        else:
            perm = np.random.default_rng(cfg.seed).permutation(n)
            split = "random"
        train_idx, cal_idx = np.sort(perm[: n - n_cal]), np.sort(perm[n - n_cal :])
        y_tr, y_cal = y_arr[train_idx], y_arr[cal_idx]
        if y_tr.min() == y_tr.max():
            return self._fall_back(
                f"the training split ({train_idx.size} rows, held-out split by {split}) has a single outcome class",
                y_arr,
            )

        self.booster_ = self._train_booster(X_arr[train_idx], y_tr, X_arr[cal_idx], y_cal)
        raw_cal = self._raw(X_arr[cal_idx])

        calibration: str = cfg.calibration
        if calibration == "isotonic" and y_cal.min() == y_cal.max():
            calibration = "none (skipped: the calibration split has a single outcome class)"
        elif calibration == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            # No lender can promise approval: a calibrated 1.0 would show customers "100%". Bounded below 1;
            # 0 stays possible (a hard rule fails) but such products are removed by the guardrails anyway.
            iso = IsotonicRegression(y_min=0.0, y_max=MAX_ODDS, increasing=True, out_of_bounds="clip")
            iso.fit(raw_cal, y_cal)
            self.calibration_x_ = np.asarray(iso.X_thresholds_, dtype=float)
            self.calibration_y_ = np.asarray(iso.y_thresholds_, dtype=float)

        self.report_: dict[str, Any] = {
            "fallback_reason": None,
            "n_applications": n,
            "n_train": int(train_idx.size),
            "n_calibration": int(cal_idx.size),
            "split": split,
            "best_iteration": self.best_iteration_,
            "calibration": calibration,
            # Early stopping and the isotonic map both used the calibration split,
            # so "calibrated" there is in-sample and somewhat optimistic.
            "evaluated_on": "calibration split",
            "raw": calibration_report(y_cal, raw_cal),
            "calibrated": calibration_report(y_cal, self._calibrate(raw_cal))
            if self.calibration_x_ is not None
            else None,
        }
        return self

    def _fall_back(self, reason: str, y: np.ndarray) -> ApprovalModel:
        self.fallback_reason_ = reason
        n = int(y.size)
        self.report_ = {
            "fallback_reason": reason,
            "constant_prediction": self.base_rate_,
            "n_applications": n,
            "n_train": n,
            "n_calibration": 0,
            "split": None,
            "best_iteration": 0,
            "calibration": "none (constant fallback model)",
            "evaluated_on": "training data",
            "raw": calibration_report(y, np.full(n, self.base_rate_)) if n else None,
            "calibrated": None,
        }
        return self

    def _train_booster(self, X_tr: np.ndarray, y_tr: np.ndarray, X_cal: np.ndarray, y_cal: np.ndarray) -> lgb.Booster:
        import lightgbm as lgb

        cfg = self.config
        params = {
            "objective": "binary",
            "metric": "binary_logloss",
            "num_leaves": cfg.num_leaves,
            "learning_rate": cfg.learning_rate,
            "min_data_in_leaf": cfg.min_child_samples,
            "seed": cfg.seed,
            "deterministic": True,
            "force_col_wise": True,
            "num_threads": cfg.num_threads,
            "verbosity": -1,
        }
        cat: list[str] | Literal["auto"] = self.categorical_ if self.categorical_ else "auto"
        train_set = lgb.Dataset(X_tr, label=y_tr, feature_name=self.feature_names_, categorical_feature=cat)
        valid_set = lgb.Dataset(X_cal, label=y_cal, reference=train_set)
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=cfg.n_estimators,
            valid_sets=[valid_set],
            valid_names=["calibration"],
            callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)],
        )
        best = int(booster.best_iteration) or booster.current_iteration()
        self.best_iteration_ = best
        # Keep only the trees that are used, via the text format, so the in-memory
        # booster is exactly what save/load round-trips.
        return lgb.Booster(model_str=booster.model_to_string(num_iteration=best))

    # ------------------------------------------------------------------ predict

    def _check_fitted(self) -> None:
        if not hasattr(self, "feature_names_"):
            raise RuntimeError("ApprovalModel is not fitted: call fit() or ApprovalModel.load() first")

    def _check_X(self, X: Any) -> np.ndarray:
        self._check_fitted()
        columns = getattr(X, "columns", None)
        if columns is not None and [str(c) for c in columns] != self.feature_names_:
            raise ValueError(
                f"X has columns {[str(c) for c in columns]} but the model expects, in this order: {self.feature_names_}"
            )
        X_arr = _as_matrix(X)
        if X_arr.shape[1] != len(self.feature_names_):
            raise ValueError(
                f"X has {X_arr.shape[1]} features but the model expects {len(self.feature_names_)}, "
                f"in this order: {self.feature_names_}"
            )
        return X_arr

    def _raw(self, X: np.ndarray) -> np.ndarray:
        if self.booster_ is None:
            return np.full(X.shape[0], self.base_rate_)
        if X.shape[0] == 0:
            return np.zeros(0)
        return predict(self.booster_, X, num_threads=self.config.num_threads).astype(float, copy=False)

    def _calibrate(self, raw: np.ndarray) -> np.ndarray:
        if self.calibration_x_ is None or self.calibration_y_ is None:
            return raw
        return np.interp(raw, self.calibration_x_, self.calibration_y_)

    def predict_proba(self, X: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """P(approve | apply) per row of ``X`` (n, d), shape (n,), in [0, 1].

        ``calibrated=False`` returns LightGBM's raw probability (for diagnostics);
        the fallback model returns its constant either way.
        """
        X_arr = self._check_X(X)
        raw = self._raw(X_arr)
        p = self._calibrate(raw) if calibrated else raw
        return np.clip(p, 0.0, 1.0)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path) -> Path:
        """Write the model to ``directory`` (created if needed): ``approval.json`` plus the booster as text.

        Each file is written to a temporary name and renamed into place; the
        JSON (written last) records the booster's sha256, so a mismatched or
        damaged booster file is detected on load.
        """
        self._check_fitted()
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        booster_sha: str | None = None
        if self.booster_ is not None:
            text = self.booster_.model_to_string()
            booster_sha = hashlib.sha256(text.encode()).hexdigest()
            _write_atomic(folder / BOOSTER_FILE, text)
        meta = {
            "kind": _KIND,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "feature_names": self.feature_names_,
            "categorical": self.categorical_,
            "base_rate": self.base_rate_,
            "fallback_reason": self.fallback_reason_,
            "best_iteration": self.best_iteration_,
            "booster_file": BOOSTER_FILE if self.booster_ is not None else None,
            "booster_sha256": booster_sha,
            "calibration": (
                None
                if self.calibration_x_ is None or self.calibration_y_ is None
                else {"x": self.calibration_x_.tolist(), "y": self.calibration_y_.tolist()}
            ),
            "report": self.report_,
        }
        _write_atomic(folder / META_FILE, json.dumps(meta, indent=1, allow_nan=False))
        return folder

    @classmethod
    def load(cls, directory: Path) -> ApprovalModel:
        """Read a model written by :meth:`save`; raises :class:`~finrec.errors.ArtifactError` if unusable."""
        folder = Path(directory)
        hint = "re-train the approval model (it is saved by ApprovalModel.save) or point at the right folder"
        if not folder.is_dir():
            raise ArtifactError(f"approval model folder {folder} does not exist", hint=hint)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise ArtifactError(f"{folder} has no {META_FILE}: not an approval model", hint=hint)
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{meta_path} is not valid JSON ({exc})", hint=hint) from None
        if not isinstance(meta, dict) or meta.get("kind") != _KIND:
            raise ArtifactError(f"{meta_path} does not describe an approval model", hint=hint)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{meta_path} has format_version {meta.get('format_version')!r}; this finrec reads {FORMAT_VERSION}",
                hint=hint,
            )
        try:
            model = cls(ApprovalConfig.from_dict(meta["config"]))
            model.feature_names_ = [str(f) for f in meta["feature_names"]]
            model.categorical_ = [str(c) for c in meta["categorical"]]
            model.base_rate_ = float(meta["base_rate"])
            model.fallback_reason_ = meta["fallback_reason"]
            model.best_iteration_ = int(meta["best_iteration"])
            model.report_ = meta["report"]
            calib = meta["calibration"]
            model.calibration_x_ = None if calib is None else np.asarray(calib["x"], dtype=float)
            model.calibration_y_ = None if calib is None else np.asarray(calib["y"], dtype=float)
            booster_file = meta["booster_file"]
            booster_sha = meta["booster_sha256"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{meta_path} is incomplete or malformed ({type(exc).__name__}: {exc})", hint=hint
            ) from None
        if model.calibration_x_ is not None and (
            model.calibration_y_ is None
            or model.calibration_x_.shape != model.calibration_y_.shape
            or model.calibration_x_.ndim != 1
            or model.calibration_x_.size == 0
        ):
            raise ArtifactError(f"{meta_path} has a malformed calibration map", hint=hint)

        model.booster_ = None
        if booster_file is not None:
            model.booster_ = _load_booster(folder / str(booster_file), booster_sha, len(model.feature_names_), hint)
        elif model.fallback_reason_ is None:
            raise ArtifactError(f"{meta_path} names no booster file but is not a fallback model", hint=hint)
        return model


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_booster(path: Path, sha256: Any, n_features: int, hint: str) -> lgb.Booster:
    import lightgbm as lgb

    if not path.is_file():
        raise ArtifactError(f"approval booster file {path} is missing", hint=hint)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"cannot read approval booster {path} ({exc})", hint=hint) from None
    if sha256 is not None and hashlib.sha256(text.encode()).hexdigest() != sha256:
        raise ArtifactError(
            f"{path} does not match the checksum recorded in {META_FILE}: corrupt or replaced", hint=hint
        )
    try:
        booster = lgb.Booster(model_str=text)
    except Exception as exc:  # LightGBMError or anything the parser raises
        raise ArtifactError(f"{path} is not a valid LightGBM model ({exc})", hint=hint) from None
    if booster.num_feature() != n_features:
        raise ArtifactError(
            f"{path} has {booster.num_feature()} features but {META_FILE} lists {n_features}", hint=hint
        )
    return booster


# --------------------------------------------------------------------------- figure


def reliability_figure(report_raw: dict[str, Any], report_cal: dict[str, Any] | None = None) -> Figure:
    """Reliability diagram from :func:`calibration_report` output: raw and (optionally) calibrated.

    Each bin is a point at (mean prediction, observed approval rate) with area
    proportional to its row count; the dashed diagonal is perfect calibration.
    Brier and ECE are in the legend. Draws on the Agg canvas without touching
    pyplot's global state, so it is safe in servers and tests.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", linewidth=1, label="perfect calibration")

    series = [("raw", report_raw, "tab:orange", "o")]
    if report_cal is not None:
        series.append(("calibrated", report_cal, "tab:blue", "s"))
    max_count = max((b["count"] for _, rep, _, _ in series for b in rep["bins"]), default=1) or 1
    for label, rep, color, marker in series:
        px = [b["p_mean"] for b in rep["bins"]]
        py = [b["y_rate"] for b in rep["bins"]]
        sizes = [20.0 + 180.0 * b["count"] / max_count for b in rep["bins"]]
        ax.plot(px, py, color=color, linewidth=1, alpha=0.8)
        ax.scatter(
            px,
            py,
            s=sizes,
            color=color,
            marker=marker,
            alpha=0.7,
            edgecolors="black",
            linewidths=0.5,
            label=f"{label}: Brier {rep['brier']:.4f}, ECE {rep['ece']:.4f}",
        )
    binning = str(report_raw.get("binning", "")).replace("_", "-")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted P(approve)")
    ax.set_ylabel("observed approval rate")
    ax.set_title(f"Approval odds reliability (n={report_raw.get('n')}, {binning} bins; marker area ~ count)")
    ax.title.set_fontsize(9)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
