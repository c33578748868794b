"""The fast engine computes what the Flower path computes.

- the compiled local update draws a device's batches from its generator exactly as
  ``local_update`` does, and its update agrees with ``local_round``'s to 1e-5 (relative);
- a run on Flower's Simulation Engine and the same run on the fast engine: every device's
  update, as the server receives it, agrees to 1e-5, and HR@10 to 0.005 in every round;
- with central DP (fixed and adaptive clipping), against the in-process engine (the real
  ClientApp, called in-process): the same noise, the same epsilon, the same clipping bounds.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedpref.client.device import initial_private, initial_privates, local_round
from fedpref.simulations.engines.compiled import LOSS_KINDS, device_evaluate, device_round, draw_batches, unsupported
from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.models.preference import ModelSpec
from fedpref.models.train import LocalData, TrainConfig, draw_torch_seed, epoch_batches, init_params
from fedpref.server import app as server_app
from fedpref.server.app import ServerHooks
from fedpref.simulations.engines.fast import FastGrid, run_fast

N_ITEMS = 400


def relative(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every array."""
    num = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)) for k in b)
    den = sum(float(np.sum(np.asarray(b[k], np.float64) ** 2)) for k in b)
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def test_the_compiled_draws_are_local_updates_draws():
    items = np.random.default_rng(0).choice(N_ITEMS, size=150, replace=False).astype(np.int64)
    config = TrainConfig(num_negatives=20, batch_size=64, epochs=3)
    data = LocalData.for_device(items, N_ITEMS)
    compiled, reference = np.random.default_rng([1, 2, 3]), np.random.default_rng([1, 2, 3])
    blocks, sizes, epochs = draw_batches(compiled, items, N_ITEMS, 3, 64, 20)
    draw_torch_seed(reference)
    expected = []
    for epoch in range(3):
        for idx, negatives in epoch_batches(data, config, reference):
            expected.append((epoch, np.column_stack([items[idx], negatives])))
    assert list(sizes) == [len(b) for _, b in expected] and list(epochs) == [e for e, _ in expected]
    np.testing.assert_array_equal(blocks, np.concatenate([b for _, b in expected]))
    assert compiled.random() == reference.random()  # both generators are left in the same state
    assert not any(np.isin(b[:, 1:], items).any() for _, b in expected)  # negatives avoid the positives


@pytest.mark.parametrize("loss", ["softmax", "bpr", "bce"])
def test_a_devices_compiled_round_is_its_local_round(loss):
    config = FederatedConfig.from_run_config({"catalogue-size": N_ITEMS, "devices": 8, "loss": loss, "dim": 16, "num-server-rounds": 10, "lr-end": 0.5})
    shared, _ = init_params(config.model_spec, 1, N_ITEMS, seed=0)
    q, bq = shared["item_embedding.weight"], shared["item_bias.weight"][:, 0].copy()
    sizes = (0, 1, 7, 64, 65, 200)  # empty, one, a partial batch, exactly one batch, one more, several
    histories = [np.random.default_rng(u).choice(N_ITEMS, size=n, replace=False).astype(np.int64) for u, n in enumerate(sizes)]
    torch.set_num_threads(1)
    for user, items in enumerate(histories):
        private = initial_private(config.model_spec, 0, user)
        server_round = 4  # the device step is scheduled (lr-end): the compiled round gets round 4's
        p, rows, item_rows, bias_rows, got_loss, ok = device_round(
            np.random.default_rng([0, user, server_round, 1]), items, q, bq, private["user_embedding.weight"][0],
            config.private_epochs, config.train_config().lr, config.local_epochs, config.train_config(server_round).lr,
            config.batch_size, config.num_negatives, config.l2, LOSS_KINDS[loss])
        update, new_private, metrics = local_round(config, shared, private, items, N_ITEMS, np.random.default_rng([0, user, server_round, 1]), server_round)
        assert ok
        compiled = {"item_embedding.weight": np.zeros_like(q), "item_bias.weight": np.zeros((N_ITEMS, 1), np.float32)}
        compiled["item_embedding.weight"][rows] = item_rows - q[rows]
        compiled["item_bias.weight"][rows, 0] = bias_rows - bq[rows]
        if len(items):
            assert relative(compiled, update) <= 1e-5, (loss, len(items))
            assert relative({"p": p}, {"p": new_private["user_embedding.weight"][0]}) <= 1e-5
            assert got_loss == pytest.approx(metrics["loss"], rel=1e-5)
            touched = np.flatnonzero(np.any(update["item_embedding.weight"] != 0, axis=1))
            assert set(touched) <= set(rows)  # only rows the device trained change
        else:
            assert len(rows) == 0 and not any(np.any(v) for v in update.values())


def test_a_diverging_device_fails_as_local_update_raises():
    config = FederatedConfig.from_run_config({"catalogue-size": N_ITEMS, "devices": 8, "dim": 8})
    shared, _ = init_params(config.model_spec, 1, N_ITEMS, seed=0)
    items = np.arange(100, dtype=np.int64)
    with pytest.raises(FloatingPointError):
        local_round(replace(config, lr=1e6), shared, initial_private(config.model_spec, 0, 0), items, N_ITEMS, np.random.default_rng(0), 1)
    *_, ok = device_round(np.random.default_rng(0), items, shared["item_embedding.weight"], shared["item_bias.weight"][:, 0].copy(),
                          initial_private(config.model_spec, 0, 0)["user_embedding.weight"][0], 2, 1e6, 3, 1e6, 64, 20, 0.01, 0)
    assert not ok


def test_first_private_vectors_are_drawn_as_each_device_draws_its_own():
    users = np.array([0, 3, 670, 123_456])
    for spec in (ModelSpec("mf", dim=64), ModelSpec("mf", dim=5), ModelSpec("neumf", dim=8)):
        expected = np.stack([np.concatenate([v.ravel() for v in initial_private(spec, 7, int(u)).values()]) for u in users])
        np.testing.assert_array_equal(initial_privates(spec, 7, users), expected)


def test_what_the_compiled_trainer_covers():
    assert unsupported("mf", "sgd", "softmax") is None
    assert "neumf" in unsupported("neumf", "sgd", "softmax")
    assert "adam" in unsupported("mf", "adam", "softmax")


def test_the_compiled_evaluation_ranks_as_the_device_does(synthetic_population, tmp_path):
    """device_evaluate against the ClientApp's own refit and rank_locally."""
    from fedpref.simulations.engines.device import rank_locally
    from fedpref.client.device import refit_private
    from fedpref.simulations.engines.history import load_history

    folder = synthetic_population(tmp_path, 12, 300, 30, 3)
    config = FederatedConfig.from_run_config({"history-dir": str(folder), "dim": 16})
    shared, _ = init_params(config.model_spec, 1, 300, seed=1)
    q, bq = shared["item_embedding.weight"], shared["item_bias.weight"][:, 0].copy()
    for user in range(12):
        h = load_history(str(folder), user)
        private = initial_private(config.model_spec, 0, user)
        p, ranks, ok = device_evaluate(np.random.default_rng([0, user, 5, 2]), h.train_items, q, bq, private["user_embedding.weight"][0],
                                       config.personalize_epochs, config.lr, config.batch_size, config.num_negatives, config.l2, 0, h.val_item, h.test_item, h.negatives)
        rng = np.random.default_rng([0, user, 5, 2])
        refit = refit_private(config, shared, private, LocalData.for_device(h.train_items, 300), config.personalize_epochs, rng)
        model = config.model_spec.build(1, 300, init=False)
        model.set_shared(shared)
        model.set_private(refit)
        scores = model.score_all(torch.zeros(1, dtype=torch.long))[0].numpy().astype(np.float64)
        expected = [*rank_locally(scores, h, "val", rng), *rank_locally(scores, h, "test", rng)]
        assert ok and list(ranks) == expected
        assert relative({"p": p}, {"p": refit["user_embedding.weight"][0]}) <= 1e-5


# -- whole runs -------------------------------------------------------------------------

N_DEVICES, ROUNDS = 16, 3


@pytest.fixture(scope="module")
def population(synthetic_population, tmp_path_factory):
    return synthetic_population(tmp_path_factory.mktemp("fast"), N_DEVICES, N_ITEMS, 60, 1)


def base_config(population, results, **overrides) -> FederatedConfig:
    values = {"history-dir": str(population), "num-server-rounds": ROUNDS, "dim": 16, "evaluate-every": 1, "clip-norm": 0.2,
              "fraction-train": 0.5, "dropout": 0.2, "results-dir": str(results), "resume": False}
    values.update(overrides)
    return FederatedConfig.from_run_config(values)


@pytest.fixture(scope="module")
def flower_and_fast(population, tmp_path_factory):
    """The same run on Flower's Simulation Engine (every exchange recorded) and on the fast engine."""
    from fedpref.simulations.engines.flower import run_flower_simulation

    tmp = tmp_path_factory.mktemp("runs")
    config = base_config(population, tmp / "flower")
    exchanges, keys = [], {}  # every exchange; each node's device
    ask = server_app.device_keys

    def spy(grid, expected, timeout=600.0):
        keys.update(ask(grid, expected, timeout))
        return keys

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server_app, "device_keys", spy)
        flower = run_flower_simulation(config, n_devices=N_DEVICES, hooks=ServerHooks(on_exchange=[lambda sent, replies: exchanges.append((sent, replies))]))
    grid = FastGrid(replace(config, results_dir=str(tmp / "fast")), keep_updates=True)
    fast = run_fast(replace(config, results_dir=str(tmp / "fast")), grid=grid)
    return keys, flower, exchanges, fast, grid


def test_every_devices_update_agrees_with_the_flower_engines(flower_and_fast):
    keys, _, exchanges, _, grid = flower_and_fast
    compared = 0
    trains = [(s, r) for s, r in exchanges if s and s[0].metadata.message_type == "train"]
    assert len(trains) == ROUNDS
    for server_round, (sent, replies) in enumerate(trains, start=1):
        global_arrays = {k: v.numpy().astype(np.float64) for k, v in sent[0].content["arrays"].items()}
        received = {keys[r.metadata.src_node_id]: r for r in replies if not r.has_error()}
        fast_updates = grid.updates[server_round]
        assert set(fast_updates) == set(received)  # the same devices trained (same cohort, same dropouts)
        for device, reply in received.items():
            flower_update = {k: reply.content["arrays"][k].numpy().astype(np.float64) - global_arrays[k] for k in global_arrays}
            assert relative(fast_updates[device], flower_update) <= 1e-5, (server_round, device)
            compared += 1
    assert compared >= ROUNDS * 4


def test_a_short_runs_metrics_agree_with_the_flower_engines(flower_and_fast):
    _, flower, _, fast, _ = flower_and_fast
    assert len(fast["rounds"]) == len(flower["rounds"]) == ROUNDS
    for a, b in zip(flower["rounds"], fast["rounds"], strict=True):
        for metric in ("val-hr", "test-hr", "val-full-hr", "test-full-hr"):
            assert abs(a[metric] - b[metric]) <= 0.005, (a["round"], metric)
        assert a.get("dropped", 0) == b.get("dropped", 0) and a["replies"] == b["replies"]
        assert a["train-loss"] == pytest.approx(b["train-loss"], rel=1e-4)
        assert a["train-clipped"] == pytest.approx(b["train-clipped"])
    assert any(r.get("dropped") for r in fast["rounds"])  # simulated dropout declined some devices
    assert any(r["train-clipped"] > 0 for r in fast["rounds"])  # and some updates were clipped


@pytest.mark.filterwarnings("ignore:reproducible-noise=true")
@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_with_central_dp_the_fast_engine_adds_the_same_noise_and_spends_the_same_epsilon(population, tmp_path, clipping):
    from fedpref.simulations.engines.inprocess import run_inprocess

    # Both engines draw the same noise and cohorts only when the run asks for them from its seed.
    config = base_config(population, tmp_path / "inprocess", **{"dp-noise-multiplier": 0.7, "dp-clipping": clipping, "dropout": 0.0, "evaluate-every": 3,
                                                                 "reproducible-noise": True})
    reference = run_inprocess(config, n_devices=N_DEVICES)
    fast = run_fast(replace(config, results_dir=str(tmp_path / "fast")))
    assert fast["privacy"]["epsilon"] == reference["privacy"]["epsilon"]
    for a, b in zip(reference["rounds"], fast["rounds"], strict=True):
        assert a["epsilon"] == b["epsilon"] and a["replies"] == b["replies"]
        if clipping == "adaptive":
            assert a["clip-norm"] == pytest.approx(b["clip-norm"], rel=1e-9)
    ref_model = np.load(tmp_path / "inprocess" / "final_model.npz")
    fast_model = np.load(tmp_path / "fast" / "final_model.npz")
    assert relative(dict(fast_model), dict(ref_model)) <= 1e-5


def test_a_model_the_compiler_does_not_cover_runs_the_devices_own_code(population, tmp_path):
    from fedpref.simulations.engines.inprocess import run_inprocess

    config = base_config(population, tmp_path / "inprocess", model="neumf", dim=8, dropout=0.0, **{"num-server-rounds": 2})
    reference = run_inprocess(config, n_devices=N_DEVICES)
    fast = run_fast(replace(config, results_dir=str(tmp_path / "fast")))
    for a, b in zip(reference["rounds"], fast["rounds"], strict=True):
        assert a["val-hr"] == pytest.approx(b["val-hr"], abs=0.005) and a["train-loss"] == pytest.approx(b["train-loss"], rel=1e-4)


def test_private_vectors_can_live_in_a_memory_mapped_file(population, tmp_path):
    config = base_config(population, tmp_path / "fast", dropout=0.0, **{"fraction-train": 1.0, "num-server-rounds": 1, "personalize-epochs": 0})
    grid = FastGrid(config, private_dir=str(tmp_path / "private"))
    run_fast(config, grid=grid)
    on_disk = np.load(tmp_path / "private" / "private.npy", mmap_mode="r")
    assert on_disk.shape == (N_DEVICES, 16)
    np.testing.assert_array_equal(on_disk, grid.private.values)
    assert grid.private.ready.all() and np.any(on_disk != initial_privates(config.model_spec, 0, np.arange(N_DEVICES)))


@pytest.mark.parametrize("override, word", [({"secagg": True, "secagg-min-cohort": 2}, "secure aggregation"),
                                            ({"update-encoding": "int8"}, "float32"), ({"store-dir": "/tmp/x"}, "device stores")])
def test_the_fast_engine_refuses_what_it_does_not_compute(population, tmp_path, override, word):
    with pytest.raises(RunConfigError, match=word):
        FastGrid(base_config(population, tmp_path, **override))


def test_a_device_that_sends_a_partial_aggregate_is_rejected(population, tmp_path):
    """Only a grid that computes partial aggregates itself may hand them to the server: from a
    device, the devices it claims to stand for would reach the privacy accountant."""
    import json

    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedpref.simulations.engines.device import app as client_app
    from fedpref.models.config import PARTIAL_AGGREGATE
    from fedpref.server.app import main as server_main
    from fedpref.simulations.engines.inprocess import InProcessGrid

    config = base_config(population, tmp_path / "run", dropout=0.0, **{"num-server-rounds": 1, "fraction-train": 1.0, "fraction-evaluate": 0.0})

    def forger(msg, context):
        reply = client_app(msg, context)
        if msg.metadata.message_type == "train" and context.node_config["partition-id"] == 0:
            reply.content[PARTIAL_AGGREGATE] = ConfigRecord({"devices": 1000, "dropped": 0, "weight": 1000.0})
        return reply

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    grid = InProcessGrid(forger, N_DEVICES, config.to_run_config())
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config.to_run_config()))
    row = json.loads((tmp_path / "run" / "rounds.json").read_text())["rounds"][0]
    assert row["replies"] == N_DEVICES - 1 and row["rejected"] == 1 and "dropped" not in row
