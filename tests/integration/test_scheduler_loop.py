"""The loop runs itself: ``finrec scheduler`` beside a live service fed drifted events by ``finrec simulate``.

The drift check runs on its own, the drift alert reaches a webhook receiver (a local HTTP server), retraining
runs on the alert, the promotion gate decides, and the job history shows each step; a second scheduler started
beside the first runs nothing twice. Every wait polls with a generous deadline (the machine may be busy).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from finrec.jobs.history import JobHistory, history_path
from finrec.registry import ModelRegistry
from live_server import ADMIN, API_KEY, ServerFactory, samples, server_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRIFT_CHECK_SECONDS = 20


class Receiver:
    """A webhook receiver that keeps every alert posted to it."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                outer.alerts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def wait_for(what: str, check: Any, timeout: float, procs: list[subprocess.Popen[bytes]], every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args[3:5]} exited early ({p.returncode}) while waiting for {what}"
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"no {what} within {timeout} s")


def test_scheduler_checks_drift_alerts_retrains_and_a_second_scheduler_runs_nothing_twice(
    server_factory: ServerFactory, drifting_world: Path, drifting_champion: Path, tmp_path: Path, receiver: Receiver
) -> None:
    world = drifting_world  # demand shifts from deposits to loans right after the data ends
    root = tmp_path / "registry"
    reg = ModelRegistry(root)
    reg.register(drifting_champion, alias=None)
    reg.promote("v1")
    srv = server_factory(None, world, "--clock", "data", env={
        "FINREC_REGISTRY__ROOT": str(root), "FINREC_REGISTRY__POLL_SECONDS": "0.5",
        "FINREC_SERVE__CLOCK_SPEED": "40000"})  # fmt: skip
    srv.wait_ready()
    env = server_env(srv.workspace, {
        "FINREC_REGISTRY__ROOT": str(root),
        "FINREC_SCHEDULE__DRIFT_CHECK_EVERY_HOURS": str(DRIFT_CHECK_SECONDS / 3600),
        "FINREC_SCHEDULE__ROLLUP_EVERY_MINUTES": "0.25",
        "FINREC_SCHEDULE__RETRAIN_ON_DRIFT": "true",
        "FINREC_SCHEDULE__PROMOTE": "true",
        "FINREC_ALERTS__WEBHOOK_URL": receiver.url,
        "FINREC_RETRAIN__EVAL_DAYS": "5", "FINREC_RETRAIN__LABEL_DAYS": "5",
        "FINREC_RETRAIN__MIN_NEW_EVENTS": "2000",
    })  # fmt: skip
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.out", "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "finrec", *args], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=tmp_path, start_new_session=True)  # fmt: skip

    # 40,000 data seconds per second: 90 s of simulation are about 40 days of drifted feedback (7,200 requests, at
    # about the world's own rate of sessions per customer, as 3 minutes at 40/s and half the speed were).
    sim = start("simulate", "simulate", "--url", srv.url, "--data", str(world), "--minutes", "1.5", "--rate", "80",
                "--seed", "3", "--no-progress", "--api-key", API_KEY)  # fmt: skip
    first = start("scheduler-1", "scheduler", "--tick", "1")
    second = start("scheduler-2", "scheduler", "--tick", "1")
    schedulers = [first, second]
    history = JobHistory(history_path(srv.workspace))

    def log_text() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(logs.iterdir()))

    try:
        # The drift check runs on its own and, once enough drifted feedback is in, alerts; the webhook gets it.
        drift_alert = wait_for("drift alert at the webhook", lambda: next(
            (a for a in receiver.alerts if a["kind"] == "drift" and a["status"] == "firing"), None),
            timeout=900, procs=schedulers)  # fmt: skip
        # Retraining runs on the alert and the gate decides.
        retrain = wait_for("finished retrain run", lambda: next(
            (r for r in history.runs("retrain") if r.outcome in ("ok", "refused")), None),
            timeout=900, procs=schedulers)  # fmt: skip
        sim.send_signal(signal.SIGINT)  # the loop has been shown: no need for the rest of the simulation
        sim.wait(timeout=120)
        for p in schedulers:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=600) for p in schedulers]  # a job under way finishes first
    except BaseException:
        print(log_text())
        raise
    finally:
        for p in [sim, *schedulers]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert codes == [0, 0], log_text()

    # what the alert says: the drifted inputs, aggregates only (no customer id anywhere in it)
    assert drift_alert["details"]["drifted"] and drift_alert["details"]["champion"] == "v1"
    text = json.dumps(receiver.alerts)
    assert '"user_id"' not in text and '"customer"' not in text

    # the history shows each step, and who ran it
    runs = history.runs(limit=500)
    by_job = {job: [r for r in runs if r.job == job] for job in ("rollup", "drift-check", "retrain")}
    assert any(r.outcome == "alert" for r in by_job["drift-check"]), [(r.outcome, r.summary) for r in runs]
    assert retrain.trigger is not None and retrain.trigger.startswith("drift alert of")
    gate = retrain.summary["gate"]
    assert gate is not None and gate["metric"] and isinstance(gate["passed"], bool)
    assert retrain.outcome == ("ok" if gate["passed"] else "refused")
    assert retrain.summary["challenger"] == "v2" and retrain.summary["new_events"] >= 2000
    if gate["passed"]:  # v2 became champion; a later drift alert against v2 may retrain again (its own trigger)
        promotions = [(h["version"], h["previous"]) for h in reg.history() if h["action"] == "promote"]
        assert retrain.summary["promoted"] and promotions[:2] == [("v1", None), ("v2", "v1")], promotions
        assert reg.resolve("champion") == promotions[-1][0]
    assert by_job["rollup"] and all(r.outcome in ("ok", "alert") for r in by_job["rollup"])

    # two schedulers, nothing twice: no job's runs overlap, interval jobs start an interval apart, and each drift
    # alert triggered at most one retrain
    for job, job_runs in by_job.items():
        for a, b in zip(job_runs, job_runs[1:], strict=False):
            assert a.ended_at is not None and b.started_at >= a.ended_at, (job, a, b)
    for job, interval in (("drift-check", DRIFT_CHECK_SECONDS), ("rollup", 15)):
        starts = [r.started_at for r in by_job[job]]
        assert all(b - a >= interval - 0.5 for a, b in zip(starts, starts[1:], strict=False)), (job, starts)
    triggers = [r.trigger for r in by_job["retrain"]]
    assert len(triggers) == len(set(triggers))
    assert {r.runner for r in runs} <= {f"{os.uname().nodename}:{p.pid}" for p in schedulers}

    # the dashboard shows the history, and /metrics the drift figures and the alert firing
    page = httpx.get(f"{srv.url}/dashboard.json", headers=ADMIN, timeout=120).json()
    assert {j["job"] for j in page["jobs"]} >= {"drift-check", "retrain", "rollup"}
    metrics = httpx.get(f"{srv.url}/metrics", headers=ADMIN, timeout=30).text
    assert samples(metrics, "finrec_drift_psi") and samples(metrics, "finrec_conversion_rate")
    assert ({"kind": "drift"}, 1.0) in samples(metrics, "finrec_alert_firing") or any(
        a["kind"] == "drift" and a["status"] == "resolved" for a in receiver.alerts)  # fmt: skip
