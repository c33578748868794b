"""Consent inside a running simulation: devices train from their own stores; one withdraws
between rounds and sends nothing more; every device's record of what left matches what the
server received."""

import json

import numpy as np
from flwr.app import Array, MessageType

from fedpref.client import Device
from fedpref.models.config import FederatedConfig
from fedpref.simulations.engines.inprocess import run_inprocess
from fedpref.simulations.data.population import write_device_stores

N_DEVICES = 8
WITHDRAWS = 3  # withdraws before round 2
NARROWS = 5  # allows only clicks before round 2: keeps consenting, trains on nothing new


def test_withdrawal_between_rounds_stops_the_device_at_once(tmp_path, synthetic_population):
    population = synthetic_population(tmp_path, N_DEVICES, 150, 12, 1)
    stores = write_device_stores(population, tmp_path / "stores")
    config = FederatedConfig.from_run_config(
        {
            "history-dir": str(population), "store-dir": str(stores), "num-server-rounds": 3,
            "fraction-evaluate": 0.0, "dim": 8, "local-epochs": 1, "private-epochs": 1, "clip-norm": 0.5,
            "results-dir": str(tmp_path / "results"),
        }
    )
    changed = []

    def between_rounds(msg, device_index):  # the app of device 3 acts while the run goes on
        if msg.metadata.message_type == MessageType.TRAIN and msg.content["config"]["server-round"] == 2 and not changed:
            with Device.open(stores / f"device-{WITHDRAWS}.sqlite") as app_side:
                app_side.set_consent("on-device", source="settings page")
            changed.append(device_index)

    result = run_inprocess(config, n_devices=N_DEVICES, before_delivery=between_rounds)
    assert changed, "the run never reached round 2"

    rounds = {r["round"]: r for r in result["rounds"]}
    assert rounds[1]["replies"] == N_DEVICES and rounds[1].get("dropped", 0) == 0
    for r in (2, 3):
        assert rounds[r]["replies"] == N_DEVICES - 1 and rounds[r]["dropped"] == 1

    with Device.open(stores / f"device-{WITHDRAWS}.sqlite") as device:
        record = device.record_of_what_left()
        assert [(e["round"], e["message"]) for e in record if e["message"] != "query"] == [
            (1, "train"), (2, "declined"), (3, "declined")
        ]
        declined = [e for e in record if e["message"] == "declined"]
        assert all(e["arrays"] == [] and e["bytes"] == 0 and "consent is 'on-device'" in e["reason"] for e in declined)
        assert [c["level"] for c in device.consent_history()] == ["federated", "on-device"]
        assert device.consent_history()[-1]["source"] == "settings page"
        report = device.privacy_report()
        assert report.data["updates_sent"] == 1 and report.data["declined"] == 2
        assert "Sent 1 model update to simulation" in report.text

    shapes = {"item_embedding.weight": [150, 8], "item_bias.weight": [150, 1]}
    for i in range(N_DEVICES):
        if i == WITHDRAWS:
            continue
        with Device.open(stores / f"device-{i}.sqlite") as device:
            updates = [e for e in device.record_of_what_left() if e.get("update")]
            assert [e["round"] for e in updates] == [1, 2, 3]
            for e in updates:
                assert {a["name"]: a["shape"] for a in e["arrays"]} == shapes
                # The bytes as serialised in the message (NumPy's format: the data and a header).
                assert sum(a["bytes"] for a in e["arrays"]) == sum(len(Array(np.zeros(s, np.float32)).data) for s in shapes.values())
                assert e["update_norm"] <= 0.5 + 1e-9 and e["clip_bound"] == 0.5
                assert e["metrics"] == ["clipped", "num-examples", "train-loss", "update-norm"]
                assert e["server"] == "simulation" and not e["secure_aggregation"]
            # The device kept the run's global model and its private vector: it recommends offline.
            assert len(device.recommend(5)) == 5
            assert not set(device.recommend(5)) & set(device.history_items().tolist())
    assert json.loads((tmp_path / "results" / "rounds.json").read_text())["rounds"][-1]["round"] == 3


def test_simulated_availability_declines_unavailable_devices(tmp_path, synthetic_population):
    population = synthetic_population(tmp_path, 10, 150, 10, 2)
    config = FederatedConfig.from_run_config(
        {
            "history-dir": str(population), "num-server-rounds": 2, "fraction-evaluate": 0.0, "dim": 4,
            "local-epochs": 1, "private-epochs": 0, "availability": "random:0.5", "min-train-nodes": 1,
            "results-dir": str(tmp_path / "results"),
        }
    )
    from fedpref.simulations.engines.availability import AvailabilityPattern

    pattern = AvailabilityPattern.parse("random:0.5")
    result = run_inprocess(config, n_devices=10)
    for r in result["rounds"]:
        available = sum(pattern.available(0, i, r["round"]) for i in range(10))
        assert 0 < available < 10  # the seed gives a mix
        assert r["replies"] == available and r.get("dropped", 0) == 10 - available
    assert np.isfinite([r["train-loss"] for r in result["rounds"]]).all()


def test_secure_rounds_are_recorded_stage_by_stage_with_the_noise_each_device_added(tmp_path, synthetic_population):
    n = 10
    population = synthetic_population(tmp_path, n, 150, 12, 3)
    stores = write_device_stores(population, tmp_path / "stores")
    config = FederatedConfig.from_run_config(
        {
            "history-dir": str(population), "store-dir": str(stores), "num-server-rounds": 1, "fraction-evaluate": 0.0,
            "dim": 4, "local-epochs": 1, "private-epochs": 1, "clip-norm": 0.5, "secagg": True, "secagg-min-cohort": n,
            "dp-noise-multiplier": 1.0, "dp-noise-placement": "distributed", "popularity-histogram": True,
            "popularity-max-items": 16, "results-dir": str(tmp_path / "results"),
        }
    )
    run_inprocess(config, n_devices=n)
    with Device.open(stores / "device-0.sqlite") as device:
        record = device.record_of_what_left()
        report = device.privacy_report()
        n_items = len(device.history_items())
    train = [e for e in record if e["message"] == "train"]
    assert len(train) >= 3  # SecAgg+'s stages: keys, shares, the masked vector, unmasking
    updates = [e for e in train if e.get("update") and e["task"] == "training"]
    assert len(updates) == 1
    (histogram,) = [e for e in train if e.get("update") and e["task"] == "popularity"]
    assert histogram["clip_bound"] == 4.0 and histogram["update_norm"] == np.sqrt(min(n_items, 16))  # one per item, at most 16
    update = updates[0]
    assert update["secure_aggregation"] and update["cohort"] == n and update["clip_bound"] == 0.5
    assert update["noise"]["placement"] == "distributed" and update["noise"]["noise_multiplier"] == 1.0
    assert abs(update["noise"]["device_noise_std"] - 0.5 / np.sqrt(n)) < 1e-12
    assert update["arrays"] == [] and update["bytes"] > 4 * 150 * 5  # the masked vector travels as config bytes
    assert all(e["bytes"] > 0 for e in train)
    assert "with noise added on this device" in report.text and "masked so the server could only read the sum" in report.text
    assert "Counted in 1 item popularity histogram (at most 16 of your items each" in report.text
    assert report.data["updates_sent"] == 1 and report.data["popularity_contributions"] == 1
