"""End to end through Flower's real Simulation Engine (Ray): a small synthetic population.

One simulation (20 devices, 3 rounds) is run per module and every exchange between server
and devices is recorded, so that privacy invariants 1 and 2 of docs/design.md are checked on
what the devices actually sent.
"""

import warnings
from dataclasses import replace

import numpy as np
import pytest

from fedpref.models.config import FederatedConfig
from fedpref.models.preference import ModelSpec
from fedpref.server.app import ServerHooks
from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
from fedpref.simulations.engines.flower import run_flower_simulation
from fedpref.simulations.data.population import write_population
from fedpref.simulations.data.split import leave_one_out

N_DEVICES, ROUNDS, CLIP = 20, 3, 0.05  # a small bound, so that clipping really happens


def simulate(tmp, name, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        population = generate_synthetic(SyntheticConfig(n_users=N_DEVICES, n_items=300, mean_events=20, seed=0))
        split = leave_one_out(population.interactions, seed=0)
    folder = write_population(split, tmp / "population")
    run_config = {"history-dir": str(folder), "num-server-rounds": ROUNDS, "dim": 8, "clip-norm": CLIP, "evaluate-every": 1, "local-epochs": 1, "results-dir": str(tmp / name)}
    run_config.update(overrides)
    config = FederatedConfig.from_run_config(run_config)
    exchanges = []
    rounds = run_flower_simulation(config, n_devices=N_DEVICES, hooks=ServerHooks(on_exchange=[lambda sent, replies: exchanges.append((sent, replies))]))
    return config, rounds, exchanges


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("sim"), "results")


def train_exchanges(exchanges):
    return [(s, r) for s, r in exchanges if s and s[0].metadata.message_type == "train"]


def test_every_round_trains_and_evaluates_every_device(run):
    _, rounds, exchanges = run
    assert [r["round"] for r in rounds["rounds"]] == [1, 2, 3]
    trains = train_exchanges(exchanges)
    assert len(trains) == ROUNDS
    for sent, replies in trains:
        assert len(sent) == N_DEVICES
        assert sum(not r.has_error() for r in replies) == N_DEVICES
    for row in rounds["rounds"]:
        assert 0.0 <= row["val-hr"] <= 1.0 and 0.0 <= row["test-full-hr"] <= 1.0
    assert rounds["chosen_round"] in (1, 2, 3)


def test_only_declared_shared_arrays_leave_a_device_and_each_update_is_within_the_bound(run):
    config, _, exchanges = run
    model = ModelSpec(kind="mf", dim=8).build(1, 300)
    shared, private = set(model.shared_names), set(model.private_names)
    checked = 0
    for sent, replies in train_exchanges(exchanges):
        global_arrays = {k: v.numpy().astype(np.float64) for k, v in sent[0].content["arrays"].items()}
        for reply in replies:
            content = reply.content
            assert set(content.array_records) == {"arrays"}
            arrays = content["arrays"]
            assert set(arrays) == shared and not set(arrays) & private
            update = {k: arrays[k].numpy().astype(np.float64) - global_arrays[k] for k in arrays}
            norm = np.sqrt(sum(np.sum(u**2) for u in update.values()))
            assert norm <= CLIP * (1 + 1e-6)
            checked += 1
    assert checked == N_DEVICES * ROUNDS


def test_the_model_stays_float32_both_ways_in_every_round(run):
    # FedAdam's step would promote the global arrays to float64 (twice the bytes each way).
    config, _, exchanges = run
    assert config.strategy == "fedadam"
    for sent, replies in train_exchanges(exchanges):
        assert {a.dtype for m in sent for a in m.content["arrays"].values()} == {"float32"}
        assert {a.dtype for r in replies for a in r.content["arrays"].values()} == {"float32"}


def test_clipping_really_happened(run):
    _, rounds, _ = run
    assert rounds["rounds"][0]["train-clipped"] > 0.5  # most devices hit the small bound


def test_metrics_that_leave_are_scalars_without_item_ids(run):
    _, _, exchanges = run
    allowed = {
        "num-examples", "train-loss", "update-norm", "clipped",
        *(f"{w}-{m}" for w in ("val", "test") for m in ("hr", "ndcg", "full-hr", "full-ndcg")),
    }
    for _, replies in exchanges:
        for reply in replies:
            if reply.has_error():
                continue
            for name, record in reply.content.metric_records.items():
                for key, value in record.items():
                    assert key in allowed, f"unexpected metric {key!r}"
                    assert isinstance(value, (int, float)), f"{key} is not a scalar: {value!r}"
            for record in reply.content.config_records.values():  # the one-off device key
                assert all(isinstance(v, int) for v in record.values())


def test_same_seed_same_metrics(run, tmp_path):
    _, first, _ = run
    _, second, _ = simulate(tmp_path, "again")
    for a, b in zip(first["rounds"], second["rounds"]):
        assert a["val-hr"] == pytest.approx(b["val-hr"], abs=1e-4)
        assert a["test-ndcg"] == pytest.approx(b["test-ndcg"], abs=1e-4)


def test_the_in_process_engine_gives_the_flower_engines_metrics(run, tmp_path):
    from fedpref.simulations.engines.inprocess import run_inprocess

    config, flower, _ = run
    inprocess = run_inprocess(replace(config, results_dir=str(tmp_path / "inprocess")), n_devices=N_DEVICES)
    for a, b in zip(flower["rounds"], inprocess["rounds"]):
        for key in ("train-loss", "val-hr", "val-ndcg", "test-hr", "test-full-ndcg"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_partial_participation_draws_the_same_cohorts_in_both_engines(tmp_path):
    from fedpref.simulations.engines.inprocess import run_inprocess

    config, flower, exchanges = simulate(tmp_path, "half", **{"fraction-train": 0.5, "num-server-rounds": 2})
    trained = [len(sent) for sent, _ in train_exchanges(exchanges)]
    assert trained == [10, 10]
    inprocess = run_inprocess(replace(config, results_dir=str(tmp_path / "inprocess")), n_devices=N_DEVICES)
    for a, b in zip(flower["rounds"], inprocess["rounds"]):
        assert a["train-loss"] == pytest.approx(b["train-loss"], abs=1e-6)
        assert a["val-ndcg"] == pytest.approx(b["val-ndcg"], abs=1e-4)
