"""The Swagger UI at /docs, driven in a real headless browser as a person would use it.

Why a browser: /docs is a JavaScript application (Swagger UI) that renders the service's OpenAPI
schema. A schema can be valid JSON and still render an operation a person cannot run (a path
parameter without an input box, an example that fails validation, a response the UI cannot show).
Only a browser running the page shows that "Try it out" then "Execute" on ``GET /recommend/{user_id}``
really returns an answer. The test starts ``finrec serve`` as a user does, on a tiny world.

Hermetic: nothing is downloaded. Selenium is given both the driver and the browser (Debian's
``chromium`` and ``chromium-driver``; ``make browser-deps`` installs them), so Selenium Manager never
runs. The service serves Swagger UI's own files (no CDN), and the test holds it to that: any request the
page makes to another host fails at once and fails the test, so a /docs that would stay blank offline
(as on this project's CI machines, which reach no CDN) is caught here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from live_server import API_KEY, Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
OPERATION = "/recommend/{user_id}"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason=f"needs headless Chromium and its driver at {CHROMIUM} and {CHROMEDRIVER} "
        "(Debian packages chromium and chromium-driver; `make browser-deps` installs them)",
    ),
]


@pytest.fixture
def server(tiny_world: Path, tiny_model: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """``finrec serve`` on a free port, as a subprocess with only the settings given here; stopped with SIGINT."""
    server = Server(tiny_model, tiny_world, tmp_path)
    try:
        server.wait_ready()
        yield server.url
    finally:
        code = server.interrupt()
    assert code == 0, f"finrec serve did not stop cleanly ({code}):\n{server.output()}"


def _browser(base: str, outside: list[str]):  # type: ignore[no-untyped-def]
    """Headless Chromium in which every network request to a host other than ``base`` fails, listed in ``outside``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path too, Selenium Manager never runs
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1800", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.enable_bidi = True  # network interception (below) goes over WebDriver BiDi
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)

    def route(request) -> None:  # type: ignore[no-untyped-def]
        url = request.url
        if url.startswith(base + "/") or not url.startswith(("http:", "https:", "ws:", "wss:")):
            return  # the service under test, or inline data (data:, blob:): let it through untouched
        outside.append(url)
        request.fail()  # nothing leaves the machine

    driver.network.add_request_handler(route)
    return driver


def test_try_recommend_from_the_swagger_ui(server: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    outside: list[str] = []
    driver = _browser(server, outside)
    shot = tmp_path / "swagger-recommend.png"
    try:
        wait = WebDriverWait(driver, 60)
        # Navigate over BiDi: chromedriver's classic get() deadlocks while BiDi intercepts the page's requests.
        driver.browsing_context.navigate(context=driver.current_window_handle, url=f"{server}/docs", wait="complete")
        block_xpath = (f"//div[contains(@class, 'opblock-get')]"
                       f"[.//*[contains(@class, 'opblock-summary-path') and @data-path='{OPERATION}']]")  # fmt: skip
        block = wait.until(ec.presence_of_element_located((By.XPATH, block_xpath)))
        # Authorize with an API key, as a person does: the padlock button, the key, Authorize, Close.
        driver.find_element(By.CSS_SELECTOR, ".scheme-container button.authorize").click()
        field = wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, ".modal-ux input"))[0]
        field.send_keys(API_KEY)
        driver.find_element(By.CSS_SELECTOR, ".modal-ux .auth-btn-wrapper button.authorize").click()
        wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, ".modal-ux button.btn-done"))[0].click()
        block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()  # expand the operation
        wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))[0].click()
        user = wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, "input[placeholder='user_id']"))[0]
        user.clear()
        user.send_keys("7")
        k = block.find_element(By.CSS_SELECTOR, "input[placeholder='k']")
        k.clear()
        k.send_keys("3")
        block.find_element(By.CSS_SELECTOR, "button.execute").click()

        live = ".live-responses-table .response"
        status = wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, f"{live} .response-col_status"))[0]
        body_el = block.find_element(By.CSS_SELECTOR, f"{live} .response-col_description pre")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", body_el)
        driver.save_screenshot(str(shot))
        text = body_el.text
        assert status.text.strip() == "200", (status.text, text)
        assert '"model_version"' in text and '"items"' in text, text
        # The rendered body is the service's real answer: JSON, for customer 7, with at most k items.
        answer = json.loads(text)
        assert answer["user_id"] == "7" and answer["k"] == 3 and len(answer["items"]) <= 3
        # The UI shows the request it sent, as a curl command a person can copy.
        curl = block.find_element(By.CSS_SELECTOR, ".curl-command").text
        assert "/recommend/7?k=3" in curl and "X-API-Key" in curl, curl
    except Exception:
        driver.save_screenshot(str(shot))  # what the page showed when it went wrong
        raise
    finally:
        driver.quit()
    assert shot.stat().st_size > 10_000, f"screenshot {shot} looks empty"
    assert not outside, f"/docs fetched from other hosts (it must work offline): {outside}"
