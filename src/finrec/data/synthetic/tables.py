"""The observed tables of a synthetic world, as Arrow tables in the data contract, and their writers.

A block's events carry block-local ids (``event_id`` from 0, ``request_id`` from 0 or null); :func:`offset_events`
shifts them to the dataset's ids, the same way on every engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from finrec.data.contract import EMPLOYMENT_STATUSES, EVENT_TYPES
from finrec.data.synthetic import params as P
from finrec.data.synthetic.catalogue import Catalogue
from finrec.data.synthetic.funnel import BlockEvents
from finrec.data.synthetic.population import Customers


def products_table(cat: Catalogue, start: str) -> pa.Table:
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


def users_table(c: Customers, start: str, missing_rate: float, rng: np.random.Generator) -> pa.Table:
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


def block_events_table(ev: BlockEvents, user_ids: np.ndarray, product_ids: np.ndarray) -> pa.Table:
    """A block's events with block-local ids: ``event_id`` 0..n-1, ``request_id`` 0..n_requests-1 or null."""
    return pa.table(
        {
            "event_id": np.arange(len(ev), dtype=np.int64),
            "user_id": user_ids[ev.user],
            "product_id": product_ids[ev.product],
            "event_type": _dictionary(ev.etype, EVENT_TYPES),
            "timestamp": pa.array(ev.t.astype("datetime64[s]"), pa.timestamp("s", tz="UTC")),
            "request_id": pa.array(ev.request, mask=ev.request < 0),
            "position": pa.array(ev.position.astype(np.int64), mask=ev.position == 0),
            "channel": _dictionary(ev.channel, P.CHANNELS),
        }
    )


def offset_events(events: pa.Table, event_offset: int, request_offset: int) -> pa.Table:
    """``events`` with ``event_id`` and ``request_id`` shifted by the ids of the blocks before it."""
    for name, offset in (("event_id", event_offset), ("request_id", request_offset)):
        i = events.schema.get_field_index(name)
        events = events.set_column(i, name, pc.add(events.column(i), pa.scalar(offset, pa.int64())))
    return events


def plain_columns(table: pa.Table) -> pa.Table:
    """Dictionary columns as plain strings, for writers without a dictionary type (CSV, Spark)."""
    return pa.table(
        {
            n: col.cast(pa.string()) if pa.types.is_dictionary(col.type) else col
            for n, col in zip(table.column_names, table.columns, strict=True)
        }
    )


def _csv_ready(table: pa.Table) -> pa.Table:
    """Dictionary columns as plain strings, timestamps as ISO 8601 text with Z, for CSV."""
    cols = {}
    for n, col in zip(table.column_names, plain_columns(table).columns, strict=True):
        if pa.types.is_timestamp(col.type):
            col = pa.chunked_array(
                [
                    pa.array(np.datetime_as_string(c.to_numpy(zero_copy_only=False), unit="s"), pa.string())
                    for c in col.chunks
                ]
            ).cast(pa.string())
        cols[n] = col
    return pa.table(cols)


class TableWriter:
    """Streams blocks of one table to one Parquet (zstd) or CSV file."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self._writer: Any = None

    def write(self, table: pa.Table) -> None:
        if self.fmt == "csv":
            table = _csv_ready(table)
        if self._writer is None:
            if self.fmt == "parquet":
                self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
            else:
                self._writer = pacsv.CSVWriter(self.path, table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
