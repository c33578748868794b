"""The ruler applied to a split: sampled and full ranking, baselines, oracle."""

import numpy as np
import pytest

from fedpref.models.metrics import NonFiniteScoresError
from fedpref.simulations.data.interactions import build_interactions
from fedpref.simulations.evaluate import evaluate, popularity_scorer, random_scorer
from fedpref.simulations.data.split import leave_one_out


@pytest.fixture(scope="module")
def split():
    rng = np.random.default_rng(0)
    users, items, times = [], [], []
    for u in range(400):
        n = int(rng.integers(5, 30))
        users += [u] * n
        # Popular items are the low ids: popularity must beat random.
        items += rng.choice(500, size=n, replace=False, p=np.r_[np.full(50, 0.012), np.full(450, 0.4 / 450)]).tolist()
        times += list(range(n))
    return leave_one_out(build_interactions(np.array(users), np.array(items), np.array(times), name="t"), seed=0)


def oracle(split, which):
    target = split.target(which)

    def score(users):
        s = np.zeros((len(users), split.n_items))
        s[np.arange(len(users)), target[users]] = 1.0
        return s

    return score


def test_oracle_scores_one_on_sampled_and_full_ranking(split):
    m = evaluate(oracle(split, "test"), split, target="test")
    assert (m.hr, m.ndcg, m.full_hr, m.full_ndcg) == (1.0, 1.0, 1.0, 1.0)


def test_random_scores_give_sampled_hr_near_one_in_ten(split):
    m = evaluate(random_scorer(split.n_items, seed=1), split, target="val", full=False)
    assert 0.06 <= m.hr <= 0.14  # 400 users: sd = sqrt(.09/400) = 0.015
    assert np.isnan(m.full_hr)


def test_popularity_beats_random(split):
    pop = evaluate(popularity_scorer(split), split, target="test")
    rnd = evaluate(random_scorer(split.n_items, seed=1), split, target="test")
    assert pop.hr > rnd.hr + 0.1
    assert pop.full_hr > rnd.full_hr


def test_full_ranking_ignores_items_the_user_trained_on(split):
    # Score every training item of every user above everything: if they counted as
    # competitors the target could never rank first.
    target = split.test_item

    def score(users):
        s = np.zeros((len(users), split.n_items))
        for r, u in enumerate(users):
            s[r, split.user_train_items(u)] = 10.0
            s[r, target[u]] = 1.0
        return s

    m = evaluate(score, split, target="test")
    assert m.full_hr == 1.0


def test_a_diverged_model_is_an_error_not_a_hit(split):
    def nan_scores(users):
        return np.full((len(users), split.n_items), np.nan)

    with pytest.raises(NonFiniteScoresError):
        evaluate(nan_scores, split)


def test_wrong_score_shape_is_refused(split):
    with pytest.raises(ValueError, match="expected"):
        evaluate(lambda users: np.zeros((len(users), 3)), split)
