"""``finrec experiment``: the configured A/B tests and their analysis.

Experiments are configured as ``[[experiments]]`` tables in the settings file (docs/experiments.md); the service
assigns customers to arms and writes the arm into its audit log and events, which ``analyze`` reads.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from finrec.cli._common import err, is_store_error, open_events_for_reading, out, settings_of
from finrec.errors import FinrecError

experiment_app = typer.Typer(
    help="A/B tests: list the configured experiments and analyse one from the service's audit log and events.",
    no_args_is_help=True,
)


def _when(value: datetime | None, open_text: str) -> str:
    return open_text if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


@experiment_app.command("list")
def list_experiments(ctx: typer.Context) -> None:
    """List the configured experiments: arms with model and share of customers, window, and whether active now.

    "Active now" uses this machine's clock; a service run with `serve.clock = data` uses the data's clock
    instead, so it may disagree.
    """
    from finrec.experiments.assignment import Assigner

    settings = settings_of(ctx)
    if not settings.experiments:
        out.print("no experiments configured (add [[experiments]] tables to the settings file; docs/experiments.md)",
                  markup=False)
        return
    active = Assigner(settings.experiments).active(time.time())
    for exp in settings.experiments:
        total = sum(a.weight for a in exp.arms.values())
        out.print(f"{exp.name}: {'ACTIVE now' if active is exp else 'not active now'}; window "
                  f"{_when(exp.start, 'from the start')} to {_when(exp.stop, 'open end')} UTC; primary metric "
                  f"{exp.primary_metric}; alpha {exp.alpha:g}, power {exp.power:g}, "
                  f"MDE {exp.min_detectable_effect:.0%}", markup=False)  # fmt: skip
        labels = {arm: arm + (" (control)" if arm == exp.control_arm else "") for arm in exp.arms}
        width = max(len(label) for label in labels.values())
        for arm, a in exp.arms.items():
            out.print(f"  {labels[arm]:<{width}}  model {a.model}, weight {a.weight:g} ({a.weight / total:.0%} of "
                      "customers)", markup=False, highlight=False)  # fmt: skip


@experiment_app.command("analyze")
def analyze(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name of the experiment, as configured in the settings file.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the full report as JSON to this file.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Also draw a PNG: each arm's cumulative primary conversion, and the lift's always-valid "
                     "confidence sequence over time."),
    ] = None,
    tau: Annotated[
        float | None,
        typer.Option(min=1e-6, max=1.0, help="Mixing standard deviation of the sequential test, as an absolute "
                     "difference in the primary rate (0.01 = one point). Default: control's rate times the "
                     "experiment's min_detectable_effect. Validity never depends on it; speed does."),
    ] = None,
) -> None:
    """Analyse an experiment: per-arm conversion, each arm against control, sample-ratio check and guardrails.

    Reads the service's audit log (which customers were served in which arm, and when first) and its event
    store (what they did afterwards), as `serve.audit_log` and `serve.event_store` locate them (default: under
    the workspace). Customers are the unit: a customer converts at most once per metric. The decision uses an
    always-valid sequential test, so it may be run as often as you like while the experiment runs.
    See docs/experiments.md for how to read the report.
    """
    from finrec.experiments.analysis import analyze_configured
    from finrec.experiments.report import experiment_figure, render_text

    settings = settings_of(ctx)
    try:
        report = analyze_configured(settings, name, tau=tau, open_store=open_events_for_reading)
    except Exception as exc:
        if isinstance(exc, FinrecError) or not is_store_error(exc):
            raise
        raise FinrecError(f"cannot read the event store: {type(exc).__name__}: {exc}",
                          hint="check serve.event_store and that the store is reachable") from None  # fmt: skip
    out.print(render_text(report), markup=False, highlight=False, soft_wrap=True)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1, allow_nan=False))
        out.print(f"wrote {output}", markup=False)
    if plot is not None:
        fig = experiment_figure(report)
        if fig is None:
            err.print("[yellow]warning[/]: no exposed customers yet, so there is nothing to plot")
        else:
            plot.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(plot, dpi=100, bbox_inches="tight")
            out.print(f"wrote {plot}", markup=False)
