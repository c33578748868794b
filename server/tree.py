"""DP-FTRL: tree-aggregated noise on the running sum of the released averages, and its epsilon.

The mechanism (``dp-mechanism = tree``; Kairouz et al., *Practical and Private (Deep) Learning
without Sampling or Shuffling*, ICML 2021). Each round t the devices of the cohort clip their
updates to C, as under DP-FedAvg, and the server averages them; what it releases is that
average plus noise chosen so that the running sum of the released averages is the true
running sum plus the noise of a binary tree:

    released(1) + ... + released(t) = x(1) + ... + x(t) + N(t),

where N(t) is the sum of the tree nodes that cover [1, t] (the dyadic intervals of t's binary
decomposition: t = 6 is covered by [1, 4] and [5, 6]) and every node holds its own Gaussian
noise, ``N(0, (z C / m)^2)`` per coordinate, drawn once from the run's
:class:`~fedpref.server.privacy.NoiseSource` (the operating system's entropy, unless the run
asks for ``reproducible-noise``). Round t's noise is therefore N(t) - N(t - 1): the new node
minus the nodes it replaces. Only the nodes of N(t) stay alive between rounds, at most
``ceil(log2(w + 1))`` arrays of the model's shape (:class:`NoiseTree`).

The tree restarts (N = 0 again) at the first round of each window of ``w = ceil(T / k)``
rounds, T = ``num-server-rounds`` and k = ``dp-max-participations``: a device takes part at
most once in each window (:func:`tree_of_round`; the devices, the cohort sampler and the
engines enforce it, fedpref.models.participation), so at most once in each tree. A round
that is skipped (too few replies) releases nothing and does not advance the tree.

The server optimiser steps on the released average, as it does on DP-FedAvg's noised average,
so whatever it does (FedAvg, FedAvgM, FedAdam) is post-processing of the noisy prefix sums and
keeps the guarantee. FTRL itself (the model is the first model plus the noisy prefix sum of
updates) is ``strategy = fedavg``: its new model is the released average, which is the
previous model plus the round's average update plus N(t) - N(t - 1); FTRL with server
momentum (Kairouz et al.'s FTRL-M) is ``fedavgm``.

Nothing of the tree is stored in a checkpoint when its noise comes from the OS: whoever read
the live nodes could subtract the noise still to come. A resumed run starts a new tree at the
round it resumes, inside the current window; see :class:`TreeLedger` for why this costs no
epsilon. A run with ``reproducible-noise`` (whose noise anyone with the seed can compute
anyway) keeps the nodes, so that it repeats bit for bit across a resume.

Accounting (:func:`tree_epsilon`, :class:`TreeMechanism`, :class:`TreeLedger`): one window is
dp-accounting's ``SingleEpochTreeAggregationDpEvent(z / 2, steps)`` and the windows compose;
no amplification by sampling is claimed, so the honest and the sampled epsilon of a tree run
are the same number. Why z / 2, and why the event (which dp-accounting defines for
``REPLACE_SPECIAL`` neighbours) bounds fedpref's replace-one neighbours: see
:func:`window_event`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import INFO

import dp_accounting
import numpy as np
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.supercore.differential_privacy import compute_stdv

from .privacy import DpMechanism, NoiseSource, PrivacyConfigError, _NoiseFromSource

STATE_PREFIX = "dp-tree-"  # the strategy-state keys of a reproducible run's tree (the checkpoint's)


def rounds_per_tree(num_rounds: int, max_participations: int) -> int:
    """w = ceil(T / k): the rounds of each participation window, and of each tree."""
    if num_rounds < 1 or max_participations < 1:
        raise PrivacyConfigError(
            f"the tree needs at least one round and a participation cap of at least 1, got num-server-rounds {num_rounds} "
            f"and dp-max-participations {max_participations}: set dp-max-participations (how many rounds one device may join)"
        )
    return math.ceil(num_rounds / max_participations)


def tree_of_round(server_round: int, rounds_per_tree: int) -> int:
    """The window (and tree) of ``server_round``: 0 for rounds 1..w, 1 for w+1..2w, and so on."""
    if server_round < 1:
        raise ValueError(f"rounds are numbered from 1, got {server_round}")
    return (server_round - 1) // rounds_per_tree


def tree_depth(steps: int) -> int:
    """How many tree nodes one round's contribution reaches when the prefix sums of ``steps``
    rounds are released: ``ceil(log2(steps + 1))`` (the dyadic intervals inside [1, steps]
    that hold the round; the first round is in [1, 1], [1, 2], [1, 4], ...). The same number
    dp-accounting's RDP accountant uses for its tree events."""
    return math.ceil(math.log2(steps + 1)) if steps > 0 else 0


def window_event(noise_multiplier: float, step_counts: int | list[int]) -> dp_accounting.DpEvent:
    """The DP event of one participation window: ``SingleEpochTreeAggregationDpEvent(z / 2,
    step_counts)`` (the rounds of the window's tree; more than one when a resumed run
    restarted the tree inside the window), to compose under ``REPLACE_SPECIAL``.

    Why this bounds fedpref's neighbours, which *replace* one person's data by another's (the
    population size is public). dp-accounting defines the event for ``REPLACE_SPECIAL``
    neighbours, in which a record is replaced by a special one that contributes nothing, so
    that a node's sum moves by at most the clipping bound, and its ``noise_multiplier`` is the
    nodes' noise over that sensitivity; its RDP is ``alpha * depth / (2 sigma^2)``, the Rényi
    divergence of the Gaussian mechanism on the vector of the ``depth`` nodes one record
    reaches. Replacing one person's clipped update by another's moves each of those nodes (on
    the scale of the sum) by at most 2C, and the nodes carry noise z·C: the same Gaussian
    mechanism, with the ratio of noise to sensitivity z / 2. Without sampling the Rényi
    divergence of a Gaussian mechanism depends on nothing but that ratio (both neighbours'
    outputs are Gaussians of the same covariance whose means differ by at most the
    sensitivity), so the event with ``z / 2`` gives the RDP of the replace-one mechanism. The
    person is in at most one round of the window, hence in at most one of its trees, which is
    the event's own assumption across the trees it lists (Kairouz et al. 2021, appendix D)."""
    if not noise_multiplier > 0:
        raise PrivacyConfigError(f"the tree needs a positive noise multiplier, got {noise_multiplier}")
    return dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier / 2.0, step_counts)


def _accountant() -> rdp.RdpAccountant:
    return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)


def _prior_event(mechanism: DpMechanism) -> dp_accounting.DpEvent:
    """Another release on the same people (the popularity histogram), without amplification by
    sampling (the tree claims none): a Gaussian of ratio z / 2, whose RDP is the same under
    any of the neighbouring relations (see :func:`window_event`)."""
    return dp_accounting.GaussianDpEvent(mechanism.noise_multiplier / 2.0)


def _epsilon(windows: list[tuple[float, int]], delta: float, prior: tuple[DpMechanism, ...] = ()) -> float:
    """Epsilon at ``delta`` of the ``windows`` (each: its effective noise multiplier and its
    rounds released) after the ``prior`` releases."""
    if not 0.0 < delta < 1.0:
        raise PrivacyConfigError(f"delta must lie in (0, 1), got {delta}")
    windows = [(z, steps) for z, steps in windows if steps > 0]
    if not windows and not prior:
        return 0.0
    accountant = _accountant()
    for mechanism in prior:
        accountant.compose(_prior_event(mechanism))
    counted: dict[tuple[float, int], int] = {}
    for z, steps in windows:
        counted[(z, steps)] = counted.get((z, steps), 0) + 1
    for (z, steps), count in counted.items():
        accountant.compose(window_event(z, steps), count)
    return float(accountant.get_epsilon(delta))


def tree_epsilon(noise_multiplier: float, rounds_per_tree: int, trees: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``trees`` trees of ``rounds_per_tree`` rounds each, every tree's
    nodes noised with ``noise_multiplier`` (z, in units of C on the sum of updates), each person
    in at most one round of each tree. It is the honest epsilon (no assumption on how cohorts
    are drawn) and the sampled one alike: the tree claims no amplification by sampling."""
    if trees < 0 or rounds_per_tree < 1:
        raise ValueError(f"trees must be 0 or more and rounds per tree at least 1, got {trees} and {rounds_per_tree}")
    return _epsilon([(noise_multiplier, rounds_per_tree)] * trees, delta)


@dataclass(frozen=True)
class TreeMechanism:
    """The tree mechanism of a run, as planned (every round released in full); the counterpart
    of :class:`~fedpref.server.privacy.DpMechanism` for ``dp-mechanism = tree``."""

    noise_multiplier: float  # z: each node's noise standard deviation on the sum of clipped updates, in units of C
    population: int  # N (the accounting does not use it: no amplification by sampling)
    cohort: int  # m: the average is over m updates, its noise z * C / m per node
    rounds_per_tree: int  # w = ceil(T / k): a tree restarts every w rounds; a device joins at most one round of each

    kind = "tree"

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise PrivacyConfigError(f"the noise multiplier must be positive to account for privacy, got {self.noise_multiplier}")
        if self.population < 1 or not 1 <= self.cohort <= self.population:
            raise PrivacyConfigError(f"the cohort must lie in [1, population]: got cohort {self.cohort} of population {self.population}")
        if self.rounds_per_tree < 1:
            raise PrivacyConfigError(f"a tree spans at least one round, got {self.rounds_per_tree}")

    def windows(self, rounds: int) -> list[int]:
        """The rounds released in each window after ``rounds`` rounds."""
        full, rest = divmod(rounds, self.rounds_per_tree)
        return [self.rounds_per_tree] * full + ([rest] if rest else [])

    def epsilon(self, rounds: int, delta: float, prior: tuple[DpMechanism, ...] = (), accounting: str = "honest",
                max_participations: int = 0) -> float:
        """Epsilon after ``rounds`` rounds at ``delta``, composed after one release of each
        ``prior`` mechanism (such as the popularity histogram). The same number under either
        ``accounting`` (no sampling is assumed); the cap is already in :attr:`rounds_per_tree`,
        so ``max_participations`` changes nothing (both are taken for the signature of
        :meth:`fedpref.server.privacy.DpMechanism.epsilon`)."""
        if rounds < 0:
            raise ValueError(f"rounds must be 0 or more, got {rounds}")
        return _epsilon([(self.noise_multiplier, steps) for steps in self.windows(rounds)], delta, prior)

    # The honest and the sampled epsilon of the tree are the same number (no sampling is assumed).
    epsilon_honest = epsilon
    epsilon_sampled = epsilon

    def rounds_within(self, target_epsilon: float, delta: float, limit: int = 100_000, prior: tuple[DpMechanism, ...] = (),
                      accounting: str = "honest", max_participations: int = 0) -> int:
        """The most rounds (at most ``limit``) whose epsilon after ``prior`` stays at or below
        ``target_epsilon`` (epsilon never falls as rounds are added)."""
        if not target_epsilon > 0:
            raise PrivacyConfigError(f"the target epsilon must be positive, got {target_epsilon}")
        low, high = 0, limit  # epsilon(low) <= target, or low = 0
        while low < high:
            mid = (low + high + 1) // 2
            if self.epsilon(mid, delta, prior) <= target_epsilon:
                low = mid
            else:
                high = mid - 1
        return low


class TreeLedger:
    """The server's running account of a tree run (the counterpart of
    :class:`~fedpref.server.privacy.PrivacyLedger`): each released round is recorded with its
    number and its replies, and epsilon is that of the windows so far.

    A window is accounted as one tree of every round released in it. A resumed run whose noise
    came from the OS restarts its tree inside the window (the old nodes were not kept), so the
    window really holds two trees of a and b rounds with a + b at most w; a person joins at
    most one round of the window, so at most one of the two, and dp-accounting's
    ``SingleEpochTreeAggregationDpEvent(z / 2, [a, b])`` bounds it, with depth
    ``ceil(log2(max(a, b) + 1))``, never more than the depth of one tree of a + b rounds that
    the ledger counts. The restart costs no epsilon.

    A round in which only m' of the m devices asked replied is noisier for the account: its
    average divides by m', its node noise is z·C/m, so a person's update weighs z·m'/m against
    the noise, as :class:`~fedpref.server.privacy.PrivacyLedger` accounts such a round; a
    window is accounted with the smallest such share among its rounds. Other releases on the
    same people (the popularity histogram) are composed as Gaussians without amplification."""

    kind = "tree"

    def __init__(self, mechanism: TreeMechanism, delta: float, placement: str = "central", max_participations: int = 0,
                 accounting: str = "honest") -> None:
        if not 0.0 < delta < 1.0:
            raise PrivacyConfigError(f"delta must lie in (0, 1), got {delta}")
        if placement != "central":
            raise PrivacyConfigError(f"the tree's noise is added by the server (central), got {placement!r}")
        if isinstance(max_participations, bool) or not isinstance(max_participations, int) or max_participations < 0:
            raise PrivacyConfigError(f"the participation cap is 0 (none) or a positive number of rounds, got {max_participations!r}")
        if accounting not in ("honest", "sampled"):
            raise PrivacyConfigError(f"the accounting is honest or sampled, got {accounting!r}")
        self.mechanism = mechanism
        self.delta = delta
        self.placement = placement
        self.max_participations = max_participations  # as the run set it (the windows already hold it)
        self.accounting = accounting  # which account the run reports: the same number here
        self.released: list[tuple[int, int | None]] = []  # (server round, replies or None for all), in order
        self.prior: list[DpMechanism] = []  # other releases on the same people, as accounted

    @property
    def rounds(self) -> int:
        return len(self.released)

    def _windows(self) -> list[tuple[float, int]]:
        cohort, z = self.mechanism.cohort, self.mechanism.noise_multiplier
        windows: dict[int, tuple[float, int]] = {}
        for server_round, replies in self.released:
            share = min(replies, cohort) / cohort if replies else 1.0
            window = tree_of_round(server_round, self.mechanism.rounds_per_tree)
            least, steps = windows.get(window, (1.0, 0))
            windows[window] = (min(least, share), steps + 1)
        return [(z * share, steps) for share, steps in windows.values()]

    @property
    def epsilon(self) -> float:
        return _epsilon(self._windows(), self.delta, tuple(self.prior)) if self.released or self.prior else 0.0

    @property
    def epsilon_honest(self) -> float:
        return self.epsilon

    @property
    def epsilon_sampled(self) -> float:
        """The same as the honest epsilon: the tree's account assumes nothing about sampling."""
        return self.epsilon

    def epsilons(self) -> dict[str, float]:
        """Both accounts, equal for the tree: ``{"epsilon-sampled": ..., "epsilon-honest": ...}``."""
        epsilon = self.epsilon
        return {"epsilon-sampled": epsilon, "epsilon-honest": epsilon}

    def record_round(self, replies: int | None = None, mechanism: DpMechanism | None = None, server_round: int | None = None) -> float:
        """Account one released round ``server_round`` (default: the round after the last one
        recorded) in which ``replies`` devices of the cohort replied (default: all of them); or,
        with ``mechanism``, another release on the same people (the popularity histogram).
        Returns epsilon after it."""
        if mechanism is not None:
            if replies is not None and 0 < replies < mechanism.cohort:
                mechanism = DpMechanism(mechanism.noise_multiplier * replies / mechanism.cohort, mechanism.population, mechanism.cohort)
            self.prior.append(mechanism)
            return self.epsilon
        last = self.released[-1][0] if self.released else 0
        server_round = last + 1 if server_round is None else int(server_round)
        if server_round <= last:
            raise ValueError(f"round {server_round} is not after the last round accounted ({last})")
        self.released.append((server_round, None if replies is None else int(replies)))
        return self.epsilon

    def to_dict(self) -> dict:
        """The ledger as plain JSON values (``kind: tree``, which
        :meth:`fedpref.server.privacy.PrivacyLedger.from_dict` hands back to :meth:`from_dict`)."""
        m = self.mechanism
        return {"kind": "tree", "mechanism": [m.noise_multiplier, m.population, m.cohort, m.rounds_per_tree], "delta": self.delta,
                "placement": self.placement, "max-participations": self.max_participations, "accounting": self.accounting,
                "released": [list(r) for r in self.released],
                "prior": [[p.noise_multiplier, p.population, p.cohort] for p in self.prior]}

    @classmethod
    def from_dict(cls, data: dict) -> TreeLedger:
        """The ledger :meth:`to_dict` wrote; ``PrivacyConfigError`` or ``ValueError`` for
        anything that does not describe one."""
        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not isinstance(data, dict) or data.get("kind") != "tree" or not number(data.get("delta")):
            raise ValueError("not a tree privacy ledger (kind, mechanism, delta, placement, released, prior)")
        values = data.get("mechanism")
        if not isinstance(values, list) or len(values) != 4 or not number(values[0]) or not all(integer(v) for v in values[1:]):
            raise ValueError(f"a tree mechanism is [noise multiplier, population, cohort, rounds per tree], got {values!r}")
        cap, accounting = data.get("max-participations", 0), data.get("accounting", "honest")
        if not integer(cap) or accounting not in ("honest", "sampled"):
            raise ValueError(f"a tree ledger's cap is a whole number and its accounting honest or sampled, got {cap!r}, {accounting!r}")
        ledger = cls(TreeMechanism(float(values[0]), *values[1:]), float(data["delta"]), data.get("placement"), cap, accounting)
        released, prior = data.get("released"), data.get("prior")
        if not isinstance(released, list) or not isinstance(prior, list):
            raise ValueError("a tree ledger lists its released rounds and its prior releases")
        for entry in prior:
            if not isinstance(entry, list) or len(entry) != 3 or not number(entry[0]) or not all(integer(v) for v in entry[1:]):
                raise ValueError(f"a prior release is [noise multiplier, population, cohort], got {entry!r}")
            ledger.prior.append(DpMechanism(float(entry[0]), entry[1], entry[2]))
        for entry in released:
            if not isinstance(entry, list) or len(entry) != 2 or not integer(entry[0]) or not (entry[1] is None or integer(entry[1])):
                raise ValueError(f"a released round is [round, replies], got {entry!r}")
            ledger.record_round(entry[1], server_round=entry[0])
        return ledger


class NoiseTree:
    """The live nodes of the binary tree whose sums make N(t) (see the module's docstring), for
    the arrays of one model. :meth:`increment` advances the tree by one released round and
    returns N(t) - N(t - 1), restarting the tree at each new window."""

    def __init__(self, std: float, noise: NoiseSource, rounds_per_tree: int) -> None:
        if not std > 0 or rounds_per_tree < 1:
            raise ValueError(f"a noise tree needs a positive standard deviation and at least one round per tree, got {std}, {rounds_per_tree}")
        self.std = std
        self.noise = noise
        self.rounds_per_tree = rounds_per_tree
        self.window: int | None = None  # the window of the current tree (None: no tree yet)
        self.steps = 0  # rounds released in the current tree
        self.nodes: list[dict[str, np.ndarray]] = []  # the nodes of N(steps), the largest interval first

    def intervals(self) -> list[tuple[int, int]]:
        """The rounds of the current tree (1-based within it) that each live node covers."""
        out, start = [], 1
        for level in range(self.steps.bit_length() - 1, -1, -1):
            if self.steps >> level & 1:
                out.append((start, start + (1 << level) - 1))
                start += 1 << level
        return out

    def prefix_noise(self) -> dict[str, np.ndarray] | None:
        """N(steps): the sum of the live nodes (None before the first round of a tree)."""
        if not self.nodes:
            return None
        total = {name: value.copy() for name, value in self.nodes[0].items()}
        for node in self.nodes[1:]:
            for name in total:
                total[name] += node[name]
        return total

    def increment(self, server_round: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The noise of the release of ``server_round`` (float64, per array of ``shapes``):
        N(t) - N(t - 1) of its tree, a new tree (N(0) = 0) if the round opens a window."""
        window = tree_of_round(server_round, self.rounds_per_tree)
        if window != self.window:
            if self.window is not None and window < self.window:
                raise ValueError(f"round {server_round} is in an earlier tree than the current one")
            self.window, self.steps, self.nodes = window, 0, []
        if self.steps >= self.rounds_per_tree:
            raise ValueError(f"a tree holds {self.rounds_per_tree} rounds; round {server_round} would be one more")
        self.steps += 1
        merged = (self.steps & -self.steps).bit_length() - 1  # t's trailing zeros: the nodes [t - 2^r + 1, t] replaces
        replaced = self.nodes[len(self.nodes) - merged:] if merged else []
        del self.nodes[len(self.nodes) - len(replaced):]
        rng = self.noise.generator()
        node = {name: rng.normal(0.0, self.std, shape) for name, shape in shapes.items()}
        self.nodes.append(node)
        change = {name: value.copy() for name, value in node.items()}
        for old in replaced:
            for name in change:
                change[name] -= old[name]
        return change

    def state(self) -> dict:
        """The tree as strategy-state entries (:data:`STATE_PREFIX` keys) for a checkpoint."""
        state = {f"{STATE_PREFIX}window": self.window, f"{STATE_PREFIX}steps": self.steps}
        for i, node in enumerate(self.nodes):
            state[f"{STATE_PREFIX}node-{i}"] = {name: value.copy() for name, value in node.items()}
        return state

    def restore(self, state: dict) -> None:
        """The tree :meth:`state` wrote; ``ValueError`` for entries that do not describe one."""
        window, steps = state.get(f"{STATE_PREFIX}window"), state.get(f"{STATE_PREFIX}steps")
        valid_steps = isinstance(steps, int) and not isinstance(steps, bool) and 0 <= steps <= self.rounds_per_tree
        nodes = [state.get(f"{STATE_PREFIX}node-{i}") for i in range(bin(steps).count("1"))] if valid_steps else None
        if nodes is None or (window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 0)) \
                or (window is None) != (steps == 0) or any(not isinstance(n, dict) for n in nodes) \
                or sum(1 for key in state if key.startswith(f"{STATE_PREFIX}node-")) != len(nodes):
            raise ValueError("the checkpoint's noise tree is not one this run wrote (its window, rounds and nodes disagree)")
        shapes = [{k: np.shape(v) for k, v in n.items()} for n in nodes]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("the checkpoint's noise tree holds nodes of different shapes")
        self.window, self.steps = window, steps
        self.nodes = [{k: np.asarray(v, dtype=np.float64) for k, v in n.items()} for n in nodes]


class TreeNoise(_NoiseFromSource, DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP wrapper with fixed clipping whose noise is the tree's: the average of
    round t carries N(t) - N(t - 1) (:class:`NoiseTree`), the nodes' standard deviation z·C/m,
    as :class:`~fedpref.server.privacy.FixedClippingNoise` adds to every round."""

    def __init__(self, *args, rounds_per_tree: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tree = NoiseTree(compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients), self.noise, rounds_per_tree)
        self.server_round: int | None = None

    def at_round(self, server_round: int) -> None:
        """The run's number of the round whose average comes next (it places it in its tree)."""
        self.server_round = server_round

    def aggregate_train(self, server_round, replies):
        self.at_round(server_round)
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        if self.server_round is None:
            raise RuntimeError("the tree's wrapper was not told which round it noises (at_round)")
        arrays = {name: aggregated_arrays[name].numpy() for name in aggregated_arrays}
        change = self.tree.increment(self.server_round, {name: value.shape for name, value in arrays.items()})
        log(INFO, "aggregate_train: tree noise, round %s of tree %s (nodes of %.4f stdev, %s)",
            self.tree.steps, self.tree.window, self.tree.std, self.noise.mode)
        self.server_round = None
        return ArrayRecord({name: Array(np.asarray(value + change[name].astype(value.dtype))) for name, value in arrays.items()})

    def state(self) -> dict:
        """What a checkpoint keeps of the tree: its nodes only when the noise follows from the
        run's seed (``reproducible-noise``); nothing otherwise, so that nothing stored predicts
        the noise to come (a resumed run starts a new tree; :class:`TreeLedger`)."""
        return self.tree.state() if self.noise.reproducible else {}

    def restore(self, state: dict) -> None:
        if any(key.startswith(STATE_PREFIX) for key in state):
            if not self.noise.reproducible:
                raise ValueError("the checkpoint holds a noise tree, which only a run with reproducible-noise keeps")
            self.tree.restore(state)
        elif self.tree.window is None:
            log(INFO, "resumed: the noise tree starts afresh at the next round (its nodes were not stored)")
