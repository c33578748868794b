"""Helpers shared by the test folders."""

import warnings
from pathlib import Path

import pytest

from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
from fedpref.simulations.population import write_population
from fedpref.simulations.split import leave_one_out


def _synthetic_population(folder: Path, n_users: int, n_items: int, mean_events: int, seed: int) -> Path:
    """A synthetic population, split leave-one-out, written as the device histories a
    simulation reads (``folder``/population); returns that folder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small populations warn about sparse users
        interactions = generate_synthetic(SyntheticConfig(n_users=n_users, n_items=n_items, mean_events=mean_events, seed=seed)).interactions
        split = leave_one_out(interactions, seed=0)
    return write_population(split, folder / "population")


@pytest.fixture(scope="session")
def synthetic_population():
    """``synthetic_population(folder, n_users, n_items, mean_events, seed) -> folder``."""
    return _synthetic_population
