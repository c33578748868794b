"""The fitted generator: names, the mixture, the cache, streaming and the people it draws.

Every test uses a tiny source (a CSV of 150 synthetic people written here) and a tiny fit
(dim 8, a few epochs, at most 2 mixture components); the movielens-small calibration runs in
benchmarks/fitted_calibration.py, not here.
"""

import os
import stat
import warnings
from dataclasses import replace

import numpy as np
import pytest

from fedpref.simulations.data import fitted
from fedpref.simulations.data.fitted import (
    BLOCK_USERS,
    MIN_EVENTS,
    FitCacheWarning,
    FitConfig,
    FittedSpec,
    cache_path,
    fit_generator,
    fit_mixture,
    generate_fitted,
    iter_fitted,
    parse_fitted,
    select_mixture,
)
from fedpref.simulations.data.interactions import DataFormatError
from fedpref.simulations.data.registry import load_dataset, stream_dataset
from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic

TINY = FitConfig(dim=8, max_epochs=3, patience=2, mixture_sizes=(1, 2), restarts=2)


def write_source(path, seed=0, n_users=150, n_items=300):
    """A CSV of a small synthetic population, read back through the file loaders."""
    table = generate_synthetic(SyntheticConfig(n_users=n_users, n_items=n_items, mean_events=20, seed=seed)).interactions
    lines = ["user,item,timestamp"] + [f"{u},{i},{t}" for u, i, t in zip(table.user, table.item, table.timestamp)]
    path.write_text("\n".join(lines) + "\n")
    return table


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "tiny.csv"
    write_source(path)
    return path


@pytest.fixture(scope="module")
def fitted_cache(source, tmp_path_factory):
    """The one real fit of this file, and the cache folder it was written to."""
    cache = tmp_path_factory.mktemp("cache")
    return fit_generator(str(source), config=TINY, cache_dir=cache), cache


@pytest.fixture(scope="module")
def model(fitted_cache):
    return fitted_cache[0]


@pytest.fixture
def counted_fits(monkeypatch, model):
    """Counts the fits run (a cache hit runs none). The fit itself is replaced by the module's
    fitted model, relabelled with the source content and settings asked for, so that these
    tests exercise the cache and not the training."""
    calls = []

    def counting(source, table, sha, config, *, progress):
        calls.append(source)
        assert table.n_items == model.n_items
        return replace(model, source=source, source_sha256=sha, config=config)

    monkeypatch.setattr(fitted, "_fit", counting)
    return calls


def copy_source(source, tmp_path, change_a_time=False):
    """A copy of the module's source (optionally with one timestamp moved: other content,
    same people and items)."""
    lines = source.read_text().splitlines()
    if change_a_time:
        user, item, timestamp = lines[1].split(",")
        lines[1] = f"{user},{item},{int(timestamp) - 1}"
    path = tmp_path / "tiny.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def table_of(chunks):
    chunks = list(chunks)
    return tuple(np.concatenate([getattr(c, name) for c in chunks]) for name in ("user", "item", "timestamp", "requested", "user_vectors"))


# ------------------------------------------------------------------ names


def test_a_fitted_name_parses_with_the_last_number_as_the_size_so_paths_may_hold_colons():
    assert parse_fitted("fitted:movielens-small:1000000") == FittedSpec("movielens-small", 1_000_000, 0)
    assert parse_fitted("fitted:movielens-small:10:seed=4") == FittedSpec("movielens-small", 10, 4)
    assert parse_fitted("fitted:/data/a:b.csv:25", seed=2) == FittedSpec("/data/a:b.csv", 25, 2)
    assert parse_fitted("movielens-small") is None
    assert fitted.population_name("movielens-small", 1000, 0) == "fitted-movielens-small-1000"
    assert fitted.population_name("/data/My Ratings.csv", 1000, 3) == "fitted-my-ratings-1000-seed3"


@pytest.mark.parametrize(
    "name, words",
    [
        ("fitted:movielens-small:0", "at least one person"),
        ("fitted:fitted:movielens-small:10:100", "real data"),
        ("fitted:synthetic:100x50:100", "real data"),
    ],
)
def test_bad_fitted_names_are_refused_with_the_reason(name, words):
    with pytest.raises(DataFormatError, match=words):
        parse_fitted(name)
    with pytest.raises(DataFormatError, match=words):
        load_dataset(name)


def test_a_missing_source_file_is_named_in_the_error(tmp_path):
    missing = tmp_path / "nowhere.csv"
    with pytest.raises(DataFormatError, match="nowhere.csv"):
        load_dataset(f"fitted:{missing}:10")
    with pytest.raises(DataFormatError, match="nowhere.csv"):
        stream_dataset(f"fitted:{missing}:10")


# ------------------------------------------------------------------ the mixture


def test_em_recovers_a_known_three_component_mixture():
    rng = np.random.default_rng(0)
    true_means = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    true_weights = np.array([0.5, 0.3, 0.2])
    n = 900
    comp = rng.choice(3, size=n, p=true_weights)
    cov = np.array([[1.0, 0.3], [0.3, 0.5]])
    x = true_means[comp] + rng.standard_normal((n, 2)) @ np.linalg.cholesky(cov).T

    mix, bics = select_mixture(x, (1, 2, 3, 4), rng=np.random.default_rng(1), restarts=3)
    assert mix.n_components == 3
    assert min(bics, key=bics.get) == 3
    order = np.argsort(mix.means[:, 0] * 10 + mix.means[:, 1])  # (0,0), (0,6), (6,0)
    expect = true_means[[0, 2, 1]]
    # a mean over ~300-750 points with unit-scale noise is within a few hundredths
    assert np.abs(mix.means[order] - expect).max() < 0.2
    assert np.abs(mix.weights[order] - true_weights[[0, 2, 1]]).max() < 0.04
    assert np.abs(mix.covariances[order][0] - cov).max() < 0.2
    # samples from the fit look like the data
    draw = mix.sample(20_000, np.random.default_rng(2))
    assert np.abs(draw.mean(axis=0) - x.mean(axis=0)).max() < 0.15


def test_em_likelihood_is_the_best_of_its_restarts():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 3))
    one = fit_mixture(x, 1, rng=np.random.default_rng(0), restarts=1, ridge=0.0)
    # one Gaussian: the maximum likelihood is the sample mean and (biased) covariance
    assert np.allclose(one.means[0], x.mean(axis=0))
    assert np.allclose(one.covariances[0], np.cov(x, rowvar=False, bias=True))


# ------------------------------------------------------------------ streaming and the people


def test_the_same_people_whatever_the_chunk_size(model):
    n = BLOCK_USERS + 500  # crosses a block boundary
    reference = table_of(iter_fitted(model, n, seed=5, chunk_users=4096))
    for chunk_users in (1, 777, BLOCK_USERS, 10_000):
        if chunk_users == 1:
            chunks = iter_fitted(model, 40, seed=5, chunk_users=1)
            assert all(c.n_users == 1 for c in chunks)
            continue
        again = table_of(iter_fitted(model, n, seed=5, chunk_users=chunk_users))
        for a, b in zip(reference, again):
            np.testing.assert_array_equal(a, b)
    whole = generate_fitted(model, n, seed=5)
    np.testing.assert_array_equal(whole.user, reference[0])
    np.testing.assert_array_equal(whole.item, reference[1])
    np.testing.assert_array_equal(whole.timestamp, reference[2])
    other = table_of(iter_fitted(model, n, seed=6))
    assert not np.array_equal(other[1][:1000], reference[1][:1000])


def test_every_person_has_three_distinct_items_in_strict_time_order(model):
    table = generate_fitted(model, 2000, seed=1)
    counts = np.bincount(table.user, minlength=2000)
    assert counts.min() >= MIN_EVENTS
    assert counts.max() <= model.max_events == int(0.3 * model.n_items + 1e-9)
    assert table.item.min() >= 0 and table.item.max() < model.n_items
    pairs = table.user * model.n_items + table.item
    assert len(np.unique(pairs)) == len(pairs)
    same_user = table.user[1:] == table.user[:-1]
    assert np.all(np.diff(table.user) >= 0)
    assert np.all(np.diff(table.timestamp)[same_user] > 0)
    # the drawn lengths are the realised ones (a person never runs out of items)
    chunks = list(iter_fitted(model, 2000, seed=1))
    np.testing.assert_array_equal(np.concatenate([c.requested for c in chunks]), counts)


def test_gamma_puts_popular_items_early(model):
    log_count = np.log(model.item_counts)

    def first_minus_last(gamma):
        table = generate_fitted(model.with_draw(gamma=gamma), 1000, seed=2)
        first = np.r_[True, table.user[1:] != table.user[:-1]]
        last = np.r_[table.user[1:] != table.user[:-1], True]
        return log_count[table.item[first]].mean() - log_count[table.item[last]].mean()

    assert abs(first_minus_last(0.0)) < 0.15  # random order: no difference beyond noise
    assert first_minus_last(2.0) > 0.5


def test_a_popularity_share_draws_more_popular_items(model):
    def mean_log_count(rho):
        table = generate_fitted(model.with_draw(popularity_share=rho, beta=0.0), 1000, seed=3)
        return np.log(model.item_counts[table.item]).mean()

    assert mean_log_count(0.9) > mean_log_count(0.0) + 0.1


# ------------------------------------------------------------------ the cache


def test_a_cache_hit_does_not_refit_and_a_changed_source_does(source, tmp_path, counted_fits):
    src = copy_source(source, tmp_path)
    cache = tmp_path / "cache"
    first = fit_generator(str(src), config=TINY, cache_dir=cache)
    path = cache_path(str(src), TINY, cache)
    assert path.name.startswith("fitted-tiny-") and path.name.endswith("-d8-seed0.npz")
    assert cache_path("movielens-small", TINY, cache).name == "fitted-movielens-small-d8-seed0.npz"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    again = fit_generator(str(src), config=TINY, cache_dir=cache)
    assert len(counted_fits) == 1
    np.testing.assert_array_equal(first.item_vectors, again.item_vectors)
    np.testing.assert_array_equal(first.mixture.covariances, again.mixture.covariances)
    assert table_of(iter_fitted(first, 300, seed=0))[1].tolist() == table_of(iter_fitted(again, 300, seed=0))[1].tolist()

    fit_generator(str(src), config=replace(TINY, mixture_sizes=(1,)), cache_dir=cache)
    assert len(counted_fits) == 2  # other settings: refitted

    copy_source(source, tmp_path, change_a_time=True)  # other content, same file name
    changed = fit_generator(str(src), config=TINY, cache_dir=cache)
    assert len(counted_fits) == 3
    assert changed.source_sha256 != first.source_sha256
    fit_generator(str(src), config=TINY, cache_dir=cache)
    assert len(counted_fits) == 3


def test_the_cache_folder_comes_from_the_environment_when_not_given(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPREF_CACHE_DIR", str(tmp_path / "env-cache"))
    assert fitted.cache_folder() == tmp_path / "env-cache"
    assert fitted.cache_folder(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("FEDPREF_CACHE_DIR")
    assert str(fitted.cache_folder()) == os.path.join("results", "generators")


def _damage_garbage(path):
    path.write_bytes(b"not a zip file at all")


def _damage_nan(path):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["item_bias"] = arrays["item_bias"].copy()
    arrays["item_bias"][3] = np.nan
    np.savez(path, **arrays)


def _damage_shape(path):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["item_vectors"] = arrays["item_vectors"][:-1]
    np.savez(path, **arrays)


def _damage_pickle(path):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["mix_weights"] = np.array([{"a": 1}], dtype=object)
    np.savez(path, **arrays)


def _damage_covariance(path):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["mix_covariances"] = -arrays["mix_covariances"]
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage", [_damage_garbage, _damage_nan, _damage_shape, _damage_pickle, _damage_covariance])
def test_a_damaged_cache_file_is_refitted_with_a_warning_not_trusted(source, tmp_path, counted_fits, damage):
    src = copy_source(source, tmp_path)
    cache = tmp_path / "cache"
    fit_generator(str(src), config=TINY, cache_dir=cache)
    path = cache_path(str(src), TINY, cache)
    damage(path)
    with pytest.warns(FitCacheWarning, match="fitting again"):
        fit_generator(str(src), config=TINY, cache_dir=cache)
    assert len(counted_fits) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is sound again
        fit_generator(str(src), config=TINY, cache_dir=cache)
    assert len(counted_fits) == 2


# ------------------------------------------------------------------ the registry


def test_load_and_stream_dataset_draw_the_same_fitted_people(source, fitted_cache, monkeypatch, counted_fits):
    monkeypatch.setenv("FEDPREF_CACHE_DIR", str(fitted_cache[1]))  # where the module's fit lies
    monkeypatch.setattr(fitted, "DEFAULT_FIT", TINY)
    n_items = load_dataset(str(source)).n_items  # the items someone in the source touched
    table = load_dataset(f"fitted:{source}:300")
    assert table.name == "fitted-tiny-300"
    assert table.n_users == 300 and table.n_items == n_items
    assert np.bincount(table.user, minlength=300).min() >= MIN_EVENTS

    streamed = stream_dataset(f"fitted:{source}:300", chunk_users=128)
    assert (streamed.name, streamed.n_users, streamed.n_items, streamed.seed) == ("fitted-tiny-300", 300, n_items, 0)
    user, item, timestamp, _, _ = table_of(streamed.chunks)
    np.testing.assert_array_equal(user, table.user)
    np.testing.assert_array_equal(item, table.item)
    np.testing.assert_array_equal(timestamp, table.timestamp)
    assert counted_fits == []  # both read the module's cached fit

    seeded = stream_dataset(f"fitted:{source}:300:seed=4")
    assert seeded.name == "fitted-tiny-300-seed4" and seeded.seed == 4
    with pytest.raises(DataFormatError, match="ratings"):
        load_dataset(f"fitted:{source}:300", rating_threshold=4.0)


def test_drawn_history_lengths_follow_the_source_quantiles(source, model):
    from statistics import NormalDist

    z = np.linspace(-6, 6, 241)
    exact = np.array([NormalDist().cdf(v) for v in z])
    assert np.abs(fitted._normal_cdf(z) - exact).max() < 2e-7  # Abramowitz-Stegun 7.1.26's bound

    real = np.bincount(load_dataset(str(source)).user)
    real = real[real >= MIN_EVENTS]
    drawn = np.bincount(generate_fitted(model, 3000, seed=4).user)
    # lengths come from the source's quantiles: never outside its range
    assert real.min() <= drawn.min() and drawn.max() <= min(real.max(), model.max_events)
    # the mixture's margin of the normal score is close to N(0, 1): quartiles within ~10%
    for q in (25, 50, 75):
        assert abs(np.percentile(drawn, q) / np.percentile(real, q) - 1) < 0.12
