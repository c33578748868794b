"""Ranking metrics of the evaluation protocol (docs/design.md).

Ranks are 0-based: rank 0 means the held-out item scored above every candidate.
Ties are broken uniformly at random (seeded), so a model that gives every item the
same score ranks like a random one instead of looking perfect, and a score that is
NaN or infinite is an error, never a hit.
"""

from __future__ import annotations

import numpy as np


class NonFiniteScoresError(ValueError):
    """A model produced NaN or infinite scores (it has probably diverged)."""


def check_finite(scores: np.ndarray, what: str = "scores") -> None:
    """Raise :class:`NonFiniteScoresError` if any score is NaN or infinite."""
    if not np.all(np.isfinite(scores)):
        bad = int((~np.isfinite(scores)).sum())
        raise NonFiniteScoresError(
            f"{bad} of {scores.size} {what} are NaN or infinite: the model has diverged. "
            "Lower the learning rate, raise the L2 regularisation or clip gradients."
        )


def rank_of_target(
    target_scores: np.ndarray,
    candidate_scores: np.ndarray,
    rng: np.random.Generator,
    *,
    candidate_mask: np.ndarray | None = None,
) -> np.ndarray:
    """0-based rank of each row's target among that row's candidates.

    ``target_scores`` has shape (B,); ``candidate_scores`` (B, N) holds the scores of the
    other candidates (the target itself must not be among them). ``candidate_mask`` (B, N),
    if given, marks which candidates count (False: excluded, e.g. items trained on).
    Ties with the target are broken uniformly at random.
    """
    target_scores = np.asarray(target_scores, dtype=np.float64)
    candidate_scores = np.asarray(candidate_scores)
    check_finite(target_scores, "target scores")
    if candidate_mask is None:
        check_finite(candidate_scores, "candidate scores")
        above = candidate_scores > target_scores[:, None]
        ties = candidate_scores == target_scores[:, None]
    else:
        check_finite(np.where(candidate_mask, candidate_scores, 0.0), "candidate scores")
        above = (candidate_scores > target_scores[:, None]) & candidate_mask
        ties = (candidate_scores == target_scores[:, None]) & candidate_mask
    n_above = above.sum(axis=1)
    n_ties = ties.sum(axis=1)
    # Random position among the tied: uniform in {0, ..., n_ties}.
    tie_offset = np.floor(rng.random(len(n_ties)) * (n_ties + 1)).astype(np.int64)
    return n_above.astype(np.int64) + tie_offset


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """HR@k: share of rows whose target ranks among the top k."""
    ranks = np.asarray(ranks)
    return float(np.mean(ranks < k)) if len(ranks) else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 2) if rank < k, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not len(ranks):
        return float("nan")
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(np.mean(gains))
