"""``finrec retrain``: the feedback since the last training, a new model on it, registered as the challenger.

1. **What the last training saw.** The newest registered version's entry names the dataset it was trained on
   (``--data`` overrides); everything in the service's event store after that dataset's last event is new.
2. **A new dataset version.** The base dataset's users and products (hard links when the filesystem allows,
   else copies) and its events plus the new ones, in one ``events.parquet`` written by DuckDB without loading
   the table into Python, into ``<workspace>/datasets/<time>/`` with a manifest (base, fingerprint, counts).
   New events for customers or products the dataset does not hold are left out and counted; event ids already
   in the base are left out (a re-delivery).
3. **Train** the two-stage model on it (the ``[retrain]`` windows, when set, replace ``[train]``'s: a model
   that must learn from a few days of feedback needs label windows of days, not months).
4. **Register** the bundle as the ``challenger``, then **evaluate** it and the champion on the challenger's
   held-out window (:mod:`finrec.lifecycle.compare`) and run the **gate**; ``promote`` then promotes it when
   the gate passes.

``if_drift`` makes the job conditional on drift: it trains only when a drift alert was stored after the
champion was registered (``finrec monitor`` stores them) or when the drift check of the champion on the new
dataset version alerts now (the alert is then stored too). This is how a drift alert triggers retraining from
cron or a scheduler; without an alert the new dataset version is removed and nothing is trained.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from finrec.artifacts import atomic_dir, write_manifest
from finrec.config import FinrecSettings
from finrec.data.contract import EVENTS
from finrec.data.dataset import load_dataset
from finrec.data.io import column_types, find_tables, is_text_type, open_dataset, quote_ident
from finrec.errors import FinrecError
from finrec.events.schema import Event
from finrec.events.store import open_existing_event_store
from finrec.registry import CHALLENGER, CHAMPION, GateResult, ModelRegistry, PromotionRefused, check_gate

log = logging.getLogger("finrec.lifecycle")
DATASET_KIND = "dataset"


@dataclass
class RetrainResult:
    """What a retraining run did (``ran`` is false when there was nothing to do, with the reason)."""

    ran: bool
    reason: str
    champion: str | None = None
    challenger: str | None = None
    dataset: str | None = None
    bundle: str | None = None
    new_events: int = 0
    left_out: dict[str, int] = field(default_factory=dict)
    gate: GateResult | None = None
    promoted: bool = False
    evaluations: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "gate"}
        out["gate"] = None if self.gate is None else self.gate.to_dict()
        return out


def drift_alert_since(settings: FinrecSettings, since_iso: str | None) -> dict[str, Any] | None:
    """The newest stored drift alert after ``since_iso`` (ISO time), if any."""
    from finrec.monitoring.alerts import alerts_path, read_alerts

    alerts = [a for a in read_alerts(alerts_path(settings.workspace), None) if a.get("kind") == "drift"]
    fresh = [a for a in alerts if since_iso is None or str(a.get("time", "")) > since_iso]
    return fresh[-1] if fresh else None


def new_events(events: Iterable[Event], after: int, users: set[str], products: set[str]
               ) -> tuple[list[Event], dict[str, int]]:  # fmt: skip
    """Events at or after ``after`` (Unix s) of known customers and products; and counts of what was left out."""
    kept: list[Event] = []
    left = {"before_the_data_end": 0, "unknown_customer": 0, "unknown_product": 0}
    for e in events:
        if e.ts < after:
            left["before_the_data_end"] += 1
        elif e.user_id not in users:
            left["unknown_customer"] += 1
        elif e.product_id not in products:
            left["unknown_product"] += 1
        else:
            kept.append(e)
    return kept, {k: v for k, v in left.items() if v}


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)  # immutable inputs: a hard link costs nothing and cannot drift from the original
    except OSError:
        shutil.copy2(src, dst)


def extend_dataset(base: Path, events: list[Event], out: Path, note: dict[str, Any] | None = None) -> Path:
    """Write ``out``: ``base`` with ``events`` appended (see the module docstring); returns ``out``."""
    tables = find_tables(base)
    con = open_dataset(base)
    try:
        types = {c: t for c, t in column_types(con, "events").items() if c != "__row"}
        known = {c.name for c in EVENTS.columns}
        new = pa.table({
            "event_id": pa.array([e.event_id for e in events], pa.string()),
            "user_id": pa.array([e.user_id for e in events], pa.string()),
            "product_id": pa.array([e.product_id for e in events], pa.string()),
            "event_type": pa.array([e.event_type for e in events], pa.string()),
            "timestamp": pa.array([datetime.fromtimestamp(e.ts, UTC) for e in events], pa.timestamp("s", "UTC")),
            "request_id": pa.array([e.request_id for e in events], pa.string()),
            "position": pa.array([e.position for e in events], pa.int64()),
            "channel": pa.array([e.channel for e in events], pa.string()),
        })  # fmt: skip
        con.register("new_events", new)
        cols = list(types) + [c for c in new.column_names if c not in types and c in known]
        # Ids go out as text: the service's ids are text (uuids), a bank's may be integers, and the contract reads
        # either. Other columns keep the base's type; text timestamps (a CSV base) as ISO 8601 in UTC.
        ids = {"event_id", "user_id", "product_id", "request_id"}

        def out_type(c: str) -> str:
            return "VARCHAR" if c in ids or c not in types else types[c]

        def new_value(c: str) -> str:
            col = quote_ident(c)
            if c == "timestamp" and is_text_type(out_type(c)):
                return f"strftime({col}, '%Y-%m-%dT%H:%M:%SZ')"
            return f"CAST({col} AS {out_type(c)})"

        base_sel = ", ".join(f"CAST({quote_ident(c)} AS {out_type(c)}) AS {quote_ident(c)}" for c in types)
        new_sel = ", ".join(f"{new_value(c)} AS {quote_ident(c)}" for c in cols if c in new.column_names)
        dedupe = ""
        if "event_id" in types:  # a re-delivered event is already in the base
            dedupe = " WHERE event_id NOT IN (SELECT CAST(event_id AS VARCHAR) FROM events WHERE event_id IS NOT NULL)"
        with atomic_dir(out) as tmp:
            for name in ("users", "products"):
                if tables[name].is_dir():  # a folder of part files (a Spark-written table)
                    shutil.copytree(tables[name], tmp / tables[name].name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(tables[name], tmp / tables[name].name)
            truth = Path(base) / "ground_truth"
            if (truth / "world.json").is_file():  # a synthetic world: the same world, so the same truth (oracle)
                shutil.copytree(truth, tmp / "ground_truth", copy_function=_link_or_copy)
            target = str(tmp / "events.parquet").replace("'", "''")
            con.execute(f"COPY (SELECT {base_sel} FROM events UNION ALL BY NAME "
                        f"SELECT {new_sel} FROM new_events{dedupe}) TO '{target}' (FORMAT parquet)")  # fmt: skip
            inputs = {"base": str(Path(base).resolve()), "appended_events": len(events), **(note or {})}
            write_manifest(tmp, DATASET_KIND, config={}, inputs=inputs)
    finally:
        con.close()
    return out


@dataclass
class Feedback:
    """The service's events since the last training's data ends (:func:`collect_feedback`)."""

    base: Path
    events: list[Event]
    left_out: dict[str, int]
    after: int
    store_url: str

    @property
    def since(self) -> str:
        return datetime.fromtimestamp(self.after, UTC).isoformat(timespec="seconds")


def collect_feedback(settings: FinrecSettings, registry: ModelRegistry, data: Path | None = None) -> Feedback:
    """The events of the service's store after the last training's dataset (``data`` overrides it), of known
    customers and products; raises :class:`FinrecError` when there is no dataset to extend."""
    from finrec.monitoring.conversion import iter_events

    # The last training is the newest registered version's (a refused challenger's too): its dataset already
    # holds the feedback before it, so the datasets chain and no event is appended twice.
    versions = registry.versions()
    last = registry.entry(versions[-1]) if versions else None
    base = Path(data) if data else Path(last["data"].get("data", "")) if last else None
    if base is None:
        raise FinrecError("nothing to retrain from: the registry has no champion and no --data was given",
                          hint="pass --data (the dataset to extend), or register and promote a model first")
    if not base.is_dir():
        raise FinrecError(f"the dataset {base} does not exist",
                          hint="pass --data with the dataset the champion was trained on (or a newer one)")  # fmt: skip
    ds = load_dataset(base, future_tolerance_seconds=settings.validation.future_tolerance_seconds)
    after = int(ds.time_range[1]) + 1
    store_url = settings.serve.event_store_url(settings.workspace)
    store = open_existing_event_store(store_url)
    try:
        users, products = set(ds.users["user_id"].astype(str)), set(ds.products["product_id"].astype(str))
        events, left_out = new_events((e for _, e in iter_events(store)), after, users, products)
    finally:
        store.close()
    return Feedback(base, events, left_out, after, store_url)


def retrain(settings: FinrecSettings, *, data: Path | None = None, if_drift: bool = False, promote: bool = False,
            min_events: int | None = None, progress: bool = True) -> RetrainResult:  # fmt: skip
    """Run the retraining job (see the module docstring); raises :class:`FinrecError` on anything to fix."""
    from finrec.lifecycle.compare import evaluate_versions
    from finrec.pipeline import train

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    registry = ModelRegistry.from_settings(settings)
    champion = registry.resolve(CHAMPION)
    entry = registry.entry(champion) if champion else None
    if if_drift and champion is None:
        raise FinrecError("--if-drift needs a champion whose drift to check",
                          hint="register and promote a model first, or retrain without --if-drift")  # fmt: skip
    feedback = collect_feedback(settings, registry, data)
    base, events, left_out, after = feedback.base, feedback.events, feedback.left_out, feedback.after
    store_url = feedback.store_url
    need = settings.retrain.min_new_events if min_events is None else min_events
    since = datetime.fromtimestamp(after, UTC).isoformat(timespec="seconds")
    if len(events) < need:
        return RetrainResult(False, f"{len(events)} new events since {since} (fewer than {need})", champion,
                             new_events=len(events), left_out=left_out)  # fmt: skip
    seconds["collect"] = time.perf_counter() - t0
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%S}"
    folder = settings.workspace / "datasets" / stamp
    t1 = time.perf_counter()
    extend_dataset(base, events, folder, {"event_store": _redacted(store_url), "since": since,
                                          "left_out": left_out})  # fmt: skip
    seconds["dataset"] = time.perf_counter() - t1
    drift = None
    if if_drift:
        assert entry is not None and champion is not None
        alert = drift_alert_since(settings, entry.get("registered_at"))
        if alert is None:  # no stored alert: check the champion's inputs on the data with the new events
            from finrec.monitoring.alerts import AlertLog, alerts_path
            from finrec.monitoring.drift import check_drift

            t1 = time.perf_counter()
            drift = check_drift(registry.path(champion), folder, settings)
            seconds["drift_check"] = time.perf_counter() - t1
            alert = AlertLog(alerts_path(settings.workspace)).record_drift(drift)
        if alert is None:
            shutil.rmtree(folder, ignore_errors=True)
            return RetrainResult(False, f"no drift alert: the champion's inputs on {len(events)} new events are "
                                 "within the thresholds", champion, new_events=len(events), left_out=left_out,
                                 drift=None if drift is None else drift.to_dict())  # fmt: skip
    t1 = time.perf_counter()
    bundle = settings.workspace / "models" / stamp
    train(folder, bundle, _retrain_settings(settings), progress=progress)
    seconds["train"] = time.perf_counter() - t1
    version = registry.register(bundle, alias=CHALLENGER, by="retrain",
                                reason=f"{len(events)} new events since {since}")  # fmt: skip
    t1 = time.perf_counter()
    refs = [version] + ([champion] if champion else [])
    evaluated = evaluate_versions(registry, refs, folder, settings, progress=progress)
    seconds["evaluate"] = time.perf_counter() - t1
    result = RetrainResult(True, f"{len(events)} new events since {since}", champion, version, str(folder),
                           str(bundle), len(events), left_out,
                           evaluations={v: rec for v, (_, rec) in evaluated.items()},
                           drift=None if drift is None else drift.to_dict())  # fmt: skip
    if champion:
        r = settings.registry
        result.gate = check_gate(registry.entry(version), registry.entry(champion), r.gate_metric, r.max_regression)
    if promote:
        try:
            registry.promote(version, by="retrain", reason="retrained; passed the gate")
            result.promoted = True
        except PromotionRefused as exc:
            result.gate = exc.gate
    seconds["total"] = time.perf_counter() - t0
    result.seconds = {k: round(v, 2) for k, v in seconds.items()}
    return result


def _retrain_settings(settings: FinrecSettings) -> FinrecSettings:
    r = settings.retrain
    changes = {k: v for k, v in (("eval_days", r.eval_days), ("label_days", r.label_days)) if v is not None}
    if not changes:
        return settings
    return settings.model_copy(update={"train": settings.train.model_copy(update=changes)})


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return urlunsplit(parts)


def result_json(result: RetrainResult) -> str:
    return json.dumps(result.to_dict(), indent=1, default=str)
