"""The run config: defaults in pyproject equal the code's, unknown keys are an error."""

import tomllib
from pathlib import Path

import pytest

from fedpref.models.config import RUN_CONFIG_DEFAULTS, FederatedConfig, RunConfigError, cosine_factor

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_defaults_are_the_code_defaults():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["config"] == RUN_CONFIG_DEFAULTS
    assert flwr["components"] == {"serverapp": "fedpref.server.app:app", "clientapp": "fedpref.simulations.engines.device:app"}


def test_unknown_keys_are_an_error_that_lists_the_known_ones():
    with pytest.raises(RunConfigError, match=r"unknown run-config key\(s\) \['clip-nrom'\].*clip-norm"):
        FederatedConfig.from_run_config({"clip-nrom": 0.5})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"clip-norm": 0}, "clipping bound must be positive"),
        ({"strategy": "fedprox"}, "unknown 'fedprox'"),
        ({"fraction-train": 1.5}, r"must lie in \(0, 1\]"),
        ({"num-server-rounds": "many"}, "must be a int"),
        ({"loss": "full-softmax"}, "every item row"),
        ({"optimizer": "adagrad"}, "unknown optimizer"),
        ({"private-epochs": -1}, "must be 0 or more"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(RunConfigError, match=message):
        FederatedConfig.from_run_config(override)


def test_round_trip():
    config = FederatedConfig.from_run_config({"clip-norm": 0.5, "strategy": "fedadam"})
    assert FederatedConfig.from_run_config(config.to_run_config()) == config


def test_the_cosine_schedule_runs_from_one_to_its_end():
    factors = [cosine_factor(r, 5, 0.1) for r in range(1, 6)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert [cosine_factor(r, 5, 1.0) for r in range(1, 6)] == [1.0] * 5
    config = FederatedConfig.from_run_config({"lr": 0.01, "lr-end": 0.1, "num-server-rounds": 5})
    assert config.train_config(1).lr == 0.01 and config.train_config(5).lr == pytest.approx(0.001)
    assert config.train_config().lr == 0.01


@pytest.mark.parametrize("key", ["lr-end", "server-lr-end"])
@pytest.mark.parametrize("value", [0.0, 1.5])
def test_a_schedule_end_outside_0_1_is_refused(key, value):
    with pytest.raises(RunConfigError, match=rf"'{key}'.*must lie in \(0, 1\]"):
        FederatedConfig.from_run_config({key: value})


def test_a_run_config_is_parsed_once_into_a_frozen_config():
    import dataclasses

    run_config = {"clip-norm": 0.5, "secagg": False, "run-name": "a"}
    config = FederatedConfig.from_run_config(run_config)
    assert FederatedConfig.from_run_config(dict(reversed(run_config.items()))) is config  # a message's handlers share one parse
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clip_norm = 100.0  # type: ignore[misc]
    assert FederatedConfig.from_run_config(run_config).clip_norm == 0.5
    # Equal values of other types read differently as text: they are not mistaken for each other.
    assert FederatedConfig.from_run_config({"run-name": 1}).run_name == "1"
    assert FederatedConfig.from_run_config({"run-name": 1.0}).run_name == "1.0"
    # A value that cannot be a cache key is still parsed, and refused as before.
    with pytest.raises(RunConfigError, match="must be a float"):
        FederatedConfig.from_run_config({"clip-norm": [1.0]})


def test_each_key_is_declared_once_with_its_type_default_and_help():
    import dataclasses

    from fedpref.models.config import RUN_CONFIG_HELP, RUN_CONFIG_TYPES

    fields = dataclasses.fields(FederatedConfig)
    assert [f.name.replace("_", "-") for f in fields] == list(RUN_CONFIG_DEFAULTS) == list(RUN_CONFIG_HELP) == list(RUN_CONFIG_TYPES)
    for key, default in RUN_CONFIG_DEFAULTS.items():
        assert type(default) is RUN_CONFIG_TYPES[key], key
        assert RUN_CONFIG_HELP[key].strip(), key
    assert FederatedConfig.from_run_config({}).to_run_config() == RUN_CONFIG_DEFAULTS
