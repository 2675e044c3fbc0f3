"""`finrec experiment`: the whole path from a service's audit log and SQLite event store to the decision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from typer.testing import CliRunner

from finrec.cli import app
from finrec.config import ExperimentSettings
from finrec.events.schema import Event
from finrec.events.store import open_event_store
from finrec.experiments.assignment import assign_arm
from finrec.serving.audit import AuditLog, load_or_create_key

T0 = 1_717_200_000  # 2024-06-01T00:00:00Z


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


CONFIG = """
[[experiments]]
name = "ranker-v2"
start = 2024-06-01T00:00:00Z
stop = 2024-07-01T00:00:00Z
control = "control"
primary_metric = "click"
min_detectable_effect = 0.3

[experiments.arms.control]
model = "champion"
weight = 1

[experiments.arms.treatment]
model = "challenger"
weight = 1
"""


def answer(request_id: str, t: float, experiment: str, arm: str | None, kind: str) -> dict[str, object]:
    """An audit record as the service writes it (the customer pseudonym is added by AuditLog)."""
    items = [{"product_id": "P1", "rank": 1, "score": 0.4, "reasons": []}] if kind == "customer" else []
    return {"request_id": request_id, "ts": t, "time": _iso(t), "model_version": "m1", "experiment": experiment,
            "arm": arm, "served_at": t, "k": 3, "excluded": {}, "kind": kind, "items": items}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A workspace as `finrec serve` leaves it: audit log and key, events.db; 3000 customers, planted lift."""
    ws = tmp_path_factory.mktemp("experiment-ws")
    cfg = ws / "finrec.toml"
    cfg.write_text(CONFIG)
    exp = ExperimentSettings(name="ranker-v2", arms={"control": {"model": "champion", "weight": 1},
                                                     "treatment": {"model": "challenger", "weight": 1}})  # fmt: skip
    rng = np.random.default_rng(5)
    key = load_or_create_key(ws / "audit" / "audit.key")
    events: list[Event] = []
    with AuditLog(ws / "audit" / "audit.jsonl", key) as audit:
        for i in range(3000):
            user = f"C-{i}"
            arm = assign_arm(user, exp)
            t = T0 + i * 500 + 0.25
            audit.append(answer(f"r{i}", t, exp.name, arm, "customer"), user)
            events.append(Event(f"i{i}", user, "P1", "impression", int(t) + 1, request_id=f"r{i}", arm=arm))
            if rng.random() < (0.16 if arm == "treatment" else 0.10):
                events.append(Event(f"c{i}", user, "P1", "click", int(t) + 30, request_id=f"r{i}", arm=arm))
        audit.append(answer("p", T0 + 1.0, exp.name, None, "prospect"), None)
    events.append(Event("stranger", "never-served", "P1", "click", T0 + 100))
    store = open_event_store(f"sqlite:///{ws / 'events.db'}")
    store.append(events)
    store.close()
    return ws, cfg


def run(ws: Path, *args: str) -> Result:
    # None unsets a variable for the run: the caller's own FINREC_* settings must not leak in
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FINREC_")}
    return CliRunner().invoke(app, list(args), env=env | {"FINREC_WORKSPACE": str(ws), "COLUMNS": "200"})


def test_analyze_writes_report_and_plot(workspace: tuple[Path, Path], tmp_path: Path) -> None:
    ws, cfg = workspace
    report_path, plot_path = tmp_path / "out" / "ranker-v2.json", tmp_path / "out" / "ranker-v2.png"
    res = run(ws, "--config", str(cfg), "experiment", "analyze", "ranker-v2", "--output", str(report_path),
              "--plot", str(plot_path))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "TREATMENT BETTER" in res.output
    report = json.loads(report_path.read_text())
    (comp,) = report["comparisons"]
    assert comp["decision"] == "treatment better" and comp["sequential"]["low"] > 0
    assert report["status"] == "stopped" and not report["srm"]["mismatch"] and report["trustworthy"]
    assert sum(a["customers"] for a in report["arms"].values()) == 3000
    assert report["integrity"]["prospect_records"] == 1 and report["integrity"]["assignment_mismatches"] == 0
    assert report["events"]["not_exposed"] == 1
    assert report["sources"]["audit_records"] == 3001
    assert plot_path.stat().st_size > 10_000


def test_list_shows_arms_weights_and_window(workspace: tuple[Path, Path]) -> None:
    ws, cfg = workspace
    res = run(ws, "--config", str(cfg), "experiment", "list")
    assert res.exit_code == 0, res.output
    for text in ("ranker-v2: not active now", "control (control)  model champion, weight 1 (50% of customers)",
                 "model challenger", "2024-06-01 00:00 to 2024-07-01 00:00 UTC", "primary metric click"):
        assert text in res.output, res.output


def test_help_explains_every_option(workspace: tuple[Path, Path]) -> None:
    ws, _ = workspace
    res = run(ws, "experiment", "analyze", "--help")
    assert res.exit_code == 0
    for option in ("--output", "--plot", "--tau", "Name of the experiment"):
        assert option in res.output


def finrec(ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, so that the error handling of `finrec` itself (exit codes, no traceback) is tested."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINREC_")}
    env |= {"FINREC_WORKSPACE": str(ws), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "finrec", *args], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip


def test_unknown_experiment_and_missing_key_are_clean_errors(workspace: tuple[Path, Path], tmp_path: Path) -> None:
    ws, cfg = workspace
    res = finrec(ws, "--config", str(cfg), "experiment", "analyze", "ranker-v3")
    text = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in text, text
    assert "no experiment named 'ranker-v3'" in text and "configured: ranker-v2" in text
    empty = tmp_path / "empty"
    (empty / "audit").mkdir(parents=True)
    (empty / "audit" / "audit.jsonl").write_text((ws / "audit" / "audit.jsonl").read_text())
    res = finrec(empty, "--config", str(cfg), "experiment", "analyze", "ranker-v2")
    text = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in text and "no audit key" in text, text
    assert not (empty / "audit" / "audit.key").exists()
