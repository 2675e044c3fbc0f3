"""``finrec generate --engine spark``: the embedded generator's world, its blocks made in parallel on Spark.

Every block of customers draws from its own seeded random streams (:func:`~finrec.data.synthetic.generate.
generate_block`), so blocks are independent and each is one Spark task. Only the ids of events and requests run
across blocks; they come from prefix sums of the blocks' counts instead of a running counter:

1. ``mapInArrow`` over the block ids, one partition a block: a task makes its block and writes its users as
   ``users/part-NNNNN.parquet``, its customers' ground truth as ``ground_truth/users/part-NNNNN.parquet`` and its
   events, with block-local ids, to ``_staging/``; it returns one row of counts.
2. The driver collects those rows (one a block of 25,000 customers) and sums them into each block's first event
   and request id.
3. ``mapInArrow`` over the block ids again: a task reads its staged events, shifts their ids and writes
   ``events/part-NNNNN.parquet``. The staging folder is then deleted.

The dataset holds ``products.parquet``, ``users/``, ``events/``, ``ground_truth/`` and ``manifest.json``; the data
contract reads a folder of part files as one table, in name order, which is block order, so rows come in the
embedded generator's order (docs/data.md). Rows, order and ground truth equal the embedded generator's for the
same settings (``tests/parity/test_generate_parity.py``).

Tasks write their part files with pyarrow, the embedded generator's writer, rather than through Spark's DataFrame
writer: handing 64M event rows to the JVM to write made the run at 1M customers 2.7 times longer (434 s against
161 s for the embedded generator on the same machine, docs/benchmarks.md). The output folder must therefore be
visible to every executor at the same path: local mode, or a mount every node shares (``/dbfs/...`` on
Databricks, NFS). A task writes a part under a temporary name and renames it, so a retried or speculative task
leaves one whole part.

PySpark is imported only by the session passed in, so this module loads without it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from finrec.artifacts import atomic_dir
from finrec.data.contract import EVENT_TYPES
from finrec.data.synthetic.generate import (
    GenerationSummary,
    WorldConfig,
    empty_counts,
    generate_block,
    n_blocks,
    prepare_world,
    write_manifest_of,
)
from finrec.data.synthetic.tables import TableWriter, offset_events, products_table
from finrec.data.synthetic.truth import save_users_part, save_world
from finrec.errors import FinrecError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

_STAGING = "_staging"
# Spark column names cannot hold dots: events.<type> counts travel as events_<type>.
_COUNT_COLUMNS = ("block", "users", "events", "requests", *(f"events_{t}" for t in EVENT_TYPES))


def generate_world_spark(
    cfg: WorldConfig, out: Path, spark: SparkSession, *, overwrite: bool = False
) -> GenerationSummary:
    """Generate at ``out`` the dataset :func:`~finrec.data.synthetic.generate.generate_world` makes, on Spark.

    Parameters
    ----------
    cfg
        The world's parameters; ``format`` must be ``parquet``.
    out
        The dataset folder (written whole or not at all).
    spark
        The session (:func:`finrec.engine.spark.spark_session`).

    Raises
    ------
    FinrecError
        Invalid parameters, CSV asked for, or ``out`` exists (without ``overwrite``).

    Examples
    --------
    >>> from finrec.config import EngineSettings  # doctest: +SKIP
    >>> from finrec.engine.spark import spark_session  # doctest: +SKIP
    >>> spark = spark_session(EngineSettings(name="spark"))  # doctest: +SKIP
    >>> generate_world_spark(WorldConfig(users=60_000), Path("world"), spark).counts["users"]  # doctest: +SKIP
    60000
    """
    check_for_spark(cfg)
    t0 = time.perf_counter()
    world = prepare_world(cfg)
    blocks = n_blocks(cfg)
    counts = empty_counts(world)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        tmp = tmp.resolve()
        writer = TableWriter(tmp / "products.parquet", "parquet")
        writer.write(products_table(world.catalogue, cfg.start))
        writer.close()
        save_world(tmp / "ground_truth", world.products_truth, world.info, world.coef)
        staging = tmp / _STAGING
        ids = spark.range(0, blocks, 1, numPartitions=blocks)
        made = ids.mapInArrow(_make_blocks(cfg, tmp, staging), ", ".join(f"{c} bigint" for c in _COUNT_COLUMNS))
        rows = sorted((r.asDict() for r in made.collect()), key=lambda r: r["block"])
        _check_blocks([r["block"] for r in rows], blocks)
        event_offset = request_offset = 1  # ids count from 1, as in the embedded generator
        offsets = []
        for r in rows:
            offsets.append((event_offset, request_offset))
            event_offset += r["events"]
            request_offset += r["requests"]
            for key in counts:
                counts[key] += r.get(key.replace(".", "_"), 0)
        shifted = ids.mapInArrow(_shift_events(staging, tmp / "events", offsets), "block bigint").collect()
        _check_blocks(sorted(r["block"] for r in shifted), blocks)
        shutil.rmtree(staging)
        write_manifest_of(tmp, cfg, counts, time.perf_counter() - t0, "spark")
    return GenerationSummary(out=out, counts=counts, seconds=time.perf_counter() - t0)


def check_for_spark(cfg: WorldConfig) -> None:
    """Raise FinrecError for parameters the Spark engine cannot generate (those of :meth:`WorldConfig.check`, CSV)."""
    cfg.check()
    if cfg.format != "parquet":
        raise FinrecError(
            "the Spark engine writes Parquet only", hint="drop --format csv, or generate CSV with --engine duckdb"
        )


_Task = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]


def _make_blocks(cfg: WorldConfig, out: Path, staging: Path) -> _Task:
    """The task of step 1: make the blocks whose ids come in, write and stage their tables, return their counts."""

    def make(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        world = None
        for batch in batches:
            for b in batch.column("id").to_pylist():
                world = world or prepare_world(cfg)  # once a task; cheap next to a block
                block = generate_block(cfg, world, b)
                _write_part(out / "users", b, block.users)
                save_users_part(out / "ground_truth", b, block.truth_users)
                _write_part(staging, b, block.events)
                row = {k.replace(".", "_"): v for k, v in block.counts.items()}
                row |= {"block": b, "requests": block.n_requests}
                yield pa.RecordBatch.from_pydict({c: [row[c]] for c in _COUNT_COLUMNS})

    return make


def _shift_events(staging: Path, target: Path, offsets: list[tuple[int, int]]) -> _Task:
    """The task of step 3: give the staged events of each block their dataset ids (``offsets[b]``)."""

    def shift(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for b in batch.column("id").to_pylist():
                staged = _part(staging, b)
                if staged.exists() or not _part(target, b).exists():  # else a retry: the part was written whole
                    _write_part(target, b, offset_events(pq.read_table(staged), *offsets[b]))
                    staged.unlink()  # the staged copy is the size of the events: keep the disk's peak down
                yield pa.RecordBatch.from_pydict({"block": [b]})

    return shift


def _part(folder: Path, b: int) -> Path:
    return folder / f"part-{b:05d}.parquet"


def _write_part(folder: Path, b: int, table: pa.Table) -> None:
    """Write block ``b`` of a table as ``folder/part-NNNNN.parquet``, as the embedded generator writes a table."""
    folder.mkdir(parents=True, exist_ok=True)
    path = _part(folder, b)
    partial = folder / f".{path.name}.partial"
    writer = TableWriter(partial, "parquet")
    writer.write(table)
    writer.close()
    partial.replace(path)  # a retried task rewrites the same bytes; a killed one leaves no truncated part


def _check_blocks(done: list[int], blocks: int) -> None:
    if done != list(range(blocks)):  # pragma: no cover - Spark runs every task to its end once
        raise FinrecError(f"Spark returned {len(done)} of {blocks} blocks", hint="run the command again")
