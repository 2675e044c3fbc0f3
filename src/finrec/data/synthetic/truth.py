"""Ground truth of the synthetic world: what each customer really wants.

The generator draws every event from this model, evaluation uses it for the
oracle ranking, and a simulation can replay customers against a live service.

Utility of product *p* for customer *u* (logit scale)::

    u = base[cat] + need[stage, cat] + season[cat, month] + drift[cat] (after the drift month)
      + quality[p] + brand[provider]                       # products differ within a category
      + w * <taste_u, taste_p> / sqrt(d)                   # latent taste (collaborative signal)
      - price_sens_u * apr_z[p] + yield_sens_u * apy_z[p] - fee_sens_u * fee_z[p]
      - risk penalty (risky categories: risk level above tolerance, squared)
      + affinity if provider is the customer's main bank
      + (held categories) @ COMP[:, cat]                   # complementarity; diagonal = saturation

Funnel, for a product shown at position k::

    P(view)                = k ** -position_bias
    P(click   | view)      = sigmoid(u + click_bias)
    P(approve | apply)     = 0 if not eligible, else ~0.985, or for credit products
                             sigmoid((credit - min_credit) / scale + bias + 0.5 log(income / min_income))
    P(apply   | click)     = sigmoid(apply_slope * u + apply_bias) * (floor + (1 - floor) * P(approve | apply))
                             (applicants self-select: who expects a decline applies less, not never)

The *true conversion propensity* is P(approve) for a product the customer looks at:
``P(click | view) * P(apply | click) * P(approve | apply)``. It is zero for a
product the customer is not eligible for.

Examples
--------
>>> import tempfile
>>> from finrec.data.synthetic.generate import WorldConfig, generate_world
>>> world = Path(tempfile.mkdtemp()) / "world"
>>> _ = generate_world(WorldConfig(users=50, products=12, months=1), world, progress=False)
>>> gt = GroundTruth.load(world / "ground_truth")
>>> p = gt.propensity(user_ids=[1, 1], product_ids=[3, 4])
>>> p.shape, bool(((p >= 0) & (p <= 1)).all())
((2,), True)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from finrec.data.synthetic import params as P
from finrec.errors import ArtifactError

#: Format written. 1 keeps every customer in ``users.parquet``; 2 may instead hold them in ``users/part-*.parquet``,
#: one file a block (both are read).
TRUTH_FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
USER_PARTS = "users"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class Coefficients:
    """Every number of the preference and funnel model; saved with the world."""

    category_base: list[float] = field(default_factory=lambda: P.CATEGORY_BASE.tolist())
    need: list[list[float]] = field(default_factory=lambda: P.NEED.tolist())
    comp: list[list[float]] = field(default_factory=lambda: P.COMP.tolist())
    season: list[list[float]] = field(default_factory=lambda: P.SEASON.tolist())
    drift_shift: list[float] = field(default_factory=lambda: P.DRIFT_SHIFT.tolist())
    latent_weight: float = P.LATENT_WEIGHT
    main_provider_affinity: float = P.MAIN_PROVIDER_AFFINITY
    risk_mismatch: float = P.RISK_MISMATCH
    risk_distance: float = P.RISK_DISTANCE
    position_bias: float = P.POSITION_BIAS
    click_bias: float = P.CLICK_BIAS
    apply_slope: float = P.APPLY_SLOPE
    apply_bias: float = P.APPLY_BIAS
    self_selection_floor: float = P.SELF_SELECTION_FLOOR
    approve_non_credit: float = P.APPROVE_NON_CREDIT
    credit_margin_scale: float = P.CREDIT_MARGIN_SCALE
    credit_approve_bias: float = P.CREDIT_APPROVE_BIAS
    is_credit: list[bool] = field(default_factory=lambda: P.IS_CREDIT.tolist())
    is_risky: list[bool] = field(default_factory=lambda: P.IS_RISKY.tolist())


@dataclass
class WorldInfo:
    """Calendar and drift of a generated world."""

    start: str  # ISO date of day 0
    months: int
    seed: int
    drift_month: int | None = None  # 1-based month from which the drift applies
    drift_strength: float = 0.0
    categories: list[str] = field(default_factory=lambda: list(P.CATEGORIES))
    regions: list[str] = field(default_factory=lambda: list(P.REGIONS))
    life_stages: list[str] = field(default_factory=lambda: list(P.LIFE_STAGES))
    provider_names: list[str] = field(default_factory=list)

    def month_of_year(self, month_index: int | np.ndarray) -> np.ndarray:
        """Calendar month (0-11) of a 0-based simulation month."""
        return (date.fromisoformat(self.start).month - 1 + np.asarray(month_index)) % 12


# Columns of the two truth tables (arrays kept in these dicts, row i = index i).
USER_COLUMNS = (
    "user_id", "age", "income", "credit_score", "risk_tolerance", "region", "stage",
    "price_sens", "yield_sens", "fee_sens", "activity", "consent", "main_provider",
)  # fmt: skip
PRODUCT_COLUMNS = (
    "product_id", "category", "provider", "brand", "quality", "apr_z", "apy_z", "fee_z", "risk_level",
    "min_credit_score", "min_income", "min_age", "max_age", "launch_day",
)  # fmt: skip


class GroundTruth:
    """The true preference and funnel model over a set of customers and the catalogue.

    Parameters
    ----------
    users, products
        Column name -> array (see ``USER_COLUMNS``, ``PRODUCT_COLUMNS``) plus
        ``latent`` (n, d) in both and ``region_ok`` (M, n_regions) in products.
    info, coef
        Calendar, drift and the model's coefficients.
    """

    def __init__(
        self, users: dict[str, np.ndarray], products: dict[str, np.ndarray], info: WorldInfo, coef: Coefficients
    ):
        self.users = users
        self.products = products
        self.info = info
        self.coef = coef
        self._need = np.asarray(coef.need)
        self._comp = np.asarray(coef.comp)
        self._season = np.asarray(coef.season)
        self._base = np.asarray(coef.category_base)
        self._drift = np.asarray(coef.drift_shift)
        self._is_credit = np.asarray(coef.is_credit)
        self._is_risky = np.asarray(coef.is_risky)
        self._user_pos = pd.Index(users["user_id"])
        self._product_pos = pd.Index(products["product_id"])

    # -- indexing ---------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return len(self.users["user_id"])

    @property
    def n_products(self) -> int:
        return len(self.products["product_id"])

    def user_index(self, user_ids: Any) -> np.ndarray:
        """Row positions of user ids; raises KeyError naming unknown ids."""
        return self._positions(self._user_pos, user_ids, "user")

    def product_index(self, product_ids: Any) -> np.ndarray:
        return self._positions(self._product_pos, product_ids, "product")

    @staticmethod
    def _positions(index: pd.Index, ids: Any, what: str) -> np.ndarray:
        pos = index.get_indexer(np.asarray(ids))
        if (pos < 0).any():
            missing = np.asarray(ids)[pos < 0][:5].tolist()
            raise KeyError(f"{what} ids not in the ground truth: {missing}")
        return pos

    # -- model --------------------------------------------------------------------------------
    def utility(
        self,
        u: np.ndarray,
        p: np.ndarray,
        held: np.ndarray | None = None,
        month: int | None = None,
        held_row: np.ndarray | None = None,
    ) -> np.ndarray:
        """Utility of pairs (``u[i]``, ``p[i]``) given by row position in the truth tables.

        ``held`` is a (k, n_categories) 0/1 matrix of what customers hold and
        ``held_row`` maps each pair to its row (default: row i for pair i).
        ``month`` is 0-based; ``None`` leaves out season and drift.
        """
        U, Pr, c = self.users, self.products, self.coef
        cat = Pr["category"][p]
        util = self._base[cat] + self._need[U["stage"][u], cat]
        if month is not None:
            shift = self._season[:, int(self.info.month_of_year(month))]
            if self.info.drift_month is not None and month >= self.info.drift_month - 1:
                shift = shift + self.info.drift_strength * self._drift
            util += shift[cat]
        if held is not None:
            rows = np.arange(len(u)) if held_row is None else held_row
            util += (held.astype(np.float64) @ self._comp)[rows, cat]
        util += Pr["quality"][p] + Pr["brand"][p]
        dot = np.einsum("ij,ij->i", U["latent"][u], Pr["latent"][p], dtype=np.float64)
        util += c.latent_weight * dot / np.sqrt(Pr["latent"].shape[1])
        util += -U["price_sens"][u] * Pr["apr_z"][p] + U["yield_sens"][u] * Pr["apy_z"][p]
        util -= U["fee_sens"][u] * Pr["fee_z"][p]
        gap = Pr["risk_level"][p].astype(np.float64) - U["risk_tolerance"][u]
        util -= (c.risk_mismatch * np.clip(gap, 0, None) ** 2 + c.risk_distance * np.abs(gap)) * self._is_risky[cat]
        util += c.main_provider_affinity * (U["main_provider"][u] == Pr["provider"][p])
        return util

    def eligible(self, u: np.ndarray, p: np.ndarray, day: int | np.ndarray | None = None) -> np.ndarray:
        """Whether each customer meets each product's rules (true attributes); ``day`` checks launch."""
        U, Pr = self.users, self.products
        age, inc, cs = U["age"][u], U["income"][u], U["credit_score"][u]
        ok = ~(age < Pr["min_age"][p]) & ~(age > Pr["max_age"][p])  # NaN rule compares False: no rule
        ok &= ~(inc < Pr["min_income"][p]) & ~(cs < Pr["min_credit_score"][p])
        ok &= Pr["region_ok"][p, U["region"][u]]
        if day is not None:
            ok &= Pr["launch_day"][p] <= day
        return ok

    def approve_prob(self, u: np.ndarray, p: np.ndarray, day: int | np.ndarray | None = None) -> np.ndarray:
        """P(approve | apply): zero when ineligible, rising with the credit margin for credit products."""
        U, Pr, c = self.users, self.products, self.coef
        min_cs = np.where(np.isnan(Pr["min_credit_score"][p]), 580.0, Pr["min_credit_score"][p])
        min_inc = np.where(np.isnan(Pr["min_income"][p]), 10_000.0, Pr["min_income"][p])
        margin = (U["credit_score"][u] - min_cs) / c.credit_margin_scale
        income_fit = 0.5 * np.log(np.maximum(U["income"][u], 1.0) / min_inc)
        credit_p = sigmoid(margin + c.credit_approve_bias + np.clip(income_fit, -2, 2))
        prob = np.where(self._is_credit[Pr["category"][p]], credit_p, c.approve_non_credit)
        return prob * self.eligible(u, p, day)

    def click_prob(self, util: np.ndarray) -> np.ndarray:
        return sigmoid(util + self.coef.click_bias)

    def apply_prob(self, util: np.ndarray, approve_p: np.ndarray) -> np.ndarray:
        """P(apply | click) given utility and the customer's chance of approval (self-selection)."""
        floor = self.coef.self_selection_floor
        return sigmoid(self.coef.apply_slope * util + self.coef.apply_bias) * (floor + (1 - floor) * approve_p)

    def conversion(self, util: np.ndarray, approve_p: np.ndarray) -> np.ndarray:
        """P(approve | view): the true conversion propensity."""
        return self.click_prob(util) * self.apply_prob(util, approve_p) * approve_p

    def view_prob(self, position: np.ndarray) -> np.ndarray:
        """Position bias: chance that an item shown at 1-based ``position`` is looked at."""
        return np.asarray(position, dtype=np.float64) ** -self.coef.position_bias

    # -- public API by id ---------------------------------------------------------------------
    def propensity(
        self,
        user_ids: Any,
        product_ids: Any,
        held: np.ndarray | None = None,
        month: int | None = None,
        day: int | None = None,
    ) -> np.ndarray:
        """True conversion propensity of (user, product) pairs given by id.

        ``held`` (len(pairs), n_categories) is what each pair's customer holds;
        ``month`` (0-based) adds season and drift; ``day`` (days since start)
        checks launch dates.
        """
        u, p = self.user_index(user_ids), self.product_index(product_ids)
        return self.conversion(self.utility(u, p, held, month), self.approve_prob(u, p, day))

    def propensity_matrix(
        self, user_ids: Any, held: np.ndarray | None = None, month: int | None = None, day: int | None = None
    ) -> np.ndarray:
        """(len(user_ids), n_products) true propensities, for the oracle ranking.

        ``held`` is (len(user_ids), n_categories). Memory is len(user_ids) * n_products * 8 bytes:
        call it on blocks of customers for large catalogues.
        """
        u = self.user_index(user_ids)
        n, m = len(u), self.n_products
        uu = np.repeat(u, m)
        pp = np.tile(np.arange(m), n)
        util = self.utility(uu, pp, held, month, held_row=np.repeat(np.arange(n), m))
        return self.conversion(util, self.approve_prob(uu, pp, day)).reshape(n, m)

    def held_matrix(self, events: pd.DataFrame, user_ids: Any, before: pd.Timestamp | None = None) -> np.ndarray:
        """Categories each customer holds, from ``hold``/``approve``/``close`` events before ``before``."""
        ev = events[events["event_type"].isin(["hold", "approve", "close"])]
        if before is not None:
            ev = ev[pd.to_datetime(ev["timestamp"], utc=True) < before]
        ev = ev.sort_values("timestamp", kind="stable")
        last = ev.groupby(["user_id", "product_id"], sort=False)["event_type"].last()
        owned = last[last != "close"].reset_index()
        u = self._user_pos.get_indexer(np.asarray(user_ids))
        out = np.zeros((len(u), len(self.info.categories)), dtype=np.int8)
        row = pd.Index(np.asarray(user_ids)).get_indexer(owned["user_id"].to_numpy())
        keep = row >= 0
        cats = self.products["category"][self.product_index(owned["product_id"].to_numpy()[keep])]
        out[row[keep], cats] = 1
        return out

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write ``users.parquet``, ``products.parquet`` and ``world.json`` (no pickle).

        A generator that makes customers block by block writes :func:`save_world` once and
        :func:`save_users_part` per block instead, so it never holds every customer.
        """
        save_world(directory, self.products, self.info, self.coef)
        self.users_frame().to_parquet(directory / "users.parquet", index=False)

    def users_frame(self) -> pd.DataFrame:
        return _frame(self.users, USER_COLUMNS, "latent")

    def products_frame(self) -> pd.DataFrame:
        return _products_frame(self.products, self.info.regions)

    @classmethod
    def load(cls, directory: str | Path) -> GroundTruth:
        """Read a ground truth written by :meth:`save`, or by :func:`save_world` and :func:`save_users_part`."""
        directory = Path(directory)
        meta_path = directory / "world.json"
        if not meta_path.is_file():
            raise ArtifactError(
                f"no ground truth at {directory} (world.json missing)",
                hint="ground truth exists only for datasets made by `finrec generate`; pass DIR/ground_truth",
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") not in READABLE_FORMATS:
            raise ArtifactError(
                f"ground truth at {directory} has format {meta.get('format_version')}, "
                f"this finrec reads {', '.join(map(str, READABLE_FORMATS))}",
                hint="regenerate the dataset with this version of `finrec generate`",
            )
        info, coef = WorldInfo(**meta["info"]), Coefficients(**meta["coefficients"])
        users = _arrays(_read_users(directory), "latent")
        pdf = pd.read_parquet(directory / "products.parquet")
        products = _arrays(pdf, "latent")
        products["region_ok"] = pdf[[f"region_ok_{r}" for r in info.regions]].to_numpy(bool)
        return cls(users, products, info, coef)


def save_world(directory: Path, products: dict[str, np.ndarray], info: WorldInfo, coef: Coefficients) -> None:
    """Write the products, calendar and coefficients of a ground truth (``products.parquet``, ``world.json``)."""
    directory.mkdir(parents=True, exist_ok=True)
    _products_frame(products, info.regions).to_parquet(directory / "products.parquet", index=False)
    meta = {"format_version": TRUTH_FORMAT_VERSION, "info": asdict(info), "coefficients": asdict(coef)}
    (directory / "world.json").write_text(json.dumps(meta, indent=1))


def save_users_part(directory: Path, part: int, users: dict[str, np.ndarray]) -> Path:
    """Write one block of customers as ``users/part-NNNNN.parquet``; :meth:`GroundTruth.load` reads the parts in order.

    Parts may be written in any order and by separate processes (one per block); rewriting a part is harmless.
    """
    folder = directory / USER_PARTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{part:05d}.parquet"
    partial = folder / f".{path.name}.partial"
    _frame(users, USER_COLUMNS, "latent").to_parquet(partial, index=False)
    partial.replace(path)  # a task that dies half-way leaves no truncated part behind
    return path


def _read_users(directory: Path) -> pd.DataFrame:
    if (directory / "users.parquet").is_file():
        return pd.read_parquet(directory / "users.parquet")
    parts = sorted((directory / USER_PARTS).glob("part-*.parquet"))
    if not parts:
        raise ArtifactError(
            f"ground truth at {directory} has no customers (neither users.parquet nor {USER_PARTS}/part-*.parquet)",
            hint="the dataset was not completely written; regenerate it with `finrec generate`",
        )
    return pa.concat_tables([pq.read_table(p) for p in parts]).to_pandas()


def _products_frame(products: dict[str, np.ndarray], regions: list[str]) -> pd.DataFrame:
    df = _frame(products, PRODUCT_COLUMNS, "latent")
    for j, r in enumerate(regions):
        df[f"region_ok_{r}"] = products["region_ok"][:, j]
    return df


def _frame(arrays: dict[str, np.ndarray], columns: tuple[str, ...], matrix: str) -> pd.DataFrame:
    df = pd.DataFrame({c: arrays[c] for c in columns})
    mat = arrays[matrix]
    for j in range(mat.shape[1]):
        df[f"{matrix}_{j}"] = mat[:, j]
    return df


def _arrays(df: pd.DataFrame, matrix: str) -> dict[str, np.ndarray]:
    mcols = [c for c in df.columns if c.startswith(f"{matrix}_")]
    out = {c: df[c].to_numpy() for c in df.columns if c not in mcols and not c.startswith("region_ok_")}
    out[matrix] = df[mcols].to_numpy(np.float32)
    return out
