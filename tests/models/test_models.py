"""The model contract and the one local-update function."""

import numpy as np
import pytest
import torch

from fedpref.models.contract import ContractError, PreferenceModel, shared_norm
from fedpref.models.preference import ModelSpec
from fedpref.models import train as train_module
from fedpref.models.train import LocalData, TrainConfig, init_params, local_update, sample_negatives


@pytest.mark.parametrize("kind", ["mf", "neumf"])
def test_every_parameter_is_declared_shared_or_private_and_user_rows_are_private(kind):
    model = ModelSpec(kind=kind, dim=8, mlp_layers=(16, 8)).build(n_users=3, n_items=20)
    names = {n for n, _ in model.named_parameters()}
    assert set(model.shared_names) | set(model.private_names) == names
    assert not set(model.shared_names) & set(model.private_names)
    # Anything with one row per user is private.
    for name, p in model.named_parameters():
        if p.shape[0] == 3:
            assert name in model.private_names


def test_an_undeclared_parameter_breaks_the_contract():
    class Leaky(PreferenceModel):
        kind = "leaky"
        shared_names = ("a",)
        private_names = ()

        def __init__(self):
            super().__init__(1, 2)
            self.a = torch.nn.Parameter(torch.zeros(1))
            self.b = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(ContractError, match=r"\['b'\] are declared neither"):
        Leaky().check_contract()


def test_set_shared_refuses_wrong_names_and_shapes():
    model = ModelSpec(dim=4).build(1, 10)
    shared = model.get_shared()
    with pytest.raises(ContractError, match="expected shared arrays"):
        model.set_shared({"item_embedding.weight": shared["item_embedding.weight"]})
    bad = dict(shared, **{"item_bias.weight": np.zeros((11, 1), np.float32)})
    with pytest.raises(ContractError, match="has shape"):
        model.set_shared(bad)


@pytest.mark.parametrize("optimizer", ["adam", "lazy-adam", "sgd"])
@pytest.mark.parametrize("kind", ["mf", "neumf"])
def test_device_update_changes_only_rows_of_items_it_touched(kind, optimizer):
    n_items = 50
    spec = ModelSpec(kind=kind, dim=8, mlp_layers=(16, 8))
    shared, private = init_params(spec, 1, n_items, seed=0)
    data = LocalData.for_device(np.array([1, 2, 3]), n_items)
    cfg = TrainConfig(model=spec, num_negatives=2, epochs=1, batch_size=8, lr=0.01, optimizer=optimizer)
    update, new_private, metrics = local_update(shared, private, data, cfg, np.random.default_rng(0))
    assert set(update) == set(shared) and set(new_private) == set(private)
    assert metrics["num_examples"] == 3.0 and np.isfinite(metrics["loss"])
    emb = "item_embedding.weight" if kind == "mf" else "item_gmf.weight"
    touched_rows = np.flatnonzero(np.abs(update[emb]).sum(axis=1))
    # 3 positives + at most 3 * 2 negatives: never the whole catalogue.
    assert set([1, 2, 3]) <= set(touched_rows.tolist())
    assert len(touched_rows) <= 3 + 6
    assert not np.allclose(new_private[next(iter(private))], private[next(iter(private))])


@pytest.mark.parametrize("kind", ["mf", "neumf"])
def test_lazy_adam_takes_adams_first_step_and_then_leaves_untouched_rows_alone(kind):
    n_items = 60
    spec = ModelSpec(kind=kind, dim=8, mlp_layers=(16, 8))
    shared, private = init_params(spec, 1, n_items, seed=0)
    data = LocalData.for_device(np.arange(12), n_items)
    one_step = dict(model=spec, num_negatives=3, epochs=1, batch_size=64, lr=0.01)
    dense = local_update(shared, private, data, TrainConfig(**one_step), np.random.default_rng(3))
    lazy = local_update(shared, private, data, TrainConfig(**one_step, optimizer="lazy-adam"), np.random.default_rng(3))
    for k in shared:  # one batch: Adam's first step moves only rows with a gradient, by about lr each
        # (SparseAdam adds eps before the bias correction, so coordinates with tiny gradients differ)
        np.testing.assert_array_equal(lazy[0][k] != 0, dense[0][k] != 0)
        big = np.abs(dense[0][k]) > 0.005
        np.testing.assert_array_equal(np.sign(lazy[0][k][big]), np.sign(dense[0][k][big]))
    # Many small batches: dense Adam keeps moving a row on its momentum after the batch that
    # touched it; lazy Adam moves a row only in the batches that touch it.
    many = dict(one_step, batch_size=1, epochs=2)
    dense = local_update(shared, private, data, TrainConfig(**many), np.random.default_rng(3))
    lazy = local_update(shared, private, data, TrainConfig(**many, optimizer="lazy-adam"), np.random.default_rng(3))
    emb = "item_embedding.weight" if kind == "mf" else "item_gmf.weight"
    assert not np.allclose(lazy[0][emb], dense[0][emb])
    assert (np.abs(lazy[0][emb]).sum(axis=1) > 0).sum() == (np.abs(dense[0][emb]).sum(axis=1) > 0).sum()


@pytest.mark.parametrize("kind", ["mf", "neumf"])
def test_sgd_with_sparse_gradients_takes_the_steps_of_dense_sgd(kind, monkeypatch):
    spec = ModelSpec(kind=kind, dim=8, mlp_layers=(16, 8))
    shared, private = init_params(spec, 1, 60, seed=0)
    data = LocalData.for_device(np.arange(12), 60)
    cfg = TrainConfig(model=spec, num_negatives=3, epochs=2, batch_size=4, lr=0.5, optimizer="sgd")
    sparse = local_update(shared, private, data, cfg, np.random.default_rng(3))
    monkeypatch.setattr(train_module, "_make_sparse", lambda model, wanted: [])
    dense = local_update(shared, private, data, cfg, np.random.default_rng(3))
    for k in shared:
        np.testing.assert_allclose(sparse[0][k], dense[0][k], atol=1e-6)
    for k in private:
        np.testing.assert_allclose(sparse[1][k], dense[1][k], atol=1e-6)


def test_frozen_shared_gives_a_zero_update_and_a_new_private_vector():
    spec = ModelSpec(dim=8)
    shared, private = init_params(spec, 1, 30, seed=0)
    data = LocalData.for_device(np.arange(10), 30)
    cfg = TrainConfig(model=spec, freeze_shared=True, epochs=3)
    update, new_private, _ = local_update(shared, private, data, cfg, np.random.default_rng(0))
    assert shared_norm(update) == 0.0
    assert not np.allclose(new_private["user_embedding.weight"], private["user_embedding.weight"])


def test_same_rng_seed_gives_the_same_update():
    spec = ModelSpec(dim=8)
    shared, private = init_params(spec, 2, 40, seed=1)
    data = LocalData(np.array([0, 0, 1, 1]), np.array([3, 4, 5, 6]), 40)
    cfg = TrainConfig(model=spec, epochs=2)
    a = local_update(shared, private, data, cfg, np.random.default_rng(7))
    b = local_update(shared, private, data, cfg, np.random.default_rng(7))
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k])


@pytest.mark.parametrize("optimizer, lr", [("adam", 0.05), ("lazy-adam", 0.05), ("sgd", 2.0)])
def test_training_learns_a_preference(optimizer, lr):
    # Users 0-9 like items 0-9, users 10-19 like items 10-19; after training each user
    # must score unseen items of their own group above the other group's.
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(20):
        group = range(0, 10) if u < 10 else range(10, 20)
        liked = rng.choice(list(group), size=6, replace=False)
        users += [u] * 6
        items += liked.tolist()
    spec = ModelSpec(dim=8)
    shared, private = init_params(spec, 20, 20, seed=0)
    data = LocalData(np.array(users), np.array(items), 20)
    cfg = TrainConfig(model=spec, epochs=60, lr=lr, num_negatives=4, batch_size=32, optimizer=optimizer)
    update, private, _ = local_update(shared, private, data, cfg, rng)
    shared = {k: shared[k] + update[k] for k in shared}
    model = spec.build(20, 20)
    model.set_shared(shared)
    model.set_private(private)
    scores = model.score_all(torch.arange(20)).numpy()
    own = np.r_[scores[:10, :10].mean(), scores[10:, 10:].mean()]
    other = np.r_[scores[:10, 10:].mean(), scores[10:, :10].mean()]
    assert (own > other + 0.5).all()


def test_negatives_avoid_the_users_positives():
    data = LocalData(np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0]), 5)
    negs = sample_negatives(data, np.array([0] * 200), 3, np.random.default_rng(0))
    assert set(np.unique(negs).tolist()) <= {3, 4}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss": "hinge"}, "unknown loss"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"num_negatives": 0}, "num_negatives must be a positive"),
        ({"optimizer": "adagrad"}, "unknown optimizer"),
        ({"optimizer": "lazy-adam", "loss": "full-softmax"}, "lazy-adam needs sparse gradients"),
    ],
)
def test_bad_training_config_is_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_bad_model_spec_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        ModelSpec(kind="transformer")
