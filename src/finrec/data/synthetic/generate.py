"""``finrec generate``: write a synthetic dataset in the data contract plus its ground truth.

Customers are simulated in fixed-size blocks, each with its own random stream
derived from the seed, so the output depends only on the parameters (not on
the machine) and memory stays flat however many customers are asked for.
Tables are streamed to Parquet (or CSV) one block at a time.

Examples
--------
>>> import tempfile
>>> cfg = WorldConfig(users=200, products=20, months=2, seed=1)
>>> summary = generate_world(cfg, Path(tempfile.mkdtemp()) / "world", progress=False)
>>> summary.counts["users"]
200
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from finrec.artifacts import atomic_dir, write_manifest
from finrec.data.contract import EMPLOYMENT_STATUSES, EVENT_TYPES
from finrec.data.synthetic import params as P
from finrec.data.synthetic.catalogue import Catalogue, _zscore_within, make_catalogue
from finrec.data.synthetic.funnel import BlockEvents, LoggingPolicy, initial_holdings, month_bounds, simulate_block
from finrec.data.synthetic.population import Customers, make_customers
from finrec.data.synthetic.truth import Coefficients, GroundTruth, WorldInfo
from finrec.errors import FinrecError

#: Customers per block. Fixed, so that output does not depend on the machine.
BLOCK_SIZE = 25_000
_STREAM_CATALOGUE, _STREAM_BLOCK, _STREAM_MASK = 1, 2, 3


@dataclass
class WorldConfig:
    """Parameters of a synthetic world (each is a flag of ``finrec generate``)."""

    users: int = 200_000
    products: int = 300
    months: int = 12
    seed: int = 7
    start: str = "2024-01-01"
    sessions_per_month: float = 0.7
    slate_size: int = 5
    drift_month: int | None = None
    drift_strength: float = 1.0
    missing_rate: float = 0.02
    format: Literal["parquet", "csv"] = "parquet"

    def check(self, now: datetime | None = None) -> None:
        """Raise FinrecError with a hint for parameters that cannot make a world."""
        now = now or datetime.now(UTC)
        problems = []
        if self.users < 1:
            problems.append("--users must be at least 1")
        if self.products < P.N_CAT:
            problems.append(f"--products must be at least {P.N_CAT} (one per category)")
        if not 1 <= self.months <= 120:
            problems.append("--months must be between 1 and 120")
        if not 1 <= self.slate_size <= 20:
            problems.append("--slate-size must be between 1 and 20")
        if self.sessions_per_month <= 0:
            problems.append("--sessions-per-month must be positive")
        if not 0 <= self.missing_rate < 0.5:
            problems.append("--missing-rate must be in [0, 0.5)")
        if self.format not in ("parquet", "csv"):
            problems.append("--format must be parquet or csv")
        try:
            start = date.fromisoformat(self.start)
        except ValueError:
            problems.append(f"--start {self.start!r} is not a date (YYYY-MM-DD)")
        else:
            end = pd.Timestamp(start, tz="UTC") + pd.DateOffset(months=self.months)
            if end > pd.Timestamp(now):
                problems.append(
                    f"the period {start} + {self.months} months ends {end.date()}, in the future; "
                    "events may not be in the future: choose an earlier --start or fewer --months"
                )
        # Up to a year after the data ends: the world then knows a shock its data does not show yet, which
        # a closed-loop simulation (`finrec simulate`) lives through and the ground truth's oracle accounts for.
        if self.drift_month is not None and not 1 <= self.drift_month <= self.months + 12:
            problems.append(f"--drift-month must be between 1 and --months + 12 ({self.months + 12})")
        if problems:
            raise FinrecError("cannot generate this world: " + "; ".join(problems), hint="see `finrec generate --help`")


@dataclass
class GenerationSummary:
    out: Path
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


# -- observed tables ----------------------------------------------------------------------------


def _products_table(cat: Catalogue, start: str) -> pa.Table:
    day0 = np.datetime64(start, "D")
    return pa.table(
        {
            "product_id": cat.product_id,
            "name": pa.array(cat.name.tolist(), pa.string()),
            "category": pa.array([P.CATEGORIES[c] for c in cat.category], pa.string()),
            "provider": pa.array([cat.provider_names[p] for p in cat.provider], pa.string()),
            "risk_level": cat.risk_level.astype(np.int64),
            "apr": pa.array(cat.apr, mask=np.isnan(cat.apr)),
            "apy": pa.array(cat.apy, mask=np.isnan(cat.apy)),
            "annual_fee": cat.annual_fee,
            "min_credit_score": pa.array(cat.min_credit_score, mask=np.isnan(cat.min_credit_score)),
            "min_income": pa.array(cat.min_income, mask=np.isnan(cat.min_income)),
            "min_age": pa.array(np.nan_to_num(cat.min_age).astype(np.int64), mask=np.isnan(cat.min_age)),
            "max_age": pa.array(np.nan_to_num(cat.max_age).astype(np.int64), mask=np.isnan(cat.max_age)),
            "regions": pa.array(cat.regions.tolist(), pa.string()),
            "launch_date": pa.array(day0 + cat.launch_day.astype("timedelta64[D]"), pa.date32()),
            "term_months": pa.array(np.nan_to_num(cat.term_months).astype(np.int64), mask=np.isnan(cat.term_months)),
        }
    )


def _dictionary(codes: np.ndarray, values: tuple[str, ...]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int8), mask=codes < 0), pa.array(values))


def _users_table(c: Customers, start: str, missing_rate: float, rng: np.random.Generator) -> pa.Table:
    n = len(c)
    miss = rng.random((n, 4)) < np.array([missing_rate, missing_rate, missing_rate, missing_rate / 2])
    signup = np.datetime64(start, "D") - c.signup_days_before.astype("timedelta64[D]")
    return pa.table(
        {
            "user_id": c.user_id,
            "age": c.age.astype(np.int64),
            "income": pa.array(np.round(c.income.astype(np.float64), -2), mask=miss[:, 0]),
            "credit_score": pa.array(c.credit_score.astype(np.int64), mask=miss[:, 1]),
            "risk_tolerance": pa.array(c.risk_tolerance.astype(np.int64), mask=miss[:, 2]),
            "region": _dictionary(c.region, P.REGIONS),
            "employment_status": _dictionary(np.where(miss[:, 3], -1, c.employment), EMPLOYMENT_STATUSES),
            "marketing_consent": c.consent,
            "signup_date": pa.array(signup, pa.date32()),
            "gender": _dictionary(c.gender, P.GENDERS),
            "dependants": c.dependants.astype(np.int64),
        }
    )


def _events_table(
    ev: BlockEvents, user_ids: np.ndarray, product_ids: np.ndarray, event_offset: int, request_offset: int
) -> pa.Table:
    req = ev.request + request_offset
    return pa.table(
        {
            "event_id": np.arange(event_offset, event_offset + len(ev), dtype=np.int64),
            "user_id": user_ids[ev.user],
            "product_id": product_ids[ev.product],
            "event_type": _dictionary(ev.etype, EVENT_TYPES),
            "timestamp": pa.array(ev.t.astype("datetime64[s]"), pa.timestamp("s", tz="UTC")),
            "request_id": pa.array(req, mask=ev.request < 0),
            "position": pa.array(ev.position.astype(np.int64), mask=ev.position == 0),
            "channel": _dictionary(ev.channel, P.CHANNELS),
        }
    )


class _TableWriter:
    """Streams blocks of one table to Parquet (zstd) or CSV."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self._writer: Any = None

    def write(self, table: pa.Table) -> None:
        if self.fmt == "csv":
            table = pa.table({n: _plain(col) for n, col in zip(table.column_names, table.columns, strict=True)})
        if self._writer is None:
            if self.fmt == "parquet":
                self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
            else:
                self._writer = pacsv.CSVWriter(self.path, table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary columns as plain strings, timestamps as ISO 8601 text with Z, for CSV."""
    if pa.types.is_dictionary(col.type):
        return col.cast(pa.string())
    if pa.types.is_timestamp(col.type):
        return pa.chunked_array(
            [
                pa.array(np.datetime_as_string(c.to_numpy(zero_copy_only=False), unit="s"), pa.string())
                for c in col.chunks
            ]
        ).cast(pa.string())
    return col


# -- orchestration ------------------------------------------------------------------------------


def _truth_products(cat: Catalogue) -> dict[str, np.ndarray]:
    return {
        "product_id": cat.product_id,
        "category": cat.category,
        "provider": cat.provider,
        "brand": cat.brand[cat.provider],
        "quality": cat.quality,
        "apr_z": _zscore_within(cat.apr, cat.category),
        "apy_z": _zscore_within(cat.apy, cat.category),
        "fee_z": _zscore_within(cat.annual_fee, cat.category),
        "risk_level": cat.risk_level,
        "min_credit_score": cat.min_credit_score,
        "min_income": cat.min_income,
        "min_age": cat.min_age,
        "max_age": cat.max_age,
        "launch_day": cat.launch_day,
        "latent": cat.latent,
        "region_ok": cat.region_ok,
    }


def _truth_users(c: Customers) -> dict[str, np.ndarray]:
    return {
        "user_id": c.user_id,
        "age": c.age,
        "income": c.income,
        "credit_score": c.credit_score,
        "risk_tolerance": c.risk_tolerance,
        "region": c.region,
        "stage": c.stage,
        "price_sens": c.price_sens,
        "yield_sens": c.yield_sens,
        "fee_sens": c.fee_sens,
        "activity": c.activity,
        "consent": c.consent,
        "main_provider": np.full(len(c), -1, dtype=np.int32),
        "latent": c.latent,
    }


def generate_world(cfg: WorldConfig, out: Path, *, overwrite: bool = False, progress: bool = True) -> GenerationSummary:
    """Generate a dataset at ``out``: users, products, events, ``ground_truth/`` and ``manifest.json``.

    Raises
    ------
    FinrecError
        Invalid parameters, or ``out`` exists (without ``overwrite``).
    """
    cfg.check()
    t0 = time.perf_counter()
    bounds = month_bounds(cfg.start, cfg.months)
    n_days = int((bounds[-1] - bounds[0]) // 86_400)
    catalogue = make_catalogue(cfg.products, n_days, np.random.default_rng([cfg.seed, _STREAM_CATALOGUE]))
    policy = LoggingPolicy(catalogue)
    info = WorldInfo(
        start=cfg.start,
        months=cfg.months,
        seed=cfg.seed,
        drift_month=cfg.drift_month,
        drift_strength=cfg.drift_strength if cfg.drift_month else 0.0,
        provider_names=catalogue.provider_names,
    )
    coef = Coefficients()
    products_truth = _truth_products(catalogue)
    ext = ".parquet" if cfg.format == "parquet" else ".csv"
    counts = {"users": 0, "products": len(catalogue), "events": 0} | {f"events.{t}": 0 for t in EVENT_TYPES}
    truth_users: list[dict[str, np.ndarray]] = []

    with atomic_dir(out, overwrite=overwrite) as tmp:
        prod_writer = _TableWriter(tmp / f"products{ext}", cfg.format)
        prod_writer.write(_products_table(catalogue, cfg.start))
        prod_writer.close()
        users_w = _TableWriter(tmp / f"users{ext}", cfg.format)
        events_w = _TableWriter(tmp / f"events{ext}", cfg.format)
        n_blocks = -(-cfg.users // BLOCK_SIZE)
        event_offset = request_offset = 1
        bar = tqdm(total=cfg.users, unit="customer", desc="generating", disable=not progress, unit_scale=True)
        try:
            for b in range(n_blocks):
                first = b * BLOCK_SIZE
                size = min(BLOCK_SIZE, cfg.users - first)
                rng = np.random.default_rng([cfg.seed, _STREAM_BLOCK, b])
                cust = make_customers(first + 1, size, rng)
                users = _truth_users(cust)
                truth = GroundTruth(users, products_truth, info, coef)
                held = initial_holdings(truth, catalogue, policy, rng)
                cur = held[:, P.CAT["current_account"]]
                fallback = rng.choice(len(catalogue.provider_names), size=size, p=catalogue.provider_size)
                users["main_provider"] = np.where(cur >= 0, catalogue.provider[np.maximum(cur, 0)], fallback).astype(
                    np.int32
                )
                ev = simulate_block(truth, held, catalogue, policy, bounds, cfg.sessions_per_month, cfg.slate_size, rng)
                mask_rng = np.random.default_rng([cfg.seed, _STREAM_MASK, b])
                users_w.write(_users_table(cust, cfg.start, cfg.missing_rate, mask_rng))
                events_w.write(_events_table(ev, cust.user_id, catalogue.product_id, event_offset, request_offset))
                event_offset += len(ev)
                request_offset += ev.n_requests
                counts["users"] += size
                counts["events"] += len(ev)
                for code, k in zip(*np.unique(ev.etype, return_counts=True), strict=True):
                    counts[f"events.{EVENT_TYPES[code]}"] += int(k)
                truth_users.append(users)
                bar.update(size)
        finally:
            bar.close()
            users_w.close()
            events_w.close()
        all_users = {k: np.concatenate([u[k] for u in truth_users]) for k in truth_users[0]}
        GroundTruth(all_users, products_truth, info, coef).save(tmp / "ground_truth")
        seconds = time.perf_counter() - t0
        write_manifest(
            tmp,
            "dataset",
            config={"generator": asdict(cfg), "block_size": BLOCK_SIZE},
            metrics={"counts": counts, "generation_seconds": round(seconds, 2)},
        )
    return GenerationSummary(out=out, counts=counts, seconds=time.perf_counter() - t0)
