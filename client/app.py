"""The device's Flower ClientApp: one SuperNode is one person's device.

- ``train``: receive the global shared arrays, train on the device's own history with
  :func:`fedpref.client.device.local_round`, clip the update to the bound C, send
  ``global + clipped update`` for the shared arrays only, plus scalar metrics (in a secure
  round, the clipped update itself through SecAgg+, or a capped item indicator for the
  popularity histogram). What the reply holds is built by :mod:`fedpref.models.wire`.
- ``evaluate``: a device with a store declines (it holds nothing out); a device that a
  :class:`DeviceProvider` supplies answers through it.
- ``query``: the device's stable key (node config ``device-index``), used by the server only to
  order devices so that seeded sampling repeats.

A device is a **store** (node config ``store``, set by ``fedpref device join``): its consented
events, its private vector and the latest global model (:class:`fedpref.client.Device`);
``_gate`` reads its consent (and its eligibility policy) afresh for every training message and
declines with an error reply that carries only the reason; so does a device that has taken part
in as many training rounds of the run as run-config ``dp-max-participations`` allows
(:mod:`fedpref.models.participation`: it counts the rounds of this run its record of what left
holds updates for, or, without a store, the rounds kept in its context's state). The
``_record_what_left`` mod writes every reply it sends into the store's record, an update with
the privacy guarantee the server's training request stated (run-config keys ``dp-epsilon``,
``dp-delta``, ``dp-rounds`` of the request's config: what the person's report shows).

:func:`make_app` builds the ClientApp; ``app`` is the one a real device runs. Whoever plays
devices that have no store of their own passes a :class:`DeviceProvider` (where such a device's
history and private vector are, what happens around its training) and mods for its training
messages; the ClientApp itself knows nothing of how the device came to be.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import recorddict_to_fitins
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedpref.models.contract import Params
from fedpref.models.encoding import decode, encode_within
from fedpref.models.encoding import norm as encoded_norm
from fedpref.models.config import FederatedConfig
from fedpref.models.participation import refusal
from fedpref.models.wire import (
    POPULARITY_TASK,
    SECAGG_ARRAY_NAMES,
    SECAGG_COHORT,
    TASK,
    Stream,
    secure_training_content,
    stream_rng,
    training_content,
    training_metrics,
)

from .device import Device
from .guard import clip_update, encode_update
from .ledger import describe_message, rounds_joined

DECLINED = 403  # the error code of a device's "no": consent, eligibility or the participation cap does not allow the task
PARTICIPATION_KEY = "participation"  # context.state of a device without a store: the training rounds it joined
GUARANTEE_KEYS = {"dp-epsilon": "epsilon", "dp-delta": "delta", "dp-rounds": "rounds", "dp-max-participations": "max_participations"}


class NoStore(RuntimeError):
    """The device has no store to train from."""


def device_index(context: Context) -> int:
    config = context.node_config
    for key in ("device-index", "partition-id"):
        if key in config:
            return int(config[key])
    raise KeyError("node config names no device: set 'device-index' (or run in the Simulation Engine)")


class DeviceProvider(Protocol):
    """What the ClientApp asks of whoever supplies devices without a store of their own."""

    def store_path(self, context: Context, config: FederatedConfig) -> str | None:
        """The store of the device behind ``context``, if it has one the node config does not name."""

    def local_round(self, context: Context, config: FederatedConfig, shared: Params, server_round: int,
                    rng: np.random.Generator) -> tuple[Params, dict]:
        """A device without a store: this round's update of the shared arrays and its metrics."""

    def items(self, context: Context, config: FederatedConfig) -> tuple[np.ndarray, int]:
        """A device without a store: the items it may count, and the catalogue's size."""

    def evaluate(self, msg: Message, context: Context, config: FederatedConfig) -> Message:
        """A device without a store: its reply to a federated evaluation."""

    def before_training(self, context: Context, config: FederatedConfig, server_round: int) -> None:
        """Called before the device trains (or counts its items, round 0); may raise."""

    def before_reply(self, context: Context, config: FederatedConfig, server_round: int) -> None:
        """Called when a training reply is ready, before it is sent."""


def round_of(msg: Message) -> int:
    """The server round a message belongs to (Flower's workflows put it in the group id)."""
    config = msg.content.config_records.get("config")
    if config is not None and "server-round" in config:
        return int(config["server-round"])
    try:
        return int(msg.metadata.group_id)
    except (TypeError, ValueError):
        return 0


def _server_of(context: Context) -> str:
    return str(context.node_config.get("superlink", "simulation"))


def _secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a secure round (they carry SecAgg+'s
    stage); a plain training message passes straight through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def shared_of(config: FederatedConfig, arrays: dict[str, np.ndarray]) -> Params:
    return {name: arrays[name] for name in config.model_spec.build(1, 2, init=False).shared_names}


def guarantee_of(request: dict) -> dict | None:
    """The privacy guarantee a training request's config states (the server's word: the honest
    epsilon of the run, its delta, the rounds planned, the participation cap), or None if it
    states none (a run without DP) or states it malformed."""
    found = {}
    for key, name in GUARANTEE_KEYS.items():
        value = request.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            return None
        found[name] = int(value) if name in ("rounds", "max_participations") else float(value)
    if not 0.0 < found["delta"] < 1.0 or found["rounds"] < 1:
        return None
    return found


def _joined(context: Context, run: int) -> list[int]:
    """The training rounds of run ``run`` a device without a store joined (its context's state)."""
    record = context.state.config_records.get(PARTICIPATION_KEY)
    if record is None or int(record.get("run", -1)) != run:
        return []
    return [int(r) for r in record.get("rounds", [])]


def _noise_details(config: FederatedConfig, z: float, device_std: float) -> dict:
    """The noise and DP parameters in force for an update (for the record of what left)."""
    if z <= 0:
        return {"placement": "none"}
    return {
        "placement": config.dp_noise_placement,
        "noise_multiplier": z,
        "delta": config.dp_delta or "1/(10 N), set by the server",
        "device_noise_std": device_std,
    }


def _popularity_vector(config: FederatedConfig, items: np.ndarray, n_items: int, user: int) -> np.ndarray:
    """1 for each of at most ``popularity-max-items`` of the device's items (a random subset)."""
    if len(items) > config.popularity_max_items:
        rng = stream_rng(config.seed, user, 0, Stream.POPULARITY)
        items = rng.choice(items, size=config.popularity_max_items, replace=False)
    vector = np.zeros(n_items, dtype=np.float64)
    vector[items] = 1.0
    return vector


class DeviceApp:
    """The handlers and mods of a device's ClientApp, around an optional :class:`DeviceProvider`.

    It keeps the stores it has opened (one per path) and, between a handler and the mod that
    records its reply, what the handler tells the record."""

    def __init__(self, provider: DeviceProvider | None = None) -> None:
        self.provider = provider
        self._devices: dict[str, Device] = {}
        self._pending: dict[int, dict] = {}

    def __getstate__(self) -> dict:
        """What a copy of the app carries to another process (Ray's workers): the provider only.

        Open stores hold a connection and a lock, which belong to this process; a copy opens its
        own when it first needs them."""
        return {"provider": self.provider}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["provider"])

    # -- the device's store ------------------------------------------------------------------
    def store_path(self, context: Context, config: FederatedConfig) -> str | None:
        """This device's store: node config ``store`` (a real device), or the provider's."""
        if "store" in context.node_config:
            return str(context.node_config["store"])
        return None if self.provider is None else self.provider.store_path(context, config)

    def device_of(self, context: Context, config: FederatedConfig) -> Device | None:
        """The :class:`Device` behind this SuperNode, when it has a store."""
        path = self.store_path(context, config)
        if path is None:
            return None
        if path not in self._devices:
            if not Path(path).exists():
                raise NoStore(
                    f"no device store at {path}: create it with fedpref.client.Device.open({path!r}) "
                    "(or `fedpref population --stores DIR` for a simulation)"
                )
            self._devices[path] = Device.open(path, seed=config.seed, user=device_index(context))
        return self._devices[path]

    # -- mods -----------------------------------------------------------------------------------
    def record_what_left(self, msg: Message, context: Context, call_next) -> Message:
        """Every reply of a device with a store goes into its record of what left: built from the
        outgoing message itself (names, shapes and sizes, never values), plus what the handler
        knows about an update (its norm, the clipping bound, the noise)."""
        try:
            reply = call_next(msg, context)
        except Exception as exc:
            self._log_reply(msg, context, None, f"{type(exc).__name__}")
            raise
        self._log_reply(msg, context, reply, None)
        return reply

    def _log_reply(self, msg: Message, context: Context, reply: Message | None, failure: str | None) -> None:
        details = self._pending.pop(id(context), None)
        try:
            device = self.device_of(context, FederatedConfig.from_run_config(context.run_config))
        except Exception:  # no store (or a bad run config, which the handler reports itself)
            return
        if device is None:
            return
        if reply is None:  # the handler failed: Flower sends an error reply with the exception's type
            reply = Message(Error(code=0, reason=failure or ""), reply_to=msg)
        entry = describe_message(reply, time=time.time(), server=_server_of(context), details=details)
        entry["round"] = round_of(msg)
        if failure is not None:
            entry["message"] = "error"
        device.log_sent(entry)

    def _tell_record(self, context: Context, **details) -> None:
        self._pending[id(context)] = details

    def gate(self, msg: Message, context: Context, call_next) -> Message:
        """Consent and eligibility, checked afresh for every training message (every stage of a
        secure round too): a device that does not consent to federated training, or may not train
        now, declines with an error reply that carries nothing but the reason."""
        config = FederatedConfig.from_run_config(context.run_config)
        device = self.device_of(context, config)
        reason = None
        if device is not None and not device.consent.federated:
            reason = f"consent is '{device.consent.level.value}', which does not include federated training"
        elif device is not None and "store" in context.node_config:
            ok, why = device.eligible()
            if not ok:
                reason = "not eligible now: " + "; ".join(why)
        if reason is None and config.dp_max_participations > 0:
            server_round, joined = round_of(msg), self.rounds_joined(msg, context, device)
            if server_round not in joined:  # (a later stage of a secure round it has joined goes on)
                reason = refusal(config, server_round, len(joined), max(joined, default=0))
        if reason is not None:
            return Message(Error(code=DECLINED, reason=f"declined: {reason}"), reply_to=msg)
        return call_next(msg, context)

    # -- the participation cap ------------------------------------------------------------------
    def rounds_joined(self, msg: Message, context: Context, device: Device | None) -> list[int]:
        """The training rounds of this message's run the device has joined (sent an update in):
        from its record of what left (a device with a store), else from its context's state."""
        run = int(msg.metadata.run_id)
        if device is not None:
            return rounds_joined(device.record_of_what_left(), run)
        return _joined(context, run)

    def _count_round(self, msg: Message, context: Context, server_round: int) -> None:
        """A device without a store keeps the training rounds it joined in its context's state (a
        device with a store has them in its record of what left)."""
        if self.device_of(context, FederatedConfig.from_run_config(context.run_config)) is not None:
            return
        run = int(msg.metadata.run_id)
        rounds = sorted(set(_joined(context, run)) | {server_round})
        context.state[PARTICIPATION_KEY] = ConfigRecord({"run": run, "rounds": rounds})

    # -- training -------------------------------------------------------------------------------
    def _before_training(self, context: Context, config: FederatedConfig, server_round: int) -> None:
        if self.provider is not None:
            self.provider.before_training(context, config, server_round)

    def _before_reply(self, context: Context, config: FederatedConfig, server_round: int) -> None:
        if self.provider is not None:
            self.provider.before_reply(context, config, server_round)

    def _local_round(self, context: Context, config: FederatedConfig, shared: Params, server_round: int) -> tuple[Params, dict]:
        """This round's training on the device: the update of the shared arrays (unclipped).
        A device with a store trains on its consented events and keeps its private vector (and
        the global model, for recommendations) in the store; one without, through the provider."""
        user = device_index(context)
        self._before_training(context, config, server_round)
        torch.set_num_threads(1)  # one device per CPU slot; Ray gives each actor its own
        rng = stream_rng(config.seed, user, server_round, Stream.TRAIN)
        device = self.device_of(context, config)
        if device is not None:
            device.join_run(config, shared, version=f"run {context.run_id}, round {server_round}")
            return device.train_federated(shared, config, server_round, rng)
        if self.provider is None:
            raise NoStore("this device has no store (node config 'store'): nothing to train on")
        return self.provider.local_round(context, config, shared, server_round, rng)

    def _items_of(self, context: Context, config: FederatedConfig, n_items: int) -> tuple[np.ndarray, int]:
        """The items this device may count: its consented events (a device with a store) or
        the provider's."""
        device = self.device_of(context, config)
        if device is not None:
            items = device.history_items()
            return items[items < n_items], n_items
        if self.provider is None:
            raise NoStore("this device has no store (node config 'store'): no items to count")
        return self.provider.items(context, config)

    def _train_secure(self, msg: Message, context: Context) -> Message:
        """A secure round's task (in SecAgg+'s legacy format). Training: send the clipped update
        itself, with equal weight and nothing else. Popularity histogram: send an indicator of at
        most ``popularity-max-items`` of this device's items. With distributed noise, plus this
        device's share of the noise. ``secaggplus_mod`` masks it before it leaves."""
        task = recorddict_to_fitins(msg.content, keep_input=True)
        names = str(task.config[SECAGG_ARRAY_NAMES]).split(",")
        arrays = dict(zip(names, parameters_to_ndarrays(task.parameters), strict=True))
        cohort = int(task.config[SECAGG_COHORT])
        config = FederatedConfig.from_run_config(context.run_config)
        if task.config.get(TASK) == POPULARITY_TASK:
            user = device_index(context)
            self._before_training(context, config, 0)
            items, n_items = self._items_of(context, config, n_items=len(arrays[names[0]]))
            sent = {names[0]: _popularity_vector(config, items, n_items, user)}
            z, bound = config.popularity_noise_multiplier, np.sqrt(config.popularity_max_items)
            norm, clipped = float(np.sqrt(sent[names[0]].sum())), False
        else:
            server_round = int(task.config.get("server-round", 1))
            update, _ = self._local_round(context, config, shared_of(config, arrays), server_round)
            sent, norm, clipped = clip_update(update, config.clip_norm)
            z, bound = config.dp_noise_multiplier, config.clip_norm
            self._count_round(msg, context, server_round)
        noise_std = 0.0
        if z > 0 and config.dp_noise_placement == "distributed":
            # This device's share of the noise: the sum over the cohort carries N(0, (z C)^2).
            noise = np.random.default_rng()  # fresh entropy: a seeded share would be predictable
            noise_std = z * bound / np.sqrt(cohort)
            sent = {k: v.astype(np.float64) + noise.normal(0.0, noise_std, size=v.shape) for k, v in sent.items()}
        self._tell_record(
            context,
            update=True,
            task=str(task.config.get(TASK, "training")),
            update_norm=float(min(norm, bound)),
            clipped=bool(clipped),
            clip_bound=float(bound),
            secure_aggregation=True,
            cohort=cohort,
            noise=_noise_details(config, z, noise_std),
            **({"guarantee": found} if task.config.get(TASK) != POPULARITY_TASK and (found := guarantee_of(dict(task.config))) else {}),
        )
        if task.config.get(TASK) != POPULARITY_TASK:
            self._before_reply(context, config, int(task.config.get("server-round", 1)))
        return Message(secure_training_content(names, sent), reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        if "fitins.parameters" in msg.content:
            return self._train_secure(msg, context)
        config = FederatedConfig.from_run_config(context.run_config)
        if config.secagg:
            raise PermissionError("this run uses secure aggregation: the device sends no update outside the SecAgg+ protocol")
        arrays = msg.content["arrays"]
        shared = shared_of(config, {name: arrays[name].numpy() for name in arrays})
        server_round = int(msg.content["config"].get("server-round", 1))
        update, metrics = self._local_round(context, config, shared, server_round)
        self._count_round(msg, context, server_round)
        bound = config.clip_norm
        if config.dp and config.dp_clipping == "adaptive":  # this round's C, set by the server's wrapper
            bound = float(msg.content["config"][KEY_CLIPPING_NORM])
        weights, norm, clipped = encode_update(shared, update, bound)
        sent_norm = min(norm, bound)
        if config.update_encoding != "float32":  # send the clipped update itself, encoded (fedpref.models.encoding)
            clipped_update, _, _ = clip_update(update, bound)
            coin = stream_rng(config.seed, device_index(context), server_round, Stream.ROUNDING)  # stochastic rounding
            weights = encode_within(clipped_update, config.update_encoding, bound, coin)
            sent_norm = encoded_norm(decode(weights, list(shared), config.update_encoding))  # as the server will decode it
        sent = training_metrics(config, examples=int(metrics["num_examples"]), loss=float(metrics["loss"]), norm=float(norm), clipped=bool(clipped))
        self._tell_record(
            context,
            update=True,
            task="training",
            update_norm=float(sent_norm),
            clipped=bool(clipped),
            clip_bound=float(bound),
            encoding=config.update_encoding,
            secure_aggregation=False,
            noise=_noise_details(config, config.dp_noise_multiplier, 0.0),
            **({"guarantee": found} if (found := guarantee_of(dict(msg.content["config"]))) else {}),
        )
        content = training_content(weights, sent)
        self._before_reply(context, config, server_round)
        return Message(content, reply_to=msg)

    # -- evaluation and the device's key ----------------------------------------------------------
    def evaluate(self, msg: Message, context: Context) -> Message:
        config = FederatedConfig.from_run_config(context.run_config)
        if self.device_of(context, config) is not None:
            # Federated evaluation ranks held-out items: a simulation's measure. A person's device
            # holds nothing out, and its hit or miss would tell the server about its history.
            return Message(Error(code=DECLINED, reason="declined: a device with a store does not take part in federated evaluation"), reply_to=msg)
        if self.provider is None:
            return Message(Error(code=DECLINED, reason="declined: this device holds no evaluation data"), reply_to=msg)
        return self.provider.evaluate(msg, context, config)

    def query(self, msg: Message, context: Context) -> Message:
        return Message(RecordDict({"device": ConfigRecord({"key": device_index(context)})}), reply_to=msg)


def make_app(provider: DeviceProvider | None = None, train_mods: list | tuple = ()) -> ClientApp:
    """A device's ClientApp: the store's gate, then ``train_mods``, then SecAgg+ for training
    messages; every reply of a device with a store into its record of what left."""
    device = DeviceApp(provider)
    client_app = ClientApp(mods=[device.record_what_left])
    client_app.train(mods=[device.gate, *train_mods, _secure_aggregation])(device.train)
    client_app.evaluate()(device.evaluate)
    client_app.query()(device.query)
    return client_app


app = make_app()  # a real device's ClientApp (node config ``store``)


__all__ = ["DECLINED", "DeviceApp", "DeviceProvider", "NoStore", "app", "device_index", "make_app", "round_of", "shared_of"]
