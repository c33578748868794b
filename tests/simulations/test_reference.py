"""Reference trainers learn: the ceiling beats popularity; epochs are chosen on validation."""

from dataclasses import replace

import pytest

from fedpref.models.train import default_config
from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
from fedpref.simulations.evaluate import evaluate, popularity_scorer
from fedpref.simulations.reference import train_centralised, train_local_only
from fedpref.simulations.data.split import leave_one_out


@pytest.fixture(scope="module")
def split():
    # The exact sampler and a low temperature: a population with a clear taste signal.
    population = generate_synthetic(
        SyntheticConfig(n_users=200, n_items=300, mean_events=30, temperature=0.5, sampler="exact", seed=1)
    )
    return leave_one_out(population.interactions, seed=0)


@pytest.fixture(scope="module")
def config():
    base = default_config("mf")
    return replace(base, model=replace(base.model, dim=16), lr=0.01)


@pytest.fixture(scope="module")
def central(split, config):
    return train_centralised(split, config, max_epochs=8, patience=3, show_progress=False)


def test_centralised_mf_beats_popularity_on_a_synthetic_population(split, central):
    result = central
    pop = evaluate(popularity_scorer(split), split, target="val")
    assert result.val.ndcg > pop.ndcg + 0.02
    # The chosen epoch is the best validation epoch of the history, and test is reported for it.
    best = max(result.history, key=lambda h: h["val_ndcg"])
    assert result.best_epoch == best["epoch"]
    assert result.val.ndcg == pytest.approx(best["val_ndcg"])
    assert 0.0 < result.test.hr <= 1.0


def test_early_stopping_stops_after_patience(split, config):
    result = train_centralised(split, replace(config, lr=0.2), max_epochs=30, patience=2, show_progress=False)
    assert len(result.history) <= result.best_epoch + 2


def test_local_only_learns_nothing_shared_and_stays_below_centralised(split, config, central):
    local = train_local_only(split, config, max_epochs=2, patience=1, show_progress=False)
    assert local.val.ndcg < central.val.ndcg
    # Shared parameters are the untouched initial values: item biases are still zero.
    assert (local.shared["item_bias.weight"] == 0).all()
