"""Three real devices: `flower-superlink` over TLS with SuperNode authentication, three
`fedpref device join` SuperNodes with their own stores, all on 127.0.0.1, a real run of two
rounds; each device's record of what left is checked against what the server received.

Device 2 consents only to on-device use: it declines every training request, and its record
says so. The server side is fedpref's ServerApp behind a thin wrapper (a test-only Flower app
written to a temporary folder) that writes every reply it receives, with the update's norm
against the global model it sent, to receipts.jsonl.

Every process is started here and stopped by its PID (children found with psutil), never by
name. About a minute on 2 cores.
"""

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import pytest

from fedpref.client import Device
from fedpref.client.keys import write_device_key
from fedpref.server.tls import write_dev_certificates
from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
from fedpref.simulations.data.population import write_device_stores, write_population
from fedpref.simulations.data.split import leave_one_out

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
N_DEVICES = 3
ON_DEVICE_ONLY = 2
ROUNDS = 2
CONNECTION = "fedpref-test"

RECEIPTS_APP = '''
"""fedpref's ServerApp, writing every reply it receives to results-dir/receipts.jsonl."""
import json
from pathlib import Path

import numpy as np
from flwr.serverapp import ServerApp

from fedpref.server.app import main as fedpref_main

app = ServerApp()


class Receipts:
    def __init__(self, grid, out):
        self._grid, self._out = grid, out

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        sent = {m.metadata.dst_node_id: m for m in messages}
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        with open(self._out, "a") as f:
            for r in replies:
                node = r.metadata.src_node_id
                row = {"node": node, "type": r.metadata.message_type, "error": r.has_error()}
                if r.has_error():
                    row["reason"] = r.error.reason
                else:
                    row["arrays"] = [
                        {"name": n, "shape": list(a.shape), "bytes": len(a.data)}
                        for rec in r.content.array_records.values() for n, a in rec.items()
                    ]
                    row["metrics"] = sorted(k for rec in r.content.metric_records.values() for k in rec)
                    if "device" in r.content.config_records:
                        row["key"] = int(r.content["device"]["key"])
                    if "arrays" in r.content.array_records and node in sent and "arrays" in sent[node].content.array_records:
                        got, glob = r.content["arrays"], sent[node].content["arrays"]
                        row["norm"] = float(np.sqrt(sum(
                            np.sum((got[n].numpy().astype(np.float64) - glob[n].numpy().astype(np.float64)) ** 2) for n in got
                        )))
                    if "config" in sent.get(node, r).content.config_records:
                        row["round"] = int(sent[node].content["config"].get("server-round", 0))
                f.write(json.dumps(row) + "\\n")
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


@app.main()
def main(grid, context):
    out = Path(str(context.run_config["results-dir"])) / "receipts.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    fedpref_main(Receipts(grid, out), context)
'''


class Processes:
    """Processes this test started, stopped by PID with their descendants."""

    def __init__(self, logs: Path, env: dict, stop_tree) -> None:
        self.logs, self.env, self.started, self.stop_tree = logs, env, [], stop_tree

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("w") as out:
            proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started.append(proc)
        return proc

    def run(self, name: str, command: list[str], timeout: float = 120) -> tuple[int, str]:
        """A short command; its output goes to a file (a SuperExec could hold a pipe open)."""
        log = self.logs / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            pytest.fail(f"{' '.join(command[:3])} did not finish within {timeout} s; see {log}")
        return proc.returncode, log.read_text()

    def stop(self, proc: subprocess.Popen) -> None:
        self.stop_tree(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.started):  # the devices first, the SuperLink last
            self.stop(proc)


def json_in(text: str) -> dict:
    start = text.find("{")
    return json.JSONDecoder().raw_decode(text[start:])[0] if start >= 0 else {}


def wait_for_tls(port: int, ca: Path, timeout: float = 60) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return
        except (OSError, ssl.SSLError):
            if time.time() > deadline:
                pytest.fail(f"the SuperLink did not answer TLS on 127.0.0.1:{port} within {timeout} s")
            time.sleep(0.3)


def write_app(folder: Path) -> Path:
    """A Flower app: the receipts ServerApp and fedpref's ClientApp, with fedpref's run config."""
    folder.mkdir()
    (folder / "receipts_app.py").write_text(RECEIPTS_APP)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    lines = [f"{key} = {json.dumps(value)}" for key, value in config.items()]
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "fedpref-receipts"\nversion = "0.1.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "fedpref"\n\n'
        '[tool.flwr.app.components]\nserverapp = "receipts_app:app"\nclientapp = "fedpref.client.app:app"\n\n'
        "[tool.flwr.app.config]\n" + "\n".join(lines) + "\n"
    )
    return folder


@pytest.fixture()
def deployment(tmp_path, stop_process_tree):
    logs = tmp_path / "logs"
    home = tmp_path / "flwr-home"
    for d in (logs, home):
        d.mkdir()
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", NO_COLOR="1")
    procs = Processes(logs, env, stop_process_tree)
    try:
        yield tmp_path, procs
    finally:
        procs.stop_all()


def test_three_real_devices_record_exactly_what_the_server_received(deployment, free_port):
    tmp_path, procs = deployment
    certs = write_dev_certificates(tmp_path / "certs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interactions = generate_synthetic(SyntheticConfig(n_users=N_DEVICES, n_items=300, mean_events=20, seed=0)).interactions
    population = write_population(leave_one_out(interactions, seed=0), tmp_path / "population")  # the people's histories, for their stores
    stores = write_device_stores(population, tmp_path / "stores")
    for i in range(N_DEVICES):
        with Device.open(stores / f"device-{i}.sqlite") as device:  # the app's side
            device.report_conditions(charging=True, unmetered=True, idle=True)
            if i == ON_DEVICE_ONLY:
                device.set_consent("on-device")

    port = free_port()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs["ca"]}"\ninsecure = false\n'
    )
    procs.start("superlink", [
        str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
        "--ssl-keyfile", str(certs["key"]), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        "--database", str(tmp_path / "superlink.db"), "--host", "127.0.0.1", "--port", str(port),
    ])
    wait_for_tls(port, certs["ca"])

    for i in range(N_DEVICES):
        private, public = write_device_key(tmp_path / "keys", f"device-{i}")
        code, out = procs.run(f"register-{i}", [str(BIN / "flwr"), "supernode", "register", str(public), CONNECTION, "--format", "json"])
        assert code == 0 and json_in(out).get("success") is True, out
        procs.start(f"device-{i}", [
            str(BIN / "fedpref"), "device", "join", "--superlink", f"127.0.0.1:{port}", "--store", str(stores / f"device-{i}.sqlite"),
            "--root-certificates", str(certs["ca"]), "--auth-key", str(private), "--device-index", str(i), "--port", str(free_port()),
        ])

    results = tmp_path / "results"
    n_items = json.loads((population / "meta.json").read_text())["n_items"]  # the catalogue, as an operator knows it
    run_config = (f"catalogue-size={n_items} devices={N_DEVICES} results-dir='{results}' num-server-rounds={ROUNDS} min-train-nodes={N_DEVICES} "
                  "fraction-evaluate=0.0 dim=8 clip-norm=0.5")
    code, out = procs.run("flwr-run", [str(BIN / "flwr"), "run", str(write_app(tmp_path / "app")), CONNECTION, "--run-config", run_config, "--format", "json"], timeout=300)
    assert code == 0 and json_in(out).get("success") is True, out
    run_id = int(json_in(out)["run-id"])
    deadline = time.time() + 300
    while True:
        code, out = procs.run("flwr-ls", [str(BIN / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
        status = (json_in(out).get("runs") or [{"status": "?"}])[0]["status"]
        if status.startswith("finished") or time.time() > deadline:
            break
        time.sleep(2)
    if status != "finished:completed":
        procs.run("flwr-log", [str(BIN / "flwr"), "log", str(run_id), CONNECTION, "--show"], timeout=60)
        pytest.fail(f"run {run_id}: {status}; logs in {procs.logs}")

    receipts = [json.loads(line) for line in (results / "receipts.jsonl").read_text().splitlines()]
    device_of_node = {r["node"]: r["key"] for r in receipts if "key" in r}
    assert sorted(device_of_node.values()) == list(range(N_DEVICES))
    rounds = json.loads((results / "rounds.json").read_text())["rounds"]
    assert [(r["round"], r["replies"], r["dropped"]) for r in rounds] == [(1, 2, 1), (2, 2, 1)]

    for node, index in device_of_node.items():
        received = [r for r in receipts if r["node"] == node]
        with Device.open(stores / f"device-{index}.sqlite") as device:
            record = device.record_of_what_left()
        assert len(record) == len(received)  # one entry per message the server got from it, nothing more
        for entry, got in zip(record, received, strict=True):
            assert entry["server"] == f"127.0.0.1:{port}" and entry["run"] == run_id
            if got["error"]:
                assert entry["message"] == "declined" and entry["reason"] in got["reason"]
                continue
            assert entry["message"] == got["type"]
            assert [(a["name"], a["shape"], a["bytes"]) for a in entry["arrays"]] == [(a["name"], a["shape"], a["bytes"]) for a in got["arrays"]]
            assert entry["metrics"] == got["metrics"]
            if entry.get("update"):
                assert entry["round"] == got["round"]
                assert got["norm"] <= 0.5 * (1 + 1e-6)
                assert abs(entry["update_norm"] - got["norm"]) <= 1e-4 * max(1.0, got["norm"])
        updates = [e["round"] for e in record if e.get("update")]
        declined = [e["round"] for e in record if e["message"] == "declined"]
        if index == ON_DEVICE_ONLY:
            assert updates == [] and declined == [1, 2]
            assert "consent is 'on-device'" in record[-1]["reason"]
        else:
            assert updates == [1, 2] and declined == []
