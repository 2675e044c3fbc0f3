"""One customer's serving record: everything a request needs about a known customer at the snapshot.

A request for a known customer reads the customer's row of the model's encodings (the ranker's user block, the
two-tower's dense input and embedding), what they hold, their pair history with the products they touched, their
recent engaged products, category affinity, positives and segment (what the candidate sources score from), the
raw profile the eligibility rules read, and the recent declines and impressions the cooling-off and frequency cap
need. :class:`CustomerRecord` holds exactly that; the in-memory service slices it out of its arrays
(:meth:`~finrec.serving.scoring.ServingModel.record`), a replica without the snapshot reads it from Redis
(:mod:`finrec.serving.materialized`), and the request path is the same code for both.

Producers hand records over as Arrow record batches with one row per customer (:data:`RECORD_SCHEMA`): the
embedded and Spark producers (:mod:`finrec.serving.materialize`) build them with the same code.
:func:`encode` turns one row into bytes in a small versioned layout (not pickle: any language can read it):

``b"FRC1"`` | u32 header length | header (UTF-8 JSON: ``{"profile": {...}, "segment": int|null}``) | for each
array of :data:`ARRAYS` in order: u32 element count, then the elements little-endian in the array's dtype.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

MAGIC = b"FRC1"
#: Arrays of a record in their order on the wire, with their dtypes (little-endian).
ARRAYS: tuple[tuple[str, str], ...] = (
    ("tabular", "<f4"), ("dense", "<f4"), ("embedding", "<f4"), ("held", "<i4"), ("pair_product", "<i4"),
    ("pair_values", "<f4"), ("history", "<i4"), ("affinity", "<f8"), ("positives", "<i4"),
    ("declined_product", "<i4"), ("declined_ts", "<i8"), ("shown_product", "<i4"), ("shown_ts", "<i8"),
)  # fmt: skip
_ARROW = {"<f4": pa.float32(), "<f8": pa.float64(), "<i4": pa.int32(), "<i8": pa.int64()}
#: The columns of a producer's record batches: one row per customer.
RECORD_SCHEMA = pa.schema(
    [pa.field("user_id", pa.string(), nullable=False), pa.field("profile", pa.string()),
     pa.field("segment", pa.int64())]
    + [pa.field(name, pa.list_(_ARROW[dtype])) for name, dtype in ARRAYS]
)  # fmt: skip
_U32 = struct.Struct("<I")


@dataclass
class CustomerRecord:
    """A known customer at the snapshot, in the encodings of one model version.

    ``pair_values`` is (len(pair_product), n_pair_columns), rows sorted by product; ``declined`` maps a product
    row to its last decline and ``shown`` to its recent impression times, both within the guardrails' horizon
    (None: the service's own :class:`~finrec.serving.guardrails.LiveState` holds them).
    """

    tabular: np.ndarray
    dense: np.ndarray | None
    embedding: np.ndarray | None
    held: np.ndarray
    pair_product: np.ndarray
    pair_values: np.ndarray
    history: np.ndarray
    affinity: np.ndarray
    positives: np.ndarray
    segment: int | None
    profile: dict[str, Any]
    declined: dict[int, int] | None = None
    shown: dict[int, list[int]] | None = field(default=None)

    def arrays(self) -> dict[str, np.ndarray]:
        """The record's arrays by :data:`ARRAYS` name (flat), as written."""
        declined = self.declined or {}
        shown = [(p, t) for p, times in (self.shown or {}).items() for t in times]
        return {
            "tabular": self.tabular, "dense": _or_empty(self.dense), "embedding": _or_empty(self.embedding),
            "held": self.held, "pair_product": self.pair_product, "pair_values": self.pair_values.ravel(),
            "history": self.history, "affinity": self.affinity, "positives": self.positives,
            "declined_product": np.fromiter(declined.keys(), np.int64, len(declined)),
            "declined_ts": np.fromiter(declined.values(), np.int64, len(declined)),
            "shown_product": np.array([p for p, _ in shown], np.int64),
            "shown_ts": np.array([t for _, t in shown], np.int64),
        }  # fmt: skip


def _or_empty(a: np.ndarray | None) -> np.ndarray:
    return np.empty(0, np.float32) if a is None else a


def encode_arrays(profile: str, segment: int | None, arrays: dict[str, np.ndarray]) -> bytes:
    """Bytes of one record from its JSON ``profile``, ``segment`` and flat arrays (see the module for the layout)."""
    header = ('{"profile":' + profile + ',"segment":' + ("null" if segment is None else str(int(segment)))
              + "}").encode()  # fmt: skip
    parts = [MAGIC, _U32.pack(len(header)), header]
    for name, dtype in ARRAYS:
        a = np.ascontiguousarray(arrays[name], dtype=dtype)
        parts += [_U32.pack(len(a)), a.tobytes()]
    return b"".join(parts)


def encode(record: CustomerRecord) -> bytes:
    """Bytes of ``record`` (what :func:`decode` reads back)."""
    return encode_arrays(profile_json(record.profile), record.segment, record.arrays())


def decode(blob: bytes, n_pair: int) -> CustomerRecord:
    """The record ``blob`` holds; ``n_pair`` is the number of pair-history columns (from the manifest).

    Raises
    ------
    ValueError
        The bytes are not a record of this layout (another version, or truncated).
    """
    if blob[:4] != MAGIC:
        raise ValueError(f"not a finrec customer record of layout {MAGIC.decode()} (starts {blob[:4]!r})")
    (n,) = _U32.unpack_from(blob, 4)
    header = json.loads(blob[8 : 8 + n])
    at = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, dtype in ARRAYS:
        (count,) = _U32.unpack_from(blob, at)
        at += 4
        out[name] = np.frombuffer(blob, dtype=dtype, count=count, offset=at)
        at += count * out[name].itemsize
    if at != len(blob):
        raise ValueError(f"a customer record of {len(blob)} bytes holds {at}: truncated or of another layout")
    shown: dict[int, list[int]] = {}
    for p, t in zip(out["shown_product"].tolist(), out["shown_ts"].tolist(), strict=True):
        shown.setdefault(p, []).append(t)
    return CustomerRecord(
        tabular=out["tabular"], dense=out["dense"] if len(out["dense"]) else None,
        embedding=out["embedding"] if len(out["embedding"]) else None, held=out["held"].astype(np.int64),
        pair_product=out["pair_product"].astype(np.int64), pair_values=out["pair_values"].reshape(-1, n_pair),
        history=out["history"].astype(np.int64), affinity=out["affinity"],
        positives=out["positives"].astype(np.int64), segment=header["segment"], profile=header["profile"],
        declined=dict(zip(out["declined_product"].tolist(), out["declined_ts"].tolist(), strict=True)),
        shown=shown,
    )  # fmt: skip


def profile_json(profile: dict[str, Any]) -> str:
    """The profile as JSON: NaN as null (JSON has no NaN), numbers exactly (Python's float repr round-trips)."""
    return json.dumps({k: (None if isinstance(v, float) and v != v else v) for k, v in profile.items()},
                      separators=(",", ":"))  # fmt: skip


def to_batch(user_ids: list[str], records: list[CustomerRecord]) -> pa.RecordBatch:
    """An Arrow batch of :data:`RECORD_SCHEMA` holding ``records`` (what a producer yields)."""
    columns: dict[str, list[Any]] = {"user_id": user_ids, "profile": [profile_json(r.profile) for r in records],
                                     "segment": [r.segment for r in records]}  # fmt: skip
    flat = [r.arrays() for r in records]
    for name, _ in ARRAYS:
        columns[name] = [a[name] for a in flat]
    return pa.RecordBatch.from_pydict(columns, schema=RECORD_SCHEMA)


def encode_batch(batch: pa.RecordBatch) -> Iterator[tuple[str, bytes]]:
    """``(user_id, bytes)`` of each row of a :data:`RECORD_SCHEMA` batch (columns read once, rows sliced)."""
    batch = batch.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    ids = batch.column("user_id").to_pylist()
    profiles = batch.column("profile").to_pylist()
    segments = batch.column("segment").to_pylist()
    lists = {}
    for name, dtype in ARRAYS:
        col = batch.column(name)
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        lists[name] = (offsets, values)
    for i, uid in enumerate(ids):
        arrays = {name: values[offsets[i] : offsets[i + 1]] for name, (offsets, values) in lists.items()}
        yield uid, encode_arrays(profiles[i] or "{}", segments[i], arrays)
