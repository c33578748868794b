"""The run store holds every run and round (aggregates only), and a server killed mid-run
resumes from its checkpoint to the very model an uninterrupted run ends with."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect

from fedpref.models.federation import FederatedConfig
from fedpref.server.checkpoint import CheckpointError
from fedpref.server.runstore import RunStore, RunStoreError
from fedpref.simulations.inprocess import run_inprocess

N_DEVICES = 12
ROUNDS = 6
KILL_AFTER_TRAINING = 3  # SIGKILL once round 3's update is aggregated, before its evaluation


def run_config(population, results, **extra):
    return {
        "history-dir": str(population), "results-dir": str(results), "num-server-rounds": ROUNDS, "fraction-train": 0.5,
        "min-train-nodes": 2, "evaluate-every": 3, "dim": 8, "local-epochs": 1, "private-epochs": 1, "clip-norm": 0.5,
        "dp-noise-multiplier": 0.5, "strategy": "fedadam", **extra,
    }


@pytest.fixture(scope="module")
def population(tmp_path_factory, synthetic_population):
    return synthetic_population(tmp_path_factory.mktemp("pop"), N_DEVICES, n_items=150, mean_events=12, seed=5)


def test_the_run_store_keeps_every_round_and_nothing_per_device(population, tmp_path):
    result = run_inprocess(FederatedConfig.from_run_config(run_config(population, tmp_path / "run")), n_devices=N_DEVICES)
    store = RunStore(str(tmp_path / "run" / "runs.sqlite"))
    (run,) = store.runs()
    assert run["status"] == "completed" and run["name"] == "run" and run["devices"] == N_DEVICES and run["dp"]
    assert run["epsilon"] == pytest.approx(result["privacy"]["epsilon"]) and run["delta"] == result["privacy"]["delta"]
    rounds = store.rounds(run["id"])
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for row, done in zip(rounds, result["rounds"], strict=True):
        assert row["participants"] == done["replies"] and row["epsilon"] == pytest.approx(done["epsilon"])
        assert row["metrics"]["server-lr"] == pytest.approx(done["server-lr"])  # under DP devices send no loss
        if "val-hr" in done:
            assert row["metrics"]["val-hr"] == pytest.approx(done["val-hr"])
    assert store.run_config(run["id"])["num-server-rounds"] == ROUNDS
    # Aggregates only: no table has a column for a device or a node.
    columns = {c["name"] for t in inspect(store.engine).get_table_names() for c in inspect(store.engine).get_columns(t)}
    assert not {c for c in columns if "node" in c or "device_id" in c or "user" in c}


def test_the_run_store_refuses_what_it_cannot_open(tmp_path):
    with pytest.raises(RunStoreError, match="cannot open the run store"):
        RunStore("nosuchdialect://x")
    with pytest.raises(RunStoreError, match="no run 7"):
        RunStore(str(tmp_path / "runs.sqlite")).rounds(7)


KILLED_RUN = """
import json, os, signal, sys
from fedpref.models.federation import FederatedConfig
from fedpref.server.app import add_round_callback
from fedpref.simulations.inprocess import run_inprocess

config = FederatedConfig.from_run_config(json.loads(sys.argv[1]))
kill_at = int(sys.argv[2])
if kill_at:
    add_round_callback(lambda row: row["event"] == "train" and row["round"] == kill_at and os.kill(os.getpid(), signal.SIGKILL))
run_inprocess(config, n_devices=int(sys.argv[3]))
"""


def run_server(config: dict, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(config), str(kill_at), str(N_DEVICES)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(population, tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    run_inprocess(FederatedConfig.from_run_config(run_config(population, folder)), n_devices=N_DEVICES)
    return folder


# Killed once round 3's update is aggregated (resumes from round 2's checkpoint), and once round
# 1's is (before any round's checkpoint: resumes from the run's start, round 0).
@pytest.mark.parametrize("kill_at", [KILL_AFTER_TRAINING, 1])
def test_a_killed_server_resumes_to_the_model_of_an_uninterrupted_run(population, uninterrupted, tmp_path, kill_at):
    broken = run_config(population, tmp_path / "killed")
    first = run_server(broken, kill_at)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert not (tmp_path / "killed" / "rounds.json").exists()
    second = run_server(broken, 0)  # the same command again
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from the checkpoint" in second.stderr + second.stdout

    a = np.load(uninterrupted / "final_model.npz")
    b = np.load(tmp_path / "killed" / "final_model.npz")
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name])
    ra = json.loads((uninterrupted / "rounds.json").read_text())
    rb = json.loads((tmp_path / "killed" / "rounds.json").read_text())
    assert rb["privacy"]["epsilon"] == pytest.approx(ra["privacy"]["epsilon"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(rb["rounds"]) == strip(ra["rounds"])

    (run,) = RunStore(str(tmp_path / "killed" / "runs.sqlite")).runs()
    assert run["status"] == "completed" and run["resumed_from_round"] == kill_at - 1
    assert [r["round"] for r in RunStore(str(tmp_path / "killed" / "runs.sqlite")).rounds(run["id"])] == list(range(1, ROUNDS + 1))


def test_a_checkpoint_of_another_config_is_refused(population, tmp_path):
    broken = run_config(population, tmp_path / "killed")
    assert run_server(broken, 2).returncode == -signal.SIGKILL
    with pytest.raises(CheckpointError, match="differs in dim"):
        run_inprocess(FederatedConfig.from_run_config({**broken, "dim": 16}), n_devices=N_DEVICES)
    fresh = run_inprocess(FederatedConfig.from_run_config({**broken, "dim": 16, "resume": False}), n_devices=N_DEVICES)
    assert [r["round"] for r in fresh["rounds"]] == list(range(1, ROUNDS + 1))


def test_a_checkpoint_from_before_a_key_existed_resumes_with_that_keys_default(tmp_path):
    """Upgrading fedpref adds run-config keys: an unfinished checkpoint written before a key
    existed ran with its default, and resumes; a non-default value of the new key is refused."""
    from fedpref.server import checkpoint

    config = FederatedConfig.from_run_config({"catalogue-size": 20, "devices": 4}).to_run_config()
    older = {k: v for k, v in checkpoint.comparable(config).items() if k != "stragglers"}
    checkpoint.save(tmp_path, checkpoint.Checkpoint(config=older, completed_round=2, finished=False, arrays={}))
    assert checkpoint.resumable(tmp_path, config).completed_round == 2
    with pytest.raises(CheckpointError, match="differs in stragglers"):
        checkpoint.resumable(tmp_path, {**config, "stragglers": 0.2})


def test_a_run_killed_before_its_first_checkpoint_is_marked_failed_when_its_folder_starts_again(population, tmp_path):
    """A run left "running" in the store whose checkpoint folder holds nothing of it cannot be
    resumed: the next run in that folder marks it failed (an operator would otherwise see it
    running for ever). A running run of the same name in another folder may be alive: left alone."""
    def ghost_then_run(name, ghost_folder):
        config = FederatedConfig.from_run_config(run_config(population, tmp_path / name, **{"num-server-rounds": 1}))
        (tmp_path / name).mkdir()
        store = RunStore(str(tmp_path / name / "runs.sqlite"))
        ghost = store.start_run(name=name, config={**config.to_run_config(), "results-dir": str(tmp_path / ghost_folder)},
                                devices=N_DEVICES, items=150, rounds_planned=1)
        run_inprocess(config, n_devices=N_DEVICES)
        return store, ghost

    store, ghost = ghost_then_run("run", "run")
    assert store.run(ghost)["status"] == "failed" and "abandoned" in store.run(ghost)["note"]
    assert [r["status"] for r in store.runs()] == ["completed", "failed"]
    store, ghost = ghost_then_run("other", "elsewhere")
    assert store.run(ghost)["status"] == "running"
