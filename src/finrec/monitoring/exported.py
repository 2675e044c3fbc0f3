"""Monitoring figures for Prometheus: drift PSI/KS per feature, conversion per model version and arm, alerts
firing and the scheduled jobs' last runs, on the service's ``/metrics`` (``monitor`` scope).

Jobs write their latest figures to small JSON files (``<workspace>/monitoring/metrics/<section>.json``,
replaced atomically); :class:`MonitoringCollector` reads them at scrape time, so every worker process of the
service exports the same values without a shared registry, and a scrape costs a few file reads. Labels are
feature names, model versions, arms, rates, alert kinds and job names: never a customer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

SECTIONS = ("drift", "conversion", "jobs")


def metrics_dir(workspace: Path) -> Path:
    return Path(workspace) / "monitoring" / "metrics"


def write_section(workspace: Path, section: str, values: Any) -> None:
    """Replace one section's figures (JSON-ready ``values``)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown metrics section {section!r}")
    folder = metrics_dir(workspace)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{section}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(values, default=str, allow_nan=False))
    os.replace(tmp, folder / f"{section}.json")


def read_section(workspace: Path, section: str) -> Any:
    try:
        return json.loads((metrics_dir(workspace) / f"{section}.json").read_text())
    except (OSError, ValueError):
        return None


class MonitoringCollector(Collector):
    """A Prometheus collector over the workspace's monitoring figures (see the module docstring)."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = Path(workspace)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from finrec.monitoring.notify import KINDS, read_state

        drift = read_section(self.workspace, "drift") or {}
        psi = GaugeMetricFamily("finrec_drift_psi", "Population stability index of a ranker input (or the score) "
                                "at the latest drift check.", labels=["feature"])  # fmt: skip
        ks = GaugeMetricFamily("finrec_drift_ks", "Kolmogorov-Smirnov statistic of a ranker input (or the score) "
                               "at the latest drift check.", labels=["feature"])  # fmt: skip
        for f in drift.get("features") or []:
            if f.get("psi") is not None:
                psi.add_metric([str(f["name"])], float(f["psi"]))
            if f.get("ks") is not None:
                ks.add_metric([str(f["name"])], float(f["ks"]))
        yield psi
        yield ks
        checked = GaugeMetricFamily("finrec_drift_checked_timestamp_seconds", "When the latest drift check ran.")
        if drift.get("checked_at") is not None:
            checked.add_metric([], float(drift["checked_at"]))
        yield checked

        conv = read_section(self.workspace, "conversion") or {}
        rates = GaugeMetricFamily("finrec_conversion_rate", "Conversion per impression (click, apply, approve) per "
                                  "model version and arm, over the roll-up's whole period.",
                                  labels=["model_version", "arm", "rate"])  # fmt: skip
        imps = GaugeMetricFamily("finrec_conversion_impressions", "Impressions per model version and arm.",
                                 labels=["model_version", "arm"])  # fmt: skip
        for row in conv.get("totals") or []:
            mv, arm = str(row.get("model_version") or "unattributed"), str(row.get("arm") or "")
            imps.add_metric([mv, arm], float(row.get("impressions") or 0))
            for name in ("click_rate", "apply_rate", "approve_rate"):
                value = (row.get(name) or {}).get("rate")
                if value is not None:
                    rates.add_metric([mv, arm, name.removesuffix("_rate")], float(value))
        yield rates
        yield imps

        state = read_state(self.workspace)
        firing = GaugeMetricFamily("finrec_alert_firing", "1 while an alert of this kind fires (latest check), "
                                   "else 0.", labels=["kind"])  # fmt: skip
        for kind in KINDS:
            firing.add_metric([kind], 1.0 if state.get(kind, {}).get("firing") else 0.0)
        yield firing

        jobs = read_section(self.workspace, "jobs") or {}
        ended = GaugeMetricFamily("finrec_job_last_end_timestamp_seconds", "When a scheduled job last ended, by "
                                  "its outcome.", labels=["job", "outcome"])  # fmt: skip
        for job, by_outcome in jobs.items():
            for outcome, when in (by_outcome or {}).items():
                ended.add_metric([str(job), str(outcome)], float(when))
        yield ended
