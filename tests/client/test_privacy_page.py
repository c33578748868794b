"""The person's privacy page, driven in headless Chromium (Debian's chromium and
chromedriver, through Selenium): changing consent in the page changes the device's consent;
erase empties the store; the API refuses changes without the page's token and requests for
another host.

Chromium is installed by `.ci/setup-system` (root, Debian); without it these tests skip,
except under CI (CI=true), where a missing browser is a failure."""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from fedpref.client import Device
from fedpref.models.preference import ModelSpec

@pytest.fixture()
def device(tmp_path):
    device = Device.open(tmp_path / "device.sqlite")
    rng = np.random.default_rng(0)
    device.install_global(
        {"item_embedding.weight": rng.normal(size=(30, 4)).astype(np.float32), "item_bias.weight": np.zeros((30, 1), np.float32)},
        ModelSpec(dim=4),
    )
    device.set_consent("federated")
    for item in (1, 2, 3):
        device.record(item, "view")
    device.record(4, "purchase")
    device.log_sent({"time": 1.7e9, "server": "fl.example.com:9092", "message": "train", "round": 1, "arrays": [{"name": "item_bias.weight", "shape": [30, 1], "dtype": "float32", "bytes": 248}], "bytes": 248, "update": True, "update_norm": 0.4, "clip_bound": 0.5, "noise": {"placement": "none"}})
    yield device
    device.close()


@pytest.fixture()
def page(device):
    handle = device.serve_privacy_page()
    yield handle
    handle.stop()


def wait_for(driver, condition, timeout=15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_changing_consent_in_the_page_changes_the_devices_consent(device, page, browser):
    from selenium.webdriver.common.by import By

    browser.get(page.url)
    wait_for(browser, lambda d: "Sent 1 model update to fl.example.com" in d.find_element(By.ID, "report").text)
    assert browser.find_element(By.CSS_SELECTOR, "input[name=level][value=federated]").is_selected()
    assert "fl.example.com:9092" in browser.find_element(By.ID, "record").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#recommendations li")) == 10

    browser.find_element(By.CSS_SELECTOR, "input[name=level][value='on-device']").click()
    browser.find_element(By.CSS_SELECTOR, "input[name=kind][value=purchase]").click()  # untick
    browser.find_element(By.ID, "save-consent").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "message").text)
    assert browser.find_element(By.ID, "message").text == "Saved."
    consent = device.consent
    assert consent.level.value == "on-device" and consent.source == "privacy page"
    assert "purchase" not in consent.kinds and "view" in consent.kinds
    assert device.history_items().tolist() == [1, 2, 3]  # purchases are no longer used
    assert "Only these kinds of events are used" in browser.find_element(By.ID, "consent-text").text


def test_the_erase_button_empties_the_store(device, page, browser):
    from selenium.webdriver.common.by import By

    browser.get(page.url)
    wait_for(browser, lambda d: "Trained" in d.find_element(By.ID, "report").text or "Has not trained" in d.find_element(By.ID, "report").text)
    browser.find_element(By.ID, "forget").click()
    wait_for(browser, lambda d: d.switch_to.alert).accept()
    wait_for(browser, lambda d: d.find_element(By.ID, "message").text == "Erased.")
    assert device.store.count_events() == 0 and device.record_of_what_left() == [] and device.consent.level.value == "none"
    assert "Nothing has left this device" in browser.find_element(By.ID, "report").text


def test_export_and_the_guards_of_the_api(device, page):
    with urllib.request.urlopen(page.url + "api/export") as r:
        doc = json.loads(r.read())
    assert [e["item"] for e in doc["events"]] == [1, 2, 3, 4]
    change = json.dumps({"level": "none"}).encode()
    no_token = urllib.request.Request(page.url + "api/consent", data=change, headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(no_token)
    assert refused.value.code == 403
    other_host = urllib.request.Request(page.url + "api/status", headers={"host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(other_host)
    assert refused.value.code == 403
    assert device.consent.level.value == "federated"  # nothing changed
