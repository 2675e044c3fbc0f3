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
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from finrec.artifacts import atomic_dir, write_manifest
from finrec.data.contract import EVENT_TYPES
from finrec.data.synthetic import params as P
from finrec.data.synthetic.catalogue import Catalogue, _zscore_within, make_catalogue
from finrec.data.synthetic.funnel import LoggingPolicy, initial_holdings, month_bounds, simulate_block
from finrec.data.synthetic.population import Customers, make_customers
from finrec.data.synthetic.tables import TableWriter, block_events_table, offset_events, products_table, users_table
from finrec.data.synthetic.truth import Coefficients, GroundTruth, WorldInfo, save_users_part, save_world
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


# -- one block ------------------------------------------------------------------------------------


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


@dataclass
class World:
    """What every block shares: the catalogue, the logging policy, the calendar and the truth's products.

    A pure function of the :class:`WorldConfig` (:func:`prepare_world`), so a worker can rebuild it.
    """

    catalogue: Catalogue
    policy: LoggingPolicy
    info: WorldInfo
    coef: Coefficients
    products_truth: dict[str, np.ndarray]
    bounds: np.ndarray  # month boundaries, Unix seconds


def prepare_world(cfg: WorldConfig) -> World:
    bounds = month_bounds(cfg.start, cfg.months)
    n_days = int((bounds[-1] - bounds[0]) // 86_400)
    catalogue = make_catalogue(cfg.products, n_days, np.random.default_rng([cfg.seed, _STREAM_CATALOGUE]))
    info = WorldInfo(
        start=cfg.start,
        months=cfg.months,
        seed=cfg.seed,
        drift_month=cfg.drift_month,
        drift_strength=cfg.drift_strength if cfg.drift_month else 0.0,
        provider_names=catalogue.provider_names,
    )
    return World(catalogue, LoggingPolicy(catalogue), info, Coefficients(), _truth_products(catalogue), bounds)


def n_blocks(cfg: WorldConfig) -> int:
    return -(-cfg.users // BLOCK_SIZE)


@dataclass
class Block:
    """The tables of one block of customers. Events carry block-local ids (see :func:`offset_events`)."""

    index: int
    users: pa.Table
    events: pa.Table
    truth_users: dict[str, np.ndarray]
    n_requests: int

    @property
    def counts(self) -> dict[str, int]:
        """Rows of the block: ``users``, ``events`` and ``events.<type>``."""
        counts = {"users": self.users.num_rows, "events": self.events.num_rows}
        counts |= {f"events.{t}": 0 for t in EVENT_TYPES}
        codes = self.events.column("event_type").combine_chunks().indices.to_numpy(zero_copy_only=False)
        for code, k in zip(*np.unique(codes, return_counts=True), strict=True):
            counts[f"events.{EVENT_TYPES[code]}"] += int(k)
        return counts


def generate_block(cfg: WorldConfig, world: World, b: int) -> Block:
    """Block ``b`` of the world: customers ``b * BLOCK_SIZE + 1`` onwards, from its own random streams.

    Depends on nothing but its arguments, so blocks can be made in any order, in parallel.
    """
    first = b * BLOCK_SIZE
    size = min(BLOCK_SIZE, cfg.users - first)
    catalogue = world.catalogue
    rng = np.random.default_rng([cfg.seed, _STREAM_BLOCK, b])
    cust = make_customers(first + 1, size, rng)
    users = _truth_users(cust)
    truth = GroundTruth(users, world.products_truth, world.info, world.coef)
    held = initial_holdings(truth, catalogue, world.policy, rng)
    cur = held[:, P.CAT["current_account"]]
    fallback = rng.choice(len(catalogue.provider_names), size=size, p=catalogue.provider_size)
    users["main_provider"] = np.where(cur >= 0, catalogue.provider[np.maximum(cur, 0)], fallback).astype(np.int32)
    ev = simulate_block(truth, held, catalogue, world.policy, world.bounds, cfg.sessions_per_month, cfg.slate_size, rng)
    mask_rng = np.random.default_rng([cfg.seed, _STREAM_MASK, b])
    return Block(
        index=b,
        users=users_table(cust, cfg.start, cfg.missing_rate, mask_rng),
        events=block_events_table(ev, cust.user_id, catalogue.product_id),
        truth_users=users,
        n_requests=ev.n_requests,
    )


def empty_counts(world: World) -> dict[str, int]:
    return {"users": 0, "products": len(world.catalogue), "events": 0} | {f"events.{t}": 0 for t in EVENT_TYPES}


def write_manifest_of(out: Path, cfg: WorldConfig, counts: dict[str, int], seconds: float, engine: str) -> None:
    write_manifest(
        out,
        "dataset",
        config={"generator": asdict(cfg), "block_size": BLOCK_SIZE, "engine": engine},
        metrics={"counts": counts, "generation_seconds": round(seconds, 2)},
    )


# -- the embedded generator ---------------------------------------------------------------------


def generate_world(cfg: WorldConfig, out: Path, *, overwrite: bool = False, progress: bool = True) -> GenerationSummary:
    """Generate a dataset at ``out``: users, products, events, ``ground_truth/`` and ``manifest.json``.

    Blocks are made one after the other in this process, each streamed to one file per table
    (:mod:`finrec.data.synthetic.spark` makes them in parallel on Spark, with the same rows).

    Raises
    ------
    FinrecError
        Invalid parameters, or ``out`` exists (without ``overwrite``).
    """
    cfg.check()
    t0 = time.perf_counter()
    world = prepare_world(cfg)
    ext = ".parquet" if cfg.format == "parquet" else ".csv"
    counts = empty_counts(world)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        prod_writer = TableWriter(tmp / f"products{ext}", cfg.format)
        prod_writer.write(products_table(world.catalogue, cfg.start))
        prod_writer.close()
        save_world(tmp / "ground_truth", world.products_truth, world.info, world.coef)
        users_w = TableWriter(tmp / f"users{ext}", cfg.format)
        events_w = TableWriter(tmp / f"events{ext}", cfg.format)
        event_offset = request_offset = 1  # ids count from 1
        bar = tqdm(total=cfg.users, unit="customer", desc="generating", disable=not progress, unit_scale=True)
        try:
            for b in range(n_blocks(cfg)):
                block = generate_block(cfg, world, b)
                users_w.write(block.users)
                events_w.write(offset_events(block.events, event_offset, request_offset))
                save_users_part(tmp / "ground_truth", b, block.truth_users)
                event_offset += block.events.num_rows
                request_offset += block.n_requests
                for k, v in block.counts.items():
                    counts[k] += v
                bar.update(block.users.num_rows)
        finally:
            bar.close()
            users_w.close()
            events_w.close()
        write_manifest_of(tmp, cfg, counts, time.perf_counter() - t0, "duckdb")
    return GenerationSummary(out=out, counts=counts, seconds=time.perf_counter() - t0)
