"""Dropouts and stragglers: a round goes on with the devices that answered within its timeout,
when at least min-replies did, and records how many dropped out and how many came late."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedpref.simulations.engines.device import straggles
from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.simulations.engines.fast import run_fast
from fedpref.simulations.engines.inprocess import run_inprocess

N = 16


@pytest.fixture(scope="module")
def population(tmp_path_factory, synthetic_population):
    return synthetic_population(tmp_path_factory.mktemp("faults"), N, 300, 15, 7)


def config_of(population, out, **overrides) -> FederatedConfig:
    run_config = {"history-dir": str(population), "results-dir": str(out), "num-server-rounds": 3, "fraction-train": 0.75,
                  "evaluate-every": 3, "dim": 8, "local-epochs": 1, "private-epochs": 1, "checkpoint-dir": "none"}
    run_config.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return FederatedConfig.from_run_config(run_config)


def test_dropouts_and_stragglers_are_left_out_counted_and_the_same_in_the_in_process_and_fast_engines(population, tmp_path):
    faults = dict(dropout=0.25, stragglers=0.25, straggler_delay=30.0, round_timeout=10.0)
    inprocess = run_inprocess(config_of(population, tmp_path / "inprocess", **faults), n_devices=N)
    fast = run_fast(config_of(population, tmp_path / "fast", **faults), threads=1)
    cohort = FederatedConfig.from_run_config({"catalogue-size": 2, "devices": N, "fraction-train": 0.75}).cohort_size(N)
    for a, b in zip(inprocess["rounds"], fast["rounds"], strict=True):
        assert (a["replies"], a.get("dropped", 0), a.get("late", 0)) == (b["replies"], b.get("dropped", 0), b.get("late", 0))
        assert a["replies"] + a.get("dropped", 0) + a.get("late", 0) == cohort
    assert sum(r.get("late", 0) for r in fast["rounds"]) > 0 and sum(r.get("dropped", 0) for r in fast["rounds"]) > 0
    assert abs(inprocess["rounds"][-1]["test-hr"] - fast["rounds"][-1]["test-hr"]) <= 0.07  # one device's hit in 16, at most
    # A straggler within the timeout is waited for.
    patient = run_inprocess(config_of(population, tmp_path / "patient", stragglers=0.25, straggler_delay=30.0, round_timeout=60.0), n_devices=N)
    assert all("late" not in row and row["replies"] == cohort for row in patient["rounds"])


def test_a_round_with_fewer_replies_than_min_replies_is_skipped_with_a_log_line_and_the_model_kept(population, tmp_path, caplog):
    config = config_of(population, tmp_path / "run", dropout=0.5, min_replies=8, num_server_rounds=2)
    with caplog.at_level(logging.WARNING):
        result = run_inprocess(config, n_devices=N)
    skipped = [row for row in result["rounds"] if row.get("skipped")]
    assert skipped, "with half the devices leaving, some round should fall below 8 replies"
    for row in skipped:
        assert "fewer than min-replies 8" in row["skipped"] and "epsilon" not in row
        assert f"round {row['round']} skipped" in caplog.text
    kept = [row for row in result["rounds"] if not row.get("skipped")]
    assert all(row["replies"] >= 8 for row in kept)
    if not kept:  # every round skipped: the final model is the initial one
        initial = config.model_spec.build(1, 300, seed=config.seed).get_shared()
        final = np.load(tmp_path / "run" / "final_model.npz")
        for name in initial:
            np.testing.assert_array_equal(final[name], initial[name])


def test_every_round_skipped_leaves_the_initial_model(population, tmp_path):
    config = config_of(population, tmp_path / "run", min_replies=N + 1, num_server_rounds=2)
    result = run_inprocess(config, n_devices=N)
    assert all(row.get("skipped") for row in result["rounds"])
    initial = config.model_spec.build(1, 300, seed=config.seed).get_shared()
    final = np.load(tmp_path / "run" / "final_model.npz")
    for name in initial:
        np.testing.assert_array_equal(final[name], initial[name])


def test_fault_settings_out_of_range_are_refused_with_the_key():
    for key, value in (("stragglers", 1.0), ("straggler-delay", -1.0), ("round-timeout", -5.0), ("min-replies", 0)):
        with pytest.raises(RunConfigError, match=key):
            FederatedConfig.from_run_config({key: value})


def test_on_the_simulation_engine_the_server_stops_waiting_for_a_straggler_at_the_timeout(population, tmp_path):
    """The real clock: a straggling ClientApp sleeps; Flower's grid returns at round-timeout
    with the replies it has, and the straggler's reply is left out of the round. (The engine
    waits for the sleeping ClientApp before it shuts down: the delay is kept short.)"""
    from fedpref.simulations.engines.flower import run_flower_simulation

    import random

    base = {"num_server_rounds": 1, "fraction_train": 0.25, "fraction_evaluate": 0.0, "stragglers": 0.2, "straggler_delay": 22.0, "round_timeout": 15.0}

    def cohort(seed):  # the 4 devices round 1 samples (fedpref.server.grid.StableGrid: ids in key order, seeded draw)
        return random.Random(seed).sample(range(N), 4)

    # A seed with which exactly one of the 4 devices of round 1 straggles.
    seed = next(s for s in range(500) if sum(straggles(config_of(population, tmp_path, seed=s, **base), u, 1) for u in cohort(s)) == 1)
    config = config_of(population, tmp_path / "flower", seed=seed, **base)
    result = run_flower_simulation(config, n_devices=N)
    row = result["rounds"][0]
    assert (row["replies"], row.get("late"), row.get("dropped", 0)) == (3, 1, 0)


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_a_robust_aggregation_keeps_the_model_float32_and_its_replies_valid(population, tmp_path, aggregation):
    """FedMedian and FedTrimmedAvg aggregate in float64: the server casts the model back to the
    dtype it sent, or the next round's float32 replies would not match it (and each device
    would receive twice the bytes). The fast engine keeps no update beyond its round."""
    from fedpref.simulations.engines.fast import FastGrid

    config = config_of(population, tmp_path / "run", aggregation=aggregation, strategy="fedadam")
    grid = FastGrid(config, threads=1)
    result = run_fast(config, grid=grid)
    assert all(row["replies"] == 12 and "rejected" not in row for row in result["rounds"])
    final = np.load(tmp_path / "run" / "final_model.npz")
    assert {final[name].dtype for name in final.files} == {np.dtype(np.float32)}
    assert grid.updates == {}
    inprocess = run_inprocess(config_of(population, tmp_path / "inprocess", aggregation=aggregation, strategy="fedadam"), n_devices=N)
    assert [r["replies"] for r in inprocess["rounds"]] == [r["replies"] for r in result["rounds"]]
    assert abs(inprocess["rounds"][-1]["test-hr"] - result["rounds"][-1]["test-hr"]) <= 0.07


# -- one hostile device (fedpref.simulations.experiments.hostile.app) -----------------------------------

def _hostile_config(population, out, **overrides) -> FederatedConfig:
    """Every device trains and evaluates every round, so that the hostile one is always asked."""
    return config_of(population, out, num_server_rounds=2, fraction_train=1.0, fraction_evaluate=1.0, evaluate_every=1,
                     checkpoint_dir="", **overrides)


def _run_without_device_0(population, out, n_devices, **overrides):
    """The same run on the in-process engine with device 0 absent (an error reply to everything
    it is asked for a round): what the hostile device's run must equal. Asked for its key, it
    gives none the server can use, as the hostile one does, so that both runs order (and so
    sample) the devices alike."""
    from flwr.app import Error

    from fedpref.simulations.engines.device import app as client_app
    from fedpref.simulations.experiments import hostile
    from fedpref.simulations.engines.inprocess import InProcessGrid

    def absent(msg, context):
        if context.node_config["partition-id"] == 0:
            if msg.metadata.message_type == "query":
                return Message(RecordDict({"device": ConfigRecord({"key": hostile.HOSTILE_KEY})}), reply_to=msg)
            return Message(Error(code=0, reason="gone"), reply_to=msg)
        return client_app(msg, context)

    config = _hostile_config(population, out, **overrides)
    result = run_inprocess(config, n_devices=n_devices, grid=InProcessGrid(absent, n_devices, config.to_run_config()))
    return result, np.load(out / "final_model.npz")


def _known_round_keys(config: FederatedConfig) -> set[str]:
    """What a round of rounds.json and of the run store may hold: the devices' expected metrics
    (training ones prefixed train-) and what the server counts itself."""
    from fedpref.server.validation import WEIGHT, evaluate_metric_keys, train_metric_keys

    train = {k if k.startswith("train-") else f"train-{k}" for k in train_metric_keys(config) - {WEIGHT}}
    counted = {"round", "seconds", "replies", "dropped", "late", "rejected", "skipped", "server-lr", "evaluate-rejected", "epsilon", "model-version"}
    return train | (evaluate_metric_keys(config) - {WEIGHT}) | counted


def test_one_hostile_device_neither_stops_the_run_nor_moves_the_model_and_no_unknown_metric_is_stored(population, tmp_path):
    """In-process engine, fedpref's hostile ClientApp: asked for its key it answers with a string
    (the server used to stop before round 1); in round 1 device 0 adds a metric to its training
    reply and leaves one out of its evaluation (Flower's aggregation used to raise: the run
    failed); in round 2 it claims 1e12 examples for its model and 1e15 perfect hits. The run
    completes, and is bit for bit the run without device 0."""
    from fedpref.server.runstore import RunStore
    from fedpref.simulations.experiments import hostile
    from fedpref.simulations.engines.inprocess import InProcessGrid

    # Prepare
    config = _hostile_config(population, tmp_path / "hostile")
    # Execute
    result = run_inprocess(config, n_devices=N, grid=InProcessGrid(hostile.app, N, config.to_run_config()))
    absent, absent_model = _run_without_device_0(population, tmp_path / "absent", N)
    # Assert: every hostile reply rejected and counted; the model and the metrics are those of the run without it.
    rows = result["rounds"]
    assert [(r["rejected"], r["evaluate-rejected"], r["replies"]) for r in rows] == [(1, 1, N - 1)] * 2
    model = np.load(tmp_path / "hostile" / "final_model.npz")
    for name in absent_model.files:
        np.testing.assert_array_equal(model[name], absent_model[name])
    for mine, theirs in zip(rows, absent["rounds"], strict=True):
        assert {k: mine[k] for k in ("val-hr", "val-ndcg", "test-hr", "train-loss")} == {k: theirs[k] for k in ("val-hr", "val-ndcg", "test-hr", "train-loss")}
    # Only known metric names are kept, in rounds.json and in the run store.
    store = RunStore(str(tmp_path / "hostile" / "runs.sqlite"))
    (run,) = store.runs()
    assert run["status"] == "completed"
    stored = store.rounds(run["id"])
    assert len(stored) == 2
    for row in rows:
        assert set(row) <= _known_round_keys(config)
    for row in stored:
        assert set(row["metrics"]) <= _known_round_keys(config) and "secret" not in row["metrics"]


@pytest.mark.slow
def test_on_the_simulation_engine_one_hostile_device_neither_stops_the_run_nor_takes_over_the_model(tmp_path, synthetic_population):
    """The real Simulation Engine (Ray), four devices, two rounds, fedpref's hostile ClientApp
    (fedpref.simulations.experiments.hostile.app; device 0 answers the key query with a string and
    malforms its replies, see its SCRIPT)."""
    from fedpref.simulations.experiments import hostile
    from fedpref.simulations.engines.flower import run_flower_simulation

    # Prepare
    n = 4
    folder = synthetic_population(tmp_path, n, 120, 12, 5)
    config = _hostile_config(folder, tmp_path / "flower", dim=4)
    # Execute
    result = run_flower_simulation(config, n_devices=n, client_app=hostile.app)
    # Assert: the run completed, the hostile replies were rejected and counted, and the model is
    # the honest devices' alone: the in-process run without device 0, up to the two engines'
    # float rounding (about 1e-4 here; device 0 taking part as one of four moves it by about 0.09).
    absent, absent_model = _run_without_device_0(folder, tmp_path / "absent", n, dim=4)
    assert [(r["rejected"], r["evaluate-rejected"], r["replies"]) for r in result["rounds"]] == [(1, 1, n - 1)] * 2
    model = np.load(tmp_path / "flower" / "final_model.npz")
    for name in absent_model.files:
        np.testing.assert_allclose(model[name], absent_model[name], rtol=0, atol=1e-3)
    for mine, theirs in zip(result["rounds"], absent["rounds"], strict=True):
        assert mine["val-hr"] == pytest.approx(theirs["val-hr"], abs=1e-9)  # not the 1e15 perfect hits


def _list_metric(name):
    def tamper(msg, reply):
        if name in reply.content.metric_records.get("metrics", {}):
            reply.content["metrics"][name] = [0.1, 0.2]  # Flower's records allow a list
        return reply
    return tamper


def _forged_partial(record):
    def tamper(msg, reply):
        if msg.metadata.message_type == "train":
            reply.content["partial-aggregate"] = ConfigRecord(record)
        return reply
    return tamper


def _key(msg, reply):
    if msg.metadata.message_type == "query":
        return Message(RecordDict({"device": ConfigRecord({"key": "x"})}), reply_to=msg)
    return reply


def _float16_of_another_shape(msg, reply):
    if msg.metadata.message_type == "train":
        reply.content["arrays"] = ArrayRecord({k: Array(np.zeros(5, np.float16)) for k in reply.content["arrays"]})
    return reply

# case -> (what device 3 does to its replies, run config, (rejected, evaluate-rejected, replies) in each round)
STOPPERS = {
    "train-loss-as-a-list": (_list_metric("train-loss"), {}, (1, 0, N - 1)),
    "val-hr-as-a-list": (_list_metric("val-hr"), {}, (0, 1, N)),
    "empty-partial-aggregate": (_forged_partial({}), {}, (1, 0, N - 1)),
    "a-million-dropouts": (_forged_partial({"devices": 1, "dropped": 10**6}), {}, (1, 0, N - 1)),
    "key-not-a-number": (_key, {}, (0, 0, N)),
    "float16-of-another-shape": (_float16_of_another_shape, {"update_encoding": "float16"}, (1, 0, N - 1)),
}


@pytest.mark.parametrize("case", list(STOPPERS))
def test_a_device_whose_replies_used_to_stop_the_server_leaves_the_run_to_complete(population, tmp_path, case):
    """In-process engine, the real ServerApp and ClientApp, device 3 tampered. Each of these
    replies used to stop the ServerApp (the run store said failed): a metric as a list (TypeError
    in Flower's average, or in the evaluation check), a forged partial-aggregate record
    (KeyError, or a million dropouts recorded), a key that is not a number (ValueError before
    round 1), a float16 update of another shape (NumPy's broadcast error). Now the run completes,
    the reply is rejected and counted, and nothing else changes."""
    from fedpref.simulations.engines.device import app as client_app
    from fedpref.server.runstore import RunStore
    from fedpref.simulations.engines.inprocess import InProcessGrid

    # Prepare
    tamper, overrides, per_round = STOPPERS[case]
    config = _hostile_config(population, tmp_path / "run", **overrides)

    def device(msg, context):
        reply = client_app(msg, context)
        return tamper(msg, reply) if context.node_config["partition-id"] == 3 and not reply.has_error() else reply

    # Execute
    result = run_inprocess(config, n_devices=N, grid=InProcessGrid(device, N, config.to_run_config()))
    # Assert: every round ran, the tampered reply rejected and counted, no dropout recorded.
    (run,) = RunStore(str(tmp_path / "run" / "runs.sqlite")).runs()
    assert run["status"] == "completed"
    rows = result["rounds"]
    assert [(r.get("rejected", 0), r.get("evaluate-rejected", 0), r["replies"]) for r in rows] == [per_round] * 2
    assert all("dropped" not in r and "late" not in r for r in rows)


def test_with_equal_weights_the_fast_engine_weighs_devices_as_the_server_does(population, tmp_path):
    """run-config weighting=equal: the server weighs every reply 1 whatever it claims, and the
    fast engine's partial aggregate averages its devices the same way."""
    from dataclasses import replace

    def distance(a, b) -> float:
        return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in b.files)) / np.sqrt(sum(np.sum(b[k].astype(np.float64) ** 2) for k in b.files)))

    # Prepare
    equal = config_of(population, tmp_path / "inprocess", weighting="equal", num_server_rounds=2, dropout=0.0)
    # Execute
    inprocess = run_inprocess(equal, n_devices=N)
    fast = run_fast(replace(equal, results_dir=str(tmp_path / "fast")), threads=1)
    by_examples = run_fast(replace(equal, weighting="examples", results_dir=str(tmp_path / "examples")), threads=1)
    # Assert: the same model from both engines (float rounding apart, which FedAdam's per-coordinate
    # step amplifies to about 5e-5 here), another one when devices weigh their examples (about 0.3).
    models = {name: np.load(tmp_path / name / "final_model.npz") for name in ("inprocess", "fast", "examples")}
    assert distance(models["fast"], models["inprocess"]) <= 1e-3
    assert distance(models["examples"], models["inprocess"]) > 0.05
    for a, b in zip(inprocess["rounds"], fast["rounds"], strict=True):
        assert a["train-loss"] == pytest.approx(b["train-loss"], rel=1e-4) and a["replies"] == b["replies"]
    assert by_examples["rounds"][0]["train-loss"] != pytest.approx(fast["rounds"][0]["train-loss"], rel=1e-4)
