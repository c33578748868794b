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

Two accounts of the same run (:class:`PrivacyLedger`; run-config ``dp-accounting``):

- **sampled**, the account above: it assumes that every round's cohort is a uniform draw,
  without replacement, of m of the N devices, and gains from it (amplification by sampling).
  A simulation draws its cohorts so. Real devices do not: they check in when they are idle,
  charging and on an unmetered network, so who takes part in a round follows their owners'
  habits, which the server neither controls nor knows;
- **honest**: it assumes nothing about how cohorts are drawn. A device takes part in at most
  k training rounds of a run (run-config ``dp-max-participations``, which the device itself
  enforces: :mod:`fedpref.models.participation`), so whoever it is, its data went through at
  most k Gaussian mechanisms ``GaussianDpEvent(z / 2)`` (the same replace-one sensitivity
  2C, without sampling): the k rounds whose noise was smallest (a round in which fewer
  devices replied counts with its smaller multiplier, as above). Without a cap, every round
  the run released counts.

The sampled account's premise implies the honest one's (a device drawn uniformly still joins
at most the rounds it joined), so the honest bound holds under it too: the ledger reports
``epsilon-sampled = min(amplified, honest)``, which is never larger than ``epsilon-honest``.
Both are always written; ``dp-accounting`` chooses which one ``dp-target-epsilon`` stops at
and which one the run shows as its ``epsilon``: ``auto`` is sampled in a simulation and honest
on real devices (run-config ``devices`` > 0: the server then samples SuperNodes whose
check-ins it does not control). With a cap the server draws each cohort from the devices that
may still train, so the cohorts are no longer uniform draws from all N: the sampled figure is
then an approximation, and the honest one the bound.

A release other than a training round (the popularity histogram) is composed once into both
accounts and counts towards no cap.
"""

from __future__ import annotations

import functools
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


ACCOUNTINGS = ("honest", "sampled")  # the two accounts of a run (run-config dp-accounting, once auto is resolved)
LEDGER_FORMAT = 2  # PrivacyLedger.to_dict: each release a record, a training round or another release


def resolve_accounting(requested: str, real_devices: bool) -> str:
    """The account a run reports and stops at: ``requested`` (run-config ``dp-accounting``),
    where ``auto`` means honest on real devices and sampled in a simulation."""
    if requested == "auto":
        return "honest" if real_devices else "sampled"
    if requested not in ACCOUNTINGS:
        raise PrivacyConfigError(f"dp-accounting is auto, honest or sampled, got {requested!r}")
    return requested


def _check_cap(max_participations: int) -> int:
    if isinstance(max_participations, bool) or not isinstance(max_participations, int) or max_participations < 0:
        raise PrivacyConfigError(f"the participation cap is 0 (none) or a positive number of rounds, got {max_participations!r}")
    return max_participations


@functools.lru_cache(maxsize=128)
def _rdp_curve(event: dp_accounting.DpEvent) -> np.ndarray:
    """One release of ``event`` as dp-accounting's RDP accountant counts it: its RDP at the
    accountant's orders (:data:`_ORDERS`). Computing the curve of a sampled Gaussian takes the
    accountant about a second; a run releases the same event every round, so it is computed once
    and composition is the sum of the curves (what the accountant itself does)."""
    accountant = rdp.RdpAccountant(orders=_ORDERS, neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(event)
    curve = np.array(accountant._rdp, dtype=np.float64)  # noqa: SLF001 (the accountant keeps no public curve)
    curve.setflags(write=False)
    return curve


_ORDERS = tuple(rdp.rdp_privacy_accountant.RdpAccountant()._orders)  # noqa: SLF001 (the accountant's default orders)


def _epsilon_of(curve: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of a composed RDP curve (dp-accounting's conversion)."""
    return float(rdp.rdp_privacy_accountant.compute_epsilon(_ORDERS, curve, delta)[0])


def _honest_epsilon(training: list[float], others: list, delta: float, max_participations: int) -> float:
    """The honest epsilon (see the module): every release in ``others`` once, and the
    ``max_participations`` training rounds (all of them for 0) of smallest noise multiplier
    among ``training`` (the multipliers the rounds were accounted with)."""
    counted = sorted(training)[:max_participations] if max_participations else list(training)
    if not counted and not others:
        return 0.0
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for mechanism in others:
        accountant.compose(mechanism.honest_event())
    groups: dict[float, int] = {}
    for z in counted:
        groups[z] = groups.get(z, 0) + 1
    for z, count in groups.items():
        accountant.compose(dp_accounting.GaussianDpEvent(z / 2.0), count)
    return float(accountant.get_epsilon(delta))


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
        """One round under the sampled account: the Gaussian mechanism on a uniform cohort."""
        gaussian = self.honest_event()
        if self.cohort == self.population:
            return gaussian
        return dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.cohort, gaussian)

    def honest_event(self) -> dp_accounting.DpEvent:
        """One round as the honest account counts it for a device that took part: the Gaussian
        mechanism alone, noise ``z / 2`` per unit of the replace-one sensitivity 2C."""
        return dp_accounting.GaussianDpEvent(self.noise_multiplier / 2.0)

    def epsilon(self, rounds: int, delta: float, prior: tuple[DpMechanism, ...] = (), accounting: str = "sampled",
                max_participations: int = 0) -> float:
        """Epsilon after ``rounds`` rounds at ``delta`` (0 for none), composed after one
        release of each ``prior`` mechanism (such as the popularity histogram), under the
        ``accounting`` account: ``sampled`` (the smaller of the amplified bound and the honest
        one) or ``honest`` (at most ``max_participations`` rounds a device, 0 for every round;
        see the module)."""
        if rounds < 0:
            raise ValueError(f"rounds must be 0 or more, got {rounds}")
        if not 0.0 < delta < 1.0:
            raise PrivacyConfigError(f"delta must lie in (0, 1), got {delta}")
        if accounting not in ACCOUNTINGS:
            raise PrivacyConfigError(f"the accounting is honest or sampled, got {accounting!r}")
        if rounds == 0 and not prior:
            return 0.0
        honest = _honest_epsilon([self.noise_multiplier] * rounds, list(prior), delta, _check_cap(max_participations))
        if accounting == "honest":
            return honest
        curve = sum((_rdp_curve(mechanism.round_event()) for mechanism in prior), np.zeros(len(_ORDERS)))
        if rounds:
            curve = curve + rounds * _rdp_curve(self.round_event())
        return min(_epsilon_of(curve, delta), honest)

    def rounds_within(self, target_epsilon: float, delta: float, limit: int = 100_000, prior: tuple[DpMechanism, ...] = (),
                      accounting: str = "sampled", max_participations: int = 0) -> int:
        """The most rounds whose epsilon (after ``prior``, under ``accounting``: see
        :meth:`epsilon`) stays at or below ``target_epsilon`` (at most ``limit``)."""
        if not target_epsilon > 0:
            raise PrivacyConfigError(f"the target epsilon must be positive, got {target_epsilon}")

        def epsilon(rounds: int) -> float:
            return self.epsilon(rounds, delta, prior, accounting, max_participations)

        if epsilon(1) > target_epsilon:
            return 0
        low, high = 1, 1
        while high < limit and epsilon(high) <= target_epsilon:
            low, high = high, min(high * 2, limit)
        if epsilon(high) <= target_epsilon:
            return high
        while high - low > 1:  # epsilon(low) <= target < epsilon(high)
            mid = (low + high) // 2
            if epsilon(mid) <= target_epsilon:
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
    """The server's running account of one training run, in both accounts (see the module):
    each released round composed into an RDP accountant as it happens (the amplified bound),
    at the noise its replies actually carried (a round in which only ``m' < m`` devices replied
    is accounted with ``z * m' / m`` when the server adds the noise, ``z * sqrt(m' / m)`` when
    the devices add their shares of it), and the honest bound over the
    ``max_participations`` rounds of smallest noise (every round for 0).

    ``accounting`` (``honest`` or ``sampled``) is the account :attr:`epsilon` gives and
    :meth:`record_round` returns; :attr:`epsilon_honest` and :attr:`epsilon_sampled` are
    always there."""

    def __init__(self, mechanism: DpMechanism, delta: float, placement: str = "central", *, max_participations: int = 0,
                 accounting: str = "sampled") -> None:
        if not 0.0 < delta < 1.0:
            raise PrivacyConfigError(f"delta must lie in (0, 1), got {delta}")
        if placement not in ("central", "distributed"):
            raise PrivacyConfigError(f"the noise is added centrally or distributed across devices, got {placement!r}")
        if accounting not in ACCOUNTINGS:
            raise PrivacyConfigError(f"the accounting is honest or sampled, got {accounting!r}")
        self.placement = placement
        self.mechanism = mechanism
        self.delta = delta
        self.max_participations = _check_cap(max_participations)
        self.accounting = accounting
        self.rounds = 0  # releases accounted (training rounds and others)
        self._curve = np.zeros(len(_ORDERS))  # the amplified account: the RDP of every release so far
        self._released: list[tuple[DpMechanism, bool]] = []  # every release as accounted, in order, and whether it was a training round
        self._honest: float | None = None  # cached: the honest epsilon of the releases so far

    @property
    def epsilon_amplified(self) -> float:
        """The bound under uniform sampling alone (amplification by sampling, every round)."""
        return _epsilon_of(self._curve, self.delta) if self.rounds else 0.0

    @property
    def epsilon_honest(self) -> float:
        """The bound that assumes nothing about how cohorts were drawn (see the module)."""
        if self._honest is None:
            training = [m.noise_multiplier for m, is_round in self._released if is_round]
            others = [m for m, is_round in self._released if not is_round]
            self._honest = _honest_epsilon(training, others, self.delta, self.max_participations)
        return self._honest

    @property
    def epsilon_sampled(self) -> float:
        """The bound under uniform sampling: the smaller of the amplified and the honest bounds
        (both hold when cohorts are uniform draws), so never above :attr:`epsilon_honest`."""
        return min(self.epsilon_amplified, self.epsilon_honest)

    @property
    def epsilon(self) -> float:
        """The epsilon of this ledger's ``accounting``."""
        return self.epsilon_honest if self.accounting == "honest" else self.epsilon_sampled

    def epsilons(self) -> dict[str, float]:
        """Both accounts: ``{"epsilon-sampled": ..., "epsilon-honest": ...}``."""
        return {"epsilon-sampled": self.epsilon_sampled, "epsilon-honest": self.epsilon_honest}

    def record_round(self, replies: int | None = None, mechanism: DpMechanism | None = None, server_round: int | None = None) -> float:
        """Account one released round in which ``replies`` devices of the cohort replied
        (default: all of them) of this ledger's mechanism (a training round), or a release of
        ``mechanism`` (another release on the same people, such as the popularity histogram:
        it counts towards no cap); returns :attr:`epsilon` after it. (``server_round``: the
        round's number, which a Gaussian round's account does not need and the tree's does,
        :class:`fedpref.server.tree.TreeLedger`.)"""
        training = mechanism is None
        mechanism = mechanism or self.mechanism
        if replies is not None and 0 < replies < mechanism.cohort:
            share = replies / mechanism.cohort
            scale = share if self.placement == "central" else share**0.5
            mechanism = replace(mechanism, noise_multiplier=mechanism.noise_multiplier * scale)
        self._compose(mechanism, training)
        return self.epsilon

    def _compose(self, mechanism: DpMechanism, training: bool) -> None:
        self._curve = self._curve + _rdp_curve(mechanism.round_event())
        self._released.append((mechanism, training))
        self._honest = None
        self.rounds += 1

    def to_dict(self) -> dict:
        """The ledger as plain JSON values: its settings and every release it accounted."""
        as_list = lambda m: [m.noise_multiplier, m.population, m.cohort]  # noqa: E731
        return {"format": LEDGER_FORMAT, "mechanism": as_list(self.mechanism), "delta": self.delta, "placement": self.placement,
                "max-participations": self.max_participations, "accounting": self.accounting,
                "released": [{"mechanism": as_list(m), "release": "round" if training else "other"} for m, training in self._released]}

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        """The ledger :meth:`to_dict` wrote, its releases composed again in their order (so both
        its epsilons are the very same numbers). Raises ``PrivacyConfigError`` or ``ValueError``
        for anything that does not describe a ledger, and for a ledger of an older format (it
        did not say which releases were training rounds, which the honest account needs)."""
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
        if data.get("format") != LEDGER_FORMAT:
            raise ValueError(
                f"a privacy ledger of an older format ({data.get('format', 1)!r}, this fedpref reads {LEDGER_FORMAT}): it does not say "
                "which releases were training rounds, which the honest account needs; start the run again (resume=false)"
            )
        cap = data.get("max-participations")
        if isinstance(cap, bool) or not isinstance(cap, int):
            raise ValueError(f"the ledger's max-participations must be a whole number, got {cap!r}")
        ledger = cls(mechanism(data.get("mechanism")), float(data["delta"]), data.get("placement"), max_participations=cap,
                     accounting=data.get("accounting"))
        for entry in data["released"]:
            if not isinstance(entry, dict) or entry.get("release") not in ("round", "other"):
                raise ValueError(f"a release is {{'mechanism': [z, N, m], 'release': 'round' | 'other'}}, got {entry!r}")
            ledger._compose(mechanism(entry.get("mechanism")), entry["release"] == "round")
        return ledger
