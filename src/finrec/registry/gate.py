"""The promotion gate: a challenger worse than the champion offline does not become champion unless forced.

The comparison is only meaningful on the same evaluation: the same data (by
fingerprint) and the same held-out window, so every evaluation a version
carries is keyed by both (:func:`evaluation_key`) and the gate compares the two
versions on the newest key they share. ``finrec retrain`` evaluates its
challenger and the champion together on the challenger's held-out window;
``finrec registry evaluate`` does the same for any versions.

The metric is ``registry.gate_metric``; ``auto`` (the default) takes the ground
truth's ``true_conversion@K`` when both evaluations have it and ``ndcg@K``
otherwise (:func:`resolve_metric` says why). A challenger passes when its
metric is at least ``(1 - max_regression)`` times the champion's:
``max_regression = 0`` refuses any drop, 0.01 tolerates a 1% drop as noise.
The verdict says by how much either way, and the refusal is
recorded in the registry's history.

Examples
--------
>>> ev = lambda x: {"k": {"metrics": {"ndcg@10": {"mean": x}}, "evaluated_at": "2026-01-01"}}
>>> g = check_gate({"version": "v2", "evaluations": ev(0.09)}, {"version": "v1", "evaluations": ev(0.10)},
...                "ndcg@10", 0.0)
>>> g.passed, round(g.relative_change, 3)
(False, -0.1)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from finrec.errors import FinrecError


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict on a challenger against the champion."""

    passed: bool
    metric: str
    challenger: str
    champion: str
    challenger_value: float | None
    champion_value: float | None
    relative_change: float | None
    max_regression: float
    evaluation: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PromotionRefused(FinrecError):
    """The gate refused a promotion; ``gate`` says why and by how much."""

    def __init__(self, gate: GateResult) -> None:
        super().__init__(f"promotion refused: {gate.message}",
                         hint="improve the challenger, or promote with --force (recorded in the registry's history "
                         "with your reason)")  # fmt: skip
        self.gate = gate


def evaluation_key(fingerprint: str, eval_cutoff: str, end: str) -> str:
    """Key of an evaluation: the data it ran on and its held-out window."""
    return f"{fingerprint[:16]}@{eval_cutoff}/{end}"


def evaluation_record(report: dict[str, Any], model: str = "two_stage") -> tuple[str, dict[str, Any]]:
    """(key, record) of an offline evaluation report (:func:`finrec.evaluation.offline.evaluate_model`)."""
    split, ds = report["split"], report["dataset"]
    key = evaluation_key(ds["fingerprint"], split["eval_cutoff"], split["end"])
    record = {
        "evaluated_at": report.get("created_at"),
        "data": ds.get("path"),
        "data_fingerprint": ds["fingerprint"],
        "eval_cutoff": split["eval_cutoff"],
        "end": split["end"],
        "evaluated_users": split.get("evaluated_users"),
        "metrics": {m: {s: v for s, v in summary.items() if s in ("mean", "low", "high")}
                    for m, summary in report["models"][model].items() if isinstance(summary, dict)},  # fmt: skip
    }
    return key, record


def _value(evaluation: dict[str, Any], metric: str) -> float | None:
    v = evaluation.get("metrics", {}).get(metric, {}).get("mean")
    return None if v is None or not math.isfinite(float(v)) else float(v)


def resolve_metric(metric: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    """``auto``: ground-truth ``true_conversion@K`` when both evaluations have it (a synthetic world), else
    ``ndcg@K``. Logged metrics favour the model whose answers produced the logs (customers can only click what
    they were shown), so on a champion's own feedback they flatter the champion; the truth does not."""
    if metric != "auto":
        return metric
    both = set(a.get("metrics", {})) & set(b.get("metrics", {}))
    truth = sorted(m for m in both if m.startswith("true_conversion@"))
    ndcg = sorted(m for m in both if m.startswith("ndcg@"))
    return truth[0] if truth else ndcg[0] if ndcg else "ndcg@10"


def check_gate(challenger: dict[str, Any], champion: dict[str, Any], metric: str, max_regression: float) -> GateResult:
    """Compare two registry entries on ``metric`` (or ``auto``) over the newest evaluation they share."""
    c_name, p_name = challenger["version"], champion["version"]
    c_ev, p_ev = challenger.get("evaluations", {}), champion.get("evaluations", {})
    if metric == "auto":
        common = [k for k in c_ev if k in p_ev]
        if common:
            newest = max(common, key=lambda k: str(c_ev[k].get("evaluated_at") or ""))
            metric = resolve_metric(metric, c_ev[newest], p_ev[newest])
        else:
            metric = "ndcg@10"
    shared = [k for k in c_ev if k in p_ev and _value(c_ev[k], metric) is not None
              and _value(p_ev[k], metric) is not None]  # fmt: skip
    if not shared:
        return GateResult(False, metric, c_name, p_name, None, None, None, max_regression, None,
                          f"{c_name} and the champion {p_name} have no {metric} evaluation on the same data and "
                          f"window; run `finrec registry evaluate {c_name} {p_name} --data DIR` first")  # fmt: skip
    key = max(shared, key=lambda k: str(c_ev[k].get("evaluated_at") or ""))
    c_val, p_val = _value(c_ev[key], metric), _value(p_ev[key], metric)
    assert c_val is not None and p_val is not None
    change = (c_val - p_val) / abs(p_val) if p_val != 0 else (0.0 if c_val == p_val else math.copysign(1.0, c_val))
    passed = change >= -max_regression - 1e-12
    word = "better than" if change > 0 else "worse than" if change < 0 else "equal to"
    message = (f"{c_name} is {abs(change):.1%} {word} the champion {p_name} on {metric} "
               f"({c_val:.4f} vs {p_val:.4f}, evaluation {key}); "
               f"{'within' if passed else 'beyond'} the tolerated drop of {max_regression:.1%}")  # fmt: skip
    return GateResult(passed, metric, c_name, p_name, c_val, p_val, change, max_regression, key, message)
