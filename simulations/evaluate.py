"""The ruler: HR@K and NDCG@K on the sampled candidates and on full ranking.

- *sampled*: the held-out item against the user's 99 fixed negatives;
- *full*: the held-out item against every item the user has not trained on (the other
  held-out item, validation or test, stays a candidate: it was not trained on).

Every model, baseline and federated run is measured by :func:`evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedpref.models.contract import Params
from fedpref.models.metrics import hit_rate, ndcg, rank_of_target
from fedpref.models.preference import ModelSpec

from fedpref.simulations.data.split import LeaveOneOutSplit

ScoreFn = Callable[[np.ndarray], np.ndarray]  # user indices (B,) -> scores (B, n_items)


@dataclass(frozen=True)
class RankingMetrics:
    """Metrics of one evaluation; ``full_*`` are NaN when full ranking was skipped."""

    target: str
    k: int
    n_users: int
    hr: float
    ndcg: float
    full_hr: float
    full_ndcg: float

    def as_dict(self, prefix: str = "") -> dict[str, float | int | str]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}

    def line(self) -> str:
        return (
            f"{self.target}: HR@{self.k} {self.hr:.4f}  NDCG@{self.k} {self.ndcg:.4f}  "
            f"full HR@{self.k} {self.full_hr:.4f}  full NDCG@{self.k} {self.full_ndcg:.4f}"
        )


def evaluate(
    score_fn: ScoreFn,
    split: LeaveOneOutSplit,
    *,
    target: str = "val",
    k: int = 10,
    full: bool = True,
    user_batch: int = 1024,
    seed: int = 0,
) -> RankingMetrics:
    """Rank each user's ``target`` ('val' or 'test') item with ``score_fn``."""
    targets = split.target(target)
    rng = np.random.default_rng([seed, 0 if target == "val" else 1])  # tie-breaking only
    sampled_ranks = np.empty(split.n_users, dtype=np.int64)
    full_ranks = np.empty(split.n_users, dtype=np.int64)
    for start in range(0, split.n_users, user_batch):
        users = np.arange(start, min(start + user_batch, split.n_users))
        scores = np.asarray(score_fn(users), dtype=np.float64)
        if scores.shape != (len(users), split.n_items):
            raise ValueError(f"score_fn returned shape {scores.shape}, expected {(len(users), split.n_items)}")
        rows = np.arange(len(users))
        t = targets[users]
        target_scores = scores[rows, t]
        neg_scores = scores[rows[:, None], split.negatives[users]]
        sampled_ranks[users] = rank_of_target(target_scores, neg_scores, rng)
        if full:
            mask = np.ones_like(scores, dtype=bool)
            lo, hi = split.train_indptr[users], split.train_indptr[users + 1]
            lengths = hi - lo
            row_of = np.repeat(rows, lengths)
            # Positions lo[r], lo[r]+1, ..., hi[r]-1 for every row r, without a Python loop.
            starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            mask[row_of, split.train_items[starts + np.arange(lengths.sum())]] = False
            mask[rows, t] = False  # the target is not its own competitor
            full_ranks[users] = rank_of_target(target_scores, scores, rng, candidate_mask=mask)
    return RankingMetrics(
        target=target,
        k=k,
        n_users=split.n_users,
        hr=hit_rate(sampled_ranks, k),
        ndcg=ndcg(sampled_ranks, k),
        full_hr=hit_rate(full_ranks, k) if full else float("nan"),
        full_ndcg=ndcg(full_ranks, k) if full else float("nan"),
    )


def model_scorer(spec: ModelSpec, shared: Params, private: Params, n_items: int) -> ScoreFn:
    """A score function from a model's shared and private arrays (one private row per user)."""
    n_users = next(iter(private.values())).shape[0]
    model = spec.build(n_users, n_items, init=False)
    model.set_shared(shared)
    model.set_private(private)
    model.eval()

    def score(users: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.score_all(torch.as_tensor(users, dtype=torch.long)).numpy()

    return score


def popularity_scorer(split: LeaveOneOutSplit) -> ScoreFn:
    """Everyone gets the items most often seen in training."""
    return counts_scorer(split.item_popularity())


def counts_scorer(counts: np.ndarray) -> ScoreFn:
    """Everyone gets the items with the highest ``counts`` (such as a published DP histogram)."""
    pop = np.asarray(counts, dtype=np.float64)

    def score(users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(pop, (len(users), len(pop)))

    return score


def random_scorer(n_items: int, seed: int = 0) -> ScoreFn:
    """Uniform random scores (the floor: sampled HR@10 near 0.10)."""
    rng = np.random.default_rng(seed)

    def score(users: np.ndarray) -> np.ndarray:
        return rng.random((len(users), n_items))

    return score
