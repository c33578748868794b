"""The aggregation server's Flower ServerApp.

It validates the run config (unknown keys are an error that lists the known ones), builds
the chosen Flower strategy (FedAvg, FedAvgM with a server learning rate, FedAdam, FedYogi),
initialises the shared arrays of the model, and runs the rounds: devices train and send
clipped updates; every ``evaluate-every`` rounds each device ranks its own held-out items
and sends back scalars, which the strategy averages. The round is chosen on validation
(NDCG@k) and the test metrics are those of that round.

Per-round metrics go to ``results-dir`` (``rounds.json``) when it is set.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from logging import INFO, WARNING
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from flwr.serverapp.strategy import fedavg as _fedavg_module

from fedpref.models.encoding import EncodingError, decode, encoded_names
from fedpref.models.federation import PARTIAL_AGGREGATE, FederatedConfig, RunConfigError, cosine_factor
from fedpref.server.analytics import dp_popularity, popularity_mechanism
from fedpref.server.privacy import AdaptiveClippingNoise, DpMechanism, FixedClippingNoise, NoiseSource, PrivacyLedger, default_delta
from fedpref.server import checkpoint
from fedpref.models.files import open_private, private_folder, write_private
from fedpref.server.publish import ModelPublisher
from fedpref.server.runstore import RunStore, default_url
from fedpref.server.secure import SecureAggregationGrid, check_secagg, required_contributors, shares_per_device
from fedpref.server.validation import (
    WEIGHT,
    check_evaluate_reply,
    check_partial,
    check_size,
    check_train_reply,
    default_max_bytes,
    evaluate_metric_keys,
    examples_bound,
    partial_counts,
    train_metric_keys,
)

app = ServerApp()

RoundCallback = Callable[[dict], None]
_round_callbacks: list[RoundCallback] = []  # set by an in-process runner (fedpref simulate) to show progress
# Observers of every exchange (messages sent, replies received): the privacy tests use them to
# check what devices actually sent. Only an in-process runner can register one.
Exchange = Callable[[list[Message], list[Message]], None]
_exchange_observers: list[Exchange] = []


def add_exchange_observer(observer: Exchange) -> None:
    _exchange_observers.append(observer)


def clear_exchange_observers() -> None:
    _exchange_observers.clear()


def add_round_callback(callback: RoundCallback) -> None:
    _round_callbacks.append(callback)


def clear_round_callbacks() -> None:
    _round_callbacks.clear()


class StableGrid:
    """A Grid whose node ids come in a stable order (by each device's key, :func:`device_keys`;
    devices without a usable key after those with one, by node id) and that draws cohorts from
    its own seeded generator, so that the same seed picks the same devices in every run. (Flower
    samples with the global ``random``, which other threads of the Simulation Engine's process
    draw from too; see :func:`_seeded_sample_nodes`.)"""

    def __init__(self, grid: Grid, order: dict[int, int], seed: int) -> None:
        self._grid = grid
        self._order = order
        self.rng = random.Random(seed)

    def sample_cohort(self, min_available_nodes: int, sample_size: int) -> tuple[list[int], list[int]]:
        ids = self.get_node_ids()
        while len(ids) < max(min_available_nodes, sample_size):
            time.sleep(1)
            ids = self.get_node_ids()
        return self.rng.sample(ids, sample_size), ids

    def get_node_ids(self) -> list[int]:
        if hasattr(self._grid, "ordered_node_ids"):  # a grid that keeps its ids in key order (the fast engine's million)
            return self._grid.ordered_node_ids()
        ids = list(self._grid.get_node_ids())
        return sorted(ids, key=lambda n: (0, self._order[n]) if n in self._order else (1, n))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for observer in _exchange_observers:
            observer(messages, replies)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _seeded_sample_nodes(grid, min_available_nodes: int, sample_size: int) -> tuple[list[int], list[int]]:
    if hasattr(grid, "sample_cohort"):  # a StableGrid, or a grid that wraps one
        return grid.sample_cohort(min_available_nodes, sample_size)
    return _flower_sample_nodes(grid, min_available_nodes, sample_size)


# Flower's FedAvg (and the strategies built on it) call this module-level function to draw a
# cohort; fedpref's grids draw it from their own seeded generator instead.
_flower_sample_nodes = _fedavg_module.sample_nodes
_fedavg_module.sample_nodes = _seeded_sample_nodes


DEVICE_KEY_LIMIT = 2**63  # a device's key: a whole number from 0 to 2**63 - 1 (what a ConfigRecord's int holds)


def device_keys(grid: Grid, expected: int, timeout: float = 600.0) -> dict[int, int]:
    """Ask every device once for its stable key (its index in a simulation, a random number a
    real device keeps in its store): node id -> key, for the devices that gave a usable one.

    Each reply is a device's word, read as hostile: a reply that is an error, that carries no
    ConfigRecord ``device`` or whose ``key`` is not a whole number from 0 to 2**63 - 1 (an int;
    not a bool, a float or a string), is logged with the node id and left out; so are the
    devices that gave the same key (each of them). A device left out still takes part: it is
    ordered after the devices with a key, by node id (:class:`StableGrid`)."""
    if hasattr(grid, "device_keys"):  # a grid that plays its devices knows them (no message per device)
        return grid.device_keys()
    deadline = time.time() + timeout
    while len(ids := list(grid.get_node_ids())) < expected and time.time() < deadline:
        time.sleep(0.5)
    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.QUERY)
        for node in ids
    ]
    asked, answered = set(ids), set()
    claimed: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        try:
            key, reason = _device_key(reply)
        except Exception as exc:  # a reply that could not even be read: that device's alone
            key, reason = None, f"unreadable reply ({type(exc).__name__})"
        if node not in asked or node in answered:
            reason = "a reply from a node not asked" if node not in asked else "a second reply"
        answered.add(node)
        if reason is not None:
            log(WARNING, "node %s gave no usable device key (%s): it is ordered after the devices that did, by node id", node, reason)
            claimed.pop(node, None)
            continue
        claimed[node] = key
    holders: dict[int, list[int]] = {}
    for node, key in claimed.items():
        holders.setdefault(key, []).append(node)
    keys = {}
    for key, nodes in holders.items():
        if len(nodes) > 1:
            log(WARNING, "nodes %s gave the same device key %s: each is ordered after the devices with a key of their own, by node id",
                sorted(nodes), key)
            continue
        keys[nodes[0]] = key
    return keys


def _device_key(reply: Message) -> tuple[int | None, str | None]:
    """(the key, None) from a device's answer to the key query, or (None, why it has none)."""
    if reply.has_error():
        return None, f"an error reply: {reply.error.reason[:80]!r}"
    record = reply.content.config_records.get("device")
    if record is None:
        return None, "no ConfigRecord 'device'"
    key = record.get("key")
    if type(key) is not int or not 0 <= key < DEVICE_KEY_LIMIT:
        shown = repr(key)
        return None, f"'key' must be a whole number from 0 to 2**63 - 1, got {type(key).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"
    return key, None


def population_meta(config: FederatedConfig) -> dict:
    """The catalogue size (public) and the number of devices: run-config ``catalogue-size`` and
    ``devices`` (real devices), or the population folder's ``meta.json`` (a simulation)."""
    if config.catalogue_size:
        return {"n_users": config.devices, "n_items": config.catalogue_size}
    meta = Path(config.history_dir) / "meta.json"
    if not config.history_dir or not meta.exists():
        raise FileNotFoundError(
            "the server needs the item catalogue's size and the number of devices: set run-config "
            "'catalogue-size' and 'devices' (real devices), or 'history-dir' to a folder written by "
            "`fedpref population` or `fedpref simulate`"
        )
    return json.loads(meta.read_text())


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


class _NoisedAverage(FedAvg):
    """FedAvg whose average of the devices' clipped models carries central Gaussian noise,
    added by Flower's ``DifferentialPrivacyClientSideFixedClipping`` (std z * C / m on the
    average of m updates). Placed under a server optimiser in the method order (FedAvgM,
    FedAdam, FedYogi call ``FedAvg.aggregate_train`` for their average), the noise goes on the
    average *before* the optimiser steps on it: the optimiser is post-processing, and the
    accounted mechanism is the noised average. (Wrapping FedAdam in the DP wrapper instead
    would add the noise after Adam's step, whose sensitivity is not C / m.)"""

    dp_wrapper: DifferentialPrivacyClientSideFixedClipping

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if not any(_partial(r) for r in replies):
            return self.dp_wrapper.aggregate_train(server_round, replies)
        # Partial aggregates (each for many devices): the wrapper's own steps, with the devices
        # they stand for counted (Flower's wrapper would count each as one reply).
        wrapper = self.dp_wrapper
        arrays, metrics = wrapper.strategy.aggregate_train(server_round, replies)  # the plain average
        if hasattr(wrapper, "_noisy_fraction"):  # adaptive clipping: C follows the noised share of norm bits
            devices = sum(_devices(r) for r in replies)
            bits = sum(_norm_bits(r) for r in replies)
            wrapper._geometric_update(wrapper._noisy_fraction(bits, devices))
        if arrays:
            arrays = wrapper._add_noise_to_aggregated_arrays(arrays)
        return arrays, metrics


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


def make_strategy(
    config: FederatedConfig,
    n_devices: int,
    on_round: Callable[[int, dict], None],
    num_rounds: int | None = None,
    before_round: Callable[[int, ArrayRecord], None] | None = None,
    accept_partial: bool = False,
    max_examples: int | None = None,
    noise: NoiseSource | None = None,
):
    """The Flower strategy named by ``config.strategy``, evaluating every ``evaluate-every``
    rounds (and after ``num_rounds``, the last round that will run); with DP on, its average
    is noised before the server optimiser steps, the noise drawn from ``noise`` (default:
    fresh entropy from the operating system for every release). ``before_round(round,
    arrays)`` is called as each round starts (the checkpoint). ``strategy.round_offset`` shifts Flower's round
    numbers (1, 2, ...) to the run's when a run resumes. ``accept_partial``: replies may be
    partial aggregates (only from a grid that computes them itself, the fast engine's; from
    anywhere else such a reply is dropped, since its device counts would reach the accountant).
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
    if config.strategy == "fedavg":
        base, extra = FedAvg, {}
    elif config.strategy == "fedavgm":
        base, extra = FedAvgM, dict(server_learning_rate=config.server_lr, server_momentum=config.server_momentum)
    elif config.strategy == "fedadam":
        base, extra = FedAdam, dict(eta=config.server_lr, tau=config.adaptivity)
    else:
        base, extra = FedYogi, dict(eta=config.server_lr, tau=config.adaptivity)

    last = num_rounds or config.num_server_rounds
    every = config.evaluate_every
    # What a reply may carry (fedpref.server.validation): the metric names of this run's
    # devices, exactly, and the weight one device may claim.
    train_keys, evaluate_keys = train_metric_keys(config), evaluate_metric_keys(config)
    claim_bound = config.max_examples if max_examples is None else max_examples
    equal_weights = config.weighting == "equal"
    # A median, a trimmed mean or a per-device norm bound needs each device's own update.
    partial_train = accept_partial and config.aggregation == "mean" and not config.server_norm_bound > 0
    bases: tuple[type, ...] = (base,)
    central_noise = config.dp and config.dp_noise_placement == "central"
    if central_noise:
        bases = (_NoisedAverage,) if base is FedAvg else (base, _NoisedAverage)
    elif config.aggregation != "mean":
        # The server optimiser steps on the median (or trimmed mean) instead of the mean:
        # FedAdam, FedYogi and FedAvgM take their average from the next class in the method order.
        robust = FedMedian if config.aggregation == "median" else FedTrimmedAvg
        bases = (robust,) if base is FedAvg else (base, robust)

    class Strategy(*bases):  # type: ignore[valid-type, misc]
        round_offset = 0

        def configure_train(self, server_round: int, arrays: ArrayRecord, cfg: ConfigRecord, grid) -> Iterable[Message]:
            server_round += self.round_offset
            if before_round is not None:
                before_round(server_round, arrays)
            if central_noise:  # this round's clipping bound (adaptive clipping moves it)
                cfg[KEY_CLIPPING_NORM] = float(self.dp_wrapper.clipping_norm)
            self._sent_global = {k: arrays[k].numpy() for k in arrays}  # encoded updates are added to it
            messages = list(super().configure_train(server_round, arrays, cfg, grid))
            self._asked = len(messages)
            return messages

        def configure_evaluate(self, server_round: int, arrays: ArrayRecord, cfg: ConfigRecord, grid) -> Iterable[Message]:
            server_round += self.round_offset
            if server_round % every and server_round != last:
                return []
            return super().configure_evaluate(server_round, arrays, cfg, grid)

        def aggregate_train(self, server_round, replies):
            server_round += self.round_offset
            # A device that dropped out (an error reply) is left out: the round goes on with
            # the devices that answered. (Flower's DP wrappers would skip the whole round.)
            replies = list(replies)
            failed = sum(1 for r in replies if r.has_error())
            replies = [r for r in replies if not r.has_error()]
            asked = getattr(self, "_asked", None)
            # Validation (fedpref.server.validation): a malformed or out-of-bounds reply is left out
            # and counted. Nothing a device sent is read before it is checked: each reply answers
            # for one device until its partial-aggregate record, from a grid that computes them
            # (only there), has been checked; from anywhere else such a record is refused.
            max_bytes = config.max_reply_bytes or default_max_bytes(self._sent_global)
            replies, rejected = _validated(replies, lambda r: check_size(r, max_bytes))
            if partial_train:
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
            if central_noise:
                self._round_clip = float(self.dp_wrapper.clipping_norm)  # the bound this round's devices clipped to
            bound = None if config.secagg else (self._round_clip if central_noise else config.clip_norm)
            replies, invalid = _validated(replies, lambda r: check_train_reply(
                r, self._sent_global, bound=bound, max_bytes=None, dp=config.dp, partial_allowed=partial_train,
                metric_keys=train_keys, max_examples=claim_bound))
            rejected += invalid
            if config.server_norm_bound > 0:
                replies = [_bounded(r, self._sent_global, config.server_norm_bound) for r in replies]
            elif equal_weights:  # every device the same, whatever it claimed (within the bound)
                for r in replies:
                    r.content["metrics"][WEIGHT] = _devices(r)
            devices = sum(_devices(r) for r in replies)
            # The server step of this round (lr-end schedules it across rounds).
            step = config.server_lr * cosine_factor(server_round, last, config.server_lr_end)
            if hasattr(self, "eta"):  # FedAdam, FedYogi
                self.eta = step
            elif hasattr(self, "server_learning_rate"):  # FedAvgM
                self.server_learning_rate = step
            skipped = None
            if devices < config.min_replies:
                skipped = (f"{devices} valid replies of {getattr(self, '_asked', devices)} asked ({dropped} dropped, {late} late, "
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
            metrics = _known(metrics, train_keys)
            if arrays is not None:
                arrays = _in_sent_dtype(arrays, self._sent_global)
            info = {"train": dict(metrics) if metrics else {}, "arrays": arrays, "server-lr": step,
                    "replies": devices, "dropped": dropped, "late": late, "rejected": rejected, "skipped": skipped}
            if central_noise:
                info["clip-norm"] = self._round_clip
            on_round(server_round, info)
            return arrays, metrics

        def aggregate_evaluate(self, server_round, replies):
            server_round += self.round_offset
            replies, rejected = _validated([r for r in replies if not r.has_error()], lambda r: check_evaluate_reply(
                r, metric_keys=evaluate_keys, partial_allowed=accept_partial))
            if replies and not math.isfinite(total := _weight_total(replies)):
                log(WARNING, "round %s: evaluation left out: its weights sum to %s, not a finite number", server_round, total)
                rejected, replies = rejected + len(replies), []
            metrics = _known(super().aggregate_evaluate(server_round, replies), evaluate_keys)
            evaluated = dict(metrics) if metrics else {}
            if rejected:  # counted like a training round's (a row with nothing averaged says only this)
                evaluated["evaluate-rejected"] = rejected
            on_round(server_round, {"evaluate": evaluated})
            return metrics

    strategy = Strategy(**common, **extra)
    if config.aggregation == "trimmed-mean":
        strategy.beta = config.trim_fraction  # FedTrimmedAvg's share cut from each end
    if central_noise:
        average = FedAvg(**common)  # the plain average the wrapper noises; devices send equal weights under DP
        cohort = config.cohort_size(n_devices)
        if config.dp_clipping == "fixed":
            strategy.dp_wrapper = FixedClippingNoise(
                average, noise_multiplier=config.dp_noise_multiplier, clipping_norm=config.clip_norm, num_sampled_clients=cohort,
                noise=noise or NoiseSource(),
            )
        else:
            # dp-noise-multiplier is the effective z of the pair (update sum, clipped count):
            # the wrapper splits it into a larger z for the updates and a count noise of
            # cohort / 20 (Andrew et al. 2021), and the pair is accounted as one Gaussian with z.
            strategy.dp_wrapper = AdaptiveClippingNoise(
                average,
                noise_multiplier=config.dp_noise_multiplier,
                num_sampled_clients=cohort,
                initial_clipping_norm=config.clip_norm,
                target_clipped_quantile=config.dp_target_quantile,
                clip_norm_lr=config.dp_clip_lr,
                noise=noise or NoiseSource(),
            )
    return strategy


def check_adaptive(noise_multiplier: float, cohort: int) -> None:
    """Adaptive clipping spends part of the privacy budget on the clipped count, whose noise is
    cohort / 20: the effective noise multiplier must stay below twice that."""
    if noise_multiplier >= cohort / 10:
        raise RunConfigError(
            f"adaptive clipping with {cohort} devices a round allows dp-noise-multiplier below {cohort / 10:g} "
            f"(the clipped count's noise is cohort / 20), got {noise_multiplier}: take more devices per round, "
            "a smaller noise multiplier, or dp-clipping=fixed"
        )


def privacy_plan(config: FederatedConfig, n_devices: int) -> tuple[DpMechanism, float, int]:
    """The DP mechanism of this run, its delta, and how many rounds run: ``num-server-rounds``,
    or fewer if one more would take epsilon past ``dp-target-epsilon``. Refuses settings the
    run could not honour (a target one round passes; too much noise for adaptive clipping)."""
    mechanism = DpMechanism(config.dp_noise_multiplier, n_devices, config.cohort_size(n_devices))
    if config.dp_clipping == "adaptive":
        check_adaptive(config.dp_noise_multiplier, mechanism.cohort)
    delta = config.dp_delta or default_delta(n_devices)
    rounds = config.num_server_rounds
    prior = (popularity_mechanism(config, n_devices),) if config.popularity_histogram else ()
    if config.dp_target_epsilon > 0:
        rounds = min(rounds, mechanism.rounds_within(config.dp_target_epsilon, delta, limit=rounds, prior=prior))
        if rounds == 0:
            histogram = " after the popularity histogram" if prior else " alone"
            raise RunConfigError(
                f"one round{histogram} spends epsilon {mechanism.epsilon(1, delta, prior):.3g} at delta {delta:.3g}, past "
                f"dp-target-epsilon {config.dp_target_epsilon}: raise dp-noise-multiplier (or popularity-noise-multiplier), "
                "lower fraction-train or raise the target"
            )
    return mechanism, delta, rounds


def _popularity_round(config: FederatedConfig, secure: SecureAggregationGrid, grid: StableGrid, n_devices: int, n_items: int,
                      noise: NoiseSource | None = None):
    """The DP popularity histogram (fedpref.server.analytics), accounted on its own:
    (its record for rounds.json, the noised counts), or (None, None) if it was skipped."""
    mechanism = popularity_mechanism(config, n_devices)
    nodes, _ = grid.sample_cohort(n_devices, mechanism.cohort)
    noise = noise or NoiseSource()
    released = dp_popularity(secure, nodes, config, n_items, noise)
    if released is None:
        return None, None
    counts, contributors = released
    delta = config.dp_delta or default_delta(n_devices)
    alone = PrivacyLedger(mechanism, delta, config.dp_noise_placement)
    record = {
        "devices": len(contributors),
        "asked": len(nodes),
        "noise-multiplier": config.popularity_noise_multiplier,
        "noise-placement": config.dp_noise_placement,
        "noise-source": noise.mode if config.dp_noise_placement == "central" else "devices",
        "max-items": config.popularity_max_items,
        "epsilon": alone.record_round(len(contributors)),
        "delta": delta,
        "file": "popularity.json",
    }
    return record, counts


def _restore_random(stable: StableGrid, noise: NoiseSource, resumed: checkpoint.Checkpoint, folder: str) -> None:
    """Continue a seeded run's cohort sampler and reproducible noise where the checkpoint left
    them; a run whose noise and cohorts come from the OS draws afresh (nothing was stored)."""
    try:
        if not isinstance(stable.rng, random.SystemRandom):
            if resumed.sampler is None:
                raise ValueError("it holds no state of the cohort sampler")
            stable.rng.setstate(resumed.sampler)
        noise.restore(resumed.noise)
    except (ValueError, TypeError, KeyError) as exc:
        raise checkpoint.CheckpointError(
            f"{Path(folder) / checkpoint.CHECKPOINT_FILE} cannot resume this run ({exc}): remove it, or set resume=false, to start the run again"
        ) from None


STRATEGY_STATE = ("m_t", "v_t", "momentum_vector")  # what FedAdam, FedYogi and FedAvgM keep between rounds


def _strategy_state(strategy) -> dict:
    state = {name: getattr(strategy, name) for name in STRATEGY_STATE if hasattr(strategy, name)}
    if hasattr(strategy, "dp_wrapper"):
        state["dp-clipping-norm"] = float(strategy.dp_wrapper.clipping_norm)
    return state


def _restore_strategy(strategy, state: dict) -> None:
    for name in STRATEGY_STATE:
        if name in state:
            setattr(strategy, name, state[name])
    if "dp-clipping-norm" in state and hasattr(strategy, "dp_wrapper"):
        strategy.dp_wrapper.clipping_norm = state["dp-clipping-norm"]


def _numpy_arrays(arrays: ArrayRecord | None) -> dict | None:
    return None if arrays is None else {k: arrays[k].numpy() for k in arrays}


def _close_abandoned(store: RunStore, run_name: str, checkpoint_dir: str) -> None:
    """A run of this name left "running" with this checkpoint folder, which holds no unfinished
    checkpoint of it, was killed before its first checkpoint (a live run keeps one there): mark
    it failed, so that the operator does not see it running for ever."""
    previous = store.latest_run(run_name)
    if previous is None or previous["status"] != "running":
        return
    theirs = store.run_config(previous["id"])
    same_folder = Path(checkpoint_dir).resolve() == Path(
        theirs.get("checkpoint-dir") or str(Path(theirs.get("results-dir") or ".") / "checkpoint")).resolve()
    if same_folder:
        log(WARNING, "run %s (%r) was left running without a checkpoint: marked failed, a new run starts", previous["id"], run_name)
        store.finish_run(previous["id"], "failed", note="abandoned: its server stopped before its first checkpoint; a new run took its place")


def _open_run_store(config: FederatedConfig):
    url = config.run_store or (default_url(config.results_dir) if config.results_dir else "")
    return RunStore(url) if url else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederatedConfig.from_run_config(context.run_config)
    meta = population_meta(config)
    n_devices, n_items = int(meta["n_users"]), int(meta["n_items"])
    stable = StableGrid(grid, device_keys(grid, n_devices), config.seed)
    # Randomness that protects people (fedpref.server.privacy.NoiseSource): the DP noise, and
    # under DP the cohorts (amplification by sampling counts only if nobody knows who was
    # sampled), come from the operating system, unless a simulation asks for them from its seed.
    private = config.dp or config.popularity_histogram
    noise = NoiseSource.for_run(config.reproducible_noise, config.seed)
    if private:
        noise.warn_if_reproducible()
        stable.rng = noise.sampler(config.seed)

    initial = config.model_spec.build(1, n_items, seed=config.seed).get_shared()
    num_rounds, privacy = config.num_server_rounds, None
    cohort = config.cohort_size(n_devices)
    secure = None
    if config.secagg:
        check_secagg(config, cohort)
        secure = SecureAggregationGrid(stable, config, cohort)
    if config.dp:
        mechanism, delta, num_rounds = privacy_plan(config, n_devices)
        ledger = PrivacyLedger(mechanism, delta, config.dp_noise_placement)
        privacy = {
            "noise-multiplier": config.dp_noise_multiplier,
            "noise-placement": config.dp_noise_placement,
            "clipping": config.dp_clipping,
            "clip-norm": config.clip_norm,  # adaptive: the first round's; each round's is in its row
            "population": n_devices,
            "cohort": mechanism.cohort,
            "delta": delta,
            "target-epsilon": config.dp_target_epsilon or None,
            "rounds-planned": config.num_server_rounds,
            "rounds-run": num_rounds,
            "stopped-by-target": num_rounds < config.num_server_rounds,
            "accountant": "dp-accounting RDP; cohorts drawn without replacement; replace-one neighbours (fedpref.server.privacy)",
            # os-entropy (nobody can compute it) or run-seed (reproducible-noise: whoever knows the seed can)
            "noise-source": noise.mode if config.dp_noise_placement == "central" else "devices",
            "cohort-source": noise.mode,
        }

    # Checkpoint and resume (fedpref.server.checkpoint), and the run store.
    checkpoint_dir = config.checkpoint_dir or (str(Path(config.results_dir) / "checkpoint") if config.results_dir else "")
    if checkpoint_dir == "none":
        checkpoint_dir = ""
    resumed = checkpoint.resumable(checkpoint_dir, config.to_run_config()) if checkpoint_dir and config.resume else None
    store = _open_run_store(config)
    run_name = re.sub(r"[^A-Za-z0-9._-]+", "-", config.run_name or (Path(config.results_dir).name if config.results_dir else "run")).strip("-.") or "run"
    if resumed is not None:
        log(WARNING, "resuming from the checkpoint in %s: rounds 1..%s are done", checkpoint_dir, resumed.completed_round)
        run_id = resumed.run_store_id
        if store is not None and run_id is not None:
            store.resume_run(run_id, resumed.completed_round)
    elif store is not None:
        if checkpoint_dir:
            _close_abandoned(store, run_name, checkpoint_dir)
        run_id = store.start_run(
            name=run_name, config=config.to_run_config(), devices=n_devices, items=n_items, rounds_planned=num_rounds,
            flower_run_id=int(context.run_id), dp=config.dp, secure_aggregation=config.secagg,
            delta=privacy["delta"] if privacy else None, target_epsilon=config.dp_target_epsilon or None,
        )
    else:
        run_id = None

    publisher = ModelPublisher(config.publish_dir, config.publish_key, expiry_days=config.publish_expiry_days) if config.publish_dir else None
    if publisher is not None and resumed is None:
        taken = [v for v in publisher.versions() if v.startswith(f"{run_name}-r")]
        if taken:  # a published version never changes: a new run may not reuse the names
            raise RunConfigError(
                f"publish-dir {config.publish_dir} already holds versions of a run named {run_name!r} ({taken[0]}, ...): "
                "give this run another run-name, or publish to another folder"
            )
    model_meta = {"kind": config.model_spec.kind, "dim": config.model_spec.dim, "mlp_layers": list(config.model_spec.mlp_layers)}

    def publish(server_round: int, arrays: ArrayRecord) -> str | None:
        """Sign and publish this round's global model (a resumed run does not publish a round twice)."""
        if publisher is None:
            return None
        version = f"{run_name}-r{server_round:04d}"
        if publisher.model_path(version).exists():
            return version
        manifest = publisher.publish(_numpy_arrays(arrays), version=version, round=server_round, run=run_name, meta=model_meta)
        if store is not None:
            store.record_model(run_id, version=version, server_round=server_round, sha256=manifest.sha256, size=manifest.size, signature=manifest.signature)
        return version

    popularity = None
    if resumed is not None:
        popularity, counts = resumed.popularity if resumed.popularity is not None else (None, None)
    elif config.popularity_histogram:
        popularity, counts = _popularity_round(config, secure, stable, n_devices, n_items, noise)
        if popularity is not None and config.dp:  # the same people: one account for both releases
            ledger.record_round(popularity["devices"], mechanism=popularity_mechanism(config, n_devices))

    rounds: dict[int, dict] = {}
    latest: dict = {"round": 0, "arrays": None}  # the latest aggregated global arrays
    best: dict = {"round": 0, "arrays": None}  # the round chosen on validation NDCG@k, and its arrays
    started = time.perf_counter()

    def on_round(server_round: int, info: dict) -> None:
        row = rounds.setdefault(server_round, {"round": server_round})
        if "arrays" in info:
            if info["arrays"] is not None:
                latest.update(round=server_round, arrays=info["arrays"])
            row.update({f"train-{k}" if not k.startswith("train-") else k: v for k, v in info["train"].items()})
            if config.strategy != "fedavg":
                row["server-lr"] = info["server-lr"]
            if privacy is not None and info["arrays"] is not None:
                row["epsilon"] = ledger.record_round(info["replies"])
            if info["arrays"] is not None:
                row["replies"] = info["replies"]
            if secure is not None and server_round in secure.rounds:
                done = secure.rounds[server_round]
                row["dropped"] = done["sampled"] - done["contributed"]
                row["secagg-skipped"] = done["skipped"]
            elif info["dropped"]:
                row["dropped"] = info["dropped"]
            for key in ("late", "rejected"):
                if info.get(key):
                    row[key] = info[key]
            if info.get("skipped"):
                row["skipped"] = info["skipped"]
            if "clip-norm" in info:
                row["clip-norm"] = info["clip-norm"]
            row["seconds"] = round(time.perf_counter() - started, 3)
            version = publish(server_round, info["arrays"]) if info["arrays"] is not None else None
            if version is not None:
                row["model-version"] = version
            if store is not None:
                store.record_round(
                    run_id, server_round, metrics={k: v for k, v in row.items() if k not in ("round", "seconds", "replies", "dropped", "epsilon", "model-version")},
                    seconds=row["seconds"], participants=row.get("replies", 0), dropped=row.get("dropped", 0), epsilon=row.get("epsilon"),
                    model_version=version,
                )
            for callback in _round_callbacks:
                callback({"event": "train", **row})
        if info.get("evaluate"):  # empty in rounds without evaluation
            row.update(info["evaluate"])
            row["seconds"] = round(time.perf_counter() - started, 3)
            best_ndcg = rounds[best["round"]]["val-ndcg"] if best["round"] else -1.0
            if row.get("val-ndcg", -1.0) > best_ndcg:
                arrays = latest["arrays"] if latest["round"] == server_round else None
                best.update(round=server_round, arrays=arrays)
            if store is not None:
                store.record_round(run_id, server_round, metrics=dict(info["evaluate"]))
            for callback in _round_callbacks:
                callback({"event": "evaluate", **row})

    writer = checkpoint.Writer(checkpoint_dir) if checkpoint_dir else None

    def snapshot(completed: int, arrays: dict, finished: bool, wait: bool = False) -> None:
        states = grid.device_states() if hasattr(grid, "device_states") else None
        writer.save(wait=finished or wait, checkpoint=checkpoint.Checkpoint(
            config=checkpoint.comparable(config.to_run_config()), completed_round=completed, finished=finished, arrays=arrays,
            strategy=_strategy_state(strategy), noise=noise.state(),
            # A sampler drawing from the OS has no state, and that of a seeded one is its seed's.
            sampler=None if isinstance(stable.rng, random.SystemRandom) else stable.rng.getstate(),
            ledger=ledger if privacy is not None else None, rounds=rounds, best={"round": best["round"], "arrays": _numpy_arrays(best["arrays"])},
            popularity=(popularity, counts) if popularity is not None else None, secure_rounds=dict(secure.rounds) if secure else {},
            run_store_id=run_id, devices=states,
        ))

    def before_round(server_round: int, arrays: ArrayRecord) -> None:
        if checkpoint_dir and server_round > first_round:
            snapshot(server_round - 1, _numpy_arrays(arrays), finished=False)

    claim_bound, claim_source = examples_bound(config, n_items)
    if not config.dp:  # (under DP every device claims 1)
        log(INFO, "a device may claim at most %s examples (%s); a larger claim is rejected", f"{claim_bound:,}", claim_source)
    strategy = make_strategy(config, n_devices, on_round, num_rounds, before_round, accept_partial=getattr(grid, "partial_aggregates", False),
                             max_examples=claim_bound, noise=noise)
    start_arrays, first_round = initial, 1
    if resumed is not None:
        start_arrays, first_round = resumed.arrays, resumed.completed_round + 1
        _restore_strategy(strategy, resumed.strategy)
        strategy.round_offset = resumed.completed_round
        _restore_random(stable, noise, resumed, checkpoint_dir)
        if privacy is not None:
            if resumed.ledger is None or (resumed.ledger.mechanism, resumed.ledger.delta) != (mechanism, delta):
                raise checkpoint.CheckpointError(
                    f"{Path(checkpoint_dir) / checkpoint.CHECKPOINT_FILE} holds no privacy ledger of this run's mechanism: "
                    "remove it, or set resume=false, to start the run again"
                )
            ledger = resumed.ledger
        rounds.update(resumed.rounds)
        best.update(round=resumed.best["round"], arrays=None if resumed.best["arrays"] is None else ArrayRecord({k: Array(v) for k, v in resumed.best["arrays"].items()}))
        latest.update(round=resumed.completed_round, arrays=ArrayRecord({k: Array(v) for k, v in resumed.arrays.items()}))
        if secure is not None:
            secure.rounds.update(resumed.secure_rounds)
        if resumed.devices is not None and hasattr(grid, "restore_device_states"):
            grid.restore_device_states(resumed.devices)
    if checkpoint_dir and resumed is None:
        # Round 0: the run's start (its run-store id, the popularity histogram, the random
        # states), so that a server killed in round 1 resumes this run instead of leaving it
        # "running" in the run store and starting another.
        snapshot(0, dict(start_arrays), finished=False, wait=True)
    try:
        if first_round <= num_rounds:
            strategy.start(
                grid=secure or stable,
                initial_arrays=ArrayRecord({k: Array(v) for k, v in start_arrays.items()}),
                num_rounds=num_rounds - first_round + 1,
                timeout=config.round_timeout or 3600.0,  # replies later than this are left out of their round
                train_config=ConfigRecord({}),
                evaluate_config=ConfigRecord({}),
            )
    except BaseException as exc:
        if store is not None:
            store.finish_run(run_id, "failed", note=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    final = _numpy_arrays(latest["arrays"]) if latest["arrays"] is not None else dict(start_arrays)
    if checkpoint_dir:
        snapshot(num_rounds, final, finished=True)
    if store is not None:
        if privacy is not None:
            store.record_round(run_id, max(rounds) if rounds else 0, metrics={}, epsilon=ledger.epsilon)
        store.finish_run(run_id, "completed")
    if config.results_dir:
        # The run's record (models, metrics, the histogram): the server's state, its owner's only.
        out = private_folder(config.results_dir)
        with open_private(out / "final_model.npz") as f:
            np.savez_compressed(f, **final)
        chosen = rounds.get(best["round"], {})
        summary = {
            "config": config.to_run_config(),
            "devices": n_devices,
            "items": n_items,
            "chosen_round": best["round"],
            "chosen": chosen,
            "rounds": [rounds[r] for r in sorted(rounds)],
            "seconds": round(time.perf_counter() - started, 3),
        }
        if privacy is not None:
            privacy["epsilon"] = ledger.epsilon
            privacy["includes-popularity-histogram"] = popularity is not None
            summary["privacy"] = privacy
        if popularity is not None:
            summary["popularity"] = popularity
            write_private(out / "popularity.json", json.dumps({**popularity, "counts": [round(float(c), 3) for c in counts]}) + "\n")
        if secure is not None:
            summary["secure-aggregation"] = {
                "protocol": "SecAgg+ (Flower SecAggPlusWorkflow)",
                "shares-per-device": shares_per_device(config, cohort),
                "cohort": cohort,
                "min-cohort": config.secagg_min_cohort,
                "reconstruction-threshold": config.secagg_reconstruction_threshold,
                "dropout-tolerance": config.secagg_dropout_tolerance,
                "required-per-round": required_contributors(config, cohort),
                "rounds-skipped": sum(1 for r in secure.rounds.values() if r["skipped"]),
                "sums-refused": sum(1 for r in secure.rounds.values() if r.get("refused")),  # skipped: no honest cohort sends such a sum
                "replies-refused": sum(len(r.get("refused-replies", ())) for r in secure.rounds.values()),  # counted as dropouts
            }
        write_private(out / "rounds.json", json.dumps(summary, indent=2) + "\n")
        if best["arrays"] is not None:
            with open_private(out / "best_model.npz") as f:
                np.savez_compressed(f, **{k: best["arrays"][k].numpy() for k in best["arrays"]})
