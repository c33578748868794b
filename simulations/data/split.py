"""Temporal leave-one-out split with fixed sampled negatives (docs/design.md, the evaluation protocol).

Per user, interactions are ordered by time (ties by item id; a seeded random order when the
data has no timestamps). The latest is the test item, the one before it the validation
item, the rest is training data. Each user gets ``n_negatives`` items they never touched,
fixed by the seed, used as the sampled candidates for both validation and test.
Users with fewer than 3 interactions cannot be split: they are dropped and counted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from fedpref.simulations.data.interactions import DataWarning, Interactions

MIN_INTERACTIONS = 3  # one train, one validation, one test item


class SplitError(ValueError):
    """The data cannot be split as asked."""


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Train histories in CSR form plus one validation and one test item per user.

    ``train_items[train_indptr[u]:train_indptr[u+1]]`` are user u's training items in time
    order. Users are re-indexed 0..n_users-1 over the kept users (``user_ids`` maps back to
    the original ids); items keep the indices of the source table.
    """

    name: str
    n_users: int
    n_items: int
    train_indptr: np.ndarray
    train_items: np.ndarray
    val_item: np.ndarray
    test_item: np.ndarray
    negatives: np.ndarray  # (n_users, n_negatives)
    user_ids: np.ndarray
    item_ids: np.ndarray
    dropped_users: int
    seed: int

    @property
    def n_train(self) -> int:
        return len(self.train_items)

    def train_users(self) -> np.ndarray:
        """The user index of every training row (expanded from the CSR pointer)."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(self.train_indptr))

    def user_train_items(self, u: int) -> np.ndarray:
        return self.train_items[self.train_indptr[u] : self.train_indptr[u + 1]]

    def target(self, which: str) -> np.ndarray:
        if which == "val":
            return self.val_item
        if which == "test":
            return self.test_item
        raise ValueError(f"target must be 'val' or 'test', got {which!r}")

    def item_popularity(self) -> np.ndarray:
        """Training interactions per item."""
        return np.bincount(self.train_items, minlength=self.n_items)

    def summary(self) -> str:
        return (
            f"{self.name}: {self.n_users:,} users ({self.dropped_users:,} dropped with < "
            f"{MIN_INTERACTIONS} interactions), {self.n_items:,} items, {self.n_train:,} train "
            f"interactions, 1 validation + 1 test item and {self.negatives.shape[1]} negatives per user"
        )


def leave_one_out(interactions: Interactions, *, n_negatives: int = 99, seed: int = 0) -> LeaveOneOutSplit:
    """Split ``interactions`` by the protocol of docs/design.md (see module docstring)."""
    if n_negatives < 1:
        raise SplitError(f"n_negatives must be at least 1, got {n_negatives}")
    rng = np.random.default_rng(seed)
    user, item = interactions.user, interactions.item
    n_items = interactions.n_items

    counts = np.bincount(user, minlength=interactions.n_users)
    keep_user = counts >= MIN_INTERACTIONS
    dropped = int((~keep_user).sum())
    if dropped:
        warnings.warn(
            f"{interactions.name}: dropped {dropped:,} users with fewer than {MIN_INTERACTIONS} "
            f"interactions ({int(counts[~keep_user].sum()):,} interactions); they cannot be split "
            "into train, validation and test",
            DataWarning,
            stacklevel=2,
        )
    if not keep_user.any():
        raise SplitError(
            f"{interactions.name}: no user has {MIN_INTERACTIONS} or more interactions; nothing to split"
        )
    new_index = np.cumsum(keep_user) - 1  # old user index -> new
    rows = keep_user[user]
    user = new_index[user[rows]]
    item = item[rows]
    n_users = int(keep_user.sum())

    # Order: by user, then time, then item id. Without timestamps a seeded random order.
    if interactions.timestamp is not None:
        order = np.lexsort((item, interactions.timestamp[rows], user))
    else:
        order = np.lexsort((rng.random(len(user)), user))
    user, item = user[order], item[order]

    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=n_users), out=indptr[1:])
    last = indptr[1:] - 1
    test_item = item[last]
    val_item = item[last - 1]
    train_mask = np.ones(len(item), dtype=bool)
    train_mask[last] = False
    train_mask[last - 1] = False
    train_items = item[train_mask]
    train_indptr = indptr - 2 * np.arange(n_users + 1)

    negatives = sample_eval_negatives(user, item, n_users, n_items, n_negatives, rng, name=interactions.name)
    return LeaveOneOutSplit(
        name=interactions.name,
        n_users=n_users,
        n_items=n_items,
        train_indptr=train_indptr,
        train_items=train_items.astype(np.int64),
        val_item=val_item.astype(np.int64),
        test_item=test_item.astype(np.int64),
        negatives=negatives,
        user_ids=interactions.user_ids[keep_user],
        item_ids=interactions.item_ids,
        dropped_users=dropped,
        seed=seed,
    )


def sample_eval_negatives(
    user: np.ndarray,
    item: np.ndarray,
    n_users: int,
    n_items: int,
    n_negatives: int,
    rng: np.random.Generator,
    *,
    name: str = "data",
) -> np.ndarray:
    """``n_negatives`` distinct items per user from the items that user never touched."""
    touched = np.bincount(user, minlength=n_users)
    short = np.flatnonzero(n_items - touched < n_negatives)
    if len(short):
        u = int(short[0])
        raise SplitError(
            f"{name}: user index {u} touched {int(touched[u])} of {n_items} items, leaving fewer than "
            f"{n_negatives} negatives to sample ({len(short)} such users); use fewer negatives or "
            "a larger catalogue"
        )
    # Sorted, not np.unique: membership by searchsorted needs no dedup, and np.unique of int64 is
    # tens of times slower than a sort in NumPy 2.x (it hashes first).
    keys = np.sort(user.astype(np.int64) * n_items + item)

    def invalid(cand: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        rows = np.arange(n_users, dtype=np.int64) if rows is None else rows
        k = rows[:, None] * n_items + cand
        pos = np.minimum(np.searchsorted(keys, k), len(keys) - 1)
        bad = keys[pos] == k
        # Repeats within a row: mark every occurrence after the first.
        order = np.argsort(cand, axis=1, kind="stable")
        sorted_c = np.take_along_axis(cand, order, axis=1)
        dup_sorted = np.zeros_like(bad)
        dup_sorted[:, 1:] = sorted_c[:, 1:] == sorted_c[:, :-1]
        dup = np.zeros_like(bad)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        return bad | dup

    cand = rng.integers(0, n_items, size=(n_users, n_negatives))
    bad = np.zeros(cand.shape, dtype=bool)
    check = np.arange(n_users, dtype=np.int64)
    for _ in range(200):
        # Only rows that were redrawn can have become invalid: the others are checked once.
        bad[check] = invalid(cand[check], check)
        if not bad.any():
            return cand.astype(np.int64)
        cand[bad] = rng.integers(0, n_items, size=int(bad.sum()))
        check = np.flatnonzero(bad.any(axis=1))
    # Users who touched most of the catalogue: draw exactly from their complement.
    for u in np.flatnonzero(invalid(cand).any(axis=1)):
        mine = item[user == u]
        free = np.setdiff1d(np.arange(n_items), mine)
        cand[u] = rng.choice(free, size=n_negatives, replace=False)
    return cand.astype(np.int64)
