"""What a closed-loop simulation saw: tallies per model version and arm, failures, and conversion over time.

:class:`SimulationRecorder` is filled by the driver's threads (every method takes a lock) and turned into a
:class:`SimulationReport` at the end. Nothing is dropped: every request is either an answer or a failure of a
named kind, and a failure keeps the server's own words (the ``error`` and ``hint`` of its problem body).

Conversion here is *approvals per answer*: the realised approvals the simulated customers made, and the true
expected approvals of the same answers (``sum_k view_prob(k) * propensity``), which is what the realised count
estimates without the noise of the draws. Comparing the two lines per model version shows whether a
difference between versions is real; a promotion or a rollback shows as a change of version along the time
axis.

Examples
--------
>>> rec = SimulationRecorder(window_seconds=10)
>>> rec.answer("v1", None, 3.0, shown=5, opted_out=False, counts={"impression": 5, "approve": 1},
...            expected=0.4, latency=0.01)
>>> rec.failure("recommend", "http_5xx", 500, "internal error")
>>> report = rec.report(config={}, planned=2, wall_seconds=1.0)
>>> report.answered, report.failed, report.by_model[("v1", None)].approvals
(1, 1, 1)
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure

#: Distinct failure messages kept (with their counts); further ones are only counted.
MAX_MESSAGES = 50
FUNNEL = ("impression", "view", "click", "apply", "approve", "decline", "close")


@dataclass
class Tally:
    """Counts of one model version and arm (or of a time window)."""

    answers: int = 0
    empty_answers: int = 0
    opted_out: int = 0  # empty because the customer opted out of marketing
    impressions: int = 0
    views: int = 0
    clicks: int = 0
    applications: int = 0
    approvals: int = 0
    declines: int = 0
    closes: int = 0
    expected_conversions: float = 0.0
    events_posted: int = 0
    events_accepted: int = 0
    events_duplicates: int = 0
    events_rejected: int = 0

    @property
    def realised_conversions(self) -> int:
        return self.approvals

    def add(self, counts: dict[str, int], expected: float) -> None:
        self.impressions += counts.get("impression", 0)
        self.views += counts.get("view", 0)
        self.clicks += counts.get("click", 0)
        self.applications += counts.get("apply", 0)
        self.approvals += counts.get("approve", 0)
        self.declines += counts.get("decline", 0)
        self.closes += counts.get("close", 0)
        self.expected_conversions += expected

    def merge(self, other: Tally) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = asdict(self)
        d["expected_conversions"] = round(self.expected_conversions, 6)
        d["realised_conversions"] = self.realised_conversions
        d["expected_per_answer"] = _ratio(self.expected_conversions, self.answers)
        d["realised_per_answer"] = _ratio(self.realised_conversions, self.answers)
        d["click_rate"] = _ratio(self.clicks, self.impressions)  # per impression, as `finrec monitor` counts
        d["approval_rate"] = _ratio(self.approvals, self.impressions)
        return d


@dataclass
class SimulationReport:
    """The outcome of :func:`finrec.simulation.loop.run_simulation`; :meth:`to_dict` is JSON-ready.

    ``by_model`` maps (model_version, arm) to its :class:`Tally`; ``windows`` maps (window index,
    model_version) to the tally of the answers whose request was due in that window.
    """

    config: dict[str, Any]
    planned: int
    sent: int
    answered: int
    failed: int
    wall_seconds: float
    window_seconds: float
    by_model: dict[tuple[str, str | None], Tally]
    windows: dict[tuple[int, str], Tally]
    failures: dict[str, dict[str, int]]
    messages: list[dict[str, Any]]
    latency_ms: dict[str, float | None]
    lag_seconds: dict[str, float | None]
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def totals(self) -> Tally:
        total = Tally()
        for t in self.by_model.values():
            total.merge(t)
        return total

    @property
    def model_versions(self) -> list[str]:
        """Versions in the order they first answered."""
        first: dict[str, int] = {}
        for w, v in sorted(self.windows):
            first.setdefault(v, w)
        return sorted(first, key=first.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "run": {
                "planned": self.planned, "sent": self.sent, "answered": self.answered, "failed": self.failed,
                "interrupted": self.interrupted, "wall_seconds": round(self.wall_seconds, 3),
                "achieved_rate": _ratio(self.sent, self.wall_seconds),
                "latency_ms": self.latency_ms, "lag_seconds": self.lag_seconds,
            },  # fmt: skip
            "totals": self.totals.to_dict(),
            "by_model": [{"model_version": v, "arm": a, **t.to_dict()} for (v, a), t in sorted(self.by_model.items(),
                         key=lambda kv: (kv[0][0], kv[0][1] or ""))],  # fmt: skip
            "failures": {"total": self.failed_total, "by_stage": self.failures, "messages": self.messages},
            "timeline": {
                "window_seconds": self.window_seconds,
                "rows": [{"window": w, "start_s": round(w * self.window_seconds, 3), "model_version": v,
                          "answers": t.answers, "impressions": t.impressions,
                          "expected_conversions": round(t.expected_conversions, 6),
                          "realised_conversions": t.realised_conversions,
                          "expected_per_answer": _ratio(t.expected_conversions, t.answers),
                          "realised_per_answer": _ratio(t.realised_conversions, t.answers)}
                         for (w, v), t in sorted(self.windows.items())],
            },  # fmt: skip
            "notes": self.notes,
        }

    @property
    def failed_total(self) -> int:
        """Failures of every stage: requests for answers and posts of events."""
        return sum(sum(kinds.values()) for kinds in self.failures.values())

    def figure(self) -> Figure:
        """Approvals per answer over time, per model version: expected (line) and realised (dots)."""
        fig = Figure(figsize=(9, 4.5), layout="constrained")
        ax = fig.add_subplot()
        in_minutes = self.window_seconds * (max((w for w, _ in self.windows), default=0) + 1) > 180
        scale, unit = (60.0, "minutes") if in_minutes else (1.0, "seconds")
        colours = {v: f"C{i % 10}" for i, v in enumerate(self.model_versions)}
        for v in self.model_versions:
            rows = sorted((w, t) for (w, version), t in self.windows.items() if version == v and t.answers)
            if not rows:
                continue
            x = np.array([(w + 0.5) * self.window_seconds / scale for w, _ in rows])
            exp = np.array([t.expected_conversions / t.answers for _, t in rows])
            real = np.array([t.realised_conversions / t.answers for _, t in rows])
            ax.plot(x, exp, "-", color=colours[v], label=f"{v}: expected")
            ax.plot(x, real, "o:", color=colours[v], alpha=0.6, markersize=4, label=f"{v}: realised")
        ax.set_xlabel(f"time since the start ({unit}; windows of {self.window_seconds:g} s)")
        ax.set_ylabel("approvals per answer")
        ax.set_ylim(bottom=0)
        ax.set_title("closed-loop simulation: conversion per model version")
        if self.model_versions:
            ax.legend(fontsize="small", loc="best")
        else:
            ax.text(0.5, 0.5, "no answers", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
        return fig


class SimulationRecorder:
    """Thread-safe accumulator of a running simulation."""

    def __init__(self, window_seconds: float) -> None:
        self.window_seconds = float(window_seconds)
        self._lock = threading.Lock()
        self.sent = 0
        self.answered = 0
        self.by_model: dict[tuple[str, str | None], Tally] = {}
        self.windows: dict[tuple[int, str], Tally] = {}
        self.failures: dict[str, Counter[str]] = {}
        self._messages: Counter[tuple[str, str, int | None, str]] = Counter()
        self._more_messages = 0
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.notes: list[str] = []
        self.resent = 0

    def request(self, lag: float) -> None:
        """A request is sent, ``lag`` seconds after it was due (the pool was busy)."""
        with self._lock:
            self.sent += 1
            self.lags.append(max(lag, 0.0))

    def answer(self, version: str, arm: str | None, due: float, shown: int, opted_out: bool,
               counts: dict[str, int], expected: float, latency: float) -> None:  # fmt: skip
        """An answer of ``version``/``arm`` to a request due at ``due`` seconds, and the reaction to it."""
        with self._lock:
            self.answered += 1
            self.latencies.append(latency)
            window = int(due // self.window_seconds)
            for t in (self.by_model.setdefault((version, arm), Tally()),
                      self.windows.setdefault((window, version), Tally())):  # fmt: skip
                t.answers += 1
                t.empty_answers += shown == 0
                t.opted_out += opted_out
                t.add(counts, expected)

    def events(self, version: str, arm: str | None, posted: int, accepted: int, duplicates: int,
               rejected: int) -> None:  # fmt: skip
        with self._lock:
            t = self.by_model.setdefault((version, arm), Tally())
            t.events_posted += posted
            t.events_accepted += accepted
            t.events_duplicates += duplicates
            t.events_rejected += rejected

    def failure(self, stage: str, kind: str, status: int | None, message: str, count: int = 1) -> None:
        """A failure at ``stage`` (``recommend`` or ``events``) of ``kind`` with the server's or client's message."""
        with self._lock:
            self.failures.setdefault(stage, Counter())[kind] += count
            key = (stage, kind, status, message)
            if key in self._messages or len(self._messages) < MAX_MESSAGES:
                self._messages[key] += count
            else:
                self._more_messages += count

    def resend(self) -> None:
        """A request is sent again: the service reset the kept-alive connection it went out on."""
        with self._lock:
            self.resent += 1

    def note(self, text: str) -> None:
        with self._lock:
            self.notes.append(text)

    def note_once(self, text: str) -> None:
        with self._lock:
            if text not in self.notes:
                self.notes.append(text)

    def report(self, config: dict[str, Any], planned: int, wall_seconds: float,
               interrupted: bool = False) -> SimulationReport:  # fmt: skip
        with self._lock:
            messages = [{"stage": s, "kind": k, "status": st, "message": m, "count": n}
                        for (s, k, st, m), n in self._messages.most_common()]  # fmt: skip
            if self._more_messages:
                messages.append({"stage": None, "kind": "other", "status": None, "count": self._more_messages,
                                 "message": f"{self._more_messages} more failures with other messages"})  # fmt: skip
            failed = self.failures.get("recommend", Counter()).total()
            notes = list(self.notes)
            if self.resent:
                notes.append(f"{self.resent} requests were sent again on a new connection after the service reset "
                             "the kept-alive one they went out on (none of them counts as a failure unless the "
                             "second try failed too)")  # fmt: skip
            return SimulationReport(
                config=config, planned=planned, sent=self.sent, answered=self.answered, failed=failed,
                wall_seconds=wall_seconds, window_seconds=self.window_seconds,
                by_model={k: _copy(t) for k, t in self.by_model.items()},
                windows={k: _copy(t) for k, t in self.windows.items()},
                failures={s: dict(c) for s, c in self.failures.items()}, messages=messages,
                latency_ms=_quantiles([x * 1000 for x in self.latencies]), lag_seconds=_lag(self.lags),
                interrupted=interrupted, notes=notes,
            )  # fmt: skip


def _copy(t: Tally) -> Tally:
    return Tally(**asdict(t))


def _ratio(a: float, b: float) -> float | None:
    return None if not b else round(a / b, 6)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p95": round(float(np.percentile(arr, 95)), 2),
            "max": round(float(arr.max()), 2)}  # fmt: skip


def _lag(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "max": None}
    mean = math.fsum(values) / len(values)
    return {"mean": round(mean, 4), "max": round(max(values), 4)}
