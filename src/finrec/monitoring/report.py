"""The monitoring report: conversion, guardrail health, fairness, drift and alerts, as a dict and one HTML page.

:func:`build_monitor_report` reads the event store twice and the audit log once, whatever the number of
sections (:func:`finrec.monitoring.conversion.compute_conversion` shares its scans with the other summaries),
and returns a JSON-ready dict (no NaN). :func:`render_html` turns it into a self-contained page: tables, and
plots as inline base64 PNGs; no script, no external asset, every text HTML-escaped. ``finrec monitor`` writes
both; the service's ``/dashboard`` and ``/dashboard.json`` serve them.

Drift is computed elsewhere (:mod:`finrec.monitoring.drift`); this module only renders the dict it is given
(``features`` as a list or mapping of rows with ``psi``, ``ks``, ``drifted``; ``score``; ``alert``; any
other scalar as a fact) or, when it says ``{"available": False, "reason": ...}``, why it is missing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from finrec.config import FinrecSettings
from finrec.data.dataset import Dataset
from finrec.errors import FinrecError
from finrec.evaluation.html import _PAGE, _STYLE, _esc, _img
from finrec.events.store import EventStore
from finrec.monitoring.alerts import AlertLog, alerts_path, read_alerts
from finrec.monitoring.conversion import COUNTS, RATES, compute_conversion, conversion_figure, label
from finrec.monitoring.drift import check_drift
from finrec.monitoring.fairness import FairnessAccumulator, fairness_figure
from finrec.monitoring.health import HealthAccumulator, health_figure
from finrec.monitoring.rollup import MonitoringRollup

log = logging.getLogger(__name__)
_MISSING = "—"
_TOP_FEATURES = 15
_EXTRA_STYLE = """
.flag { color: #c03d3e; font-weight: 600; } .ok { color: #3a923a; }
details summary { cursor: pointer; color: #3274a1; margin: 0.5em 0; } .wide { overflow-x: auto; }
"""


def build_monitor_report(
    events: EventStore,
    audit_path: Path | None,
    audit_key: bytes | None,
    dataset: Dataset | None,
    settings: FinrecSettings,
    drift: dict[str, Any] | None = None,
    alerts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything the page shows, JSON-ready; ``dataset`` (users, catalogue) and ``audit_key`` may be None."""
    t0 = time.perf_counter()
    mon = settings.monitor
    health = HealthAccumulator()
    fair = FairnessAccumulator()
    conv = compute_conversion(events, audit_path, mon, audit_key=audit_key, event_sinks=[fair.add_event],
                              answer_sinks=[health.add, fair.add_answer])  # fmt: skip
    notes = []
    if audit_path is None or not Path(audit_path).is_file():
        notes.append(f"no audit log at {audit_path}: no guardrail health, exposure, or attribution by request_id")
    catalogue = dataset.products["product_id"].astype(str).tolist() if dataset is not None else None
    fairness, more = _fairness_and_notes(
        dataset, lambda ds: fair.result(ds.users, audit_key, settings.protected_attributes, mon, ds.fingerprint),
        audit_key is None, health)  # fmt: skip
    notes.extend(more)
    return {
        "title": "finrec monitoring",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "settings": mon.model_dump(mode="json"),
        "sources": {
            "audit_log": None if audit_path is None else str(audit_path),
            "events": conv["events"]["events"],
            "audit_records": conv["audit"]["records"],
            "audit_skipped_lines": conv["audit"]["skipped_lines"],
            "dataset": None if dataset is None else str(dataset.path),
        },  # fmt: skip
        "conversion": conv,
        "health": {**health.result(catalogue), "skipped_lines": conv["audit"]["skipped_lines"]},
        "fairness": fairness,
        "drift": drift,
        "alerts": list(alerts or []),
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _fairness_and_notes(dataset: Dataset | None, fairness_of: Callable[[Dataset], dict[str, Any]], keyless: bool,
                        health: HealthAccumulator) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """Fairness by group (or why there is none) and the notes on it and on short answers, for both reports."""
    notes = []
    fairness: dict[str, Any]
    if dataset is None:
        fairness = {"available": False, "reason": "no dataset (customers) to group by"}
    else:
        fairness = fairness_of(dataset)
        if keyless:
            notes.append("no audit key: customers' answers cannot be joined to their groups (exposure unknown)")
    if health.k_known < health.answers:
        notes.append(f"short answers: {health.answers - health.k_known} audit record(s) do not say the k asked for "
                     "and are left out of the short-answer rate")  # fmt: skip
    return fairness, notes


def build_rollup_report(
    rollup: MonitoringRollup,
    dataset: Dataset | None,
    settings: FinrecSettings,
    drift: dict[str, Any] | None = None,
    alerts: list[dict[str, Any]] | None = None,
    jobs: list[dict[str, Any]] | None = None,
    update: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of :func:`build_monitor_report` from a :class:`MonitoringRollup`'s aggregates: its cost does not
    grow with the history (update the roll-up first; ``update`` is what that update read, shown on the page)."""
    t0 = time.perf_counter()
    mon = settings.monitor
    conv = rollup.conversion(mon)
    health = rollup.health_counts()
    catalogue = dataset.products["product_id"].astype(str).tolist() if dataset is not None else None
    fairness, notes = _fairness_and_notes(
        dataset, lambda ds: rollup.fairness(ds.users, settings.protected_attributes, mon, ds.fingerprint),
        rollup.key is None, health)  # fmt: skip
    if conv["audit"]["waiting_events"]:
        notes.append(f"{conv['audit']['waiting_events']} event(s) cite an answer not yet in the audit log: counted "
                     "in their own bucket until it arrives")  # fmt: skip
    return {
        "title": "finrec monitoring",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "settings": mon.model_dump(mode="json"),
        "sources": {
            "events": conv["events"]["events"],
            "audit_records": conv["audit"]["records"],
            "audit_skipped_lines": conv["audit"]["skipped_lines"],
            "dataset": None if dataset is None else str(dataset.path),
            "rollup": {"position": rollup.position(), "last_update": update},
        },
        "conversion": conv,
        "health": {**health.result(catalogue), "skipped_lines": conv["audit"]["skipped_lines"]},
        "fairness": fairness,
        "drift": drift,
        "alerts": list(alerts or []),
        "jobs": list(jobs or []),
        "notes": notes,
        "seconds": round(time.perf_counter() - t0 + float((update or {}).get("seconds") or 0), 3),
    }


def optional_drift(model_dir: Path | None, data_dir: Path | None, settings: FinrecSettings,
                   record: bool = True) -> dict[str, Any]:  # fmt: skip
    """``check_drift(...).to_dict()`` (an alert is stored when it alerts), or ``{"available": False, "reason"}``."""
    if model_dir is None:
        return {"available": False, "reason": "no model bundle given (pass --model-dir)"}
    if data_dir is None:
        return {"available": False, "reason": "no dataset given (pass --data)"}
    try:
        report = check_drift(Path(model_dir), Path(data_dir), settings)
    except FinrecError as exc:
        return {"available": False, "reason": exc.message + (f"; {exc.hint}" if exc.hint else "")}
    except Exception as exc:  # a failing drift check must not take the rest of the report with it
        log.exception("drift check failed")
        return {"available": False, "reason": f"the drift check failed: {type(exc).__name__}: {exc}"}
    if record:
        AlertLog(alerts_path(settings.workspace)).record_drift(report)
    return dict(report.to_dict())


def stored_alerts(settings: FinrecSettings, limit: int = 50) -> tuple[list[dict[str, Any]], str | None]:
    """The latest stored alerts of the workspace, and a note when they could not be read."""
    path = alerts_path(settings.workspace)
    try:
        return [dict(a) for a in read_alerts(path, limit)], None
    except (OSError, ValueError, FinrecError) as exc:
        return [], f"cannot read stored alerts from {path}: {exc}"


def render_html(report: Mapping[str, Any], refresh_seconds: int | None = None) -> str:
    """The report as one self-contained HTML page (``refresh_seconds``: the browser reloads it that often)."""
    title = str(report.get("title") or "finrec monitoring")
    src = report.get("sources") or {}
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">Built {_esc(report.get("created_at", ""))} in {_esc(report.get("seconds", ""))} s '
        f"from {_esc(src.get('events', 0))} events and {_esc(src.get('audit_records', 0))} audit records.</p>",
    ]
    body += _conversion(report.get("conversion") or {})
    body += _health(report.get("health") or {})
    body += _fairness(report.get("fairness") or {})
    body += _drift(report.get("drift"))
    body += _alerts(report.get("alerts") or [])
    if "jobs" in report:
        body += _jobs(report.get("jobs") or [])
    if report.get("notes"):
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in report["notes"]) + "</ul>")
    page = _PAGE.format(title=_esc(title), style=_STYLE + _EXTRA_STYLE, body="\n".join(body))
    if refresh_seconds:
        page = page.replace("<head>", f'<head>\n<meta http-equiv="refresh" content="{int(refresh_seconds)}">', 1)
    return page


# -- sections ----------------------------------------------------------------------------------------------


def _pct(r: Mapping[str, Any] | None) -> str:
    if not r or r.get("rate") is None:
        return _MISSING
    text = f"{r['rate']:.2%}"
    return text + (f" [{r['low']:.2%}, {r['high']:.2%}]" if r.get("low") is not None else "")


def _num(v: Any, fmt: str = ",") -> str:
    return _MISSING if v is None else format(v, fmt)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "", cls: str = "metrics") -> str:
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    h = "".join(f"<th>{_esc(c)}</th>" for c in head)
    thead = f"<thead><tr>{h}</tr></thead>" if any(head) else ""
    r = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table class="{cls}">{cap}{thead}<tbody>{r}</tbody></table></div>'


def _conversion(conv: Mapping[str, Any]) -> list[str]:
    out = ["<h2>Conversion</h2>"]
    totals = conv.get("totals") or []
    if not totals:
        return [*out, "<p>No impressions, clicks, applications or approvals in the event store yet.</p>"]
    conf = f"{conv.get('confidence', 0.95):.0%}"
    head = ["model version / arm", *COUNTS, *(f"{n.split('_')[0]} rate" for n in RATES)]
    rows = [[_esc(label(r["model_version"], r["arm"])), *(_num(r[c]) for c in COUNTS),
             *(_esc(_pct(r[n])) for n in RATES)] for r in totals]  # fmt: skip
    out.append(_table(head, rows, f"Whole period; rates per impression [{conf} Wilson interval]."))
    ev = conv.get("events") or {}
    out.append(f'<p class="meta">{_esc(ev.get("funnel_events", 0))} funnel events; '
               f'{_esc(ev.get("attributed_via_audit", 0))} attributed to a model through their request_id, '
               f'{_esc(ev.get("unattributed", 0))} unattributed. Buckets: {_esc(conv.get("bucket"))} of the '
               "answer (else of the event), UTC.</p>")  # fmt: skip
    fig = conversion_figure(conv)
    if fig is not None:
        out.append(_img(fig, "Conversion rates over time per model version and arm"))
    series = conv.get("series") or []
    srows = [[_esc(r["bucket"]), _esc(label(r["model_version"], r["arm"])), *(_num(r[c]) for c in COUNTS),
              *(_esc(_pct(r[n])) for n in RATES)] for r in series]  # fmt: skip
    out.append(f"<details><summary>Per {_esc(conv.get('bucket'))} ({len(series)} rows)</summary>"
               f"{_table(['bucket', *head], srows)}</details>")  # fmt: skip
    return out


def _health(h: Mapping[str, Any]) -> list[str]:
    out = ["<h2>Guardrail health</h2>"]
    if not h.get("answers"):
        return [*out, "<p>No answers in the audit log yet.</p>"]
    cov = h.get("coverage") or {}
    ipa = (h.get("items_per_answer") or {}).get("mean")
    facts = [
        ("answers", _num(h["answers"])),
        ("by kind", _esc(", ".join(f"{k} {v:,}" for k, v in h["kinds"].items()))),
        ("empty answers", f"{_num(h['empty']['count'])} ({_esc(_pct(h['empty']))})"),
        (
            "short answers (fewer than k)",
            f"{_num(h['short']['count'])} ({_esc(_pct(h['short']))}) of the {_num(h['short']['answers_with_k'])} "
            "answers that say their k"
            if h["short"].get("answers_with_k")
            else "unknown: no audit record says its k",
        ),
        ("items per answer", _MISSING if ipa is None else f"{ipa:.2f}"),
        (
            "catalogue coverage",
            f"{_esc(_pct({'rate': cov.get('coverage')}))} "
            f"({_num(cov.get('distinct_products'))} of {_num(cov.get('catalogue_size'))})",
        ),
    ]
    out.append(_table(["", ""], facts, cls="metrics facts-table"))
    removed = h.get("removed") or {}
    rows = [[_esc(rule), _num(v["sum"]), _MISSING if v["mean"] is None else f"{v['mean']:.2f}"]
            for rule, v in removed.items()]  # fmt: skip
    out.append(_table(["guardrail", "products removed", "per answer"], rows,
                      "Each product is counted once, under the first guardrail that removed it."))  # fmt: skip
    per = cov.get("per_model_version") or {}
    if per:
        out.append(_table(["model version", "answers", "distinct products", "coverage"],
                          [[_esc(mv), _num((h.get("answers_by_model_version") or {}).get(mv)),
                            _num(c["distinct_products"]), _esc(_pct({"rate": c["coverage"]}))]
                           for mv, c in per.items()]))  # fmt: skip
    fig = health_figure(h)
    if fig is not None:
        out.append(_img(fig, "Guardrail removals, coverage and items per answer"))
    return out


def _fairness(f: Mapping[str, Any]) -> list[str]:
    out = ["<h2>Fairness</h2>"]
    if f.get("available") is False:
        return [*out, f"<p>Not available ({_esc(f.get('reason'))}).</p>"]
    attrs = f.get("attributes") or {}
    if not attrs:
        return [*out, f"<p>No protected attribute in the users table (configured but missing: "
                      f"{_esc(', '.join(f.get('missing_attributes') or []) or 'none')}).</p>"]  # fmt: skip
    flagged = f.get("flagged") or []
    out.append('<p class="flag">Flagged: ' + _esc("; ".join(flagged)) + "</p>" if flagged
               else '<p class="ok">No disparity flagged.</p>')  # fmt: skip
    out.append(
        f'<p class="meta">Flag: adverse impact ratio below {_esc(f.get("min_ratio"))} and chi-square p below '
        f"{_esc(f.get('alpha'))}; groups under {_esc(f.get('min_group_size'))} are not tested (grey).</p>"
    )
    for attr, res in attrs.items():
        out.append(f"<h3>{_esc(attr)} <span class='meta'>({_esc(res['grouping'])})</span></h3>")
        rows = [[_esc(g["group"]), _num(g["customers"]), _num(g["answered"]), _esc(_pct(g["exposure"])),
                 _MISSING if g["items_per_answer"] is None else f"{g['items_per_answer']:.2f}", _num(g["decisions"]),
                 _esc(_pct(g["approval"])), _num(g["impressions"]),
                 _MISSING if g["application_rate"] is None else f"{g['application_rate']:.2%}"]
                for g in res["groups"]]  # fmt: skip
        out.append(_table(["group", "customers", "answered", "exposure", "items/answer", "decisions", "approval",
                           "impressions", "apply rate"], rows))  # fmt: skip
        tests = []
        for metric in ("exposure", "approval"):
            t = res[metric]
            p = t["p_value"]
            verdict = '<span class="flag">flagged</span>' if t["flagged"] else "ok" if p is not None else "not tested"
            tests.append(
                [
                    metric,
                    _MISSING if t["ratio"] is None else f"{t['ratio']:.3f}",
                    _esc(f"{t['lowest'] or _MISSING} / {t['highest'] or _MISSING}"),
                    _MISSING if p is None else ("&lt; 0.001" if p < 0.001 else f"{p:.3f}"),
                    _esc(", ".join(t["excluded_groups"]) or _MISSING),
                    verdict + (f" <span class='meta'>({_esc(t['note'])})</span>" if t.get("note") else ""),
                ]
            )
        out.append(_table(["", "impact ratio", "lowest / highest", "chi-square p", "not tested", ""], tests))
    fig = fairness_figure(f)
    if fig is not None:
        out.append(_img(fig, "Exposure and approval per protected group"))
    return out


def _drift(drift: Mapping[str, Any] | None) -> list[str]:
    out = ["<h2>Drift</h2>"]
    if not drift:
        return [*out, "<p>drift: not available (no drift check was run for this report).</p>"]
    if drift.get("available") is False:
        return [*out, f"<p>drift: not available ({_esc(drift.get('reason', 'unknown reason'))}).</p>"]
    drifted = drift.get("drifted") or []
    if "alert" in drift:
        out.append(f'<p class="flag">Drift alert: {_esc(", ".join(map(str, drifted)) or "yes")}.</p>'
                   if drift["alert"] else '<p class="ok">No drift alert.</p>')  # fmt: skip
    feats = drift.get("features") or []
    if isinstance(feats, Mapping):
        feats = [{"name": k, **(v if isinstance(v, Mapping) else {"value": v})} for k, v in feats.items()]
    feats = [r for r in feats if isinstance(r, Mapping)]
    score = drift.get("score")
    if isinstance(score, Mapping):
        out.append(
            _table(
                ["", *(k for k in score if k not in ("name", "feature"))],
                [["model score", *(_cell(v) for k, v in score.items() if k not in ("name", "feature"))]],
            )
        )
    if feats:
        feats.sort(key=lambda r: (not r.get("drifted"), -(_float(r.get("psi")))))
        cols = list(dict.fromkeys(k for r in feats for k in r if k not in ("name", "feature")))
        rows = [[_esc(r.get("name", r.get("feature", _MISSING))), *(_cell(r.get(c)) for c in cols)] for r in feats]
        caption = "Population stability index (psi) and Kolmogorov-Smirnov statistic (ks) per feature, drifted first."
        out.append(_table(["feature", *cols], rows[:_TOP_FEATURES], caption))
        if len(rows) > _TOP_FEATURES:
            out.append(f"<details><summary>All {len(rows)} features</summary>{_table(['feature', *cols], rows)}"
                       "</details>")  # fmt: skip
    facts = [(k, v) for k, v in drift.items() if k not in ("features", "score", "drifted", "alert")]
    if facts:
        out.append(_table(["", ""], [[_esc(k), _fact(k, v)] for k, v in facts], cls="metrics facts-table"))
    return out


def _float(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else float("-inf")


def _fact(k: str, v: Any) -> str:
    if k.endswith("cutoff") and isinstance(v, int | float):
        return _esc(dt.datetime.fromtimestamp(v, dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    return _cell(v)


def _alerts(alerts: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["<h2>Alerts</h2>"]
    if not alerts:
        return [*out, "<p>No stored alerts.</p>"]
    cols = list(dict.fromkeys(k for a in alerts for k in a))
    return [*out, _table(cols, [[_cell(a.get(c)) for c in cols] for a in alerts])]


def _jobs(jobs: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["<h2>Scheduled jobs</h2>"]
    if not jobs:
        return [*out, "<p>No job has run yet: start <code>finrec scheduler</code>, or run <code>finrec scheduler run "
                "JOB</code> from cron (docs/operations.md).</p>"]
    rows = []
    for j in reversed(jobs):  # newest first
        start = dt.datetime.fromtimestamp(float(j["started_at"]), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        summary = j.get("summary") or {}
        said = summary.get("message") or ", ".join(f"{k}: {v}" for k, v in summary.items() if isinstance(v, str | int))
        outcome = str(j.get("outcome"))
        cls = "flag" if outcome in ("failed", "refused", "alert", "abandoned") else "ok" if outcome == "ok" else ""
        rows.append([_esc(j.get("job")), _esc(j.get("trigger") or ""), _esc(start), _num(j.get("seconds")),
                     f'<span class="{cls}">{_esc(outcome)}</span>', _esc(str(said)[:300])])  # fmt: skip
    return [*out, _table(["job", "trigger", "started (UTC)", "seconds", "outcome", "what it did"], rows,
                         "Newest first: the scheduler's runs and one-off `finrec scheduler run` runs.")]  # fmt: skip


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return '<span class="flag">yes</span>' if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple) and v and all(isinstance(x, Mapping) and "name" in x for x in v):
        return _esc(", ".join(str(x["name"]) for x in v))  # drifted features of a stored alert
    if isinstance(v, Mapping | list | tuple):
        return _esc(json.dumps(v, default=str)[:300])
    return _MISSING if v is None else _esc(v)
