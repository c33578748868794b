"""The device's Flower ClientApp: one SuperNode is one person's device.

- ``train``: receive the global shared arrays, train on the device's own history with
  :func:`fedpref.client.device.local_round`, clip the update to the bound C, send
  ``global + clipped update`` for the shared arrays only, plus scalar metrics (in a secure
  round, the clipped update itself through SecAgg+, or a capped item indicator for the
  popularity histogram).
- ``evaluate``: refit the private vector locally (shared frozen), rank the device's own
  validation and test items, send back only scalars (hit or not, NDCG gain).
- ``query``: the device's stable key (its index in a simulation), used by the server only to
  order devices so that seeded sampling repeats.

Where a device's history lives:

- a **device with a store** (node config ``store``, set by ``fedpref device join``; or
  ``device-<i>.sqlite`` in run-config ``store-dir`` in a simulation): its consented events, its
  private vector and the latest global model are in the store (:class:`fedpref.client.Device`);
  ``_gate`` reads its consent (and, on a real device, its eligibility policy) afresh for every
  training message and declines with an error reply that carries only the reason; the
  ``_record_what_left`` mod writes every reply it sends into the store's record; it declines
  federated evaluation;
- a **simulated device** reads its row of the population folder (run-config ``history-dir``,
  node config ``partition-id`` or ``device-index``) and keeps its private vector in
  ``context.state``; run-config ``availability`` says in which rounds it may train.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedpref.models.contract import Params
from fedpref.models.federation import POPULARITY_TASK, SECAGG_ARRAY_NAMES, SECAGG_COHORT, TASK, FederatedConfig
from fedpref.models.availability import AvailabilityPattern
from fedpref.models.encoding import decode, encode_within
from fedpref.models.encoding import norm as encoded_norm
from fedpref.models.metrics import ndcg, rank_of_target
from fedpref.models.train import LocalData

from .device import Device, initial_private, local_round, refit_private
from .guard import clip_update, encode_update
from .history import DeviceHistory, HistoryError, load_history
from .ledger import describe_message

PRIVATE_KEY = "private"  # context.state key of the private arrays


def device_index(context: Context) -> int:
    config = context.node_config
    for key in ("device-index", "partition-id"):
        if key in config:
            return int(config[key])
    raise KeyError("node config names no device: set 'device-index' (or run in the Simulation Engine)")


class DroppedOut(RuntimeError):
    """A simulated device that leaves mid-round (run-config ``dropout``)."""


DECLINED = 403  # the error code of a device's "no": consent or eligibility does not allow the task

_DEVICES: dict[str, Device] = {}  # open stores, by path (one per process)
_PENDING: dict[int, dict] = {}  # what a handler tells the record of what left about its reply, by context


def store_path(context: Context, config: FederatedConfig) -> str | None:
    """This device's store: node config ``store`` (a real device), or ``device-<i>.sqlite`` in
    run-config ``store-dir`` (a simulation with stores); None for a plain simulated device."""
    if "store" in context.node_config:
        return str(context.node_config["store"])
    if config.store_dir:
        return str(Path(config.store_dir) / f"device-{device_index(context)}.sqlite")
    return None


def device_of(context: Context, config: FederatedConfig) -> Device | None:
    """The :class:`Device` behind this SuperNode, when it has a store."""
    path = store_path(context, config)
    if path is None:
        return None
    if path not in _DEVICES:
        if not Path(path).exists():
            raise HistoryError(
                f"no device store at {path}: create it with fedpref.client.Device.open({path!r}) "
                "(or `fedpref population --stores DIR` for a simulation)"
            )
        _DEVICES[path] = Device.open(path, seed=config.seed, user=device_index(context))
    return _DEVICES[path]


def _round_of(msg: Message) -> int:
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


def _record_what_left(msg: Message, context: Context, call_next) -> Message:
    """Every reply of a device with a store goes into its record of what left: built from the
    outgoing message itself (names, shapes and sizes, never values), plus what the handler
    knows about an update (its norm, the clipping bound, the noise)."""
    try:
        reply = call_next(msg, context)
    except Exception as exc:
        _log_reply(msg, context, None, f"{type(exc).__name__}")
        raise
    _log_reply(msg, context, reply, None)
    return reply


def _log_reply(msg: Message, context: Context, reply: Message | None, failure: str | None) -> None:
    details = _PENDING.pop(id(context), None)
    try:
        device = device_of(context, FederatedConfig.from_run_config(context.run_config))
    except Exception:  # no store (or a bad run config, which the handler reports itself)
        return
    if device is None:
        return
    if reply is None:  # the handler failed: Flower sends an error reply with the exception's type
        reply = Message(Error(code=0, reason=failure or ""), reply_to=msg)
    entry = describe_message(reply, time=time.time(), server=_server_of(context), details=details)
    entry["round"] = _round_of(msg)
    if failure is not None:
        entry["message"] = "error"
    device.log_sent(entry)


def _tell_record(context: Context, **details) -> None:
    _PENDING[id(context)] = details


def _gate(msg: Message, context: Context, call_next) -> Message:
    """Consent and eligibility, checked afresh for every training message (every stage of a
    secure round too): a device that does not consent to federated training, or may not train
    now, declines with an error reply that carries nothing but the reason."""
    config = FederatedConfig.from_run_config(context.run_config)
    device = device_of(context, config)
    reason = None
    if device is not None and not device.consent.federated:
        reason = f"consent is '{device.consent.level.value}', which does not include federated training"
    elif device is not None and "store" in context.node_config:
        ok, why = device.eligible()
        if not ok:
            reason = "not eligible now: " + "; ".join(why)
    elif not AvailabilityPattern.parse(config.availability).available(config.seed, device_index(context), _round_of(msg)):
        reason = f"not available in round {_round_of(msg)} (simulated availability '{config.availability}')"
    if reason is not None:
        return Message(Error(code=DECLINED, reason=f"declined: {reason}"), reply_to=msg)
    return call_next(msg, context)


app = ClientApp(mods=[_record_what_left])


def _setup(msg: Message, context: Context, stream: int) -> tuple[FederatedConfig, DeviceHistory, Params, Params, np.random.Generator]:
    """What a simulated device's evaluation needs: config, its history, the global shared
    arrays, its private arrays and a generator seeded by (seed, device, round, ``stream``)."""
    torch.set_num_threads(1)  # one device per CPU slot; Ray gives each actor its own
    arrays = msg.content["arrays"]
    config = FederatedConfig.from_run_config(context.run_config)
    history = load_history(config.history_dir, device_index(context))
    shared = _shared_of(config, {name: arrays[name].numpy() for name in arrays})
    server_round = int(msg.content["config"].get("server-round", 0))
    rng = np.random.default_rng([config.seed, history.user, server_round, stream])
    return config, history, shared, _private(context, config, history.user), rng


def _shared_of(config: FederatedConfig, arrays: dict[str, np.ndarray]) -> Params:
    return {name: arrays[name] for name in config.model_spec.build(1, 2, init=False).shared_names}


def drops_out(config: FederatedConfig, user: int, server_round: int) -> bool:
    """Whether, in a simulation with ``dropout`` > 0, this device leaves this round (a coin
    seeded by seed, device and round, so that a run repeats)."""
    return config.dropout > 0 and np.random.default_rng([config.seed, user, server_round, 3]).random() < config.dropout


def straggles(config: FederatedConfig, user: int, server_round: int) -> bool:
    """Whether, in a simulation with ``stragglers`` > 0, this device answers this round's
    training ``straggler-delay`` seconds late (a coin seeded by seed, device and round)."""
    return config.stragglers > 0 and np.random.default_rng([config.seed, user, server_round, 6]).random() < config.stragglers


def answers_late(config: FederatedConfig, user: int, server_round: int, timeout: float | None) -> bool:
    """Whether this device's training reply comes after a server that waits ``timeout`` seconds
    has closed the round (for engines that keep a simulated clock instead of sleeping)."""
    return straggles(config, user, server_round) and config.straggler_delay > (timeout if timeout is not None else 3600.0)


SIMULATED_CLOCK = "simulated-clock"  # node config: the engine drops late replies itself; the device does not sleep


def _maybe_straggle(context: Context, config: FederatedConfig, server_round: int) -> None:
    """A simulated straggler sleeps before it answers; a real device (node config ``store``)
    never does what a simulation key asks."""
    if config.stragglers <= 0 or "store" in context.node_config or context.node_config.get(SIMULATED_CLOCK):
        return
    if straggles(config, device_index(context), server_round):
        time.sleep(config.straggler_delay)


def _maybe_drop_out(config: FederatedConfig, user: int, server_round: int) -> None:
    if drops_out(config, user, server_round):
        raise DroppedOut(f"device {user} dropped out of round {server_round} (simulated, run-config dropout={config.dropout})")


def _private(context: Context, config: FederatedConfig, user: int) -> Params:
    """This simulated device's private arrays, created (seeded by device) the first time."""
    if PRIVATE_KEY in context.state:
        record = context.state[PRIVATE_KEY]
        return {name: record[name].numpy() for name in record}
    return initial_private(config.model_spec, config.seed, user)


def _store_private(context: Context, private: Params) -> None:
    context.state[PRIVATE_KEY] = ArrayRecord({name: _array(v) for name, v in private.items()})


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))


def _secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a secure round (they carry SecAgg+'s
    stage); a plain training message passes straight through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _local_round(context: Context, config: FederatedConfig, shared: Params, server_round: int) -> tuple[Params, dict]:
    """This round's training on the device: the update of the shared arrays (unclipped).
    A device with a store trains on its consented events and keeps its private vector (and
    the global model, for recommendations) in the store; a simulated one reads its history
    from the population folder and keeps its private vector in the node's state."""
    user = device_index(context)
    _maybe_drop_out(config, user, server_round)
    torch.set_num_threads(1)  # one device per CPU slot; Ray gives each actor its own
    rng = np.random.default_rng([config.seed, user, server_round, 1])
    device = device_of(context, config)
    if device is not None:
        device.join_run(config, shared, version=f"run {context.run_id}, round {server_round}")
        return device.train_federated(shared, config, server_round, rng)
    history = load_history(config.history_dir, user)
    private = _private(context, config, history.user)
    update, private, metrics = local_round(config, shared, private, history.train_items, history.n_items, rng, server_round)
    _store_private(context, private)
    return update, metrics


def _train_secure(msg: Message, context: Context) -> Message:
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
        _maybe_drop_out(config, user, 0)
        items, n_items = _items_of(context, config, n_items=len(arrays[names[0]]))
        sent = {names[0]: _popularity_vector(config, items, n_items, user)}
        z, bound = config.popularity_noise_multiplier, np.sqrt(config.popularity_max_items)
        norm, clipped = float(np.sqrt(sent[names[0]].sum())), False
    else:
        server_round = int(task.config.get("server-round", 1))
        update, _ = _local_round(context, config, _shared_of(config, arrays), server_round)
        sent, norm, clipped = clip_update(update, config.clip_norm)
        z, bound = config.dp_noise_multiplier, config.clip_norm
    noise_std = 0.0
    if z > 0 and config.dp_noise_placement == "distributed":
        # This device's share of the noise: the sum over the cohort carries N(0, (z C)^2).
        noise = np.random.default_rng()  # fresh entropy: a seeded share would be predictable
        noise_std = z * bound / np.sqrt(cohort)
        sent = {k: v.astype(np.float64) + noise.normal(0.0, noise_std, size=v.shape) for k, v in sent.items()}
    _tell_record(
        context,
        update=True,
        task=str(task.config.get(TASK, "training")),
        update_norm=float(min(norm, bound)),
        clipped=bool(clipped),
        clip_bound=float(bound),
        secure_aggregation=True,
        cohort=cohort,
        noise=_noise_details(config, z, noise_std),
    )
    if task.config.get(TASK) != POPULARITY_TASK:
        _maybe_straggle(context, config, int(task.config.get("server-round", 1)))
    parameters = ndarrays_to_parameters([np.asarray(sent[name], dtype=np.float64) for name in names])
    reply = FitRes(Status(Code.OK, ""), parameters, num_examples=1, metrics={})
    return Message(fitres_to_recorddict(reply, keep_input=True), reply_to=msg)


def _items_of(context: Context, config: FederatedConfig, n_items: int) -> tuple[np.ndarray, int]:
    """The items this device may count: its consented events (a device with a store) or its
    training history (a simulated one)."""
    device = device_of(context, config)
    if device is not None:
        items = device.history_items()
        return items[items < n_items], n_items
    history = load_history(config.history_dir, device_index(context))
    return history.train_items, history.n_items


def _popularity_vector(config: FederatedConfig, items: np.ndarray, n_items: int, user: int) -> np.ndarray:
    """1 for each of at most ``popularity-max-items`` of the device's items (a random subset)."""
    if len(items) > config.popularity_max_items:
        rng = np.random.default_rng([config.seed, user, 0, 5])
        items = rng.choice(items, size=config.popularity_max_items, replace=False)
    vector = np.zeros(n_items, dtype=np.float64)
    vector[items] = 1.0
    return vector


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


@app.train(mods=[_gate, _secure_aggregation])
def train(msg: Message, context: Context) -> Message:
    if "fitins.parameters" in msg.content:
        return _train_secure(msg, context)
    config = FederatedConfig.from_run_config(context.run_config)
    if config.secagg:
        raise PermissionError("this run uses secure aggregation: the device sends no update outside the SecAgg+ protocol")
    arrays = msg.content["arrays"]
    shared = _shared_of(config, {name: arrays[name].numpy() for name in arrays})
    server_round = int(msg.content["config"].get("server-round", 1))
    update, metrics = _local_round(context, config, shared, server_round)
    bound = config.clip_norm
    if config.dp and config.dp_clipping == "adaptive":  # this round's C, set by the server's wrapper
        bound = float(msg.content["config"][KEY_CLIPPING_NORM])
    weights, norm, clipped = encode_update(shared, update, bound)
    sent_norm = min(norm, bound)
    if config.update_encoding != "float32":  # send the clipped update itself, encoded (fedpref.models.encoding)
        clipped_update, _, _ = clip_update(update, bound)
        coin = np.random.default_rng([config.seed, device_index(context), server_round, 4])  # stochastic rounding
        weights = encode_within(clipped_update, config.update_encoding, bound, coin)
        sent_norm = encoded_norm(decode(weights, list(shared), config.update_encoding))  # as the server will decode it
    if config.dp:
        # Under DP every update carries the same weight and nothing else leaves: the example
        # count, the loss and the norm before clipping are outside the noise's protection.
        # Adaptive clipping adds one bit, whether this update fitted within C; the server
        # noises the count of those bits and the accountant covers it. The bit is Andrew et
        # al.'s (2021): 1 when *not* clipped. Flower's server moves C by
        # exp(-lr * (share of bits - target)), which with that bit makes C follow the target
        # quantile of the norms; Flower's own adaptiveclipping_mod (1.41) sends 1 when the
        # update *was* clipped, which drives C the wrong way (docs/privacy.md).
        sent = MetricRecord({"num-examples": 1})
        if config.dp_clipping == "adaptive":
            sent[KEY_NORM_BIT] = int(not clipped)
    else:
        sent = MetricRecord(
            {
                "num-examples": int(metrics["num_examples"]),
                "train-loss": float(metrics["loss"]),
                "update-norm": float(norm),
                "clipped": float(clipped),
            }
        )
    _tell_record(
        context,
        update=True,
        task="training",
        update_norm=float(sent_norm),
        clipped=bool(clipped),
        clip_bound=float(bound),
        encoding=config.update_encoding,
        secure_aggregation=False,
        noise=_noise_details(config, config.dp_noise_multiplier, 0.0),
    )
    content = RecordDict({"arrays": ArrayRecord({name: _array(v) for name, v in weights.items()}), "metrics": sent})
    _maybe_straggle(context, config, server_round)
    return Message(content, reply_to=msg)


def rank_locally(scores: np.ndarray, history: DeviceHistory, which: str, rng: np.random.Generator) -> tuple[int, int]:
    """(sampled rank, full rank) of the device's ``which`` item, computed on the device."""
    target = history.target(which)
    sampled = rank_of_target(scores[[target]], scores[history.negatives][None, :], rng)[0]
    mask = np.ones(len(scores), dtype=bool)
    mask[history.train_items] = False
    mask[target] = False
    full = rank_of_target(scores[[target]], scores[None, :], rng, candidate_mask=mask[None, :])[0]
    return int(sampled), int(full)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if device_of(context, FederatedConfig.from_run_config(context.run_config)) is not None:
        # Federated evaluation ranks held-out items: a simulation's measure. A person's device
        # holds nothing out, and its hit or miss would tell the server about its history.
        return Message(Error(code=DECLINED, reason="declined: a device with a store does not take part in federated evaluation"), reply_to=msg)
    config, history, shared, private, rng = _setup(msg, context, stream=2)
    if config.personalize_epochs > 0 and len(history.train_items):
        data = LocalData.for_device(history.train_items, history.n_items)
        private = refit_private(config, shared, private, data, config.personalize_epochs, rng)
        _store_private(context, private)
    model = config.model_spec.build(1, history.n_items, init=False)
    model.set_shared(shared)
    model.set_private(private)
    model.eval()
    scores = model.score_all(torch.zeros(1, dtype=torch.long))[0].numpy().astype(np.float64)
    k = config.k
    metrics: dict[str, float | int] = {"num-examples": 1}
    for which in ("val", "test"):
        sampled, full = rank_locally(scores, history, which, rng)
        metrics[f"{which}-hr"] = float(sampled < k)
        metrics[f"{which}-ndcg"] = ndcg(np.array([sampled]), k)
        metrics[f"{which}-full-hr"] = float(full < k)
        metrics[f"{which}-full-ndcg"] = ndcg(np.array([full]), k)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"device": ConfigRecord({"key": device_index(context)})}), reply_to=msg)
