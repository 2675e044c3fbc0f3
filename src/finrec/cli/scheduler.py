"""``finrec scheduler``: run the drift check, retraining and the monitoring roll-up on their own, or one job now.

``finrec scheduler`` is a long-running process; ``finrec scheduler run JOB`` is the same job for an external
orchestrator (cron, a Kubernetes CronJob, Airflow), with exit codes. See docs/operations.md.
"""

from __future__ import annotations

import json
import signal
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from finrec.cli._common import err, out, settings_of
from finrec.errors import FinrecError

#: Exit codes of `finrec scheduler run`.
EXIT = {"ok": 0, "skipped": 0, "not_due": 0, "refused": 3, "alert": 4, "failed": 5, "busy": 75}

scheduler_app = typer.Typer(
    help="Scheduled jobs: drift check, retraining (also on a drift alert) and the monitoring roll-up, with alerts "
    "to the \\[alerts] sinks and a history shown on /dashboard. Without a sub-command: run them on the \\[schedule] "
    "settings until stopped (Ctrl-C or SIGTERM). Jobs: rollup, drift-check, retrain. See docs/operations.md.",
)


def _parts(ctx: typer.Context) -> tuple[Any, Any, Any, Any]:
    from finrec.jobs.history import JobHistory, history_path
    from finrec.jobs.locks import open_job_lock
    from finrec.monitoring.notify import Alerter

    settings = settings_of(ctx)
    s = settings.schedule
    lock = open_job_lock(s.lock, settings.workspace, settings.serve.event_store, s.lock_seconds)
    return settings, lock, JobHistory(history_path(settings.workspace)), Alerter(settings)


def _line(result: Any) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    trigger = f" ({result.trigger})" if result.trigger else ""
    took = f" in {result.seconds:.1f} s" if result.run_id is not None else ""
    return f"{when} {result.job}{trigger}: {result.status}{took}: {result.message}"


@scheduler_app.callback(invoke_without_command=True)
def scheduler(
    ctx: typer.Context,
    job: Annotated[list[str] | None, typer.Option(
        "--job", "-j", help="Run only this job (repeat for several). Default: every job the \\[schedule] settings "
        "turn on (an interval of null turns a job off).")] = None,
    tick: Annotated[float | None, typer.Option(
        min=0.1, help="Seconds between two looks for due jobs. Default: schedule.tick_seconds (30).")] = None,
    once: Annotated[bool, typer.Option(
        "--once", help="One round over the jobs (each that is due runs), then exit; exit code as `run` gives for "
        "the worst outcome.")] = False,
) -> None:
    """Run the scheduled jobs on the \\[schedule] settings until Ctrl-C or SIGTERM, one job at a time.

    Each job takes its lock first (files under <workspace>/scheduler/locks, or Redis when the event store is
    Redis, or schedule.lock), so two schedulers, or a scheduler and a cron line, never run a job twice.
    Every run is recorded (`finrec scheduler history`, /dashboard).
    """
    if ctx.invoked_subcommand is not None:
        return
    from finrec.jobs.scheduler import Scheduler, enabled_jobs
    from finrec.jobs.tasks import JOBS

    settings, lock, history, alerter = _parts(ctx)
    if tick is not None:
        settings = settings.model_copy(update={"schedule": settings.schedule.model_copy(update={"tick_seconds": tick})})
    bad = [j for j in job or [] if j not in JOBS]
    if bad:
        raise FinrecError(f"unknown job {', '.join(bad)}", hint=f"jobs: {', '.join(JOBS)}")
    jobs = job or enabled_jobs(settings)
    if not jobs:
        raise FinrecError("every job is turned off in [schedule]",
                          hint="set drift_check_every_hours, retrain_every_days / retrain_on_drift or "
                          "rollup_every_minutes (`finrec config show` prints them)")  # fmt: skip
    worst = 0
    results: list[Any] = []

    def report(result: Any) -> None:
        results.append(result)
        out.print(escape(_line(result)), highlight=False, soft_wrap=True)
        if result.hint:
            err.print(f"[dim]hint:[/] {escape(result.hint)}")

    runner = Scheduler(settings, lock, history, alerter, jobs, report)
    s = settings.schedule
    if not once:
        out.print(f"scheduler: {', '.join(jobs)}; drift check every {s.drift_check_every_hours} h, retrain every "
                  f"{s.retrain_every_days} d{' and on a drift alert' if s.retrain_on_drift else ''}, roll-up every "
                  f"{s.rollup_every_minutes} min; looking every {s.tick_seconds:g} s (stop: Ctrl-C)",
                  highlight=False, markup=False)  # fmt: skip
    previous = signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    try:
        runner.run(max_rounds=1 if once else None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        history.close()
    if once:
        worst = max((EXIT.get(r.status, 5) for r in results), default=0)
        sys.exit(worst)


@scheduler_app.command("run")
def run(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="The job: rollup, drift-check or retrain.")],
    if_due: Annotated[bool, typer.Option(
        "--if-due", help="Run only if the \\[schedule] settings say it is due (for a cron line every few minutes). "
        "Default: run now.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the run as JSON.")] = False,
) -> None:
    """Run one job now, as the scheduler would (lock, history, alerts), for cron, Kubernetes or Airflow.

    Exit codes: 0 done (or nothing to do, or not due with --if-due); 2 a problem to fix (message and hint);
    3 the retrained challenger was refused by the promotion gate; 4 the job raised an alert (drift, fairness,
    guardrail health); 5 the job failed; 75 another runner holds the job now (try later).
    """
    from finrec.jobs.scheduler import run_job

    settings, lock, history, alerter = _parts(ctx)
    try:
        result = run_job(job, settings, lock, history, alerter, force=not if_due)
    finally:
        history.close()
    if json_output:
        print(json.dumps({k: v for k, v in result.__dict__.items()}, default=str, indent=1))
    else:
        out.print(escape(_line(result)), highlight=False, soft_wrap=True)
    if result.status == "failed" and result.hint is not None:
        raise FinrecError(f"{job} failed: {result.message}", hint=result.hint)
    sys.exit(EXIT.get(result.status, 5))


@scheduler_app.command("history")
def history_command(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Option("--job", "-j", help="Only this job's runs.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show the latest this many runs.")] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="Print the runs as JSON lines.")] = False,
) -> None:
    """The latest runs of the scheduled jobs: start, end, trigger, outcome and what each produced."""
    from finrec.jobs.history import JobHistory, history_path

    settings = settings_of(ctx)
    path = history_path(settings.workspace)
    if not path.is_file():
        out.print(f"no job has run yet in {settings.workspace} (no {path})")
        return
    history = JobHistory(path)
    try:
        runs = history.runs(job, limit)
    finally:
        history.close()
    if json_output:
        for r in runs:
            print(json.dumps(r.to_dict(), default=str))
        return
    table = Table(title=f"job history ({path})", title_justify="left")
    for col in ("id", "job", "trigger", "started (UTC)", "seconds", "outcome", "what it did"):
        table.add_column(col)
    for r in runs:
        d = r.to_dict()
        start = datetime.fromtimestamp(r.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(str(r.id), r.job, escape(r.trigger or ""), start, str(d["seconds"] or ""), r.outcome,
                      escape(str(r.summary.get("message", ""))[:200]))  # fmt: skip
    out.print(table)


@scheduler_app.command("test-webhook")
def test_webhook(ctx: typer.Context) -> None:
    """Send a test alert to alerts.webhook_url (with its retries) and say whether the receiver took it."""
    from finrec.monitoring.notify import Alert, Alerter, safe_url

    settings = settings_of(ctx)
    url = settings.alerts.webhook_url
    if not url:
        raise FinrecError("no webhook is configured (alerts.webhook_url)",
                          hint="set [alerts] webhook_url in finrec.toml or FINREC_ALERTS__WEBHOOK_URL")  # fmt: skip
    alerter = Alerter(settings)
    (delivery,) = [s.send(Alert("drift", "firing", "finrec test alert", "a test of the alert webhook; "
                                "nothing is wrong", severity="info", details={"test": True}))
                   for s in alerter.sinks]  # fmt: skip
    if not delivery.delivered:
        raise FinrecError(f"the webhook {safe_url(url)} did not take the test alert after {delivery.attempts} "
                          f"attempt(s): {delivery.error}",
                          hint="check alerts.webhook_url and that the receiver is reachable from this machine; the "
                          f"alert was kept in {settings.alerts.dead_letter_path(settings.workspace)}")  # fmt: skip
    out.print(f"[green]delivered[/] a test alert to {escape(safe_url(url))} ({delivery.attempts} attempt(s))")
