"""User-level DP in training: noise on the average before the server optimiser, epsilon per
round from the accountant, a target epsilon that stops training, nothing but the clipped
update leaving a device, and noise (and cohorts) nobody can regenerate from the run's seed."""

import json
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.server.app import ServerHooks
from fedpref.server.strategy import make_strategy
from fedpref.server.privacy import DpMechanism, ReproducibleNoiseWarning, default_delta
from fedpref.simulations.engines.inprocess import NODE_ID_BASE, run_inprocess

N_DEVICES = 20


@pytest.fixture(scope="module")
def population(tmp_path_factory, synthetic_population):
    return synthetic_population(tmp_path_factory.mktemp("pop"), N_DEVICES, n_items=150, mean_events=20, seed=2)


def replies_equal_to(arrays: dict[str, np.ndarray], n: int) -> list[Message]:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # as a ServerApp's run sets them
    content = lambda: RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()}), "metrics": MetricRecord({"num-examples": 1})})
    return [Message(content(), dst_node_id=i + 1, message_type=MessageType.TRAIN) for i in range(n)]


def aggregate_zero_updates(strategy_name: str, z: float = 2.0, c: float = 0.5, m: int = 10):
    config = FederatedConfig.from_run_config({"strategy": strategy_name, "dp-noise-multiplier": z, "clip-norm": c, "server-lr": 0.05})
    strategy = make_strategy(config, m, lambda report: None)
    current = {"w": np.zeros((200, 50), np.float32)}
    strategy.current_arrays = {k: v.copy() for k, v in current.items()}  # as configure_train leaves it (FedOpt)
    strategy._sent_global = {k: v.copy() for k, v in current.items()}  # and fedpref's validation
    arrays, _ = strategy.aggregate_train(1, replies_equal_to(current, m))
    return arrays["w"].numpy() - current["w"]


def test_fedavg_under_dp_adds_noise_of_z_c_over_m_to_the_average():
    moved = aggregate_zero_updates("fedavg", z=2.0, c=0.5, m=10)
    assert moved.std() == pytest.approx(2.0 * 0.5 / 10, rel=0.03) and abs(moved.mean()) < 0.005


def test_fedadam_steps_on_the_noised_average_so_the_noise_is_not_added_after_its_step():
    # Every device sent the current model back: the only pseudo-gradient is the noise. Adam's
    # first step moves every coordinate by its full step size; noise added after the step
    # would instead leave Gaussian-sized moves.
    moved = aggregate_zero_updates("fedadam")
    size = np.abs(moved)
    assert np.quantile(size, 0.01) > 0.97 * size.max()  # (a coordinate whose noise is within tau moves less)
    assert (moved > 0).mean() == pytest.approx(0.5, abs=0.03)


def run(population, tmp_path, hooks=None, **overrides):
    base = {"history-dir": str(population), "num-server-rounds": 4, "dim": 8, "local-epochs": 1, "evaluate-every": 2,
            "fraction-train": 0.5, "clip-norm": 0.5, "dp-noise-multiplier": 1.5, "results-dir": str(tmp_path)}
    base.update(overrides)
    return run_inprocess(FederatedConfig.from_run_config(base), n_devices=N_DEVICES, hooks=hooks)


def test_epsilon_per_round_is_the_accountants_and_a_target_stops_training_before_passing_it(population, tmp_path):
    mechanism, delta = DpMechanism(1.5, N_DEVICES, 10), default_delta(N_DEVICES)
    target = (mechanism.epsilon(2, delta) + mechanism.epsilon(3, delta)) / 2  # room for 2 rounds, not 3
    result = run(population, tmp_path, **{"dp-target-epsilon": target})
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert [r["epsilon"] for r in result["rounds"]] == pytest.approx([mechanism.epsilon(r, delta) for r in (1, 2)])
    privacy = result["privacy"]
    assert privacy["stopped-by-target"] and privacy["rounds-run"] == 2 and privacy["epsilon"] <= target
    assert privacy["delta"] == delta < 1 / N_DEVICES and privacy["cohort"] == 10
    assert "val-hr" in result["rounds"][-1]  # the last round that ran is evaluated


def test_under_dp_a_device_sends_its_clipped_update_and_an_equal_weight_only(population, tmp_path):
    exchanges = []
    hooks = ServerHooks(on_exchange=[lambda sent, replies: exchanges.append(replies)])
    run(population, tmp_path, hooks, **{"num-server-rounds": 1, "evaluate-every": 1})
    train = [r for replies in exchanges for r in replies if r.metadata.message_type == MessageType.TRAIN]
    assert len(train) == 10
    for reply in train:
        assert dict(reply.content["metrics"]) == {"num-examples": 1}


def test_a_target_that_one_round_passes_is_refused_with_the_fix(population, tmp_path):
    with pytest.raises(RunConfigError, match="one round alone spends epsilon .* raise dp-noise-multiplier"):
        run(population, tmp_path, **{"dp-target-epsilon": 0.01})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"dp-noise-multiplier": -1}, "must be 0 \\(no DP\\) or positive"),
        ({"dp-target-epsilon": 3.0}, "needs dp-noise-multiplier > 0"),
        ({"dp-noise-multiplier": 1.0, "dp-delta": 1.5}, "dp-delta"),
    ],
)
def test_bad_dp_settings_name_the_key(override, message):
    with pytest.raises(RunConfigError, match=message):
        FederatedConfig.from_run_config(override)


def test_adaptive_clipping_moves_c_to_the_target_quantile_of_the_norms(population, tmp_path):
    # Without DP, how large the updates are (the mean norm of a round's updates).
    plain = run(population, tmp_path / "plain", **{"dp-noise-multiplier": 0.0, "clip-norm": 1e6, "num-server-rounds": 1,
                                                   "evaluate-every": 1, "fraction-train": 1.0})
    typical = plain["rounds"][0]["train-update-norm"]
    # Adaptive clipping from a bound 20 times too small: C must grow towards the median norm
    # (a bit that said "clipped" instead of "fitted" would shrink it every round).
    result = run(population, tmp_path / "adaptive", **{"dp-clipping": "adaptive", "dp-noise-multiplier": 1.0, "clip-norm": typical / 20,
                                                       "dp-clip-lr": 0.5, "num-server-rounds": 12, "evaluate-every": 12, "fraction-train": 1.0})
    bounds = [r["clip-norm"] for r in result["rounds"]]
    assert bounds[0] == pytest.approx(typical / 20)
    assert typical / 2 < bounds[-1] < typical * 2
    assert result["privacy"]["clipping"] == "adaptive"
    mechanism, delta = DpMechanism(1.0, N_DEVICES, N_DEVICES), default_delta(N_DEVICES)
    assert result["rounds"][-1]["epsilon"] == pytest.approx(mechanism.epsilon(12, delta))


def test_adaptive_clipping_refuses_more_noise_than_its_count_can_carry(population, tmp_path):
    with pytest.raises(RunConfigError, match="allows dp-noise-multiplier below 1"):
        run(population, tmp_path, **{"dp-clipping": "adaptive", "dp-noise-multiplier": 1.5})


# -- noise nobody can compute -----------------------------------------------------------------


def regenerated_noise_candidates(seed: int, std: float, shapes: dict[str, tuple], dtype) -> list[dict[str, np.ndarray]]:
    """What an attacker who knows the run's seed (public: the default is 0) computes as its noise,
    one guess per generator the server could have drawn it from: NumPy's global generator
    seeded with the seed (Flower's wrappers draw from it), and fedpref's reproducible stream."""
    from fedpref.server.privacy import NoiseSource

    np.random.seed(seed)
    legacy = {name: np.random.normal(0.0, std, shape).astype(dtype) for name, shape in shapes.items()}
    rng = NoiseSource(seed).generator()
    ours = {name: rng.normal(0.0, std, shape).astype(dtype) for name, shape in shapes.items()}
    return [legacy, ours]


@pytest.mark.parametrize("reproducible", [False, True])
def test_nobody_who_knows_the_seed_can_remove_the_noise_from_the_published_model(population, tmp_path, reproducible):
    # Prepare: one round of central DP (fixed clipping, FedAvg: the published model is the
    # noised average) with the default settings; the test watches what the devices sent.
    z, c, m, seed = 1.5, 0.5, 10, 0
    sent, replies = [], []

    def watch(messages, answers):
        sent.extend(msg.metadata.dst_node_id for msg in messages if msg.metadata.message_type == MessageType.TRAIN)
        replies.extend({k: r.content["arrays"][k].numpy().astype(np.float64) for k in r.content["arrays"]}
                       for r in answers if r.metadata.message_type == MessageType.TRAIN and not r.has_error())

    hooks = ServerHooks(on_exchange=[watch])
    overrides = {"num-server-rounds": 1, "evaluate-every": 1, "fraction-evaluate": 0.0, "strategy": "fedavg", "dp-noise-multiplier": z,
                 "clip-norm": c, "seed": seed, "reproducible-noise": reproducible}
    if reproducible:
        with pytest.warns(ReproducibleNoiseWarning, match="anyone who knows the seed"):
            result = run(population, tmp_path, hooks, **overrides)
    else:
        result = run(population, tmp_path, hooks, **overrides)
    published = dict(np.load(tmp_path / "final_model.npz"))
    assert result["rounds"][0]["replies"] == len(replies) == m

    # Execute: the attacker subtracts the noise regenerated from the seed, and replays the cohort.
    true_average = {k: np.mean([r[k] for r in replies], axis=0) for k in published}
    std = z * c / m
    shapes = {k: v.shape for k, v in published.items()}
    residuals = [max(float(np.abs(published[k].astype(np.float64) - noise[k] - true_average[k]).max()) for k in published)
                 for noise in regenerated_noise_candidates(seed, std, shapes, published[next(iter(published))].dtype)]
    replayed_cohort = random.Random(seed).sample([NODE_ID_BASE + i for i in range(N_DEVICES)], m)  # the grid's order: by device key

    # Assert: with noise from the OS the regenerated noise leaves the full noise in place (the
    # true average is not recovered, and the cohort is not the seed's); a run that asked for
    # reproducible noise is recovered to float32 rounding, which shows the attack works.
    recovered = min(residuals) < std / 100
    assert recovered == reproducible, residuals
    assert (set(replayed_cohort) == set(sent)) == reproducible
    assert result["privacy"]["noise-source"] == ("run-seed" if reproducible else "os-entropy")
    assert result["privacy"]["cohort-source"] == result["privacy"]["noise-source"]


def test_two_runs_with_noise_from_the_os_publish_different_models(population, tmp_path):
    overrides = {"num-server-rounds": 1, "evaluate-every": 1, "fraction-evaluate": 0.0, "checkpoint-dir": "none"}
    run(population, tmp_path / "a", **overrides)
    run(population, tmp_path / "b", **overrides)
    a, b = np.load(tmp_path / "a" / "final_model.npz"), np.load(tmp_path / "b" / "final_model.npz")
    assert all(not np.array_equal(a[name], b[name]) for name in a.files)


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_the_dp_wrappers_draw_from_the_noise_source_and_not_numpys_global_generator(clipping):
    from fedpref.server.privacy import NoiseSource

    config = FederatedConfig.from_run_config({"strategy": "fedavg", "dp-noise-multiplier": 0.5, "clip-norm": 0.5, "dp-clipping": clipping})
    draws = []
    for global_seed in (1, 2):
        wrapper = make_strategy(config, 10, lambda report: None, noise=NoiseSource(7)).dp_wrapper
        np.random.seed(global_seed)  # whatever state NumPy's global generator is in must not matter
        noised = wrapper._add_noise_to_aggregated_arrays(ArrayRecord({"w": Array(np.zeros((20, 5), np.float32))}))
        fraction = wrapper._noisy_fraction(3, 10) if clipping == "adaptive" else None
        draws.append((noised["w"].numpy(), fraction))
    np.testing.assert_array_equal(draws[0][0], draws[1][0])
    assert draws[0][1] == draws[1][1]
    assert draws[0][0].std() == pytest.approx(wrapper.noise_multiplier * 0.5 / 10, rel=0.3)


@pytest.mark.filterwarnings("ignore:reproducible-noise=true")
def test_simulate_repeats_a_dp_run_bit_for_bit_only_when_asked_and_says_so(tmp_path):
    from typer.testing import CliRunner

    from fedpref.simulations.cli import app

    def simulate(name, *extra):
        out = tmp_path / name
        result = CliRunner().invoke(app, [
            "simulate", "--dataset", "synthetic:30x300", "--rounds", "1", "--dim", "8", "--devices-per-round", "10", "--engine", "inprocess",
            "--references", "none", "--out", str(out), "--no-progress", "--clip-norm", "0.5", "--dp-noise-multiplier", "1", "--seed", "3", *extra,
        ], env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        # (rich folds long lines where the console is narrower than COLUMNS says: compare words)
        return json.loads((out / "rounds.json").read_text()), np.load(out / "final_model.npz"), " ".join(result.output.split())

    first, model_a, output = simulate("a", "--reproducible-noise")
    _, model_b, _ = simulate("b", "--reproducible-noise")
    secure, model_c, plain_output = simulate("c")
    assert first["privacy"]["noise-source"] == "run-seed" and first["config"]["reproducible-noise"] is True
    assert "came from seed 3 (--reproducible-noise): anyone who knows it can remove the noise" in output
    assert all(np.array_equal(model_a[name], model_b[name]) for name in model_a.files)
    assert secure["privacy"]["noise-source"] == "os-entropy" and "--reproducible-noise" not in plain_output
    assert all(not np.array_equal(model_a[name], model_c[name]) for name in model_a.files)
