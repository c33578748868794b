"""The simulated device: what a simulation installs on fedpref's ClientApp.

A simulated device is the real device's ClientApp (:mod:`fedpref.client.app`) with a provider
and a mod that only a simulation has:

- :class:`SimulatedDevices` (the provider): a device without a store reads its row of the
  population folder (run-config ``history-dir``, node config ``partition-id`` or
  ``device-index``, :mod:`fedpref.simulations.engines.history`) and keeps its private vector in
  ``context.state``; with run-config ``store-dir`` each device opens its own store
  ``device-<i>.sqlite`` there and trains as a real device does; it answers federated
  evaluation by ranking its own held-out items;
- the simulated faults, seeded by (seed, device, round) so that a run repeats: run-config
  ``dropout`` (a device leaves mid-round: :class:`DroppedOut`), ``stragglers`` and
  ``straggler-delay`` (a device answers late: it sleeps, or, on an engine with a simulated
  clock, node config ``simulated-clock``, the engine drops its late reply itself) and
  ``availability`` (:func:`availability_mod`: a device declines the rounds its pattern rules
  out, :class:`fedpref.simulations.engines.availability.AvailabilityPattern`).

``app`` is the ClientApp of every engine that plays devices (Flower's Simulation Engine, the
in-process engine, ``flwr run .``); the fast engine computes the same devices in bulk with the
same functions (:func:`drops_out`, :func:`answers_late`, :func:`rank_locally`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message

from fedpref.client.app import DECLINED, round_of, shared_of, device_index, make_app
from fedpref.client.device import initial_private, local_round, refit_private
from fedpref.simulations.engines.availability import AvailabilityPattern
from fedpref.models.contract import Params
from fedpref.models.config import FederatedConfig
from fedpref.models.metrics import rank_of_target
from fedpref.models.train import LocalData
from fedpref.models.wire import Stream, evaluation_content, evaluation_metrics, stream_rng

from fedpref.simulations.engines.history import DeviceHistory, load_history

PRIVATE_KEY = "private"  # context.state key of a simulated device's private arrays
SIMULATED_CLOCK = "simulated-clock"  # node config: the engine drops late replies itself; the device does not sleep


class DroppedOut(RuntimeError):
    """A simulated device that leaves mid-round (run-config ``dropout``)."""


# -- the faults -------------------------------------------------------------------------------


def drops_out(config: FederatedConfig, user: int, server_round: int) -> bool:
    """Whether, in a simulation with ``dropout`` > 0, this device leaves this round (a coin
    seeded by seed, device and round, so that a run repeats)."""
    return config.dropout > 0 and stream_rng(config.seed, user, server_round, Stream.DROPOUT).random() < config.dropout


def straggles(config: FederatedConfig, user: int, server_round: int) -> bool:
    """Whether, in a simulation with ``stragglers`` > 0, this device answers this round's
    training ``straggler-delay`` seconds late (a coin seeded by seed, device and round)."""
    return config.stragglers > 0 and stream_rng(config.seed, user, server_round, Stream.STRAGGLER).random() < config.stragglers


def answers_late(config: FederatedConfig, user: int, server_round: int, timeout: float | None) -> bool:
    """Whether this device's training reply comes after a server that waits ``timeout`` seconds
    has closed the round (for engines that keep a simulated clock instead of sleeping)."""
    return straggles(config, user, server_round) and config.straggler_delay > (timeout if timeout is not None else 3600.0)


def availability_mod(msg: Message, context: Context, call_next) -> Message:
    """A simulated device declines the training rounds its availability pattern rules out (a
    device whose node config names a store follows its own eligibility policy instead)."""
    if "store" not in context.node_config:
        config = FederatedConfig.from_run_config(context.run_config)
        server_round = round_of(msg)
        if not AvailabilityPattern.parse(config.availability).available(config.seed, device_index(context), server_round):
            reason = f"not available in round {server_round} (simulated availability '{config.availability}')"
            return Message(Error(code=DECLINED, reason=f"declined: {reason}"), reply_to=msg)
    return call_next(msg, context)


# -- the devices ------------------------------------------------------------------------------


def rank_locally(scores: np.ndarray, history: DeviceHistory, which: str, rng: np.random.Generator) -> tuple[int, int]:
    """(sampled rank, full rank) of the device's ``which`` item, computed on the device."""
    target = history.target(which)
    sampled = rank_of_target(scores[[target]], scores[history.negatives][None, :], rng)[0]
    mask = np.ones(len(scores), dtype=bool)
    mask[history.train_items] = False
    mask[target] = False
    full = rank_of_target(scores[[target]], scores[None, :], rng, candidate_mask=mask[None, :])[0]
    return int(sampled), int(full)


def _private(context: Context, config: FederatedConfig, user: int) -> Params:
    """This simulated device's private arrays, created (seeded by device) the first time."""
    if PRIVATE_KEY in context.state:
        record = context.state[PRIVATE_KEY]
        return {name: record[name].numpy() for name in record}
    return initial_private(config.model_spec, config.seed, user)


def _store_private(context: Context, private: Params) -> None:
    context.state[PRIVATE_KEY] = ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in private.items()})


class SimulatedDevices:
    """The :class:`fedpref.client.app.DeviceProvider` of a simulation (see the module's doc)."""

    def store_path(self, context: Context, config: FederatedConfig) -> str | None:
        if config.store_dir:
            return str(Path(config.store_dir) / f"device-{device_index(context)}.sqlite")
        return None

    def local_round(self, context: Context, config: FederatedConfig, shared: Params, server_round: int,
                    rng: np.random.Generator) -> tuple[Params, dict]:
        history = load_history(config.history_dir, device_index(context))
        private = _private(context, config, history.user)
        update, private, metrics = local_round(config, shared, private, history.train_items, history.n_items, rng, server_round)
        _store_private(context, private)
        return update, metrics

    def items(self, context: Context, config: FederatedConfig) -> tuple[np.ndarray, int]:
        history = load_history(config.history_dir, device_index(context))
        return history.train_items, history.n_items

    def before_training(self, context: Context, config: FederatedConfig, server_round: int) -> None:
        user = device_index(context)
        if drops_out(config, user, server_round):
            raise DroppedOut(f"device {user} dropped out of round {server_round} (simulated, run-config dropout={config.dropout})")

    def before_reply(self, context: Context, config: FederatedConfig, server_round: int) -> None:
        """A simulated straggler sleeps before it answers; a device whose node config names a
        store never does what a simulation key asks."""
        if config.stragglers <= 0 or "store" in context.node_config or context.node_config.get(SIMULATED_CLOCK):
            return
        if straggles(config, device_index(context), server_round):
            time.sleep(config.straggler_delay)

    def evaluate(self, msg: Message, context: Context, config: FederatedConfig) -> Message:
        """Refit the private vector locally (shared frozen), rank the device's own validation
        and test items, send back only scalars (hit or not, NDCG gain)."""
        torch.set_num_threads(1)  # one device per CPU slot; Ray gives each actor its own
        arrays = msg.content["arrays"]
        history = load_history(config.history_dir, device_index(context))
        shared = shared_of(config, {name: arrays[name].numpy() for name in arrays})
        server_round = int(msg.content["config"].get("server-round", 0))
        rng = stream_rng(config.seed, history.user, server_round, Stream.EVALUATE)
        private = _private(context, config, history.user)
        if config.personalize_epochs > 0 and len(history.train_items):
            data = LocalData.for_device(history.train_items, history.n_items)
            private = refit_private(config, shared, private, data, config.personalize_epochs, rng)
            _store_private(context, private)
        model = config.model_spec.build(1, history.n_items, init=False)
        model.set_shared(shared)
        model.set_private(private)
        model.eval()
        scores = model.score_all(torch.zeros(1, dtype=torch.long))[0].numpy().astype(np.float64)
        ranks = [rank for which in ("val", "test") for rank in rank_locally(scores, history, which, rng)]
        return Message(evaluation_content(evaluation_metrics(np.array([ranks]), config.k)), reply_to=msg)


app = make_app(SimulatedDevices(), train_mods=[availability_mod])  # the ClientApp of simulated devices
