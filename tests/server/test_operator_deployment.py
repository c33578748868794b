"""The operator API beside a real deployment: `flower-superlink`, three `flower-supernode`s and
`fedpref serve` (uvicorn), all on 127.0.0.1. A run started through the API (which wraps
`flwr run`) shows its rounds in the API while it runs, and every round once it completes.

Every process is started here and stopped by its PID with its descendants (psutil), never by
name. About 80 s on 2 cores (each message starts a ClientApp process).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest

from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
from fedpref.simulations.data.population import write_population
from fedpref.simulations.data.split import leave_one_out

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
N_DEVICES, ROUNDS = 3, 3
KEY = "operator-key-for-the-test-0123456789"


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"{what} did not listen on 127.0.0.1:{port}")
        time.sleep(0.3)


def call(port: int, path: str, *, body: dict | None = None, key: str | None = KEY) -> tuple[int, object]:
    headers = {"content-type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@pytest.fixture()
def processes(tmp_path, stop_process_tree):
    started: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, command: list[str], env: dict) -> subprocess.Popen:
        with (logs / f"{name}.log").open("w") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started.append(proc)
        return proc

    start.logs = logs
    try:
        yield start
    finally:
        for proc in reversed(started):
            stop_process_tree(proc)


@pytest.mark.slow
def test_a_run_started_through_the_api_shows_its_rounds_while_it_runs(tmp_path, processes, free_port):
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", NO_COLOR="1")
    link = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fedpref"\n\n[superlink.fedpref]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    superlink = processes("superlink", [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                                        "--database", str(tmp_path / "superlink.db"), "--host", "127.0.0.1", "--port", str(link)], env)
    wait_for_port(link, superlink, "the SuperLink")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interactions = generate_synthetic(SyntheticConfig(n_users=N_DEVICES, n_items=300, mean_events=20, seed=0)).interactions
    population = write_population(leave_one_out(interactions, seed=0), tmp_path / "population")
    for i in range(N_DEVICES):
        processes(f"supernode-{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1",
                                     "--port", str(free_port()), "--node-config", f"device-index={i}"], env)

    run_store = f"sqlite:///{tmp_path / 'runs.sqlite'}"
    api = free_port()
    api_env = dict(env, FEDPREF_ENVIRONMENT="production", FEDPREF_API_KEYS=KEY, FEDPREF_RUN_STORE=run_store, FEDPREF_FLWR_HOME=str(home),
                   FEDPREF_SUPERLINK_CONNECTION="fedpref", FEDPREF_APP_DIR=str(ROOT), FEDPREF_HOST="127.0.0.1", FEDPREF_PORT=str(api),
                   FEDPREF_RUN_CONFIG_ROOTS=str(tmp_path))  # the run config's folders (population, results) are all in here
    server = processes("fedpref-serve", [str(BIN / "fedpref"), "serve"], api_env)
    wait_for_port(api, server, "fedpref serve")
    assert call(api, "/api/runs", key=None)[0] == 401

    status, started = call(api, "/api/runs", body={"run_config": {
        "history-dir": str(population), "results-dir": str(tmp_path / "results"), "run-store": run_store, "run-name": "live",
        "num-server-rounds": ROUNDS, "min-train-nodes": N_DEVICES, "fraction-evaluate": 0.0, "dim": 8,
    }})
    assert status == 202, started  # accepted: the run goes on in the SuperLink
    seen_while_running, deadline = [], time.time() + 300
    while time.time() < deadline:
        _, runs = call(api, "/api/runs")
        run = next((r for r in runs if r["name"] == "live"), None)
        if run is not None:
            if run["status"] == "running" and 0 < run["rounds_done"] < ROUNDS:
                seen_while_running.append(run["rounds_done"])
            if run["status"] != "running":
                break
        time.sleep(0.3)
    else:
        pytest.fail(f"the run did not finish within 300 s; logs in {processes.logs}")
    assert run["status"] == "completed" and run["flower_run_id"] == started["flower_run_id"]
    assert seen_while_running, "no round was visible in the API while the run was going on"
    _, rounds = call(api, f"/api/runs/{run['id']}/rounds")
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["participants"] == N_DEVICES for r in rounds)

    # A long run, stopped through the API (which asks Flower: flwr stop) once it has a round.
    status, long = call(api, "/api/runs", body={"run_config": {
        "history-dir": str(population), "results-dir": str(tmp_path / "long"), "run-store": run_store, "run-name": "long",
        "num-server-rounds": 100, "min-train-nodes": N_DEVICES, "fraction-evaluate": 0.0, "dim": 8,
    }})
    assert status == 202, long
    deadline = time.time() + 200
    while time.time() < deadline:
        _, runs = call(api, "/api/runs")
        run = next((r for r in runs if r["name"] == "long"), None)
        if run is not None and run["rounds_done"] >= 1:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"the long run never finished a round; logs in {processes.logs}")
    status, stopped = call(api, f"/api/runs/flower/{long['flower_run_id']}/stop", body={})
    assert status == 200 and stopped["stopped"] and stopped["store_runs_marked_stopped"] == [run["id"]], stopped
    time.sleep(3)  # the ServerApp is ended by its SuperLink; the store keeps "stopped"
    _, after = call(api, f"/api/runs/{run['id']}")
    assert after["status"] == "stopped" and after["rounds_done"] < 100
    _, flower_runs = call(api, "/api/flower/runs")
    assert any(r["flower_run_id"] == long["flower_run_id"] and "stopped" in str(r.get("status")) for r in flower_runs), flower_runs
