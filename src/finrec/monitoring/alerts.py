"""Stored alerts: one JSON line per alert, appended, so a dashboard or an on-call script can read them back.

JSON Lines rather than a database: appends are cheap, the file is readable with ``tail``, and a crash
mid-write tears at most the last line, which :func:`read_alerts` skips. Each line is written with a
single ``write`` call on a file opened for appending, so concurrent writers do not interleave lines.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finrec.monitoring.drift import DriftReport


def alerts_path(workspace: Path) -> Path:
    """Where the workspace's alerts are stored: ``<workspace>/monitoring/alerts.jsonl``."""
    return Path(workspace) / "monitoring" / "alerts.jsonl"


class AlertLog:
    """Append-only alert log at ``path`` (created with its folder on first write)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one alert (a ``time`` is added when missing); returns what was written."""
        record = {"time": datetime.now(UTC).isoformat(timespec="seconds"), **record}
        line = json.dumps(record, default=str, allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        return record

    def record_drift(self, report: DriftReport) -> dict[str, Any] | None:
        """Append a ``drift`` alert if ``report`` alerts (nothing otherwise); returns the record written."""
        if not report.alert:
            return None
        by_name = {f.name: f for f in [*report.features, report.score]}
        drifted = [{k: v for k, v in by_name[n].to_dict().items() if k in ("name", "psi", "ks", "psi_pvalue",
                    "ks_pvalue", "reference_mean", "current_mean")} for n in report.drifted]  # fmt: skip
        return self.append({
            "kind": "drift",
            "model_version": report.model_version,
            "reference_cutoff": report.reference_cutoff,
            "current_cutoff": report.current_cutoff,
            "drifted": drifted,
            "thresholds": {"psi": report.psi_threshold, "ks": report.ks_threshold, "alpha": report.alpha},
        })  # fmt: skip


def read_alerts(path: Path, limit: int | None = 100) -> list[dict[str, Any]]:
    """The last ``limit`` alerts (all when ``None``), oldest first; unreadable lines (a torn write) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict):
                out.append(record)
    return out if limit is None else out[-limit:] if limit > 0 else []
