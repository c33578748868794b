"""The ruler's arithmetic: HR, NDCG, ties and non-finite scores."""

import math

import numpy as np
import pytest

from fedpref.models.metrics import NonFiniteScoresError, hit_rate, ndcg, rank_of_target


@pytest.mark.parametrize("rank", [0, 1, 2, 5, 9])
def test_ndcg_of_a_known_rank_is_one_over_log2_rank_plus_two(rank):
    # A target with `rank` candidates scored above it.
    target = np.array([0.0])
    candidates = np.array([[1.0] * rank + [-1.0] * (99 - rank)])
    ranks = rank_of_target(target, candidates, np.random.default_rng(0))
    assert ranks.tolist() == [rank]
    assert ndcg(ranks, 10) == pytest.approx(1 / math.log2(rank + 2))
    assert hit_rate(ranks, 10) == 1.0


def test_rank_beyond_k_is_neither_hit_nor_gain():
    ranks = np.array([10, 50])
    assert hit_rate(ranks, 10) == 0.0
    assert ndcg(ranks, 10) == 0.0


def test_random_scores_give_sampled_hr_near_one_in_ten():
    rng = np.random.default_rng(1)
    n = 20_000  # sd of the mean = sqrt(.1 * .9 / 20000) = 0.0021
    ranks = rank_of_target(rng.random(n), rng.random((n, 99)), rng)
    assert 0.08 <= hit_rate(ranks, 10) <= 0.12


def test_oracle_gives_one():
    rng = np.random.default_rng(2)
    ranks = rank_of_target(np.full(100, 2.0), rng.random((100, 99)), rng)
    assert hit_rate(ranks, 10) == 1.0
    assert ndcg(ranks, 10) == 1.0


def test_constant_scores_rank_like_random_not_like_an_oracle():
    # A diverged model that scores everything 0 must not look perfect.
    rng = np.random.default_rng(3)
    n = 20_000
    ranks = rank_of_target(np.zeros(n), np.zeros((n, 99)), rng)
    assert 0.08 <= hit_rate(ranks, 10) <= 0.12


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_an_error(bad):
    rng = np.random.default_rng(4)
    with pytest.raises(NonFiniteScoresError, match="diverged"):
        rank_of_target(np.array([bad]), np.zeros((1, 99)), rng)
    with pytest.raises(NonFiniteScoresError):
        rank_of_target(np.array([0.5]), np.full((1, 99), bad), rng)


def test_masked_candidates_do_not_count_but_unmasked_non_finite_do():
    rng = np.random.default_rng(5)
    candidates = np.array([[np.nan, 3.0, 0.0]])
    mask = np.array([[False, False, True]])
    # Only the third candidate counts and it scores below the target.
    assert rank_of_target(np.array([1.0]), candidates, rng, candidate_mask=mask).tolist() == [0]
    with pytest.raises(NonFiniteScoresError):
        rank_of_target(np.array([1.0]), candidates, rng, candidate_mask=np.ones_like(mask))
