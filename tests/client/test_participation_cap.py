"""The device's side of the participation cap and of the person's own epsilon.

The real ClientApp (a device with a store, and a simulated device without one) refuses the
(k+1)-th training round of a run as it refuses anything else (an error reply carrying only the
reason, recorded as declined), and goes on in other runs; its report and its privacy page say,
in one sentence, what the run's guarantee means for its person, with the numbers the server's
requests stated."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from starlette.testclient import TestClient

from fedpref.client import Device
from fedpref.client.app import DECLINED
from fedpref.client.page import PageSecrets, make_app
from fedpref.models.config import FederatedConfig
from fedpref.simulations.data.population import write_device_stores
from fedpref.simulations.engines.device import app as simulated_app
from fedpref.simulations.engines.inprocess import NODE_ID_BASE, InProcessGrid

N_DEVICES, N_ITEMS = 3, 150
PROMISE = {"dp-epsilon": 1.94, "dp-delta": 1e-7, "dp-rounds": 50, "dp-max-participations": 2}  # what the server's requests state


def run_config(population, **values) -> dict:
    return FederatedConfig.from_run_config({
        "history-dir": str(population), "dim": 4, "local-epochs": 1, "private-epochs": 1, "dp-noise-multiplier": 1.0,
        "dp-max-participations": 2, **values,
    }).to_run_config()


def train(grid: InProcessGrid, config: dict, device: int, server_round: int, promise: dict | None = PROMISE) -> Message:
    """Send device ``device`` round ``server_round``'s training request, as the server does."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    shared = FederatedConfig.from_run_config(config).model_spec.build(1, N_ITEMS, seed=0).get_shared()
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in shared.items()}),
                          "config": ConfigRecord({"server-round": server_round, **(promise or {})})})
    [reply] = grid.send_and_receive([Message(content, dst_node_id=NODE_ID_BASE + device, message_type=MessageType.TRAIN)])
    return reply


@pytest.fixture()
def population(tmp_path, synthetic_population):
    return synthetic_population(tmp_path, N_DEVICES, N_ITEMS, 12, 1)


def test_a_device_with_a_store_refuses_the_round_past_its_cap_and_says_what_the_run_means_for_its_person(tmp_path, population):
    stores = write_device_stores(population, tmp_path / "stores")
    config = run_config(population, **{"store-dir": str(stores)})
    grid = InProcessGrid(simulated_app, N_DEVICES, config)
    assert not train(grid, config, 0, 1).has_error() and not train(grid, config, 0, 4).has_error()
    third = train(grid, config, 0, 7)
    assert third.has_error() and third.error.code == DECLINED
    assert third.error.reason.startswith("declined: this device has taken part in 2 training rounds of this run")
    assert "dp-max-participations = 2" in third.error.reason
    assert not train(grid, config, 1, 7).has_error()  # another device of the same run still may

    with Device.open(stores / "device-0.sqlite") as device:
        record = [e for e in device.record_of_what_left() if e["message"] != "query"]
        assert [(e["round"], e["message"]) for e in record] == [(1, "train"), (4, "train"), (7, "declined")]
        assert record[0]["guarantee"] == {"epsilon": 1.94, "delta": 1e-7, "rounds": 50, "max_participations": 2}
        report = device.privacy_report()
        sentence = ("Run 1 promises (ε = 1.94, δ = 1e-7) for anyone, whatever rounds they joined, assuming nothing about who was "
                    "asked when (the server's figure in its training requests, for 50 rounds with whole cohorts, at most 2 per "
                    "device); this device took part in 2 of 50 rounds.")
        assert sentence in report.text
        assert report.data["guarantees"] == [{"run": 1, "rounds_joined": [1, 4], "sentence": sentence,
                                             "guarantee": {"epsilon": 1.94, "delta": 1e-7, "rounds": 50, "max_participations": 2}}]

        # The privacy page shows the same sentence, as the person's tab gets it.
        keys = PageSecrets()
        browser = TestClient(make_app(device, port=8765, page_secrets=keys), base_url="http://127.0.0.1:8765")
        page = browser.get(f"/?s={keys.new_link()}")
        assert page.status_code == 200 and 'id="guarantee"' in page.text and "s.guarantee" in page.text
        status = browser.get("/api/status", headers={"x-fedpref-token": keys.token}).json()
        assert status["guarantee"] == sentence and sentence in status["report"]

    with Device.open(stores / "device-2.sqlite") as device:  # asked for nothing
        assert "This device has not taken part in any federated training round." in device.privacy_report().text
        browser = TestClient(make_app(device, port=8765, page_secrets=(keys := PageSecrets())), base_url="http://127.0.0.1:8765")
        browser.get(f"/?s={keys.new_link()}")
        assert browser.get("/api/status", headers={"x-fedpref-token": keys.token}).json()["guarantee"] == (
            "This device has not taken part in any federated training round.")


def test_a_run_without_a_stated_guarantee_is_reported_as_such(tmp_path, population):
    stores = write_device_stores(population, tmp_path / "stores")
    config = run_config(population, **{"store-dir": str(stores), "dp-max-participations": 0})
    grid = InProcessGrid(simulated_app, N_DEVICES, config)
    assert not train(grid, config, 0, 1, promise=None).has_error()
    assert not train(grid, config, 0, 2, promise={**PROMISE, "dp-delta": 2.0}).has_error()  # a malformed promise is not shown
    with Device.open(stores / "device-0.sqlite") as device:
        assert ("Run 1 stated no differential-privacy guarantee (no noise was promised); this device took part in 2 of its rounds."
                in device.privacy_report().text)


def test_a_simulated_device_without_a_store_refuses_the_round_past_its_cap(population):
    config = run_config(population)
    grid = InProcessGrid(simulated_app, N_DEVICES, config)
    assert [train(grid, config, 2, r).has_error() for r in (1, 2)] == [False, False]
    refused = train(grid, config, 2, 3)
    assert refused.has_error() and refused.error.code == DECLINED and "dp-max-participations = 2" in refused.error.reason
    # Its count lives in its state, which the server's checkpoint keeps.
    states = grid.device_states()
    fresh = InProcessGrid(simulated_app, N_DEVICES, config)
    fresh.restore_device_states(states)
    assert train(fresh, config, 2, 4).has_error() and not train(fresh, config, 1, 4).has_error()


def test_a_device_under_the_tree_joins_one_round_of_each_window(population):
    config = run_config(population, **{"dp-mechanism": "tree", "num-server-rounds": 6})  # windows of 3 rounds
    grid = InProcessGrid(simulated_app, N_DEVICES, config)
    replies = [train(grid, config, 0, r) for r in range(1, 7)]
    assert [r.has_error() for r in replies] == [False, True, True, False, True, True]
    assert "same window of 3 rounds (1..3)" in replies[1].error.reason
    assert np.all([r.error.code == DECLINED for r in replies if r.has_error()])


@pytest.mark.parametrize("bad", [
    {"dp-epsilon": float("nan")}, {"dp-epsilon": float("inf")}, {"dp-epsilon": -1.0}, {"dp-epsilon": "1.9"},
    {"dp-epsilon": True}, {"dp-delta": 0.0}, {"dp-delta": 1.0}, {"dp-rounds": 0}, {"dp-max-participations": -3},
    {"dp-rounds": None},
])
def test_a_promise_a_hostile_server_malformed_is_not_shown_as_a_guarantee(bad):
    from fedpref.client.app import guarantee_of

    assert guarantee_of(PROMISE) == {"epsilon": 1.94, "delta": 1e-7, "rounds": 50, "max_participations": 2}
    assert guarantee_of({**PROMISE, **bad}) is None  # never a made-up or unreadable number on the person's page


def test_the_app_travels_to_another_process_after_it_has_opened_a_store(tmp_path, population):
    """Ray copies the ClientApp into its workers: a store the app opened in this process (its
    connection and lock) must not stop the copy, and the copy opens its own."""
    ray_pickle = pytest.importorskip("ray.cloudpickle")
    stores = write_device_stores(population, tmp_path / "stores")
    config = run_config(population, **{"store-dir": str(stores)})
    grid = InProcessGrid(simulated_app, N_DEVICES, config)
    assert not train(grid, config, 0, 1).has_error()
    copy = ray_pickle.loads(ray_pickle.dumps(simulated_app))
    device_app = copy._mods[0].__self__
    assert device_app._devices == {} and device_app.provider is not None
    assert not train(InProcessGrid(copy, N_DEVICES, config), config, 1, 1).has_error()
