"""Assembling a running service from settings: data, model, guardrail state, event store, audit log.

:class:`Service` owns what lives as long as the process (the recommender, its
stores, the metrics) and performs hot reloads: the new bundle is loaded,
checked and warmed up beside the serving one, then swapped in with one
assignment. A bundle that fails any step is refused with the reason and the
old model keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from finrec.config import FinrecSettings
from finrec.data.dataset import load_dataset
from finrec.errors import ArtifactError, FinrecError
from finrec.events.store import EventStore, open_event_store
from finrec.features.online import open_online_store
from finrec.pipeline import load_model
from finrec.serving.audit import AuditLog, load_or_create_key
from finrec.serving.guardrails import GuardrailPolicy, LiveState
from finrec.serving.metrics import ServiceMetrics
from finrec.serving.recommender import Recommender
from finrec.serving.scoring import ServingModel
from finrec.serving.state import ServingData

log = logging.getLogger("finrec.serving")
_WARM_UP_CUSTOMERS = 8


def load_serving_model(model_dir: Path, data: ServingData) -> ServingModel:
    """Load, check and warm up a bundle against the service's data; raises :class:`ArtifactError` if unusable."""
    try:
        model, manifest = load_model(model_dir)
        served = ServingModel(model, manifest, data)
        rows = np.linspace(0, max(data.n_users - 1, 0), min(_WARM_UP_CUSTOMERS, data.n_users)).astype(np.int64)
        served.warm_up(rows)
    except FinrecError:
        raise
    except Exception as exc:  # a bundle that loads but breaks on use is as unusable as a missing one
        raise ArtifactError(
            f"model bundle {model_dir} cannot serve: {type(exc).__name__}: {exc}",
            hint="retrain it with `finrec train`; the current model keeps serving",
        ) from exc
    return served


class Service:
    """One service process: recommender, stores, metrics and the model-swap lock."""

    def __init__(self, settings: FinrecSettings, recommender: Recommender, model_dir: Path,
                 audit_path: Path | None, audit_key: bytes | None) -> None:  # fmt: skip
        self.settings = settings
        self.recommender = recommender
        self.model_dir = model_dir
        self.audit_path = audit_path
        self.audit_key = audit_key
        self.metrics = ServiceMetrics()
        self.metrics.set_model(recommender.model.version)
        self.started = time.time()
        self._reload_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: FinrecSettings, model_dir: Path | None = None, data_dir: Path | None = None,
                      audit: bool = True) -> Service:  # fmt: skip
        """Load everything ``finrec serve`` needs; raises :class:`FinrecError` with a hint when something is wrong."""
        srv = settings.serve
        model_dir = model_dir or srv.model_dir
        if model_dir is None:
            raise FinrecError("no model to serve", hint="pass --model-dir (a bundle written by `finrec train`)")
        t0 = time.perf_counter()
        model, manifest = load_model(model_dir)
        data_dir = data_dir or srv.data or Path(manifest.get("inputs", {}).get("data", ""))
        if not data_dir or not Path(data_dir).is_dir():
            raise FinrecError(f"the customers' data folder {data_dir} does not exist",
                              hint="pass --data (the dataset with the customers and products to serve)")  # fmt: skip
        ds = load_dataset(Path(data_dir), future_tolerance_seconds=settings.validation.future_tolerance_seconds)
        data = ServingData(ds, settings)
        served = load_serving_model(model_dir, data)
        policy = GuardrailPolicy(srv.cooling_off_days, srv.frequency_cap, srv.frequency_window_days,
                                 srv.require_marketing_consent)  # fmt: skip
        events = open_event_store(srv.event_store_url(settings.workspace))
        online = open_online_store(srv.online_store)
        live = LiveState(policy, online)
        live.seed(data)
        if srv.online_store.startswith("memory:"):
            replayed = replay(events, live)
            log.info("online features rebuilt from the event store", extra={"events": replayed})
        audit_log = key = audit_path = None
        if audit:
            audit_path, key_path = srv.audit_paths(settings.workspace)
            key = load_or_create_key(key_path)
            audit_log = AuditLog(audit_path, key)
        clock = make_clock(srv.clock, data.cutoff, settings.workspace / "clock.json")
        recommender = Recommender(served, live, events, audit_log, clock=clock,
                                  future_tolerance_seconds=settings.validation.future_tolerance_seconds,
                                  max_reasons=srv.max_reasons, max_events=srv.max_events_per_request)  # fmt: skip
        seconds = round(time.perf_counter() - t0, 2)
        log.info("service ready", extra={"model_version": served.version, "customers": data.n_users,
                                         "products": data.n_products, "seconds": seconds})  # fmt: skip
        return cls(settings, recommender, Path(model_dir), audit_path, key)

    def reload(self, model_dir: Path | None = None) -> dict[str, Any]:
        """Load ``model_dir`` (default: the current folder again) and swap it in; the old model serves until then."""
        target = Path(model_dir) if model_dir else self.model_dir
        with self._reload_lock:  # one reload at a time; requests never wait on this lock
            t0 = time.perf_counter()
            try:
                served = load_serving_model(target, self.recommender.model.data)
            except FinrecError:
                self.metrics.reloads.labels("refused").inc()
                raise
            old = self.recommender.swap(served)
            self.model_dir = target
            self.metrics.set_model(served.version)
            self.metrics.reloads.labels("ok").inc()
        return {"previous_version": old, "model_version": served.version, "model_dir": str(target),
                "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip

    def close(self) -> None:
        if self.recommender.audit is not None:
            self.recommender.audit.close()
        self.recommender.events.close()
        self.recommender.live.store.close()


def replay(events: EventStore, live: LiveState, batch: int = 10_000) -> int:
    """Apply every stored event to an empty in-process online store (its state after a restart)."""
    seq, n = 0, 0
    while True:
        chunk = events.read(after=seq, limit=batch)
        if not chunk:
            return n
        live.record([e for _, e in chunk])
        seq, n = chunk[-1][0], n + len(chunk)


def make_clock(kind: str, data_cutoff: int, state: Path | None = None) -> Callable[[], float]:
    """``wall``: the machine's time. ``data``: the data's end plus the time since the service first started on it.

    The data clock is the wall clock minus a fixed offset, stored in ``state`` (``<workspace>/clock.json``) the
    first time a service starts on this data, so that every worker and every restart agree on the time:
    events stamped before a restart are not in the future after it.
    """
    if kind == "wall":
        return time.time
    offset = time.time() - data_cutoff
    if state is not None:
        offset = _shared_offset(state, data_cutoff, offset)
    return lambda: time.time() - offset


def _shared_offset(state: Path, data_cutoff: int, proposed: float) -> float:
    try:
        saved = json.loads(state.read_text())
        if int(saved["data_cutoff"]) == data_cutoff:
            return float(saved["offset"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(f".{state.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"data_cutoff": data_cutoff, "offset": proposed}))
    try:
        os.link(tmp, state)  # the first worker to get here sets the clock; the others read it
    except FileExistsError:
        try:
            saved = json.loads(state.read_text())
            if int(saved["data_cutoff"]) == data_cutoff:
                return float(saved["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        os.replace(tmp, state)  # a clock of other data: this data's clock starts now
        return proposed
    finally:
        tmp.unlink(missing_ok=True)
    return proposed
