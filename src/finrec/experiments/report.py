"""How an experiment's analysis reads: plain text for the console and a figure of its course.

Both take the JSON-ready report of :func:`finrec.experiments.analysis.analyze_experiment`, so a saved report can
be rendered again later without the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

_DASH = "—"


def _pct(v: float | None, digits: int = 2) -> str:
    return _DASH if v is None else f"{v:.{digits}%}"


def _pts(v: float | None) -> str:
    """A difference of rates in percentage points, signed."""
    return _DASH if v is None else f"{v * 100:+.2f}"


def _ci(iv: Mapping[str, Any], fmt: Any, key: str = "estimate") -> str:
    est = iv.get(key, iv.get("rate"))
    if est is None:
        return _DASH
    if iv.get("low") is None or iv.get("high") is None:
        return fmt(est)
    return f"{fmt(est)} [{fmt(iv['low'])}, {fmt(iv['high'])}]"


def _p(p: float | None) -> str:
    return _DASH if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # fmt: skip
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def render_text(report: Mapping[str, Any]) -> str:
    """The report as plain text: warnings first, then the arms, each comparison with its decision, SRM, events.

    Plain text (no markup) so that it can be printed, logged or pasted anywhere as it is.
    """
    window = report["window"]
    lines = [f"experiment {report['experiment']} ({report['status']}; window {window['start'] or 'open'} to "
             f"{window['stop'] or 'open'}); primary metric {report['primary_metric']}, alpha {report['alpha']}, "
             f"control arm {report['control']}"]  # fmt: skip
    for w in report["warnings"]:
        lines.append(f"!! {w}")
    lines.append("")
    conf = report["confidence"]
    header = ["arm", "model", "weight", "customers", "answers", "impressions", f"click / customer ({conf:.0%} CI)",
              "apply / customer", "approve / customer", "clicks / impression", "approval rate", "empty answers"]
    rows = []
    for name, a in report["arms"].items():
        cr = a["customer_rates"]
        rows.append([name, str(a["model"]), f"{a['weight']:g}", f"{a['customers']:,}", f"{a['answers']:,}",
                     f"{a['impressions']:,}", _ci(cr["click"], _pct), _pct(cr["apply"]["rate"]),
                     _pct(cr["approve"]["rate"]), _pct(a["impression_rates"]["click"]["rate"]),
                     _pct(a["approval_rate"]["rate"], 1), _pct(a["empty_answer_rate"]["rate"], 1)])  # fmt: skip
    lines += _table(header, rows)
    for comp in report["comparisons"]:
        lines += ["", *_comparison_lines(report, comp)]
    srm = report["srm"]
    lines += ["", f"sample ratio: chi2 {srm['chi2']:.2f} (df {srm['df']}), p = {_p(srm['p_value'])} "
              + ("[MISMATCH: results untrustworthy]" if srm["mismatch"] else "(customers per arm fit the weights)")]
    ev = report["events"]
    lines.append(f"events: {ev['read']:,} read, {ev['attributed']:,} attributed to an exposed customer; not counted: "
                 f"{ev['not_exposed']:,} of customers not in the experiment, {ev['before_exposure']:,} before the "
                 f"customer's first exposure, {ev['after_stop']:,} after the stop, {ev['outside_window']:,} outside "
                 "the window")  # fmt: skip
    return "\n".join(lines)


def _comparison_lines(report: Mapping[str, Any], comp: Mapping[str, Any]) -> list[str]:
    primary = report["primary_metric"]
    m = comp["metrics"][primary]
    seq, plan = comp["sequential"], comp["plan"]
    level = 1 - report["alpha_per_comparison"]
    out = [f"{comp['arm']} vs {comp['control']} ({primary}, customer level, {level:.1%} intervals):",
           f"  difference {_ci(m['difference'], _pts)} points, relative lift {_ci(m['relative_lift'], _pct)}",
           f"  fixed-horizon z-test p = {_p(m['p_value'])}; always-valid sequential p = {_p(seq['p_value'])}, "
           f"confidence sequence [{_pts(seq['low'])}, {_pts(seq['high'])}] points"]  # fmt: skip
    if plan.get("required"):
        need = ", ".join(f"{k} {v:,}" for k, v in plan["required"].items())
        out.append(f"  plan: {need} customers to detect a {plan['relative_mde']:.0%} lift with power "
                   f"{plan['power']:.0%} (progress {plan['progress']:.0%})")  # fmt: skip
    elif plan.get("note"):
        out.append(f"  {plan['note']}")
    basis = f" ({comp['decision_basis']})" if comp["decision_basis"] else ""
    out.append(f"  decision: {comp['decision'].upper()}{basis}: {comp['reason']}")
    others = [f"{name} {_ci(v['difference'], _pts)} pts (p = {_p(v['p_value'])})"
              for name, v in comp["metrics"].items() if name != primary]  # fmt: skip
    out.append("  other metrics: " + "; ".join(others))
    guards = []
    for name, g in comp["guardrails"].items():
        flag = " FLAGGED" if g["flagged"] else ""
        guards.append(f"{name.replace('_', ' ')} {_pct(g['control'], 1)} -> {_pct(g['treatment'], 1)} "
                      f"(p = {_p(g['p_value'])}){flag}")  # fmt: skip
    out.append("  guardrails: " + "; ".join(guards))
    return out


def experiment_figure(report: Mapping[str, Any]) -> Figure | None:
    """The experiment's course: each arm's cumulative primary conversion, and each lift's confidence sequence.

    Left: the share of exposed customers who converted, per arm, at each look. Right: the difference of each arm
    from control with its always-valid confidence sequence as a band; a decision can be read off wherever the
    band leaves zero. None when there are no looks yet.
    """
    from finrec.evaluation.html import _color, _new_figure

    comps = [c for c in report["comparisons"] if c["sequential"]["looks"]]
    if not comps:
        return None
    fig = _new_figure(10.0, 3.6)
    left, right = fig.subplots(1, 2, sharex=True)
    ctl = report["control"]
    drawn: set[str] = set()
    for j, comp in enumerate(comps):
        looks = [lk for lk in comp["sequential"]["looks"] if lk["time"] is not None]
        xs = [datetime.fromtimestamp(lk["time"], UTC) for lk in looks]
        for arm in (ctl, comp["arm"]):
            if arm in drawn:
                continue
            drawn.add(arm)
            ys = [lk["conversions"][arm] / lk["customers"][arm] if lk["customers"][arm] else None for lk in looks]
            colour = _color(0 if arm == ctl else j + 1)
            left.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", ms=3, color=colour,
                      label=f"{arm}{' (control)' if arm == ctl and arm != 'control' else ''}")  # fmt: skip
        colour = _color(j + 1)
        est = [float("nan") if lk["difference"] is None else lk["difference"] * 100 for lk in looks]
        lo = [lk["low"] * 100 for lk in looks]
        hi = [lk["high"] * 100 for lk in looks]
        right.fill_between(xs, lo, hi, color=colour, alpha=0.2, linewidth=0)
        right.plot(xs, est, marker="o", ms=3, color=colour, label=f"{comp['arm']} - {ctl}")
    right.axhline(0, color="black", linewidth=0.8)
    spread = [abs(lk["difference"]) * 100 for c in comps for lk in c["sequential"]["looks"] if lk["difference"]]
    if spread:  # the first looks' sequences span [-100, 100] points (no evidence yet); keep the axis on the data
        span = max(spread)
        right.set_ylim(-3 * span - 0.5, 3 * span + 0.5)
    metric = report["primary_metric"]
    left.set_title(f"customers who converted ({metric}), cumulative", fontsize="medium")
    left.set_ylim(bottom=0)
    left.yaxis.set_major_formatter(PercentFormatter(1.0))
    right.set_title(f"difference in points, always-valid {1 - report['alpha_per_comparison']:.0%} band",
                    fontsize="medium")  # fmt: skip
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30, labelsize="small")
        ax.legend(frameon=False, fontsize="small")
    return fig
