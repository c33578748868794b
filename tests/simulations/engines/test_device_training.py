"""What a device does in a training round, run through the in-process engine (the same
ClientApp and ServerApp as on the Simulation Engine, without Ray)."""

import pytest

from fedpref.models.config import FederatedConfig
from fedpref.simulations.engines.inprocess import run_inprocess

N_DEVICES = 12


@pytest.fixture(scope="module")
def population(tmp_path_factory, synthetic_population):
    return synthetic_population(tmp_path_factory.mktemp("pop"), N_DEVICES, n_items=200, mean_events=25, seed=1)


def first_round(population, tmp_path, **overrides):
    run_config = {"history-dir": str(population), "num-server-rounds": 1, "dim": 8, "local-epochs": 1, "results-dir": str(tmp_path)}
    run_config.update(overrides)
    return run_inprocess(FederatedConfig.from_run_config(run_config), n_devices=N_DEVICES)["rounds"][0]


def test_fitting_the_private_vector_first_lowers_the_first_rounds_training_loss(population, tmp_path):
    # Round 1 starts from a random private vector; with private epochs the device fits it to
    # the global items before the joint epoch, so the joint epoch starts from a better fit.
    plain = first_round(population, tmp_path / "plain", optimizer="lazy-adam", lr=0.05, **{"private-epochs": 0})
    fitted = first_round(population, tmp_path / "fitted", optimizer="lazy-adam", lr=0.05, **{"private-epochs": 10})
    assert fitted["train-loss"] < plain["train-loss"] - 0.02


@pytest.mark.parametrize("optimizer, lr", [("adam", 0.01), ("lazy-adam", 0.01), ("sgd", 0.3)])
def test_every_device_optimiser_runs_a_round(population, tmp_path, optimizer, lr):
    row = first_round(population, tmp_path, optimizer=optimizer, lr=lr)
    assert row["train-loss"] > 0 and 0.0 <= row["val-hr"] <= 1.0


def test_lr_end_shrinks_the_devices_step_in_later_rounds(population, tmp_path):
    def last_round_norm(**overrides):
        rounds = run_inprocess(
            FederatedConfig.from_run_config(
                {"history-dir": str(population), "num-server-rounds": 2, "dim": 8, "local-epochs": 1,
                 "clip-norm": 1e6, "evaluate-every": 2, "results-dir": str(tmp_path / str(overrides)), **overrides}
            ),
            n_devices=N_DEVICES,
        )["rounds"]
        return rounds[1]["train-update-norm"]

    # Round 2 of 2 steps at lr * lr-end: a hundredth of the step, far less movement.
    assert last_round_norm(**{"lr-end": 0.01}) < 0.1 * last_round_norm()


def test_server_lr_end_schedules_the_servers_step(population, tmp_path):
    rounds = run_inprocess(
        FederatedConfig.from_run_config(
            {"history-dir": str(population), "num-server-rounds": 3, "dim": 8, "local-epochs": 1, "evaluate-every": 3,
             "strategy": "fedadam", "server-lr": 0.02, "server-lr-end": 0.1, "results-dir": str(tmp_path)}
        ),
        n_devices=N_DEVICES,
    )["rounds"]
    assert [r["server-lr"] for r in rounds] == pytest.approx([0.02, 0.011, 0.002])
