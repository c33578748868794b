"""Populations fitted to a real data set: ``fitted:SOURCE:N[:seed=S]``.

A generator learns the item side and the distribution of people's tastes and activity from a
real interaction table (by default the built-in ``movielens-small``), then draws any number of
new people, streamed in chunks like :func:`fedpref.simulations.data.synthetic.iter_synthetic`.

What is fitted (once per source, then cached)
---------------------------------------------
1. **Items.** Centralised matrix factorisation (:func:`fedpref.simulations.reference.train_centralised`,
   the tuned settings of docs/reference.md but a smaller ``dim``) on the source's training split
   (the temporal leave-one-out split, seed 0): item vectors ``q_i``, item biases ``b_i``, and one
   vector ``p_u`` per real person. The source's own count of each item is kept for the time
   order below.
2. **People.** Each real person becomes a feature vector ``x_u = [PCA_k(p_u), z(n_u)]``: the
   first ``k`` principal components of the user vectors (the fewest that hold
   ``pca_variance`` of their variance, at most ``max_components``) and the normal score of the
   person's history length (its rank among the source's people mapped to a standard normal
   quantile; a drawn score is mapped back through the source's quantiles of ``log n_u``, so
   drawn lengths follow the real distribution, heavy tail included). A Gaussian
   mixture with full covariances (plus a ridge) is fitted to these by EM, its number of
   components chosen by BIC among ``mixture_sizes``, the best of ``restarts`` starts each. The
   variance that the ``k`` components leave out is drawn back as isotropic Gaussian noise in
   the other directions. Fitting vectors and lengths jointly keeps their correlation (heavy
   users do not have the same taste as light ones).

How a person is drawn
---------------------
- ``x ~ mixture`` gives ``p_u`` (components plus residual noise) and ``n_u`` (the length
  quantile of the drawn score, interpolated in ``log n``), clipped to ``[3, 0.3 * n_items]``.
- The items are a Plackett-Luce draw of ``n_u`` distinct items from
  ``softmax(<p_u, q_i> / temperature + beta * b_i)`` (Gumbel-top-k, exact over every item:
  the logits of a block of people are one matrix product). With ``popularity_share`` ``rho``
  above 0 the distribution is the mixture ``(1 - rho) * that + rho * popularity`` (the source's
  item shares), for data whose histories hold more popular items than taste explains.
- Time order: the drawn items are sorted by ``-gamma * log count_i + Gumbel`` (``count_i`` the
  source's count of item ``i``), so popular items tend to come early and the latest item (the
  test item of the temporal split) tends to be rarer, as in real logs, where it is often a new
  release. ``gamma = 0`` gives a random order. Times are then strictly increasing seconds
  inside a random span of 30 to 365 days starting somewhere in a two-year window (as
  synthetic.py draws them).

``temperature``, ``beta``, ``gamma`` and ``popularity_share`` are draw settings
(:class:`DrawSettings`), not part of the fit; their defaults were calibrated against
movielens-small by ``benchmarks/fitted_calibration.py`` (docs/data.md, "Fitted populations").

Streaming and seeding
---------------------
People are drawn in fixed blocks of :data:`BLOCK_USERS`; block ``b`` draws from
``SeedSequence(seed, spawn_key=(1, b))``. The population therefore depends only on the fit,
``N`` and the seed, never on how it is chunked, and memory holds one block (and a few million
logits) at a time: ten million people stream like ten thousand.

The cache
---------
A fit is written to ``<cache>/fitted-<slug>-d<dim>-seed<seed>.npz`` (mode 0600; a file
source's slug is its stem plus a short hash of its path), where
``<cache>`` is the ``cache_dir`` argument, else the environment variable
``FEDPREF_CACHE_DIR``, else ``results/generators``. The file holds plain arrays and a JSON
header (format version, the SHA-256 of the source's interaction table, the fit's settings);
it is read with ``allow_pickle=False`` and checked (names, shapes, dtypes, finite values, a
valid mixture). A file for another source content, another fit setting or another format
version is refitted; a damaged or foreign one is refitted with a :class:`FitCacheWarning`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np

from fedpref.models.files import private_folder, replace_private
from fedpref.simulations.data.interactions import DataFormatError, Interactions
from fedpref.simulations.data.synthetic import T0, SyntheticChunk, _Block, _Columns, _rechunk
from fedpref.simulations.progress import progress_bar

FITTED = re.compile(r"^fitted:(.+):(\d+)(?::seed=(\d+))?$")

#: People per generator block. Part of the seeding contract: changing it changes every output.
BLOCK_USERS = 2048

#: Version of the cache file's layout; a file of another version is refitted.
FORMAT_VERSION = 1

#: Every drawn person has at least this many events (one train, one validation, one test).
MIN_EVENTS = 3

#: No drawn person touches more than this share of the catalogue (the real maximum is 26%).
MAX_EVENTS_FRACTION = 0.3

#: Most logits held at once while drawing (rows x items).
_CELLS = 1 << 22

_DAY = 86_400
_START_WINDOW = 2 * 365 * _DAY
_SPAN_RANGE = (30 * _DAY, 365 * _DAY)

DEFAULT_CACHE = Path("results/generators")
CACHE_ENV = "FEDPREF_CACHE_DIR"


class FitCacheWarning(UserWarning):
    """A cached fit could not be used (damaged, foreign, or unreadable) and was refitted."""


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FittedSpec:
    """A parsed ``fitted:SOURCE:N[:seed=S]``: draw ``n_users`` people like those of ``source``."""

    source: str
    n_users: int
    seed: int


def parse_fitted(spec: str, *, seed: int = 0) -> FittedSpec | None:
    """The spec named by ``spec``, or None when it is not a ``fitted:`` name. The source is
    everything between ``fitted:`` and the last ``:N`` (a file path may hold colons)."""
    match = FITTED.match(spec)
    if not match:
        return None
    source, n_users, spec_seed = match.groups()
    if source.startswith(("fitted:", "synthetic:")):
        raise DataFormatError(f"{spec}: a fitted population is fitted to real data, not to {source!r}")
    if int(n_users) < 1:
        raise DataFormatError(f"{spec}: a population needs at least one person")
    return FittedSpec(source=source, n_users=int(n_users), seed=int(spec_seed) if spec_seed else seed)


def source_slug(source: str) -> str:
    """A short file-name-safe name for a source: the built-in name, or a file's stem."""
    stem = Path(source).stem if ("/" in source or "." in source) else source
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")
    return slug or "source"


def population_name(source: str, n_users: int, seed: int) -> str:
    """``fitted-<slug>-<N>``, plus ``-seed<S>`` when the seed is not 0."""
    name = f"fitted-{source_slug(source)}-{n_users}"
    return name if seed == 0 else f"{name}-seed{seed}"


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitConfig:
    """How a generator is fitted; a cached fit is reused only for equal settings.

    - ``dim``: latent dimension of the matrix factorisation (the tuned 128 of the reference
      fits 671 people's vectors no better, and the mixture needs fewer dimensions).
    - ``max_epochs``, ``patience``: early stopping of the MF on validation NDCG@10.
    - ``pca_variance``: the PCA keeps the fewest components holding this share of the user
      vectors' variance, at most ``max_components``.
    - ``mixture_sizes``: numbers of mixture components tried (chosen by BIC); a size is
      skipped when it would leave fewer than ``features + 1`` people per component.
    - ``restarts``: EM starts per size (the best likelihood is kept).
    - ``ridge``: added to every covariance's diagonal (features are standardised first).
    - ``seed``: the split's, the MF's and the EM's seed.
    """

    dim: int = 32
    max_epochs: int = 60
    patience: int = 5
    pca_variance: float = 0.9
    max_components: int = 16
    mixture_sizes: tuple[int, ...] = (1, 2, 4, 8)
    restarts: int = 10
    ridge: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "max_epochs", "patience", "max_components", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0 < self.pca_variance <= 1:
            raise ValueError(f"pca_variance must be in (0, 1], got {self.pca_variance}")
        if not self.mixture_sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.mixture_sizes):
            raise ValueError(f"mixture_sizes must be positive integers, got {self.mixture_sizes!r}")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise ValueError(f"ridge must be zero or positive, got {self.ridge}")

    def as_json(self) -> dict:
        out = asdict(self)
        out["mixture_sizes"] = list(self.mixture_sizes)
        return out


#: The fit that ``fitted:`` names use.
DEFAULT_FIT = FitConfig()


@dataclass(frozen=True)
class DrawSettings:
    """How people are drawn from a fit (see the module docstring). The defaults were
    calibrated on movielens-small (``benchmarks/fitted_calibration.py``)."""

    temperature: float = 0.6
    beta: float = 0.6
    gamma: float = 0.6
    popularity_share: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 <= self.popularity_share < 1:
            raise ValueError(f"popularity_share must be in [0, 1), got {self.popularity_share}")


# --------------------------------------------------------------------------------------
# The Gaussian mixture (EM, numpy only)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture: ``weights`` (K,), ``means`` (K, D), ``covariances`` (K, D, D)."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    log_likelihood: float = float("nan")  # total over the points it was fitted to

    @property
    def n_components(self) -> int:
        return len(self.weights)

    @property
    def n_parameters(self) -> int:
        k, d = self.means.shape
        return (k - 1) + k * d + k * d * (d + 1) // 2

    def bic(self, n_points: int) -> float:
        return -2.0 * self.log_likelihood + self.n_parameters * math.log(n_points)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` points, (n, D)."""
        chol = np.linalg.cholesky(self.covariances)
        comp = rng.choice(self.n_components, size=n, p=self.weights)
        eps = rng.standard_normal((n, self.means.shape[1]))
        return self.means[comp] + np.einsum("nij,nj->ni", chol[comp], eps)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    """The standard normal CDF, through erf of Abramowitz and Stegun 7.1.26 (error < 1.5e-7)."""
    x = np.abs(z) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    return 0.5 * (1.0 + np.sign(z) * erf)


def _log_densities(x: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """log N(x_n; mean_k, cov_k), (n, K)."""
    n, d = x.shape
    out = np.empty((n, len(means)))
    for k, (mean, cov) in enumerate(zip(means, covariances)):
        chol = np.linalg.cholesky(cov)
        z = np.linalg.solve(chol, (x - mean).T)  # (d, n)
        out[:, k] = -0.5 * (z * z).sum(axis=0) - np.log(np.diag(chol)).sum() - 0.5 * d * math.log(2 * math.pi)
    return out


def _logsumexp(a: np.ndarray) -> np.ndarray:
    top = a.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(axis=1, keepdims=True)))[:, 0]


def fit_mixture(
    x: np.ndarray,
    n_components: int,
    *,
    rng: np.random.Generator,
    restarts: int = 10,
    ridge: float = 1e-3,
    max_iter: int = 300,
    tol: float = 1e-7,
) -> Mixture:
    """EM for a Gaussian mixture with full covariances (``ridge * I`` added to each), the best
    of ``restarts`` starts (k-means++-style seeding from the data)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n_components < 1 or n < n_components:
        raise ValueError(f"cannot fit {n_components} components to {n} points")
    eye = ridge * np.eye(d)
    base_cov = np.cov(x, rowvar=False).reshape(d, d) + eye
    best: Mixture | None = None
    for _ in range(restarts):
        # k-means++ seeding: spread the starting means over the data.
        centres = [x[rng.integers(n)]]
        for _ in range(1, n_components):
            dist = np.min([((x - c) ** 2).sum(axis=1) for c in centres], axis=0)
            total = dist.sum()
            centres.append(x[rng.choice(n, p=dist / total)] if total > 0 else x[rng.integers(n)])
        means = np.array(centres)
        covs = np.repeat(base_cov[None], n_components, axis=0)
        weights = np.full(n_components, 1.0 / n_components)
        previous = -np.inf
        for _ in range(max_iter):
            log_p = _log_densities(x, means, covs) + np.log(weights)
            norm = _logsumexp(log_p)
            ll = float(norm.sum())
            resp = np.exp(log_p - norm[:, None])
            nk = resp.sum(axis=0) + 1e-12
            weights = nk / n
            means = (resp.T @ x) / nk[:, None]
            for k in range(n_components):
                centred = x - means[k]
                covs[k] = (resp[:, k, None] * centred).T @ centred / nk[k] + eye
            if ll - previous < tol * n:
                break
            previous = ll
        ll = float(_logsumexp(_log_densities(x, means, covs) + np.log(weights)).sum())
        if best is None or ll > best.log_likelihood:
            best = Mixture(weights=weights.copy(), means=means.copy(), covariances=covs.copy(), log_likelihood=ll)
    assert best is not None
    return best


def select_mixture(
    x: np.ndarray, sizes: tuple[int, ...], *, rng: np.random.Generator, restarts: int = 10, ridge: float = 1e-3
) -> tuple[Mixture, dict[int, float]]:
    """The mixture of lowest BIC among ``sizes`` (sizes that would leave fewer than ``D + 1``
    points per component are skipped), and the BIC of every size tried."""
    n, d = x.shape
    tried = [k for k in sizes if k * (d + 1) <= n] or [1]
    bics: dict[int, float] = {}
    best: Mixture | None = None
    for k in tried:
        mix = fit_mixture(x, k, rng=rng, restarts=restarts, ridge=ridge)
        bics[k] = mix.bic(n)
        if best is None or bics[k] < best.bic(n):
            best = mix
    assert best is not None
    return best, bics


# --------------------------------------------------------------------------------------
# The fitted model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FittedModel:
    """Everything a fitted generator draws from (the cache file's content) plus draw settings."""

    source: str
    source_sha256: str
    config: FitConfig
    item_vectors: np.ndarray  # (n_items, dim) float32
    item_bias: np.ndarray  # (n_items,) float64
    item_counts: np.ndarray  # (n_items,) int64, the source's events per item
    pca_mean: np.ndarray  # (dim,)
    pca_components: np.ndarray  # (k, dim), orthonormal rows
    residual_std: float  # per-direction std of the user vectors outside the k components
    length_quantiles: np.ndarray  # (people,) the source's sorted log history lengths
    feature_mean: np.ndarray  # (k + 1,) the mixture is fitted to standardised features
    feature_std: np.ndarray  # (k + 1,)
    mixture: Mixture  # over standardised [PCA_k(p_u), normal score of n_u]
    info: dict = field(default_factory=dict)  # the fit's figures (MF metrics, BIC per size, ...)
    draw: DrawSettings = field(default_factory=DrawSettings)

    @property
    def n_items(self) -> int:
        return len(self.item_bias)

    @property
    def dim(self) -> int:
        return self.item_vectors.shape[1]

    @property
    def max_events(self) -> int:
        return int(math.floor(MAX_EVENTS_FRACTION * self.n_items + 1e-9))

    @property
    def fingerprint(self) -> str:
        """What the people drawn from this model depend on, as a SHA-256: the fit's arrays and
        the draw settings (a refit of the same source may differ in its last bits, and so do
        its people). A population folder keeps it, so a refit is not taken for the same population."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"source": self.source_sha256, "config": self.config.as_json(), "draw": asdict(self.draw)},
                                 sort_keys=True, default=str).encode())
        for array in (self.item_vectors, self.item_bias, self.item_counts, self.pca_mean, self.pca_components,
                      self.length_quantiles, self.feature_mean, self.feature_std):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(repr(self.residual_std).encode())
        for array in (self.mixture.weights, self.mixture.means, self.mixture.covariances):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def with_draw(self, **settings: float) -> FittedModel:
        """The same fit drawn with other settings (``temperature=0.8``, ...)."""
        return replace(self, draw=replace(self.draw, **settings))

    def draw_people(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` people's vectors (n, dim) float32 and history lengths (n,) int64."""
        x = self.mixture.sample(n, rng) * self.feature_std + self.feature_mean
        k = len(self.pca_components)
        vectors = self.pca_mean + x[:, :k] @ self.pca_components
        if self.residual_std > 0:
            noise = rng.standard_normal((n, self.dim)) * self.residual_std
            noise -= (noise @ self.pca_components.T) @ self.pca_components  # outside the kept components
            vectors += noise
        m = len(self.length_quantiles)
        log_length = np.interp(_normal_cdf(x[:, k]), (np.arange(m) + 0.5) / m, self.length_quantiles)
        lengths = np.clip(np.rint(np.exp(log_length)), MIN_EVENTS, self.max_events).astype(np.int64)
        return vectors.astype(np.float32), lengths


# --------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------


def table_sha256(table: Interactions) -> str:
    """SHA-256 of what a fit reads of a table: sizes, user and item indices, timestamps."""
    h = hashlib.sha256()
    h.update(f"{table.n_users} {table.n_items} {len(table)}".encode())
    for column in (table.user, table.item, table.timestamp):
        h.update(b"|")
        if column is None:
            h.update(b"none")
        else:
            h.update(np.ascontiguousarray(column, dtype=np.int64).tobytes())
    return h.hexdigest()


def _load_source(source: str) -> Interactions:
    from fedpref.simulations.data.registry import load_dataset

    if source.startswith(("fitted:", "synthetic:")):
        raise DataFormatError(f"a fitted population is fitted to real data, not to {source!r}")
    return load_dataset(source)


def _fit(source: str, table: Interactions, sha: str, config: FitConfig, *, progress: bool) -> FittedModel:
    """Fit a generator to ``table`` (see the module docstring)."""
    from fedpref.models.preference import ModelSpec
    from fedpref.models.train import default_config
    from fedpref.simulations.data.split import leave_one_out
    from fedpref.simulations.reference import train_centralised

    if math.floor(MAX_EVENTS_FRACTION * table.n_items + 1e-9) < MIN_EVENTS:
        raise DataFormatError(
            f"{source}: {table.n_items} items are too few to fit a generator (every person needs "
            f"{MIN_EVENTS} distinct items and at most {MAX_EVENTS_FRACTION:g} of the catalogue)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # users too short to split are dropped from the fit only
        split = leave_one_out(table, seed=config.seed)
    n_people = split.n_users
    if n_people < 2:
        raise DataFormatError(f"{source}: at least 2 people with 3 or more events are needed to fit a generator")
    train = replace(default_config("mf"), model=ModelSpec(kind="mf", dim=config.dim))
    result = train_centralised(
        split, train, max_epochs=config.max_epochs, patience=config.patience, seed=config.seed,
        full_eval=False, show_progress=progress,
    )
    assert result.shared is not None and result.private is not None
    q = np.asarray(result.shared["item_embedding.weight"], dtype=np.float32)
    b = np.asarray(result.shared["item_bias.weight"], dtype=np.float64).reshape(-1)
    p = np.asarray(result.private["user_embedding.weight"], dtype=np.float64)

    counts = np.bincount(table.user, minlength=table.n_users)
    lengths = counts[counts >= MIN_EVENTS].astype(np.float64)
    item_counts = np.bincount(table.item, minlength=table.n_items).astype(np.int64)

    # PCA of the user vectors.
    mean = p.mean(axis=0)
    _, s, vt = np.linalg.svd(p - mean, full_matrices=False)
    var = s**2 / max(1, n_people - 1)
    share = np.cumsum(var) / var.sum() if var.sum() > 0 else np.ones_like(var)
    k = int(min(np.searchsorted(share, config.pca_variance - 1e-12) + 1, config.max_components, len(var)))
    components = vt[:k]
    left = config.dim - k
    residual_std = float(math.sqrt(var[k:].sum() / left)) if left > 0 else 0.0

    log_length = np.log(lengths)
    ranks = np.argsort(np.argsort(log_length, kind="stable"), kind="stable")
    normal = NormalDist()
    scores = np.array([normal.inv_cdf((r + 0.5) / n_people) for r in ranks])
    features = np.column_stack([(p - mean) @ components.T, scores])
    f_mean, f_std = features.mean(axis=0), features.std(axis=0)
    f_std[f_std == 0] = 1.0
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(3,)))
    mixture, bics = select_mixture(
        (features - f_mean) / f_std, config.mixture_sizes, rng=rng, restarts=config.restarts, ridge=config.ridge
    )
    info = {
        "mf_best_epoch": result.best_epoch,
        "mf_val_hr": result.val.hr,
        "mf_test_hr": result.test.hr,
        "people": n_people,
        "pca_components": k,
        "pca_variance_kept": float(share[k - 1]),
        "bic": {str(size): value for size, value in bics.items()},
        "mixture_components": mixture.n_components,
    }
    return FittedModel(
        source=source,
        source_sha256=sha,
        config=config,
        item_vectors=q,
        item_bias=b,
        item_counts=item_counts,
        pca_mean=mean,
        pca_components=components,
        residual_std=residual_std,
        length_quantiles=np.sort(log_length),
        feature_mean=f_mean,
        feature_std=f_std,
        mixture=mixture,
        info=info,
    )


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------


def cache_folder(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$FEDPREF_CACHE_DIR``, else ``results/generators``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else DEFAULT_CACHE


def cache_path(source: str, config: FitConfig, cache_dir: str | Path | None = None) -> Path:
    """Where the fit of ``source`` with ``config`` is cached. A file source's name carries a
    short hash of its absolute path, so that two files of the same name keep separate fits."""
    slug = source_slug(source)
    if Path(source).exists():
        slug += "-" + hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:8]
    return cache_folder(cache_dir) / f"fitted-{slug}-d{config.dim}-seed{config.seed}.npz"


_ARRAYS = (
    "item_vectors", "item_bias", "item_counts", "pca_mean", "pca_components", "length_quantiles", "feature_mean", "feature_std",
    "mix_weights", "mix_means", "mix_covariances",
)


def _to_bytes(model: FittedModel) -> bytes:
    header = {
        "format_version": FORMAT_VERSION,
        "generator": "fedpref fitted",
        "source": model.source,
        "source_sha256": model.source_sha256,
        "fit_config": model.config.as_json(),
        "residual_std": model.residual_std,
        "mix_log_likelihood": model.mixture.log_likelihood,
        "info": model.info,
    }
    buffer = io.BytesIO()
    np.savez(
        buffer,
        header=np.array(json.dumps(header, sort_keys=True)),
        item_vectors=model.item_vectors,
        item_bias=model.item_bias,
        item_counts=model.item_counts,
        pca_mean=model.pca_mean,
        pca_components=model.pca_components,
        length_quantiles=model.length_quantiles,
        feature_mean=model.feature_mean,
        feature_std=model.feature_std,
        mix_weights=model.mixture.weights,
        mix_means=model.mixture.means,
        mix_covariances=model.mixture.covariances,
    )
    return buffer.getvalue()


class _Stale(Exception):
    """A readable cache file for another source content or setting (refitted silently)."""


def _read_cache(path: Path, source: str, sha: str, config: FitConfig, n_items: int) -> FittedModel:
    """The fit stored at ``path``; raises _Stale for another source/setting, ValueError (or a
    read error) for a file that is not a sound fit."""
    with np.load(path, allow_pickle=False) as npz:
        names = set(npz.files)
        missing = {"header", *_ARRAYS} - names
        if missing:
            raise ValueError(f"missing arrays {sorted(missing)}")
        header_array = npz["header"]
        if header_array.shape != () or header_array.dtype.kind != "U":
            raise ValueError("the header is not a JSON string")
        header = json.loads(str(header_array))
        if not isinstance(header, dict) or header.get("generator") != "fedpref fitted":
            raise ValueError("not a fedpref fitted generator")
        if header.get("format_version") != FORMAT_VERSION:
            raise _Stale(f"format version {header.get('format_version')!r}, not {FORMAT_VERSION}")
        if header.get("source_sha256") != sha or header.get("source") != source:
            raise _Stale("fitted to other data")
        if header.get("fit_config") != config.as_json():
            raise _Stale("fitted with other settings")
        arrays = {name: npz[name] for name in _ARRAYS}

    def check(name: str, kind: str, shape: tuple) -> np.ndarray:
        value = arrays[name]
        if value.dtype.kind != kind or value.shape != shape:
            raise ValueError(f"{name} has dtype {value.dtype} and shape {value.shape}, expected kind {kind!r} and {shape}")
        if kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"{name} holds values that are not finite")
        return value

    d = config.dim
    k = arrays["pca_components"].shape[0] if arrays["pca_components"].ndim == 2 else -1
    n_mix = arrays["mix_weights"].shape[0] if arrays["mix_weights"].ndim == 1 else -1
    if not 1 <= k <= d or n_mix < 1:
        raise ValueError("the PCA or the mixture is empty")
    q = check("item_vectors", "f", (n_items, d))
    b = check("item_bias", "f", (n_items,))
    counts = check("item_counts", "i", (n_items,))
    pca_mean = check("pca_mean", "f", (d,))
    components = check("pca_components", "f", (k, d))
    n_lengths = arrays["length_quantiles"].shape[0] if arrays["length_quantiles"].ndim == 1 else 0
    quantiles = check("length_quantiles", "f", (n_lengths,))
    if n_lengths < 2 or np.any(np.diff(quantiles) < 0) or quantiles[0] < 0:
        raise ValueError("length_quantiles are not sorted log lengths of two or more people")
    f_mean = check("feature_mean", "f", (k + 1,))
    f_std = check("feature_std", "f", (k + 1,))
    weights = check("mix_weights", "f", (n_mix,))
    means = check("mix_means", "f", (n_mix, k + 1))
    covs = check("mix_covariances", "f", (n_mix, k + 1, k + 1))
    residual = header.get("residual_std")
    if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not math.isfinite(residual) or residual < 0:
        raise ValueError(f"residual_std {residual!r} is not a non-negative number")
    if (counts < 0).any() or (f_std <= 0).any():
        raise ValueError("negative item counts or feature scales")
    if (weights < 0).any() or abs(weights.sum() - 1) > 1e-6:
        raise ValueError("the mixture weights are not a distribution")
    if not np.allclose(covs, np.transpose(covs, (0, 2, 1))):
        raise ValueError("a mixture covariance is not symmetric")
    np.linalg.cholesky(covs)  # LinAlgError (a ValueError) unless positive definite
    if not np.allclose(components @ components.T, np.eye(k), atol=1e-4):
        raise ValueError("the PCA components are not orthonormal")
    info = header.get("info") if isinstance(header.get("info"), dict) else {}
    return FittedModel(
        source=source,
        source_sha256=sha,
        config=config,
        item_vectors=q.astype(np.float32, copy=False),
        item_bias=b.astype(np.float64, copy=False),
        item_counts=counts.astype(np.int64, copy=False),
        pca_mean=pca_mean.astype(np.float64, copy=False),
        pca_components=components.astype(np.float64, copy=False),
        residual_std=float(residual),
        length_quantiles=quantiles.astype(np.float64, copy=False),
        feature_mean=f_mean.astype(np.float64, copy=False),
        feature_std=f_std.astype(np.float64, copy=False),
        mixture=Mixture(weights.astype(np.float64), means.astype(np.float64), covs.astype(np.float64),
                        float(header.get("mix_log_likelihood", float("nan")))),
        info=info,
    )


def fit_generator(
    source: str = "movielens-small",
    *,
    config: FitConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> FittedModel:
    """The generator fitted to ``source`` (any :func:`~fedpref.simulations.data.registry.load_dataset`
    source but a generator): read from the cache when a sound fit of the same source content and
    settings is there, else fitted and written to it (see the module docstring)."""
    config = config or FitConfig()
    table = _load_source(source)
    sha = table_sha256(table)
    path = cache_path(source, config, cache_dir)
    if path.exists():
        try:
            return _read_cache(path, source, sha, config, table.n_items)
        except _Stale:
            pass
        except Exception as exc:  # noqa: BLE001 - any unreadable file is refitted, never trusted
            warnings.warn(f"{path}: not a usable fitted generator ({exc}); fitting again", FitCacheWarning, stacklevel=2)
    model = _fit(source, table, sha, config, progress=progress)
    private_folder(path.parent)
    replace_private(path, _to_bytes(model))
    return model


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def _top_rows(keys: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row r, the ``n[r]`` columns of largest key in decreasing key order:
    (row, column) pairs grouped by row."""
    n_rows, n_cols = keys.shape
    kmax = int(n.max())
    if kmax < n_cols:
        top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]
    else:
        top = np.broadcast_to(np.arange(n_cols), (n_rows, n_cols))
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    keep = np.arange(top.shape[1])[None, :] < n[:, None]
    rows = np.broadcast_to(np.arange(n_rows)[:, None], top.shape)
    return rows[keep], top[keep]


def _select_items(model: FittedModel, vectors: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Plackett-Luce draws without replacement (Gumbel-top-k over every item), in rows of at
    most ``_CELLS`` logits. Returns (local user, item) pairs (grouped by user only later)."""
    s = model.draw
    n_items = model.n_items
    q = model.item_vectors.astype(np.float32)
    bias = (s.beta * model.item_bias).astype(np.float32)
    rho = s.popularity_share
    if rho > 0:
        log_pop = np.log(np.maximum(model.item_counts, 0.5) / max(1, model.item_counts.sum())).astype(np.float32)
    step = max(1, _CELLS // n_items)
    # People in order of length, so that the rows drawn together want similar numbers of items.
    by_length = np.argsort(lengths, kind="stable")
    users, items = [], []
    for lo in range(0, len(lengths), step):
        rows_here = by_length[lo : lo + step]
        logits = (vectors[rows_here] @ q.T) / np.float32(s.temperature) + bias
        if rho > 0:
            # log((1 - rho) * softmax(logits) + rho * popularity), row by row
            logits -= logits.max(axis=1, keepdims=True)
            logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
            logits = np.logaddexp(logits + np.float32(math.log1p(-rho)), log_pop + np.float32(math.log(rho)))
        # Gumbel-top-k: logit - log(E), E ~ Exp(1), is logit + Gumbel.
        exponential = rng.standard_exponential(logits.shape, dtype=np.float32)
        np.maximum(exponential, np.finfo(np.float32).tiny, out=exponential)  # float32 can round to 0
        logits -= np.log(exponential)
        del exponential
        rows, cols = _top_rows(logits, lengths[rows_here])
        users.append(rows_here[rows])
        items.append(cols)
    return np.concatenate(users).astype(np.int64), np.concatenate(items).astype(np.int64)


def _draw_block(model: FittedModel, n_total: int, seed: int, block: int) -> _Block:
    start = block * BLOCK_USERS
    n_block = min(BLOCK_USERS, n_total - start)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, block)))
    vectors, lengths = model.draw_people(n_block, rng)
    local, item = _select_items(model, vectors, lengths, rng)

    # Time order: by -gamma * log count + Gumbel within each person (popular items early).
    log_count = np.log(np.maximum(model.item_counts, 1).astype(np.float64))
    key = -model.draw.gamma * log_count[item] + rng.gumbel(size=len(item))
    order = np.lexsort((key, local))
    local, item = local[order], item[order]

    # Times: strictly increasing seconds within a random span from a random start.
    user_start = T0 + rng.integers(0, _START_WINDOW, size=n_block)
    user_span = rng.integers(*_SPAN_RANGE, size=n_block)
    offset = np.sort(rng.integers(0, user_span[local] - lengths[local] + 1) + (local << np.int64(32)))
    offset -= local << np.int64(32)
    counts = np.bincount(local, minlength=n_block).astype(np.int64)
    starts = np.zeros(n_block, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    rank = np.arange(len(local), dtype=np.int64) - starts[local]
    timestamp = user_start[local] + offset + rank
    return _Block(start, vectors, lengths, counts, item, timestamp)


def _check_draw_args(n_users: int, seed: int, chunk_users: int) -> None:
    for name, value, low in (("n_users", n_users, 1), ("seed", seed, 0), ("chunk_users", chunk_users, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")


def iter_fitted(model: FittedModel, n_users: int, *, seed: int = 0, chunk_users: int = 4096) -> Iterator[SyntheticChunk]:
    """Draw ``n_users`` people from ``model`` in chunks of ``chunk_users``, in user order.

    The people depend on (fit, draw settings, ``n_users``, ``seed``) only; memory holds one
    block of :data:`BLOCK_USERS` people and one chunk at a time.
    """
    _check_draw_args(n_users, seed, chunk_users)
    n_blocks = -(-n_users // BLOCK_USERS)
    blocks = (_draw_block(model, n_users, seed, b) for b in range(n_blocks))
    for block in _rechunk(blocks, chunk_users):
        yield SyntheticChunk(
            start=block.start,
            stop=block.stop,
            user_vectors=block.user_vectors,
            requested=block.requested,
            user=np.repeat(np.arange(block.start, block.stop, dtype=np.int64), block.counts),
            item=block.item,
            timestamp=block.timestamp,
        )


def generate_fitted(model: FittedModel, n_users: int, *, seed: int = 0, name: str | None = None, progress: bool = False) -> Interactions:
    """Every drawn person in one interaction table (rows grouped by user, by time within a user)."""
    _check_draw_args(n_users, seed, 1)
    name = name or population_name(model.source, n_users, seed)
    mean_events = float(np.exp(model.length_quantiles).mean())  # the source's mean, a first guess
    buffers = _Columns(int(n_users * max(mean_events, MIN_EVENTS) * 1.5) + 1024)
    counts = np.empty(n_users, dtype=np.int64)
    with progress_bar(n_users, f"{name} people", progress) as advance:
        for chunk in iter_fitted(model, n_users, seed=seed, chunk_users=BLOCK_USERS):
            counts[chunk.start : chunk.stop] = np.bincount(chunk.user - chunk.start, minlength=chunk.n_users)
            buffers.append(chunk.item, chunk.timestamp)
            advance(steps=chunk.n_users)
    item, timestamp = buffers.finish()
    return Interactions(
        user=np.repeat(np.arange(n_users, dtype=np.int64), counts),
        item=item,
        timestamp=timestamp,
        rating=None,
        user_ids=np.arange(n_users, dtype=np.int64),
        item_ids=np.arange(model.n_items, dtype=np.int64),
        name=name,
    )


# --------------------------------------------------------------------------------------
# The registry's entry points
# --------------------------------------------------------------------------------------


def iter_fitted_spec(
    spec: FittedSpec, *, chunk_users: int = 4096, progress: bool = False, cache_dir: str | Path | None = None
) -> tuple[int, str, str, Iterator[SyntheticChunk]]:
    """``(n_items, name, fingerprint, chunks)``: the catalogue size, the population's name, what
    its people depend on (:attr:`FittedModel.fingerprint`) and its people in user order, fitting
    (or loading the cached fit of) the generator first."""
    model = fit_generator(spec.source, config=DEFAULT_FIT, cache_dir=cache_dir, progress=progress)
    _check_draw_args(spec.n_users, spec.seed, chunk_users)
    name = population_name(spec.source, spec.n_users, spec.seed)
    return model.n_items, name, model.fingerprint, iter_fitted(model, spec.n_users, seed=spec.seed, chunk_users=chunk_users)


def generate_fitted_spec(spec: FittedSpec, *, progress: bool = False, cache_dir: str | Path | None = None) -> Interactions:
    """The whole drawn population as one interaction table (for populations that fit in memory)."""
    model = fit_generator(spec.source, config=DEFAULT_FIT, cache_dir=cache_dir, progress=progress)
    return generate_fitted(model, spec.n_users, seed=spec.seed, progress=progress)
