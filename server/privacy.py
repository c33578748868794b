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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import dp_accounting
from dp_accounting import rdp

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

    @property
    def epsilon(self) -> float:
        return float(self._accountant.get_epsilon(self.delta)) if self.rounds else 0.0

    def record_round(self, replies: int | None = None, mechanism: DpMechanism | None = None) -> float:
        """Account one released round in which ``replies`` devices of the cohort replied
        (default: all of them) of this ledger's mechanism, or of ``mechanism`` (another
        release on the same people, such as the popularity histogram); returns epsilon after it."""
        mechanism = mechanism or self.mechanism
        if replies is not None and 0 < replies < mechanism.cohort:
            share = replies / mechanism.cohort
            scale = share if self.placement == "central" else share**0.5
            mechanism = replace(mechanism, noise_multiplier=mechanism.noise_multiplier * scale)
        self._accountant.compose(mechanism.round_event())
        self.rounds += 1
        return self.epsilon
