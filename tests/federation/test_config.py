"""The run config: defaults in pyproject equal the code's, unknown keys are an error."""

import tomllib
from pathlib import Path

import pytest

from fedpref.models.federation import RUN_CONFIG_DEFAULTS, FederatedConfig, RunConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_defaults_are_the_code_defaults():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["config"] == RUN_CONFIG_DEFAULTS
    assert flwr["components"] == {"serverapp": "fedpref.server.app:app", "clientapp": "fedpref.client.app:app"}


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
