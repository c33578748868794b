"""Secure aggregation (Flower's SecAgg+ under fedpref's strategies): the server gets the sum
and nothing per device; it works with central and distributed DP; rounds survive dropouts up
to the tolerance and are skipped beyond it; and the whole thing runs on the Simulation Engine."""

import logging

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedpref.simulations.engines.device import drops_out
from fedpref.simulations.engines.history import load_history
from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.server.app import ServerHooks
from fedpref.server.privacy import DpMechanism, PrivacyLedger
from fedpref.server.secure import (
    check_average,
    device_noise_std,
    quantization_levels,
    quantization_range,
    required_contributors,
    shares_per_device,
    sum_limit,
)
from fedpref.simulations.engines.flower import run_flower_simulation
from fedpref.simulations.engines.inprocess import InProcessGrid, run_inprocess

N_DEVICES = 20


@pytest.fixture(scope="module")
def population(tmp_path_factory, synthetic_population):
    return synthetic_population(tmp_path_factory.mktemp("pop"), N_DEVICES, n_items=150, mean_events=20, seed=2)


def config_for(population, tmp_path, **overrides) -> FederatedConfig:
    base = {"history-dir": str(population), "num-server-rounds": 2, "dim": 8, "local-epochs": 1, "evaluate-every": 2,
            "fraction-train": 0.5, "clip-norm": 0.5, "secagg": True, "secagg-min-cohort": 5, "strategy": "fedavg",
            "results-dir": str(tmp_path)}
    base.update(overrides)
    return FederatedConfig.from_run_config(base)


def run(population, tmp_path, n=N_DEVICES, **overrides):
    exchanges = []
    hooks = ServerHooks(on_exchange=[lambda sent, replies: exchanges.append((sent, replies))])
    return run_inprocess(config_for(population, tmp_path, **overrides), n_devices=n, hooks=hooks), exchanges


@pytest.mark.filterwarnings("ignore:reproducible-noise=true")
def test_the_secure_sum_gives_the_same_model_as_the_plain_equal_weight_average(population, tmp_path):
    # Plain DP with a negligible noise sends equal weights too: the two models must agree to
    # SecAgg+'s quantisation step (2C / 2**22 per device). Both runs draw the same cohort only
    # when DP's cohorts follow the seed (reproducible-noise).
    common = {"num-server-rounds": 1, "evaluate-every": 1, "dp-noise-multiplier": 1e-9, "reproducible-noise": True}
    run(population, tmp_path / "secure", **common)
    run(population, tmp_path / "plain", secagg=False, **common)
    secure, plain = np.load(tmp_path / "secure" / "best_model.npz"), np.load(tmp_path / "plain" / "best_model.npz")
    assert set(secure) == set(plain)
    for name in secure:
        assert np.abs(secure[name] - plain[name]).max() < 1e-5
    assert max(np.abs(plain[name]).max() for name in plain) > 0.01  # the model did move


def test_the_server_receives_masked_vectors_and_no_device_arrays(population, tmp_path):
    result, exchanges = run(population, tmp_path)
    trains = [(s, r) for s, r in exchanges if s and s[0].metadata.message_type == "train"]
    assert len(trains) == 4 * 2  # SecAgg+'s four stages per round
    masked = 0
    for sent, replies in trains:
        for reply in replies:
            assert not reply.has_error()
            assert all(len(record) == 0 for record in reply.content.array_records.values())  # no arrays in clear
            stage = reply.content.config_records[RECORD_KEY_CONFIGS]
            if Key.MASKED_PARAMETERS in stage:
                vector = np.concatenate([bytes_to_ndarray(b).ravel() for b in stage[Key.MASKED_PARAMETERS]]) / 2**32
                # A masked vector looks uniform on [0, 1) (modulo 2**32): it says nothing of the update.
                assert np.quantile(vector, [0.1, 0.5, 0.9]) == pytest.approx([0.1, 0.5, 0.9], abs=0.07)  # (unmasked, all would lie below 0.001)
                masked += 1
    assert masked == 2 * 10
    assert [row["replies"] for row in result["rounds"]] == [10, 10]
    assert result["secure-aggregation"]["rounds-skipped"] == 0


@pytest.mark.filterwarnings("ignore:reproducible-noise=true")
def test_rounds_go_on_without_devices_that_drop_out_and_epsilon_counts_the_rest(population, tmp_path):
    # The seed's cohorts (reproducible-noise), so that the same devices drop out in every run of the test.
    result, _ = run(population, tmp_path, dropout=0.2, **{"num-server-rounds": 3, "dp-noise-multiplier": 1.0, "secagg-dropout-tolerance": 0.4,
                                                          "reproducible-noise": True})
    rows = result["rounds"]
    assert any(row["dropped"] > 0 for row in rows)
    mechanism = DpMechanism(1.0, N_DEVICES, 10)
    ledger = PrivacyLedger(mechanism, result["privacy"]["delta"])
    for row in rows:
        assert not row["secagg-skipped"] and row["replies"] + row["dropped"] == 10
        assert row["epsilon"] == pytest.approx(ledger.record_round(row["replies"]))


def test_distributed_noise_is_accounted_by_the_square_root_of_the_share_that_contributed():
    mechanism = DpMechanism(2.0, 1000, 100)
    central, distributed = PrivacyLedger(mechanism, 1e-5), PrivacyLedger(mechanism, 1e-5, "distributed")
    central.record_round(64)
    distributed.record_round(64)
    assert distributed.epsilon == pytest.approx(PrivacyLedger(DpMechanism(2.0 * 0.8, 1000, 100), 1e-5).record_round())
    assert central.epsilon == pytest.approx(PrivacyLedger(DpMechanism(2.0 * 0.64, 1000, 100), 1e-5).record_round())


def test_with_distributed_noise_the_server_adds_none_and_the_model_carries_the_devices_noise(population, tmp_path):
    quiet, _ = run(population, tmp_path / "quiet", **{"num-server-rounds": 1, "evaluate-every": 1})
    noisy, _ = run(population, tmp_path / "noisy", **{"num-server-rounds": 1, "evaluate-every": 1,
                                                     "dp-noise-multiplier": 2.0, "dp-noise-placement": "distributed"})
    assert noisy["privacy"]["noise-placement"] == "distributed" and noisy["rounds"][0]["epsilon"] > 0
    before = np.load(tmp_path / "quiet" / "best_model.npz")
    after = np.load(tmp_path / "noisy" / "best_model.npz")
    moved = after["item_embedding.weight"] - before["item_embedding.weight"]  # the noise on the average: z C / m = 0.1
    assert moved.std() == pytest.approx(2.0 * 0.5 / 10, rel=0.1)


def test_a_round_with_more_dropouts_than_tolerated_is_skipped_before_anything_is_unmasked(population, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedpref.secagg"):
        result, exchanges = run(population, tmp_path, dropout=0.5, **{"num-server-rounds": 1, "evaluate-every": 1,
                                                                     "dp-noise-multiplier": 1.0, "secagg-dropout-tolerance": 0.1})
    row = result["rounds"][0]
    assert row["secagg-skipped"] and "epsilon" not in row and result["privacy"]["epsilon"] == 0.0
    assert "skipped" in caplog.text and "nothing was unmasked" in caplog.text
    stages = [s[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] for s, _ in exchanges if s and s[0].metadata.message_type == "train"]
    assert stages == ["setup", "share_keys", "collect_masked_vectors"]  # no unmask stage


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"dp-noise-multiplier": 1.0, "dp-noise-placement": "distributed", "secagg": False}, "secagg=true"),
        ({"dp-noise-multiplier": 1.0, "dp-clipping": "adaptive"}, "dp-clipping=fixed"),
        ({"secagg-reconstruction-threshold": 0.8, "secagg-dropout-tolerance": 0.3}, "1 - secagg-reconstruction-threshold"),
        ({"secagg-reconstruction-threshold": 0.4}, "colluding"),
        ({"secagg-min-cohort": 1}, "at least 2"),
    ],
)
def test_settings_secure_aggregation_cannot_honour_are_refused(population, tmp_path, overrides, words):
    with pytest.raises(RunConfigError, match=words):
        config_for(population, tmp_path, **overrides)


def test_a_cohort_below_the_minimum_is_refused_before_training(population, tmp_path):
    with pytest.raises(RunConfigError, match="secagg-min-cohort"):
        run(population, tmp_path, **{"secagg-min-cohort": 11})
    assert not (tmp_path / "rounds.json").exists()


def test_quantisation_never_clips_an_update_and_the_masked_sum_cannot_overflow(population, tmp_path):
    config = config_for(population, tmp_path)
    assert quantization_range(config, 10) == config.clip_norm  # |coordinate| <= ||update|| <= C
    noisy = config_for(population, tmp_path, **{"dp-noise-multiplier": 1.0, "dp-noise-placement": "distributed"})
    assert quantization_range(noisy, 100) == pytest.approx(0.5 * (1 + 8 * 1.0 / 10))
    for cohort in (2, 1000, 5000, 100_000):
        assert (cohort + 1) * quantization_levels(cohort) < 2**32
    assert quantization_levels(10) == 2**22
    assert required_contributors(config, 10) == 7 and required_contributors(config, 100) == 70


def test_secagg_with_dp_on_the_simulation_engine_survives_a_device_dropping_out_mid_round(tmp_path, synthetic_population):
    n = 8
    population = synthetic_population(tmp_path, n, n_items=200, mean_events=15, seed=4)
    users = [load_history(str(population), i).user for i in range(n)]
    base = {"history-dir": str(population), "num-server-rounds": 2, "evaluate-every": 2, "dim": 8, "local-epochs": 1,
            "clip-norm": 0.5, "secagg": True, "secagg-min-cohort": 5, "dp-noise-multiplier": 1.0, "dropout": 0.15}
    # A seed with which exactly one device leaves round 1 (after sharing its keys) and at most one round 2.
    seed = next(s for s in range(200) if [sum(drops_out(FederatedConfig.from_run_config({**base, "seed": s}), u, r) for u in users) for r in (1, 2)] in ([1, 0], [1, 1]))
    config = FederatedConfig.from_run_config({**base, "seed": seed, "results-dir": str(tmp_path / "out")})
    result = run_flower_simulation(config, n_devices=n)
    first = result["rounds"][0]
    assert first["dropped"] == 1 and first["replies"] == n - 1 and not first["secagg-skipped"]
    assert result["rounds"][1]["secagg-skipped"] is False
    assert 0 < result["privacy"]["epsilon"] and 0.0 <= result["rounds"][1]["val-hr"] <= 1.0


@pytest.mark.filterwarnings("ignore:reproducible-noise=true")
def test_without_secure_aggregation_a_round_also_goes_on_without_the_devices_that_dropped(population, tmp_path):
    # Flower's DP wrappers skip a round with any failed reply; fedpref leaves the failures out
    # and accounts the round with the devices that answered. (The seed's cohorts: the same dropouts every time.)
    result, _ = run(population, tmp_path, secagg=False, dropout=0.3, **{"num-server-rounds": 3, "dp-noise-multiplier": 1.0,
                                                                        "reproducible-noise": True})
    rows = result["rounds"]
    assert any(row.get("dropped", 0) > 0 for row in rows)
    ledger = PrivacyLedger(DpMechanism(1.0, N_DEVICES, 10), result["privacy"]["delta"])
    for row in rows:
        assert row["replies"] + row.get("dropped", 0) == 10
        assert row["epsilon"] == pytest.approx(ledger.record_round(row["replies"]))


def test_keys_are_shared_in_sparse_neighbourhoods_of_about_twice_log2_of_the_cohort(population, tmp_path):
    config = config_for(population, tmp_path)
    assert [shares_per_device(config, m) for m in (5, 10, 67, 150, 10_000)] == [5, 9, 15, 17, 29]
    assert shares_per_device(config_for(population, tmp_path, **{"secagg-num-shares": 5}), 100) == 5
    with pytest.raises(RunConfigError, match="secagg-num-shares"):
        config_for(population, tmp_path, **{"secagg-num-shares": 2})


def test_in_a_secure_run_a_device_refuses_to_send_an_update_in_the_clear(population, tmp_path):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedpref.simulations.engines.device import app as client_app

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    config = config_for(population, tmp_path)
    model = config.model_spec.build(1, 150, seed=0)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in model.get_shared().items()}), "config": ConfigRecord({"server-round": 1})})
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config=config.to_run_config())
    with pytest.raises(PermissionError, match="secure aggregation"):
        client_app(Message(content, dst_node_id=5, message_type=MessageType.TRAIN), context)


# -- a hostile device under secure aggregation ----------------------------------------------


def one_hostile_device(key, tamper):
    """fedpref's ClientApp, except that the first device to put ``key`` in a SecAgg+ reply
    (once in the run) sends ``tamper(value)`` in its place: what a device running its own code
    can send. ``app.hostile`` holds that device's node id."""
    from fedpref.simulations.engines.device import app as client_app

    hostile = []

    def app(msg, context):
        reply = client_app(msg, context)
        if not hostile and not reply.has_error():
            record = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if record is not None and key in record:
                record[key] = tamper(record[key])
                hostile.append(context.node_id)
        return reply

    app.hostile = hostile
    return app


def run_with(population, tmp_path, client_app, **overrides):
    config = config_for(population, tmp_path, **{"num-server-rounds": 1, "evaluate-every": 1, **overrides})
    return run_inprocess(config, n_devices=N_DEVICES, grid=InProcessGrid(client_app, N_DEVICES, config.to_run_config())), config


def shifted(offsets):
    """Masked arrays with ``offsets[i]`` added to array i (modulo 2**32, so still in SecAgg+'s field)."""
    return lambda vectors: [ndarray_to_bytes((bytes_to_ndarray(b) + offset) % 2**32) for b, offset in zip(vectors, offsets, strict=True)]


def zeroed_shares(shares):
    """Shares laid out as Shamir's are (4-byte index, 16-byte blocks) whose blocks are all zero."""
    return [share[:4] + bytes(len(share) - 4) for share in shares]


@pytest.mark.parametrize(
    "key, tamper, replies, dropped, skipped",
    [
        # setup: a public key that is no key (its neighbours could not share keys with it)
        (Key.PUBLIC_KEY_1, lambda key: b"not a key", 9, 1, False),
        # share keys: one ciphertext fewer than destinations
        (Key.DESTINATION_LIST, lambda destinations: destinations[:-1], 9, 1, False),
        # collect masked vectors: one masked vector of 3 entries instead of the weight and 2 arrays
        (Key.MASKED_PARAMETERS, lambda vectors: [ndarray_to_bytes(np.zeros(3, dtype=np.int64))], 9, 1, False),
        # unmask: one share fewer than neighbours (its masked vector is in the sum: 10 replies)
        (Key.SHARE_LIST, lambda shares: shares[:-1], 10, 0, False),
        # unmask: shares said to be of devices that are not its neighbours
        (Key.NODE_ID_LIST, lambda owners: [owner + 12345 for owner in owners], 10, 0, False),
        # unmask: well-formed shares of nothing (no check can tell): the round is lost, not the run
        (Key.SHARE_LIST, zeroed_shares, None, 0, True),
    ],
    ids=["setup-bad-key", "share-keys-short", "masked-vector-short", "unmask-short", "unmask-strangers", "unmask-wrong-shares"],
)
def test_a_hostile_reply_at_any_stage_of_secagg_never_stops_the_run(population, tmp_path, caplog, key, tamper, replies, dropped, skipped):
    # Prepare: one device of the cohort of 10 sends a hostile reply at one stage of round 1.
    app = one_hostile_device(key, tamper)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedpref.secagg"):
        result, _ = run_with(population, tmp_path, app)

    # Assert: the run completed; the device counted as dropped where its reply was refused
    # before its update was summed, and the round went on (or, with shares no check can tell
    # from good ones, was skipped with a log line).
    assert app.hostile, "the attack did not happen"
    row = result["rounds"][0]
    assert row.get("replies") == replies and row["dropped"] == dropped and row["secagg-skipped"] is skipped
    assert result["secure-aggregation"]["replies-refused"] == (0 if skipped else 1)
    if skipped:
        assert "secure aggregation failed" in caplog.text
    else:
        assert f"the reply of node {app.hostile[0]} is refused and counts as a dropout" in caplog.text
    final = np.load(tmp_path / "final_model.npz")
    assert all(np.isfinite(final[name]).all() for name in final)


@pytest.mark.parametrize("attack", ["2**30 on every entry", "an L2 move of 2C", "2**30 with distributed noise"])
def test_a_device_shifting_its_masked_vector_has_the_sum_refused_and_cannot_move_the_model(population, tmp_path, caplog, attack):
    # Prepare: one device adds a constant to its masked vector (modulo 2**32: still in the
    # field, so nothing tells it from an honest one). Its entries are quantised updates:
    # 2**22 levels over [-C, C] (a step of 2C / 2**22), the weight first.
    overrides = {"dp-noise-multiplier": 1.0, "dp-noise-placement": "distributed"} if "noise" in attack else {}
    config = config_for(population, tmp_path, **overrides)
    initial = config.model_spec.build(1, 150, seed=config.seed).get_shared()
    cohort, levels = 10, 2**22
    if attack.startswith("2**30"):
        offsets = [2**30] * 3  # the weight and both arrays
    else:
        # s steps on every coordinate move the sum by s 2C / 2**22 each, the average of 10
        # by a tenth of that: an L2 move of 2C over d coordinates needs s = 2**22 * 10 / sqrt(d).
        d = sum(a.size for a in initial.values())
        offsets = [0] + [round(levels * cohort / np.sqrt(d))] * 2
    app = one_hostile_device(Key.MASKED_PARAMETERS, shifted(offsets))

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedpref.secagg"):
        result, config = run_with(population, tmp_path, app, **overrides)

    # Assert: the round's sum is refused (skipped, logged, counted) and the model is the one
    # the round started from. (Before the check, the 2**30 shift moved the item embeddings
    # by 33 in L2 norm, where the average of 10 updates of norm at most C = 0.5 moves them at most 0.5.)
    assert app.hostile, "the attack did not happen"
    row = result["rounds"][0]
    assert row["secagg-skipped"] is True and row["dropped"] == 0
    assert result["secure-aggregation"]["sums-refused"] == 1
    assert "masked vectors is refused" in caplog.text
    final = np.load(tmp_path / "final_model.npz")
    moved = np.sqrt(sum(np.sum((final[name].astype(np.float64) - initial[name]) ** 2) for name in initial))
    assert moved == 0.0, f"the model moved {moved:.3f}"


def test_the_limit_on_a_sum_is_the_bound_plus_rounding_plus_a_bound_on_the_noise_that_honest_noise_stays_below(population, tmp_path):
    # Prepare: a cohort of 10 with distributed noise z = 1, C = 0.5, d = 1350 coordinates.
    config = config_for(population, tmp_path, **{"dp-noise-multiplier": 1.0, "dp-noise-placement": "distributed"})
    m, d, C = 10, 1350, 0.5
    R = quantization_range(config, m)
    std = device_noise_std(config, m)

    # Execute
    limits = sum_limit(config, contributors=m, dims=d, bound=C, coordinate=R, levels=2**22, device_std=std)

    # Assert: the arithmetic; and 2000 honest averages (an update of norm C plus the noise of
    # 10 shares of N(0, (zC)^2 / 10) averaged: std zC / 10 per coordinate) are all accepted.
    assert std == pytest.approx(1.0 * C / np.sqrt(m))
    noise_bound = (C / 10) * (np.sqrt(d) + np.sqrt(2 * np.log(1e9)))
    assert limits.norm == pytest.approx(C * (1 + 1e-5) + np.sqrt(d) * 2 * R / 2**22 + noise_bound)
    rng = np.random.default_rng(0)
    update = rng.normal(size=d)
    update *= C / np.linalg.norm(update)
    averages = update + rng.normal(0.0, C / 10, size=(2000, d))
    assert all(check_average({"x": a}, limits) is None for a in averages)
    assert check_average({"x": update * 2.0}, sum_limit(config_for(population, tmp_path), contributors=m, dims=d, bound=C,
                                                         coordinate=C, levels=2**22, device_std=0.0)) is not None
