"""The honest and the sampled accounts of a run, against computations written out again here.

- the honest epsilon of k Gaussian rounds against the closed form: Rényi DP of order a of the
  Gaussian mechanism with noise sigma per unit of sensitivity is a / (2 sigma^2), k rounds add
  up, and RDP turns into (epsilon, delta) by Proposition 12 of Canonne, Kamath and Steinke
  (2020); and against the exact epsilon of the composed Gaussian (Balle and Wang 2018), which
  it may only exceed;
- the honest epsilon is never below the sampled one for the same run (a grid over N, m, z, T,
  k, with and without the popularity histogram);
- the ledger counts the k rounds of smallest noise, the histogram once and towards no cap, and
  reads back what it wrote; a ledger of the older format is refused with the reason.
"""

import math

import numpy as np
import pytest

from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.server.app import accounting_of, privacy_plan, promised_guarantee
from fedpref.server.privacy import DpMechanism, PrivacyConfigError, PrivacyLedger, default_delta, resolve_accounting


def closed_form_epsilon(sigmas: list[float], delta: float) -> float:
    """(epsilon, delta) of Gaussian rounds with noise ``sigmas`` (per unit of sensitivity):
    RDP a * sum(1 / (2 sigma^2)), converted by CKS20 Proposition 12, minimised over a fine
    grid of orders."""
    orders = np.concatenate([np.linspace(1.02, 10, 20_000), np.linspace(10, 2_000, 100_000)])
    rdp = orders * sum(1.0 / (2.0 * s * s) for s in sigmas)
    eps = rdp + np.log1p(-1.0 / orders) - np.log(delta * orders) / (orders - 1.0)
    return float(eps.min())


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism whose privacy loss is that of mu-GDP (k
    rounds of noise sigma compose to mu = sqrt(k) / sigma): the smallest epsilon with
    Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) <= delta."""
    stats = pytest.importorskip("scipy.stats")
    optimize = pytest.importorskip("scipy.optimize")

    def excess(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return float(optimize.brentq(excess, 0.0, 500.0, xtol=1e-12))


@pytest.mark.parametrize("z, k, delta", [(1.0, 1, 1e-5), (2.0, 5, 1e-6), (10.8, 1, 1e-8), (5.67, 5, 1e-6), (3.0, 40, 1e-5)])
def test_the_honest_epsilon_is_the_closed_form_of_k_gaussian_rounds(z, k, delta):
    mechanism = DpMechanism(z, 100_000, 500)  # the population and cohort play no part: nothing is assumed of the draws
    ours = mechanism.epsilon(10 * k, delta, accounting="honest", max_participations=k)
    sigma = z / 2  # noise z*C on a sum whose replace-one sensitivity is 2C
    closed = closed_form_epsilon([sigma] * k, delta)
    # dp-accounting takes the best of a fixed list of orders: at or just above the continuous minimum.
    assert closed - 1e-9 <= ours <= closed * 1.02
    assert ours >= exact_gaussian_epsilon(math.sqrt(k) / sigma, delta) - 1e-9  # RDP is an upper bound of the exact curve


def test_without_a_cap_the_honest_epsilon_counts_every_round():
    mechanism, delta = DpMechanism(4.0, 1000, 50), 1e-5
    assert mechanism.epsilon(30, delta, accounting="honest") == pytest.approx(closed_form_epsilon([2.0] * 30, delta), rel=0.02)
    assert mechanism.epsilon(30, delta, accounting="honest") == mechanism.epsilon(30, delta, accounting="honest", max_participations=30)
    # A cap above the rounds run changes nothing; one below it stops the count.
    assert mechanism.epsilon(30, delta, accounting="honest", max_participations=100) == mechanism.epsilon(30, delta, accounting="honest")
    assert mechanism.epsilon(30, delta, accounting="honest", max_participations=3) == mechanism.epsilon(3, delta, accounting="honest")


# (Each amplified bound costs dp-accounting about two seconds: a handful of runs, spread over the grid.)
@pytest.mark.parametrize("population, cohort, z, rounds, cap, histogram", [
    (1000, 10, 0.8, 100, 0, False),  # amplification wins by far
    (1000, 100, 3.0, 100, 10, True),
    (10_000, 1000, 12.0, 20, 1, False),  # a cap of 1 beats 20 amplified rounds
    (100_000, 500, 1.0, 1, 0, True),  # one round, after the histogram
    (200, 200, 3.0, 50, 10, True),  # every device every round: nothing to amplify
])
def test_the_honest_epsilon_is_never_below_the_sampled_one(population, cohort, z, rounds, cap, histogram):
    delta = default_delta(population)
    prior = (DpMechanism(2.0, population, min(population, 2 * cohort)),) if histogram else ()
    mechanism = DpMechanism(z, population, cohort)
    honest = mechanism.epsilon(rounds, delta, prior, "honest", cap)
    uncapped = mechanism.epsilon(rounds, delta, prior, "honest", 0)
    sampled = mechanism.epsilon(rounds, delta, prior, "sampled", cap)
    amplified = mechanism.epsilon(rounds, delta, prior, "sampled", 0)  # (the uncapped honest bound is never below it)
    assert 0 < sampled <= honest <= uncapped and amplified <= uncapped
    # The sampled figure is the amplified bound, unless the honest one is smaller still.
    assert sampled == pytest.approx(min(amplified, honest), rel=1e-12)
    if cohort == population:  # nothing to amplify: both accounts are one and the same
        assert sampled == honest


def test_the_ledger_agrees_with_the_planned_epsilons_in_both_accounts():
    population, delta = 300, 1e-4
    prior, mechanism = DpMechanism(2.0, population, population), DpMechanism(3.0, population, 30)
    ledger = PrivacyLedger(mechanism, delta, max_participations=2, accounting="honest")
    ledger.record_round(mechanism=prior)
    for _ in range(3):
        ledger.record_round()
    assert ledger.epsilon == ledger.epsilon_honest == pytest.approx(mechanism.epsilon(3, delta, (prior,), "honest", 2), rel=1e-9)
    assert ledger.epsilon_sampled == pytest.approx(mechanism.epsilon(3, delta, (prior,), "sampled", 2), rel=1e-9)
    assert ledger.epsilon_sampled <= ledger.epsilon_honest


def test_the_ledger_counts_the_cap_rounds_whose_noise_was_smallest():
    z, m, delta = 3.0, 100, 1e-6
    ledger = PrivacyLedger(DpMechanism(z, m, m), delta, max_participations=2, accounting="honest")  # (no sampling to compute)
    for replies in (100, 50, 100, 80, 100):  # rounds of 50 and 80 replies carried z*50/100 and z*80/100 on their sums
        ledger.record_round(replies)
    expected = closed_form_epsilon([z * 0.5 / 2, z * 0.8 / 2], delta)
    assert expected - 1e-9 <= ledger.epsilon_honest <= expected * 1.02
    # Distributed noise scales with the square root of the share that replied.
    spread = PrivacyLedger(DpMechanism(z, m, m), delta, "distributed", max_participations=1, accounting="honest")
    for replies in (100, 25):
        spread.record_round(replies)
    assert spread.epsilon_honest == pytest.approx(DpMechanism(z * 0.5, m, m).epsilon(1, delta, accounting="honest"), rel=1e-12)


def test_the_histogram_is_counted_once_and_towards_no_cap():
    delta, histogram = 1e-6, DpMechanism(5.0, 100, 100)
    ledger = PrivacyLedger(DpMechanism(4.0, 100, 100), delta, max_participations=1, accounting="honest")
    ledger.record_round(mechanism=histogram)
    for _ in range(5):
        ledger.record_round()
    # One training round (the cap) and the histogram: sigma 2.0 and 2.5.
    expected = closed_form_epsilon([2.0, 2.5], delta)
    assert expected - 1e-9 <= ledger.epsilon_honest <= expected * 1.02
    assert ledger.rounds == 6


def test_the_ledger_reads_back_both_accounts_exactly_and_refuses_the_older_format():
    ledger = PrivacyLedger(DpMechanism(1.3, 500, 50), 1e-5, max_participations=3, accounting="honest")
    ledger.record_round(mechanism=DpMechanism(2.0, 500, 500))
    for replies in (50, 30):
        ledger.record_round(replies)
    again = PrivacyLedger.from_dict(ledger.to_dict())
    assert again.epsilons() == ledger.epsilons() and again.epsilon == ledger.epsilon
    assert (again.max_participations, again.accounting, again.rounds) == (3, "honest", 3)
    older = {"mechanism": [1.3, 500, 50], "delta": 1e-5, "placement": "central", "released": [[1.3, 500, 50]]}
    with pytest.raises(ValueError, match="older format .* training rounds"):
        PrivacyLedger.from_dict(older)
    with pytest.raises(ValueError, match="release"):
        PrivacyLedger.from_dict({**ledger.to_dict(), "released": [{"mechanism": [1.3, 500, 50], "release": "maybe"}]})


def test_auto_accounting_is_honest_on_real_devices_and_sampled_in_a_simulation(tmp_path):
    assert resolve_accounting("auto", real_devices=True) == "honest"
    assert resolve_accounting("auto", real_devices=False) == "sampled"
    assert resolve_accounting("sampled", real_devices=True) == "sampled"
    with pytest.raises(PrivacyConfigError):
        resolve_accounting("optimistic", real_devices=True)
    real = FederatedConfig.from_run_config({"catalogue-size": 50, "devices": 1000, "dp-noise-multiplier": 1.0})
    simulated = FederatedConfig.from_run_config({"history-dir": str(tmp_path), "dp-noise-multiplier": 1.0})
    assert accounting_of(real) == "honest" and accounting_of(simulated) == "sampled"


def test_the_target_stops_at_the_runs_account():
    values = {"catalogue-size": 50, "devices": 10_000, "fraction-train": 0.01, "min-train-nodes": 2, "dp-noise-multiplier": 4.0,
              "num-server-rounds": 500, "dp-target-epsilon": 3.0}
    honest = FederatedConfig.from_run_config(values)  # real devices: honest by default
    mechanism, delta, honest_rounds = privacy_plan(honest, 10_000)
    assert 1 <= honest_rounds < 500
    assert mechanism.epsilon(honest_rounds, delta, accounting="honest") <= 3.0 < mechanism.epsilon(honest_rounds + 1, delta, accounting="honest")
    # With a cap, the honest epsilon stops growing after k rounds: every round planned runs.
    capped = FederatedConfig.from_run_config({**values, "dp-max-participations": honest_rounds})
    assert privacy_plan(capped, 10_000)[2] == 500
    guarantee = promised_guarantee(capped, 10_000, mechanism, delta, 500)
    assert guarantee == {"dp-epsilon": mechanism.epsilon(honest_rounds, delta, accounting="honest"), "dp-delta": delta, "dp-rounds": 500,
                         "dp-max-participations": honest_rounds}
    with pytest.raises(RunConfigError, match="honest accounting"):
        privacy_plan(FederatedConfig.from_run_config({**values, "dp-target-epsilon": 0.1}), 10_000)
