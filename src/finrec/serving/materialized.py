"""Customers' serving records in Redis: the key layout, and what a replica reads at start-up and per request.

A replica that serves customers materialised by ``finrec materialize`` (``serve.customer_features``) loads no
customer at start-up: only the catalogue (products, their features at the snapshot, the customers' columns),
the rules, the model and its index. Each request reads its customer's record with one GET. So a replica starts in
the same time and memory for a thousand customers or a hundred million, and any number of replicas on any number
of hosts share one copy of the customers.

Keys, under the URL's ``prefix`` (default ``finrec``), with ``S`` = ``<prefix>:feat:<snapshot_id>:<model_version>:``:

* ``S + "manifest"``: JSON: snapshot id and cutoff, model version, customers written, the record layout and the
  catalogue's columns, a checksum of the records, when and from what it was written;
* ``S + "catalogue"``: a hash of Arrow IPC streams: ``products`` (the data's table), ``product_features`` (the
  snapshot's), ``users`` and ``user_features`` (the customers' columns, no rows);
* ``S + "c:" + user_id``: one customer's record (:mod:`finrec.serving.records`);
* ``<prefix>:feat:current:<model_version>``: the ``S`` a replica of that version serves, written last.

Why per snapshot *and* model version: a record holds the model's own encodings of the customer (the ranker's
customer block, the two-tower's input and embedding), so a request does no encoding work and two versions (a
champion and a challenger in an experiment) never read each other's. The ``current`` pointer is moved only once
every record and the manifest are written, so a replica never reads half a snapshot; the previous snapshot's
keys are given a time to live rather than deleted, so replicas started on it keep answering until they restart
or reload (they re-read the pointer when they load a model).
"""

from __future__ import annotations

import io
import json
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
import pyarrow as pa

from finrec.config import FinrecSettings
from finrec.data.dataset import Dataset, EventLog
from finrec.errors import ConfigError, FinrecError
from finrec.events.redis_store import _parse_redis_url
from finrec.features.builder import Snapshot
from finrec.serving.guardrails import GuardrailPolicy
from finrec.serving.records import CustomerRecord, decode
from finrec.serving.state import Catalogue, ServingData
from finrec.storage import CircuitBreaker, Guarded, StoreUnavailable

#: Version of the layout above; a replica refuses a manifest of another.
LAYOUT = 1


class MaterializedFeatures:
    """A Redis server holding materialised customers (``redis://host:port/db?prefix=name``).

    Raises
    ------
    FinrecError
        The URL is malformed, the redis package is missing or the server does not answer.
    """

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        scheme, host, port, db, _, prefix = _parse_redis_url(url)
        if scheme not in ("redis", "rediss"):
            raise ConfigError("customer features are read from Redis only",
                              hint="write redis://host:6379/0, optionally with ?prefix=name")  # fmt: skip
        try:
            import redis
        except ImportError as exc:
            raise ConfigError("materialised customers need the redis package",
                              hint="install it with `pip install 'finrec[redis]'`") from exc
        split = urlsplit(url.strip())
        self.address = f"{host}:{port}/{db}"  # never the URL: it may hold a password
        self.base = f"{prefix}:feat"
        # What redis-py opens (a writer in another process, a Spark task, opens its own client from it): it may hold
        # a password, so it is never printed.
        self.client_url, self.timeout = urlunsplit((scheme, split.netloc, split.path, "", "")), timeout
        pool = redis.ConnectionPool.from_url(self.client_url, socket_connect_timeout=timeout, socket_timeout=timeout)
        self.redis: Any = cast(Any, redis.Redis(connection_pool=pool))
        self.breaker: CircuitBreaker | None = None  # set by a service: requests then fail fast while Redis is down
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            pool.disconnect()
            raise FinrecError(f"the Redis server at {self.address} does not answer ({type(exc).__name__})",
                              hint="start it, or check the host, port, database and password of the URL") from exc

    # -- keys -------------------------------------------------------------------------------------------
    def prefix(self, snapshot_id: str, model_version: str) -> str:
        return f"{self.base}:{snapshot_id}:{model_version}:"

    def pointer(self, model_version: str) -> str:
        return f"{self.base}:current:{model_version}"

    # -- reading ----------------------------------------------------------------------------------------
    def current(self, model_version: str) -> str:
        """The prefix serving ``model_version``; raises :class:`FinrecError` when none was materialised."""
        found = self.redis.get(self.pointer(model_version))
        if found is None:
            raise FinrecError(f"no customers are materialised for model version {model_version} at "
                              f"{self.address} (no key {self.pointer(model_version)})",
                              hint="run `finrec materialize --data DATA --model-dir BUNDLE --redis URL` for this "
                              "bundle, or serve without serve.customer_features")  # fmt: skip
        prefix = found.decode()
        manifest = self.manifest(prefix)
        if manifest is None:
            raise FinrecError(f"the materialised customers of model version {model_version} ({prefix}) are gone "
                              f"from {self.address}",
                              hint="run `finrec materialize` again for this bundle")  # fmt: skip
        return prefix

    def manifest(self, prefix: str) -> dict[str, Any] | None:
        raw = self.redis.get(prefix + "manifest")
        if raw is None:
            return None
        manifest: dict[str, Any] = json.loads(raw)
        if manifest.get("layout") != LAYOUT:
            raise FinrecError(f"the materialised customers under {prefix} have layout {manifest.get('layout')}, "
                              f"this finrec reads layout {LAYOUT}",
                              hint="run `finrec materialize` again with this version of finrec")  # fmt: skip
        return manifest

    def catalogue(self, prefix: str, manifest: dict[str, Any]) -> tuple[Dataset, Catalogue]:
        """The products, the customers' columns and the products' features at the snapshot (no customers)."""
        tables = {k.decode(): _from_ipc(v) for k, v in self.redis.hgetall(prefix + "catalogue").items()}
        missing = {"products", "product_features", "users", "user_features"} - set(tables)
        if missing:
            raise FinrecError(f"the catalogue under {prefix} lacks {sorted(missing)}",
                              hint="run `finrec materialize` again")  # fmt: skip
        empty = EventLog(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.int8), np.empty(0, np.int64),
                         np.empty(0, np.int16))  # fmt: skip
        from pathlib import Path

        ds = Dataset(Path(manifest["data"]), tables["users"], tables["products"], empty, manifest["data_fingerprint"])
        cols = manifest["catalogue"]
        snap = Snapshot(
            cutoff=int(manifest["cutoff"]), users=tables["user_features"], products=tables["product_features"],
            user_numeric=cols["user_numeric"], user_categorical=cols["user_categorical"],
            product_numeric=cols["product_numeric"], product_categorical=cols["product_categorical"],
            held=pd.DataFrame({"user": np.empty(0, np.int64), "product": np.empty(0, np.int64)}),
            category_codes=np.asarray(cols["category_codes"], dtype=np.int64), n_categories=int(cols["n_categories"]),
            category_affinity=np.zeros((0, int(cols["n_categories"]) + 1)),
        )  # fmt: skip
        return ds, Catalogue(snap, list(cols["pair_names"]), bool(cols["any_held"]), int(manifest["customers"]),
                             str(manifest["snapshot_id"]))

    def customers(self, prefix: str, manifest: dict[str, Any]) -> RedisCustomers:
        return RedisCustomers(self.redis, prefix, len(manifest["catalogue"]["pair_names"]), self.address)

    def customers_for(self, model_version: str, snapshot_id: str) -> Any:
        """The records of ``model_version`` on ``snapshot_id`` (what the service's catalogue came from), through the
        service's circuit breaker; raises :class:`FinrecError` when that version has none on that snapshot."""
        prefix = self.current(model_version)
        manifest = self.manifest(prefix) or {}
        if manifest.get("snapshot_id") != snapshot_id:
            raise FinrecError(f"model version {model_version} is materialised from snapshot "
                              f"{manifest.get('snapshot_id')}, this service serves snapshot {snapshot_id}",
                              hint="materialise every model the service may serve from the same data "
                              "(`finrec materialize`), then restart the replicas")  # fmt: skip
        customers = self.customers(prefix, manifest)
        return customers if self.breaker is None else Guarded(customers, self.breaker)

    def ping(self) -> bool:
        """Whether the server answers (through the breaker when there is one)."""
        call = self.redis.ping
        return bool(call() if self.breaker is None else self.breaker.call(call))

    def close(self) -> None:
        self.redis.close()


class RedisCustomers:
    """Customer records under one prefix: one GET per request (no local cache: see docs/scale.md)."""

    def __init__(self, client: Any, prefix: str, n_pair: int, address: str) -> None:
        self.redis, self.prefix, self.n_pair, self.address = client, prefix, n_pair, address

    def find(self, user_id: str) -> CustomerRecord | None:
        blob = self.redis.get(self.prefix + "c:" + user_id)
        if blob is not None:
            return decode(blob, self.n_pair)
        if not self.redis.exists(self.prefix + "manifest"):  # the whole snapshot expired, not this customer
            raise StoreUnavailable(f"the materialised customers under {self.prefix} are gone from {self.address}",
                                   hint="run `finrec materialize` again and restart (or reload) the service")
        return None

    def known(self, user_ids: list[str]) -> set[str]:
        pipe = self.redis.pipeline(transaction=False)
        for u in user_ids:
            pipe.exists(self.prefix + "c:" + u)
        return {u for u, hit in zip(user_ids, pipe.execute(), strict=True) if hit}

    def sample(self, n: int) -> list[CustomerRecord]:
        """Up to ``n`` records (to warm a model up)."""
        keys = self.redis.scan(0, match=self.prefix + "c:*", count=max(100, n))[1][:n]
        blobs = self.redis.mget(keys) if keys else []
        return [decode(b, self.n_pair) for b in blobs if b is not None]


def materialized_data(settings: FinrecSettings, model_version: str, policy: GuardrailPolicy) -> ServingData:
    """The service's data when its customers are materialised in Redis: the catalogue only (no customer loaded).

    Raises
    ------
    FinrecError
        Redis does not answer, nothing is materialised for ``model_version``, or the records were written for
        guardrail windows shorter than the service's (they would miss declines and impressions).
    """
    srv = settings.serve
    assert srv.customer_features is not None
    features = MaterializedFeatures(srv.customer_features, srv.store_timeout_seconds)
    features.breaker = CircuitBreaker("customer features", srv.breaker_failures, srv.breaker_reset_seconds)
    prefix = features.current(model_version)
    manifest = features.manifest(prefix) or {}
    horizon = max(policy.cooling_off_days, policy.frequency_window_days)
    if float(manifest.get("guard_horizon_days", 0)) < horizon:
        raise FinrecError(f"the customers under {prefix} carry {manifest.get('guard_horizon_days')} days of declines "
                          f"and impressions, the guardrails need {horizon:g}",
                          hint="run `finrec materialize` again with this service's settings (serve.cooling_off_days, "
                          "serve.frequency_window_days)")  # fmt: skip
    ds, catalogue = features.catalogue(prefix, manifest)
    catalogue.source = features
    return ServingData(ds, settings, catalogue=catalogue)


def to_ipc(frame: pd.DataFrame) -> bytes:
    """A frame as an Arrow IPC stream (the catalogue's tables)."""
    sink = io.BytesIO()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(blob: bytes) -> pd.DataFrame:
    frame: pd.DataFrame = pa.ipc.open_stream(blob).read_all().to_pandas()
    return frame
