"""The run store holds every run and round (aggregates only), and a server killed mid-run
resumes from its checkpoint to the very model an uninterrupted run ends with (when it asked for
reproducible noise; otherwise with fresh noise nobody could predict from the checkpoint). A
checkpoint cannot run code when it is read, and the store and checkpoints are their owner's only."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
from sqlalchemy import inspect

from fedpref.models.config import FederatedConfig
from fedpref.server import checkpoint
from fedpref.server.checkpoint import CheckpointError
from fedpref.server.runstore import RunStore, RunStoreError
from fedpref.simulations.engines.inprocess import run_inprocess

N_DEVICES = 12
ROUNDS = 6
KILL_AFTER_TRAINING = 3  # SIGKILL once round 3's update is aggregated, before its evaluation
REPEATS = {"reproducible-noise": True}  # a run that must repeat bit for bit draws its DP noise and cohorts from its seed
pytestmark = pytest.mark.filterwarnings("ignore:reproducible-noise=true")  # asked for on purpose here


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
from fedpref.models.config import FederatedConfig
from fedpref.server.app import ServerHooks
from fedpref.simulations.engines.inprocess import run_inprocess

config = FederatedConfig.from_run_config(json.loads(sys.argv[1]))
kill_at = int(sys.argv[2])
hooks = ServerHooks()
if kill_at:
    hooks.on_round.append(lambda row: row["event"] == "train" and row["round"] == kill_at and os.kill(os.getpid(), signal.SIGKILL))
run_inprocess(config, n_devices=int(sys.argv[3]), hooks=hooks)
"""


def run_server(config: dict, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(config), str(kill_at), str(N_DEVICES)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(population, tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    run_inprocess(FederatedConfig.from_run_config(run_config(population, folder, **REPEATS)), n_devices=N_DEVICES)
    return folder


# Killed once round 3's update is aggregated (resumes from round 2's checkpoint), and once round
# 1's is (before any round's checkpoint: resumes from the run's start, round 0).
@pytest.mark.parametrize("kill_at", [KILL_AFTER_TRAINING, 1])
def test_a_killed_server_resumes_to_the_model_of_an_uninterrupted_run(population, uninterrupted, tmp_path, kill_at):
    broken = run_config(population, tmp_path / "killed", **REPEATS)
    first = run_server(broken, kill_at)
    left = checkpoint.load(tmp_path / "killed" / "checkpoint")
    assert left.noise is not None and left.sampler is not None  # reproducible: the generators go on where they were
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


def test_a_run_with_noise_from_the_os_resumes_with_fresh_noise_the_checkpoint_does_not_predict(population, tmp_path):
    # Prepare: a DP run with the default settings, killed in round 3: its checkpoint of round 2.
    killed = tmp_path / "killed"
    assert run_server(run_config(population, killed), KILL_AFTER_TRAINING).returncode == -signal.SIGKILL
    left = checkpoint.load(killed / "checkpoint")
    # Whoever reads the checkpoint finds no state of the noise generator or of the cohort sampler.
    assert left.completed_round == KILL_AFTER_TRAINING - 1 and left.noise is None and left.sampler is None

    # Execute: resume two copies of that very state.
    shutil.copytree(killed, tmp_path / "copy")
    results = [run_server(run_config(population, folder), 0) for folder in (killed, tmp_path / "copy")]

    # Assert: both resume and finish every round, accounted alike, with noise of their own.
    for done, folder in zip(results, (killed, tmp_path / "copy")):
        assert done.returncode == 0 and "resuming from the checkpoint" in done.stderr + done.stdout, done.stderr[-2000:]
        rounds = json.loads((folder / "rounds.json").read_text())
        assert [r["round"] for r in rounds["rounds"]] == list(range(1, ROUNDS + 1))
        assert rounds["privacy"]["noise-source"] == "os-entropy"
    a, b = np.load(killed / "final_model.npz"), np.load(tmp_path / "copy" / "final_model.npz")
    assert all(not np.array_equal(a[name], b[name]) for name in a.files)


class RunsCode:
    """A pickled object that, when unpickled, writes a file: what a swapped checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def one_round(population, results, **extra):
    return FederatedConfig.from_run_config(run_config(population, results, **{"num-server-rounds": 1, "evaluate-every": 1, **extra}))


def test_a_planted_pickle_checkpoint_is_never_opened(population, tmp_path):
    import pickle

    # Prepare: the pickled checkpoint.pkl older fedpref versions read, crafted to run code.
    marker = tmp_path / "owned"
    folder = tmp_path / "run" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "checkpoint.pkl").write_bytes(pickle.dumps(RunsCode(marker)))

    # Execute: the server starts again in that folder (resume is on by default).
    with pytest.raises(CheckpointError) as refused:
        run_inprocess(one_round(population, tmp_path / "run"), n_devices=N_DEVICES)

    # Assert: nothing ran; the refusal names the file and says how to go on.
    assert not marker.exists()
    assert f"{folder / 'checkpoint.pkl'} is a checkpoint of an older fedpref" in str(refused.value) and "resume=false" in str(refused.value)
    # Starting afresh, as the message says, runs without it.
    fresh = run_inprocess(one_round(population, tmp_path / "run", resume=False), n_devices=N_DEVICES)
    assert [r["round"] for r in fresh["rounds"]] == [1] and not marker.exists()


def test_a_checkpoint_archive_crafted_to_run_code_is_refused_unread(population, tmp_path):
    # Prepare: a checkpoint.npz whose state is a pickled object array that would run code.
    marker = tmp_path / "owned"
    folder = tmp_path / "run" / "checkpoint"
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.savez(folder / "checkpoint.npz", state=np.array([RunsCode(marker)], dtype=object), **{"0": np.array([RunsCode(marker)], dtype=object)})

    # Execute
    with pytest.raises(CheckpointError) as refused:
        run_inprocess(one_round(population, tmp_path / "run"), n_devices=N_DEVICES)

    # Assert
    assert not marker.exists()
    assert f"{folder / 'checkpoint.npz'} is not a readable fedpref checkpoint" in str(refused.value) and "resume=false" in str(refused.value)


def _written_checkpoint(tmp_path) -> bytes:
    config = FederatedConfig.from_run_config({"catalogue-size": 20, "devices": 4}).to_run_config()
    checkpoint.save(tmp_path, checkpoint.Checkpoint(config=checkpoint.comparable(config), completed_round=2, finished=False,
                                                    arrays={"w": np.ones((3, 2), np.float32)}))
    return (tmp_path / checkpoint.CHECKPOINT_FILE).read_bytes()


def _with_state(state: dict, arrays: dict | None = None) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, state=np.frombuffer(json.dumps(state).encode(), dtype=np.uint8), **(arrays or {}))
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "no state", "state not JSON", "array missing", "ledger forged", "format"])
def test_a_damaged_checkpoint_is_refused_with_the_file_and_the_way_on(tmp_path, damage):
    good = _written_checkpoint(tmp_path)
    state = json.loads(np.load(tmp_path / checkpoint.CHECKPOINT_FILE)["state"].tobytes())
    bad = {
        "truncated": good[: len(good) // 2],
        "not a zip": b"\x80\x04not a checkpoint",
        "no state": _no_state(),
        "state not JSON": _raw_state(b"{not json"),
        "array missing": _with_state({**state, "arrays": {"w": "7"}}),
        "ledger forged": _with_state({**state, "ledger": {"mechanism": [1.0, 4, 9], "delta": 0.1, "placement": "central", "released": []}},
                                     {"0": np.ones((3, 2), np.float32)}),
        "format": _with_state({**state, "format": 1}, {"0": np.ones((3, 2), np.float32)}),
    }[damage]
    (tmp_path / checkpoint.CHECKPOINT_FILE).write_bytes(bad)
    with pytest.raises(CheckpointError, match=f"{tmp_path / checkpoint.CHECKPOINT_FILE} is not a readable fedpref checkpoint .*resume=false"):
        checkpoint.load(tmp_path)


def _no_state() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, w=np.ones(2))
    return buffer.getvalue()


def _raw_state(text: bytes) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, state=np.frombuffer(text, dtype=np.uint8))
    return buffer.getvalue()


def test_a_checkpoint_keeps_every_part_of_the_state_it_was_given(tmp_path):
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedpref.server.privacy import DpMechanism, NoiseSource, PrivacyLedger

    ledger = PrivacyLedger(DpMechanism(1.2, 100, 10), 1e-4)
    for replies in (10, 7, 10):
        ledger.record_round(replies)
    noise = NoiseSource(3)
    noise.normal(0.0, 1.0, 5)
    import random

    sampler = random.Random(4)
    sampler.random()
    written = checkpoint.Checkpoint(
        config={"dim": 8}, completed_round=3, finished=False, arrays={"item.weight": np.arange(6, dtype=np.float32).reshape(3, 2)},
        strategy={"m_t": {"item.weight": np.full((3, 2), 0.5)}, "v_t": None, "momentum_vector": [np.ones(2)], "dp-clipping-norm": 0.7},
        sampler=sampler.getstate(), noise=noise.state(), ledger=ledger, rounds={1: {"round": 1, "val-hr": 0.5}, 3: {"round": 3, "skipped": "why"}},
        best={"round": 1, "arrays": {"item.weight": np.zeros((3, 2), np.float32)}}, popularity=({"devices": 9}, np.array([1.5, 2.5])),
        secure_rounds={2: {"sampled": 10, "contributed": 9, "skipped": False}}, run_store_id=5,
        devices={1000: RecordDict({"private": ArrayRecord({"p": Array(np.ones((1, 4), np.float32))}), "s": ConfigRecord({"k": b"key"})})},
    )
    checkpoint.save(tmp_path, written)
    read = checkpoint.load(tmp_path)
    assert read.config == {"dim": 8} and read.completed_round == 3 and not read.finished and read.run_store_id == 5
    np.testing.assert_array_equal(read.arrays["item.weight"], written.arrays["item.weight"])
    assert read.arrays["item.weight"].dtype == np.float32
    np.testing.assert_array_equal(read.strategy["m_t"]["item.weight"], np.full((3, 2), 0.5))
    assert read.strategy["v_t"] is None and read.strategy["dp-clipping-norm"] == 0.7
    np.testing.assert_array_equal(read.strategy["momentum_vector"][0], np.ones(2))
    assert read.sampler == sampler.getstate() and read.noise == noise.state()
    assert read.ledger.epsilon == ledger.epsilon and read.ledger.rounds == 3
    assert read.rounds == written.rounds and read.best["round"] == 1 and read.secure_rounds == written.secure_rounds
    assert read.popularity[0] == {"devices": 9}
    np.testing.assert_array_equal(read.popularity[1], [1.5, 2.5])
    device = read.devices[1000]
    np.testing.assert_array_equal(device["private"]["p"].numpy(), np.ones((1, 4), np.float32))
    assert device.config_records["s"]["k"] == b"key"


def test_the_run_store_and_checkpoints_are_their_owners_only_whatever_the_umask(population, tmp_path):
    # Prepare: the most permissive umask.
    previous = os.umask(0)
    try:
        # Execute: a run writes its store and checkpoints into a folder it creates.
        run_inprocess(one_round(population, tmp_path / "new" / "run"), n_devices=N_DEVICES)
        store = RunStore(str(tmp_path / "new" / "run" / "runs.sqlite"))
        store.runs()  # a reader: the -wal and -shm files exist while it is open
        mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
        results = tmp_path / "new" / "run"
        # Assert
        for name in ("runs.sqlite", "runs.sqlite-wal", "runs.sqlite-shm", "checkpoint/checkpoint.npz", "rounds.json", "final_model.npz"):
            assert mode(results / name) == 0o600, name
        for folder in (tmp_path / "new", results, results / "checkpoint"):
            assert mode(folder) == 0o700, folder
        # and whatever else the server writes there (the chosen round's model, the histogram)
        assert {p.relative_to(results).as_posix(): oct(mode(p)) for p in results.rglob("*") if mode(p) & 0o077} == {}
        store.close()
    finally:
        os.umask(previous)


def test_an_existing_run_store_others_can_read_is_named_with_the_fix(tmp_path):
    path = tmp_path / "runs.sqlite"
    RunStore(str(path)).close()
    path.chmod(0o644)
    with pytest.warns(UserWarning, match=f"{path} may be read by other accounts.*chmod 600"):
        RunStore(str(path)).close()
