"""Keeping the online feature store in step with the event log, whatever happened to either.

The event log is the record; the online store is a view of it. :class:`EventFollower` applies the log to the
store from a position the store keeps itself (the sequence number of the last event it applied), with
:meth:`~finrec.features.online.OnlineFeatureStore.apply`, which records a chunk of events and moves the position
in one atomic step, and only if the position is still where the follower read it. So:

* an event stored while the online store was down (or slow, or being restarted empty) is applied once it is
  back: at start-up, by the catch-up thread every few seconds, or before the next recommendation of a worker
  that saw the failure (:meth:`ensure_current`);
* several workers and hosts sharing one online store never apply an event twice: the first to move the
  position wins, the others re-read it and find nothing left to do;
* a ``memory://`` store starts empty at position 0 and is rebuilt from the whole log.

A store that holds events but no position (written before positions existed) is taken to hold every event
stored so far, which is what the service guaranteed then.
"""

from __future__ import annotations

import logging
import threading

from finrec.events.store import EventStore
from finrec.features.online import OnlineFeatureStore
from finrec.storage import store_unavailable

log = logging.getLogger("finrec.serving")
READ_BATCH = 10_000


class EventFollower:
    """Applies ``events`` (the log) to ``store`` (the online features) from the store's own position.

    Parameters
    ----------
    events, store
        The event log and the online feature store (either may be wrapped in a circuit breaker).
    batch
        Events read and applied per step.
    """

    def __init__(self, events: EventStore, store: OnlineFeatureStore, batch: int = READ_BATCH) -> None:
        self.events = events
        self.store = store
        self.batch = batch
        self._lock = threading.Lock()
        self._stale = True  # until the first sync: the store may lack events
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stale(self) -> bool:
        """Whether the last attempt to apply the log failed (or none was made yet)."""
        return self._stale

    def sync(self) -> int:
        """Apply every event the store has not seen; returns how many this call applied.

        Raises whatever the stores raise (the caller decides: a request answers 503, the catch-up thread retries).
        """
        applied = 0
        with self._lock:
            try:
                position = self.store.position()
                if position is None:
                    position = self._adopt()
                while True:
                    chunk = self.events.read(after=position, limit=self.batch)
                    if not chunk:
                        break
                    upto = chunk[-1][0]
                    if self.store.apply([e for _, e in chunk], after=position, upto=upto):
                        applied += len(chunk)
                        position = upto
                    else:  # another worker moved it: continue from where it is now
                        position = self.store.position() or 0
            except BaseException:
                self._stale = True
                raise
            if self._stale and applied:
                log.info("online store caught up with the event log", extra={"events": applied})
            self._stale = False
        return applied

    def _adopt(self) -> int:
        """The position of a store that has none: 0 if it is empty, else the end of the log (see the module)."""
        if not self.store.product_counts():
            return 0
        last, chunk = 0, self.events.read(after=0, limit=self.batch)
        while chunk:
            last = chunk[-1][0]
            chunk = self.events.read(after=last, limit=self.batch)
        self.store.apply([], after=0, upto=last)
        log.warning("the online store had no position in the event log; taken to hold every stored event",
                    extra={"position": last})  # fmt: skip
        return last

    def ensure_current(self) -> None:
        """Apply what the store missed if the last attempt failed; raises if it still cannot."""
        if self._stale:
            self.sync()

    def after_append(self) -> None:
        """Apply newly stored events; a failure is logged and left to the catch-up (the events are stored)."""
        try:
            self.sync()
        except Exception as exc:
            if store_unavailable(exc) is None:
                raise
            log.warning("stored events not yet applied to the online store; it catches up when it is back",
                        extra={"error": str(exc)[:200]})  # fmt: skip

    def start(self, interval: float) -> EventFollower:
        """Catch up every ``interval`` seconds in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="finrec-catch-up", daemon=True)
        self._thread.start()
        return self

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.sync()
            except RuntimeError:  # a store was closed: the service is shutting down
                return
            except Exception as exc:  # never let the thread die: the next tick may succeed
                if store_unavailable(exc) is None:
                    log.exception("catching up with the event log failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=5)
