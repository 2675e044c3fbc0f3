"""The monitoring dashboard and `finrec monitor`, on a real service fed through its HTTP API.

``finrec serve`` runs on the tiny world as a user starts it; the test asks it for recommendations and posts
the feedback a front end would (impressions of every item shown, some clicks, applications, approvals and
declines; half of the events name their model version, half only the request id they answer, which the
service stamps with the answer's model version and arm as it stores them). Then:

* headless Chromium opens ``/dashboard``: the page shows the conversion table with the served model version
  and its plots (decoded images), and asks for nothing outside the service; a screenshot is kept in the
  test's tmp folder;
* ``/dashboard.json`` and ``finrec monitor --output`` (reading the same workspace) give the exact counts posted.

Hermetic like the Swagger UI test: Selenium gets the driver and browser paths (Debian's ``chromium`` and
``chromium-driver``; ``make browser-deps``), and every request that leaves the test server fails and is recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from live_server import ADMIN, API_KEY, Server, server_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
HAS_BROWSER = os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)
CUSTOMERS = range(1, 41)

pytestmark = pytest.mark.slow


@dataclass
class Fed:
    """A running service, its workspace, and what was posted to it."""

    base: str
    workspace: Path
    model_version: str
    expected: dict[str, int]
    answers: int


def _call(method: str, url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **ADMIN})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200, r.status
        return json.loads(r.read())


def _feed(base: str) -> tuple[str, dict[str, int], int]:
    """Recommendations for CUSTOMERS, then feedback on them; returns the model version and the funnel counts."""
    counts = {"impressions": 0, "clicks": 0, "applications": 0, "approvals": 0}
    events: list[dict[str, Any]] = []
    version = ""
    answers = 0
    for i, user in enumerate(CUSTOMERS):
        body = _call("GET", f"{base}/recommend/{user}?k=5")
        answers += 1
        version = body["model_version"]
        items = body["items"]
        tag = {"request_id": body["request_id"]}
        if i % 2:
            tag["model_version"] = version  # the other half is attributed through the audit log
        for it in items:
            events.append({"event_id": f"imp-{user}-{it['product_id']}", "user_id": str(user), "position": it["rank"],
                           "product_id": it["product_id"], "event_type": "impression", **tag})  # fmt: skip
            counts["impressions"] += 1
        if not items:
            continue
        first = items[0]["product_id"]
        steps = ["click"] if i % 2 == 0 else []
        steps += ["apply", "approve" if i % 8 == 0 else "decline"] if i % 4 == 0 else []
        for step in steps:
            events.append({"event_id": f"{step}-{user}", "user_id": str(user), "product_id": first,
                           "event_type": step, **tag})  # fmt: skip
            key = {"click": "clicks", "apply": "applications", "approve": "approvals"}.get(step)
            if key:
                counts[key] += 1
    result = _call("POST", f"{base}/events", events)
    assert result["accepted"] == len(events) and not result["rejected"], result
    assert counts["impressions"] > 50 and counts["clicks"] > 5 and counts["approvals"] > 0, counts
    return version, counts, answers


@pytest.fixture(scope="module")
def fed(tiny_world: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    """``finrec serve`` on a free port with recommendations and feedback posted; stopped with SIGINT."""
    server = Server(tiny_model, tiny_world, tmp_path_factory.mktemp("dashboard"))
    try:
        server.wait_ready()
        version, counts, answers = _feed(server.url)
        yield Fed(server.url, server.workspace, version, counts, answers)
    finally:
        code = server.interrupt()
    assert code == 0, f"finrec serve did not stop cleanly ({code}):\n{server.output()}"


def _totals(report: dict[str, Any]) -> dict[str, int]:
    rows = report["conversion"]["totals"]
    return {k: sum(r[k] for r in rows) for k in ("impressions", "clicks", "applications", "approvals")}


def test_dashboard_json_counts_what_was_posted(fed: Fed) -> None:
    report = _call("GET", f"{fed.base}/dashboard.json")
    rows = report["conversion"]["totals"]
    assert [(r["model_version"], r["arm"]) for r in rows] == [(fed.model_version, None)]  # all attributed
    assert _totals(report) == fed.expected
    # The service stamped the events that named only their request id: none is left to attribute afterwards.
    assert report["conversion"]["events"]["attributed_via_audit"] == 0
    assert report["conversion"]["events"]["unattributed"] == 0
    assert report["health"]["answers"] == fed.answers
    assert report["fairness"]["attributes"]["gender"]["groups"]
    assert report["drift"]["available"] is False and "finrec monitor" in report["drift"]["reason"]


@pytest.mark.skipif(not HAS_BROWSER, reason=f"needs headless Chromium and its driver at {CHROMIUM} and "
                    f"{CHROMEDRIVER} (Debian packages chromium and chromium-driver; `make browser-deps`)")  # fmt: skip
def test_dashboard_in_a_browser(fed: Fed, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path too, Selenium Manager never runs
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.enable_bidi = True
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    outside: list[str] = []

    def route(request) -> None:  # type: ignore[no-untyped-def]
        if request.url.startswith((fed.base + "/", "data:")) or "@127.0.0.1" in request.url:
            return
        outside.append(request.url)
        request.fail()

    driver.network.add_request_handler(route)
    shot = tmp_path / "dashboard.png"
    try:
        # A person gives the key as the password when the browser asks; here it rides in the address.
        with_key = fed.base.replace("http://", f"http://monitor:{API_KEY}@")
        driver.browsing_context.navigate(context=driver.current_window_handle, url=f"{with_key}/dashboard",
                                         wait="complete")  # fmt: skip
        assert driver.title == "finrec monitoring: live service"
        headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
        assert headings[:3] == ["Conversion", "Guardrail health", "Fairness"], headings
        first_table = driver.find_element(By.CSS_SELECTOR, "table.metrics")
        assert fed.model_version in first_table.text
        assert f"{fed.expected['impressions']:,}" in first_table.text
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 3
        sizes = [driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i)
                 for i in images]  # fmt: skip
        assert all(w > 200 and h > 100 for w, h in sizes), sizes  # every plot decoded
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(int(height) + 100, 8000))  # the whole page in one screenshot
        driver.save_screenshot(str(shot))
    except Exception:
        driver.save_screenshot(str(shot))  # what the page showed when it went wrong
        raise
    finally:
        driver.quit()
    assert outside == [], f"the page asked for resources outside the service: {outside}"
    assert shot.stat().st_size > 50_000, f"screenshot {shot} looks empty"


def test_monitor_command_on_the_service_workspace(fed: Fed, tiny_world: Path, tiny_model: Path,
                                                  tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "monitor"
    cmd = [sys.executable, "-m", "finrec", "monitor", "--output", str(out), "--data", str(tiny_world),
           "--model-dir", str(tiny_model)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=server_env(fed.workspace), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "monitor.json").read_text())
    assert _totals(report) == fed.expected
    assert report["health"]["answers"] == fed.answers
    page = (out / "index.html").read_text()
    assert fed.model_version in page and page.count("<img ") >= 3
    assert fed.model_version in res.stdout and "fairness:" in res.stdout and "drift:" in res.stdout
    drift = report["drift"]
    assert "features" in drift or drift["available"] is False, drift

    missing = subprocess.run([*cmd[:3], "monitor", "--output", str(out), "--audit-log", str(tmp_path / "no.jsonl")],
                             capture_output=True, text=True, env=server_env(fed.workspace), timeout=300)  # fmt: skip
    assert missing.returncode == 2 and "no audit log" in missing.stderr and "Traceback" not in missing.stderr
