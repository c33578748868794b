"""The device's Flower ClientApp: one SuperNode is one person's device.

- ``train``: receive the global shared arrays, train on the device's own history with
  :func:`fedpref.models.train.local_update`, clip the update to the bound C, send
  ``global + clipped update`` for the shared arrays only, plus scalar metrics. The private
  vector stays in ``context.state`` across rounds, created the first time the device is sampled.
- ``evaluate``: refit the private vector locally (shared frozen), rank the device's own
  validation and test items, send back only scalars (hit or not, NDCG gain).
- ``query``: the device's stable key (its index in a simulation), used by the server only to
  order devices so that seeded sampling repeats.

Which history a device holds comes from its node config (``partition-id`` in the Simulation
Engine, or ``device-index``), the folder from the run config's ``history-dir``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedpref.models.contract import Params
from fedpref.models.federation import POPULARITY_TASK, SECAGG_ARRAY_NAMES, SECAGG_COHORT, TASK, FederatedConfig
from fedpref.models.metrics import ndcg, rank_of_target
from fedpref.models.train import LocalData, local_update

from .guard import clip_update, encode_update
from .history import DeviceHistory, load_history

app = ClientApp()

PRIVATE_KEY = "private"  # context.state key of the private arrays


def device_index(context: Context) -> int:
    config = context.node_config
    for key in ("device-index", "partition-id"):
        if key in config:
            return int(config[key])
    raise KeyError("node config names no device: set 'device-index' (or run in the Simulation Engine)")


class DroppedOut(RuntimeError):
    """A simulated device that leaves mid-round (run-config ``dropout``)."""


def _setup(msg: Message, context: Context, stream: int) -> tuple[FederatedConfig, DeviceHistory, Params, Params, np.random.Generator]:
    """What every message needs: config, this device's history, the global shared arrays,
    its private arrays and a generator seeded by (seed, device, round, ``stream``)."""
    arrays = msg.content["arrays"]
    return _setup_from(context, {name: arrays[name].numpy() for name in arrays}, msg.content["config"], stream)


def _setup_from(context: Context, arrays: dict[str, np.ndarray], task: dict, stream: int, config: FederatedConfig | None = None):
    torch.set_num_threads(1)  # one device per CPU slot; Ray gives each actor its own
    config = config or FederatedConfig.from_run_config(context.run_config)
    history = load_history(config.history_dir, device_index(context))
    shared = {name: arrays[name] for name in config.model_spec.build(1, 2, init=False).shared_names}
    server_round = int(task.get("server-round", 0))
    rng = np.random.default_rng([config.seed, history.user, server_round, stream])
    return config, history, shared, _private(context, config, history.user), rng


def drops_out(config: FederatedConfig, user: int, server_round: int) -> bool:
    """Whether, in a simulation with ``dropout`` > 0, this device leaves this round (a coin
    seeded by seed, device and round, so that a run repeats)."""
    return config.dropout > 0 and np.random.default_rng([config.seed, user, server_round, 3]).random() < config.dropout


def _maybe_drop_out(config: FederatedConfig, user: int, server_round: int) -> None:
    if drops_out(config, user, server_round):
        raise DroppedOut(f"device {user} dropped out of round {server_round} (simulated, run-config dropout={config.dropout})")


def _private(context: Context, config: FederatedConfig, user: int) -> Params:
    """This device's private arrays, created (seeded by device) the first time."""
    if PRIVATE_KEY in context.state:
        record = context.state[PRIVATE_KEY]
        return {name: record[name].numpy() for name in record}
    seed = int(np.random.SeedSequence([config.seed, user]).generate_state(1)[0] % (2**31))
    model = config.model_spec.build(1, 2, seed=seed)
    return model.get_private()


def _store_private(context: Context, private: Params) -> None:
    context.state[PRIVATE_KEY] = ArrayRecord({name: _array(v) for name, v in private.items()})


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))


def _refit_private(config: FederatedConfig, shared: Params, private: Params, data: LocalData, epochs: int, rng: np.random.Generator) -> Params:
    """``epochs`` passes that train only the private arrays, the shared ones frozen."""
    if epochs < 1 or len(data) == 0:
        return private
    refit = replace(config.train_config(), epochs=epochs, freeze_shared=True)
    return local_update(shared, private, data, refit, rng)[1]


def _secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a secure round (they carry SecAgg+'s
    stage); a plain training message passes straight through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _local_round(context: Context, config, history, shared, private, rng, server_round: int) -> tuple[Params, dict]:
    """This round's training on the device: the update of the shared arrays (unclipped)."""
    _maybe_drop_out(config, history.user, server_round)
    data = LocalData.for_device(history.train_items, history.n_items)
    # Fit the private vector to the current global items first, so that the item update is
    # computed against a user vector that already fits (not a random or stale one).
    private = _refit_private(config, shared, private, data, config.private_epochs, rng)
    update, private, metrics = local_update(shared, private, data, config.train_config(server_round), rng)
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
        history = load_history(config.history_dir, device_index(context))
        _maybe_drop_out(config, history.user, 0)
        sent = {names[0]: _popularity_vector(config, history)}
        z, bound = config.popularity_noise_multiplier, np.sqrt(config.popularity_max_items)
    else:
        config, history, shared, private, rng = _setup_from(context, arrays, task.config, stream=1, config=config)
        server_round = int(task.config.get("server-round", 1))
        update, _ = _local_round(context, config, history, shared, private, rng, server_round)
        sent, _, _ = clip_update(update, config.clip_norm)
        z, bound = config.dp_noise_multiplier, config.clip_norm
    if z > 0 and config.dp_noise_placement == "distributed":
        # This device's share of the noise: the sum over the cohort carries N(0, (z C)^2).
        noise = np.random.default_rng()  # fresh entropy: a seeded share would be predictable
        sent = {k: v.astype(np.float64) + noise.normal(0.0, z * bound / np.sqrt(cohort), size=v.shape) for k, v in sent.items()}
    parameters = ndarrays_to_parameters([np.asarray(sent[name], dtype=np.float64) for name in names])
    reply = FitRes(Status(Code.OK, ""), parameters, num_examples=1, metrics={})
    return Message(fitres_to_recorddict(reply, keep_input=True), reply_to=msg)


def _popularity_vector(config: FederatedConfig, history: DeviceHistory) -> np.ndarray:
    """1 for each of at most ``popularity-max-items`` of the device's items (a random subset)."""
    items = history.train_items
    if len(items) > config.popularity_max_items:
        rng = np.random.default_rng([config.seed, history.user, 0, 5])
        items = rng.choice(items, size=config.popularity_max_items, replace=False)
    vector = np.zeros(history.n_items, dtype=np.float64)
    vector[items] = 1.0
    return vector


@app.train(mods=[_secure_aggregation])
def train(msg: Message, context: Context) -> Message:
    if "fitins.parameters" in msg.content:
        return _train_secure(msg, context)
    config, history, shared, private, rng = _setup(msg, context, stream=1)
    if config.secagg:
        raise PermissionError("this run uses secure aggregation: the device sends no update outside the SecAgg+ protocol")
    server_round = int(msg.content["config"].get("server-round", 1))
    update, metrics = _local_round(context, config, history, shared, private, rng, server_round)
    bound = config.clip_norm
    if config.dp and config.dp_clipping == "adaptive":  # this round's C, set by the server's wrapper
        bound = float(msg.content["config"][KEY_CLIPPING_NORM])
    weights, norm, clipped = encode_update(shared, update, bound)
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
    content = RecordDict({"arrays": ArrayRecord({name: _array(v) for name, v in weights.items()}), "metrics": sent})
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
    config, history, shared, private, rng = _setup(msg, context, stream=2)
    if config.personalize_epochs > 0 and len(history.train_items):
        data = LocalData.for_device(history.train_items, history.n_items)
        private = _refit_private(config, shared, private, data, config.personalize_epochs, rng)
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
