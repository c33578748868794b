"""The DP popularity histogram for cold start: each device's capped indicator vector through
secure aggregation, Gaussian noise of the stated size, epsilon accounted alone and composed with
DP training, published with the model, and good enough to recommend from."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpref.simulations.engines.history import load_history
from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.server.analytics import popularity_mechanism
from fedpref.server.privacy import DpMechanism
from fedpref.simulations.cli import app
from fedpref.simulations.engines.inprocess import run_inprocess

N_DEVICES = 20


@pytest.fixture(scope="module")
def population(tmp_path_factory, synthetic_population):
    return synthetic_population(tmp_path_factory.mktemp("pop"), N_DEVICES, n_items=150, mean_events=20, seed=2)


def run(population, tmp_path, **overrides):
    base = {"history-dir": str(population), "num-server-rounds": 1, "evaluate-every": 1, "dim": 8, "local-epochs": 1,
            "fraction-train": 0.5, "clip-norm": 0.5, "secagg": True, "secagg-min-cohort": 5, "popularity-histogram": True,
            "results-dir": str(tmp_path)}
    base.update(overrides)
    result = run_inprocess(FederatedConfig.from_run_config(base), n_devices=N_DEVICES)
    published = json.loads((tmp_path / "popularity.json").read_text())
    return result, np.array(published["counts"])


def true_counts(population):
    counts = np.zeros(150)
    for device in range(N_DEVICES):
        items = load_history(str(population), device).train_items
        counts[items] += 1
    return counts


def test_with_negligible_noise_the_histogram_is_each_items_count_over_the_devices(population, tmp_path):
    result, counts = run(population, tmp_path, **{"popularity-noise-multiplier": 1e-6, "popularity-max-items": 1000})
    assert np.abs(counts - true_counts(population)).max() < 0.01
    assert result["popularity"]["devices"] == N_DEVICES


def test_a_device_counts_at_most_max_items_of_its_items(population, tmp_path):
    _, counts = run(population, tmp_path, **{"popularity-noise-multiplier": 1e-6, "popularity-max-items": 5})
    lengths = [len(load_history(str(population), d).train_items) for d in range(N_DEVICES)]
    assert max(lengths) > 5
    assert counts.sum() == pytest.approx(sum(min(n, 5) for n in lengths), abs=0.1)


@pytest.mark.parametrize("placement", ["central", "distributed"])
def test_the_counts_carry_noise_of_z_times_the_square_root_of_max_items(population, tmp_path, placement):
    overrides = {"popularity-noise-multiplier": 2.0, "popularity-max-items": 1000, "dp-noise-placement": placement}
    if placement == "distributed":
        overrides["dp-noise-multiplier"] = 1.0  # distributed noise is a DP-training setting
    _, counts = run(population, tmp_path, **overrides)
    noise = counts - true_counts(population)
    assert noise.std() == pytest.approx(2.0 * np.sqrt(1000), rel=0.3)  # 150 items: the estimate's own spread is 6%


def test_epsilon_is_accounted_alone_and_composed_with_dp_training(population, tmp_path):
    result, _ = run(population, tmp_path, **{"dp-noise-multiplier": 1.0, "popularity-noise-multiplier": 3.0})
    config = FederatedConfig.from_run_config({"history-dir": str(population), "fraction-train": 0.5, "popularity-histogram": True,
                                              "secagg": True, "popularity-noise-multiplier": 3.0})
    histogram = popularity_mechanism(config, N_DEVICES)
    delta = result["popularity"]["delta"]
    assert histogram.cohort == N_DEVICES
    assert result["popularity"]["epsilon"] == pytest.approx(histogram.epsilon(1, delta))
    training = DpMechanism(1.0, N_DEVICES, 10)
    assert result["rounds"][0]["epsilon"] == pytest.approx(training.epsilon(1, delta, prior=(histogram,)))
    assert result["privacy"]["includes-popularity-histogram"] is True
    assert result["rounds"][0]["epsilon"] > max(training.epsilon(1, delta), result["popularity"]["epsilon"])


def test_the_histogram_needs_secure_aggregation():
    with pytest.raises(RunConfigError, match="secagg=true"):
        FederatedConfig.from_run_config({"popularity-histogram": True})


def test_simulate_publishes_the_histogram_and_scores_it_as_a_cold_start_recommender(tmp_path):
    out = tmp_path / "sim"
    result = CliRunner().invoke(
        app,
        ["simulate", "--dataset", "synthetic:60x300", "--rounds", "1", "--dim", "8", "--engine", "inprocess", "--secagg",
         "--references", "none", "--out", str(out), "--no-progress",
         "--run-config", "secagg-min-cohort=5 popularity-histogram=true popularity-noise-multiplier=0.1"],
    )
    assert result.exit_code == 0, result.output
    rounds = json.loads((out / "rounds.json").read_text())
    p = rounds["popularity"]
    assert (out / "popularity.json").exists() and p["devices"] == 60
    # A lightly noised histogram (noise of standard deviation 0.1 * sqrt(128) = 1.1 on every count,
    # drawn afresh each run) recommends about as well as the true popularity.
    assert p["cold-start-test-hr"] == pytest.approx(p["true-popularity-test-hr"], abs=0.1)
    assert "DP popularity histogram" in result.output


def test_a_device_without_history_recommends_the_published_top_items(population, tmp_path):
    from fedpref.client.cold_start import PopularityFileError, load_popularity, popular_items

    run(population, tmp_path, **{"popularity-noise-multiplier": 1e-6, "popularity-max-items": 1000})
    counts = load_popularity(tmp_path / "popularity.json")
    truth = true_counts(population)
    top = popular_items(counts, 10)
    assert len(top) == 10 and truth[top].min() >= np.sort(truth)[-10] - 1e-9  # the truly most popular (ties aside)
    assert not set(popular_items(counts, 10, seen=top[:3])) & set(top[:3])
    with pytest.raises(PopularityFileError, match="popularity-histogram=true"):
        load_popularity(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"counts": [1, "x"]}')
    with pytest.raises(PopularityFileError, match="not a popularity histogram"):
        load_popularity(tmp_path / "bad.json")


@pytest.mark.parametrize("reproducible", [False, True])
def test_nobody_who_knows_the_seed_can_remove_the_noise_from_the_published_histogram(population, tmp_path, reproducible):
    # Prepare: the histogram with central noise and the default settings (seed 0); every item
    # a device holds is counted, so the true counts are known to the test.
    from fedpref.server.privacy import NoiseSource, ReproducibleNoiseWarning

    z, max_items, seed = 1.0, 1000, 0
    overrides = {"popularity-noise-multiplier": z, "popularity-max-items": max_items, "seed": seed, "reproducible-noise": reproducible}
    if reproducible:
        with pytest.warns(ReproducibleNoiseWarning):
            result, published = run(population, tmp_path, **overrides)
    else:
        result, published = run(population, tmp_path, **overrides)

    # Execute: the attacker regenerates the noise from the seed, from each generator the server
    # could have drawn it from: fedpref's reproducible stream, and NumPy's global one seeded with
    # it, after any number of draws (in this one process the simulated devices' secure
    # aggregation draws its stochastic rounding from it first; on a real server nothing does).
    std = z * np.sqrt(max_items)
    guesses = [NoiseSource(seed).normal(0.0, std, size=published.shape)]
    np.random.seed(seed)
    for _ in range(N_DEVICES * (len(published) + 50)):
        state = np.random.get_state()
        guesses.append(np.random.normal(0.0, std, size=published.shape))
        np.random.set_state(state)
        np.random.rand()
    truth = true_counts(population)
    residual = min(float(np.abs(published - guess - truth).max()) for guess in guesses)

    # Assert: recovered (to the secure sum's quantisation and the file's rounding) only when
    # the run asked for reproducible noise; otherwise the whole noise of std 31.6 remains.
    assert (residual < 0.05) == reproducible, residual
    assert result["popularity"]["noise-source"] == ("run-seed" if reproducible else "os-entropy")


@pytest.mark.parametrize("attack", ["one item counted 25 times by 20 devices", "150 more ones than 20 devices hold", "2**30 on every entry"])
def test_a_device_counting_what_the_cohort_cannot_hold_has_the_histogram_refused(population, tmp_path, caplog, attack):
    # Prepare: the histogram over all 20 devices, at most 5 items each (a sum of at most 100
    # ones, at most 20 on any item), with negligible noise. One device adds to its masked
    # vector (modulo 2**32: still in SecAgg+'s field, so nothing tells it from an honest one).
    # Its entries are quantised: 2**22 levels over [-sqrt(5), sqrt(5)], a step of 2 sqrt(5) / 2**22,
    # so adding c to a count takes c / step steps.
    import logging

    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from fedpref.simulations.engines.device import app as client_app
    from fedpref.simulations.engines.inprocess import InProcessGrid

    n, max_items, step = N_DEVICES, 5, 2 * np.sqrt(5) / 2**22
    offset = np.zeros(150, dtype=np.int64)
    if attack.startswith("one item"):
        offset[7] = round((n + 5) / step)  # its count alone beyond the 20 devices that could hold it
    elif attack.startswith("150"):
        offset[:] = round(1 / step)  # one more on every item: 100 + 150 ones in all, no item beyond 20
    else:
        offset[:] = 2**30
    hostile = []

    def app(msg, context):
        reply = client_app(msg, context)
        record = None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if not hostile and record is not None and Key.MASKED_PARAMETERS in record:  # the histogram runs first
            weight, counts = (bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS])
            weight = weight + (2**30 if attack.startswith("2**30") else 0)
            record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(weight % 2**32), ndarray_to_bytes((counts + offset) % 2**32)]
            hostile.append(context.node_id)
        return reply

    config = FederatedConfig.from_run_config({
        "history-dir": str(population), "num-server-rounds": 1, "evaluate-every": 1, "dim": 8, "local-epochs": 1,
        "fraction-train": 0.5, "clip-norm": 0.5, "secagg": True, "secagg-min-cohort": 5, "popularity-histogram": True,
        "popularity-noise-multiplier": 1e-6, "popularity-max-items": max_items, "results-dir": str(tmp_path)})

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedpref.secagg"):
        result = run_inprocess(config, n_devices=n, grid=InProcessGrid(app, n, config.to_run_config()))

    # Assert: the histogram's sum was refused, with a log line, and nothing was published;
    # training went on.
    assert hostile, "the attack did not happen"
    assert "popularity" not in result and not (tmp_path / "popularity.json").exists()
    assert "the popularity histogram skipped" in caplog.text and "is refused" in caplog.text
    assert result["rounds"][0]["replies"] == 10
