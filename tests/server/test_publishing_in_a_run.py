"""A run publishes every round's global model, signed, and records each version in the run
store; a device fetches the latest over HTTP, verifies it, recommends from it, pays nothing
for an unchanged model, and refuses a tampered one."""

import datetime
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from fedpref.client import Device
from fedpref.client.model_fetch import ModelVerificationError
from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.models.published import Manifest, parse_time
from fedpref.server.model_http import model_router
from fedpref.server.publish import generate_signing_key
from fedpref.server.runstore import RunStore
from fedpref.simulations.engines.inprocess import run_inprocess

N_DEVICES, ROUNDS = 8, 3
EXPIRY_DAYS = 7


@pytest.fixture()
def published(tmp_path, synthetic_population):
    population = synthetic_population(tmp_path, N_DEVICES, n_items=150, mean_events=12, seed=6)
    private, public = generate_signing_key(tmp_path / "signing.key")
    config = FederatedConfig.from_run_config({
        "history-dir": str(population), "results-dir": str(tmp_path / "run"), "num-server-rounds": ROUNDS, "dim": 8,
        "local-epochs": 1, "private-epochs": 1, "evaluate-every": 3, "publish-dir": str(tmp_path / "models"), "publish-key": str(private),
        "publish-expiry-days": EXPIRY_DAYS,
    })
    run_inprocess(config, n_devices=N_DEVICES)
    return tmp_path, public


@pytest.fixture()
def server(published):
    tmp_path, _ = published
    app = FastAPI()
    app.include_router(model_router(tmp_path / "models"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    instance = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not instance.started and time.time() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    instance.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_every_round_is_published_signed_and_recorded(published):
    tmp_path, _ = published
    store = RunStore(str(tmp_path / "run" / "runs.sqlite"))
    (run,) = store.runs()
    models = store.models(run["id"])
    assert [m["version"] for m in models] == [f"run-r{r:04d}" for r in range(1, ROUNDS + 1)]
    assert all(len(m["sha256"]) == 64 and m["signature"] for m in models)
    assert [r["model_version"] for r in store.rounds(run["id"])] == [m["version"] for m in models]
    manifests = [Manifest.from_json((tmp_path / "models" / f"{m['version']}.json").read_bytes()) for m in models]
    assert [m.sequence for m in manifests] == list(range(1, ROUNDS + 1))
    assert all(parse_time(m.expires) - parse_time(m.created) == datetime.timedelta(days=EXPIRY_DAYS) for m in manifests)
    assert (tmp_path / "models" / "latest.json").exists()
    final = np.load(tmp_path / "run" / "final_model.npz")
    assert set(final.files) == {"item_embedding.weight", "item_bias.weight"}


def test_a_device_installs_the_verified_latest_model_and_refuses_a_tampered_one(published, server):
    tmp_path, public = published
    device = Device.open(tmp_path / "device.sqlite")
    device.set_consent("on-device")
    first = device.update_model(server, public)
    assert first.version == f"run-r{ROUNDS:04d}" and first.downloaded_bytes > 0
    final = np.load(tmp_path / "run" / "final_model.npz")
    np.testing.assert_array_equal(device.global_model()["item_embedding.weight"], final["item_embedding.weight"])
    assert device.model_spec.dim == 8 and len(device.recommend(5)) == 5
    again = device.update_model(server, public)
    assert again.not_modified and again.downloaded_bytes == 0
    fetches = [e for e in device.record_of_what_left() if e["message"] == "model-fetch"]
    assert [e["downloaded_bytes"] > 0 for e in fetches] == [True, False] and all(e["bytes"] == 0 for e in fetches)
    assert "Asked for the latest shared model 2 times (1 new" in device.privacy_report().text

    # A new version whose file was changed after signing is refused; the device keeps its model.
    from fedpref.server.publish import ModelPublisher

    manifest = ModelPublisher(tmp_path / "models", tmp_path / "signing.key").publish(
        {k: v + 1 for k, v in final.items()}, version="run-r9999", round=9999, run="run", meta={"kind": "mf", "dim": 8}
    )
    path = tmp_path / "models" / f"{manifest.version}.model"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelVerificationError, match="sha256"):
        device.update_model(server, public)
    np.testing.assert_array_equal(device.global_model()["item_embedding.weight"], final["item_embedding.weight"])


def test_a_new_run_may_not_reuse_published_names(published, synthetic_population):
    tmp_path, _ = published
    population = synthetic_population(tmp_path / "again", N_DEVICES, n_items=150, mean_events=12, seed=6)
    config = FederatedConfig.from_run_config({
        "history-dir": str(population), "results-dir": str(tmp_path / "other" / "run"), "num-server-rounds": 1, "dim": 8,
        "publish-dir": str(tmp_path / "models"), "publish-key": str(tmp_path / "signing.key"),
    })
    with pytest.raises(RunConfigError, match="already holds versions of a run named 'run'"):
        run_inprocess(config, n_devices=N_DEVICES)


def test_publishing_needs_a_key():
    with pytest.raises(RunConfigError, match="publish-key"):
        FederatedConfig.from_run_config({"publish-dir": "models"})


@pytest.mark.parametrize("days", [0, -1, "nan", 3651])
def test_a_published_model_must_expire_and_within_ten_years(days):
    with pytest.raises(RunConfigError, match="'publish-expiry-days': must lie in \\(0, 3650\\] days"):
        FederatedConfig.from_run_config({"publish-expiry-days": days})
