"""The operator dashboard in headless Chromium (Debian's chromium and chromedriver, through
Selenium), against the operator API served by uvicorn on a free loopback port: the page asks
for a key and shows nothing before; with the key it lists the runs and draws the selected
run's metric, ε and participation curves as SVG; a round recorded while the page is open
appears at the next refresh; the Content-Security-Policy blocks nothing the page needs.

Chromium is installed by `.ci/setup-system` (root, Debian); without it these tests skip,
except under CI (CI=true), where a missing browser is a failure."""

import os
import threading
import time

import pytest
import uvicorn

from fedpref.server.api import FlowerControl, create_app
from fedpref.server.settings import OperatorSettings

OPERATOR_KEY = "dashboard-operator-key-0123456789abcdef"
KEY = "dashboard-read-only-key-0123456789abcdef"  # what the browser signs in with: a read-only key is all the dashboard needs
RUN_NAME = "nightly-dp-run"


@pytest.fixture()
def runs(store):
    """A finished run without DP, then a running DP run with three rounds (the newest, shown first)."""
    plain = store.start_run(name="plain-run", config={}, devices=8, items=40, rounds_planned=2)
    for r in (1, 2):
        store.record_round(plain, r, metrics={"train-loss": 2.0 / r}, participants=8, dropped=0)
    store.finish_run(plain, "completed")
    run = store.start_run(name=RUN_NAME, config={"num-server-rounds": 5}, devices=100, items=300, rounds_planned=5, flower_run_id=99,
                          dp=True, delta=1e-5, target_epsilon=4.0)
    for r, (loss, eps) in enumerate([(2.0, 0.5), (1.5, 0.9), (1.2, 1.25)], start=1):
        store.record_round(run, r, metrics={"train-loss": loss}, participants=90 + r, dropped=10 - r, epsilon=eps)
    store.record_round(run, 2, metrics={"val-hr": 0.31})
    return {"run": run, "plain": plain}


@pytest.fixture()
def served(monkeypatch, store, runs, free_port):
    """The operator API on 127.0.0.1:<free port> in a background thread, stopped by should_exit."""
    for name in list(os.environ):
        if name.startswith("FEDPREF_"):
            monkeypatch.delenv(name)
    settings = OperatorSettings(_env_file=None, environment="production", api_keys=[OPERATOR_KEY], read_api_keys=[KEY], dashboard_refresh_seconds=0.4)
    app = create_app(settings, run_store=store, flower=FlowerControl(app_dir=None))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="operator-api", daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, f"the operator API did not start on 127.0.0.1:{port}"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def wait_for(driver, condition, timeout=15):
    """Wait until ``condition(driver)`` is truthy; the page redraws every refresh, so an element
    found a moment ago may be gone (stale): that counts as "not yet"."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def count(driver, css: str) -> int:
    return driver.execute_script("return document.querySelectorAll(arguments[0]).length", css)


def attributes(driver, css: str, name: str) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map((e) => e.getAttribute(arguments[1]))", css, name)


def table(driver) -> dict[str, dict[str, str]]:
    """The runs table, read in one go: {run name: {column class: text}}."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#runs tbody tr')].map((tr) => "
        "Object.fromEntries([...tr.cells].map((td) => [td.classList[0], td.textContent])))")
    return {row["name"]: row for row in rows}


def text(driver, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def click_row(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    def click(d) -> bool:
        for row in d.find_elements(By.CSS_SELECTOR, "#runs tbody tr"):
            if row.find_element(By.CSS_SELECTOR, "td.name").text == name:
                row.click()
                return True
        return False

    wait_for(driver, click)


def sign_in(driver, key: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.ID, "sign-in").click()


@pytest.mark.slow
def test_the_dashboard_shows_runs_and_curves_and_follows_a_running_run(served, store, runs, browser):
    from selenium.webdriver.common.by import By

    browser.get(served + "/dashboard")
    wait_for(browser, lambda d: d.find_element(By.ID, "login").is_displayed())
    assert RUN_NAME not in browser.page_source and not browser.find_element(By.ID, "main").is_displayed()

    sign_in(browser, "not-the-key")
    wait_for(browser, lambda d: d.find_element(By.ID, "login-message").text == "The API refused this key.")
    assert RUN_NAME not in browser.page_source

    sign_in(browser, KEY)
    wait_for(browser, lambda d: RUN_NAME in table(d))
    row = table(browser)[RUN_NAME]
    assert row == {"id": str(runs["run"]), "name": RUN_NAME, "status": "running", "devices": "100", "rounds": "3 / 5", "epsilon": "1.250",
                   "budget-left": "2.750", "started": row["started"]}
    assert table(browser)["plain-run"]["epsilon"] == "no DP" and table(browser)["plain-run"]["rounds"] == "2 / 2"
    assert attributes(browser, "#runs tbody tr.selected", "data-run-id") == [str(runs["run"])]  # the newest run is shown below

    wait_for(browser, lambda d: count(d, "#chart-epsilon svg circle.point") == 3)
    assert text(browser, "run-title") == f"Run {runs['run']}: {RUN_NAME}"
    assert count(browser, "#chart-epsilon svg polyline.series") == 1 and count(browser, "#chart-epsilon svg line.target") == 1
    assert count(browser, "#chart-metrics svg circle.point") == 3  # train-loss, the default metric
    assert count(browser, "#chart-participation svg rect.bar.participants") == 3
    assert count(browser, "#chart-participation svg rect.bar.dropped") == 3
    assert attributes(browser, "#metric option", "value") == ["train-loss", "val-hr"]
    assert attributes(browser, "#chart-epsilon svg circle.point", "data-round") == ["1", "2", "3"]
    heights = [float(h) for h in attributes(browser, "#chart-participation rect.participants", "height")]
    assert heights == sorted(heights) and heights[0] > 0  # 91, 92, 93 participants

    # A round recorded while the page is open appears at the next refresh.
    store.record_round(runs["run"], 4, metrics={"train-loss": 1.0}, participants=95, dropped=5, epsilon=1.6)
    wait_for(browser, lambda d: count(d, "#chart-epsilon svg circle.point") == 4)
    wait_for(browser, lambda d: table(d)[RUN_NAME]["rounds"] == "4 / 5")
    assert count(browser, "#chart-participation svg rect.bar.participants") == 4
    assert table(browser)[RUN_NAME]["epsilon"] == "1.600" and table(browser)[RUN_NAME]["budget-left"] == "2.400"

    # Another metric, then another run.
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "metric")).select_by_value("val-hr")
    wait_for(browser, lambda d: count(d, "#chart-metrics svg circle.point") == 1)
    click_row(browser, "plain-run")
    wait_for(browser, lambda d: text(d, "run-title") == f"Run {runs['plain']}: plain-run")
    wait_for(browser, lambda d: "without differential privacy" in text(d, "chart-epsilon"))
    assert count(browser, "#chart-participation svg rect.bar.participants") == 2

    # The key lives in this tab only; "Forget key" asks for it again.
    assert browser.execute_script("return sessionStorage.getItem('fedpref-operator-key')") == KEY
    browser.find_element(By.ID, "sign-out").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "login").is_displayed())
    assert browser.execute_script("return sessionStorage.getItem('fedpref-operator-key')") is None
    assert RUN_NAME not in browser.page_source  # forgetting the key clears what it showed

    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert errors == [], errors  # no script errors, nothing blocked by the Content-Security-Policy
