"""Where the service's models come from: one fixed bundle, or a registry whose aliases it follows.

A :class:`ModelSource` turns a model reference (``champion``, ``challenger``, a
version) into the folder to load and a key that changes when the reference
points elsewhere. :class:`RegistryWatcher` polls the registry every few seconds
and asks the service to swap in whatever a reference now names, so a promotion
or a rollback reaches every serving process without a restart, and within
``poll_seconds`` (the process that receives an admin promote/rollback applies it
at once). Polling a small JSON file rather than subscribing to notifications
keeps the registry a plain folder (local disk or shared storage) with no server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from finrec.errors import FinrecError
from finrec.experiments.assignment import DEFAULT_MODEL

log = logging.getLogger("finrec.serving")


class ModelSource(Protocol):
    """Resolves model references to folders."""

    kind: str

    def resolve(self, ref: str) -> tuple[str, Path] | None:
        """``(key, folder)`` of what ``ref`` names now, or None if it names nothing."""
        ...


class BundleSource:
    """One bundle folder (``finrec serve --model-dir``): it is the default model; other references name nothing."""

    kind = "bundle"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def resolve(self, ref: str) -> tuple[str, Path] | None:
        return (str(self.folder), self.folder) if ref == DEFAULT_MODEL else None


class RegistrySource:
    """A model registry (:class:`finrec.registry.ModelRegistry`): references are its aliases and versions."""

    kind = "registry"

    def __init__(self, registry: object) -> None:
        from finrec.registry import ModelRegistry

        assert isinstance(registry, ModelRegistry)
        self.registry = registry

    def resolve(self, ref: str) -> tuple[str, Path] | None:
        version = self.registry.resolve(ref)
        return None if version is None else (version, self.registry.path(version))


class RegistryWatcher:
    """A daemon thread calling ``refresh`` every ``poll_seconds`` until :meth:`stop`.

    A failing refresh (registry unreachable, a bundle refused) is logged and retried on the next tick; the
    models already serving keep serving.
    """

    def __init__(self, refresh: Callable[[], object], poll_seconds: float) -> None:
        self._refresh = refresh
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="finrec-registry-watch", daemon=True)

    def start(self) -> RegistryWatcher:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self._refresh()
            except FinrecError as exc:
                log.error("registry check failed", extra={"error": exc.message})
            except Exception:  # never let the watcher die: the next tick may succeed
                log.exception("registry check failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
