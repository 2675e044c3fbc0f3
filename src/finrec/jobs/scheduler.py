"""Running the jobs: when each is due, one runner at a time, every run in the history.

:func:`run_job` is the one way a job runs, whether ``finrec scheduler`` found it due, cron called
``finrec scheduler run JOB``, or an operator forced it: take the job's lock without waiting (another runner
has it: ``busy``), decide under the lock whether it is still due (a runner that just finished it moved its last
start), record the start, run it, record how it ended. Two schedulers, or a scheduler and a cron line, therefore
never run a job twice for one due time.

When a job is due (:func:`due`), with ``schedule`` the settings' ``[schedule]``:

* ``rollup``: ``rollup_every_minutes`` after its last start (at once the first time);
* ``drift-check``: ``drift_check_every_hours`` after its last start (at once the first time);
* ``retrain``: ``retrain_every_days`` after the last training (its last start, or the newest registered
  version when later), or, with ``retrain_on_drift``, when a drift alert is newer than that and the job last
  started at least ``drift_retrain_min_hours`` ago (the first time: at once).

:class:`Scheduler` loops over the enabled jobs every ``tick_seconds``, in the order rollup, drift-check,
retrain (a drift alert is acted on in the same round), one job at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finrec.config import FinrecSettings
from finrec.errors import FinrecError
from finrec.jobs.history import JobHistory
from finrec.jobs.locks import JobLock, runner_id
from finrec.jobs.tasks import JOBS, TASKS, JobOutcome
from finrec.monitoring.notify import Alerter

log = logging.getLogger("finrec.scheduler")


@dataclass
class RunResult:
    """What :func:`run_job` did: ``status`` is an outcome of the history, or ``busy`` / ``not_due``."""

    job: str
    status: str
    trigger: str | None = None
    message: str = ""
    hint: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    run_id: int | None = None
    seconds: float = 0.0


def enabled_jobs(settings: FinrecSettings) -> list[str]:
    s = settings.schedule
    on = {"rollup": s.rollup_every_minutes is not None, "drift-check": s.drift_check_every_hours is not None,
          "retrain": s.retrain_every_days is not None or s.retrain_on_drift}  # fmt: skip
    return [j for j in JOBS if on[j]]


def _iso_ts(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except (TypeError, ValueError):
        return None


def span(seconds: float) -> str:
    """A duration as people write it: ``20 s``, ``5 min``, ``6 h``, ``1.5 d``.

    >>> span(20), span(300), span(6 * 3600), span(36 * 3600)
    ('20 s', '5 min', '6 h', '1.5 d')
    """
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _every(interval: float, last: float | None, now: float, what: str) -> str | None:
    if last is None:
        return f"{what} (first run)"
    return what if now - last >= interval else None


def last_training(settings: FinrecSettings, last_start: float | None) -> float | None:
    """When the model was last trained: the retrain job's last start or the newest registration, the later."""
    from finrec.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings)
    versions = registry.versions()
    registered = _iso_ts(registry.entry(versions[-1]).get("registered_at")) if versions else None
    times = [t for t in (last_start, registered) if t is not None]
    return max(times) if times else None


def due(job: str, settings: FinrecSettings, last_start: float | None, now: float | None = None) -> str | None:
    """Why ``job`` is due now (its trigger, as recorded in the history), or None; see the module docstring."""
    s = settings.schedule
    now = time.time() if now is None else now
    if job == "rollup":
        m = s.rollup_every_minutes
        return None if m is None else _every(m * 60, last_start, now, f"every {span(m * 60)}")
    if job == "drift-check":
        h = s.drift_check_every_hours
        return None if h is None else _every(h * 3600, last_start, now, f"every {span(h * 3600)}")
    if job != "retrain":
        raise ValueError(f"unknown job {job!r}")
    trained = last_training(settings, last_start)
    if trained is None:
        return None  # nothing registered: nothing to retrain from
    if s.retrain_every_days is not None and now - trained >= s.retrain_every_days * 86_400:
        return f"every {span(s.retrain_every_days * 86_400)}"
    if s.retrain_on_drift:
        from finrec.monitoring.alerts import alerts_path, read_alerts

        drift = [a for a in read_alerts(alerts_path(settings.workspace), 200) if a.get("kind") == "drift"]
        newest = _iso_ts(drift[-1].get("time")) if drift else None
        if newest is not None and newest >= trained:
            if last_start is not None and now - last_start < s.drift_retrain_min_hours * 3600:
                return None  # a retrain ran lately: this alert waits for the interval (no retrain storm)
            return f"drift alert of {drift[-1].get('time')}"
    return None


def run_job(job: str, settings: FinrecSettings, lock: JobLock, history: JobHistory, alerter: Alerter,
            force: bool = False) -> RunResult:  # fmt: skip
    """Run ``job`` if it is due (always with ``force``) and no one else runs it; see the module docstring."""
    if job not in TASKS:
        raise FinrecError(f"unknown job {job!r}", hint=f"jobs: {', '.join(JOBS)}")
    lease = lock.try_acquire(job)
    if lease is None:
        return RunResult(job, "busy", message="another scheduler or cron run holds this job now")
    with lease:
        history.abandon_running(job)  # we hold the lock: a `running` row is a runner that died
        now = time.time()
        trigger = "by hand" if force else due(job, settings, lease.last_start(), now)
        if trigger is None:
            return RunResult(job, "not_due", message="not due (another runner may just have run it)")
        lease.mark_start(now)
        run_id = history.start(job, trigger, runner_id(), now)
        t0 = time.perf_counter()
        hint = None
        try:
            outcome = TASKS[job](settings, alerter)
        except FinrecError as exc:
            outcome, hint = JobOutcome("failed", exc.message, {"hint": exc.hint}), exc.hint
        except KeyboardInterrupt:
            history.finish(run_id, "interrupted", {"message": "interrupted (Ctrl-C or a stop signal)"})
            raise
        except Exception as exc:  # a bug or an outage: recorded, and the scheduler carries on
            log.exception("job %s failed", job)
            outcome = JobOutcome("failed", f"{type(exc).__name__}: {str(exc)[:300]}")
        history.finish(run_id, outcome.outcome, outcome.to_summary())
        _export(settings, job, outcome.outcome)
        return RunResult(job, outcome.outcome, trigger, outcome.message, hint, outcome.summary, run_id,
                         round(time.perf_counter() - t0, 3))  # fmt: skip


def _export(settings: FinrecSettings, job: str, outcome: str) -> None:
    from finrec.monitoring.exported import read_section, write_section

    jobs = read_section(settings.workspace, "jobs") or {}
    jobs.setdefault(job, {})[outcome] = time.time()
    write_section(settings.workspace, "jobs", jobs)


class Scheduler:
    """Runs the due jobs every ``settings.schedule.tick_seconds`` until :meth:`stop` (see the module docstring).

    ``report`` is called with each :class:`RunResult` of a job that ran (or found its job busy).
    """

    def __init__(self, settings: FinrecSettings, lock: JobLock, history: JobHistory, alerter: Alerter,
                 jobs: Sequence[str] | None = None,
                 report: Callable[[RunResult], None] | None = None) -> None:  # fmt: skip
        self.settings, self.lock, self.history, self.alerter = settings, lock, history, alerter
        self.jobs = list(jobs) if jobs is not None else enabled_jobs(settings)
        self.report = report or (lambda r: None)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> list[RunResult]:
        """One round over the jobs: each that looks due is run (if still due under its lock)."""
        results = []
        for job in self.jobs:
            if self._stop.is_set():
                break
            try:
                if due(job, self.settings, self.lock.peek_last_start(job)) is None:
                    continue
                result = run_job(job, self.settings, self.lock, self.history, self.alerter)
            except FinrecError as exc:
                result = RunResult(job, "failed", message=exc.message, hint=exc.hint)
            except Exception as exc:  # e.g. the registry or the lock's Redis unreadable for a moment
                log.exception("scheduling %s failed", job)
                result = RunResult(job, "failed", message=f"{type(exc).__name__}: {str(exc)[:300]}")
            if result.status != "not_due":
                results.append(result)
                self.report(result)
        return results

    def run(self, max_rounds: int | None = None) -> None:
        """Loop until :meth:`stop` (or ``max_rounds`` rounds)."""
        rounds = 0
        while not self._stop.is_set():
            self.tick()
            rounds += 1
            if max_rounds is not None and rounds >= max_rounds:
                return
            self._stop.wait(self.settings.schedule.tick_seconds)
