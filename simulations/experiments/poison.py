"""Poisoning: compromised devices push one item to the top of everyone's list.

A share of the devices (1%, 5%, 10%) is compromised. Each time the server asks one of them to
train, it answers with a crafted update instead of one computed from a history: a targeted
model-poisoning attack of the kind of PipAttack (Zhang et al. 2022) and FedRecAttack (Rong et
al. 2022). The attacker sees the global model it receives and

1. takes the items the model ranks highest for everyone (the largest item biases: under the
   sampled softmax the bias carries popularity; after a clean run on movielens-small the
   biases' Spearman correlation with the items' interaction counts is 0.86) as what users like;
2. makes a few fake users who like a random handful of those items and fits each one's user
   vector to the global model (the full softmax of the profile, a few gradient steps): what a
   mainstream user's vector looks like in this model;
3. moves the target item's embedding row and bias along the steepest ascent of those users'
   scores, ``(mean user vector, 1)``, with its whole norm budget: the update's L2 norm is the
   clipping bound C, all of it on the target's row and bias.

The reply is well formed: the shared arrays the server sent, in their shape and float32 dtype,
``global + update`` within C (shaved by the device's own guard,
:func:`fedpref.client.guard.encode_update`), with the metrics an honest device sends
(``num-examples`` the population's median history length, a plausible loss and norm). The
server's validation (:mod:`fedpref.server.validation`) therefore accepts it: nothing in it is
out of bounds, and a norm bound alone cannot tell it from an honest update whose norm is C.

:class:`PoisonGrid` wraps the grid of an engine (the fast engine's ``FastGrid`` or the in-process
engine's ``InProcessGrid``) and answers the compromised devices' training messages itself; every
other message goes to the engine. Compromised devices do not take part in federated
evaluation (they get an error reply): their histories are not used, the attacker would not
report honestly anyway, and the test HR@10 of a run is then the accuracy of the honest users,
which is what a defence must keep.

The measure (:func:`target_exposure`): among honest users who never interacted with the
target, the share whose top-k over every item they have not trained on holds the target,
after each refits its private vector to the final global model exactly as federated
evaluation does.

The sweep (:func:`poison_sweep`) runs every attack fraction with each defence: none (the
strategy's weighted mean), ``median`` (Flower's FedMedian), ``trimmed-mean`` (FedTrimmedAvg)
and ``norm-bound`` (run-config ``server-norm-bound``: the server clips every update to a bound
and weighs every device the same; the bound defaults to the median norm of the honest updates
of the clean run). ``fedpref poison`` runs it from the command line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from flwr.app import Error, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedpref.client.guard import encode_update
from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.models.wire import PARTIAL_AGGREGATE, Stream, stream_rng, training_content, training_metrics
from fedpref.server.grid import EngineGrid

from fedpref.simulations.engines.fast import FastGrid
from fedpref.simulations.engines.inprocess import NODE_ID_BASE, reply_from

DEFENCES = ("none", "median", "trimmed-mean", "norm-bound")
FRACTIONS = (0.0, 0.01, 0.05, 0.10)
NORM_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)  # of the clean run's honest update norms, kept in its row
ATTACK_ERROR = 0  # the error code of a compromised device's answer to an evaluation message


# -- who is compromised, and which item they push ------------------------------------------


def compromised_devices(n_users: int, fraction: float, seed: int) -> np.ndarray:
    """The compromised devices at ``fraction`` of ``n_users`` (sorted indices): the first
    ``round(fraction * n_users)`` (at least one when ``fraction > 0``) of a permutation fixed by
    ``seed``, so that the devices compromised at 1% are among those at 5%, and so on."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the attack fraction must lie in [0, 1), got {fraction}")
    count = 0 if fraction == 0 else max(1, int(round(fraction * n_users)))
    order = np.random.default_rng([seed, 0xA77AC]).permutation(n_users)
    return np.sort(order[:count]).astype(np.int64)


def item_counts(population_folder: str | Path) -> np.ndarray:
    """How many users interacted with each item (training, validation and test items)."""
    folder = Path(population_folder)
    meta = json.loads((folder / "meta.json").read_text())
    n_items = int(meta["n_items"])
    counts = np.bincount(np.load(folder / "train_items.npy", mmap_mode="r"), minlength=n_items)
    for name in ("val_item", "test_item"):
        counts = counts + np.bincount(np.load(folder / f"{name}.npy", mmap_mode="r"), minlength=n_items)
    return counts.astype(np.int64)


def choose_target(population_folder: str | Path, seed: int) -> int:
    """An unpopular item to push: drawn (fixed by ``seed``) from the least popular half of the
    catalogue among the items with at least one interaction."""
    counts = item_counts(population_folder)
    order = np.lexsort((np.arange(len(counts)), counts))  # least popular first, ties by id
    half = order[: len(counts) // 2]
    candidates = np.sort(half[counts[half] >= 1])
    if not len(candidates):
        raise ValueError("no item with an interaction in the least popular half of the catalogue")
    return int(np.random.default_rng([seed, 0x7A12]).choice(candidates))


# -- the attack ------------------------------------------------------------------------------


class TargetBoost:
    """The crafted update of a compromised device (see the module's docstring).

    ``pool``: how many of the highest-bias items the attacker takes as the popular ones;
    ``profile``: items per fake user; ``fakes``: fake users per attacker and round; ``norm``:
    the update's L2 norm (None: the round's clipping bound C, the whole budget).
    ``num_examples``: the example count the attacker claims (the population's median history)."""

    def __init__(self, config: FederatedConfig, target: int, num_examples: int, *, seed: int = 0, pool: int = 100,
                 profile: int = 20, fakes: int = 4, fit_steps: int = 30, norm: float | None = None) -> None:
        if config.model != "mf":
            raise RunConfigError(f"the poisoning attack crafts matrix factorisation updates (model=mf), got model={config.model!r}")
        self.config, self.target, self.num_examples, self.seed = config, int(target), int(num_examples), seed
        self.pool, self.profile, self.fakes, self.fit_steps, self.norm = pool, profile, fakes, fit_steps, norm

    def fake_users(self, q: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """``fakes`` user vectors fitted to profiles of popular items, and their sampled-softmax
        loss (what the attacker reports as its training loss)."""
        n_items = len(b)
        others = np.flatnonzero(np.arange(n_items) != self.target)
        ranked = others[np.lexsort((rng.random(len(others)), -b[others]))]  # highest bias first, ties at random
        popular = ranked[: min(self.pool, len(ranked))]
        users, losses = [], []
        for _ in range(self.fakes):
            items = rng.choice(popular, size=min(self.profile, len(popular)), replace=False)
            p = self._fit(q, b, items)
            users.append(p)
            losses.append(self._sampled_loss(q, b, p, items, rng))
        return np.array(users), float(np.mean(losses))

    def _fit(self, q: np.ndarray, b: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The user vector that maximises the profile's mean log-likelihood under the full
        softmax (L2 as the devices use), by gradient ascent from zero."""
        p = np.zeros(q.shape[1])
        target_mean = q[items].mean(axis=0)
        step = 1.0 / max(float(np.max(np.sum(q * q, axis=1))), 1e-6)  # below 1/L of the log-softmax's curvature
        for _ in range(self.fit_steps):
            s = q @ p + b
            s -= s.max()
            w = np.exp(s)
            w /= w.sum()
            p += step * (target_mean - w @ q - self.config.l2 * p)
        return p

    def _sampled_loss(self, q, b, p, items, rng) -> float:
        negatives = rng.integers(0, len(b), size=(len(items), self.config.num_negatives))
        pos = q[items] @ p + b[items]
        neg = q[negatives] @ p + b[negatives]
        top = np.maximum(pos, neg.max(axis=1))
        return float(np.mean(top + np.log(np.exp(pos - top) + np.exp(neg - top[:, None]).sum(axis=1)) - pos))

    def update(self, shared: Mapping[str, np.ndarray], bound: float, attacker: int, server_round: int) -> tuple[dict, dict]:
        """The arrays a compromised device sends (``global + update`` in the shared dtype, the
        update within ``bound``) and its metrics."""
        rng = stream_rng(self.seed, attacker, server_round, Stream.ATTACK)
        q = np.asarray(shared["item_embedding.weight"], dtype=np.float64)
        b = np.asarray(shared["item_bias.weight"], dtype=np.float64).reshape(-1)
        users, loss = self.fake_users(q, b, rng)
        gradient = np.append(users.mean(axis=0), 1.0)  # d/d(q_t, b_t) of the fake users' mean score
        length = float(np.linalg.norm(gradient))
        direction = gradient / length if length > 0 else np.append(np.zeros(q.shape[1]), 1.0)
        # The whole budget (a hair under it, so that the guard below only shaves float32 rounding).
        size = bound * (1.0 - 1e-6) if self.norm is None else min(self.norm, bound * (1.0 - 1e-6))
        update = {name: np.zeros_like(value) for name, value in shared.items()}
        update["item_embedding.weight"][self.target] = (size * direction[:-1]).astype(update["item_embedding.weight"].dtype)
        update["item_bias.weight"][self.target, 0] = size * direction[-1]
        sent, norm, clipped = encode_update(dict(shared), update, bound)
        # What an honest device would report of such an update (fedpref.models.wire).
        metrics = training_metrics(self.config, examples=self.num_examples, loss=loss, norm=float(norm), clipped=bool(clipped))
        return sent, metrics


# -- the grid ---------------------------------------------------------------------------------


class PoisonGrid(EngineGrid):
    """A Flower ``Grid`` around an engine's grid: training messages to the ``compromised``
    devices are answered with ``attack``'s crafted reply, their evaluation messages with an
    error (they do not evaluate); everything else goes to ``inner``. What the server asks of a
    grid (:class:`fedpref.server.grid.EngineGrid`: ``partial_aggregates``, ``device_keys``,
    ``ordered_node_ids``, ``device_states``) is the inner grid's: the partial aggregates the inner grid sends are its own, the
    crafted replies are single devices' replies.

    ``silent``: devices that do not evaluate (default: the compromised ones; a sweep passes the
    same set to every run so that every run's test HR@10 covers the same users).
    ``record_norms``: keep the L2 norm of every honest update as the server receives it
    (``honest_norms``; with the fast engine's partial aggregates it needs ``FastGrid(...,
    keep_updates=True)``, which keeps every device's dense update of every round in
    ``FastGrid.updates``, about 4.7 MB a device on movielens-small): this grid drops each
    round's once it has read them, unless ``keep_inner_updates``."""

    def __init__(self, inner: EngineGrid, config: FederatedConfig, compromised: Iterable[int], attack: TargetBoost | None, *,
                 silent: Iterable[int] | None = None, record_norms: bool = False, keep_inner_updates: bool = False) -> None:
        if config.secagg:
            raise RunConfigError("the poisoning simulation crafts plain replies: run it without secagg")
        self.inner = inner
        self.config = config
        self.compromised = frozenset(int(u) for u in compromised)
        if self.compromised and attack is None:
            raise ValueError("compromised devices need an attack to send")
        self.attack = attack
        self.silent = self.compromised if silent is None else frozenset(int(u) for u in silent) | self.compromised
        self.record_norms = record_norms
        self.keep_inner_updates = keep_inner_updates
        self.honest_norms: list[float] = []
        self.crafted: dict[int, int] = {}  # round -> crafted replies sent
        self.private_snapshot: tuple[int, np.ndarray] | None = None  # (round, vectors) just before the latest evaluation

    @property
    def timings(self) -> list[dict]:
        """The inner engine's per-round timings (the fast engine's; none for another)."""
        return self.inner.timings if isinstance(self.inner, FastGrid) else []

    # -- what the server asks of every grid: the inner grid's ------------------------------
    @property
    def partial_aggregates(self) -> bool:  # type: ignore[override]
        return self.inner.partial_aggregates

    def device_keys(self) -> dict[int, int] | None:
        return self.inner.device_keys()

    def ordered_node_ids(self) -> list[int] | None:
        return self.inner.ordered_node_ids()

    def device_states(self) -> dict | None:
        return self.inner.device_states()

    def restore_device_states(self, states: dict) -> None:
        self.inner.restore_device_states(states)

    # -- the Grid interface -----------------------------------------------------------
    def set_run(self, run) -> None:  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        own: list[Message] = []
        passed: list[Message] = []
        shared_of: dict[int, dict[str, np.ndarray]] = {}
        for msg in messages:
            user = msg.metadata.dst_node_id - NODE_ID_BASE
            kind = msg.metadata.message_type
            if user in self.compromised and kind == MessageType.TRAIN and "arrays" in msg.content.array_records:
                key = id(msg.content)
                if key not in shared_of:
                    arrays = msg.content["arrays"]
                    shared_of[key] = {name: arrays[name].numpy() for name in arrays}
                own.append(self._crafted(msg, shared_of[key], user))
            elif user in self.silent and kind == MessageType.EVALUATE:
                own.append(self._error(msg, "declined: this device does not take part in federated evaluation"))
            else:
                passed.append(msg)
        if any(m.metadata.message_type == MessageType.EVALUATE for m in passed):
            rounds = [int(m.content["config"].get("server-round", 0)) for m in passed if m.metadata.message_type == MessageType.EVALUATE]
            self.private_snapshot = (max(rounds), self.private_vectors())
        replies = list(self.inner.send_and_receive(passed, timeout=timeout)) if passed else []
        trains = [m for m in passed if m.metadata.message_type == MessageType.TRAIN and "arrays" in m.content.array_records]
        if trains:
            self._after_training(trains, replies)
        return replies + own

    # -- the compromised devices -------------------------------------------------------
    def _crafted(self, msg: Message, shared: dict[str, np.ndarray], user: int) -> Message:
        config = msg.content["config"]
        server_round = int(config.get("server-round", 1))
        bound = self.config.clip_norm
        if self.config.dp and self.config.dp_clipping == "adaptive":
            bound = float(config[KEY_CLIPPING_NORM])
        sent, metrics = self.attack.update(shared, bound, user, server_round)
        self.crafted[server_round] = self.crafted.get(server_round, 0) + 1
        return reply_from(msg, training_content(sent, metrics))

    def _error(self, msg: Message, reason: str) -> Message:
        return reply_from(msg, Error(code=ATTACK_ERROR, reason=reason))

    # -- what the honest devices did ---------------------------------------------------
    def _after_training(self, sent: list[Message], replies: list[Message]) -> None:
        kept = self.inner.updates if isinstance(self.inner, FastGrid) else None
        server_round = int(sent[0].content["config"].get("server-round", 1))
        if self.record_norms:
            if isinstance(kept, dict) and server_round in kept:  # the fast engine: each device's update as the server recovers it
                for update in kept[server_round].values():
                    self.honest_norms.append(float(np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update.values()))))
            else:  # one reply per device: the update is what it sent minus what it got
                arrays = sent[0].content["arrays"]
                base = {name: arrays[name].numpy().astype(np.float64) for name in arrays}
                for reply in replies:
                    if reply.has_error() or PARTIAL_AGGREGATE in reply.content.config_records:
                        continue
                    got = reply.content["arrays"]
                    self.honest_norms.append(float(np.sqrt(sum(float(np.sum((got[n].numpy().astype(np.float64) - base[n]) ** 2)) for n in base))))
        if isinstance(kept, dict) and not self.keep_inner_updates:
            kept.pop(server_round, None)

    def private_vectors(self) -> np.ndarray:
        """Every device's private vector as its engine holds it now (a device never reached yet:
        its seeded first vector), one row per device."""
        from fedpref.client.device import initial_privates

        spec = self.config.model_spec
        inner = self.inner
        if isinstance(inner, FastGrid):  # the fast engine's PrivateVectors
            values = np.array(inner.private.values, dtype=np.float32)
            fresh = np.flatnonzero(~inner.private.ready)
            if len(fresh):
                values[fresh] = initial_privates(spec, self.config.seed, fresh)
            return values
        states = inner.device_states()
        if states is not None:  # the in-process engine: each device's context.state
            from fedpref.simulations.engines.device import PRIVATE_KEY

            n = len(states)
            values = initial_privates(spec, self.config.seed, np.arange(n))
            for node, state in states.items():
                if PRIVATE_KEY in state:
                    record = state[PRIVATE_KEY]
                    values[node - NODE_ID_BASE] = np.concatenate([record[name].numpy().ravel() for name in record])
            return values
        raise TypeError(f"cannot read the private vectors of a {type(inner).__name__}")


# -- the measure ----------------------------------------------------------------------------


def target_exposure(final_arrays: Mapping[str, np.ndarray], population_folder: str | Path, config: FederatedConfig, target: int,
                    excluded_users: Iterable[int], *, private: np.ndarray | None = None, server_round: int | None = None) -> dict:
    """How far the target reached: among the users not in ``excluded_users`` who never
    interacted with ``target`` (training, validation or test), the share whose top-k
    (``config.k``) over every item they have not trained on holds the target.

    Each user first refits their private vector to ``final_arrays`` as federated evaluation
    does: ``personalize-epochs`` passes from ``private`` (the vectors the engine's devices hold,
    one row per device), with the generator evaluation draws from in ``server_round``. Without
    ``private``, from each device's seeded first vector with the on-device default of
    ``max(personalize-epochs, 5)`` passes (:meth:`fedpref.client.Device.personalize`).

    Returns ``target-hr@k``, ``users`` (how many were measured), ``target-median-rank`` (the
    target's median 0-based rank among each user's candidates) and ``target``."""
    from fedpref.client.device import initial_privates, refit_private
    from fedpref.models.train import LocalData
    from fedpref.simulations.engines.compiled import LOSS_KINDS, device_round, unsupported
    from fedpref.simulations.engines.fast import Population

    pop = Population(str(population_folder))
    excluded = set(int(u) for u in excluded_users)
    q = np.ascontiguousarray(final_arrays["item_embedding.weight"], dtype=np.float32)
    bq = np.ascontiguousarray(final_arrays["item_bias.weight"], dtype=np.float32).reshape(-1)
    users = [u for u in range(pop.n_users) if u not in excluded and int(pop.val[u]) != target and int(pop.test[u]) != target
             and not np.any(pop.train_items(u) == target)]
    users_arr = np.array(users, dtype=np.int64)
    if private is None:
        start = initial_privates(config.model_spec, config.seed, users_arr) if len(users) else np.zeros((0, config.dim), np.float32)
        epochs, stream_round = max(config.personalize_epochs, 5), 0 if server_round is None else server_round
    else:
        start = np.asarray(private, dtype=np.float32)[users_arr]
        epochs, stream_round = config.personalize_epochs, config.num_server_rounds if server_round is None else server_round
    compiled = unsupported(config.model, config.optimizer, config.loss) is None
    if config.model != "mf":
        raise RunConfigError("target_exposure ranks with matrix factorisation (model=mf)")
    lr = config.train_config().lr
    refit = np.empty_like(start)
    for k, user in enumerate(users):
        items = pop.train_items(user)
        rng = stream_rng(config.seed, user, stream_round, Stream.EVALUATE)  # federated evaluation's generator
        if epochs < 1 or not len(items):
            refit[k] = start[k]
        elif compiled:
            refit[k] = device_round(rng, items, q, bq, start[k], epochs, lr, 0, lr, config.batch_size, config.num_negatives,
                                    config.l2, LOSS_KINDS[config.loss])[0]
        else:
            shared = {"item_embedding.weight": q, "item_bias.weight": bq.reshape(-1, 1)}
            params = {"user_embedding.weight": start[k].reshape(1, -1)}
            refit[k] = refit_private(config, shared, params, LocalData.for_device(items, pop.n_items), epochs, rng)["user_embedding.weight"].ravel()
    ranks = np.empty(len(users), dtype=np.int64)
    for lo in range(0, len(users), 1024):
        scores = refit[lo : lo + 1024].astype(np.float64) @ q.T.astype(np.float64) + bq.astype(np.float64)
        for j, user in enumerate(users[lo : lo + 1024]):
            row = scores[j]
            row[pop.train_items(user)] = -np.inf  # candidates: every item the user has not trained on
            ranks[lo + j] = int(np.sum(row > row[target]))
    k = config.k
    return {
        "target": int(target),
        f"target-hr@{k}": float(np.mean(ranks < k)) if len(users) else float("nan"),
        "users": len(users),
        "target-median-rank": float(np.median(ranks)) if len(users) else float("nan"),
    }


# -- runs and the sweep ---------------------------------------------------------------------


def defence_overrides(defence: str, norm_bound: float | None = None) -> dict:
    """The run-config keys of a defence."""
    if defence == "none":
        return {}
    if defence in ("median", "trimmed-mean"):
        return {"aggregation": defence}
    if defence == "norm-bound":
        if not norm_bound or norm_bound <= 0:
            raise ValueError("the norm-bound defence needs a positive bound")
        return {"server-norm-bound": float(norm_bound)}
    raise ValueError(f"unknown defence {defence!r}; choose from {', '.join(DEFENCES)}")


def run_values(folder: Path, base_run_config: Mapping[str, object], defence: str, norm_bound: float | None, seed: int,
               results_dir: str | Path) -> dict:
    """The run config of one run of the sweep: ``base_run_config``, the population, the seed,
    the results folder and the defence's keys; no checkpoints (the attack's own state is not
    checkpointed, so a resumed run would not be the same attack)."""
    values = {"checkpoint-dir": "none", **dict(base_run_config), "history-dir": str(folder), "seed": seed,
              "results-dir": str(Path(results_dir).resolve()), **defence_overrides(defence, norm_bound)}
    return values


def _median_history(population_folder: str | Path) -> int:
    indptr = np.load(Path(population_folder) / "train_indptr.npy")
    return max(1, int(np.median(np.diff(indptr))))


def run_attack(population_folder: str | Path, base_run_config: Mapping[str, object], attack_fraction: float, defence: str, target: int,
               seed: int, results_dir: str | Path, *, norm_bound: float | None = None, engine: str = "fast", threads: int | None = None,
               silent_fraction: float | None = None, record_norms: bool = False, attack_options: Mapping[str, object] | None = None,
               hooks=None) -> dict:
    """One federated run with ``attack_fraction`` of the devices compromised, pushing ``target``,
    under ``defence`` (``norm-bound`` needs ``norm_bound``). ``silent_fraction``: the devices
    compromised at this (larger) fraction neither evaluate nor count in the target's measure
    (default: ``attack_fraction``), so that runs at several fractions measure the same users.
    ``record_norms``: also return the honest updates' norms (``honest-norms``: quantiles).
    ``hooks``: the server's listeners of this run (fedpref.server.app.ServerHooks). Writes the server's results and ``attack.json`` to ``results_dir``; returns the row."""
    folder = Path(population_folder).resolve()
    n_users = int(json.loads((folder / "meta.json").read_text())["n_users"])
    config = FederatedConfig.from_run_config(run_values(folder, base_run_config, defence, norm_bound, seed, results_dir))
    compromised = compromised_devices(n_users, attack_fraction, seed)
    silent = compromised_devices(n_users, max(attack_fraction, silent_fraction or 0.0), seed)
    attack = TargetBoost(config, target, _median_history(folder), seed=seed, **dict(attack_options or {})) if len(compromised) else None
    started = time.perf_counter()
    if engine == "fast":
        from fedpref.simulations.engines.fast import run_fast

        inner = FastGrid(config, threads=threads, keep_updates=record_norms)
        grid = PoisonGrid(inner, config, compromised, attack, silent=silent, record_norms=record_norms)
        result = run_fast(config, grid=grid, hooks=hooks)  # type: ignore[arg-type]
    elif engine == "inprocess":
        from fedpref.simulations.engines.inprocess import run_inprocess

        grid = _inprocess_grid(config, n_users, compromised, attack, silent, record_norms)
        result = run_inprocess(config, n_devices=n_users, grid=grid, hooks=hooks)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose fast or inprocess")
    seconds = time.perf_counter() - started
    final = dict(np.load(Path(config.results_dir) / "final_model.npz"))
    snapshot_round, private = grid.private_snapshot if grid.private_snapshot is not None else (None, None)
    last_round = result["rounds"][-1]["round"] if result["rounds"] else 0
    if snapshot_round != last_round:  # no evaluation after the last round: the vectors as the run left them
        snapshot_round, private = last_round, grid.private_vectors()
    exposure = target_exposure(final, folder, config, target, silent, private=private, server_round=snapshot_round)
    rows = result["rounds"]
    chosen = result.get("chosen", {})
    last = next((r for r in reversed(rows) if "test-hr" in r), {})
    row = {
        "fraction": attack_fraction,
        "defence": defence,
        "target": int(target),
        "target-hr": exposure[f"target-hr@{config.k}"],
        "target-users": exposure["users"],
        "target-median-rank": exposure["target-median-rank"],
        "test-hr": chosen.get("test-hr"),
        "test-full-hr": chosen.get("test-full-hr"),
        "chosen-round": result.get("chosen_round"),
        "final-test-hr": last.get("test-hr"),
        "final-test-full-hr": last.get("test-full-hr"),
        "rejected": int(sum(r.get("rejected", 0) for r in rows)),
        "rejected-in-attack-rounds": int(sum(r.get("rejected", 0) for r in rows if grid.crafted.get(r["round"]))),
        "attackers": int(len(compromised)),
        "crafted": int(sum(grid.crafted.values())),
        "attack-rounds": int(sum(1 for v in grid.crafted.values() if v)),
        "seconds": round(seconds, 2),
        "global-dtype": str(final["item_embedding.weight"].dtype),
    }
    if defence == "norm-bound":
        row["norm-bound"] = float(norm_bound)  # type: ignore[arg-type]
    if record_norms and grid.honest_norms:
        norms = np.array(grid.honest_norms)
        row["honest-norms"] = {"count": int(len(norms)), "clip-norm": config.clip_norm,
                               **{f"q{int(q * 100)}": float(np.quantile(norms, q)) for q in NORM_QUANTILES}}
    (Path(config.results_dir) / "attack.json").write_text(json.dumps({"run-config": config.to_run_config(), "attack": _attack_key(
        attack_fraction, defence, target, seed, norm_bound, silent_fraction, attack_options, engine), "row": row}, indent=2) + "\n")
    return row


def _attack_key(fraction, defence, target, seed, norm_bound, silent_fraction, attack_options, engine) -> dict:
    return {"fraction": fraction, "defence": defence, "target": int(target), "seed": seed, "norm-bound": norm_bound,
            "silent-fraction": silent_fraction, "options": dict(attack_options or {}), "engine": engine}


def _inprocess_grid(config: FederatedConfig, n_users: int, compromised, attack, silent, record_norms) -> PoisonGrid:
    from fedpref.simulations.engines.device import app as client_app

    from fedpref.simulations.engines.inprocess import InProcessGrid

    inner = InProcessGrid(client_app, n_users, config.to_run_config())
    return PoisonGrid(inner, config, compromised, attack, silent=silent, record_norms=record_norms)


def _folder_name(fraction: float, defence: str) -> str:
    return f"f{fraction * 100:g}pct-{defence}"


def poison_sweep(population_folder: str | Path, base_run_config: Mapping[str, object], out: str | Path, *,
                 fractions: Sequence[float] = FRACTIONS, defences: Sequence[str] = DEFENCES, target: int | None = None, seed: int = 0,
                 engine: str = "fast", threads: int | None = None, norm_bound: float | None = None, norm_quantile: float = 0.5,
                 on_run: Callable[[dict], None] | None = None, rerun: bool = False, attack_options: Mapping[str, object] | None = None) -> dict:
    """Every attack fraction under every defence, on one population, one target (default:
    :func:`choose_target`) and one seed. The clean run without a defence comes first: it gives
    the target's hit rate without an attack and, unless ``norm_bound`` is given, the norm-bound
    defence's bound (the ``norm_quantile`` quantile of its honest updates' norms). Devices
    compromised at the largest fraction evaluate in no run and are left out of every run's
    measure, so that every row covers the same users.

    Writes ``out``/sweep.json (rows and settings), sweep.md (the table) and sweep.png, and one
    folder per run (reused when it holds the same run, unless ``rerun``). Returns the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(population_folder).resolve()
    meta = json.loads((folder / "meta.json").read_text())
    unknown = [d for d in defences if d not in DEFENCES]
    if unknown:
        raise ValueError(f"unknown defence(s) {unknown}; choose from {', '.join(DEFENCES)}")
    if norm_quantile not in NORM_QUANTILES:
        raise ValueError(f"norm_quantile must be one of {', '.join(f'{q:g}' for q in NORM_QUANTILES)}, got {norm_quantile}")
    fractions = sorted(set(float(f) for f in fractions))
    target = choose_target(folder, seed) if target is None else int(target)
    counts = item_counts(folder)
    silent_fraction = max(fractions)
    runs = [(f, d) for d in defences for f in fractions]
    clean = (0.0, "none")
    if clean in runs:
        runs.remove(clean)
    runs.insert(0, clean)  # always: the reference, and the honest norms
    rows: list[dict] = []
    honest_norms = None
    for fraction, defence in runs:
        bound = None
        if defence == "norm-bound":
            bound = norm_bound if norm_bound else (honest_norms or {}).get(f"q{int(norm_quantile * 100)}")
            if bound is None:
                raise ValueError("the norm-bound defence needs --norm-bound or the clean run's honest norms")
        run_dir = out / _folder_name(fraction, defence)
        key = _attack_key(fraction, defence, target, seed, bound, silent_fraction, attack_options, engine)
        row = _reusable(run_dir, base_run_config, folder, seed, defence, bound, key) if not rerun else None
        if row is None:
            row = run_attack(folder, base_run_config, fraction, defence, target, seed, run_dir, norm_bound=bound, engine=engine,
                             threads=threads, silent_fraction=silent_fraction, record_norms=(fraction, defence) == clean,
                             attack_options=attack_options)
        if (fraction, defence) == clean:
            honest_norms = row.get("honest-norms")
        rows.append(row)
        if on_run:
            on_run(row)
    rows.sort(key=lambda r: (list(defences).index(r["defence"]) if r["defence"] in defences else -1, r["fraction"]))
    used_bound = next((r["norm-bound"] for r in rows if "norm-bound" in r), None)
    report = {
        "population": str(folder),
        "dataset": meta.get("name", folder.name),
        "devices": int(meta["n_users"]),
        "items": int(meta["n_items"]),
        "target": target,
        "target-interactions": int(counts[target]),
        "target-popularity-rank": int(np.sum(counts > counts[target])),
        "seed": seed,
        "engine": engine,
        "run-config": dict(base_run_config),
        "attackers": {f"{f:g}": int(len(compromised_devices(int(meta["n_users"]), f, seed))) for f in fractions},
        "silent-devices": int(len(compromised_devices(int(meta["n_users"]), silent_fraction, seed))),
        "norm-bound": used_bound,
        "norm-bound-from": None if used_bound is None else ("given" if norm_bound else f"q{int(norm_quantile * 100)} of the clean run's honest update norms"),
        "honest-norms": honest_norms,
        "rows": rows,
        "seconds": round(sum(r["seconds"] for r in rows), 1),
    }
    (out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "sweep.md").write_text(markdown_table(report) + "\n")
    plot_poison(report, out / "sweep.png")
    return report


def _reusable(run_dir: Path, base, folder, seed, defence, bound, key) -> dict | None:
    done = run_dir / "attack.json"
    if not done.exists():
        return None
    try:
        config = FederatedConfig.from_run_config(run_values(folder, base, defence, bound, seed, run_dir)).to_run_config()
        saved = json.loads(done.read_text())
    except (ValueError, json.JSONDecodeError):
        return None
    return saved["row"] if saved.get("run-config") == config and saved.get("attack") == key else None


DEFENCE_LABELS = {"none": "no defence (mean)", "median": "median (FedMedian)", "trimmed-mean": "trimmed mean (FedTrimmedAvg)",
                  "norm-bound": "server norm bound"}


def markdown_table(report: dict) -> str:
    """The sweep as a markdown table."""
    bound = f", bound {report['norm-bound']:.3g} ({report['norm-bound-from']})" if report.get("norm-bound") else ""
    lines = [
        f"Target item {report['target']} ({report['target-interactions']} interactions, popularity rank {report['target-popularity-rank']:,} "
        f"of {report['items']:,}); {report['devices']:,} devices, of which {report['silent-devices']} (the most compromised in any run) "
        f"neither evaluate nor count in the target's measure{bound}.",
        "",
        "| attackers | defence | target HR@10 | median rank of target | test HR@10 | test full HR@10 | rejected | crafted replies | seconds |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['fraction']:.0%} ({r['attackers']}) | {r['defence']} | {r['target-hr']:.4f} | {r['target-median-rank']:,.0f} | "
            f"{_fmt(r['test-hr'])} | {_fmt(r['test-full-hr'])} | {r['rejected']} | {r['crafted']} | {r['seconds']:,.0f} |"
        )
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def plot_poison(report: dict, path: Path) -> None:
    """Left: the target's hit rate against the attack fraction, a line per defence; right: the
    honest users' test HR@10 (the chosen round), the cost of each defence and attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    defences = list(dict.fromkeys(r["defence"] for r in report["rows"]))
    clean = next((r for r in report["rows"] if r["fraction"] == 0 and r["defence"] == "none"), None)
    for defence in defences:
        mine = sorted((r for r in report["rows"] if r["defence"] == defence), key=lambda r: r["fraction"])
        xs = [100 * r["fraction"] for r in mine]
        label = DEFENCE_LABELS.get(defence, defence)
        if defence == "norm-bound" and report.get("norm-bound"):
            label += f" ({report['norm-bound']:.3g})"
        left.plot(xs, [r["target-hr"] for r in mine], "o-", label=label)
        right.plot(xs, [r["test-hr"] if r["test-hr"] is not None else float("nan") for r in mine], "o-", label=label)
    left.set_xlabel("compromised devices (%)")
    left.set_ylabel("target HR@10 of honest users")
    left.set_ylim(-0.02, 1.02)
    left.set_title(f"share of honest users with item {report['target']} ({report['target-interactions']} interactions) in their top 10", fontsize=9)
    right.set_xlabel("compromised devices (%)")
    right.set_ylabel("test HR@10 (sampled, chosen round)")
    if clean is not None and clean["test-hr"] is not None:
        right.axhline(clean["test-hr"], color="grey", ls=":", lw=1, label=f"clean, no defence: {clean['test-hr']:.3f}")
    right.set_title("honest users' accuracy: what each defence costs", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{report['dataset']}: {report['devices']:,} devices, model poisoning of one item", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
