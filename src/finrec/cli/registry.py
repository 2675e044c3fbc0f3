"""``finrec registry``: list, show, register, evaluate, promote, roll back and alias model versions.

The registry lives at ``registry.root`` (default ``<workspace>/registry``) under ``registry.name``; a running
``finrec serve`` without ``--model-dir`` serves its champion and follows every change here within
``registry.poll_seconds``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from finrec.artifacts import read_manifest
from finrec.cli._common import err, out, settings_of
from finrec.errors import FinrecError
from finrec.registry import CHALLENGER, CHAMPION, ModelRegistry, PromotionRefused, resolve_metric

registry_app = typer.Typer(
    help="The model registry: versions with their manifests and evaluations, the aliases `champion` (serves) and "
    "`challenger` (the candidate), a promotion gate and rollback. Location: registry.root (default "
    "<workspace>/registry), FINREC_REGISTRY__ROOT to change it.",
    no_args_is_help=True,
)

ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept in the registry's history).")]


def _registry(ctx: typer.Context) -> ModelRegistry:
    return ModelRegistry.from_settings(settings_of(ctx))


def _gate_value(entry: dict[str, Any], metric: str) -> str:
    evs = entry.get("evaluations") or {}
    if not evs:
        return "-"
    newest = max(evs.values(), key=lambda e: str(e.get("evaluated_at") or ""))
    name = resolve_metric(metric, newest, newest)
    v = newest.get("metrics", {}).get(name, {}).get("mean")
    return "-" if v is None else f"{name} {v:.4f}"


@registry_app.command("list")
def list_versions(ctx: typer.Context) -> None:
    """Every version, newest last, with its aliases and its newest evaluation on the gate metric."""
    reg = _registry(ctx)
    versions = reg.versions()
    if not versions:
        out.print(f"the registry {reg.home} holds no versions yet; add one with `finrec registry register BUNDLE`")
        return
    table = Table(title=f"registry {reg.home}")
    for col in ("version", "aliases", "model version", "registered", "data", "gate metric (newest eval)"):
        table.add_column(col)
    for v in versions:
        e = reg.entry(v)
        fingerprint = str(e.get("data", {}).get("data_fingerprint", ""))[:12]
        table.add_row(v, ", ".join(e["aliases"]), str(e.get("model_version")), str(e.get("registered_at")),
                      fingerprint, _gate_value(e, reg.gate_metric))  # fmt: skip
    out.print(table)


@registry_app.command()
def show(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="Version (v3) or alias (champion).")]) -> None:
    """Everything the registry knows of one version, as JSON: its entry (data, training metrics, evaluations,
    aliases), its history, and its bundle's manifest (config with every setting, metrics, inputs)."""
    reg = _registry(ctx)
    entry = reg.entry(ref)
    entry["history"] = [h for h in reg.history() if entry["version"] in (h.get("version"), h.get("previous"))]
    entry["bundle"] = str(reg.path(entry["version"]))
    manifest = read_manifest(reg.path(entry["version"]), "model")
    entry["manifest"] = {k: manifest.get(k) for k in ("kind", "created_at", "code_version", "inputs", "config",
                                                      "metrics")}  # fmt: skip
    entry["manifest"]["files"] = len(manifest.get("files", {}))
    out.print_json(json.dumps(entry, default=str))


@registry_app.command()
def register(
    ctx: typer.Context,
    bundle: Annotated[Path, typer.Argument(help="Model bundle folder written by `finrec train`.")],
    alias: Annotated[str, typer.Option(help="Alias to point at the new version (`none`: no alias). `champion` "
                                       "is refused: promote through the gate instead.")] = CHALLENGER,  # fmt: skip
    data: Annotated[Path | None, typer.Option(help="Also evaluate the new version (and the champion, on the same "
                                              "window) on this dataset, for the promotion gate.")] = None,  # fmt: skip
    reason: ReasonOpt = "",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Copy a trained bundle into the registry as the next version (checksums verified before and after)."""
    reg = _registry(ctx)
    if not bundle.is_dir():
        raise FinrecError(f"{bundle} is not a folder", hint="pass the --model-dir of a `finrec train` run")
    chosen = None if alias == "none" else alias
    if chosen == CHAMPION and reg.resolve(CHAMPION) is not None:
        raise FinrecError("a new version cannot become champion by registration once there is a champion",
                          hint="register it as challenger, then `finrec registry promote` (through the gate)")
    if chosen == CHAMPION:  # the very first model: nothing to gate against
        version = reg.register(bundle, alias=None, by="cli", reason=reason)
        reg.promote(version, by="cli", reason=reason or "first model")
    else:
        version = reg.register(bundle, alias=chosen, by="cli", reason=reason)
    out.print(f"registered [bold]{version}[/] from {bundle}" + (f" as {chosen}" if chosen else ""))
    if data is not None:
        _evaluate(ctx, [version] + ([CHAMPION] if reg.resolve(CHAMPION) not in (None, version) else []), data, progress)


def _evaluate(ctx: typer.Context, refs: list[str], data: Path, progress: bool) -> None:
    from finrec.lifecycle.compare import evaluate_versions

    reg = _registry(ctx)
    done = evaluate_versions(reg, refs, data, settings_of(ctx), progress=progress)
    for version, (key, record) in done.items():
        shown = ", ".join(f"{m} {v['mean']:.4f}" for m, v in sorted(record["metrics"].items())
                          if m.startswith(("ndcg@", "true_conversion@")) and v.get("mean") is not None)  # fmt: skip
        out.print(f"{version}: {shown} on {escape(key)} ({record.get('evaluated_users')} customers)")


@registry_app.command()
def evaluate(
    ctx: typer.Context,
    refs: Annotated[list[str], typer.Argument(help="Versions or aliases, the challenger first: its held-out "
                                              "window (or the data's latest) is the one all are compared on.")],
    data: Annotated[Path, typer.Option(help="Dataset to evaluate on (the challenger's training data, or newer).")],
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Evaluate versions offline on one shared window and record the results for the promotion gate."""
    _evaluate(ctx, refs, data, progress)


@registry_app.command()
def promote(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Version or alias to make champion.")] = CHALLENGER,
    force: Annotated[bool, typer.Option(help="Promote even if the gate finds it worse than the champion (recorded "
                                        "in the history with --reason).")] = False,  # fmt: skip
    data: Annotated[Path | None, typer.Option(help="First evaluate it and the champion on this dataset (same "
                                              "window), so that the gate has a comparison.")] = None,  # fmt: skip
    reason: ReasonOpt = "",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Make a version the champion if it is not worse than the champion offline (the gate), or with --force.

    Running services pick the new champion up within registry.poll_seconds. Exit code 3 when the gate refuses.
    """
    reg = _registry(ctx)
    if data is not None and reg.resolve(CHAMPION) not in (None, reg.require(ref)):
        _evaluate(ctx, [ref, CHAMPION], data, progress)
    try:
        done = reg.promote(ref, force=force, reason=reason, by="cli")
    except PromotionRefused as exc:
        err.print(f"[bold red]refused:[/] {escape(exc.gate.message)}")
        err.print("[dim]hint:[/] improve the challenger, or pass --force --reason '...' to promote it anyway")
        raise typer.Exit(3) from None
    verdict = "no champion before: no gate" if done.gate is None else escape(done.gate.message)
    out.print(f"[bold]{done.version}[/] is the champion (was {done.previous}); gate: {verdict}"
              + (" [yellow](forced)[/]" if done.forced else ""))  # fmt: skip


@registry_app.command()
def rollback(
    ctx: typer.Context,
    to: Annotated[str | None, typer.Option(help="Version to go back to (default: the previous champion).")] = None,
    reason: ReasonOpt = "",
) -> None:
    """Point the champion back at the previous champion (no gate: this is the way back). Services follow within
    registry.poll_seconds."""
    record = _registry(ctx).rollback(to, reason=reason, by="cli")
    out.print(f"rolled back: [bold]{record['version']}[/] is the champion again (was {record['previous']})")


@registry_app.command()
def alias(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Alias (e.g. challenger); `champion` moves only by promote/rollback.")],
    ref: Annotated[str, typer.Argument(help="Version or alias it should point at.")],
    reason: ReasonOpt = "",
) -> None:
    """Point an alias other than champion at a version (e.g. choose another challenger for an experiment)."""
    version = _registry(ctx).set_alias(name, ref, by="cli", reason=reason)
    out.print(f"{name} -> {version}")


@registry_app.command()
def history(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="Show the last N records.")] = 20,
) -> None:
    """Registrations, promotions (with the gate's verdict), refusals, rollbacks and alias moves, oldest first."""
    records = _registry(ctx).history(limit)
    table = Table(title="registry history")
    for col in ("time", "action", "version", "previous", "by", "reason / verdict"):
        table.add_column(col)
    for h in records:
        gate = (h.get("gate") or {}).get("message", "")
        table.add_row(str(h.get("time")), h.get("action", ""), str(h.get("version") or h.get("alias") or ""),
                      str(h.get("previous") or ""), str(h.get("by") or ""),
                      escape(" | ".join(x for x in (h.get("reason") or "", gate) if x)))  # fmt: skip
    out.print(table)
