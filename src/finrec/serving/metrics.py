"""Prometheus metrics of the service, in a registry of its own (one per app, so tests can build many).

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set by ``finrec serve --workers N``)
each process writes its samples to shared files and ``/metrics`` aggregates them, so a scrape
sees the whole server whichever worker answers it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

#: Latency buckets (seconds): the API's answers take about a millisecond; the tail is what matters.
_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5)


class ServiceMetrics:
    """Counters and histograms the routes update; :meth:`render` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode samples go to files; the collector registry only reads them back.
        self.registry = CollectorRegistry()
        reg = None if self.multiprocess else self.registry
        if self.multiprocess:
            MultiProcessCollector(self.registry)
        self.requests = Counter("finrec_requests", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=reg)  # fmt: skip
        self.latency = Histogram("finrec_request_seconds", "Request latency by route (seconds).", ["route"],
                                 buckets=_BUCKETS, registry=reg)  # fmt: skip
        self.model = Gauge("finrec_model_info", "The model version being served (1 for the current one).",
                           ["model_version"], registry=reg, multiprocess_mode="liveall")  # fmt: skip
        self.removed = Counter("finrec_guardrail_removed", "Products removed before scoring, by guardrail.",
                               ["guardrail"], registry=reg)  # fmt: skip
        self.answers = Counter("finrec_answers", "Recommendation answers: full (k items), short (fewer) or empty.",
                               ["outcome"], registry=reg)  # fmt: skip
        self.violations = Counter("finrec_guardrail_violations", "Removed products that reached an answer and "
                                  "were dropped by the final check (must stay 0).", registry=reg)  # fmt: skip
        self.events = Counter("finrec_events", "Feedback events by outcome (accepted, duplicate, rejected).",
                              ["outcome"], registry=reg)  # fmt: skip
        self.reloads = Counter("finrec_model_reloads", "Model reloads by outcome (ok, refused).", ["outcome"],
                               registry=reg)  # fmt: skip
        self._versions: set[str] = set()

    def set_models(self, versions: Iterable[str]) -> None:
        """Mark the versions now serving (every arm's) with 1 and those no longer serving with 0."""
        now = set(versions)
        for gone in self._versions - now:
            self.model.labels(gone).set(0)
        for v in now:
            self.model.labels(v).set(1)
        self._versions = now

    def answer(self, n_items: int, k: int, excluded: dict[str, int], violations: int) -> None:
        self.answers.labels("full" if n_items >= k else "short" if n_items else "empty").inc()
        for rule, n in excluded.items():
            if n:
                self.removed.labels(rule).inc(n)
        if violations:
            self.violations.inc(violations)

    def render(self) -> bytes:
        return generate_latest(self.registry)
