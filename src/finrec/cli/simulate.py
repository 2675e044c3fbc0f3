"""``finrec simulate``: the synthetic world's customers call a running service and react to its answers.

Registered on the app with ``app.command()(simulate)``. Problems the user can fix (service not reachable, a
world without ground truth, bad numbers) are raised as :class:`~finrec.errors.FinrecError`, which
:func:`finrec.cli.main` prints as one message with a hint (exit code 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from finrec.cli._common import err, out, settings_of
from finrec.errors import FinrecError


def simulate(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(help="Root URL of the running service (`finrec serve`). "
                     "Default: http://<serve.host>:<serve.port> from the settings."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="The generated world the service serves (a folder written by "
                     "`finrec generate`, with ground_truth/). Default: serve.data from the settings."),
    ] = None,
    minutes: Annotated[float, typer.Option(help="How long to run, in minutes; fractions allowed (0.2 = 12 s).")] = 1.0,
    rate: Annotated[
        float, typer.Option(help="Mean requests per second (Poisson arrivals; each is a customer drawn by activity).")
    ] = 5.0,
    k: Annotated[int, typer.Option("--k", "-k", help="Products asked for per request (1-50).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the arrivals, the callers and every reaction.")] = 0,
    concurrency: Annotated[
        int, typer.Option(help="Requests in flight at most; when the service is slower, requests queue and the "
                          "report's lag says by how much.")
    ] = 8,
    drift_strength: Annotated[
        float | None,
        typer.Option(help="Inject the world's rate shock (deposits lose, loans gain) at this strength in logit "
                     "units from now on, replacing the world's own drift; 0 switches it off. "
                     "Default: the world's own drift, as generated."),
    ] = None,
    consenting_only: Annotated[
        bool, typer.Option(help="Only customers who consent to marketing call. By default everyone calls and the "
                           "service answers those who opted out with nothing (counted as opted out).")
    ] = False,
    window_seconds: Annotated[
        float | None,
        typer.Option(help="Width of the time windows of the conversion timeline. Default: a thirtieth of the run, "
                     "at least 1 s."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds a call may take before it counts as a timeout.")] = 10.0,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report as JSON to this file.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write the conversion over time per model version as a PNG to this file.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="FINREC_API_KEY", show_default=False,
                     help="API key sent as X-API-Key ($FINREC_API_KEY). It needs the scopes recommend and "
                     "events:trusted (the simulated bank reports approvals and declines), and recommend:explain "
                     "to count opt-outs. "
                     "Default: the development key of the workspace, if there is one."),
    ] = None,
) -> None:
    """Closed-loop simulation: synthetic customers call the running service and send back what they do.

    Customers of the world are drawn by activity and ask GET /recommend/{user_id}; each reacts to the answer
    as the ground truth says (position bias, true propensities, holdings that change with every approval)
    and posts the events (impression, view, click, apply, approve or decline) to POST /events with the
    answer's request_id, arm and model_version. The report gives, per model version and arm, answers,
    funnel counts and realised against true expected approvals, every failed request by kind with the
    server's message, and conversion over time. Run the service with --clock data for a synthetic world.
    See docs/simulation.md.
    """
    from finrec.simulation.loop import run_simulation

    settings = settings_of(ctx)
    srv = settings.serve
    base_url = url or f"http://{_url_host(srv.host)}:{srv.port}"
    world = data or srv.data
    if world is None:
        raise FinrecError("no world to simulate", hint="pass --data, the folder written by `finrec generate` "
                          "that the service serves")  # fmt: skip
    for path, what in ((output, "--output"), (plot, "--plot")):
        if path is not None and path.is_dir():
            raise FinrecError(f"{what} {path} is a folder", hint=f"pass a file name for {what}")
    if api_key is None:
        dev = settings.auth.dev_key_file or settings.workspace / "secrets" / "dev-api-key"
        api_key = dev.read_text().strip() if dev.is_file() else None
    report = run_simulation(base_url, world, minutes, rate, k=k, seed=seed, concurrency=concurrency,
                            drift_strength=drift_strength, progress=progress, consenting_only=consenting_only,
                            window_seconds=window_seconds, timeout=timeout, api_key=api_key)  # fmt: skip
    result = report.to_dict()
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1, allow_nan=False))
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        report.figure().savefig(plot, dpi=110)
    _print_summary(result)
    for path in (output, plot):
        if path is not None:
            out.print(f"[green]wrote[/] {path}")


def _url_host(host: str) -> str:
    """The host to call for a listening address: every interface means this machine; IPv6 in brackets."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _print_summary(result: dict) -> None:
    run = result["run"]
    pct = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    out.print(f"{run['sent']:,} of {run['planned']:,} requests sent in {run['wall_seconds']:.1f} s "
              f"({run['achieved_rate'] or 0:.1f}/s); {run['answered']:,} answered, {run['failed']:,} failed; "
              f"latency p50 {run['latency_ms']['p50']} ms, p95 {run['latency_ms']['p95']} ms; "
              f"max lag {run['lag_seconds']['max']} s")  # fmt: skip
    table = Table(title="per model version and arm (conversion = approvals per answer)", title_justify="left")
    for col in ("model version", "arm", "answers", "empty", "opted out", "impressions", "clicks", "applications",
                "approvals", "expected", "realised", "events accepted"):
        table.add_column(col, justify="left" if col in ("model version", "arm") else "right")
    for r in result["by_model"]:
        table.add_row(r["model_version"], r["arm"] or "—", f"{r['answers']:,}", f"{r['empty_answers']:,}",
                      f"{r['opted_out']:,}", f"{r['impressions']:,}", f"{r['clicks']:,}", f"{r['applications']:,}",
                      f"{r['approvals']:,}", pct(r["expected_per_answer"]), pct(r["realised_per_answer"]),
                      f"{r['events_accepted']:,}/{r['events_posted']:,}")  # fmt: skip
    out.print(table if result["by_model"] else "no answers")
    failures = result["failures"]
    if failures["total"]:
        err.print(f"[bold red]{failures['total']:,} failures[/]: " + "; ".join(
            f"{stage} {kind} {n:,}" for stage, kinds in failures["by_stage"].items() for kind, n in kinds.items()))
        for m in failures["messages"][:10]:
            status = f" {m['status']}" if m["status"] else ""
            err.print(f"  {m['count']:,} x {m['stage']} {m['kind']}{status}: {m['message']}")
    else:
        out.print("[green]no failed requests[/]")
    if run["interrupted"]:
        err.print("[yellow]interrupted[/]: the report covers the requests sent before Ctrl-C")
    for note in result["notes"]:
        err.print(f"[yellow]note[/]: {note}")
