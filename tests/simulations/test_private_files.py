"""A simulation's files that hold people's data are their owner's only, whatever the umask:
a population folder (every person's history), device stores written for it, and the fast
engine's folder of private vectors."""

import os
import stat

import numpy as np
import pytest

from fedpref.models.config import FederatedConfig
from fedpref.simulations.engines.fast import PrivateVectors
from fedpref.simulations.data.population import write_device_stores


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def open_umask():
    """A umask that lets everyone read and write what is created (restored afterwards)."""
    old = os.umask(0)
    yield
    os.umask(old)


def open_to_others(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): oct(mode(p)) for p in [folder, *folder.rglob("*")] if mode(p) & 0o077}


def test_a_population_folder_is_its_owners_only(tmp_path, synthetic_population, open_umask):
    population = synthetic_population(tmp_path, 12, 200, 12, 1)
    assert open_to_others(population) == {}
    assert mode(population) == 0o700 and mode(population / "train_items.npy") == 0o600


def test_rewriting_a_population_that_others_could_read_makes_it_owner_only(tmp_path, synthetic_population):
    population = synthetic_population(tmp_path, 12, 200, 12, 1)
    for path in population.iterdir():
        path.chmod(0o644)
    again = synthetic_population(tmp_path, 12, 200, 12, 2)  # the same folder, written over
    assert again == population
    assert {p.name: oct(mode(p)) for p in population.iterdir() if mode(p) & 0o077} == {}


def test_device_stores_written_for_a_simulation_are_their_owners_only(tmp_path, synthetic_population, open_umask):
    population = synthetic_population(tmp_path, 6, 200, 12, 1)
    stores = tmp_path / "stores"
    write_device_stores(population, stores, devices=range(3), progress=False)
    assert sorted(p.name for p in stores.glob("*.sqlite")) == ["device-0.sqlite", "device-1.sqlite", "device-2.sqlite"]
    assert open_to_others(stores) == {}


def test_the_fast_engines_private_vectors_are_their_owners_only(tmp_path, open_umask):
    folder = tmp_path / "private"
    vectors = PrivateVectors(FederatedConfig.from_run_config({"dim": 8}), 5, str(folder))
    vectors.get(np.arange(5))
    vectors.values.flush()
    assert open_to_others(folder) == {}
    assert mode(folder / "private.npy") == 0o600
