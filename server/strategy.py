"""fedpref's Flower strategies: one named class per server optimiser, each composed of Flower's.

:class:`FedprefStrategy` holds the rules of a fedpref round that Flower's strategies do not
have: every reply is checked before anything of it is read (:mod:`fedpref.server.validation`;
a bad reply is left out and counted, never stops the round), encoded updates are decoded, a
per-device norm bound, equal weights, the server learning-rate schedule, ``min-replies``,
evaluation every ``evaluate-every`` rounds, and a :class:`fedpref.server.rounds.TrainReport` /
:class:`~fedpref.server.rounds.EvaluateReport` of each round to the run's listener.

It sits above a Flower server optimiser (``FedAvg``, ``FedAvgM``, ``FedAdam``, ``FedYogi``),
which in turn sits above :class:`CohortsAndAverage`: Flower's ``FedAvg`` whose cohorts are
drawn by the run's :class:`fedpref.server.grid.CohortSampler` and whose average is the
chosen one (the plain mean, the centrally noised mean of Flower's DP wrapper, a median or a
trimmed mean). The optimiser then steps on that average, as Flower's optimisers step on
``FedAvg.aggregate_train``: under central DP the noise goes on the average *before* the
optimiser steps on it (the optimiser is post-processing, and the accounted mechanism is the
noised average; wrapping FedAdam in the DP wrapper instead would add the noise after Adam's
step, whose sensitivity is not C / m).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, FedYogi
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedpref.models.encoding import EncodingError, decode, encoded_names
from fedpref.models.config import PARTIAL_AGGREGATE, FederatedConfig, cosine_factor
from fedpref.server.grid import CohortSampler
from fedpref.server.privacy import AdaptiveClippingNoise, FixedClippingNoise, NoiseSource
from fedpref.server.rounds import EvaluateReport, TrainReport
from fedpref.server.tree import TreeNoise, rounds_per_tree
from fedpref.server.validation import (
    WEIGHT,
    check_evaluate_reply,
    check_partial,
    check_size,
    check_train_reply,
    default_max_bytes,
    evaluate_metric_keys,
    partial_counts,
    train_metric_keys,
)


def _decode(reply: Message, sent_global: dict, encoding: str) -> str | None:
    """Turn a reply carrying an encoded update into the float32 weights ``global + update`` that
    Flower's strategies average (in place); the reason if it cannot be decoded (it is rejected).
    Nothing of the reply is used before it is checked: an ArrayRecord ``arrays`` holding
    exactly the arrays of ``encoding`` (:func:`fedpref.models.encoding.encoded_names`), each
    readable, in the dtype of the encoding and the shape the server sent."""
    record = reply.content.array_records.get("arrays")
    if record is None:
        found = type(reply.content["arrays"]).__name__ if "arrays" in reply.content else "nothing"
        return f"undecodable {encoding} update: 'arrays' must be an ArrayRecord, got {found}"
    names = set(record.keys())
    expected = encoded_names(list(sent_global), encoding)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        return f"undecodable {encoding} update: missing arrays {missing[:5]}, unexpected {[n[:40] for n in extra[:5]]}"
    arrays = {}
    for name in sorted(names):
        try:
            arrays[name] = record[name].numpy()
        except Exception as exc:  # bytes that are not an array of the declared dtype and shape
            return f"undecodable {encoding} update: array {name!r} unreadable ({type(exc).__name__})"
    try:
        update = decode(arrays, list(sent_global), encoding, shapes={k: v.shape for k, v in sent_global.items()})
    except EncodingError as exc:
        return f"undecodable {encoding} update: {exc}"
    reply.content["arrays"] = ArrayRecord({k: Array((sent_global[k].astype(np.float32) + update[k]).astype(sent_global[k].dtype)) for k in sent_global})
    return None


def _in_sent_dtype(arrays: ArrayRecord, sent_global: dict[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` cast back to the dtype of the global model the server sent (the dtype devices
    send back: validation rejects any other). FedAdam and FedYogi step with a NumPy float64
    scalar, and FedMedian and FedTrimmedAvg aggregate in float64: either would turn the model
    float64, and every device would receive and send twice the bytes."""
    out = {}
    for name, array in arrays.items():
        dtype = sent_global[name].dtype if name in sent_global else array.dtype
        out[name] = array if np.dtype(array.dtype) == dtype else Array(array.numpy().astype(dtype))
    return ArrayRecord(out)


def _validated(replies: list[Message], reason_of: Callable[[Message], str | None]) -> tuple[list[Message], int]:
    """The replies for which ``reason_of`` finds nothing wrong, and how many it rejected (each
    logged with its sender and reason). A check that raises on a reply rejects that reply: what
    one device sent never stops the round, or the run."""
    kept, rejected = [], 0
    for reply in replies:
        try:
            reason = reason_of(reply)
        except Exception as exc:  # a content no check foresaw: that reply's fault alone
            reason = f"unreadable reply ({type(exc).__name__}: {str(exc)[:200]})"
        if reason is None:
            kept.append(reply)
        else:
            log(WARNING, "rejected a reply from node %s: %s", reply.metadata.src_node_id, reason)
            rejected += 1
    return kept, rejected


def _bounded(reply: Message, sent_global: dict, bound: float) -> Message:
    """A device's reply with its update clipped to ``bound`` by the server and its weight set to
    1 (run-config server-norm-bound): no device moves the average by more than ``bound / m``."""
    arrays = reply.content["arrays"]
    update = {k: arrays[k].numpy().astype(np.float64) - sent_global[k].astype(np.float64) for k in sent_global}
    norm = float(np.sqrt(sum(np.dot(u.ravel(), u.ravel()) for u in update.values())))
    if norm > bound:
        scale = bound / norm
        reply.content["arrays"] = ArrayRecord({k: Array((sent_global[k].astype(np.float64) + update[k] * scale).astype(sent_global[k].dtype)) for k in sent_global})
    reply.content["metrics"]["num-examples"] = 1
    return reply


def _weight_total(replies: list[Message]) -> float:
    """The sum of the replies' weights (``num-examples``), which Flower's average divides by
    (inf when it is beyond float range)."""
    try:
        return math.fsum(float(r.content["metrics"][WEIGHT]) for r in replies)
    except OverflowError:  # an int beyond float range, or a sum beyond it
        return math.inf


def _known(metrics, keys: frozenset[str]) -> MetricRecord | None:
    """``metrics`` with only the keys devices are expected to send (what the run store and
    rounds.json keep: nothing a device names itself)."""
    if metrics is None:
        return None
    return MetricRecord({k: v for k, v in metrics.items() if k in keys})


def _partial(reply: Message) -> dict | None:
    """The partial-aggregate record of a reply that stands for several devices, or None. Only
    for replies whose record passed :func:`fedpref.server.validation.check_partial` (the
    strategy refuses every other reply that carries one before it counts anything)."""
    if reply.has_error() or PARTIAL_AGGREGATE not in reply.content.config_records:
        return None
    return reply.content.config_records[PARTIAL_AGGREGATE]


def _devices(reply: Message) -> int:
    """How many devices a reply stands for (0 for an error reply)."""
    if reply.has_error():
        return 0
    partial = _partial(reply)
    return 1 if partial is None else int(partial["devices"])


def _norm_bits(reply: Message) -> int:
    partial = _partial(reply)
    if partial is not None:
        return int(partial.get("norm-bits", 0))
    return int(bool(next(iter(reply.content.metric_records.values())).get(KEY_NORM_BIT, 0)))




class NoisedAverage:
    """The average of the devices' clipped models with central Gaussian noise, added by
    Flower's ``DifferentialPrivacyClientSideFixedClipping`` (or its adaptive sibling; std
    z * C / m on the average of m updates), or the tree's noise (:class:`fedpref.server.tree.TreeNoise`)."""

    def __init__(self, wrapper: DifferentialPrivacyClientSideFixedClipping) -> None:
        self.wrapper = wrapper

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if isinstance(self.wrapper, TreeNoise):  # the tree places each release by the run's round
            self.wrapper.at_round(server_round)
        if not any(_partial(r) for r in replies):
            return self.wrapper.aggregate_train(server_round, replies)
        # Partial aggregates (each for many devices): the wrapper's own steps, with the devices
        # they stand for counted (Flower's wrapper would count each as one reply).
        wrapper = self.wrapper
        arrays, metrics = wrapper.strategy.aggregate_train(server_round, replies)  # the plain average
        if isinstance(wrapper, AdaptiveClippingNoise):  # adaptive clipping: C follows the noised share of norm bits
            devices = sum(_devices(r) for r in replies)
            bits = sum(_norm_bits(r) for r in replies)
            wrapper._geometric_update(wrapper._noisy_fraction(bits, devices))
        if arrays:
            arrays = wrapper._add_noise_to_aggregated_arrays(arrays)
        return arrays, metrics


class CohortsAndAverage(FedAvg):
    """Flower's ``FedAvg`` with the cohort drawn by ``sampler`` (Flower's own ``sample_nodes``,
    on the process's global ``random``, when there is none) and the average taken by
    ``average`` (an object with Flower's ``aggregate_train``; FedAvg's mean when None)."""

    sampler: CohortSampler | None = None
    average = None

    def _cohort(self, grid: Grid, fraction: float, minimum: int, training_round: int | None = None) -> list[int]:
        sample_size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        if self.sampler is None:
            node_ids, every = sample_nodes(grid, self.min_available_nodes, sample_size)
        else:  # a training cohort is drawn under the participation cap (fedpref.server.grid.CohortSampler)
            node_ids, every = self.sampler.sample(grid, self.min_available_nodes, sample_size, training_round=training_round)
        log(INFO, "configure: Sampled %s nodes (out of %s)", len(node_ids), len(every))
        return node_ids

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, grid, self.fraction_train, self.min_train_nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, grid, self.fraction_evaluate, self.min_evaluate_nodes, MessageType.EVALUATE)

    def _configure(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, fraction: float,
                   min_nodes: int, message_type: str) -> Iterable[Message]:
        """Flower's configure step, with the cohort drawn by this strategy's sampler."""
        if fraction == 0.0:
            return []
        node_ids = self._cohort(grid, fraction, min_nodes, server_round if message_type == MessageType.TRAIN else None)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, message_type)

    def aggregate_train(self, server_round, replies):
        if self.average is None:
            return super().aggregate_train(server_round, replies)
        return self.average.aggregate_train(server_round, replies)


@dataclass(frozen=True)
class RoundRules:
    """What a fedpref round needs to know of its run (derived once from the run config)."""

    config: FederatedConfig
    last: int  # the last round that will run (it evaluates)
    train_keys: frozenset[str]  # the metric names of this run's devices, exactly
    evaluate_keys: frozenset[str]
    claim_bound: int  # the weight one device may claim
    accept_partial: bool  # replies may be partial aggregates (a grid that computes them: the fast engine's)
    partial_train: bool  # ... in training too (a median, a trimmed mean or a per-device bound needs each device's update)
    central_noise: bool


STRATEGY_STATE = ("m_t", "v_t", "momentum_vector")  # what FedAdam, FedYogi and FedAvgM keep between rounds


class FedprefStrategy:
    """The rules of a fedpref round (see the module's docstring), above a Flower optimiser.
    ``report(TrainReport | EvaluateReport)`` hears each round's outcome; ``before_round(round,
    arrays)`` is called as each round starts (the checkpoint). ``round_offset`` shifts Flower's
    round numbers (1, 2, ...) to the run's when a run resumes."""

    round_offset = 0
    dp_wrapper: DifferentialPrivacyClientSideFixedClipping | None = None

    def __init__(self, *, rules: RoundRules, report: Callable[[TrainReport | EvaluateReport], None],
                 before_round: Callable[[int, ArrayRecord], None] | None = None, sampler: CohortSampler | None = None,
                 average=None, **flower) -> None:
        super().__init__(**flower)
        self.rules = rules
        self.report = report
        self.before_round = before_round
        self.sampler = sampler
        self.average = average
        self._asked: int | None = None

    def set_server_step(self, step: float) -> None:
        """This round's server learning rate (lr-end schedules it across rounds)."""

    def state(self) -> dict:
        """What the strategy keeps between rounds, for the checkpoint."""
        state = {name: vars(self)[name] for name in STRATEGY_STATE if name in vars(self)}
        if self.dp_wrapper is not None:
            state["dp-clipping-norm"] = float(self.dp_wrapper.clipping_norm)
        if isinstance(self.dp_wrapper, TreeNoise):  # its nodes only with reproducible-noise
            state.update(self.dp_wrapper.state())
        return state

    def restore(self, state: dict) -> None:
        for name in STRATEGY_STATE:
            if name in state:
                setattr(self, name, state[name])
        if "dp-clipping-norm" in state and self.dp_wrapper is not None:
            self.dp_wrapper.clipping_norm = state["dp-clipping-norm"]
        if isinstance(self.dp_wrapper, TreeNoise):
            self.dp_wrapper.restore(state)

    def configure_train(self, server_round: int, arrays: ArrayRecord, cfg: ConfigRecord, grid) -> Iterable[Message]:
        server_round += self.round_offset
        if self.before_round is not None:
            self.before_round(server_round, arrays)
        if self.rules.central_noise:  # this round's clipping bound (adaptive clipping moves it)
            cfg[KEY_CLIPPING_NORM] = float(self.dp_wrapper.clipping_norm)
        self._sent_global = {k: arrays[k].numpy() for k in arrays}  # encoded updates are added to it
        messages = list(super().configure_train(server_round, arrays, cfg, grid))
        self._asked = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, cfg: ConfigRecord, grid) -> Iterable[Message]:
        server_round += self.round_offset
        if server_round % self.rules.config.evaluate_every and server_round != self.rules.last:
            return []
        return super().configure_evaluate(server_round, arrays, cfg, grid)

    def aggregate_train(self, server_round, replies):
        server_round += self.round_offset
        rules, config = self.rules, self.rules.config
        # A device that dropped out (an error reply) is left out: the round goes on with
        # the devices that answered. (Flower's DP wrappers would skip the whole round.)
        replies = list(replies)
        failed = sum(1 for r in replies if r.has_error())
        replies = [r for r in replies if not r.has_error()]
        asked = self._asked
        # Validation (fedpref.server.validation): a malformed or out-of-bounds reply is left out
        # and counted. Nothing a device sent is read before it is checked: each reply answers
        # for one device until its partial-aggregate record, from a grid that computes them
        # (only there), has been checked; from anywhere else such a record is refused.
        max_bytes = config.max_reply_bytes or default_max_bytes(self._sent_global)
        replies, rejected = _validated(replies, lambda r: check_size(r, max_bytes))
        if rules.partial_train:
            replies, forged = _validated(replies, lambda r: check_partial(r, asked))
        else:
            replies, forged = _validated(replies, lambda r: (
                "a device may not send a partial aggregate" if PARTIAL_AGGREGATE in r.content.config_records else None))
        rejected += forged
        partials = [counts for r in replies if (counts := partial_counts(r)) is not None]
        answered = failed + rejected + len(replies) + sum(devices - 1 + gone for devices, gone in partials)
        dropped = failed + sum(gone for _, gone in partials)
        # Not back within round-timeout (under secure aggregation its grid counts its own dropouts).
        late = 0 if config.secagg or asked is None else max(0, asked - answered)
        if config.update_encoding != "float32":
            replies, undecodable = _validated(replies, lambda r: _decode(r, self._sent_global, config.update_encoding))
            rejected += undecodable
        if rules.central_noise:
            self._round_clip = float(self.dp_wrapper.clipping_norm)  # the bound this round's devices clipped to
        bound = None if config.secagg else (self._round_clip if rules.central_noise else config.clip_norm)
        replies, invalid = _validated(replies, lambda r: check_train_reply(
            r, self._sent_global, bound=bound, max_bytes=None, dp=config.dp, partial_allowed=rules.partial_train,
            metric_keys=rules.train_keys, max_examples=rules.claim_bound))
        rejected += invalid
        if config.server_norm_bound > 0:
            replies = [_bounded(r, self._sent_global, config.server_norm_bound) for r in replies]
        elif config.weighting == "equal":  # every device the same, whatever it claimed (within the bound)
            for r in replies:
                r.content["metrics"][WEIGHT] = _devices(r)
        devices = sum(_devices(r) for r in replies)
        # The server step of this round (lr-end schedules it across rounds).
        step = config.server_lr * cosine_factor(server_round, rules.last, config.server_lr_end)
        self.set_server_step(step)
        skipped = None
        if devices < config.min_replies:
            skipped = (f"{devices} valid replies of {devices if asked is None else asked} asked ({dropped} dropped, {late} late, "
                       f"{rejected} rejected), fewer than min-replies {config.min_replies}: the model stays as it was")
            log(WARNING, "round %s skipped: %s", server_round, skipped)
            arrays, metrics = None, None
        elif not math.isfinite(total := _weight_total(replies)):
            # Validation bounds each claim, so only a max-examples beyond float range gets here:
            # Flower's average would divide by an infinite total and return zeros.
            skipped = f"the {devices} valid replies' weights (num-examples) sum to {total}, not a finite number: the model stays as it was"
            log(WARNING, "round %s skipped: %s", server_round, skipped)
            arrays, metrics = None, None
        else:
            arrays, metrics = super().aggregate_train(server_round, replies)
        metrics = _known(metrics, rules.train_keys)
        if arrays is not None:
            arrays = _in_sent_dtype(arrays, self._sent_global)
        self.report(TrainReport(
            server_round=server_round, train=dict(metrics) if metrics else {}, arrays=arrays, server_lr=step, replies=devices,
            dropped=dropped, late=late, rejected=rejected, skipped=skipped, clip_norm=self._round_clip if rules.central_noise else None,
        ))
        return arrays, metrics

    def aggregate_evaluate(self, server_round, replies):
        server_round += self.round_offset
        rules = self.rules
        replies, rejected = _validated([r for r in replies if not r.has_error()], lambda r: check_evaluate_reply(
            r, metric_keys=rules.evaluate_keys, partial_allowed=rules.accept_partial))
        if replies and not math.isfinite(total := _weight_total(replies)):
            log(WARNING, "round %s: evaluation left out: its weights sum to %s, not a finite number", server_round, total)
            rejected, replies = rejected + len(replies), []
        metrics = _known(super().aggregate_evaluate(server_round, replies), rules.evaluate_keys)
        evaluated = dict(metrics) if metrics else {}
        if rejected:  # counted like a training round's (a row with nothing averaged says only this)
            evaluated["evaluate-rejected"] = rejected
        self.report(EvaluateReport(server_round=server_round, evaluate=evaluated))
        return metrics


class FedprefFedAvg(FedprefStrategy, CohortsAndAverage):
    """fedpref's round on Flower's FedAvg (the server takes the average as the new model)."""


class FedprefFedAvgM(FedprefStrategy, FedAvgM, CohortsAndAverage):
    """fedpref's round on Flower's FedAvgM (server momentum, a server learning rate)."""

    def set_server_step(self, step: float) -> None:
        self.server_learning_rate = step


class FedprefFedAdam(FedprefStrategy, FedAdam, CohortsAndAverage):
    """fedpref's round on Flower's FedAdam."""

    def set_server_step(self, step: float) -> None:
        self.eta = step


class FedprefFedYogi(FedprefStrategy, FedYogi, CohortsAndAverage):
    """fedpref's round on Flower's FedYogi."""

    def set_server_step(self, step: float) -> None:
        self.eta = step


STRATEGIES: Mapping[str, type[FedprefStrategy]] = MappingProxyType({
    "fedavg": FedprefFedAvg, "fedavgm": FedprefFedAvgM, "fedadam": FedprefFedAdam, "fedyogi": FedprefFedYogi,
})


def make_strategy(
    config: FederatedConfig,
    n_devices: int,
    report: Callable[[TrainReport | EvaluateReport], None],
    num_rounds: int | None = None,
    before_round: Callable[[int, ArrayRecord], None] | None = None,
    accept_partial: bool = False,
    max_examples: int | None = None,
    noise: NoiseSource | None = None,
    sampler: CohortSampler | None = None,
) -> FedprefStrategy:
    """The strategy named by ``config.strategy`` (:data:`STRATEGIES`), evaluating every
    ``evaluate-every`` rounds (and after ``num_rounds``, the last round that will run); with DP
    on, its average is noised before the server optimiser steps, the noise drawn from ``noise``
    (default: fresh entropy from the operating system for every release). ``sampler`` draws
    the cohorts (default: Flower's sampling). ``accept_partial``: replies may be partial
    aggregates (only from a grid that computes them itself, the fast engine's; from anywhere
    else such a reply is dropped, since its device counts would reach the accountant).
    ``max_examples``: the most ``num-examples`` one device may claim
    (:func:`fedpref.server.validation.examples_bound`; default run-config ``max-examples``)."""
    common = dict(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=min(config.min_train_nodes, n_devices),
        min_evaluate_nodes=1,
        # Wait for every device before the first round (the Simulation Engine registers them
        # one by one) so that the cohort is drawn from the whole population.
        min_available_nodes=n_devices,
    )
    if config.strategy == "fedavgm":
        extra = dict(server_learning_rate=config.server_lr, server_momentum=config.server_momentum)
    elif config.strategy in ("fedadam", "fedyogi"):
        extra = dict(eta=config.server_lr, tau=config.adaptivity)
    else:
        extra = {}
    central_noise = config.dp and config.dp_noise_placement == "central"
    rules = RoundRules(
        config=config, last=num_rounds or config.num_server_rounds,
        train_keys=train_metric_keys(config), evaluate_keys=evaluate_metric_keys(config),
        claim_bound=config.max_examples if max_examples is None else max_examples,
        accept_partial=accept_partial,
        partial_train=accept_partial and config.aggregation == "mean" and not config.server_norm_bound > 0,
        central_noise=central_noise,
    )
    wrapper, average = None, None
    if central_noise:
        plain = FedAvg(**common)  # the plain average the wrapper noises; devices send equal weights under DP
        cohort = config.cohort_size(n_devices)
        if config.dp_mechanism == "tree":
            # DP-FTRL: the average carries the change of a binary tree's noise on the running
            # sum, the tree restarting every ceil(T / k) rounds (fedpref.server.tree).
            wrapper = TreeNoise(
                plain, noise_multiplier=config.dp_noise_multiplier, clipping_norm=config.clip_norm, num_sampled_clients=cohort,
                noise=noise or NoiseSource(), rounds_per_tree=rounds_per_tree(config.num_server_rounds, config.dp_max_participations),
            )
        elif config.dp_clipping == "fixed":
            wrapper = FixedClippingNoise(
                plain, noise_multiplier=config.dp_noise_multiplier, clipping_norm=config.clip_norm, num_sampled_clients=cohort,
                noise=noise or NoiseSource(),
            )
        else:
            # dp-noise-multiplier is the effective z of the pair (update sum, clipped count):
            # the wrapper splits it into a larger z for the updates and a count noise of
            # cohort / 20 (Andrew et al. 2021), and the pair is accounted as one Gaussian with z.
            wrapper = AdaptiveClippingNoise(
                plain,
                noise_multiplier=config.dp_noise_multiplier,
                num_sampled_clients=cohort,
                initial_clipping_norm=config.clip_norm,
                target_clipped_quantile=config.dp_target_quantile,
                clip_norm_lr=config.dp_clip_lr,
                noise=noise or NoiseSource(),
            )
        average = NoisedAverage(wrapper)
    elif config.aggregation == "median":
        # The server optimiser steps on the median (or trimmed mean) instead of the mean.
        average = FedMedian(**common)
    elif config.aggregation == "trimmed-mean":
        average = FedTrimmedAvg(**common, beta=config.trim_fraction)  # the share cut from each end
    strategy = STRATEGIES[config.strategy](rules=rules, report=report, before_round=before_round, sampler=sampler, average=average,
                                           **common, **extra)
    strategy.dp_wrapper = wrapper
    return strategy


