"""Helpers shared by the test folders."""

import os
import shutil
import socket
import subprocess
import warnings
from pathlib import Path

import psutil
import pytest

from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
from fedpref.simulations.data.population import write_population
from fedpref.simulations.data.split import leave_one_out


def _synthetic_population(folder: Path, n_users: int, n_items: int, mean_events: int, seed: int) -> Path:
    """A synthetic population, split leave-one-out, written as the device histories a
    simulation reads (``folder``/population); returns that folder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small populations warn about sparse users
        interactions = generate_synthetic(SyntheticConfig(n_users=n_users, n_items=n_items, mean_events=mean_events, seed=seed)).interactions
        split = leave_one_out(interactions, seed=0)
    return write_population(split, folder / "population")


@pytest.fixture(scope="session")
def synthetic_population():
    """``synthetic_population(folder, n_users, n_items, mean_events, seed) -> folder``."""
    return _synthetic_population


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port() -> int``: a free TCP port on 127.0.0.1."""
    return _free_port


def _stop_process_tree(proc: subprocess.Popen) -> None:
    """Stop ``proc`` (SIGTERM, then SIGKILL) and whatever of its descendants outlives it, by PID.
    (A SuperNode's SuperExec runs in its own session and leaves on its own once its parent is gone.)"""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(family, timeout=5)
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        p.kill()


@pytest.fixture(scope="session")
def stop_process_tree():
    """``stop_process_tree(popen)``: stop a process this test started and its descendants, by PID."""
    return _stop_process_tree


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture()
def browser():
    """Headless Debian Chromium through Selenium (installed by .ci/setup-system); skips without
    it, except under CI (CI=true), where that fails."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing: .ci/setup-system installs them")
        pytest.skip("chromium / chromedriver not installed (run .ci/setup-system as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to read console errors (CSP violations among them)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()  # stops the chromedriver it started, by its own process
