"""The synthetic population generator: seeding, streaming, and the statistics it promises."""

import time
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from fedpref.simulations.data.interactions import Interactions
from fedpref.simulations.data.synthetic import (
    BLOCK_USERS,
    SyntheticConfig,
    _InverseCDF,
    _n_bins,
    generate_synthetic,
    iter_synthetic,
    sir_fidelity,
)

SMALL = SyntheticConfig(n_users=3_000, n_items=2_000, seed=7)


@pytest.fixture(scope="module")
def small():
    return generate_synthetic(SMALL)


def events_per_user(table: Interactions) -> np.ndarray:
    return np.bincount(table.user, minlength=table.n_users)


def held_out_auc(pop, score, n_negatives=50, seed=0) -> float:
    """Sampled AUC of ``score(users, items)`` for each user's latest item against random
    items the user never touched (the evaluation protocol's ruler, in miniature)."""
    table = pop.interactions
    n_users, n_items = table.n_users, table.n_items
    order = np.lexsort((table.item, table.timestamp, table.user))
    user, item = table.user[order], table.item[order]
    last = np.ones(len(user), dtype=bool)
    last[:-1] = user[1:] != user[:-1]
    positive = item[last]  # one per user, users in order
    rng = np.random.default_rng(seed)
    negatives = rng.integers(0, n_items, size=(n_users, n_negatives))
    touched = np.isin(np.arange(n_users)[:, None] * n_items + negatives, table.user * n_items + table.item)
    users = np.arange(n_users)
    pos_score = score(users, positive)
    neg_score = score(np.repeat(users, n_negatives), negatives.ravel()).reshape(n_users, n_negatives)
    wins = (neg_score < pos_score[:, None]) & ~touched
    return float(wins.sum() / (~touched).sum())


def affinity(pop, users, items):
    return np.einsum("ij,ij->i", pop.user_vectors[users], pop.item_vectors[items])


# ------------------------------------------------------------------ the table itself


def test_the_table_is_a_loader_table_with_contiguous_ids_times_and_no_ratings(small):
    table = small.interactions
    assert isinstance(table, Interactions)
    assert table.name == "synthetic-3000x2000"
    assert table.n_users == 3_000 and table.n_items == 2_000
    np.testing.assert_array_equal(table.user_ids, np.arange(3_000))
    np.testing.assert_array_equal(table.item_ids, np.arange(2_000))
    for column in (table.user, table.item, table.timestamp):
        assert column.dtype == np.int64 and len(column) == len(table)
    assert table.rating is None
    assert table.item.min() >= 0 and table.item.max() < 2_000
    assert small.user_vectors.shape == (3_000, 16) and small.user_vectors.dtype == np.float32
    assert small.item_vectors.shape == (2_000, 16) and small.item_vectors.dtype == np.float32
    assert small.item_popularity.shape == (2_000,)
    assert small.item_popularity.sum() == pytest.approx(1.0)


def test_no_user_touches_an_item_twice(small):
    # generate_synthetic bypasses build_interactions' merge, so this must hold by construction
    table = small.interactions
    key = table.user * table.n_items + table.item
    assert len(np.unique(key)) == len(key)


def test_rows_are_grouped_by_user_and_in_time_order_within_a_user(small):
    table = small.interactions
    assert np.all(np.diff(table.user) >= 0)
    same_user = table.user[1:] == table.user[:-1]
    assert np.all(np.diff(table.timestamp)[same_user] >= 0)
    ties = np.sum((np.diff(table.timestamp) == 0) & same_user)
    assert ties <= len(table) // 10_000  # ties allowed but rare
    assert table.timestamp.min() >= 1_577_836_800  # 2020-01-01


# ------------------------------------------------------------------ seeding and streaming


def test_the_same_seed_gives_identical_output_and_another_seed_does_not(small):
    again = generate_synthetic(SMALL)
    for a, b in (
        (small.interactions.user, again.interactions.user),
        (small.interactions.item, again.interactions.item),
        (small.interactions.timestamp, again.interactions.timestamp),
        (small.user_vectors, again.user_vectors),
        (small.item_vectors, again.item_vectors),
        (small.item_popularity, again.item_popularity),
    ):
        np.testing.assert_array_equal(a, b)
    other = generate_synthetic(replace(SMALL, seed=8))
    assert not np.array_equal(other.user_vectors, small.user_vectors)
    assert not np.array_equal(other.item_vectors, small.item_vectors)
    n = min(len(other.interactions), len(small.interactions))
    assert not np.array_equal(other.interactions.item[:n], small.interactions.item[:n])


def test_the_output_does_not_depend_on_chunk_users(small):
    for chunk_users in (1, 999, BLOCK_USERS, 50_000):
        if chunk_users == 1:
            config = replace(SMALL, n_users=40)  # one user per chunk, kept short
            ref = generate_synthetic(config)
            got = generate_synthetic(config, chunk_users=1)
        else:
            ref, got = small, generate_synthetic(SMALL, chunk_users=chunk_users)
        np.testing.assert_array_equal(got.interactions.user, ref.interactions.user)
        np.testing.assert_array_equal(got.interactions.item, ref.interactions.item)
        np.testing.assert_array_equal(got.interactions.timestamp, ref.interactions.timestamp)
        np.testing.assert_array_equal(got.user_vectors, ref.user_vectors)


def test_the_stream_covers_the_users_in_order_and_equals_the_collected_population(small):
    chunks = list(iter_synthetic(SMALL, chunk_users=700))
    assert [c.start for c in chunks] == list(range(0, 3_000, 700))
    assert [c.stop for c in chunks] == [700, 1400, 2100, 2800, 3000]
    for c in chunks:
        assert np.all((c.user >= c.start) & (c.user < c.stop))
        assert c.user_vectors.shape == (c.n_users, 16)
        assert len(c.requested) == c.n_users
        assert c.user.dtype == c.item.dtype == c.timestamp.dtype == np.int64
    table = small.interactions
    np.testing.assert_array_equal(np.concatenate([c.user for c in chunks]), table.user)
    np.testing.assert_array_equal(np.concatenate([c.item for c in chunks]), table.item)
    np.testing.assert_array_equal(np.concatenate([c.timestamp for c in chunks]), table.timestamp)
    np.testing.assert_array_equal(np.concatenate([c.user_vectors for c in chunks]), small.user_vectors)
    np.testing.assert_array_equal(np.concatenate([c.requested for c in chunks]), small.requested_events)


def test_a_population_too_big_for_a_dense_matrix_streams_its_first_chunk_quickly():
    # 10 million users x 10,000 items = 1e11 cells: 400 GB as float32. A first chunk in well
    # under the time and memory a dense computation would need shows that none is made.
    config = SyntheticConfig(n_users=10_000_000, n_items=10_000, seed=1)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        chunk = next(iter_synthetic(config, chunk_users=1_000))
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (chunk.start, chunk.stop) == (0, 1_000)
    assert 20 * 1_000 < len(chunk) < 100 * 1_000
    assert seconds < 5.0
    assert peak < 300 * 2**20  # a block of 4,096 users' candidates, not users x items


# ------------------------------------------------------------------ activity


def test_every_user_has_at_least_min_events_and_at_most_the_cap(small):
    counts = events_per_user(small.interactions)
    assert counts.min() >= SMALL.min_events
    assert counts.max() <= SMALL.max_events == 400
    assert np.all(counts <= small.requested_events)


def test_the_mean_number_of_events_is_near_mean_events():
    # Counts have a standard deviation of about 60 (log-normal sigma 1, mean 50, clipped), so
    # the mean of 3,000 users has a standard error near 1.1: a tolerance of 4 is over 3.5
    # standard errors. SIR shortfalls (heavy users with fewer distinct candidates than n_u)
    # cost well under one event per user here, and are counted against the tolerance.
    for seed in (0, 1):
        counts = events_per_user(generate_synthetic(replace(SMALL, seed=seed)).interactions)
        assert abs(counts.mean() - 50.0) < 4.0
    config = replace(SMALL, mean_events=12.0, activity_shape=0.5)
    counts = events_per_user(generate_synthetic(config).interactions)
    assert abs(counts.mean() - 12.0) < 1.0  # sd about 5: standard error 0.1


def test_activity_is_heavy_tailed_and_shape_zero_gives_everyone_the_same(small):
    config = replace(SMALL, n_items=5_000)  # cap of 1,000 events, out of the way of the tail
    counts = events_per_user(generate_synthetic(config).interactions)
    assert counts.max() / np.median(counts) > 10  # log-normal sigma 1: about 30 expected
    assert np.percentile(counts, 99) > 4 * np.median(counts)
    flat = events_per_user(generate_synthetic(replace(SMALL, activity_shape=0.0)).interactions)
    assert np.all(flat == 50)


# ------------------------------------------------------------------ popularity


def test_item_popularity_follows_a_power_law(small):
    table = small.interactions
    top = np.argsort(-small.item_popularity)[: table.n_items // 100]  # top 1% of items
    share = np.isin(table.item, top).mean()
    assert share > 0.08  # 8 times their fair share (about 0.17 expected)
    # the popular items are not simply the low ids
    assert np.mean(top < table.n_items // 2) < 0.8
    # rank vs. count: a straight line in log-log space with a clearly negative slope
    counts = np.bincount(table.item, minlength=table.n_items)[np.argsort(-small.item_popularity)]
    ranks = np.arange(1, table.n_items + 1)
    slope = np.polyfit(np.log(ranks[:500]), np.log(counts[:500] + 1), 1)[0]
    assert slope < -0.4
    uniform = generate_synthetic(replace(SMALL, popularity_exponent=0.0))
    share = np.isin(uniform.interactions.item, top).mean()
    assert share < 0.02


# ------------------------------------------------------------------ taste


def test_users_choose_items_they_have_affinity_for(small):
    table = small.interactions
    chosen = affinity(small, table.user, table.item).mean()
    rng = np.random.default_rng(0)
    random_items = rng.integers(0, table.n_items, size=len(table))
    baseline = affinity(small, table.user, random_items).mean()
    assert abs(baseline) < 0.02  # affinities of random pairs have mean 0, variance 1
    assert chosen - baseline > 0.3  # about 0.47 at the default temperature and factor


def test_the_ground_truth_ranks_held_out_interactions_well(small):
    def logits(users, items):
        return np.log(small.item_popularity[items]) + affinity(small, users, items) / SMALL.temperature

    assert held_out_auc(small, logits) > 0.8  # about 0.86
    assert held_out_auc(small, lambda u, i: affinity(small, u, i)) > 0.6  # taste alone: 0.67
    exact = generate_synthetic(replace(SMALL, n_users=1_000, sampler="exact"))
    # The model itself, undamped by SIR: about 0.72 (standard error near 0.01 for 1,000 users).
    assert held_out_auc(exact, lambda u, i: affinity(exact, u, i)) > 0.68
    logits_1 = small.logits([0, 1])
    assert logits_1.shape == (2, SMALL.n_items)
    np.testing.assert_allclose(logits_1[1, :5], logits(np.full(5, 1), np.arange(5)), rtol=1e-5)


def test_a_lower_temperature_makes_taste_matter_more():
    means = []
    for temperature in (4.0, 1.0, 0.5):
        pop = generate_synthetic(replace(SMALL, n_users=1_000, temperature=temperature))
        means.append(affinity(pop, pop.interactions.user, pop.interactions.item).mean())
    assert means[0] < means[1] < means[2]


def test_sir_approaches_the_exact_draw_as_candidates_grow():
    config = replace(SMALL, n_items=1_000)
    f2 = sir_fidelity(replace(config, candidates_factor=2.0), n_users=800)
    f8 = sir_fidelity(replace(config, candidates_factor=8.0), n_users=800)
    exact = f2["exact_mean_affinity"]
    assert f8["exact_mean_affinity"] == exact
    assert 0 < f2["sir_mean_affinity"] < f8["sir_mean_affinity"] < exact * 1.05
    assert f8["sir_mean_affinity"] > 0.7 * exact


def test_the_exact_sampler_gives_every_user_exactly_the_drawn_count():
    pop = generate_synthetic(replace(SMALL, n_users=500, sampler="exact"))
    table = pop.interactions
    np.testing.assert_array_equal(events_per_user(table), pop.requested_events)
    key = table.user * table.n_items + table.item
    assert len(np.unique(key)) == len(key)


def test_users_with_too_few_distinct_candidates_are_drawn_exactly_and_keep_min_events():
    # Zipf exponent 5: the top item holds 96% of the popularity, so 5 candidates are nearly
    # always one or two distinct items, fewer than min_events.
    config = SyntheticConfig(
        n_users=300, n_items=200, mean_events=6.0, min_events=5, activity_shape=0.3,
        popularity_exponent=5.0, candidates_factor=1.0, seed=3,
    )
    pop = generate_synthetic(config)
    table = pop.interactions
    counts = events_per_user(table)
    assert counts.min() >= 5
    key = table.user * table.n_items + table.item
    assert len(np.unique(key)) == len(key)


# ------------------------------------------------------------------ internals worth pinning


@pytest.mark.parametrize("exponent", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 7, 5_000])
def test_the_guide_table_inverse_cdf_equals_searchsorted(exponent, n):
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    sampler = _InverseCDF(weights / weights.sum(), _n_bins(n, 64, 1 << 22))
    rng = np.random.default_rng(n)
    u = np.concatenate([rng.random(20_000), np.arange(sampler.n_bins) / sampler.n_bins, sampler.cdf[:-1]])
    expected = np.minimum(np.searchsorted(sampler.cdf, u, side="right"), n - 1)
    np.testing.assert_array_equal(sampler(u), expected)


def test_progress_bar_runs(capsys):
    pop = generate_synthetic(replace(SMALL, n_users=300), progress=True, chunk_users=100)
    assert pop.interactions.n_users == 300


# ------------------------------------------------------------------ configuration errors


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_users=0), "n_users must be at least 1"),
        (dict(n_users=2.5), "n_users must be an integer"),
        (dict(dim=0), "dim must be at least 1"),
        (dict(min_events=0), "min_events must be at least 1"),
        (dict(n_items=10), "n_items must be at least 15"),
        (dict(n_items=200), r"use n_items >= 255"),
        (dict(mean_events=2.0), "mean_events .* must be at least min_events"),
        (dict(mean_events=3.0), "must exceed min_events"),
        (dict(max_events_fraction=0.0), r"max_events_fraction must be in \(0, 1\]"),
        (dict(activity_shape=-1.0), "activity_shape"),
        (dict(popularity_exponent=-0.5), "popularity_exponent must be in"),
        (dict(temperature=0.0), "temperature must be positive"),
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(candidates_factor=0.5), "candidates_factor must be at least 1"),
        (dict(sampler="dense"), "sampler must be one of"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(seed=True), "seed must be an integer"),
    ],
)
def test_invalid_configs_say_what_to_change(changes, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**changes)


def test_invalid_chunk_users_is_refused():
    with pytest.raises(ValueError, match="chunk_users must be a positive integer"):
        next(iter_synthetic(SMALL, chunk_users=0))
    with pytest.raises(ValueError, match="chunk_users must be a positive integer"):
        generate_synthetic(SMALL, chunk_users=-5)


def test_the_column_buffers_grow_and_trim():
    from fedpref.simulations.data.synthetic import _Columns

    buffers = _Columns(4)
    for start in range(0, 30, 3):
        buffers.append(np.arange(start, start + 3), -np.arange(start, start + 3))
    item, timestamp = buffers.finish()
    np.testing.assert_array_equal(item, np.arange(30))
    np.testing.assert_array_equal(timestamp, -np.arange(30))
    roomy = _Columns(100)
    roomy.append(np.arange(5), np.arange(5))
    item, _ = roomy.finish()
    assert len(item) == 5 and item.base is None  # trimmed by a copy, not a view of 100
