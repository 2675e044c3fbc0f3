"""Assembling a running service from settings: data, models, guardrail state, event store, audit log.

:class:`Service` owns what lives as long as the process (the recommender, its
stores, the metrics) and performs hot reloads: a new bundle is loaded, checked
and warmed up beside the serving one, then swapped in with one assignment. A
bundle that fails any step is refused with the reason and the old model keeps
serving.

Models come from a fixed bundle (``--model-dir``) or from the model registry:
then the service serves the ``champion`` outside experiments and each arm's
model inside them, and follows alias changes (:mod:`finrec.serving.deployment`).
The last few models loaded stay in memory, so a rollback to one of them is a
pointer swap.
"""

from __future__ import annotations

import dataclasses
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
from finrec.events.store import open_event_store
from finrec.experiments.assignment import DEFAULT_MODEL, Assigner
from finrec.features.online import open_online_store
from finrec.features.online.follow import EventFollower
from finrec.monitoring.exported import MonitoringCollector
from finrec.pipeline import load_model
from finrec.serving.audit import AuditLog, load_or_create_key
from finrec.serving.deployment import BundleSource, ModelSource, RegistrySource, RegistryWatcher
from finrec.serving.guardrails import GuardrailPolicy, LiveState
from finrec.serving.metrics import ServiceMetrics
from finrec.serving.recommender import Recommender
from finrec.serving.request_ids import RequestSigner
from finrec.serving.scoring import ServingModel, version_of
from finrec.serving.state import ServingData
from finrec.storage import CircuitBreaker, Guarded, StoreUnavailable, store_unavailable

log = logging.getLogger("finrec.serving")
_WARM_UP_CUSTOMERS = 8


class ModelRefused(FinrecError):
    """A model version cannot serve (its bundle does not load, check or warm up): the alias is left as it was."""

#: Models kept loaded beyond those serving, so that rolling back to a recent one is instant.
_KEEP_LOADED = 2


def load_serving_model(model_dir: Path, data: ServingData) -> ServingModel:
    """Load, check and warm up a bundle against the service's data; raises :class:`ArtifactError` if unusable.

    A service without the customers' rows (``serve.customer_features``) reads the records materialised for this
    bundle's version from the same snapshot; a version without them is refused like a broken bundle.
    """
    try:
        model, manifest = load_model(model_dir)
        customers = None
        if data.catalogue is not None:
            customers = data.catalogue.source.customers_for(version_of(manifest), data.catalogue.snapshot_id)
        served = ServingModel(model, manifest, data, customers)
        if customers is not None:
            records = customers.sample(_WARM_UP_CUSTOMERS)
        else:
            rows = np.linspace(0, max(data.n_users - 1, 0), min(_WARM_UP_CUSTOMERS, data.n_users)).astype(np.int64)
            records = [served.record(int(r)) for r in rows]
        served.warm_up(records)
    except FinrecError:
        raise
    except Exception as exc:  # a bundle that loads but breaks on use is as unusable as a missing one
        raise ArtifactError(
            f"model bundle {model_dir} cannot serve: {type(exc).__name__}: {exc}",
            hint="retrain it with `finrec train`; the current model keeps serving",
        ) from exc
    return served


class Service:
    """One service process: recommender, stores, metrics, where models come from, and the model-swap lock."""

    def __init__(self, settings: FinrecSettings, recommender: Recommender, model_dir: Path,
                 audit_path: Path | None, audit_key: bytes | None, source: ModelSource | None = None,
                 loaded: dict[str, str] | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.recommender = recommender
        self.model_dir = model_dir
        self.audit_path = audit_path
        self.audit_key = audit_key
        self.source: ModelSource = source or BundleSource(model_dir)
        self.metrics = ServiceMetrics()
        self.metrics.registry.register(MonitoringCollector(settings.workspace))  # drift, conversion, alerts firing
        self.metrics.set_models(self.versions().values())
        self.started = time.time()
        self._reload_lock = threading.Lock()
        self._loaded: dict[str, str] = dict(loaded or {DEFAULT_MODEL: str(model_dir)})  # ref -> source key
        self._failed: dict[str, str] = {}  # ref -> source key refused (not retried until the reference moves)
        self._cache: dict[str, ServingModel] = {}  # source key -> model, recently replaced ones
        self._watcher: RegistryWatcher | None = None
        self.blocking = False  # stores that may wait on a disk or the network: call them off the event loop
        self.models_root = Path(model_dir).resolve().parent

    @classmethod
    def from_settings(cls, settings: FinrecSettings, model_dir: Path | None = None, data_dir: Path | None = None,
                      audit: bool = True, watch: bool = True) -> Service:  # fmt: skip
        """Load everything ``finrec serve`` needs; raises :class:`FinrecError` with a hint when something is wrong.

        With a bundle (``model_dir`` or ``serve.model_dir``) the service serves it; without one it serves the
        registry's ``champion`` (``registry.root``/``registry.name``) and the experiments' arms, following alias
        changes every ``registry.poll_seconds`` when ``watch``.
        """
        srv = settings.serve
        model_dir = model_dir or srv.model_dir
        assigner = Assigner(settings.experiments, DEFAULT_MODEL)
        source: ModelSource
        if model_dir is not None:
            source = BundleSource(Path(model_dir))
            needs = [r for r in assigner.models() if r != DEFAULT_MODEL]
            if needs:
                raise FinrecError(f"the experiments need models {needs}, but --model-dir serves a single bundle",
                                  hint="serve from the registry (leave out --model-dir) or remove the experiments "
                                  "from the settings")  # fmt: skip
        else:
            from finrec.registry import ModelRegistry

            registry = ModelRegistry.from_settings(settings)
            source = RegistrySource(registry)
        default = source.resolve(DEFAULT_MODEL)
        if default is None:
            raise FinrecError("no model to serve: the registry has no champion",
                              hint="pass --model-dir (a bundle written by `finrec train`), or register and promote "
                              "one: `finrec registry register BUNDLE` then `finrec registry promote VERSION`")
        t0 = time.perf_counter()
        _, manifest = load_model(default[1])
        policy = GuardrailPolicy(srv.cooling_off_days, srv.frequency_cap, srv.frequency_window_days,
                                 srv.require_marketing_consent)  # fmt: skip
        if srv.customer_features:
            from finrec.serving.materialized import materialized_data

            data = materialized_data(settings, version_of(manifest), policy)
        else:
            data_dir = data_dir or srv.data or Path(manifest.get("inputs", {}).get("data", ""))
            if not data_dir or not Path(data_dir).is_dir():
                raise FinrecError(f"the customers' data folder {data_dir} does not exist",
                                  hint="pass --data (the dataset with the customers and products to serve)")
            ds = load_dataset(Path(data_dir), future_tolerance_seconds=settings.validation.future_tolerance_seconds)
            data = ServingData(ds, settings)
        served = load_serving_model(default[1], data)
        loaded = {DEFAULT_MODEL: default[0]}
        others: dict[str, ServingModel] = {}
        by_key = {default[0]: served}
        for ref in assigner.models():
            found = source.resolve(ref) if ref != DEFAULT_MODEL else None
            if found is None:
                if ref != DEFAULT_MODEL:
                    log.warning("an experiment arm's model is not in the registry; the champion answers for it",
                                extra={"ref": ref})  # fmt: skip
                continue
            if found[0] not in by_key:
                by_key[found[0]] = load_serving_model(found[1], data)
            others[ref], loaded[ref] = by_key[found[0]], found[0]
        event_url = srv.event_store_url(settings.workspace)
        events: Any = open_event_store(event_url, settings.events.durability, srv.store_timeout_seconds)
        online: Any = open_online_store(srv.online_store, timeout=srv.store_timeout_seconds)
        blocking = not (event_url.startswith("memory:") and srv.online_store.startswith("memory:")
                        and data.catalogue is None)  # fmt: skip
        if not event_url.startswith("memory:"):  # stores that can fail fail fast while they are down
            events = Guarded(events, CircuitBreaker("event store", srv.breaker_failures, srv.breaker_reset_seconds))
        if not srv.online_store.startswith("memory:"):
            online = Guarded(online, CircuitBreaker("online store", srv.breaker_failures,
                                                    srv.breaker_reset_seconds))  # fmt: skip
        live = LiveState(policy, online)
        live.seed(data)
        follower = EventFollower(events, online)
        try:
            applied = follower.sync()  # a memory:// store is rebuilt; others catch up with what they missed
            log.info("online features caught up with the event store", extra={"events": applied})
        except StoreUnavailable as exc:  # serve anyway: requests answer 503 until the store is back
            log.error("online features cannot catch up now; retrying in the background",
                      extra={"error": exc.message})  # fmt: skip
        audit_log = key = audit_path = None
        if audit:
            audit_path, key_path = srv.audit_paths(settings.workspace)
            key = load_or_create_key(key_path)
            audit_log = AuditLog(audit_path, key)
        signer = RequestSigner(load_or_create_key(srv.request_key_path(settings.workspace)))
        clock = make_clock(srv.clock, data.cutoff, settings.workspace / "clock.json", srv.clock_speed)
        recommender = Recommender(served, live, events, audit_log, clock=clock,
                                  future_tolerance_seconds=settings.validation.future_tolerance_seconds,
                                  max_reasons=srv.max_reasons, max_events=srv.max_events_per_request,
                                  assigner=assigner, models=others, signer=signer,
                                  request_max_age_seconds=srv.request_id_max_age_days * 86_400,
                                  follower=follower)  # fmt: skip
        seconds = round(time.perf_counter() - t0, 2)
        log.info("service ready", extra={"model_version": served.version, "customers": data.n_customers,
                                         "products": data.n_products, "seconds": seconds,
                                         "models": {r: m.version for r, m in recommender.models().items()},
                                         "source": source.kind})  # fmt: skip
        service = cls(settings, recommender, Path(default[1]), audit_path, key, source, loaded)
        service.blocking = blocking
        service.models_root = (srv.models_root or Path(default[1]).parent).resolve()
        if watch:
            follower.start(srv.catch_up_seconds)
        if watch and source.kind == "registry":
            service._watcher = RegistryWatcher(service.refresh, settings.registry.poll_seconds).start()
        return service

    def private_paths(self) -> list[Path | None]:
        """Folders this service reads and writes, whose names must not reach an answer."""
        srv = self.settings.serve
        registry = getattr(self.source, "registry", None)
        return [self.model_dir, self.model_dir.parent, self.models_root, self.settings.workspace, srv.data,
                None if self.audit_path is None else self.audit_path.parent,
                None if registry is None else registry.root, self.recommender.model.data.ds.path]  # fmt: skip

    def check_stores(self) -> dict[str, str]:
        """``ok`` or what is wrong, per store (a cheap call to each, through its circuit breaker)."""
        out: dict[str, str] = {}
        rec = self.recommender
        checks: list[tuple[str, Callable[[], Any]]] = [("event_store", rec.events.count),
                                                        ("online_store", rec.live.store.position)]
        catalogue = rec.model.data.catalogue
        if catalogue is not None:
            checks.append(("customer_features", catalogue.source.ping))
        for name, call in checks:
            try:
                call()
                out[name] = "ok"
            except Exception as exc:
                outage = store_unavailable(exc)
                if outage is None:
                    raise
                out[name] = outage.message
        if out.get("online_store") == "ok" and rec.follower is not None and rec.follower.stale:
            out["online_store"] = "catching up with the event log"
        return out

    def versions(self) -> dict[str, str]:
        """The version serving each model reference."""
        return {ref: m.version for ref, m in self.recommender.models().items()}

    def reload(self, model_dir: Path | None = None) -> dict[str, Any]:
        """Load ``model_dir`` (default: the current folder again) and swap it in; the old model serves until then.

        A service that follows the registry re-reads it instead (``model_dir`` is refused: promote or roll back).
        """
        if self.source.kind == "registry":
            if model_dir is not None:
                raise FinrecError("this service follows the model registry; it does not load folders by hand",
                                  hint="register the bundle and promote it (`finrec registry promote`, or POST "
                                  "/admin/promote); roll back with POST /admin/rollback")  # fmt: skip
            t0 = time.perf_counter()
            before = self.recommender.model.version
            changes = self.refresh(force=True)
            if any(c["status"] == "refused" for c in changes.values()):
                raise ArtifactError("; ".join(c["error"] for c in changes.values() if c["status"] == "refused"),
                                    hint="the models already serving keep serving")  # fmt: skip
            return {"previous_version": before, "model_version": self.recommender.model.version,
                    "models": changes, "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
        target = self.model_path(model_dir) if model_dir else self.model_dir
        with self._reload_lock:  # one reload at a time; requests never wait on this lock
            t0 = time.perf_counter()
            try:
                served = load_serving_model(target, self.recommender.model.data)
            except FinrecError:
                self.metrics.reloads.labels("refused").inc()
                raise
            old = self.recommender.swap(served)
            self.model_dir = target
            self.source = BundleSource(target)
            self._loaded[DEFAULT_MODEL] = str(target)
            self.metrics.set_models(self.versions().values())
            self.metrics.reloads.labels("ok").inc()
        return {"previous_version": old, "model_version": served.version, "model_dir": self._relative(target),
                "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip

    def model_path(self, given: Path | str) -> Path:
        """The bundle folder ``given`` names (relative to the models folder, or absolute inside it).

        Raises
        ------
        FinrecError
            It lies outside ``serve.models_root`` (symbolic links and ``..`` resolved first).
        """
        root = self.models_root
        path = (root / given).resolve()
        if not path.is_relative_to(root):
            raise FinrecError(f"{given} is not under the models folder, and only bundles from there are loaded",
                              hint="pass a folder relative to the models folder (serve.models_root), e.g. "
                              '{"model_dir": "m2"}, or ask the operator to put the bundle there')  # fmt: skip
        return path

    def _relative(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.models_root))
        except ValueError:
            return path.name

    def refresh(self, force: bool = False) -> dict[str, dict[str, Any]]:
        """Swap in whatever each model reference names now; returns what happened to each.

        Statuses: ``unchanged``, ``loaded`` (swapped in), ``refused`` (the bundle failed a check; the old model
        keeps serving and the same version is not retried until the reference moves, unless ``force``),
        ``missing`` (the reference names nothing now; what served it keeps serving).
        """
        out: dict[str, dict[str, Any]] = {}
        with self._reload_lock:
            current = self.recommender.models()
            for ref in self.recommender.assigner.models():
                found = self.source.resolve(ref)
                was = current.get(ref)
                entry: dict[str, Any] = {"version": None if was is None else was.version}
                out[ref] = entry
                if found is None:
                    entry["status"] = "missing"
                    continue
                key, folder = found
                if self._loaded.get(ref) == key and not force:
                    entry["status"] = "unchanged"
                    continue
                if self._failed.get(ref) == key and not force:
                    entry["status"] = "refused"
                    entry["error"] = f"{folder} was refused before"
                    continue
                t0 = time.perf_counter()
                model = self._find_loaded(key)
                if model is None or force:
                    try:
                        model = load_serving_model(folder, self.recommender.model.data)
                    except FinrecError as exc:
                        self._failed[ref] = key
                        self.metrics.reloads.labels("refused").inc()
                        log.error("model refused; the old one keeps serving",
                                  extra={"ref": ref, "folder": str(folder), "error": exc.message})  # fmt: skip
                        entry.update(status="refused", error=exc.message)
                        continue
                if was is not None:
                    self._cache[self._loaded.get(ref, "")] = was
                self.recommender.swap(model, ref)
                self._loaded[ref] = key
                self._failed.pop(ref, None)
                self.metrics.reloads.labels("ok").inc()
                entry.update(status="loaded", previous=entry["version"], version=model.version,
                             seconds=round(time.perf_counter() - t0, 3))  # fmt: skip
            self._trim_cache()
            self.metrics.set_models(self.versions().values())
        return out

    # -- registry operations (admin endpoints) ---------------------------------------------------------
    def _registry(self) -> Any:
        if not isinstance(self.source, RegistrySource):
            raise FinrecError("this service serves a fixed bundle (--model-dir), not the registry",
                              hint="restart it without --model-dir to serve the registry's champion, or use "
                              "POST /admin/reload to load another bundle")  # fmt: skip
        return self.source.registry

    def promote(self, ref: str = "challenger", force: bool = False, reason: str = "", by: str = "") -> dict[str, Any]:
        """Promote ``ref`` to champion through the gate, then serve it at once.

        The version is loaded, checked and warmed up first; if it cannot serve, :class:`ModelRefused` is raised and
        the champion alias is not moved (nor when the gate refuses: :class:`~finrec.registry.PromotionRefused`).
        """
        registry = self._registry()
        self._preload(registry.require(ref), "promoted")
        result = registry.promote(ref, force=force, reason=reason, by=by)
        t0 = time.perf_counter()
        changes = self.refresh()
        return {"model_version": result.version, "previous_version": result.previous, "forced": result.forced,
                "gate": None if result.gate is None else dataclasses.asdict(result.gate), "models": changes,
                "seconds_to_serve": round(time.perf_counter() - t0, 3)}  # fmt: skip

    def rollback(self, to: str | None = None, reason: str = "", by: str = "") -> dict[str, Any]:
        """Point the champion back at the previous one (or ``to``), then serve it at once (loaded first, as for
        :meth:`promote`)."""
        registry = self._registry()
        target = registry.require(to) if to is not None else self._previous_champion(registry)
        if target is not None:
            self._preload(target, "rolled back to")
        record = registry.rollback(to=to, reason=reason, by=by)
        t0 = time.perf_counter()
        changes = self.refresh()
        return {"model_version": record.get("version"), "previous_version": record.get("previous"),
                "models": changes, "seconds_to_serve": round(time.perf_counter() - t0, 3)}  # fmt: skip

    @staticmethod
    def _previous_champion(registry: Any) -> str | None:
        current = registry.resolve("champion")
        earlier = [v for v in registry.champions()[:-1] if v != current]
        return earlier[-1] if earlier else None  # None: the registry says why nothing can be rolled back

    def _preload(self, version: str, action: str) -> None:
        """Load, check and warm up ``version`` (kept for the swap), or raise :class:`ModelRefused`."""
        if self._find_loaded(version) is not None:
            return
        folder = self.source.registry.path(version)  # type: ignore[attr-defined]
        with self._reload_lock:
            try:
                model = load_serving_model(folder, self.recommender.model.data)
            except FinrecError as exc:
                self.metrics.reloads.labels("refused").inc()
                log.error("model refused before moving the alias", extra={"version": version, "error": exc.message})
                raise ModelRefused(f"version {version} cannot be {action}: {exc.message}",
                                   hint="the champion is unchanged and keeps serving; fix or re-register the "
                                   "bundle, or choose another version") from None  # fmt: skip
            self._cache[version] = model
            self._trim_cache(keep=version)

    def _find_loaded(self, key: str) -> ServingModel | None:
        current = self.recommender.models()
        for ref, k in self._loaded.items():
            if k == key and ref in current:
                return current[ref]
        return self._cache.get(key)

    def _trim_cache(self, keep: str | None = None) -> None:
        serving = set(self._loaded.values())
        for key in [k for k in self._cache if k in serving]:
            del self._cache[key]
        while len(self._cache) > _KEEP_LOADED + (keep is not None):
            oldest = next(k for k in self._cache if k != keep)  # oldest first (dicts keep insertion order)
            del self._cache[oldest]

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        if self.recommender.follower is not None:
            self.recommender.follower.stop()
        if self.recommender.audit is not None:
            self.recommender.audit.close()
        self.recommender.events.close()
        self.recommender.live.store.close()


def make_clock(kind: str, data_cutoff: int, state: Path | None = None, speed: float = 1.0) -> Callable[[], float]:
    """``wall``: the machine's time. ``data``: the data's end plus the time since the service first started on it.

    The data clock runs from an anchor, ``data time = anchor_data + (wall - anchor_wall) * speed``, stored in
    ``state`` (``<workspace>/clock.json``) the first time a service starts on this data, so that every worker and
    every restart agree on the time: events stamped before a restart are not in the future after it. ``speed``
    above 1 compresses time (a simulation then lives through days of cooling-off, frequency caps and drift in
    minutes); a restart with another speed re-anchors at the current data time, so time never jumps back.
    """
    if kind == "wall":
        return time.time
    now = time.time()
    anchor = {"data_cutoff": data_cutoff, "anchor_wall": now, "anchor_data": float(data_cutoff), "speed": speed}
    if state is not None:
        anchor = _shared_anchor(state, anchor)
    wall0, data0, rate = float(anchor["anchor_wall"]), float(anchor["anchor_data"]), float(anchor["speed"])
    return lambda: data0 + (time.time() - wall0) * rate


def _read_anchor(state: Path, data_cutoff: int) -> dict[str, float] | None:
    try:
        saved = json.loads(state.read_text())
        if int(saved["data_cutoff"]) != data_cutoff:
            return None
        if "offset" in saved:  # written before clocks had a speed: data time = wall - offset
            return {"data_cutoff": data_cutoff, "anchor_wall": float(saved["offset"]) + data_cutoff,
                    "anchor_data": float(data_cutoff), "speed": 1.0}  # fmt: skip
        return {k: float(saved[k]) for k in ("data_cutoff", "anchor_wall", "anchor_data", "speed")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shared_anchor(state: Path, proposed: dict[str, float]) -> dict[str, float]:
    cutoff = int(proposed["data_cutoff"])
    saved = _read_anchor(state, cutoff)
    if saved is not None and saved["speed"] == proposed["speed"]:
        return saved
    if saved is not None:  # another speed: continue from the data time reached so far
        now = time.time()
        proposed = {**proposed, "anchor_wall": now,
                    "anchor_data": saved["anchor_data"] + (now - saved["anchor_wall"]) * saved["speed"]}  # fmt: skip
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(f".{state.name}.{os.getpid()}")
    tmp.write_text(json.dumps(proposed))
    try:
        if saved is not None:
            os.replace(tmp, state)
            return proposed
        try:
            os.link(tmp, state)  # the first worker to get here sets the clock; the others read it
        except FileExistsError:
            again = _read_anchor(state, cutoff)
            if again is not None and again["speed"] == proposed["speed"]:
                return again
            os.replace(tmp, state)  # a clock of other data: this data's clock starts now
        return proposed
    finally:
        tmp.unlink(missing_ok=True)
