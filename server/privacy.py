"""Privacy accounting for user-level DP-FedAvg, through Google's ``dp-accounting``.

The mechanism fedpref runs each round: a cohort of ``m`` devices is drawn uniformly without
replacement from ``N``; each device clips its update to the L2 bound C; the server adds
Gaussian noise of standard deviation ``z * C`` to the sum of the m updates (Flower's DP
wrappers add ``z * C / m`` to their average, the same thing) and every update carries equal
weight. With a fixed cohort size the population size is public, so neighbouring populations
differ by *replacing* one person's data (``REPLACE_ONE``): the sum then moves by up to 2C,
and the Gaussian mechanism's noise multiplier relative to that sensitivity is ``z / 2``.
Each round is one ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``
(Wang, Balle and Kasiviswanathan, AISTATS 2019), or the Gaussian event alone when the cohort
is the whole population; rounds compose, and the RDP accountant turns them into epsilon for
the chosen delta.

A round in which only ``m' < m`` devices reply is noisier for the privacy account: Flower's
wrapper adds z * C / m to the average of the m' updates, which is z * C * m' / m on their sum,
while the sum's sensitivity stays 2C. Such a round is accounted with the noise multiplier
``z * m' / m`` (:class:`PrivacyLedger`), at the sampling rate of the cohort that
was drawn.

With secure aggregation and *distributed* noise (``dp-noise-placement = distributed``) each
device adds Gaussian noise of standard deviation ``z * C / sqrt(m)`` to its own clipped update,
so that a full cohort's sum carries ``z * C``; when only m' devices contribute, the sum carries
``z * C * sqrt(m' / m)`` and the round is accounted with ``z * sqrt(m' / m)``: conservatively,
as if every dropped device were the one whose data the server wants.

Where the noise comes from (:class:`NoiseSource`). The accountant's epsilon holds only if
nobody can compute the noise: a published model minus noise regenerated from a known seed
is the exact average of the clipped updates. So every release the server noises (the
training average, adaptive clipping's bit count, the popularity histogram) draws from a
NumPy generator seeded afresh from the operating system's entropy (``secrets``), and the
cohorts of a DP run are drawn with ``random.SystemRandom``: amplification by sampling counts
only if nobody knows who was sampled. Nothing of either is stored, so a checkpoint does not
reveal the noise still to come. A simulation that must repeat bit for bit asks for the noise
and the cohorts from its seed (run-config ``reproducible-noise``); the ServerApp then warns,
and the run's record says so.
"""

from __future__ import annotations

import logging
import random
import secrets
import warnings
from dataclasses import dataclass, replace
from logging import INFO

import dp_accounting
import numpy as np
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import DifferentialPrivacyClientSideAdaptiveClipping, DifferentialPrivacyClientSideFixedClipping
from flwr.supercore.differential_privacy import compute_stdv

# dp-accounting logs a warning per RDP order that fails to converge at small orders; the
# orders that do converge bound epsilon, so the warnings are noise to a user.
logging.getLogger("absl").setLevel(logging.ERROR)


class PrivacyConfigError(ValueError):
    """The DP settings cannot describe a mechanism (bad noise, cohort or delta)."""


def default_delta(population: int) -> float:
    """A delta well below 1/N: ``1 / (10 N)``. A delta of 1/N would allow the mechanism to
    give away one whole person's data with no epsilon cost."""
    if population < 1:
        raise PrivacyConfigError(f"the population must have at least one device, got {population}")
    return 1.0 / (10.0 * population)


@dataclass(frozen=True)
class DpMechanism:
    """One round of user-level DP-FedAvg, as run (see the module's docstring)."""

    noise_multiplier: float  # z: noise standard deviation on the sum of clipped updates, in units of C
    population: int  # N: devices the cohort is drawn from
    cohort: int  # m: devices drawn per round, uniformly without replacement

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise PrivacyConfigError(
                f"the noise multiplier must be positive to account for privacy, got {self.noise_multiplier}; "
                "set dp-noise-multiplier above 0 (about 1 or more gives a useful epsilon)"
            )
        if self.population < 1 or not 1 <= self.cohort <= self.population:
            raise PrivacyConfigError(
                f"the cohort must lie in [1, population]: got cohort {self.cohort} of population {self.population}"
            )

    def round_event(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / 2.0)  # sensitivity 2C under REPLACE_ONE
        if self.cohort == self.population:
            return gaussian
        return dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.cohort, gaussian)

    def epsilon(self, rounds: int, delta: float, prior: tuple[DpMechanism, ...] = ()) -> float:
        """Epsilon after ``rounds`` rounds at ``delta`` (0 for none), composed after one
        release of each ``prior`` mechanism (such as the popularity histogram)."""
        if rounds < 0:
            raise ValueError(f"rounds must be 0 or more, got {rounds}")
        if not 0.0 < delta < 1.0:
            raise PrivacyConfigError(f"delta must lie in (0, 1), got {delta}")
        if rounds == 0 and not prior:
            return 0.0
        accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        for mechanism in prior:
            accountant.compose(mechanism.round_event())
        if rounds:
            accountant.compose(self.round_event(), rounds)
        return float(accountant.get_epsilon(delta))

    def rounds_within(self, target_epsilon: float, delta: float, limit: int = 100_000, prior: tuple[DpMechanism, ...] = ()) -> int:
        """The most rounds whose epsilon (after ``prior``) stays at or below ``target_epsilon``
        (at most ``limit``)."""
        if not target_epsilon > 0:
            raise PrivacyConfigError(f"the target epsilon must be positive, got {target_epsilon}")
        if self.epsilon(1, delta, prior) > target_epsilon:
            return 0
        low, high = 1, 1
        while high < limit and self.epsilon(high, delta, prior) <= target_epsilon:
            low, high = high, min(high * 2, limit)
        if self.epsilon(high, delta, prior) <= target_epsilon:
            return high
        while high - low > 1:  # epsilon(low) <= target < epsilon(high)
            mid = (low + high) // 2
            if self.epsilon(mid, delta, prior) <= target_epsilon:
                low = mid
            else:
                high = mid
        return low


NOISE_FROM_OS = "os-entropy"  # rounds.json "noise-source" of a run whose noise nobody can compute
NOISE_FROM_SEED = "run-seed"  # ... of a run whose noise follows from its seed (reproducible-noise=true)
_NOISE_STREAM = 0x0D9  # the reproducible noise's own stream of the run's seed (other draws use other streams)


class ReproducibleNoiseWarning(UserWarning):
    """A run draws its DP noise from its seed: a simulation that repeats, not a private release."""


class NoiseSource:
    """Where the server's DP noise comes from.

    ``NoiseSource()`` (every real run): each draw comes from a NumPy generator seeded afresh
    with 256 bits of the operating system's entropy (``secrets``). Nothing about the noise
    follows from the run's config or seed, no state is kept between releases, and
    :meth:`state` is None, so a checkpoint holds nothing that predicts the noise to come.

    ``NoiseSource(seed)`` (a simulation that must repeat, run-config ``reproducible-noise``):
    every draw comes from one generator seeded by the run's ``seed``; :meth:`state` and
    :meth:`restore` carry it across a resume. Anyone who knows the seed can regenerate the
    noise and subtract it from a published model: never for a release of real people's data."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng = None if seed is None else np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_NOISE_STREAM,))))

    @classmethod
    def for_run(cls, reproducible: bool, seed: int) -> NoiseSource:
        """The source a run asks for: from ``seed`` if ``reproducible``, else from the OS."""
        return cls(seed if reproducible else None)

    @property
    def reproducible(self) -> bool:
        return self._rng is not None

    @property
    def mode(self) -> str:
        """What the run's record says: :data:`NOISE_FROM_OS` or :data:`NOISE_FROM_SEED`."""
        return NOISE_FROM_SEED if self.reproducible else NOISE_FROM_OS

    def generator(self) -> np.random.Generator:
        """The generator of one release: the run's own (reproducible), or a fresh one from the OS."""
        if self._rng is not None:
            return self._rng
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(secrets.randbits(256))))

    def normal(self, loc: float, scale: float, size=None):
        """Gaussian noise N(loc, scale^2) of ``size`` (a float when ``size`` is None)."""
        draw = self.generator().normal(loc, scale, size)
        return float(draw) if size is None else draw

    def noised(self, arrays: ArrayRecord, std: float) -> ArrayRecord:
        """``arrays`` plus Gaussian noise of standard deviation ``std`` on every value, each
        array in its own dtype (as Flower's ``add_gaussian_noise_inplace`` adds it)."""
        rng = self.generator()
        out = {}
        for name in arrays:
            value = arrays[name].numpy()
            out[name] = Array(np.asarray(value + rng.normal(0.0, std, value.shape).astype(value.dtype)))
        return ArrayRecord(out)

    def sampler(self, seed: int) -> random.Random:
        """The cohort sampler of a DP run: ``random.SystemRandom`` (the OS's generator, whose
        draws nobody can compute or replay), or ``random.Random(seed)`` when reproducible."""
        return random.Random(seed) if self.reproducible else random.SystemRandom()

    def state(self) -> dict | None:
        """The reproducible generator's state (JSON-safe), None for noise from the OS."""
        return None if self._rng is None else dict(self._rng.bit_generator.state)

    def restore(self, state: dict | None) -> None:
        """Continue a reproducible run's noise where its checkpoint left it. Noise from the OS
        has no state: a resumed run draws fresh entropy."""
        if self._rng is None:
            return
        if not isinstance(state, dict):
            raise ValueError("the checkpoint holds no state of the reproducible noise")
        self._rng.bit_generator.state = state

    def warn_if_reproducible(self) -> None:
        """Warn, loudly, that anyone who knows the seed can remove this run's noise."""
        if self.reproducible:
            message = (
                f"reproducible-noise=true: this run's DP noise and cohorts follow from its seed ({self.seed}); anyone who knows "
                "the seed can subtract the noise from the published model, so its epsilon protects no one. Use it for "
                "simulations that must repeat; set reproducible-noise=false (the default) for a release of real data."
            )
            warnings.warn(message, ReproducibleNoiseWarning, stacklevel=2)
            log(logging.WARNING, message)


class _NoiseFromSource:
    """What both wrappers below change in Flower's: the noise on the average comes from a
    :class:`NoiseSource` (Flower's own draws from NumPy's global generator)."""

    def __init__(self, *args, noise: NoiseSource, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.noise = noise

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        log(INFO, "aggregate_fit: central DP noise with %.4f stdev added (%s)", std, self.noise.mode)
        return self.noise.noised(aggregated_arrays, std)


class FixedClippingNoise(_NoiseFromSource, DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP wrapper with fixed clipping, its noise drawn from a :class:`NoiseSource`."""


class AdaptiveClippingNoise(_NoiseFromSource, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's central DP wrapper with adaptive clipping, the noise on the average and on the
    count of unclipped updates drawn from a :class:`NoiseSource`."""

    def _noisy_fraction(self, count: int, total: int) -> float:
        return self.noise.normal(count, self.clipped_count_stddev) / float(total)


class PrivacyLedger:
    """The server's running account of one training run: each released round composed into an
    RDP accountant as it happens, at the noise its replies actually carried (a round in which
    only ``m' < m`` devices replied is accounted with ``z * m' / m`` when the server adds the
    noise, ``z * sqrt(m' / m)`` when the devices add their shares of it; see the module)."""

    def __init__(self, mechanism: DpMechanism, delta: float, placement: str = "central") -> None:
        if not 0.0 < delta < 1.0:
            raise PrivacyConfigError(f"delta must lie in (0, 1), got {delta}")
        if placement not in ("central", "distributed"):
            raise PrivacyConfigError(f"the noise is added centrally or distributed across devices, got {placement!r}")
        self.placement = placement
        self.mechanism = mechanism
        self.delta = delta
        self.rounds = 0
        self._accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        self._released: list[DpMechanism] = []  # every release as accounted, in order (for a checkpoint)

    @property
    def epsilon(self) -> float:
        return float(self._accountant.get_epsilon(self.delta)) if self.rounds else 0.0

    def record_round(self, replies: int | None = None, mechanism: DpMechanism | None = None, server_round: int | None = None) -> float:
        """Account one released round in which ``replies`` devices of the cohort replied
        (default: all of them) of this ledger's mechanism, or of ``mechanism`` (another
        release on the same people, such as the popularity histogram); returns epsilon after it.
        (``server_round``: the round's number, which a Gaussian round's account does not need
        and the tree's does, :class:`fedpref.server.tree.TreeLedger`.)"""
        mechanism = mechanism or self.mechanism
        if replies is not None and 0 < replies < mechanism.cohort:
            share = replies / mechanism.cohort
            scale = share if self.placement == "central" else share**0.5
            mechanism = replace(mechanism, noise_multiplier=mechanism.noise_multiplier * scale)
        self._compose(mechanism)
        return self.epsilon

    def _compose(self, mechanism: DpMechanism) -> None:
        self._accountant.compose(mechanism.round_event())
        self._released.append(mechanism)
        self.rounds += 1

    def to_dict(self) -> dict:
        """The ledger as plain JSON values: its settings and every release it accounted."""
        as_list = lambda m: [m.noise_multiplier, m.population, m.cohort]  # noqa: E731
        return {"mechanism": as_list(self.mechanism), "delta": self.delta, "placement": self.placement,
                "released": [as_list(m) for m in self._released]}

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        """The ledger :meth:`to_dict` wrote, its releases composed again in their order (so its
        epsilon is the very same number). Raises ``PrivacyConfigError`` or ``ValueError`` for
        anything that does not describe a ledger."""
        if isinstance(data, dict) and data.get("kind") == "tree":  # DP-FTRL's account (fedpref.server.tree)
            from .tree import TreeLedger

            return TreeLedger.from_dict(data)

        def mechanism(values) -> DpMechanism:
            if not isinstance(values, list) or len(values) != 3 or any(isinstance(v, bool) for v in values):
                raise ValueError(f"a release is [noise multiplier, population, cohort], got {values!r}")
            z, population, cohort = values
            if not isinstance(z, (int, float)) or not isinstance(population, int) or not isinstance(cohort, int):
                raise ValueError(f"a release is [noise multiplier, population, cohort], got {values!r}")
            return DpMechanism(float(z), population, cohort)

        if not isinstance(data, dict) or not isinstance(data.get("released"), list) or not isinstance(data.get("delta"), (int, float)):
            raise ValueError("not a privacy ledger (mechanism, delta, placement, released)")
        ledger = cls(mechanism(data.get("mechanism")), float(data["delta"]), data.get("placement"))
        for values in data["released"]:
            ledger._compose(mechanism(values))
        return ledger
