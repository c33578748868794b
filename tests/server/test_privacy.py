"""fedpref's (epsilon, delta) against dp-accounting computed independently for the same mechanism."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedpref.server.privacy import DpMechanism, PrivacyConfigError, PrivacyLedger, default_delta


def independent_rdp_epsilon(z: float, population: int, cohort: int, rounds: int, delta: float) -> float:
    # The mechanism written out again: noise z*C on a sum whose sensitivity under
    # replace-one is 2C, so z/2 per unit of sensitivity; a cohort drawn without replacement.
    event = dp_accounting.GaussianDpEvent(z / 2)
    if cohort < population:
        event = dp_accounting.SampledWithoutReplacementDpEvent(population, cohort, event)
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("z, population, cohort, rounds", [(1.0, 671, 67, 100), (2.0, 10_000, 100, 300), (0.8, 200, 20, 10)])
def test_epsilon_is_dp_accountings_for_the_mechanism_that_ran(z, population, cohort, rounds):
    delta = default_delta(population)
    ours = DpMechanism(z, population, cohort).epsilon(rounds, delta)
    assert ours == pytest.approx(independent_rdp_epsilon(z, population, cohort, rounds, delta), rel=1e-9)


def test_full_participation_lies_between_the_tight_pld_bound_and_the_classic_rdp_bound():
    z, n, rounds, delta = 3.0, 500, 40, 1e-5
    ours = DpMechanism(z, n, n).epsilon(rounds, delta)
    sigma = z / 2
    # Classic RDP conversion of a composed Gaussian: T*a/(2 sigma^2) + log(1/delta)/(a-1).
    orders = np.linspace(1.01, 200, 20_000)
    classic = float(np.min(rounds * orders / (2 * sigma**2) + math.log(1 / delta) / (orders - 1)))
    # The PLD accountant takes the noise in units of C and doubles the sensitivity itself
    # under REPLACE_ONE; it is tight, so it may only be lower.
    tight = pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
    tight.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert tight.get_epsilon(delta) <= ours <= classic + 1e-6


def test_more_noise_smaller_cohorts_and_fewer_rounds_spend_less():
    delta = 1e-4
    base = DpMechanism(1.0, 1000, 100)
    assert DpMechanism(2.0, 1000, 100).epsilon(50, delta) < base.epsilon(50, delta)
    assert DpMechanism(1.0, 1000, 10).epsilon(50, delta) < base.epsilon(50, delta)
    assert base.epsilon(10, delta) < base.epsilon(50, delta)
    assert base.epsilon(0, delta) == 0.0


def test_rounds_within_a_target_is_the_last_round_that_keeps_it():
    mech, delta = DpMechanism(1.5, 671, 67), default_delta(671)
    r = mech.rounds_within(8.0, delta)
    assert r >= 1
    assert mech.epsilon(r, delta) <= 8.0 < mech.epsilon(r + 1, delta)
    assert mech.rounds_within(1e-3, delta) == 0


def test_the_ledger_composes_round_by_round_what_the_mechanism_plans():
    mech, delta = DpMechanism(1.5, 671, 67), default_delta(671)
    allowed = mech.rounds_within(8.0, delta)
    ledger = PrivacyLedger(mech, delta)
    assert ledger.epsilon == 0.0
    for _ in range(allowed):
        ledger.record_round()
    assert ledger.rounds == allowed and ledger.epsilon <= 8.0
    assert ledger.epsilon == pytest.approx(mech.epsilon(allowed, delta), rel=1e-9)


def test_default_delta_is_below_one_over_n():
    for n in (10, 671, 1_000_000):
        assert default_delta(n) < 1 / n


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: DpMechanism(0.0, 10, 5), "noise multiplier must be positive"),
        (lambda: DpMechanism(1.0, 10, 11), "cohort must lie in"),
        (lambda: DpMechanism(1.0, 10, 5).epsilon(3, 1.0), "delta must lie in"),
        (lambda: DpMechanism(1.0, 10, 5).rounds_within(0.0, 1e-3), "target epsilon must be positive"),
    ],
)
def test_settings_that_describe_no_mechanism_are_refused(build, message):
    with pytest.raises(PrivacyConfigError, match=message):
        build()


def test_a_round_with_dropouts_is_accounted_with_the_smaller_noise_on_its_sum():
    mech, delta = DpMechanism(2.0, 500, 50), 1e-4
    def spent(replies):
        ledger = PrivacyLedger(mech, delta)
        for r in replies:
            ledger.record_round(r)
        return ledger.epsilon

    assert spent([50] * 10) == pytest.approx(mech.epsilon(10, delta))
    with_dropouts = spent([50] * 9 + [25])
    assert with_dropouts > mech.epsilon(10, delta)
    # The same, written out: nine full rounds and one whose noise on the sum is halved.
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(500, 50, dp_accounting.GaussianDpEvent(1.0)), 9)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(500, 50, dp_accounting.GaussianDpEvent(0.5)))
    assert with_dropouts == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)


def test_noise_from_the_os_differs_every_draw_and_keeps_no_state():
    from fedpref.server.privacy import NOISE_FROM_OS, NoiseSource

    a, b = NoiseSource(), NoiseSource()
    assert a.mode == NOISE_FROM_OS and a.state() is None
    first, again, other = a.normal(0.0, 1.0, 1000), a.normal(0.0, 1.0, 1000), b.normal(0.0, 1.0, 1000)
    assert not np.array_equal(first, again) and not np.array_equal(first, other)
    assert first.std() == pytest.approx(1.0, rel=0.15)
    a.restore({"anything": 1})  # nothing to restore: a resumed run draws afresh
    import random

    assert isinstance(a.sampler(0), random.SystemRandom)


def test_reproducible_noise_repeats_from_the_seed_and_goes_on_from_its_state():
    import random

    from fedpref.server.privacy import NOISE_FROM_SEED, NoiseSource

    a, b = NoiseSource(5), NoiseSource(5)
    assert a.mode == NOISE_FROM_SEED
    np.testing.assert_array_equal(a.normal(0.0, 1.0, 10), b.normal(0.0, 1.0, 10))
    saved = a.state()
    expected = a.normal(0.0, 1.0, 10)
    resumed = NoiseSource(5)
    resumed.restore(saved)
    np.testing.assert_array_equal(resumed.normal(0.0, 1.0, 10), expected)
    assert type(a.sampler(3)) is random.Random and a.sampler(3).random() == random.Random(3).random()
    with pytest.raises(ValueError, match="no state"):
        NoiseSource(5).restore(None)


def test_a_ledger_written_out_and_read_back_has_the_same_epsilon_and_goes_on_alike():
    ledger = PrivacyLedger(DpMechanism(1.3, 500, 50), 1e-5, "central")
    for replies in (50, 41, 50):
        ledger.record_round(replies)
    ledger.record_round(mechanism=DpMechanism(2.0, 500, 500))
    again = PrivacyLedger.from_dict(json_round_trip(ledger.to_dict()))
    assert again.epsilon == ledger.epsilon and again.rounds == ledger.rounds == 4
    assert again.record_round(30) == ledger.record_round(30)


def json_round_trip(value):
    import json

    return json.loads(json.dumps(value))


@pytest.mark.parametrize("forged", [
    {},
    {"mechanism": [1.0, 10, 5], "delta": 1e-5, "placement": "central", "released": [[1.0, 10, 50]]},
    {"mechanism": [1.0, 10, 5], "delta": 1e-5, "placement": "central", "released": [["x", 10, 5]]},
    {"mechanism": [1.0, 10, 5], "delta": 1e-5, "placement": "nowhere", "released": []},
    {"mechanism": [1.0, True, 5], "delta": 1e-5, "placement": "central", "released": []},
])
def test_a_ledger_that_describes_no_mechanism_is_refused(forged):
    with pytest.raises(ValueError):
        PrivacyLedger.from_dict(forged)
