"""`flwr run .` runs the same apps: a real SuperLink on a free loopback port, 20 devices, 2 rounds.

The SuperLink is started without runtime dependency installation (it would otherwise build a
fresh environment for the app and download its dependencies) and stopped by its process id.
"""

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
from fedpref.simulations.data.population import write_population
from fedpref.simulations.data.split import leave_one_out

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def superlink(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = (tmp_path / "superlink.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port), "--database", str(home / "state.db")],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the SuperLink did not start listening within 60 s")
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_flwr_run_uses_the_same_apps(superlink, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        population = generate_synthetic(SyntheticConfig(n_users=20, n_items=300, mean_events=20, seed=0))
        folder = write_population(leave_one_out(population.interactions, seed=0), tmp_path / "population")
    out = tmp_path / "results"
    run_config = f"history-dir='{folder}' results-dir='{out}' num-server-rounds=2 dim=8"
    result = subprocess.run(
        [str(BIN / "flwr"), "run", str(ROOT), "test", "--federation-config", "num-supernodes=20", "--run-config", run_config, "--stream"],
        env=superlink, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # `flwr run --stream` exits 0 even when the run fails: its log says what happened.
    assert (out / "rounds.json").exists(), result.stdout[-3000:] + result.stderr[-2000:]
    rounds = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]] == [1, 2]
    assert rounds["devices"] == 20
