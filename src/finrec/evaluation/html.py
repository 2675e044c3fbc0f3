"""The evaluation report as one self-contained HTML file.

:func:`write_html_report` renders a report dict (dataset, model and split facts;
per-model metric summaries from :func:`finrec.evaluation.bootstrap.summarise`;
per-segment summaries; notes) into a single page: tables, and charts embedded
as base64 PNG. No JavaScript, no external assets; all text is HTML-escaped.
Any model, metric or section may be missing: what is there is rendered and a
missing value shows as "—".

Charts are drawn on :class:`matplotlib.figure.Figure` objects with an explicit
Agg canvas rather than through pyplot, so rendering a report never changes the
process-wide backend (safe in servers and notebooks) and leaves no figures
registered with pyplot.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import re
import sys
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["metrics_bar_figure", "recall_figure", "segments_figure", "write_html_report"]

#: Models in the order reports show them; any others follow in the order given.
MODEL_ORDER = ("random", "popularity", "two_tower", "two_stage", "oracle")
#: Upper bounds shown for reference: never marked best.
REFERENCE_MODELS = ("oracle",)
#: Metric families in the order tables show them.
_METRIC_ORDER = ("ndcg", "map", "mrr", "hit_rate", "recall", "coverage")
_MISSING = "—"
_COLORS = ("#8c8c8c", "#e1812c", "#3a923a", "#3274a1", "#c03d3e", "#9372b2", "#845b53", "#d684bd", "#bbbb42")

Summary = Mapping[str, Mapping[str, Any]]  # metric -> {"mean", "low", "high", "n"}


# -- public ----------------------------------------------------------------------------------------------


def write_html_report(
    report: Mapping[str, Any],
    path: Path | str,
    plots: Mapping[str, Figure] | None = None,
    reference_models: Sequence[str] = REFERENCE_MODELS,
) -> Path:
    """Write ``report`` as one self-contained HTML file at ``path`` and return the path.

    ``plots`` are extra figures (a reliability diagram, say), each shown under its key
    as a heading; they are closed (removed from pyplot, if pyplot made them) once
    embedded. In the metrics table the best mean of each column is bold, models in
    ``reference_models`` (the oracle: an upper bound) excepted.
    """
    path = Path(path)
    models: Mapping[str, Summary] = report.get("models") or {}
    segments: Mapping[str, Mapping[str, Mapping[str, Summary]]] = report.get("segments") or {}
    title = str(report.get("title") or "finrec evaluation")
    reference = tuple(reference_models)

    body: list[str] = [f"<h1>{_esc(title)}</h1>"]
    meta = []
    if report.get("created_at"):
        meta.append(f"Created {report['created_at']}")
    if isinstance(report.get("seconds"), int | float):
        meta.append(f"evaluation took {report['seconds']:,} s")
    if meta:
        body.append(f'<p class="meta">{_esc("; ".join(meta))}.</p>')
    body.append(_facts_section(report))

    body.append("<h2>Metrics</h2>")
    if models:
        body.append(_metrics_table(models, reference))
        headline = [m for m in (_pick(_metric_names(models), p) for p in ("ndcg", "map", "hit_rate")) if m]
        if headline:
            body.append(_img(metrics_bar_figure(models, headline), "Headline metrics per model"))
        recall = recall_figure(models)
        if recall is not None:
            body.append("<h3>Recall@N</h3>")
            body.append(_img(recall, "Recall at N per model"))
    else:
        body.append(f"<p>{_MISSING} no model results.</p>")

    comparisons = report.get("comparisons") or {}
    if comparisons:
        body.append(_comparisons_section(comparisons))

    if segments:
        body.append(_segments_section(segments, reference))

    for name, fig in (plots or {}).items():
        body.append(f"<h2>{_esc(name)}</h2>")
        body.append(_img(fig, str(name)))

    notes = report.get("notes") or []
    if notes:
        body.append("<h2>Notes</h2>")
        body.append("<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")

    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f'<footer class="meta">Written by finrec on {generated}.</footer>')
    page = _PAGE.format(title=_esc(title), style=_STYLE, body="\n".join(body))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def metrics_bar_figure(models_summary: Mapping[str, Summary], metric: str | Sequence[str]) -> Figure:
    """Bars of ``metric`` (or several, grouped) per model, with the bootstrap interval as error bars."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    models = _order_models(models_summary)
    fig = _new_figure(max(5.0, 1.1 * len(models) * max(1, len(metrics)) ** 0.5 + 2), 3.6)
    ax = fig.subplots()
    width = 0.8 / max(1, len(metrics))
    for j, name in enumerate(metrics):
        stats = [_stat(models_summary[m].get(name)) for m in models]
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(models))]
        colors = [_model_color(m) for m in models] if len(metrics) == 1 else _color(j)
        ax.bar(xs, [s[0] for s in stats], width=width * 0.92, yerr=_yerr(stats), capsize=3, label=name, color=colors)
    ax.set_xticks(range(len(models)), models, rotation=20 if len(models) > 4 else 0)
    ax.set_ylabel("mean over users")
    ax.set_title(", ".join(metrics) + " (error bars: bootstrap interval)" if metrics else "")
    _unit_ylim(ax, models_summary, metrics, models)
    if len(metrics) > 1:
        ax.legend(frameon=False, fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return fig


def recall_figure(models_summary: Mapping[str, Summary]) -> Figure | None:
    """Recall@N against N per model, with intervals; None if no model has a recall@N metric."""
    ns = sorted({k for m in _metric_names(models_summary) if _family(m) == "recall" and (k := _k(m)) is not None})
    if not ns:
        return None
    fig = _new_figure(7.0, 3.6)
    ax = fig.subplots()
    for model in _order_models(models_summary):
        points = [(n, _stat(models_summary[model].get(f"recall@{n}"))) for n in ns]
        points = [(n, s) for n, s in points if not math.isnan(s[0])]
        if not points:
            continue
        xs = [n for n, _ in points]
        stats = [s for _, s in points]
        means = [s[0] for s in stats]
        ax.errorbar(xs, means, yerr=_yerr(stats), marker="o", capsize=3, label=model, color=_model_color(model))
    ax.set_xscale("log" if len(ns) > 1 and ns[-1] / max(ns[0], 1) >= 10 else "linear")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("N")
    ax.set_ylabel("recall@N")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def segments_figure(segments: Mapping[str, Mapping[str, Mapping[str, Summary]]], metric: str) -> Figure:
    """One panel per segmentation (age band, region, ...): ``metric`` per segment value, a bar per model."""
    dims = list(segments)
    fig = _new_figure(8.0, 2.9 * max(1, len(dims)) + 0.4)
    axes = fig.subplots(max(1, len(dims)), 1, squeeze=False)[:, 0]
    for ax, dim in zip(axes, dims, strict=False):
        values = list(segments[dim])
        models = _order_models({m: {} for v in values for m in segments[dim][v]})
        width = 0.8 / max(2, len(models))
        for j, model in enumerate(models):
            stats = [_stat(segments[dim][v].get(model, {}).get(metric)) for v in values]
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(values))]
            means = [s[0] for s in stats]
            ax.bar(xs, means, width=width * 0.92, yerr=_yerr(stats), capsize=2, label=model, color=_model_color(model))
        ax.set_xticks(range(len(values)), [str(v) for v in values], rotation=20 if len(values) > 6 else 0)
        ax.set_title(f"{metric} by {dim}", fontsize="medium")
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
        if models:
            ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# -- sections ----------------------------------------------------------------------------------------------


def _facts_section(report: Mapping[str, Any]) -> str:
    boxes = []
    for key in ("dataset", "model", "split"):
        facts = report.get(key)
        if not facts:
            continue
        rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt_fact(v))}</td></tr>" for k, v in dict(facts).items())
        boxes.append(f'<div class="facts"><h3>{_esc(key.capitalize())}</h3><table>{rows}</table></div>')
    return f'<div class="factbox">{"".join(boxes)}</div>' if boxes else ""


def _metrics_table(models: Mapping[str, Summary], reference: tuple[str, ...]) -> str:
    names = _metric_names(models)
    order = _order_models(models)
    best = {m: _best(((model, models[model].get(m)) for model in order), reference) for m in names}
    head = "".join(f"<th>{_esc(m)}</th>" for m in names)
    rows = []
    for model in order:
        label = _esc(model) + (' <span class="ref">(reference)</span>' if model in reference else "")
        cells = "".join(_cell(models[model].get(m), model in best[m]) for m in names)
        rows.append(f"<tr><th>{label}</th>{cells}</tr>")
    caption = (
        "Mean over users [bootstrap confidence interval]; hover a cell for the number of users. "
        "Bold: best mean per column" + (f" ({', '.join(reference)} excluded)." if reference else ".")
    )
    return (
        f'<table class="metrics"><caption>{_esc(caption)}</caption>'
        f"<thead><tr><th>model</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _comparisons_section(comparisons: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for name, c in comparisons.items():
        diff = _cell({"mean": c.get("mean_diff"), "low": c.get("low"), "high": c.get("high")}, False)
        p = _num(c.get("p_value"))
        p_text = _MISSING if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")
        metric = _esc(c.get("metric", _MISSING))
        rows.append(f"<tr><th>{_esc(name)}</th><td>{metric}</td>{diff}<td>{_esc(p_text)}</td></tr>")
    return (
        "<h2>Paired comparisons</h2>"
        '<table class="metrics"><caption>Mean per-user difference on the same users [bootstrap interval], '
        "two-sided bootstrap p-value.</caption><thead><tr><th>comparison</th><th>metric</th><th>difference</th>"
        f"<th>p</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _segments_section(segments: Mapping[str, Mapping[str, Mapping[str, Summary]]], reference: tuple[str, ...]) -> str:
    names = [m for dim in segments.values() for value in dim.values() for s in value.values() for m in s]
    metric = _pick(names, "ndcg") or (sorted(set(names), key=_metric_key)[0] if names else None)
    parts = ["<h2>Segments</h2>"]
    if metric is None:
        parts.append(f"<p>{_MISSING} no segment results.</p>")
        return "".join(parts)
    parts.append(f"<p>{_esc(metric)} per segment; n is the number of users with relevant items.</p>")
    for dim, by_value in segments.items():
        models = _order_models({m: {} for v in by_value.values() for m in v})
        head = "".join(f"<th>{_esc(m)}</th>" for m in models)
        rows = []
        for value, per_model in by_value.items():
            stats = {m: per_model.get(m, {}).get(metric) for m in models}
            best = _best(stats.items(), reference)
            n = next((s.get("n") for s in stats.values() if s and s.get("n") is not None), None)
            cells = "".join(_cell(stats[m], m in best) for m in models)
            rows.append(f"<tr><th>{_esc(value)}</th><td>{_esc(_fmt_int(n))}</td>{cells}</tr>")
        parts.append(
            f'<h3>{_esc(dim)}</h3><table class="metrics"><thead><tr><th>{_esc(dim)}</th><th>n</th>{head}</tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table>"
        )
    parts.append(_img(segments_figure(segments, metric), f"{metric} per segment"))
    return "".join(parts)


# -- helpers -----------------------------------------------------------------------------------------------


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend for this figure only; the global backend is untouched
    return fig


def _img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        _close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}"></figure>'


def _close(fig: Figure) -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")  # only if the caller uses pyplot; never import it here
    if pyplot is not None:
        pyplot.close(fig)


def _stat(s: Mapping[str, Any] | None) -> tuple[float, float, float]:
    """(mean, low, high) with NaN for anything missing or not a number."""
    if not s:
        return (math.nan, math.nan, math.nan)
    return (_num(s.get("mean")), _num(s.get("low")), _num(s.get("high")))


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _yerr(stats: Sequence[tuple[float, float, float]]) -> list[list[float]]:
    lower = [max(0.0, m - lo) if not math.isnan(m - lo) else 0.0 for m, lo, _ in stats]
    upper = [max(0.0, hi - m) if not math.isnan(hi - m) else 0.0 for m, _, hi in stats]
    return [lower, upper]


def _unit_ylim(ax: Any, models: Mapping[str, Summary], metrics: Sequence[str], order: Sequence[str]) -> None:
    tops = [_stat(models[m].get(x)) for m in order for x in metrics]
    values = [v for s in tops for v in s if not math.isnan(v)]
    if values and min(values) >= 0 and max(values) <= 1:
        ax.set_ylim(0, min(1.05, max(values) * 1.15 + 0.02))


def _cell(s: Mapping[str, Any] | None, bold: bool) -> str:
    mean, low, high = _stat(s)
    if math.isnan(mean):
        return f'<td class="missing">{_MISSING}</td>'
    text = f"{mean:.4f}"
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{low:.4f}, {high:.4f}]"
    title = f' title="n = {_esc(_fmt_int(s.get("n")))}"' if s and s.get("n") is not None else ""
    text = f"<b>{_esc(text)}</b>" if bold else _esc(text)
    return f"<td{title}>{text}</td>"


def _best(stats: Iterable[tuple[str, Mapping[str, Any] | None]], reference: tuple[str, ...]) -> set[str]:
    """Models whose mean (as displayed, 4 decimals) is the highest, reference models excluded."""
    means = {m: round(_stat(s)[0], 4) for m, s in stats if m not in reference}
    means = {m: v for m, v in means.items() if not math.isnan(v)}
    if not means:
        return set()
    top = max(means.values())
    return {m for m, v in means.items() if v == top}


def _fmt_fact(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.6g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, Mapping | list | tuple):
        return json.dumps(v, default=str, ensure_ascii=False)
    return str(v)


def _fmt_int(n: Any) -> str:
    try:
        return f"{int(n):,}"
    except (TypeError, ValueError):
        return _MISSING


def _order_models(models: Iterable[str]) -> list[str]:
    names = list(models)
    return [m for m in MODEL_ORDER if m in names] + [m for m in names if m not in MODEL_ORDER]


def _model_color(model: str) -> str:
    """The same colour for a model in every chart."""
    if model in MODEL_ORDER:
        return _COLORS[MODEL_ORDER.index(model)]
    return _COLORS[len(MODEL_ORDER) + zlib.crc32(model.encode()) % (len(_COLORS) - len(MODEL_ORDER))]


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


_NAME = re.compile(r"^(?P<family>[a-z_]+?)(?:@(?P<k>\d+))?$")


def _family(name: str) -> str:
    m = _NAME.match(name)
    return m.group("family") if m else name


def _k(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group("k")) if m and m.group("k") else None


def _metric_key(name: str) -> tuple[int, int, str]:
    fam = _family(name)
    rank = _METRIC_ORDER.index(fam) if fam in _METRIC_ORDER else len(_METRIC_ORDER)
    return (rank, _k(name) or 0, name)


def _metric_names(models: Mapping[str, Summary] | Iterable[str]) -> list[str]:
    names = {m for s in models.values() for m in s} if isinstance(models, Mapping) else set(models)
    return sorted(names, key=_metric_key)


def _pick(names: Iterable[str], family: str) -> str | None:
    """The metric of ``family`` to headline: @10 if present, else the smallest k."""
    found = sorted({n for n in names if _family(n) == family}, key=_metric_key)
    if not found:
        return None
    return f"{family}@10" if f"{family}@10" in found else found[0]


_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1200px; margin: 2em auto; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; }
.factbox { display: flex; flex-wrap: wrap; gap: 1em; }
.facts { border: 1px solid #ddd; border-radius: 6px; padding: 0 1em 0.8em; min-width: 16em; }
.facts th { text-align: left; padding-right: 1em; font-weight: 600; vertical-align: top; }
.facts td { font-family: ui-monospace, Menlo, Consolas, monospace; word-break: break-word; }
table.metrics { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
table.metrics caption { caption-side: bottom; text-align: left; color: #666; padding-top: 0.4em; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right;
                                     white-space: nowrap; }
table.metrics thead th { background: #f4f4f4; }
table.metrics tbody th { text-align: left; }
td.missing { color: #999; text-align: center; }
.ref { color: #888; font-weight: normal; font-size: 0.85em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
footer { margin-top: 3em; font-size: 0.85em; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
</body>
</html>
"""
