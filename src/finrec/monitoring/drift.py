"""Drift of what the model sees now against its training reference: PSI and KS per feature and for the score.

Two effect sizes, compared with configured thresholds (``[monitor]`` psi_threshold and ks_threshold):

* the population stability index (PSI) over bins of the reference distribution; it sees any change of
  shape, including a change in the share of missing values (NaN has a bin of its own), and works for
  categorical columns (one bin per category);
* the two-sample Kolmogorov-Smirnov statistic (the largest gap between the two empirical CDFs, 0..1) of
  the non-missing values; it sees a shift of location that falls inside a few PSI bins.

A feature drifts when its PSI or KS exceeds its threshold *and* the excess is more than chance. The KS
*statistic* is the measure, not its p-value: with tens of thousands of rows every p-value is tiny for
shifts far too small to matter, so "significant" alone would flag everything. But rows are not
independent: a customer fills up to k rows, and a product feature has one value per product however
many rows serve it. With 40 products its distribution is a few dozen atoms, and two samples months
apart differ by a KS of 0.1-0.4 through the products' own noise (a click rate from a few hundred
impressions). So each measure is also tested at the *effective* sample size of the units it varies
over (customers for ``user_*`` columns, the Kish effective number of served products for ``product_*``
ones, conservatively the smaller of the two for pair columns and the score), Bonferroni-corrected to a
family-wise level :data:`ALPHA`. With thousands of customers the test never binds and the thresholds
decide; for the product features of a small catalogue the test decides.

Some features are measured and reported but never alert, with the reason in ``excluded``:

* ``time-trending`` (:data:`TIME_TRENDING`): they change by construction as the clock moves, whatever
  customers do: ages (``tenure_days``, ``days_since_launch``), recencies (``days_since_*``, capped by
  the length of the log), and aggregates over the whole history, whose distribution depends on how long
  the log is: counts grow (a product's impressions, a pair's ``pair_seen``), and shares and rates
  sharpen as events accumulate (a customer's ``affinity_*`` share of engagement per category goes from
  0, 1/2 or 1 after a couple of clicks to its long-run value; a product's all-history click rate leaves
  its prior). So do windowed counts whose window is longer than the history either sample could see (a
  365-day count on 5 months of data). They would alert on every check without saying anything about
  customers; a large shift there is a reason to retrain on schedule, not an alarm. Fixed windows that
  both samples fill (``*_30d``, ``*_90d``), profiles, holdings and the model's outputs are compared.
* ``exposure`` (:data:`EXPOSURE`): impression and view counts measure what the bank showed, which
  follows its traffic (seasonal activity), its slate and its catalogue, and, once the model serves, the
  model's own recommendations (a feedback loop). What customers do with what they see (clicks,
  applications, category shares) is monitored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from finrec.config import FinrecSettings
from finrec.errors import FinrecError
from finrec.monitoring.reference import FeatureSample, load_reference, sample_features

DAY = 86_400
#: Proportions are floored at this value, so that a bin empty on one side gives a large but finite term.
EPSILON = 1e-4
#: Family-wise level of the chance tests of one check (Bonferroni over the features that can alert).
ALPHA = 0.05
#: Regular expressions (``re.search``) of features that move with the clock by construction.
TIME_TRENDING: tuple[str, ...] = (
    "days_since",
    "tenure_days",
    r"^product_(impressions|clicks|applications|approvals|ctr|apply_rate|approval_rate)$",  # all history
    r"^pair_(seen|clicked|applied|declined)$",
    r"^(user_affinity_.*|category_affinity)$",  # shares of all engaged events
)
#: Regular expressions of exposure counts: what the bank showed, not what customers did.
EXPOSURE: tuple[str, ...] = (r"^user_(impression|view)_\d+d$", r"^product_impressions_\d+d$")
SCORE = "score"
_WINDOW = re.compile(r"_(\d+)d$")


def _psi_counts(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """PSI of two count vectors over the same bins, and the number of bins either side occupies."""
    p, q = (np.maximum(c / max(float(c.sum()), 1.0), EPSILON) for c in (a, b))
    return float(np.sum((q - p) * np.log(q / p))), int(((a + b) > 0).sum())


def bin_edges(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Quantile edges of the non-missing reference values, each moved halfway to the next distinct value.

    An edge never sits on a value, so a value many rows share (a count of 0, a product's click rate) is
    never split between two bins, and a tiny move of such a value does not change its bin.
    """
    x = np.asarray(reference, dtype=np.float64)
    x = x[~np.isnan(x)]
    values = np.unique(x)
    if len(values) < 2:
        return np.zeros(0)
    # First distinct value above each quantile; the edge goes halfway between it and the one below.
    upper = np.searchsorted(values, np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]), side="right")
    upper = upper[(upper > 0) & (upper < len(values))]
    return np.unique((values[upper - 1] + values[upper]) / 2)


def _psi_numeric(ref: np.ndarray, cur: np.ndarray, bins: int) -> tuple[float, int]:
    edges = bin_edges(ref, bins)

    def counts(x: np.ndarray) -> np.ndarray:
        ok = ~np.isnan(x)
        c = np.bincount(np.searchsorted(edges, x[ok], side="right"), minlength=len(edges) + 1)
        return np.append(c, (~ok).sum()).astype(np.float64)

    return _psi_counts(counts(np.asarray(ref, np.float64)), counts(np.asarray(cur, np.float64)))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of a numeric feature.

    ``PSI = sum_i (q_i - p_i) * ln(q_i / p_i)``, ``p_i`` and ``q_i`` the reference's and the current
    sample's shares in bin ``i``: the reference's quantile bins (fewer when values repeat, see
    :func:`bin_edges`) plus one for NaN; shares are floored at :data:`EPSILON` so an empty bin gives a
    large, finite term. 0 is no change; < 0.1 is read as stable, > 0.2 as a significant shift. The terms
    are symmetric but the bins are the reference's, so swapping the samples changes the value slightly.

    Examples
    --------
    >>> x = np.arange(1000.0)
    >>> psi(x, x)
    0.0
    >>> psi(x, x + 500) > 0.2
    True
    """
    return _psi_numeric(reference, current, bins)[0]


def _psi_cat(reference: np.ndarray, current: np.ndarray) -> tuple[float, int]:
    ref, cur = np.asarray(reference, np.float64), np.asarray(current, np.float64)
    values, codes = np.unique(np.concatenate([ref, cur]), return_inverse=True)  # NaN sorts last, as one value
    n = len(values)
    return _psi_counts(np.bincount(codes[: len(ref)], minlength=n).astype(np.float64),
                       np.bincount(codes[len(ref) :], minlength=n).astype(np.float64))  # fmt: skip


def psi_categorical(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of a categorical feature (codes): one bin per value seen in either sample, NaN included.

    Examples
    --------
    >>> psi_categorical(np.array([0, 0, 1, 1]), np.array([1, 0, 1, 0]))
    0.0
    """
    return _psi_cat(reference, current)[0]


def ks(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value (``scipy.stats.ks_2samp``) of the non-missing values.

    A side with no values gives ``(0.0, 1.0)``: a change in the share of missing values is PSI's to see.
    """
    ref, cur = np.asarray(reference, np.float64), np.asarray(current, np.float64)
    ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    if not len(ref) or not len(cur):
        return 0.0, 1.0
    res = stats.ks_2samp(ref, cur)
    return float(res.statistic), float(res.pvalue)


@dataclass
class FeatureDrift:
    """Drift of one feature (or of the score).

    ``psi_pvalue`` and ``ks_pvalue`` are the chance of so large a PSI / KS without drift, at the effective
    size ``n_effective`` of the comparison (``n1 n2 / (n1 + n2)`` in independent units, see the module
    docstring), not at the row count. ``ks`` and ``ks_pvalue`` are NaN for
    categorical features (codes have no order). ``drifted``: counts as drift (a threshold exceeded beyond
    chance, and not excluded); ``excluded``: why the feature never alerts (``time-trending``, ``exposure``).
    """

    name: str
    psi: float
    ks: float
    ks_pvalue: float
    drifted: bool
    reference_mean: float
    current_mean: float
    missing_reference: float  # share of NaN
    missing_current: float
    psi_pvalue: float = float("nan")
    n_effective: float = float("nan")
    excluded: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class DriftReport:
    """Per-feature and score drift between a reference and a current sample; ``alert`` if anything drifted."""

    model_version: str | None
    reference_cutoff: int
    current_cutoff: int
    features: list[FeatureDrift]
    score: FeatureDrift
    psi_threshold: float
    ks_threshold: float
    drifted: list[str]
    alert: bool
    alpha: float = ALPHA

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("features", "score")}
        out["features"] = [f.to_dict() for f in self.features]
        out["score"] = self.score.to_dict()
        return out


def effective_products(products: np.ndarray | None) -> float:
    """Kish effective number of served products: ``(sum n_p)^2 / sum n_p^2`` (inf when unknown)."""
    if products is None or not len(products):
        return float("inf")
    n = np.unique(products, return_counts=True)[1].astype(np.float64)
    return float(n.sum() ** 2 / (n**2).sum())


def effective_size(name: str, sample: FeatureSample) -> float:
    """Independent units behind a column of ``sample``: customers, products, or the smaller for pair columns."""
    customers = float(sample.n_customers)
    if name.startswith("user_"):
        return customers
    products = min(effective_products(sample.products), float(len(sample.scores)))
    return products if name.startswith("product_") else 1.0 / (1.0 / customers + 1.0 / products)


def exclusion(name: str, reference: FeatureSample, current: FeatureSample, exclude: Iterable[str] = TIME_TRENDING,
              exposure: Iterable[str] = EXPOSURE) -> str | None:  # fmt: skip
    """Why ``name`` never alerts (``time-trending`` or ``exposure``), or ``None``."""
    if any(re.search(p, name) for p in exclude):
        return "time-trending"
    window = _WINDOW.search(name)
    seen = [s.cutoff - s.history_start for s in (reference, current) if s.history_start is not None]
    if window and seen and int(window.group(1)) * DAY > min(seen):
        return "time-trending"
    if any(re.search(p, name) for p in exposure):
        return "exposure"
    return None


def _measure(name: str, ref: np.ndarray, cur: np.ndarray, categorical: bool, n_ref: float, n_cur: float
             ) -> FeatureDrift:  # fmt: skip
    en = n_ref * n_cur / (n_ref + n_cur)  # effective size of the two-sample comparison
    if categorical:
        p, bins = _psi_cat(ref, cur)
        k, kp = float("nan"), float("nan")
    else:
        p, bins = _psi_numeric(ref, cur, 10)
        k = ks(ref, cur)[0]
        kp = float(stats.kstwobign.sf(k * np.sqrt(en)))
    # Two-sample chi-square: PSI * n1 n2 / (n1 + n2) is about chi2(bins - 1) without drift.
    pp = float(stats.chi2.sf(p * en, max(bins - 1, 1)))
    m_ref, m_cur = (float(np.nanmean(x)) if (~np.isnan(x)).any() else float("nan") for x in (ref, cur))
    na_ref, na_cur = (float(np.isnan(x).mean()) if len(x) else 0.0 for x in (ref, cur))
    return FeatureDrift(name, p, k, kp, False, m_ref, m_cur, na_ref, na_cur, pp, en)


def compare(
    reference: FeatureSample, current: FeatureSample, psi_threshold: float, ks_threshold: float,
    exclude: Iterable[str] = TIME_TRENDING, exposure: Iterable[str] = EXPOSURE, alpha: float = ALPHA,
    model_version: str | None = None,
) -> DriftReport:  # fmt: skip
    """Compare every feature and the score of two samples of the same model.

    Parameters
    ----------
    reference, current
        Samples with the same feature names (drawn with the same model).
    psi_threshold, ks_threshold
        Effect sizes above which a feature has drifted (if beyond chance).
    exclude, exposure
        Regular expressions of time-trending and exposure features: reported, never alerting.
    alpha
        Family-wise level of the chance tests, split (Bonferroni) over the columns that can alert.
    model_version
        Recorded in the report.
    """
    if reference.names != current.names:
        raise FinrecError("the two feature samples have different columns (drawn with different models?)",
                          hint="draw the current sample with the model the reference belongs to")  # fmt: skip
    exclude, exposure, cat = tuple(exclude), tuple(exposure), set(reference.categorical)
    features = []
    for j, name in enumerate(reference.names):
        f = _measure(name, reference.values[:, j].astype(np.float64), current.values[:, j].astype(np.float64),
                     name in cat, effective_size(name, reference), effective_size(name, current))  # fmt: skip
        f.excluded = exclusion(name, reference, current, exclude, exposure)
        features.append(f)
    score = _measure(SCORE, reference.scores, current.scores, False, effective_size(SCORE, reference),
                     effective_size(SCORE, current))  # fmt: skip
    level = alpha / (1 + sum(f.excluded is None for f in features))
    for f in [*features, score]:
        over_psi = f.psi > psi_threshold and f.psi_pvalue < level
        over_ks = bool(np.isfinite(f.ks)) and f.ks > ks_threshold and f.ks_pvalue < level
        f.drifted = f.excluded is None and (over_psi or over_ks)
    drifted = [f.name for f in [*features, score] if f.drifted]
    return DriftReport(model_version, int(reference.cutoff), int(current.cutoff), features, score, psi_threshold,
                       ks_threshold, drifted, bool(drifted), alpha)  # fmt: skip


def check_drift(model_dir: Path, data_dir: Path, settings: FinrecSettings, cutoff: int | None = None) -> DriftReport:
    """Drift of the model in ``model_dir`` on the dataset ``data_dir`` at ``cutoff`` (default: end of data + 1 s).

    The current sample is drawn as the training reference was (the bundle's sample size and seed) with
    today's rules, so only the data differs.

    Raises
    ------
    ArtifactError
        The bundle is damaged or predates drift monitoring (no reference).
    """
    from finrec.data.dataset import load_dataset
    from finrec.pipeline import load_model

    model, manifest = load_model(model_dir)
    reference = load_reference(model_dir)
    ds = load_dataset(data_dir, future_tolerance_seconds=settings.validation.future_tolerance_seconds)
    at = ds.time_range[1] + 1 if cutoff is None else int(cutoff)
    trained = manifest.get("config", {}).get("settings", {})
    n_users = int(trained.get("monitor", {}).get("drift_sample_users", settings.monitor.drift_sample_users))
    seed = int(trained.get("train", {}).get("seed", settings.train.seed))
    current = sample_features(model, ds, settings, cutoff=at, n_users=n_users, seed=seed)
    m = settings.monitor
    return compare(reference, current, m.psi_threshold, m.ks_threshold,
                   model_version=manifest.get("metrics", {}).get("model_version"))  # fmt: skip
