"""The closed loop against a live ``finrec serve``: no request fails, every reaction lands, the loop closes.

One server on the tiny world (``clock = data``, so service time continues from the end of the world's data
and the customers' month is the one after it) and the default SQLite event store. The simulation runs for
15 s at 20 requests per second with its reaction model passed in, so the test can see what it drew:

* no request of either kind failed, and every request got an answer;
* every posted event was accepted: the server's ``finrec_events_total{outcome="accepted"}`` and its event
  store grew by exactly what the simulation posted;
* the report's tallies add up (per model version to the totals, the timeline to the answers, impressions to
  k per non-empty answer, events posted to the funnel counts);
* customers who opted out of marketing called and got empty answers, and were counted;
* the loop closes: the service knows what the simulated customers hold now (their approvals, less what a
  later approval in a switch category closed), so it never shows it to them.

The command itself then runs briefly against the same server and writes its JSON report and plot.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from finrec.cli.simulate import simulate
from finrec.config import FinrecSettings
from finrec.events.store import open_event_store
from finrec.simulation import SimulatedCustomers, run_simulation
from live_server import ADMIN, API_KEY, Server, metric

pytestmark = [pytest.mark.integration, pytest.mark.slow]

K = 5


@pytest.fixture(scope="module")
def server(tiny_model: Path, tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tiny_model, tiny_world, tmp_path_factory.mktemp("simulate"), env={"FINREC_SERVE__CLOCK": "data"})
    try:
        assert srv.wait_ready()["clock"] == "data"
        yield srv
    finally:
        srv.kill_if_running()


def _accepted(srv: Server) -> float:
    return metric(httpx.get(f"{srv.url}/metrics", headers=ADMIN).text, "finrec_events_total", outcome="accepted")


def _stored(srv: Server) -> int:
    store = open_event_store(f"sqlite:///{(srv.workspace / 'events.db').resolve()}")
    try:
        return store.count()
    finally:
        store.close()


def test_the_loop_runs_without_failures_and_every_reaction_lands(server: Server, tiny_world: Path) -> None:
    customers = SimulatedCustomers.from_world(tiny_world, seed=4)
    accepted0, stored0 = _accepted(server), _stored(server)
    report = run_simulation(server.url, tiny_world, minutes=0.25, rate=20, k=K, seed=4, concurrency=4,
                            progress=False, api_key=API_KEY, customers=customers)  # fmt: skip
    d = report.to_dict()
    run, totals = d["run"], d["totals"]

    assert d["failures"]["total"] == 0, d["failures"]
    assert run["planned"] == run["sent"] == run["answered"] > 200 and run["failed"] == 0
    assert not run["interrupted"] and not d["notes"]
    assert run["lag_seconds"]["max"] < 1.0, run  # the service kept up with the arrivals

    posted = totals["events_posted"]
    assert posted == totals["events_accepted"] > 0 and totals["events_rejected"] == totals["events_duplicates"] == 0
    assert _accepted(server) - accepted0 == posted
    assert _stored(server) - stored0 == posted

    funnel = ("impressions", "views", "clicks", "applications", "approvals", "declines", "closes")
    assert posted == sum(totals[f] for f in funnel)
    for field in ("answers", "empty_answers", "opted_out", *funnel, "events_posted"):
        assert sum(r[field] for r in d["by_model"]) == totals[field], field
    assert sum(r["answers"] for r in d["timeline"]["rows"]) == run["answered"]
    assert totals["impressions"] == K * (totals["answers"] - totals["empty_answers"])  # 40 products: k fit
    assert 0 < totals["opted_out"] <= totals["empty_answers"]
    assert totals["approvals"] == len(customers.approved)
    assert totals["expected_conversions"] > 0

    # The loop closes: what the simulated customers hold now (approvals, minus what a later approval in the same
    # category replaced) the service knows they hold, so it never shows it to them.
    assert customers.approved, "no approval in 15 s: too few requests to test the loop"
    with httpx.Client(base_url=server.url, headers=ADMIN) as client:
        for user in {u for u, _ in customers.approved}:
            shown = {it["product_id"] for it in client.get(f"/recommend/{user}", params={"k": 50}).json()["items"]}
            assert not shown & customers.held_products(user), user


def test_the_command_writes_its_report_and_plot(server: Server, tiny_world: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(simulate)
    app.command("noop", hidden=True)(lambda: None)  # two commands: `simulate` is a subcommand, as in finrec
    output, plot = tmp_path / "sim" / "report.json", tmp_path / "sim" / "conversion.png"
    result = CliRunner().invoke(app, ["simulate", "--url", server.url, "--data", str(tiny_world), "--minutes", "0.05",
                                      "--rate", "20", "--no-progress", "--api-key", API_KEY, "--output", str(output),
                                      "--plot", str(plot)],
                                obj={"settings": FinrecSettings()})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no failed requests" in result.output
    report = json.loads(output.read_text())
    assert report["run"]["answered"] == report["run"]["sent"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
