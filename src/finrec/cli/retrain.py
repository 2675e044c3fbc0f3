"""``finrec retrain``: train on the feedback since the last training and register the result as challenger."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from finrec.cli._common import out, settings_of


def retrain(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="Dataset to extend with the new events (default: the one the "
                                              "champion was trained on, from the registry).")] = None,  # fmt: skip
    if_drift: Annotated[bool, typer.Option(
        "--if-drift", help="Run only if a drift alert was stored (by `finrec monitor`) since the champion was "
        "registered; otherwise exit 0 saying so. For cron or a scheduler: a drift alert triggers retraining.")] = False,
    promote: Annotated[bool, typer.Option("--promote", help="Promote the challenger if it passes the gate "
                                          "(never forced). Default: register it as challenger only, for an A/B "
                                          "test or a promotion by hand.")] = False,  # fmt: skip
    min_events: Annotated[int | None, typer.Option(min=1, help="Fewest new events worth retraining on (default: "
                                                   "retrain.min_new_events).")] = None,  # fmt: skip
    output: Annotated[Path | None, typer.Option(help="Also write what happened as JSON to this file.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Take the service's events since the champion's data ends, write a new dataset version with them, train on
    it, register the model as `challenger`, evaluate it and the champion on the same held-out window and run the
    promotion gate.

    Reads the event store of serve.event_store (default <workspace>/events.db). The windows of the retrained
    model come from [retrain] eval_days / label_days when set (else [train]'s).
    """
    from finrec.lifecycle.retrain import result_json
    from finrec.lifecycle.retrain import retrain as run

    result = run(settings_of(ctx), data=data, if_drift=if_drift, promote=promote, min_events=min_events,
                 progress=progress)  # fmt: skip
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(result_json(result))
    if not result.ran:
        out.print(f"nothing to do: {escape(result.reason)}")
        return
    out.print(f"retrained on {result.new_events} new events -> dataset {result.dataset}")
    if result.left_out:
        out.print(f"left out: {result.left_out}")
    for version, record in result.evaluations.items():
        metrics = record["metrics"]
        shown = ", ".join(f"{m} {metrics[m]['mean']:.4f}" for m in sorted(metrics) if m.startswith(("ndcg", "true_")))
        out.print(f"  {version}: {shown}")
    out.print(f"registered [bold]{result.challenger}[/] as challenger; seconds: {result.seconds}")
    if result.gate is not None:
        colour = "green" if result.gate.passed else "red"
        out.print(f"gate: [{colour}]{'passes' if result.gate.passed else 'refuses'}[/]: {escape(result.gate.message)}")
    if result.promoted:
        out.print(f"[bold]{result.challenger}[/] promoted to champion")
