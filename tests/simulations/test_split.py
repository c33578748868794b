"""Invariants of the temporal leave-one-out split and its fixed negatives."""

import numpy as np
import pytest

from fedpref.simulations.data.interactions import DataWarning, build_interactions
from fedpref.simulations.data.split import SplitError, leave_one_out


def random_table(n_users=60, n_items=300, seed=0, with_time=True):
    rng = np.random.default_rng(seed)
    users, items, times = [], [], []
    for u in range(n_users):
        n = int(rng.integers(3, 40))
        users += [u] * n
        items += rng.choice(n_items, size=n, replace=False).tolist()
        times += rng.integers(0, 1000, size=n).tolist()  # ties in time are likely
    return build_interactions(
        np.array(users), np.array(items), np.array(times) if with_time else None, name="t"
    )


def test_every_kept_user_has_one_validation_and_one_test_item_never_in_train():
    table = random_table()
    split = leave_one_out(table, n_negatives=99, seed=0)
    assert split.n_users == 60
    assert split.val_item.shape == split.test_item.shape == (60,)
    assert split.n_train == len(table) - 2 * 60
    for u in range(split.n_users):
        train = set(split.user_train_items(u).tolist())
        assert split.val_item[u] not in train
        assert split.test_item[u] not in train
        assert split.val_item[u] != split.test_item[u]


def test_test_is_latest_and_validation_the_one_before_with_ties_broken_by_item_id():
    # user 7: items 5 (t=1), 9 (t=3), 2 (t=3), 4 (t=2).  Order: 5, 4, 2, 9 -> val 2, test 9.
    # user 8 only brings item 6 into the catalogue, so that user 7 has a negative.
    table = build_interactions(
        np.array([7, 7, 7, 7, 8, 8, 8]),
        np.array([5, 9, 2, 4, 6, 5, 9]),
        np.array([1, 3, 3, 2, 0, 0, 0]),
        name="ties",
    )
    split = leave_one_out(table, n_negatives=1, seed=0)
    item = lambda idx: int(split.item_ids[idx])  # noqa: E731
    assert item(split.test_item[0]) == 9
    assert item(split.val_item[0]) == 2
    assert [item(i) for i in split.user_train_items(0)] == [5, 4]


def test_without_timestamps_the_order_is_random_but_fixed_by_seed():
    table = random_table(with_time=False)
    a = leave_one_out(table, seed=3)
    b = leave_one_out(table, seed=3)
    c = leave_one_out(table, seed=4)
    assert np.array_equal(a.test_item, b.test_item)
    assert not np.array_equal(a.test_item, c.test_item)


def test_users_with_fewer_than_three_interactions_are_dropped_and_counted():
    table = build_interactions(
        np.array([1, 1, 1, 2, 2, 3]), np.array([1, 2, 3, 1, 2, 4]), np.array([1, 2, 3, 1, 2, 1]), name="small"
    )
    with pytest.warns(DataWarning, match="dropped 2 users"):
        split = leave_one_out(table, n_negatives=0 + 1, seed=0)
    assert split.n_users == 1 and split.dropped_users == 2
    assert split.user_ids.tolist() == [1]


def test_negatives_are_distinct_untouched_items_fixed_by_seed():
    table = random_table()
    split = leave_one_out(table, n_negatives=99, seed=0)
    touched = {}
    for u, i in zip(table.user, table.item):
        touched.setdefault(int(u), set()).add(int(i))
    for u in range(split.n_users):
        negs = split.negatives[u].tolist()
        assert len(set(negs)) == 99
        assert not set(negs) & touched[int(split.user_ids[u])]
    again = leave_one_out(table, n_negatives=99, seed=0)
    other = leave_one_out(table, n_negatives=99, seed=1)
    assert np.array_equal(split.negatives, again.negatives)
    assert not np.array_equal(split.negatives, other.negatives)


def test_a_catalogue_too_small_for_the_negatives_is_a_clear_error():
    table = build_interactions(np.zeros(5, int), np.arange(5), np.arange(5), name="tiny")
    with pytest.raises(SplitError, match="fewer than 99 negatives"):
        leave_one_out(table, n_negatives=99)
