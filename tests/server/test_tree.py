"""DP-FTRL's tree-aggregated noise (fedpref.server.tree): the released noise sums to the tree's
live nodes, each prefix carries one node's variance per node that covers it, the tree restarts
every ceil(T / k) rounds, its noise comes from the OS unless a simulation asks otherwise, its
epsilon is dp-accounting's and a closed form's, it survives a resume without storing what
predicts the noise, and a run goes end to end on the in-process and the fast engine."""

import json
import math
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.server import checkpoint
from fedpref.server.app import ServerHooks
from fedpref.server.privacy import DpMechanism, NoiseSource, PrivacyConfigError, PrivacyLedger, default_delta
from fedpref.server.strategy import make_strategy
from fedpref.server.tree import (
    STATE_PREFIX,
    NoiseTree,
    TreeLedger,
    TreeMechanism,
    TreeNoise,
    rounds_per_tree,
    tree_depth,
    tree_epsilon,
    tree_of_round,
)

pytestmark = pytest.mark.filterwarnings("ignore:reproducible-noise=true")  # asked for on purpose where it is used

SHAPES = {"q": (5, 3), "b": (5,)}


def released(tree: NoiseTree, rounds) -> list[dict]:
    return [tree.increment(r, SHAPES) for r in rounds]


# -- the noise -------------------------------------------------------------------------------


def test_the_released_noise_sums_to_the_live_nodes_of_its_tree():
    tree = NoiseTree(0.3, NoiseSource(11), rounds_per_tree=13)
    running = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    for t in range(1, 14):
        change = tree.increment(t, SHAPES)
        for name in running:
            running[name] += change[name]
        # N(t) is the sum of the nodes of t's binary decomposition, and nothing else is kept.
        assert len(tree.nodes) == bin(t).count("1") <= tree_depth(13) == 4
        assert [end - start + 1 for start, end in tree.intervals()] == [1 << b for b in range(t.bit_length() - 1, -1, -1) if t >> b & 1]
        assert tree.intervals()[0][0] == 1 and tree.intervals()[-1][1] == t
        prefix = tree.prefix_noise()
        for name in running:
            np.testing.assert_allclose(running[name], prefix[name], rtol=0, atol=1e-12)


def test_a_prefix_carries_one_nodes_variance_for_each_node_that_covers_it():
    std, w, coordinates = 0.5, 8, 200_000
    tree = NoiseTree(std, NoiseSource(3), rounds_per_tree=w)
    previous = np.zeros(coordinates)
    for t in range(1, w + 1):
        change = tree.increment(t, {"x": (coordinates,)})["x"]
        prefix = previous + change
        # Var N(t) = (nodes covering [1, t]) sigma^2; the change adds one node and removes the
        # nodes it replaces, so Var (N(t) - N(t - 1)) = (1 + nodes replaced) sigma^2.
        replaced = (t & -t).bit_length() - 1
        assert prefix.var() == pytest.approx(bin(t).count("1") * std**2, rel=0.02)
        assert change.var() == pytest.approx((1 + replaced) * std**2, rel=0.02)
        assert abs(prefix.mean()) < 5 * std * math.sqrt(bin(t).count("1") / coordinates)
        previous = prefix


def test_the_tree_restarts_at_every_window_of_w_rounds_and_the_old_noise_stays_in_the_sum():
    w = 3
    tree = NoiseTree(1.0, NoiseSource(4), rounds_per_tree=w)
    changes = released(tree, range(1, w + 1))
    old = tree.prefix_noise()
    first_of_next = tree.increment(w + 1, SHAPES)
    assert (tree.window, tree.steps, tree.intervals()) == (1, 1, [(1, 1)])
    for name in SHAPES:
        # N(restart) = 0: the round's noise is the new tree's first node alone; the released
        # noise since the run began is the old tree's N(w) plus the new tree's N(1).
        np.testing.assert_array_equal(first_of_next[name], tree.nodes[0][name])
        total = sum(c[name] for c in changes) + first_of_next[name]
        np.testing.assert_allclose(total, old[name] + tree.prefix_noise()[name], atol=1e-12)
    assert [tree_of_round(r, w) for r in (1, 3, 4, 6, 7)] == [0, 0, 1, 1, 2]
    assert rounds_per_tree(50, 5) == 10 and rounds_per_tree(3, 2) == 2 and rounds_per_tree(3, 5) == 1
    with pytest.raises(ValueError, match="earlier tree"):
        tree.increment(2, SHAPES)


def test_a_skipped_round_does_not_advance_the_tree():
    tree = NoiseTree(1.0, NoiseSource(4), rounds_per_tree=4)
    released(tree, [1, 3])  # round 2 released nothing
    assert (tree.window, tree.steps) == (0, 2)
    released(tree, [4])
    assert tree.steps == 3
    full = NoiseTree(1.0, NoiseSource(4), rounds_per_tree=2)
    released(full, [1, 2])
    with pytest.raises(ValueError, match="would be one more"):
        full.increment(2, SHAPES)  # (a round noised twice)


# -- the wrapper on the server ----------------------------------------------------------------


def tree_config(**extra) -> FederatedConfig:
    return FederatedConfig.from_run_config({"strategy": "fedavg", "dp-noise-multiplier": 2.0, "clip-norm": 0.5, "dp-mechanism": "tree",
                                            "dp-max-participations": 2, "num-server-rounds": 8, **extra})


def replies_equal_to(arrays: dict[str, np.ndarray], n: int) -> list[Message]:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # as a ServerApp's run sets them
    content = lambda: RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()}), "metrics": MetricRecord({"num-examples": 1})})  # noqa: E731
    return [Message(content(), dst_node_id=i + 1, message_type=MessageType.TRAIN) for i in range(n)]


def noise_of_rounds(strategy, rounds, m: int = 10) -> list[np.ndarray]:
    """What each round's average moves when every device sends the model back: its noise alone."""
    current = {"w": np.zeros((100, 20), np.float32)}
    out = []
    for r in rounds:
        strategy.current_arrays = {k: v.copy() for k, v in current.items()}
        strategy._sent_global = {k: v.copy() for k, v in current.items()}
        arrays, _ = strategy.aggregate_train(r, replies_equal_to(current, m))
        out.append(arrays["w"].numpy().astype(np.float64) - current["w"])
    return out


def test_the_server_adds_the_trees_noise_with_nodes_of_z_c_over_m():
    strategy = make_strategy(tree_config(**{"reproducible-noise": True, "seed": 9}), 10, lambda report: None, noise=NoiseSource(9))
    wrapper = strategy.dp_wrapper
    assert isinstance(wrapper, TreeNoise) and wrapper.tree.rounds_per_tree == 4 and wrapper.tree.std == pytest.approx(2.0 * 0.5 / 10)
    moved = noise_of_rounds(strategy, [1, 2])
    assert moved[0].std() == pytest.approx(0.1, rel=0.05)
    # Round 2's noise is N(2) - N(1) = [1,2] - [1,1]: the two released averages sum to one node.
    np.testing.assert_allclose(moved[0] + moved[1], wrapper.tree.nodes[0]["w"], atol=1e-6)
    assert (moved[0] + moved[1]).std() == pytest.approx(0.1, rel=0.05)


def test_the_trees_noise_comes_from_the_os_unless_the_run_asks_for_its_seed():
    def first_round(reproducible: bool) -> np.ndarray:
        config = tree_config(**{"reproducible-noise": reproducible, "seed": 9})
        noise = NoiseSource.for_run(config.reproducible_noise, config.seed)
        return noise_of_rounds(make_strategy(config, 10, lambda report: None, noise=noise), [1])[0]

    assert not np.array_equal(first_round(False), first_round(False))  # same seed, fresh entropy each run
    np.testing.assert_array_equal(first_round(True), first_round(True))


def test_a_checkpoint_keeps_the_tree_only_when_its_noise_follows_from_the_seed():
    for reproducible in (False, True):
        config = tree_config(**{"reproducible-noise": reproducible, "seed": 9})
        noise = NoiseSource.for_run(reproducible, 9)
        strategy = make_strategy(config, 10, lambda report: None, noise=noise)
        noise_of_rounds(strategy, [1, 2, 3])
        state = strategy.state()
        kept = sorted(k for k in state if k.startswith(STATE_PREFIX))
        if not reproducible:
            # Nothing that predicts the noise to come: a resumed run starts a new tree.
            assert kept == []
            resumed = make_strategy(config, 10, lambda report: None, noise=NoiseSource())
            resumed.restore(state)
            assert resumed.dp_wrapper.tree.window is None
            with pytest.raises(ValueError, match="only a run with reproducible-noise"):
                resumed.restore({**state, f"{STATE_PREFIX}steps": 0, f"{STATE_PREFIX}window": None})
            continue
        assert kept == [f"{STATE_PREFIX}node-0", f"{STATE_PREFIX}node-1", f"{STATE_PREFIX}steps", f"{STATE_PREFIX}window"]
        # Through the checkpoint's own format: the resumed tree goes on as the uninterrupted one.
        saved = checkpoint.serialize(checkpoint.Checkpoint(config={}, completed_round=3, finished=False, arrays={}, strategy=state,
                                                           noise=noise.state()))
        back = _load_bytes(saved)
        again_noise = NoiseSource(9)
        again_noise.restore(back.noise)
        resumed = make_strategy(config, 10, lambda report: None, noise=again_noise)
        resumed.restore(back.strategy)
        np.testing.assert_array_equal(noise_of_rounds(resumed, [4])[0], noise_of_rounds(strategy, [4])[0])


def _load_bytes(data: bytes):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / checkpoint.CHECKPOINT_FILE).write_bytes(data)
        return checkpoint.load(folder)


def test_a_damaged_tree_in_a_checkpoint_is_refused():
    tree = NoiseTree(1.0, NoiseSource(1), rounds_per_tree=4)
    released(tree, [1, 2, 3])
    good = tree.state()
    for damage in ({f"{STATE_PREFIX}steps": 5}, {f"{STATE_PREFIX}steps": 1}, {f"{STATE_PREFIX}window": None},
                   {f"{STATE_PREFIX}node-1": [1, 2]}, {f"{STATE_PREFIX}steps": True}):
        with pytest.raises(ValueError, match="noise tree"):
            NoiseTree(1.0, NoiseSource(1), rounds_per_tree=4).restore({**good, **damage})


@pytest.mark.parametrize("override, key", [
    ({"dp-max-participations": 0}, "dp-max-participations"),
    ({"dp-clipping": "adaptive"}, "dp-clipping"),
    ({"dp-noise-placement": "distributed", "secagg": True}, "dp-noise-placement"),
])
def test_settings_the_tree_cannot_account_for_are_refused_with_the_key(override, key):
    with pytest.raises(RunConfigError, match=f"'{key}'.*dp-mechanism=tree"):
        tree_config(**override)


# -- the accounting ---------------------------------------------------------------------------


def closed_form_epsilon(z: float, w: int, trees: int, delta: float) -> float:
    """The tree written out again: a person reaches the depth nodes of the tree that hold their
    round, Gaussian noise z*C against a replace-one sensitivity of 2C each, so the RDP of a tree
    is alpha * depth / (2 (z/2)^2), and trees compose. Then the RDP-to-(epsilon, delta)
    conversion of Balle et al. 2020 (Proposition 12 of arXiv:2004.00010), at dp-accounting's orders."""
    depth = math.ceil(math.log2(w + 1))
    rho = trees * depth / (2 * (z / 2) ** 2)
    orders = np.array([a for a in DEFAULT_RDP_ORDERS if a > 1.01])
    return float(np.min(rho * orders + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1)))


def most_nodes_one_round_reaches(w: int) -> int:
    """Counted on the tree itself: the distinct nodes whose sums the prefixes 1..w use that
    hold a given round, at most over the rounds."""
    tree, used = NoiseTree(1.0, NoiseSource(0), rounds_per_tree=w), set()
    for t in range(1, w + 1):
        tree.increment(t, {"x": (1,)})
        used.update(tree.intervals())
    return max(sum(1 for a, b in used if a <= s <= b) for s in range(1, w + 1))


def test_the_depth_of_the_account_is_the_number_of_nodes_a_round_reaches():
    assert [tree_depth(w) for w in (1, 2, 3, 4, 7, 8, 10)] == [1, 2, 2, 3, 3, 4, 4]
    for w in range(1, 34):
        assert most_nodes_one_round_reaches(w) == tree_depth(w)


@pytest.mark.parametrize("z, w, trees, delta", [(5.0, 10, 5, 1 / 6710), (1.2, 1, 20, 1e-5), (12.7, 20, 5, 1e-6), (3.0, 100, 1, 1e-7)])
def test_epsilon_is_the_closed_form_of_the_trees(z, w, trees, delta):
    ours = tree_epsilon(z, w, trees, delta)
    assert ours == pytest.approx(closed_form_epsilon(z, w, trees, delta), rel=1e-9)
    # Bracketed by the tight PLD account of the same Gaussian mechanism (the tree's nodes as one
    # Gaussian of noise z/sqrt(depth) per unit of C; PLD doubles the sensitivity under replace-one
    # itself) and by zCDP's conversion rho + 2 sqrt(rho log(1/delta)).
    depth = tree_depth(w)
    tight = pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-3)
    tight.compose(dp_accounting.GaussianDpEvent(z / math.sqrt(depth)), trees)
    rho = trees * depth / (2 * (z / 2) ** 2)
    assert tight.get_epsilon(delta) <= ours <= rho + 2 * math.sqrt(rho * math.log(1 / delta))


def test_the_tree_assumes_nothing_about_sampling():
    delta = 1e-5
    small, large = TreeMechanism(4.0, 671, 67, 10), TreeMechanism(4.0, 1_000_000, 67, 10)
    assert small.epsilon(50, delta) == large.epsilon(50, delta) == tree_epsilon(4.0, 10, 5, delta)
    assert small.epsilon_honest(50, delta) == small.epsilon_sampled(50, delta) == small.epsilon(50, delta)
    # A partial last window is a shallower tree; epsilon never falls as rounds are added.
    values = [small.epsilon(r, delta) for r in range(0, 51)]
    assert values[0] == 0.0 and all(a <= b for a, b in zip(values, values[1:]))
    assert small.epsilon(43, delta) == pytest.approx(float(_independent([(4.0, 10)] * 4 + [(4.0, 3)], delta)), rel=1e-12)
    assert small.rounds_within(values[33], delta, limit=50) == max(r for r in range(51) if values[r] <= values[33])


def _independent(windows, delta):
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for z, steps in windows:
        accountant.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z / 2, steps))
    return accountant.get_epsilon(delta)


def test_the_ledger_accounts_each_window_by_its_rounds_and_its_fewest_replies():
    mechanism, delta = TreeMechanism(3.0, 500, 50, 4), 1e-5
    ledger = TreeLedger(mechanism, delta)
    # Rounds 1-3 in window 0 (round 3 with 25 of 50 replies), round 4 skipped, rounds 5 and 8 in window 1.
    for server_round, replies in ((1, 50), (2, 50), (3, 25), (5, 50), (8, None)):
        ledger.record_round(replies, server_round=server_round)
    assert ledger.epsilon == pytest.approx(_independent([(1.5, 3), (3.0, 2)], delta), rel=1e-12)
    assert ledger.epsilon_honest == ledger.epsilon_sampled == ledger.epsilon
    # The popularity histogram on the same people: a Gaussian without amplification.
    ledger.record_round(100, mechanism=DpMechanism(2.0, 500, 200))
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    accountant.compose(dp_accounting.GaussianDpEvent(2.0 * 100 / 200 / 2))
    for z, steps in [(1.5, 3), (3.0, 2)]:
        accountant.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z / 2, steps))
    assert ledger.epsilon == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    with pytest.raises(ValueError, match="not after the last round"):
        ledger.record_round(50, server_round=8)
    # Written out and read back (through the checkpoint's reader): the same account, going on alike.
    again = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert isinstance(again, TreeLedger) and again.mechanism == mechanism and again.epsilon == ledger.epsilon
    assert again.record_round(50) == ledger.record_round(50)


@pytest.mark.parametrize("forged", [
    {"kind": "tree"},
    {"kind": "tree", "mechanism": [3.0, 500, 50], "delta": 1e-5, "placement": "central", "released": [], "prior": []},
    {"kind": "tree", "mechanism": [3.0, 500, 50, 4], "delta": 1e-5, "placement": "central", "released": [[1.5, 2]], "prior": []},
    {"kind": "tree", "mechanism": [3.0, 500, 50, 4], "delta": 1e-5, "placement": "central", "released": [[2, 5], [1, 5]], "prior": []},
    {"kind": "tree", "mechanism": [3.0, 500, 50, 4], "delta": 1e-5, "placement": "distributed", "released": [], "prior": []},
    {"kind": "tree", "mechanism": [3.0, 500, 50, 0], "delta": 1e-5, "placement": "central", "released": [], "prior": []},
])
def test_a_ledger_that_describes_no_tree_is_refused(forged):
    with pytest.raises((ValueError, PrivacyConfigError)):
        PrivacyLedger.from_dict(forged)


# -- whole runs -------------------------------------------------------------------------------

N_DEVICES = 12


@pytest.fixture(scope="module")
def population(tmp_path_factory, synthetic_population):
    return synthetic_population(tmp_path_factory.mktemp("pop"), N_DEVICES, n_items=150, mean_events=12, seed=3)


def run_config(population, results, **extra) -> FederatedConfig:
    return FederatedConfig.from_run_config({
        "history-dir": str(population), "results-dir": str(results), "num-server-rounds": 3, "fraction-train": 0.5, "dim": 8,
        "local-epochs": 1, "private-epochs": 1, "evaluate-every": 3, "clip-norm": 0.5, "dp-noise-multiplier": 1.5, "strategy": "fedavg",
        "dp-mechanism": "tree", "dp-max-participations": 2, **extra,
    })


def test_a_tree_run_finishes_on_both_engines_and_records_its_epsilon(population, tmp_path):
    from fedpref.simulations.engines.fast import run_fast
    from fedpref.simulations.engines.inprocess import run_inprocess

    config = run_config(population, tmp_path / "inprocess", **{"reproducible-noise": True})
    reference = run_inprocess(config, n_devices=N_DEVICES)
    planned = TreeMechanism(1.5, N_DEVICES, 6, rounds_per_tree=2)  # ceil(3 / 2) rounds a tree: rounds 1-2, then round 3
    delta = default_delta(N_DEVICES)
    assert [r["epsilon"] for r in reference["rounds"]] == pytest.approx([planned.epsilon(r, delta) for r in (1, 2, 3)], rel=1e-12)
    privacy = reference["privacy"]
    assert privacy["mechanism"] == "tree" and privacy["rounds-per-tree"] == 2 
    assert privacy["epsilon"] == pytest.approx(_independent([(1.5, 2), (1.5, 1)], delta), rel=1e-12)
    assert "val-hr" in reference["rounds"][-1] and reference["chosen"]  # evaluated after the last round
    # The fast engine runs the same ServerApp: the same noise, epsilon and model.
    fast = run_fast(replace(config, results_dir=str(tmp_path / "fast")))
    assert [r["epsilon"] for r in fast["rounds"]] == [r["epsilon"] for r in reference["rounds"]]
    a, b = np.load(tmp_path / "inprocess" / "final_model.npz"), np.load(tmp_path / "fast" / "final_model.npz")
    for name in a.files:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5)


class Stop(Exception):
    """Stops a run once a round is trained (as a killed server would stop)."""


def test_a_resumed_run_starts_a_new_tree_and_spends_no_more_epsilon(population, tmp_path):
    from fedpref.simulations.engines.inprocess import run_inprocess

    config = run_config(population, tmp_path / "run", **{"num-server-rounds": 4})  # two trees of 2 rounds
    hooks = ServerHooks()

    def stop(row):
        if row["event"] == "train" and row["round"] == 2:
            raise Stop

    hooks.on_round.append(stop)
    with pytest.raises(Stop):
        run_inprocess(config, n_devices=N_DEVICES, hooks=hooks)
    left = checkpoint.load(tmp_path / "run" / "checkpoint")
    assert left.completed_round == 1 and not any(k.startswith(STATE_PREFIX) for k in left.strategy) and left.noise is None
    result = run_inprocess(config, n_devices=N_DEVICES)
    # Round 2 opens a second tree inside the first window; the window is accounted as one tree
    # of its two rounds, as in an uninterrupted run.
    delta = default_delta(N_DEVICES)
    planned = TreeMechanism(1.5, N_DEVICES, 6, rounds_per_tree=2)
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3, 4]
    assert [r["epsilon"] for r in result["rounds"]] == pytest.approx([planned.epsilon(r, delta) for r in (1, 2, 3, 4)], rel=1e-12)
