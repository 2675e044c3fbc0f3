"""Conversion of the live service: impressions, clicks, applications and approvals per model version and arm.

Feedback events come from the event store (all of it) and are attributed to the answer that led to them: an
event's own ``model_version`` and ``arm`` when it carries them, else those of the audit record with the same
``request_id``. The audit log can be large, so it is streamed once and only the answers some event refers to
are kept (``request_id -> (model_version, arm, ts)``).

Each event is counted in the time bucket (``monitor.bucket``: hour, day or week, UTC; weeks start on
Monday) of the answer it refers to when that answer is in the audit log, else of the event itself: a click
on Tuesday on Monday's recommendation counts for Monday, so each bucket is a cohort of answers and its rates
do not depend on how late feedback arrives.

Rates are per impression (``clicks / impressions``, ``applications / impressions``, ``approvals /
impressions``) with Wilson score intervals (:func:`wilson_interval`). Counts are events, not distinct
customers; a funnel step logged without its impression can push a rate above 1, and its interval is then
computed as if every impression converted.

Examples
--------
>>> [round(x, 4) for x in wilson_interval(8, 10, 0.95)]
[0.4902, 0.9433]
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib import dates as mdates
from matplotlib.figure import Figure
from scipy.stats import norm

from finrec.config import MonitorSettings
from finrec.events.schema import Event
from finrec.events.store import EventStore
from finrec.serving.audit import pseudonymise_request

FUNNEL = ("impression", "click", "apply", "approve")
COUNTS = ("impressions", "clicks", "applications", "approvals")
#: rate name -> the count it divides by the impressions
RATES = {"click_rate": "clicks", "apply_rate": "applications", "approve_rate": "approvals"}
BUCKET_SECONDS = {"hour": 3_600, "day": 86_400, "week": 7 * 86_400}
_WEEK_OFFSET = 4 * 86_400  # 1970-01-01 was a Thursday; weeks start on Monday 1970-01-05
_FUNNEL_INDEX = {t: i for i, t in enumerate(FUNNEL)}
READ_BATCH = 10_000


@lru_cache(maxsize=16)
def _z(confidence: float) -> float:
    """The standard-normal quantile of ``(1 + confidence) / 2`` (scipy's ppf costs ~0.2 ms a call; a report makes
    thousands)."""
    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; ``(nan, nan)`` when ``n`` is 0.

    Better than the normal approximation for small ``n`` and rates near 0 or 1: it never leaves [0, 1].

    >>> [round(x, 4) for x in wilson_interval(0, 10)]
    [0.0, 0.2775]
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if n == 0:
        return (math.nan, math.nan)
    z = _z(confidence)
    p = successes / n
    z2n = z * z / n
    denom = 1 + z2n
    centre = (p + z2n / 2) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(successes: int, n: int, confidence: float) -> dict[str, float | None]:
    """``{"rate", "low", "high"}`` (None when ``n`` is 0), JSON-ready."""
    if n <= 0:
        return {"rate": None, "low": None, "high": None}
    low, high = wilson_interval(min(max(successes, 0), n), n, confidence)
    return {"rate": successes / n, "low": low, "high": high}


# -- reading the stores ------------------------------------------------------------------------------------


def iter_events(store: EventStore, upto: int | None = None, batch: int = READ_BATCH) -> Iterator[tuple[int, Event]]:
    """Every ``(seq, event)`` of the store in order, read in batches; stops after ``upto`` if given."""
    after = 0
    while True:
        chunk = store.read(after=after, limit=batch)
        if not chunk:
            return
        for seq, event in chunk:
            if upto is not None and seq > upto:
                return
            yield seq, event
        after = chunk[-1][0]


class AuditReader:
    """Iterates the records of an audit log, skipping (and counting) lines that are not whole JSON objects."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records = 0
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.path is None:
            return
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            return
        with f:
            for line in f:
                if not (line.startswith(b"{") and line.endswith(b"}\n")):
                    self.skipped += 1  # a torn write at the end, or a damaged line
                    continue
                try:
                    rec = json.loads(line.decode())
                except ValueError:  # UnicodeDecodeError included
                    self.skipped += 1
                    continue
                self.records += 1
                yield rec


class Answered(NamedTuple):
    """What the audit log says about one answer."""

    model_version: str | None
    arm: str | None
    ts: float | None


# -- counting ----------------------------------------------------------------------------------------------


def bucket_start(ts: float, bucket: str) -> int:
    """Start (unix seconds, UTC) of the bucket holding ``ts``."""
    size = BUCKET_SECONDS[bucket]
    offset = _WEEK_OFFSET if bucket == "week" else 0
    return int((int(ts) - offset) // size * size + offset)


def bucket_label(start: int, bucket: str) -> str:
    t = datetime.fromtimestamp(start, UTC)
    return t.strftime("%Y-%m-%dT%H:00Z") if bucket == "hour" else t.strftime("%Y-%m-%d")


class ConversionCounter:
    """Funnel counts per (bucket start, model_version, arm).

    :meth:`add` takes events in one pass; those with a ``request_id`` wait, summed per request id, model
    version, arm and own bucket (so memory grows with the answers referred to, not with the events), until
    :meth:`resolve` attributes them with what the audit log says about their answers.
    """

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.counts: dict[tuple[int, str | None, str | None], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.pending: dict[tuple[str, str | None, str | None, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.stats: Counter[str] = Counter()

    def add(self, event: Event) -> None:
        self.stats["events"] += 1
        i = _FUNNEL_INDEX.get(event.event_type)
        if i is None:
            return
        self.stats["funnel_events"] += 1
        own = bucket_start(event.ts, self.bucket)
        if event.request_id:
            self.pending[(event.request_id, event.model_version, event.arm, own)][i] += 1
        else:
            self.stats["unattributed"] += event.model_version is None
            self.counts[(own, event.model_version, event.arm)][i] += 1

    def referenced(self) -> set[str]:
        """Request ids of the events waiting for their answers."""
        return {key[0] for key in self.pending}

    def resolve(self, answers: Mapping[str, Answered]) -> None:
        """Attribute the waiting events: their own fields first, then their answer's; bucket of the answer."""
        for (rid, mv, arm, own), c in self.pending.items():
            n = sum(c)
            ans = answers.get(rid)
            if ans is not None:
                if mv is None and ans.model_version is not None:
                    self.stats["attributed_via_audit"] += n
                mv, arm = mv or ans.model_version, arm or ans.arm
                own = bucket_start(ans.ts, self.bucket) if ans.ts is not None else own
            elif mv is None or arm is None:
                self.stats["request_id_not_in_audit"] += n
            self.stats["unattributed"] += n if mv is None else 0
            t = self.counts[(own, mv, arm)]
            for j in range(4):
                t[j] += c[j]
        self.pending.clear()

    def summary(self, confidence: float) -> dict[str, Any]:
        """JSON-ready series (per bucket) and totals (per model_version and arm) with rates and intervals."""
        totals: dict[tuple[str | None, str | None], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        series = []
        for (start, mv, arm), c in sorted(self.counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), str(kv[0][2]))):
            series.append({"bucket": bucket_label(start, self.bucket), "start": start, **_row(mv, arm, c, confidence)})
            t = totals[(mv, arm)]
            for j in range(4):
                t[j] += c[j]
        ordered = sorted(totals.items(), key=lambda kv: str(kv[0]))
        total_rows = [_row(mv, arm, c, confidence) for (mv, arm), c in ordered]
        return {"bucket": self.bucket, "confidence": confidence, "totals": total_rows, "series": series,
                "events": {k: int(self.stats[k]) for k in ("events", "funnel_events", "attributed_via_audit",
                                                           "request_id_not_in_audit", "unattributed")}}  # fmt: skip


def _row(mv: str | None, arm: str | None, c: Sequence[int], confidence: float) -> dict[str, Any]:
    counts = dict(zip(COUNTS, c, strict=True))
    rates = {name: rate(counts[num], counts["impressions"], confidence) for name, num in RATES.items()}
    return {"model_version": mv, "arm": arm, **counts, **rates}


def compute_conversion(
    events: EventStore,
    audit_path: Path | None,
    monitor: MonitorSettings,
    *,
    event_sinks: Iterable[Callable[[Event], None]] = (),
    answer_sinks: Iterable[Callable[[dict[str, Any]], None]] = (),
    audit_key: bytes | None = None,
) -> dict[str, Any]:
    """Conversion per bucket and per model_version x arm; see the module docstring.

    Reads the event store once, then the audit log once, keeping only the answers some event refers to.
    ``event_sinks`` see every event and ``answer_sinks`` every audit record, so other summaries can share
    the scans. Records hold a keyed hash of the request id (``request``); ``audit_key`` matches events to them
    (records of older logs with a raw ``request_id`` match without it).
    """
    event_sinks, answer_sinks = list(event_sinks), list(answer_sinks)
    counter = ConversionCounter(monitor.bucket)
    for _, e in iter_events(events):
        counter.add(e)
        for sink in event_sinks:
            sink(e)
    needed = counter.referenced()
    hashed = {} if audit_key is None else {pseudonymise_request(r, audit_key): r for r in needed}
    answers: dict[str, Answered] = {}
    reader = AuditReader(audit_path)
    for rec in reader:
        rid = rec.get("request_id")
        if rid is None and "request" in rec:
            rid = hashed.get(rec["request"])
        if rid in needed:
            # The answer's time on the service's clock (served_at), which stamps its events too: under a data
            # clock the wall time (ts) would put the answer in another bucket than its feedback.
            ts = rec.get("served_at", rec.get("ts"))
            answers[rid] = Answered(_text(rec.get("model_version")), _text(rec.get("arm")),
                                    float(ts) if isinstance(ts, int | float) else None)  # fmt: skip
        for asink in answer_sinks:
            asink(rec)
    counter.resolve(answers)
    out = counter.summary(monitor.confidence)
    out["audit"] = {"records": reader.records, "skipped_lines": reader.skipped, "answers_referenced": len(needed),
                    "answers_found": len(answers)}  # fmt: skip
    return out


def _text(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


# -- plot --------------------------------------------------------------------------------------------------


def label(model_version: str | None, arm: str | None) -> str:
    """How a model version and arm are named in tables and legends."""
    mv = model_version or "unattributed"
    return mv if arm is None else f"{mv} / arm {arm}"


def conversion_figure(conv: Mapping[str, Any]) -> Figure | None:
    """Each rate over time, a line per model_version/arm with its interval as a band; None without data."""
    from finrec.evaluation.html import _color, _new_figure

    series = [r for r in conv.get("series", []) if r.get("impressions")]
    if not series:
        return None
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in series:
        groups[(r["model_version"], r["arm"])].append(r)
    fig = _new_figure(10.0, 3.4)
    axes = fig.subplots(1, len(RATES), sharex=True)
    for ax, (name, num) in zip(axes, RATES.items(), strict=True):
        for j, ((mv, arm), rows) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
            xs = [datetime.fromtimestamp(r["start"], UTC) for r in rows]
            ys = [r[name]["rate"] for r in rows]
            lo = [r[name]["low"] for r in rows]
            hi = [r[name]["high"] for r in rows]
            color = _color(j + 1)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
            yerr = [[max(0.0, y - a) for y, a in zip(ys, lo, strict=True)],
                    [max(0.0, b - y) for y, b in zip(ys, hi, strict=True)]]  # fmt: skip
            ax.errorbar(xs, ys, yerr=yerr if len(xs) == 1 else None, marker="o", ms=3, capsize=3, color=color,
                        label=label(mv, arm))  # fmt: skip
        ax.set_title(f"{num} per impression", fontsize="medium")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30, labelsize="small")
        locator = mdates.AutoDateLocator(maxticks=6)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    starts = sorted({r["start"] for r in series})
    size = BUCKET_SECONDS[str(conv.get("bucket", "day"))]
    # one bucket would otherwise be drawn on an axis years wide; leave half a bucket either side of the data
    axes[0].set_xlim(
        datetime.fromtimestamp(starts[0] - size / 2, UTC), datetime.fromtimestamp(starts[-1] + size / 2, UTC)
    )
    axes[0].set_ylabel(f"rate ({conv.get('confidence', 0.95):.0%} Wilson band)")
    axes[-1].legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
