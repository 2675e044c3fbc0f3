"""``finrec materialize``: every customer's serving record, written to Redis for stateless replicas to read.

Three steps (the key layout is in :mod:`finrec.serving.materialized`):

1. the catalogue: the products' features at the snapshot and the customers' columns (the products' demand and
   holders count every customer's events);
2. the records: Arrow record batches of :data:`~finrec.serving.records.RECORD_SCHEMA`, one row per customer, built
   block by block of customers by :func:`block_records` (a block is a dataset of its customers with their own
   events only, so memory is bounded by the block, not the customer base) and written by :func:`write_records`
   in pipelined batches;
3. the switch: the manifest is written, then the ``current`` pointer of the model version is moved to the new
   prefix in one SET; the previous prefix's keys get a time to live (replicas started on it keep answering
   until they restart). A run that fails before the switch deletes what it wrote.

Steps 1 and 2 are an engine's (a :class:`RecordProducer`): :class:`EmbeddedProducer` runs them on this machine
from a loaded dataset; ``finrec.engine.materialize.SparkProducer`` runs step 2 in Spark's executors, each task
writing its bucket of customers to Redis itself, and adds up the tasks' :class:`Written`. Step 3 is
:func:`materialize`'s, the same for both.

Examples
--------
>>> from finrec.serving.materialize import producer
>>> producer("duckdb").__name__
'EmbeddedProducer'
"""
from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from finrec.config import FinrecSettings
from finrec.data.dataset import Dataset, EventLog
from finrec.errors import FinrecError
from finrec.features.builder import FeatureBuilder, Snapshot
from finrec.serving.guardrails import recent_guard_history
from finrec.serving.materialized import LAYOUT, MaterializedFeatures, to_ipc
from finrec.serving.records import RECORD_SCHEMA, encode_batch, to_batch
from finrec.serving.scoring import encode_customers, version_of
from finrec.serving.state import ServingData
from finrec.twostage.model import TwoStageModel

#: Customers per block of the embedded producer (about 100-300 MB of features at a time).
DEFAULT_BLOCK = 50_000
_PIPELINE = 2_000  # SETs per round trip


@dataclass
class Written:
    """What :func:`write_records` wrote: customers and an order-independent checksum (adds up over parts)."""

    customers: int = 0
    checksum: int = 0

    def __add__(self, other: Written) -> Written:
        return Written(self.customers + other.customers, (self.checksum + other.checksum) % 2**64)


def record_digest(user_id: str, blob: bytes) -> int:
    """A record's share of the checksum: its key and bytes hashed, summed modulo 2**64 over the records."""
    h = hashlib.blake2b(user_id.encode(), digest_size=8)
    h.update(blob)
    return int.from_bytes(h.digest(), "little")


def write_records(client: Any, prefix: str, batches: Iterable[pa.RecordBatch],
                  on_progress: Callable[[int], None] | None = None) -> Written:  # fmt: skip
    """Write each customer of ``batches`` to ``prefix + "c:" + user_id``, ``_PIPELINE`` SETs per round trip."""
    done = Written()
    for batch in batches:
        pipe = client.pipeline(transaction=False)
        n = 0
        for user_id, blob in encode_batch(batch):
            pipe.set(prefix + "c:" + user_id, blob)
            done.checksum = (done.checksum + record_digest(user_id, blob)) % 2**64
            n += 1
            if n % _PIPELINE == 0:
                pipe.execute()
        pipe.execute()
        done.customers += n
        if on_progress is not None:
            on_progress(n)
    return done


# -- the records of a block of customers ----------------------------------------------------------------
def block_records(ds: Dataset, settings: FinrecSettings, model: TwoStageModel, cutoff: int,
                  horizon_days: float) -> pa.RecordBatch:  # fmt: skip
    """The records of every customer of ``ds`` at ``cutoff``: ``ds`` holds some customers whole (a block of the
    embedded run, a bucket of a Spark task), with the catalogue's statistics of every customer when it holds only
    some (:attr:`~finrec.data.dataset.Dataset.catalogue_stats`).

    They go through the same builder and encodings as an in-memory service
    (:class:`~finrec.serving.state.ServingData`, :func:`~finrec.serving.scoring.encode_customers`); a customer's
    record depends on their own events only, which the parity tests hold.
    """
    history_length = model.config.history_length if model.retriever is not None else 0
    data = ServingData(ds, settings, cutoff=cutoff)
    try:
        enc = encode_customers(model, data, model.sources)
        declined, shown = recent_guard_history(data.ds.events, cutoff, horizon_days, settings.serve.frequency_cap)
        records = []
        for r in range(ds.n_users):
            rec = enc.record(data, r, history_length)
            rec.declined = declined.get(r, {})
            rec.shown = {p: list(t) for p, t in shown.get(r, {}).items()}
            records.append(rec)
    finally:
        data.builder.con.close()
    return to_batch(ds.users["user_id"].astype(str).tolist(), records)


def _block(ds: Dataset, by_user: np.ndarray, starts: np.ndarray, a: int, b: int) -> Dataset:
    """Customers ``a:b`` of ``ds`` with their own events only (rows renumbered from 0, events in time order)."""
    take = np.sort(by_user[starts[a] : starts[b]])  # positions in the time-sorted log: sorting restores time order
    ev = ds.events
    events = EventLog((ev.user[take] - a).astype(ev.user.dtype), ev.product[take], ev.etype[take], ev.ts[take],
                      ev.position[take])  # fmt: skip
    users = ds.users.iloc[a:b].reset_index(drop=True)
    return Dataset(ds.path, users, ds.products, events, ds.fingerprint, None, ds.extra_user_columns,
                   ds.extra_product_columns, ds.catalogue_stats)  # fmt: skip


def embedded_batches(ds: Dataset, settings: FinrecSettings, model: TwoStageModel, cutoff: int,
                     horizon_days: float, block: int = DEFAULT_BLOCK) -> Iterator[pa.RecordBatch]:  # fmt: skip
    """The records of every customer of ``ds`` at ``cutoff``, one batch (:func:`block_records`) per block of
    ``block`` customers."""
    order = np.argsort(ds.events.user, kind="stable")
    starts = np.searchsorted(ds.events.user[order], np.arange(ds.n_users + 1), side="left")
    for a in range(0, ds.n_users, block):
        yield block_records(_block(ds, order, starts, a, min(a + block, ds.n_users)), settings, model, cutoff,
                            horizon_days)  # fmt: skip


def pair_names(ds: Dataset, settings: FinrecSettings, cutoff: int) -> list[str]:
    """The pair history's columns (those of a one-customer block: the same for every block)."""
    order = np.argsort(ds.events.user, kind="stable")
    starts = np.searchsorted(ds.events.user[order], np.arange(min(ds.n_users, 1) + 1), side="left")
    data = ServingData(_block(ds, order, starts, 0, min(ds.n_users, 1)), settings, cutoff=cutoff)
    data.builder.con.close()
    return data.pair_names


# -- the producers --------------------------------------------------------------------------------------
class RecordProducer(Protocol):
    """What an engine does for :func:`materialize`: the snapshot's catalogue, then every customer's record.

    ``engine`` names it in the manifest; ``data``, ``fingerprint`` and ``cutoff`` name the snapshot (the data's
    folder and fingerprint, just after its last event), ``n_events`` how many events it counts;
    ``n_customers`` is how many records :meth:`write` writes.
    """

    engine: str
    data: Path
    fingerprint: str
    cutoff: int
    n_events: int
    n_customers: int

    def catalogue(self, settings: FinrecSettings, model: TwoStageModel) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The catalogue's tables (Arrow IPC) and the manifest's ``catalogue`` columns."""
        ...

    def write(self, features: MaterializedFeatures, prefix: str, settings: FinrecSettings, model: TwoStageModel,
              horizon_days: float, on_progress: Callable[[int], None] | None = None) -> Written:  # fmt: skip
        """Write every customer's record under ``prefix`` of ``features``' Redis (:func:`write_records`)."""
        ...


class EmbeddedProducer:
    """The records of a loaded dataset, built on this machine ``block`` customers at a time.

    Examples
    --------
    >>> from finrec.serving.materialize import EmbeddedProducer
    >>> EmbeddedProducer.engine
    'duckdb'
    """

    engine = "duckdb"

    def __init__(self, ds: Dataset, block: int = DEFAULT_BLOCK) -> None:
        self.ds, self.block = ds, block
        self.data, self.fingerprint = Path(ds.path), ds.fingerprint
        self.cutoff = int(ds.time_range[1] + 1)
        self.n_events = len(ds.events)  # every event is before the cutoff
        self.n_customers = ds.n_users

    def catalogue(self, settings: FinrecSettings, model: TwoStageModel) -> tuple[dict[str, bytes], dict[str, Any]]:
        return catalogue_parts(self.ds, settings, model, self.cutoff)

    def write(self, features: MaterializedFeatures, prefix: str, settings: FinrecSettings, model: TwoStageModel,
              horizon_days: float, on_progress: Callable[[int], None] | None = None) -> Written:  # fmt: skip
        batches = embedded_batches(self.ds, settings, model, self.cutoff, horizon_days, self.block)
        return write_records(features.redis, prefix, batches, on_progress)


def producer(engine: str) -> type:
    """The :class:`RecordProducer` class of an engine: ``duckdb`` (:class:`EmbeddedProducer`, here) or ``spark``
    (``finrec.engine.materialize.SparkProducer``: needs PySpark)."""
    if engine == "duckdb":
        return EmbeddedProducer
    if engine == "spark":
        try:
            found: type = importlib.import_module("finrec.engine.materialize").SparkProducer
        except ImportError:
            raise FinrecError("materialising with Spark needs PySpark, which is not installed",
                              hint="pip install 'finrec[spark]', or use --engine duckdb") from None
        return found
    raise FinrecError(f"unknown engine {engine!r}", hint="use --engine duckdb or --engine spark")


# -- the whole run ----------------------------------------------------------------------------------------
def check_sources(model: TwoStageModel, cutoff: int, n_events: int) -> None:
    """Refuse, before any work, a bundle whose candidate sources were not fitted on the snapshot's events: a
    replica holds no events to refit them on (the bundle records where they were fitted)."""
    if model.sources is not None and not model.config.sources_fitted_at(cutoff, n_events):
        raise refuse_sources()


def refuse_sources() -> FinrecError:
    """The error of a bundle whose candidate sources were fitted on other data than the snapshot's."""
    return FinrecError("the bundle's candidate sources were fitted on other data than this snapshot's, and a "
                       "replica without the customers' events cannot refit them",
                       hint="materialise with the data the bundle was trained on (`finrec retrain` makes a "
                       "bundle for newer data), or serve this data without serve.customer_features")  # fmt: skip


def catalogue_tables(products: pd.DataFrame, users: pd.DataFrame, snap: Snapshot, pair_names: list[str],
                     any_held: bool) -> tuple[dict[str, bytes], dict[str, Any]]:  # fmt: skip
    """The catalogue's tables (Arrow IPC: ``users`` and ``user_features`` as columns, no rows) and columns.

    ``snap`` is a snapshot whose products' features count every customer (a full one, or one of a dataset
    without customers given the catalogue's statistics); ``any_held``: whether any customer holds anything.
    """
    tables = {"products": to_ipc(products), "product_features": to_ipc(snap.products),
              "users": to_ipc(_columns_of(users)), "user_features": to_ipc(_columns_of(snap.users))}  # fmt: skip
    columns = {"user_numeric": snap.user_numeric, "user_categorical": snap.user_categorical,
               "product_numeric": snap.product_numeric, "product_categorical": snap.product_categorical,
               "category_codes": snap.category_codes.tolist(), "n_categories": snap.n_categories,
               "pair_names": pair_names, "any_held": bool(any_held)}  # fmt: skip
    return tables, columns


def _columns_of(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame``'s columns without its rows, text as object: the same whatever the rows were (pandas types a text
    column as ``str`` or ``object`` by what it holds)."""
    empty = frame.iloc[:0]
    return empty.astype({c: object for c in empty.columns if not pd.api.types.is_numeric_dtype(empty[c])})


def catalogue_parts(ds: Dataset, settings: FinrecSettings, model: TwoStageModel,
                    cutoff: int) -> tuple[dict[str, bytes], dict[str, Any]]:  # fmt: skip
    """The catalogue's tables (Arrow IPC) and columns at ``cutoff`` (the bundle's sources checked before:
    :func:`check_sources`)."""
    builder = FeatureBuilder(ds, settings.protected_attributes)
    try:
        snap = builder.snapshot(cutoff)  # one pass over every event: the products' demand and holders need them all
        return catalogue_tables(ds.products, ds.users, snap, pair_names(ds, settings, cutoff), bool(len(snap.held)))
    finally:
        builder.con.close()


def materialize(source: RecordProducer, model: TwoStageModel, bundle_manifest: dict[str, Any],
                features: MaterializedFeatures, settings: FinrecSettings, keep_old_seconds: int = 86_400,
                on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Materialise every customer of ``source`` for ``model`` into ``features``' Redis, then switch replicas to it.

    Returns the manifest written. Raises :class:`FinrecError` for an unusable bundle, and
    :class:`~finrec.storage.StoreUnavailable` (or the engine's error) when writing fails midway (what was written
    is then deleted).
    """
    cutoff = source.cutoff
    check_sources(model, cutoff, source.n_events)
    version = version_of(bundle_manifest)
    snapshot_id = f"{source.fingerprint[:16]}-{cutoff}"
    prefix = features.prefix(snapshot_id, version)
    srv = settings.serve
    horizon = max(srv.cooling_off_days, srv.frequency_window_days)
    t0 = time.perf_counter()
    tables, columns = source.catalogue(settings, model)
    client = features.redis
    previous = client.get(features.pointer(version))
    try:
        client.delete(prefix + "manifest")  # a replica never reads a prefix being rewritten as complete
        client.hset(prefix + "catalogue", mapping=tables)
        written = source.write(features, prefix, settings, model, horizon, on_progress)
        manifest = {
            "layout": LAYOUT, "snapshot_id": snapshot_id, "model_version": version, "cutoff": cutoff,
            "customers": written.customers, "checksum": f"{written.checksum:016x}", "engine": source.engine,
            "data": str(source.data), "data_fingerprint": source.fingerprint, "guard_horizon_days": horizon,
            "record_columns": RECORD_SCHEMA.names, "catalogue": columns,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        client.set(prefix + "manifest", json.dumps(manifest))
        client.set(features.pointer(version), prefix)  # the switch: replicas loading this version read it from now on
    except BaseException:
        if previous is None or previous.decode() != prefix:
            _expire(client, prefix, 0)
        raise
    if previous is not None and previous.decode() != prefix:
        _expire(client, previous.decode(), keep_old_seconds)
    return manifest


def _expire(client: Any, prefix: str, seconds: int) -> int:
    """Give every key under ``prefix`` ``seconds`` to live (0: delete now); returns how many."""
    n = 0
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=prefix + "*", count=5_000):
        if seconds > 0:
            pipe.expire(key, seconds)
        else:
            pipe.unlink(key)
        n += 1
        if n % _PIPELINE == 0:
            pipe.execute()
    pipe.execute()
    return n
