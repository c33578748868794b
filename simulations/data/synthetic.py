"""Synthetic populations: users and items with known latent preferences.

The generative model
--------------------
Every item ``i`` has a latent vector ``q_i`` and a popularity prior ``pop_i``; every user
``u`` has a latent vector ``p_u`` and an activity ``n_u`` (how many distinct items the user
touches). The user's items are a draw *without replacement* of ``n_u`` items from

    P(i | u)  ∝  exp(log pop_i + <p_u, q_i> / temperature)

(a Plackett-Luce draw: the first item from the softmax, the next from the softmax over the
items left, and so on), each at a random time. In detail:

- **Latent vectors.** ``p_u`` and ``q_i`` have independent N(0, 1/sqrt(dim)) entries, so that
  the affinity ``<p_u, q_i>`` of a random pair has mean 0 and variance 1 whatever ``dim``:
  ``temperature`` alone sets how strongly taste matters (logit standard deviation
  ``1/temperature``).
- **Popularity.** Item popularity follows Zipf's law, ``pop ∝ rank**-popularity_exponent``,
  and the ranks are a random permutation of the items, so popular items are not simply the
  low ids. Popularity is independent of the latent vectors (it is a separate item bias).
- **Activity.** ``n_u = min_events + round(L)`` with ``L`` log-normal of shape
  ``activity_shape`` (the sigma of ``log L``), clipped to ``max_events_fraction * n_items``.
  The log-normal location is solved for so that the mean of the *clipped* counts is
  ``mean_events``. Sigma 1 gives a heavy tail like real logs: with the defaults and 10,000
  items, the median user has about 31 events, the 99th percentile 300 and the most active
  of 20,000 users about 1,250.
- **Time.** Each user starts at a random moment of a two-year window (from 2020-01-01) and is
  active over a random span of 30 to 365 days; each event gets an independent uniform second
  of that span. Order in time is independent of taste, so the latest interaction (the test
  item of the temporal leave-one-out split) is a fair draw. Equal seconds within a user are
  possible but rare (about one pair per few thousand users at 50 events on average).

The sampler: sampling-importance-resampling (SIR)
--------------------------------------------------
The exact draw needs the logits of every item for every user: n_users x n_items work, which
is too slow at a million users and ten thousand items. ``sampler="sir"`` (the default) instead
works per user on a small candidate set:

1. Draw ``K_u = ceil(candidates_factor * n_u)`` candidates from the popularity prior (the
   *proposal*; inverse CDF through a guide table). The uniforms are generated already
   sorted per user (normalised cumulative sums of exponentials), so equal candidates sit
   next to each other and are merged without sorting; ``c_i`` counts how often item ``i``
   was drawn.
2. Compute the affinity only for the distinct candidates (no users x items matrix, not even
   per block).
3. Keep the ``n_u`` distinct candidates with the largest
   ``<p_u, q_i> / temperature + log c_i + Gumbel`` (Gumbel-top-k). This is an exact draw
   without replacement from the importance-weighted candidate set: the importance weight is
   ``exp(<p_u, q_i> / temperature)`` because the proposal already carries the popularity,
   and ``log c_i`` counts a candidate drawn twice twice.

As ``candidates_factor`` grows, ``c_i / K_u`` tends to ``pop_i`` and the draw tends to the
exact one. With a finite factor taste is *damped*: only ``n_u`` of ``K_u`` candidates are
kept, and a loved item that the proposal did not offer cannot be chosen (the effective
sample size of the weights is about ``K_u * exp(-1/temperature**2)``). Measured with
:func:`sir_fidelity` (2,000 users, 2,000 items), the mean true affinity of the chosen items,
SIR / exact:

==============  ===============  ===============
temperature     factor 4         factor 8
==============  ===============  ===============
1.0 (default)   0.47 / 0.77      0.61 / 0.77
0.5             0.66 / 1.37      0.90 / 1.37
==============  ===============  ===============

So the data carry less taste than the ground-truth logits say, as if drawn at a higher
temperature; popularity is slightly overweighted in turn. Cost grows about linearly in the
factor. ``sampler="exact"`` (dense over items, a few million logits at a time: for small
populations) draws the model exactly.

A user interacts with an item at most once. If fewer than ``n_u`` distinct candidates turn
up (heavy users on a small or very skewed catalogue), the user keeps all of them and so has
fewer events than ``n_u`` (``requested_events`` keeps the drawn ``n_u``); if fewer than
``min_events`` turn up, that user is drawn exactly instead, so every user has at least
``min_events`` interactions.

Streaming and seeding
---------------------
Users are generated in fixed blocks of ``BLOCK_USERS`` users; block ``b`` draws from its own
generator, seeded by ``SeedSequence(seed, spawn_key=(1, b))``, and the items from
``SeedSequence(seed, spawn_key=(0,))``. The output therefore depends on the configuration
only, not on ``chunk_users``, and at most a block and a chunk are in memory: a million users
are generated without any users x items matrix. :func:`iter_synthetic` streams the
population in chunks; :func:`generate_synthetic` collects it into the same
:class:`~fedpref.simulations.data.interactions.Interactions` table as the loaders (rows
grouped by user, by time within each user; ``rating`` is ``None``) plus the ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from fedpref.simulations.progress import progress_bar
from fedpref.simulations.data.interactions import Interactions

#: Users per generator block. Part of the seeding contract: changing it changes every output.
BLOCK_USERS = 4096

#: Start of the time window, 2020-01-01T00:00:00Z (seconds since the epoch).
T0 = 1_577_836_800
_DAY = 86_400
_START_WINDOW = 2 * 365 * _DAY
_SPAN_RANGE = (30 * _DAY, 365 * _DAY)

#: Most logits the exact sampler holds at once (rows x items).
_EXACT_CELLS = 1 << 22

SAMPLERS = ("sir", "exact")


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that defines a synthetic population; equal configs give equal populations.

    - ``n_users``, ``n_items``: population and catalogue sizes.
    - ``dim``: latent dimension of the user and item vectors.
    - ``mean_events``: mean number of (distinct) items per user, after clipping to
      ``max_events_fraction * n_items`` (a heavy user on a skewed catalogue can fall a few
      short, see the module docstring).
    - ``min_events``: every user has at least this many interactions (3 lets every user be
      split into train / validation / test).
    - ``activity_shape``: sigma of the log-normal part of the events per user; 0 gives every
      user ``round(mean_events)``, 1 a heavy tail like real logs, 2 a very heavy one.
    - ``max_events_fraction``: no user touches more than this fraction of the catalogue.
    - ``popularity_exponent``: Zipf exponent of item popularity, item of rank r has weight
      ``r ** -popularity_exponent``; 0 is uniform, 1 is typical of real catalogues.
    - ``temperature``: softmax temperature on the affinities (which have unit variance over
      random pairs); smaller means taste matters more.
    - ``candidates_factor``: SIR candidates per requested event; larger is slower and closer
      to the exact softmax.
    - ``sampler``: ``"sir"`` (streams at any size) or ``"exact"`` (n_users x n_items work, in
      blocks; for checking SIR on small populations).
    - ``seed``: non-negative integer seed.
    """

    n_users: int = 10_000
    n_items: int = 2_000
    dim: int = 16
    mean_events: float = 50.0
    min_events: int = 3
    activity_shape: float = 1.0
    max_events_fraction: float = 0.2
    popularity_exponent: float = 1.0
    temperature: float = 1.0
    candidates_factor: float = 8.0
    sampler: str = "sir"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "dim", "min_events", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in (
            "mean_events",
            "activity_shape",
            "max_events_fraction",
            "popularity_exponent",
            "temperature",
            "candidates_factor",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")

        if self.n_users < 1:
            raise ValueError(f"n_users must be at least 1, got {self.n_users}")
        if self.dim < 1:
            raise ValueError(f"dim must be at least 1, got {self.dim}")
        if self.min_events < 1:
            raise ValueError(
                f"min_events must be at least 1, got {self.min_events} (3 lets every user be split "
                "into train, validation and test)"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if not 0 < self.max_events_fraction <= 1:
            raise ValueError(
                f"max_events_fraction must be in (0, 1], got {self.max_events_fraction}"
            )
        if not 0 <= self.activity_shape <= 4:
            raise ValueError(
                f"activity_shape (log-normal sigma of events per user) must be in [0, 4], "
                f"got {self.activity_shape}"
            )
        cap = self.max_events
        if cap < self.min_events:
            need = self._items_for_cap(self.min_events)
            raise ValueError(
                f"n_items must be at least {need} for min_events={self.min_events} with "
                f"max_events_fraction={self.max_events_fraction} (no user may touch more than "
                f"{self.max_events_fraction:g} of the catalogue); got n_items={self.n_items}: "
                "raise n_items or max_events_fraction, or lower min_events"
            )
        if self.mean_events < self.min_events:
            raise ValueError(
                f"mean_events ({self.mean_events}) must be at least min_events ({self.min_events}); "
                "raise mean_events or lower min_events"
            )
        if self.activity_shape > 0 and self.mean_events == self.min_events:
            raise ValueError(
                f"mean_events ({self.mean_events}) must exceed min_events ({self.min_events}) when "
                "activity_shape > 0 (a spread of counts needs room above the minimum); raise "
                "mean_events or set activity_shape=0"
            )
        if self.mean_events >= cap and not (self.activity_shape == 0 and self.mean_events == cap):
            need = self._items_for_cap(math.floor(self.mean_events) + 1)
            raise ValueError(
                f"mean_events ({self.mean_events}) must be below the per-user cap "
                f"max_events_fraction * n_items = {cap}; use n_items >= {need}, raise "
                "max_events_fraction or lower mean_events"
            )
        if not 0 <= self.popularity_exponent <= 5:
            raise ValueError(
                f"popularity_exponent must be in [0, 5] (0 is uniform, 1 is Zipf's law), "
                f"got {self.popularity_exponent}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.candidates_factor < 1:
            raise ValueError(
                f"candidates_factor must be at least 1 (SIR draws candidates_factor * n_u "
                f"candidates per user), got {self.candidates_factor}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")

    @property
    def max_events(self) -> int:
        """Per-user cap on events: ``floor(max_events_fraction * n_items)``."""
        return self._cap(self.n_items)

    def _cap(self, n_items: int) -> int:
        return int(math.floor(self.max_events_fraction * n_items + 1e-9))

    def _items_for_cap(self, cap: int) -> int:
        """The smallest catalogue whose per-user cap is at least ``cap``."""
        n = max(1, math.floor(cap / self.max_events_fraction) - 2)
        while self._cap(n) < cap:
            n += 1
        return n

    @property
    def name(self) -> str:
        return f"synthetic-{self.n_users}x{self.n_items}"


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticChunk:
    """Users ``start .. stop-1`` of a population and their interactions.

    ``user`` holds global user indices, grouped by user and by time within a user;
    ``requested`` is each user's drawn activity ``n_u`` (the realised count can be lower,
    never below ``min_events``).
    """

    start: int
    stop: int
    user_vectors: np.ndarray  # (stop - start, dim) float32
    requested: np.ndarray  # (stop - start,) int64
    user: np.ndarray  # int64
    item: np.ndarray  # int64
    timestamp: np.ndarray  # int64 seconds

    @property
    def n_users(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        return len(self.user)


@dataclass(frozen=True)
class SyntheticPopulation:
    """A synthetic interaction table and the ground truth it was drawn from."""

    interactions: Interactions
    user_vectors: np.ndarray  # (n_users, dim) float32
    item_vectors: np.ndarray  # (n_items, dim) float32
    item_popularity: np.ndarray  # (n_items,) float64 popularity prior, sums to 1
    requested_events: np.ndarray  # (n_users,) int64 drawn activity n_u
    config: SyntheticConfig = field(repr=False, default_factory=SyntheticConfig)

    def logits(self, users: np.ndarray | int) -> np.ndarray:
        """Ground-truth logits ``log pop_i + <p_u, q_i> / temperature``, (len(users), n_items).

        Ranking by these is the oracle of the model. The SIR sampler damps taste (see the
        module docstring), so with ``sampler="sir"`` the data look as if drawn at a somewhat
        higher temperature than these logits use.
        """
        users = np.atleast_1d(np.asarray(users, dtype=np.int64))
        affinity = self.user_vectors[users] @ self.item_vectors.T
        return np.log(self.item_popularity)[None, :] + affinity / self.config.temperature


# --------------------------------------------------------------------------------------
# Global draws: items and the activity distribution
# --------------------------------------------------------------------------------------


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _clipped_lognormal_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(exp(mu + sigma Z), cap)] for standard normal Z."""
    if sigma == 0:
        return min(math.exp(mu), cap)
    log_cap = math.log(cap)
    below = math.exp(mu + sigma * sigma / 2) * _normal_cdf((log_cap - mu - sigma * sigma) / sigma)
    above = cap * (1.0 - _normal_cdf((log_cap - mu) / sigma))
    return below + above


def activity_location(config: SyntheticConfig) -> float:
    """Log-normal location ``mu`` such that the clipped counts have mean ``mean_events``."""
    target = config.mean_events - config.min_events
    room = config.max_events - config.min_events
    sigma = config.activity_shape
    if target <= 0:
        return -math.inf
    if sigma == 0:
        return math.log(target)
    # E[min(L, room)] increases in mu from 0 to room > target: bisect.
    lo = math.log(target) - sigma * sigma / 2 - 1.0  # unclipped mean below target
    hi = math.log(target) + 1.0
    while _clipped_lognormal_mean(hi, sigma, room) < target:
        hi += 2.0 * sigma + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _clipped_lognormal_mean(mid, sigma, room) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class _InverseCDF:
    """Inverse CDF sampling from a discrete distribution whose probabilities decrease.

    Returns ``searchsorted(cdf, u, "right")`` for each uniform ``u``, via a guide table of
    ``G`` bins (a power of two, so ``u * G`` is exact) holding, per bin ``[g/G, (g+1)/G)``,
    the answer at its lower edge and the number of CDF steps inside. A bin with no step gives
    the answer at once, a bin with one step after one comparison; only bins with several
    steps need a binary search, and with decreasing probabilities those are the light tail.
    """

    def __init__(self, probabilities: np.ndarray, n_bins: int) -> None:
        cdf = np.cumsum(np.asarray(probabilities, dtype=np.float64))
        cdf /= cdf[-1]
        edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
        at_edges = np.searchsorted(cdf, edges, side="right").astype(np.int64)
        # Answer at the lower edge (low 32 bits) and steps inside (high 32 bits), packed so
        # that one gather reads both.
        self.guide = at_edges[:-1] | (np.diff(at_edges) << np.int64(32))
        self.cdf = cdf
        self.n_bins = n_bins

    def __call__(self, uniforms: np.ndarray) -> np.ndarray:
        g = (uniforms * self.n_bins).astype(np.int64)
        np.minimum(g, self.n_bins - 1, out=g)
        out = self.guide[g]
        del g
        steps = out >> np.int64(32)
        out &= np.int64(0xFFFFFFFF)
        one = np.flatnonzero(steps == 1)
        out[one] += uniforms[one] >= self.cdf[out[one]]
        many = np.flatnonzero(steps > 1)
        out[many] = np.searchsorted(self.cdf, uniforms[many], side="right")
        np.minimum(out, len(self.cdf) - 1, out=out)
        return out


def _n_bins(n: int, per_item: float, max_bins: int) -> int:
    """A power of two near ``per_item * n`` bins, between 64 and ``max_bins``."""
    return 1 << int(min(math.log2(max_bins), max(6, math.ceil(math.log2(per_item * n)))))


@dataclass(frozen=True)
class _Items:
    vectors: np.ndarray  # (n_items, dim) float32
    popularity: np.ndarray  # (n_items,) float64, sums to 1
    log_popularity: np.ndarray  # (n_items,) float64
    by_rank: np.ndarray  # item of popularity rank r (0 = most popular)
    vectors_by_rank: np.ndarray  # vectors[by_rank]: popular rows together, for the cache
    popularity_sampler: _InverseCDF  # draws popularity ranks


def _latent_scale(dim: int) -> float:
    # entries N(0, s^2) with dim * s^4 = 1: affinities of random pairs have unit variance.
    return dim ** -0.25


def _draw_items(config: SyntheticConfig) -> _Items:
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    vectors = (rng.standard_normal((config.n_items, config.dim)) * _latent_scale(config.dim)).astype(
        np.float32
    )
    ranks = np.arange(1, config.n_items + 1, dtype=np.float64)
    weights = ranks ** -config.popularity_exponent
    weights /= weights.sum()
    by_rank = rng.permutation(config.n_items).astype(np.int64)
    popularity = np.empty(config.n_items, dtype=np.float64)
    popularity[by_rank] = weights
    log_popularity = np.log(popularity)

    return _Items(
        vectors=vectors,
        popularity=popularity,
        log_popularity=log_popularity,
        by_rank=by_rank,
        vectors_by_rank=np.ascontiguousarray(vectors[by_rank]),
        popularity_sampler=_InverseCDF(weights, _n_bins(config.n_items, 64, 1 << 22)),
    )


# --------------------------------------------------------------------------------------
# One block of users
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    start: int
    user_vectors: np.ndarray  # (B, dim) float32
    requested: np.ndarray  # (B,) int64
    counts: np.ndarray  # (B,) int64 realised events per user
    item: np.ndarray  # int64, grouped by user, by time within user
    timestamp: np.ndarray  # int64

    @property
    def stop(self) -> int:
        return self.start + len(self.requested)


def _group_starts(counts: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return starts


def _sir_select(
    rng: np.random.Generator,
    config: SyntheticConfig,
    items: _Items,
    user_vectors: np.ndarray,
    n_req: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """SIR draw for a block. Returns (local user, item) rows, grouped by user."""
    n_block = len(n_req)
    n_cand = np.ceil(config.candidates_factor * n_req).astype(np.int64)
    total = int(n_cand.sum())
    starts = _group_starts(n_cand)

    # 1. Candidates from the popularity prior. Sorted uniforms per user: the cumulative sums
    # of K_u exponentials divided by the sum of K_u + 1 of them are the order statistics of
    # K_u uniforms (no sort needed); their inverse CDF gives popularity ranks, sorted too.
    cums = np.cumsum(rng.standard_exponential(total))
    base = np.zeros(n_block)
    base[1:] = cums[starts[1:] - 1]
    norm = cums[starts + n_cand - 1] - base + rng.standard_exponential(n_block)
    uniforms = cums
    uniforms -= np.repeat(base, n_cand)
    uniforms /= np.repeat(norm, n_cand)
    rank = items.popularity_sampler(uniforms)
    del cums, uniforms

    # Merge equal candidates: adjacent, because the ranks are sorted within each user.
    first = np.empty(total, dtype=bool)
    first[0] = True
    np.not_equal(rank[1:], rank[:-1], out=first[1:])
    first[starts] = True
    idx = np.flatnonzero(first)
    n_distinct = np.add.reduceat(first, starts, dtype=np.int64)
    multiplicity = np.diff(np.append(idx, total))
    d_rank = rank[idx]
    del rank, first, idx

    # 2. Key = affinity / T (the importance weight, in logs) + log multiplicity + Gumbel.
    affinity = np.einsum(
        "ij,ij->i",
        _gather_rows(user_vectors, None, n_distinct),
        _gather_rows(items.vectors_by_rank, d_rank, None),
    )
    key = affinity.astype(np.float64)
    key /= config.temperature
    key += np.log(multiplicity)
    key -= np.log(rng.standard_exponential(len(key)))  # + Gumbel(0, 1)
    del affinity, multiplicity

    # 3. The n_u largest keys per user. Rank within user by one stable sort of an int64
    # (user, -key) code, the key squashed monotonically into 40 bits.
    d_user = np.repeat(np.arange(n_block, dtype=np.int64), n_distinct)
    squashed = 0.5 - np.arctan(key) / np.pi  # in (0, 1), decreasing in key
    code = (squashed * float(1 << 40)).astype(np.int64)
    np.minimum(code, (1 << 40) - 1, out=code)
    code += d_user << np.int64(40)
    order = np.argsort(code, kind="stable")
    del code, squashed, key
    within = np.arange(len(order), dtype=np.int64)
    within -= np.repeat(_group_starts(n_distinct), n_distinct)  # order keeps the user groups
    chosen = np.zeros(len(order), dtype=bool)
    chosen[order[within < np.repeat(n_req, n_distinct)]] = True
    chosen = np.flatnonzero(chosen)
    return d_user[chosen], items.by_rank[d_rank[chosen]]


def _gather_rows(matrix: np.ndarray, index: np.ndarray | None, repeats: np.ndarray | None) -> np.ndarray:
    """``matrix[index]`` or ``np.repeat(matrix, repeats, axis=0)``, several times faster by
    moving whole rows as opaque bytes."""
    rows = np.ascontiguousarray(matrix).view(np.dtype((np.void, matrix.shape[1] * matrix.itemsize)))
    rows = rows.ravel()
    out = rows.take(index) if index is not None else np.repeat(rows, repeats)
    return out.view(matrix.dtype).reshape(-1, matrix.shape[1])


def _exact_select(
    rng: np.random.Generator,
    config: SyntheticConfig,
    items: _Items,
    user_vectors: np.ndarray,
    n_req: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Plackett-Luce draw (Gumbel-top-k over all items), rows of users at a time."""
    n_items = config.n_items
    rows_per = max(1, _EXACT_CELLS // n_items)
    users_out, items_out = [], []
    for lo in range(0, len(n_req), rows_per):
        hi = min(len(n_req), lo + rows_per)
        logits = (user_vectors[lo:hi] @ items.vectors.T).astype(np.float64) / config.temperature
        logits += items.log_popularity[None, :]
        logits -= np.log(rng.standard_exponential(logits.shape))
        order = np.argsort(-logits, axis=1)
        chosen = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(chosen, order, np.arange(n_items)[None, :] < n_req[lo:hi, None], axis=1)
        rows, cols = np.nonzero(chosen)
        users_out.append(rows.astype(np.int64) + lo)
        items_out.append(cols.astype(np.int64))
    return np.concatenate(users_out), np.concatenate(items_out)


def _draw_block(config: SyntheticConfig, items: _Items, mu: float, block: int) -> _Block:
    start = block * BLOCK_USERS
    n_block = min(BLOCK_USERS, config.n_users - start)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1, block)))

    user_vectors = (rng.standard_normal((n_block, config.dim)) * _latent_scale(config.dim)).astype(
        np.float32
    )
    extra = np.exp(mu + config.activity_shape * rng.standard_normal(n_block))
    n_req = np.rint(config.min_events + extra)
    n_req = np.clip(n_req, config.min_events, config.max_events).astype(np.int64)
    user_start = T0 + rng.integers(0, _START_WINDOW, size=n_block)
    user_span = rng.integers(*_SPAN_RANGE, size=n_block)

    if config.sampler == "exact":
        local, item = _exact_select(rng, config, items, user_vectors, n_req)
    else:
        local, item = _sir_select(rng, config, items, user_vectors, n_req)
        counts = np.bincount(local, minlength=n_block)
        short = np.flatnonzero(counts < config.min_events)
        if len(short):
            # Too few distinct candidates (very skewed popularity): draw these users exactly.
            keep = counts[local] >= config.min_events
            ex_local, ex_item = _exact_select(rng, config, items, user_vectors[short], n_req[short])
            local = np.concatenate([local[keep], short[ex_local]])
            item = np.concatenate([item[keep], ex_item])

    # Times: independent uniform seconds within each user's span; rows sorted by (user, time).
    offset = rng.integers(0, user_span[local])
    order = np.argsort((local << np.int64(32)) + offset, kind="stable")
    local, item = local[order], item[order]
    timestamp = user_start[local] + offset[order]
    counts = np.bincount(local, minlength=n_block).astype(np.int64)
    return _Block(start, user_vectors, n_req, counts, item, timestamp)


def _iter_blocks(config: SyntheticConfig, items: _Items) -> Iterator[_Block]:
    mu = activity_location(config)
    n_blocks = -(-config.n_users // BLOCK_USERS)
    for block in range(n_blocks):
        yield _draw_block(config, items, mu, block)


def _merge(blocks: list[_Block]) -> _Block:
    if len(blocks) == 1:
        return blocks[0]
    return _Block(
        blocks[0].start,
        np.concatenate([b.user_vectors for b in blocks]),
        np.concatenate([b.requested for b in blocks]),
        np.concatenate([b.counts for b in blocks]),
        np.concatenate([b.item for b in blocks]),
        np.concatenate([b.timestamp for b in blocks]),
    )


def _split(block: _Block, n_users: int) -> tuple[_Block, _Block]:
    """The first ``n_users`` users of a block, and the rest."""
    rows = int(block.counts[:n_users].sum())
    head = _Block(
        block.start,
        block.user_vectors[:n_users],
        block.requested[:n_users],
        block.counts[:n_users],
        block.item[:rows],
        block.timestamp[:rows],
    )
    tail = _Block(
        block.start + n_users,
        block.user_vectors[n_users:],
        block.requested[n_users:],
        block.counts[n_users:],
        block.item[rows:],
        block.timestamp[rows:],
    )
    return head, tail


def _rechunk(blocks: Iterator[_Block], chunk_users: int) -> Iterator[_Block]:
    """Regroup fixed-size blocks into chunks of ``chunk_users`` users (the last may be smaller)."""
    pending: list[_Block] = []
    n_pending = 0
    for block in blocks:
        pending.append(block)
        n_pending += len(block.requested)
        while n_pending >= chunk_users:
            head, tail = _split(_merge(pending), chunk_users)
            yield head
            pending = [tail] if len(tail.requested) else []
            n_pending -= chunk_users
    if n_pending:
        yield _merge(pending)


def _check_chunk_users(chunk_users: int) -> None:
    if isinstance(chunk_users, bool) or not isinstance(chunk_users, (int, np.integer)) or chunk_users < 1:
        raise ValueError(f"chunk_users must be a positive integer, got {chunk_users!r}")


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def iter_synthetic(config: SyntheticConfig, *, chunk_users: int = 20_000) -> Iterator[SyntheticChunk]:
    """Stream a synthetic population in chunks of ``chunk_users`` users, in user order.

    Memory holds one chunk plus one generator block at a time, never a users x items matrix.
    The chunks do not depend on ``chunk_users`` beyond where they are cut: concatenated, any
    chunking gives the same population (and the same as :func:`generate_synthetic`).
    """
    _check_chunk_users(chunk_users)
    items = _draw_items(config)
    for block in _rechunk(_iter_blocks(config, items), chunk_users):
        user = np.repeat(np.arange(block.start, block.stop, dtype=np.int64), block.counts)
        yield SyntheticChunk(
            start=block.start,
            stop=block.stop,
            user_vectors=block.user_vectors,
            requested=block.requested,
            user=user,
            item=block.item,
            timestamp=block.timestamp,
        )


def synthetic_items(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """The ground-truth item vectors (n_items, dim) float32 and popularity (n_items,)."""
    items = _draw_items(config)
    return items.vectors, items.popularity


class _Columns:
    """The item and timestamp columns, appended to in place (amortised growth)."""

    def __init__(self, capacity: int) -> None:
        self.item = np.empty(capacity, dtype=np.int64)
        self.timestamp = np.empty(capacity, dtype=np.int64)
        self.size = 0

    def append(self, item: np.ndarray, timestamp: np.ndarray) -> None:
        end = self.size + len(item)
        if end > len(self.item):
            capacity = max(end, len(self.item) + len(self.item) // 4)
            for name in ("item", "timestamp"):
                grown = np.empty(capacity, dtype=np.int64)
                grown[: self.size] = getattr(self, name)[: self.size]
                setattr(self, name, grown)
        self.item[self.size : end] = item
        self.timestamp[self.size : end] = timestamp
        self.size = end

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """The filled part; trimmed by a copy only when over a tenth of the buffer is unused."""
        if self.size < 0.9 * len(self.item):
            return self.item[: self.size].copy(), self.timestamp[: self.size].copy()
        return self.item[: self.size], self.timestamp[: self.size]


def generate_synthetic(
    config: SyntheticConfig, *, chunk_users: int = 20_000, progress: bool = False
) -> SyntheticPopulation:
    """Generate a whole synthetic population: the interaction table plus the ground truth.

    ``progress=True`` shows a progress bar over users (rich). The result does not depend
    on ``chunk_users``, which only sets how many users are generated between updates.
    """
    _check_chunk_users(chunk_users)
    items = _draw_items(config)
    user_vectors = np.empty((config.n_users, config.dim), dtype=np.float32)
    requested = np.empty(config.n_users, dtype=np.int64)
    counts = np.empty(config.n_users, dtype=np.int64)
    # The table is written into buffers sized for mean_events (plus a margin) and grown if
    # needed, so that no list of parts doubles the memory at the end.
    buffers = _Columns(int(config.n_users * config.mean_events * 1.05) + 1024)

    def collect(block: _Block) -> None:
        user_vectors[block.start : block.stop] = block.user_vectors
        requested[block.start : block.stop] = block.requested
        counts[block.start : block.stop] = block.counts
        buffers.append(block.item, block.timestamp)

    chunks = _rechunk(_iter_blocks(config, items), chunk_users)
    with progress_bar(config.n_users, f"{config.name} users", progress) as advance:
        for block in chunks:
            collect(block)
            advance(steps=block.stop - block.start)

    item, timestamp = buffers.finish()
    del buffers
    user = np.repeat(np.arange(config.n_users, dtype=np.int64), counts)
    # No duplicate (user, item) pairs by construction, so build_interactions' merge is skipped.
    interactions = Interactions(
        user=user,
        item=item,
        timestamp=timestamp,
        rating=None,
        user_ids=np.arange(config.n_users, dtype=np.int64),
        item_ids=np.arange(config.n_items, dtype=np.int64),
        name=config.name,
    )
    return SyntheticPopulation(
        interactions=interactions,
        user_vectors=user_vectors,
        item_vectors=items.vectors,
        item_popularity=items.popularity,
        requested_events=requested,
        config=config,
    )


def sir_fidelity(config: SyntheticConfig, *, n_users: int = 2_000) -> dict[str, float]:
    """Compare the SIR sampler with the exact one on ``n_users`` users of ``config``.

    Returns the mean ground-truth affinity of chosen items and the share of interactions on
    the top 1% of items under each sampler: SIR close to exact means the approximation holds
    at this temperature and candidates factor.
    """
    from dataclasses import replace

    out: dict[str, float] = {}
    for sampler in SAMPLERS:
        pop = generate_synthetic(replace(config, n_users=n_users, sampler=sampler))
        table = pop.interactions
        affinity = np.einsum("ij,ij->i", pop.user_vectors[table.user], pop.item_vectors[table.item])
        top = np.argsort(-pop.item_popularity)[: max(1, config.n_items // 100)]
        out[f"{sampler}_mean_affinity"] = float(affinity.mean())
        out[f"{sampler}_top1pct_share"] = float(np.isin(table.item, top).mean())
        out[f"{sampler}_events_per_user"] = len(table) / n_users
    return out
