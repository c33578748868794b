"""The person's privacy page, attacked as another program on the device would, and driven in
headless Chromium (Debian's chromium and chromedriver, through Selenium).

The attacks: a local process without the launch's secret asks every route (and gets 401); a
process that was sent the person's cookie (the browser sends it to every port of 127.0.0.1)
asks every route and looks for the page's token; a page on another origin posts to it, frames
it, or reuses a link; a script widens consent or erases without the person's confirmation; a
request for another Host (DNS rebinding). Most run in process against the page's app
(Starlette's TestClient on the page's own origin); the ones marked slow serve it on 127.0.0.1,
drive a browser or the ``fedpref device page`` command.

Chromium is installed by `.ci/setup-system` (root, Debian); without it the browser tests skip,
except under CI (CI=true), where a missing browser is a failure."""

import base64
import hmac
import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import numpy as np
import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from fedpref.client import Device
from fedpref.client import page as page_module
from fedpref.client.page import PageSecrets, make_app
from fedpref.models.preference import ModelSpec

PORT = 8765  # the port the in-process app believes it serves on (nothing binds it)
ORIGIN = f"http://127.0.0.1:{PORT}"
COOKIE = f"fedpref-page-{PORT}"
N_EVENTS = 4  # the events the device fixture records
SENT_TO = "fl.example.com:9092"  # a piece of the person's record that must not leak


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
    device.log_sent({"time": 1.7e9, "server": SENT_TO, "message": "train", "round": 1, "arrays": [{"name": "item_bias.weight", "shape": [30, 1], "dtype": "float32", "bytes": 248}], "bytes": 248, "update": True, "update_norm": 0.4, "clip_bound": 0.5, "noise": {"placement": "none"}})
    yield device
    device.close()


@pytest.fixture()
def keys():
    return PageSecrets()


@pytest.fixture()
def app(device, keys):
    return make_app(device, port=PORT, page_secrets=keys)


def client(app) -> TestClient:
    """A program on the device talking to the page's port (no cookie yet)."""
    return TestClient(app, base_url=ORIGIN, follow_redirects=False)


@pytest.fixture()
def person(app, keys):
    """The person's browser tab: it opened the one-time link, so it holds the session cookie
    and the page's token, and the page's script sends the token and its Origin."""
    browser = client(app)
    assert browser.get(f"/?s={keys.new_link()}").status_code == 200
    browser.headers.update({"origin": ORIGIN, "x-fedpref-token": keys.token})
    return browser


def stored(device) -> dict:
    """What the store holds about the person (the export less its own time)."""
    doc = device.export()
    doc.pop("exported_at")
    return doc


def linked_token(page_html: str) -> str:
    """The token the page's script was given (empty: none)."""
    return re.search(r'const linkToken = "([^"]*)";', page_html).group(1)


def every_route(app) -> list[tuple[str, str]]:
    """(method, path) of every route of the app, path parameters filled in."""
    found = []
    for route in app.routes:
        assert isinstance(route, Route), f"a route of a kind this test does not know: {route!r}"
        for method in sorted(route.methods or {"GET"}):
            found.append((method, re.sub(r"\{[^}]*\}", "1", route.path)))
    return found


# -- a local process without the secret ---------------------------------------------------

def test_a_local_process_without_the_secret_gets_nothing_from_any_route(device, app, keys):
    # Prepare: every route of the app (a route added later is asked too), and more.
    routes = every_route(app)
    assert {path for _, path in routes} >= {"/", "/api/status", "/api/export", "/api/consent", "/api/forget"}
    routes += [("GET", "/no-such-route"), ("OPTIONS", "/api/forget"), ("GET", "/?s="), ("GET", f"/?s={keys.token}"), ("GET", f"/?s={keys.session}")]
    before = stored(device)
    intruder = client(app)
    wrong_cookie = client(app)
    wrong_cookie.cookies.set(COOKIE, keys.token)  # a secret of the page, but not the session

    # Execute: ask each, without the cookie and with a wrong one, posting a confirmed erase.
    answers = {}
    for who, program in (("no cookie", intruder), ("wrong cookie", wrong_cookie)):
        for method, path in routes:
            r = program.request(method, path, json={"level": "none", "confirm": True},
                                headers={"origin": ORIGIN, "x-fedpref-token": keys.token})
            answers[who, method, path] = (r.status_code, r.text)

    # Assert: 401 everywhere, no secret and nothing of the person's in any answer, nothing changed.
    for (who, method, path), (status, body) in answers.items():
        assert status == 401, f"{method} {path} with {who} answered {status}: {body[:200]}"
        for secret in (keys.session, keys.token, SENT_TO, '"events"'):
            assert secret not in body, f"{method} {path} with {who} gave away {secret!r}"
    assert stored(device) == before


def test_a_process_holding_only_the_cookie_gets_nothing_from_any_route(device, app, keys, person):
    # Prepare: the person opened the link. A process listening on another port of 127.0.0.1
    # got the browser to visit it and so was sent the page's cookie (a cookie is not tied to a
    # port); it forges the page's Origin, and sends no token, an empty one, or another secret
    # of the page in its place.
    stolen = person.cookies.get(COOKIE)
    thief = client(app)
    thief.cookies.set(COOKIE, stolen)
    routes = every_route(app) + [("GET", "/no-such-route"), ("HEAD", "/"), ("OPTIONS", "/api/export"), ("GET", "/?s=")]
    assert {path for _, path in routes} >= {"/", "/api/status", "/api/export", "/api/consent", "/api/forget"}
    before = stored(device)

    # Execute: every route with every method it takes, posting a confirmed erase.
    answers = {}
    for token in (None, "", keys.session):
        headers = {"origin": ORIGIN} if token is None else {"origin": ORIGIN, "x-fedpref-token": token}
        for method, path in routes:
            r = thief.request(method, path, json={"level": "none", "confirm": True}, headers=headers)
            answers[token, method, path] = (r.status_code, r.text)

    # Assert: the cookie is the person's own, yet only the page itself answers (without its
    # token and without anything of the person's); every other request gets 401; no answer
    # holds a secret or the person's data; nothing stored changed.
    assert stolen == keys.session
    for (token, method, path), (status, body) in answers.items():
        expected = 200 if (method, path) == ("GET", "/") else 401
        assert status == expected, f"{method} {path} with the cookie and token {token!r} answered {status}: {body[:200]}"
        for secret in (keys.token, keys.session, SENT_TO, '"events"'):
            assert secret not in body, f"{method} {path} with the cookie and token {token!r} gave away {secret!r}"
    assert linked_token(answers[None, "GET", "/"][1]) == ""
    assert stored(device) == before


def test_the_link_opens_the_page_once_with_a_strict_session_cookie(app, keys):
    # Prepare
    link = keys.new_link()
    browser, other = client(app), client(app)

    # Execute
    opened = browser.get(f"/?s={link}")
    page = browser.get("/")
    reused = other.get(f"/?s={link}")  # another program that read the link afterwards
    again = browser.get(f"/?s={link}")

    # Assert: a cookie the page's own scripts cannot read and no other site sends; the token
    # only in the answer to the link, whose script takes the secret out of the address bar;
    # the page without the link carries no token; the link works once, whoever brings it.
    assert opened.status_code == 200
    cookie = opened.headers["set-cookie"].lower()
    assert cookie.startswith(f"{COOKIE}={keys.session}".lower())
    assert all(part in cookie for part in ("httponly", "samesite=strict", "path=/"))
    assert linked_token(opened.text) == keys.token
    assert link not in opened.text and "history.replaceState(null, '', '/')" in opened.text
    assert page.status_code == 200 and linked_token(page.text) == "" and keys.token not in page.text
    assert reused.status_code == 401 and "used already" in reused.json()["detail"]
    assert other.get("/").status_code == 401
    assert again.status_code == 401


def test_the_secrets_come_from_the_os_not_from_a_seed():
    # Prepare: an attacker who knows every seed a run or simulation sets.
    def launch() -> tuple[str, str, str]:
        random.seed(0)
        np.random.seed(0)
        keys = PageSecrets()
        return keys.session, keys.token, keys.new_link()

    # Execute: two launches after the same seeding.
    first, second = launch(), launch()

    # Assert: nothing repeats, and each secret carries 32 random bytes.
    assert len(set(first) | set(second)) == 2 * 3
    for secret in first + second:
        assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) == 32


def test_every_secret_is_compared_in_constant_time(app, keys, monkeypatch):
    # Prepare: record every comparison the page makes (hmac.compare_digest is constant-time).
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(page_module.hmac, "compare_digest", spy)
    browser = client(app)
    browser.get(f"/?s={keys.new_link()}")
    keys.new_link()  # a link not used yet, for the guess of a link
    compared.clear()
    guesses = client(app)

    # Execute: wrong guesses of the link, the cookie and the token, and ones that are not ASCII.
    answers = [
        guesses.get("/?s=guess-of-the-link").status_code,
        guesses.get("/api/status", headers={"cookie": f"{COOKIE}=guess-of-the-session"}).status_code,
        guesses.get("/api/status", headers={"cookie": f"{COOKIE}=".encode() + "sessi\u00f6n".encode("latin-1")}).status_code,
        browser.post("/api/forget", json={"confirm": True}, headers={"origin": ORIGIN, "x-fedpref-token": "guess-of-the-token"}).status_code,
        browser.post("/api/forget", json={"confirm": True}, headers={"origin": ORIGIN, "x-fedpref-token": "t\u00f6ken".encode("latin-1")}).status_code,
    ]

    # Assert: refused (never a server error), and each guess went through compare_digest.
    assert answers == [401] * 5
    guessed = {a for a, _ in compared}
    assert {b"guess-of-the-link", b"guess-of-the-session", b"guess-of-the-token"} <= guessed
    assert sum(not a.isascii() for a in guessed) == 2  # the guesses that are not ASCII, compared too
    assert {b for _, b in compared} <= {keys.session.encode(), keys.token.encode(), *(s.encode() for s in keys._links)}


def test_requests_for_another_host_are_refused(person, device):
    # Prepare: a page on attacker.example whose name now points at 127.0.0.1 (DNS rebinding);
    # even the person's own cookie, were it sent, must not help.
    before = stored(device)

    # Execute
    status = person.get("/api/status", headers={"host": "attacker.example"})
    erase = person.post("/api/forget", json={"confirm": True}, headers={"host": f"attacker.example:{PORT}"})

    # Assert
    assert (status.status_code, erase.status_code) == (403, 403)
    assert stored(device) == before


# -- another page in the person's browser ---------------------------------------------------

@pytest.mark.parametrize("origin", [f"http://127.0.0.1:{PORT + 1}", "http://attacker.example", "null", None])
def test_a_write_from_another_origin_is_refused(person, device, keys, origin):
    # Prepare: the person's browser holds the cookie and the page's token is known (the worst
    # case); only the Origin differs: another port of 127.0.0.1 is the same site, so a
    # SameSite cookie alone would not stop it.
    before = stored(device)
    headers = {"x-fedpref-token": keys.token}
    if origin is None:
        person.headers.pop("origin")
    else:
        headers["origin"] = origin

    # Execute
    erase = person.post("/api/forget", json={"confirm": True}, headers=headers)
    widen = person.post("/api/consent", json={"level": "federated", "kinds": None, "confirm": True}, headers=headers)

    # Assert
    assert (erase.status_code, widen.status_code) == (403, 403)
    assert "Origin" in erase.json()["detail"]
    assert stored(device) == before


def test_a_write_without_the_page_token_is_refused(person, device):
    # Prepare: the right cookie and Origin, as a form posted from a same-site page could send.
    before = stored(device)
    person.headers.pop("x-fedpref-token")

    # Execute
    erase = person.post("/api/forget", json={"confirm": True})
    also = person.post("/api/forget", json={"confirm": True}, headers={"x-fedpref-token": ""})

    # Assert
    assert (erase.status_code, also.status_code) == (401, 401)
    assert "token" in erase.json()["detail"]
    assert stored(device) == before


def test_every_response_forbids_framing_and_export_is_not_cached(person, app):
    # Prepare
    intruder = client(app)

    # Execute: the page, its API, and refusals.
    responses = {
        "page": person.get("/"),
        "status": person.get("/api/status"),
        "export": person.get("/api/export"),
        "consent": person.post("/api/consent", json={"level": "federated"}),
        "not found": person.get("/no-such-route"),
        "bad input": person.post("/api/consent", json={"level": 7}),
        "no cookie": intruder.get("/"),
        "other host": person.get("/", headers={"host": "attacker.example"}),
    }

    # Assert
    assert [name for name, r in responses.items() if r.status_code >= 500] == []
    for name, r in responses.items():
        assert r.headers.get("x-frame-options") == "DENY", name
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), name
        assert r.headers.get("cache-control") == "no-store", name
    export = responses["export"]
    assert export.status_code == 200 and [e["item"] for e in export.json()["events"]] == [1, 2, 3, 4]
    csp = responses["page"].headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert "default-src 'none'" in csp and f'<script nonce="{nonce}">' in responses["page"].text
    assert "unsafe-inline" not in csp


# -- confirmation ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("current", "change", "widens"),
    [
        (("none", None), {"level": "on-device"}, "personalise recommendations on this device"),
        (("on-device", ["view"]), {"level": "federated", "kinds": ["view"]}, "send size-limited model updates"),
        (("on-device", ["view"]), {"level": "on-device", "kinds": None}, "events of every kind"),
        (("on-device", ["view"]), {"level": "on-device", "kinds": ["view", "purchase"]}, "these kinds will be recorded and may be used: purchase"),
        (("federated", ["view"]), {"level": "none", "kinds": ["click"]}, "these kinds will be recorded and may be used: click"),
    ],
)
def test_widening_consent_without_confirmation_is_refused(person, device, current, change, widens):
    # Prepare
    device.set_consent(*current)
    before = stored(device)

    # Execute: a script posting the change without the person's confirmation, and one that
    # claims a confirmation in a form the page never sends.
    unconfirmed = person.post("/api/consent", json=change)
    loose = person.post("/api/consent", json={**change, "confirm": "true"})

    # Assert: refused with the question for the person; nothing stored changed.
    assert unconfirmed.status_code == 409, unconfirmed.text
    assert widens in unconfirmed.json()["question"] and '"confirm": true' in unconfirmed.json()["detail"]
    assert loose.status_code == 422
    assert stored(device) == before

    # Execute, Assert: once confirmed, the change is taken.
    confirmed = person.post("/api/consent", json={**change, "confirm": True})
    assert confirmed.status_code == 200 and device.consent.level.value == change["level"]
    assert len(device.consent_history()) == len(before["consent_history"]) + 1


def test_narrowing_consent_needs_no_confirmation(person, device):
    # Execute: federated with every kind -> on this device, views only.
    r = person.post("/api/consent", json={"level": "on-device", "kinds": ["view"]})

    # Assert
    assert r.status_code == 200
    assert device.consent.level.value == "on-device" and device.consent.kinds == frozenset({"view"})


@pytest.mark.parametrize("body", [None, {}, {"confirm": False}, {"confirm": 1}])
def test_erasing_without_confirmation_is_refused_and_nothing_is_lost(person, device, body):
    # Prepare
    before = stored(device)

    # Execute
    r = person.post("/api/forget", json=body) if body is not None else person.post("/api/forget")

    # Assert
    assert r.status_code in (409, 422), r.text
    if r.status_code == 409:
        assert "cannot be undone" in r.json()["question"]
    assert stored(device) == before and device.store.count_events() == N_EVENTS

    # Execute, Assert: confirmed, it erases.
    assert person.post("/api/forget", json={"confirm": True}).status_code == 200
    assert device.store.count_events() == 0 and device.record_of_what_left() == []


def test_hostile_consent_input_gets_a_clear_error_and_changes_nothing(person, device):
    # Prepare
    before = stored(device)
    bad = [
        {"level": "everything"},
        {"level": "on-device", "kinds": ["x" * 100_000]},
        {"level": "on-device", "kinds": ["vi\x00ew"]},
        {"level": "on-device", "kinds": ["view"] * 1000},
        {"level": "on-device", "extra": 1},
    ]

    # Execute
    answers = [person.post("/api/consent", json=change) for change in bad]

    # Assert
    assert [r.status_code for r in answers] == [422] * len(bad)
    assert "choose one of" in answers[0].json()["detail"]
    assert stored(device) == before


# -- served on 127.0.0.1 --------------------------------------------------------------------

@pytest.fixture()
def page(device):
    handle = device.serve_privacy_page()
    yield handle
    handle.stop()


def fetch(url: str, opener=None, **kwargs) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, **kwargs)
    try:
        with (opener or urllib.request.build_opener()).open(request) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.slow
def test_served_on_loopback_only_the_links_holder_gets_in(device, page):
    # Prepare
    root = f"http://127.0.0.1:{page.port}"
    holder = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))

    # Execute: another program asks every route over TCP; the person opens the link, and the
    # page's script asks for the export with the token the link's answer gave it (and without).
    intruder = {(method, path): fetch(root + path, method=method, data=b"{}" if method == "POST" else None,
                                      headers={"content-type": "application/json", "origin": root})[0]
                for method, path in every_route(page.app)}
    opened = fetch(page.url, holder)
    token = linked_token(opened[2].decode())
    status, headers, body = fetch(root + "/api/export", holder, headers={"x-fedpref-token": token})
    cookie_only = fetch(root + "/api/export", holder)[0]

    # Assert
    assert set(intruder.values()) == {401}, intruder
    assert opened[0] == 200 and cookie_only == 401
    assert status == 200 and headers["cache-control"] == "no-store" and headers["x-frame-options"] == "DENY"
    assert [e["item"] for e in json.loads(body)["events"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_fedpref_device_page_prints_a_one_time_link(device, tmp_path, free_port, stop_process_tree):
    # Prepare
    store = tmp_path / "device.sqlite"  # the device fixture's store, open in this process too
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fedpref"), "device", "page", "--store", str(store), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, text=True,
                            env=dict(os.environ, NO_COLOR="1", PYTHONUNBUFFERED="1"))
    try:
        # Execute: read what it prints up to the link.
        printed = []
        for line in proc.stdout:
            printed.append(line)
            if line.startswith("http://"):
                break
        link = printed[-1].strip() if printed else ""
        bare = fetch(f"http://127.0.0.1:{port}/api/export")[0]
        holder = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        opened, _, page_html = fetch(link, holder)
        exported = fetch(f"http://127.0.0.1:{port}/api/export", holder, headers={"x-fedpref-token": linked_token(page_html.decode())})[0]
        reused = fetch(link)[0]
        proc.stdin.write("\n")  # Enter: another link, for another browser
        proc.stdin.flush()
        second = proc.stdout.readline().strip()
        other_browser = fetch(second)[0]

        # Assert
        for printed_link in (link, second):
            assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/\?s=[A-Za-z0-9_-]{{43}}", printed_link), "".join(printed) + second
        assert "works once" in " ".join("".join(printed).split())
        assert (bare, opened, exported, reused) == (401, 200, 200, 401)
        assert second != link and other_browser == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        stop_process_tree(proc)


def alert_is_present():
    from selenium.webdriver.support.expected_conditions import alert_is_present

    return alert_is_present()


def wait_for(driver, condition, timeout=15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


@pytest.mark.slow
def test_changing_consent_in_the_page_changes_the_devices_consent(device, page, browser):
    from selenium.webdriver.common.by import By

    browser.get(page.url)
    wait_for(browser, lambda d: "Sent 1 model update to fl.example.com" in d.find_element(By.ID, "report").text)
    assert browser.current_url == f"http://127.0.0.1:{page.port}/"  # the one-time secret left the address bar
    assert browser.find_element(By.CSS_SELECTOR, "input[name=level][value=federated]").is_selected()
    assert SENT_TO in browser.find_element(By.ID, "record").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#recommendations li")) == 10

    browser.find_element(By.CSS_SELECTOR, "input[name=level][value='on-device']").click()
    browser.find_element(By.CSS_SELECTOR, "input[name=kind][value=purchase]").click()  # untick
    browser.find_element(By.ID, "save-consent").click()  # narrowing: no question asked
    wait_for(browser, lambda d: d.find_element(By.ID, "message").text)
    assert browser.find_element(By.ID, "message").text == "Saved."
    consent = device.consent
    assert consent.level.value == "on-device" and consent.source == "privacy page"
    assert "purchase" not in consent.kinds and "view" in consent.kinds
    assert device.history_items().tolist() == [1, 2, 3]  # purchases are no longer used
    assert "Only these kinds of events are used" in browser.find_element(By.ID, "consent-text").text
    refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert refused == []  # the page's own script and style run under its policy


@pytest.mark.slow
def test_widening_consent_in_the_page_asks_first(device, page, browser):
    from selenium.webdriver.common.by import By

    device.set_consent("on-device", ["view"])
    browser.get(page.url)
    wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "input[name=level][value='on-device']").is_selected())

    browser.find_element(By.CSS_SELECTOR, "input[name=level][value=federated]").click()
    browser.find_element(By.ID, "save-consent").click()
    question = wait_for(browser, alert_is_present())
    assert "send size-limited model updates" in question.text
    question.dismiss()
    wait_for(browser, lambda d: d.find_element(By.ID, "message").text == "Nothing changed.")
    assert device.consent.level.value == "on-device"

    browser.find_element(By.ID, "save-consent").click()
    wait_for(browser, alert_is_present()).accept()
    wait_for(browser, lambda d: d.find_element(By.ID, "message").text == "Saved.")
    assert device.consent.level.value == "federated" and device.consent.kinds == frozenset({"view"})


@pytest.mark.slow
def test_the_erase_button_asks_then_empties_the_store(device, page, browser):
    from selenium.webdriver.common.by import By

    browser.get(page.url)
    wait_for(browser, lambda d: "Trained" in d.find_element(By.ID, "report").text or "Has not trained" in d.find_element(By.ID, "report").text)
    browser.find_element(By.ID, "forget").click()
    wait_for(browser, alert_is_present()).dismiss()
    wait_for(browser, lambda d: d.find_element(By.ID, "message").text == "Nothing changed.")
    assert device.store.count_events() == N_EVENTS

    browser.find_element(By.ID, "forget").click()
    wait_for(browser, alert_is_present()).accept()
    wait_for(browser, lambda d: d.find_element(By.ID, "message").text == "Erased.")
    assert device.store.count_events() == 0 and device.record_of_what_left() == [] and device.consent.level.value == "none"
    assert "Nothing has left this device" in browser.find_element(By.ID, "report").text


@pytest.fixture()
def foreign_site(free_port):
    """A page on another port of 127.0.0.1 (the same site, another origin) that frames
    ``/`` of the privacy page on ``port``: ``foreign_site(port) -> url``."""
    servers = []

    def start(port: int) -> str:
        body = (f'<!doctype html><title>win a prize</title><iframe id="victim" src="http://127.0.0.1:{port}/" '
                'onload="document.title=\'loaded\'" width="800" height="600"></iframe>').encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("content-type", "text/html")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_page_on_another_origin_cannot_frame_the_page(device, page, browser, foreign_site):
    from selenium.webdriver.common.by import By

    # Prepare: the person has the page open (the browser holds its cookie), then visits a
    # page on another port of 127.0.0.1 that frames it to trick clicks (click-jacking).
    browser.get(page.url)
    wait_for(browser, lambda d: d.find_elements(By.ID, "forget"))
    framing = foreign_site(page.port)

    # Execute
    browser.get(framing)
    wait_for(browser, lambda d: d.title == "loaded")
    browser.switch_to.frame(browser.find_element(By.ID, "victim"))
    shown = browser.find_element(By.TAG_NAME, "body").text
    buttons = browser.find_elements(By.ID, "forget")
    browser.switch_to.default_content()

    # Assert: the frame shows nothing of the page, and nothing changed.
    assert buttons == [] and "Your data on this device" not in shown
    assert device.store.count_events() == N_EVENTS


@pytest.fixture()
def listener(free_port):
    """A process's server on another port of 127.0.0.1 that answers a page titled "loaded"
    and keeps the Cookie header of every request it gets: ``(url, cookies)``."""
    cookies = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            cookies.append(self.headers.get("cookie") or "")
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(b"<!doctype html><title>loaded</title>hello")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", cookies
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_a_page_on_another_port_the_browser_visits_gets_the_cookie_but_can_neither_export_nor_erase(device, page, browser, listener):
    from selenium.webdriver.common.by import By

    # Prepare: the person opens the link and sees their data; then a local process gets the
    # browser to open its own address on another port of 127.0.0.1 (through a link, an intent,
    # xdg-open) and reads the Cookie header the browser sends it.
    root = f"http://127.0.0.1:{page.port}"
    url, cookies = listener
    browser.get(page.url)
    wait_for(browser, lambda d: SENT_TO in d.find_element(By.ID, "record").text)
    browser.get(url)
    wait_for(browser, lambda d: d.title == "loaded")
    stolen = {"cookie": cookies[0], "origin": root}

    # Execute: with the cookie and the page's Origin, read the status and the export, fetch
    # the page and try every secret-sized string in it as the token, and erase.
    status = fetch(root + "/api/status", headers=stolen)[0]
    exported = fetch(root + "/api/export", headers=stolen)[0]
    shown = fetch(root + "/", headers=stolen)[2].decode()
    candidates = re.findall(r"[A-Za-z0-9_-]{43}", shown) + [""]
    erases = [fetch(root + "/api/forget", method="POST", data=b'{"confirm": true}',
                    headers={**stolen, "content-type": "application/json", "x-fedpref-token": candidate})[0]
              for candidate in candidates]

    # Assert: the browser did send the page's session cookie to the other port; still every
    # read and every erase was refused, the page held no token, and nothing was erased.
    assert f"fedpref-page-{page.port}={page.secrets.session}" in cookies[0]
    assert (status, exported) == (401, 401)
    assert page.secrets.token not in shown and candidates == [""]
    assert set(erases) == {401}
    assert device.store.count_events() == N_EVENTS


@pytest.mark.slow
def test_a_reload_keeps_the_page_and_another_tab_needs_a_new_link(device, page, browser):
    from selenium.webdriver.common.by import By

    # Prepare: the person opened the link.
    browser.get(page.url)
    wait_for(browser, lambda d: SENT_TO in d.find_element(By.ID, "record").text)

    # Execute, Assert: a reload of the tab shows the data again (the tab kept the token).
    browser.refresh()
    wait_for(browser, lambda d: SENT_TO in d.find_element(By.ID, "record").text)

    # Execute, Assert: a new tab on the page's address is closed; a new link opens it.
    browser.switch_to.new_window("tab")
    browser.get(f"http://127.0.0.1:{page.port}/")
    wait_for(browser, lambda d: d.find_element(By.ID, "report").text.startswith("This page is closed"))
    assert "new one-time link" in browser.find_element(By.ID, "report").text
    assert SENT_TO not in browser.find_element(By.ID, "record").text
    browser.get(page.link())
    wait_for(browser, lambda d: SENT_TO in d.find_element(By.ID, "record").text)


@pytest.mark.slow
def test_the_export_button_saves_everything(device, page, browser, tmp_path):
    from selenium.webdriver.common.by import By

    # Prepare: downloads go to a folder of the test's.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    browser.get(page.url)
    wait_for(browser, lambda d: SENT_TO in d.find_element(By.ID, "record").text)

    # Execute
    browser.find_element(By.ID, "export").click()
    saved = downloads / "fedpref-export.json"
    wait_for(browser, lambda d: saved.exists() and not list(downloads.glob("*.crdownload")))

    # Assert: the file holds the person's events and record.
    doc = json.loads(saved.read_text())
    assert [e["item"] for e in doc["events"]] == [1, 2, 3, 4]
    assert [r["server"] for r in doc["record_of_what_left"]] == [SENT_TO]
    assert browser.find_element(By.ID, "message").text == "Exported."
