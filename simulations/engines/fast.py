"""The fast engine: fedpref's ServerApp, with a whole cohort's devices computed in one go.

Flower's Simulation Engine runs every device as a ClientApp behind a message: the faithful
path, the code that runs on phones, at several milliseconds of overhead per device per round.
The fast engine keeps the server exactly as it is (the same ServerApp ``main``: strategy,
sampling, DP noise and accounting, run store, checkpoints, publishing) and replaces the devices
by :class:`FastGrid`, a Flower ``Grid`` that answers a round's training messages at once:

- each sampled device trains with :func:`fedpref.simulations.engines.compiled.device_round` (compiled; the
  same random draws as :func:`fedpref.client.device.local_round` from the same seeded
  generator, the same arithmetic), devices in parallel threads; a model or optimiser the
  compiled trainer does not cover runs ``local_round`` itself, device by device;
- each update is clipped as the device's guard clips it (:func:`fedpref.client.guard.encode_update`:
  the norm over the shared arrays, the scale, the float32 weights the server would receive);
- the devices' weights are summed into one **partial aggregate**: a single reply that stands for
  the cohort (their weighted average, the summed weight, and how many devices it covers), which
  the server's strategy aggregates like the replies it stands for
  (:data:`fedpref.models.wire.PARTIAL_AGGREGATE`);
- evaluation messages are answered the same way (:func:`fedpref.simulations.engines.compiled.device_evaluate`).

Simulated availability and dropout decline the same devices as on the Flower path, and so does
the participation cap (run-config ``dp-max-participations``, :mod:`fedpref.models.participation`:
each device's count of the training rounds it joined is a uint16, and its latest round an int32,
kept with the private vectors in the devices' state, so that a resumed run keeps them); stragglers
(run-config ``stragglers``) train but are left out when ``straggler-delay`` is past the round's
timeout, on a simulated clock. With a median, a trimmed mean or a server-side norm bound
(run-config ``aggregation``, ``server-norm-bound``) every device answers with its own reply, as
on the Flower path, since those need each update. Private
vectors live in one array (optionally a memory-mapped file, for populations of millions);
nothing else is kept per device. Not covered: secure aggregation, the update encodings and
device stores (run those on the Flower or the in-process engine; the fast engine says so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ctypes
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from fedpref.client.app import DECLINED
from fedpref.client.device import initial_privates, local_round
from fedpref.client.guard import encode_update
from fedpref.simulations.engines.availability import AvailabilityPattern
from fedpref.simulations.engines.device import answers_late, drops_out
from fedpref.simulations.engines.inprocess import NODE_ID_BASE, reply_from
from fedpref.simulations.engines.compiled import LOSS_KINDS, device_evaluate, device_round, unsupported
from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.models.participation import may_train
from fedpref.models.wire import (Stream, evaluation_content, evaluation_metrics, partial_training_metrics, stream_rng,
                                  training_content, training_metrics)
from fedpref.models.files import open_private, private_folder
from fedpref.models.train import LocalData
from fedpref.server.grid import EngineGrid

if TYPE_CHECKING:
    from fedpref.server.app import ServerHooks



def _keep_freed_memory() -> None:
    """Keep freed memory in the process (glibc): a device's round allocates a few buffers of
    100 KB to 1 MB, which glibc would otherwise map and unmap afresh for every device, paying a
    page fault for every page. Harmless elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: serve blocks up to 256 MB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _equal_weights(config: FederatedConfig) -> bool:
    """Whether every device weighs the same in the average (under DP, or run-config
    ``weighting=equal``), as the server weighs them; otherwise by its number of examples."""
    return config.dp or config.weighting == "equal"


def check_fast(config: FederatedConfig) -> None:
    """Refuse, before any work, what the fast engine does not compute."""
    if config.secagg:
        raise RunConfigError("the fast engine does not run secure aggregation: use --engine flower (or inprocess) with secagg")
    if config.update_encoding != "float32":
        raise RunConfigError(f"the fast engine sends float32 updates only: measure update-encoding={config.update_encoding} with --engine flower (or inprocess)")
    if config.store_dir:
        raise RunConfigError("the fast engine has no device stores: use --engine flower (or inprocess) with store-dir")
    if not config.history_dir:
        raise RunConfigError("the fast engine plays the devices of a population folder: set history-dir")


class Population:
    """The devices' histories: a population folder (``fedpref population``), memory-mapped."""

    def __init__(self, folder: str) -> None:
        path = Path(folder)
        if not (path / "meta.json").exists():
            raise RunConfigError(f"no population in {folder!r} (meta.json missing): write one with `fedpref population --out DIR`")
        self.meta = json.loads((path / "meta.json").read_text())
        self.n_users, self.n_items = int(self.meta["n_users"]), int(self.meta["n_items"])
        load = lambda name: np.load(path / f"{name}.npy", mmap_mode="r")  # noqa: E731
        self.indptr = np.asarray(load("train_indptr"), dtype=np.int64).copy()  # 8 bytes a device, in memory
        items = load("train_items")
        # A plain array over the mapped file: slicing it costs no memmap bookkeeping per device.
        self.items = np.asarray(items) if items.dtype == np.int64 else np.asarray(items, dtype=np.int64)
        self.val, self.test, self.negatives = load("val_item"), load("test_item"), load("negatives")

    def train_items(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]]


class PrivateVectors:
    """Every device's private vector, in one float32 array of (devices, dim): in memory, or
    memory-mapped from ``folder/private.npy`` (a million devices of dim 64 are 256 MB on disk,
    and only the pages of the devices a round touches are read). A device's first vector is
    drawn as the Flower path draws it (:func:`fedpref.client.device.initial_privates`)."""

    def __init__(self, config: FederatedConfig, n_devices: int, folder: str | None = None) -> None:
        self.config = config
        template = config.model_spec.build(1, 2, init=False).get_private()
        self.shapes = {name: value.shape[1:] for name, value in template.items()}  # per device
        dim = sum(int(np.prod(shape)) for shape in self.shapes.values())
        if folder:
            # every device's private vector: readable by its owner only (0600 in a 0700 folder)
            path = private_folder(folder) / "private.npy"
            open_private(path).close()  # created (or emptied) 0600 first; open_memmap keeps the mode
            self.values = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_devices, dim))
        else:
            self.values = np.zeros((n_devices, dim), dtype=np.float32)
        self.ready = np.zeros(n_devices, dtype=np.bool_)

    def get(self, users: np.ndarray) -> np.ndarray:
        """The private vectors of ``users`` (drawn the first time a device is asked for)."""
        new = users[~self.ready[users]]
        if len(new):
            self.values[new] = initial_privates(self.config.model_spec, self.config.seed, new)
            self.ready[new] = True
        return np.asarray(self.values[users])

    def set(self, users: np.ndarray, values: np.ndarray) -> None:
        self.values[users] = values

    def as_params(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """One device's row as its private arrays (what ``local_round`` takes)."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            out[name] = np.asarray(row[start : start + size], dtype=np.float32).reshape((1, *shape))
            start += size
        return out

    def as_row(self, params: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(params[name], dtype=np.float32).ravel() for name in self.shapes])

    def state(self) -> dict:
        return {"values": np.asarray(self.values).copy(), "ready": self.ready.copy()}

    def restore(self, state: dict) -> None:
        self.values[:] = state["values"]
        self.ready[:] = state["ready"]


class FastGrid(EngineGrid):
    """A Flower ``Grid`` whose devices are computed in-process, a cohort at a time.

    It answers with partial aggregates (``partial_aggregates``: the ServerApp accepts them only
    from a grid that says so, never from the network).

    ``threads`` devices train at once (default: the machine's cores). ``private_dir``
    memory-maps the private vectors. ``keep_updates`` keeps every device's update as the
    server would recover it (``{round: {device: {name: array}}}``, dense: for tests)."""

    partial_aggregates = True

    def __init__(self, config: FederatedConfig, *, threads: int | None = None, private_dir: str | None = None, keep_updates: bool = False) -> None:
        check_fast(config)
        _keep_freed_memory()
        self.config = config
        self.population = Population(config.history_dir)
        self.n = self.population.n_users
        self.private = PrivateVectors(config, self.n, private_dir)
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.compiled = unsupported(config.model, config.optimizer, config.loss) is None
        # A median, a trimmed mean or a server-side norm bound needs each device's update: then
        # every device answers with its own reply (as on the Flower path), not a partial aggregate.
        self.per_device = config.aggregation != "mean" or config.server_norm_bound > 0
        self.keep_updates = keep_updates  # (per-device replies keep this round's updates only, in the round's results)
        self.updates: dict[int, dict[int, dict[str, np.ndarray]]] = {}
        self.timings: list[dict] = []  # per training round: devices, seconds training, seconds in all
        self._ids = list(range(NODE_ID_BASE, NODE_ID_BASE + self.n))
        self._availability = AvailabilityPattern.parse(config.availability)
        # The participation cap: each device's training rounds joined, and the latest of them.
        self.capped = config.dp_max_participations > 0
        self.joined = np.zeros(self.n if self.capped else 0, dtype=np.uint16)
        self.last_joined = np.zeros(self.n if self.capped else 0, dtype=np.int32)

    # -- what the server asks of every grid (fedpref.server.grid.EngineGrid) --------------
    def get_node_ids(self) -> list[int]:
        return self._ids

    def ordered_node_ids(self) -> list[int]:
        """The node ids in the order of the devices' keys (fedpref.server.grid.StableGrid)."""
        return self._ids

    def device_keys(self) -> dict[int, int]:
        """Each node's stable key, without a query message per device."""
        return {node: node - NODE_ID_BASE for node in self._ids}

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies: list[Message] = []
        by_kind: dict[tuple[str, int], list[Message]] = {}
        for msg in messages:
            by_kind.setdefault((msg.metadata.message_type, id(msg.content)), []).append(msg)
        for (kind, _), group in by_kind.items():
            if kind == MessageType.TRAIN:
                reply = self._train(group, timeout)
                replies += reply if isinstance(reply, list) else [reply]
            elif kind == MessageType.EVALUATE:
                replies.append(self._evaluate(group))
            elif kind == MessageType.QUERY:
                replies += [self._reply(m, RecordDict({"device": ConfigRecord({"key": m.metadata.dst_node_id - NODE_ID_BASE})})) for m in group]
            else:
                replies += [self._error(m, f"the fast engine does not answer {kind!r} messages") for m in group]
        return replies

    def device_states(self) -> dict:
        states = self.private.state()
        if self.capped:
            states.update({"joined": self.joined.copy(), "last-joined": self.last_joined.copy()})
        return states

    def restore_device_states(self, states: dict) -> None:
        self.private.restore(states)
        if self.capped:
            if "joined" not in states or "last-joined" not in states:
                raise ValueError("the checkpoint holds no count of the devices' participations, which this capped run needs")
            self.joined[:] = states["joined"]
            self.last_joined[:] = states["last-joined"]

    # -- training -----------------------------------------------------------------
    def _train(self, group: list[Message], timeout: float | None = None) -> Message | list[Message]:
        started = time.perf_counter()
        config = self.config
        content = group[0].content
        server_round = int(content["config"].get("server-round", 1))
        bound = config.clip_norm
        if config.dp and config.dp_clipping == "adaptive":
            bound = float(content["config"][KEY_CLIPPING_NORM])
        arrays = content["arrays"]
        shared = {name: arrays[name].numpy() for name in arrays}
        users = np.array([m.metadata.dst_node_id - NODE_ID_BASE for m in group], dtype=np.int64)
        declined = np.array([self._declines(int(u), server_round) for u in users], dtype=np.bool_)
        training = users[~declined]
        # Stragglers train (their private vectors move) but answer after the round's timeout:
        # their updates are left out, as the Flower path's grid stops waiting for them.
        late = np.array([answers_late(config, int(u), server_round, timeout) for u in training], dtype=np.bool_)
        private = self.private.get(training)
        out = _Results(len(training), private.shape[1], late)
        queue = iter(range(0, len(training), 32))
        lock = threading.Lock()

        def batches():
            while True:
                with lock:
                    start = next(queue, None)
                if start is None:
                    return
                yield from range(start, min(start + 32, len(training)))

        worker = self._compiled_worker if self.compiled else self._generic_worker
        workers = min(self.threads, max(1, len(training)))
        if workers == 1:
            accumulators = [worker(batches, training, private, shared, server_round, bound, out)]
        else:
            with ThreadPoolExecutor(workers) as pool:
                futures = [pool.submit(worker, batches, training, private, shared, server_round, bound, out) for _ in range(workers)]
                accumulators = [f.result() for f in futures]
        trained = time.perf_counter()
        self.private.set(training[out.ok], out.private[out.ok])
        if self.capped:  # a device that trained has joined this round (a late one too: it sent its update)
            joined = training[out.ok & (self.last_joined[training] != server_round)]
            self.joined[joined] += 1
            self.last_joined[joined] = server_round
        ok = out.ok & ~late
        if self.keep_updates:
            self.updates[server_round] = {int(training[k]): out.kept[k] for k in np.flatnonzero(ok)}
        contributing = int(ok.sum())
        dropped = len(group) - contributing - int(late.sum())
        if self.per_device:
            return self._device_replies(group, training, ok, shared, out)
        if contributing == 0:  # every device declined, failed or was late: an error reply for each that answered
            answered = [m for m, u in zip(group, users) if u not in set(training[late].tolist())]
            return [self._error(m, f"no device of the cohort of {len(group)} could train in round {server_round}") for m in answered]
        weights = np.ones(contributing) if _equal_weights(config) else out.examples[ok].astype(np.float64)
        total = float(weights.sum())
        # What the devices' float32 weights average to (Flower's FedAvg averages weights).
        summed = {name: sum(a[name].astype(np.float64) for a in accumulators) / total for name in shared}
        average = {name: (shared[name].astype(np.float64) + summed[name]).astype(shared[name].dtype) for name in shared}
        metrics, partial = partial_training_metrics(config, weights, out.examples[ok], out.loss[ok], out.norm[ok], out.clipped[ok], dropped)
        content = training_content(average, metrics, partial)
        self.timings.append({"round": server_round, "devices": len(group), "train_seconds": trained - started, "seconds": time.perf_counter() - started})
        return self._reply(group[0], content)

    def _device_replies(self, group, training, ok, shared, out) -> list[Message]:
        """One reply per device, as on the Flower path: the weights it sends (``global + update``,
        float32), or an error for one that declined or failed; nothing from a late one."""
        config = self.config
        by_user = {int(u): k for k, u in enumerate(training)}
        replies = []
        for msg in group:
            user = msg.metadata.dst_node_id - NODE_ID_BASE
            k = by_user.get(user)
            if k is not None and out.late[k]:
                continue
            if k is None or not ok[k]:
                replies.append(self._error(msg, f"device {user} declined or failed"))
                continue
            kept = out.kept[k]
            weights = {name: (shared[name].astype(np.float64) + kept[name].reshape(shared[name].shape)).astype(shared[name].dtype) for name in shared}
            metrics = training_metrics(config, examples=int(out.examples[k]), loss=float(out.loss[k]), norm=float(out.norm[k]), clipped=bool(out.clipped[k]))
            replies.append(self._reply(msg, training_content(weights, metrics)))
        return replies

    def _compiled_worker(self, batches, training, private, shared, server_round, bound, out) -> dict[str, np.ndarray]:
        """Train devices with the compiled round, clip each update and add it to this thread's sum."""
        config = self.config
        q = np.ascontiguousarray(shared["item_embedding.weight"], dtype=np.float32)
        bq = np.ascontiguousarray(shared["item_bias.weight"], dtype=np.float32).reshape(-1)
        lr, refit_lr = config.train_config(server_round).lr, config.train_config().lr
        # Embedding | bias, in float32 as Flower's FedAvg sums weights (half the memory traffic of
        # float64); the sum is divided in float64.
        acc = np.zeros((q.shape[0], q.shape[1] + 1), dtype=np.float32)
        clipping = False  # whether the last update needed clipping (then measure before adding)
        equal = _equal_weights(config)
        for k in batches():
            user = int(training[k])
            items = self.population.train_items(user)
            rng = stream_rng(config.seed, user, server_round, Stream.TRAIN)
            p, rows, item_rows, bias_rows, loss, ok = device_round(
                rng, items, q, bq, private[k], config.private_epochs, refit_lr, config.local_epochs, lr,
                config.batch_size, config.num_negatives, config.l2, LOSS_KINDS[config.loss])
            if not ok:  # its loss diverged: local_update raises, the device sends an error
                continue
            out.private[k], out.loss[k], out.ok[k], out.examples[k] = p, loss, True, len(items)
            if out.late[k]:  # trained, but its update comes after the round is over
                continue
            weight = 1.0 if equal else float(len(items))
            if self.per_device:  # the update goes out alone (not into this thread's sum)
                alone = np.zeros(acc.shape)
                out.norm[k], out.clipped[k] = _clip_and_add(q, bq, rows, item_rows, bias_rows, np.float64(bound), 1.0, alone)
                out.kept[k] = {"item_embedding.weight": alone[:, :-1], "item_bias.weight": alone[:, -1:]}
                continue
            out.norm[k], out.clipped[k] = _clip_and_add(q, bq, rows, item_rows, bias_rows, np.float64(bound), np.float64(weight), acc, not clipping)
            clipping = bool(out.clipped[k])
            if self.keep_updates:  # this device's update alone, as the same kernel adds it
                alone = np.zeros(acc.shape)
                _clip_and_add(q, bq, rows, item_rows, bias_rows, np.float64(bound), 1.0, alone)
                out.kept[k] = {"item_embedding.weight": alone[:, :-1], "item_bias.weight": alone[:, -1:]}
        return {"item_embedding.weight": acc[:, :-1], "item_bias.weight": acc[:, -1:]}

    def _generic_worker(self, batches, training, private, shared, server_round, bound, out) -> dict[str, np.ndarray]:
        """Models the compiled round does not cover: the device's own ``local_round`` and guard."""
        config = self.config
        acc = {name: np.zeros(value.shape, dtype=np.float64) for name, value in shared.items()}
        equal = _equal_weights(config)
        for k in batches():
            user = int(training[k])
            items = self.population.train_items(user)
            rng = stream_rng(config.seed, user, server_round, Stream.TRAIN)
            try:
                update, new_private, metrics = local_round(config, shared, self.private.as_params(private[k]), items, self.population.n_items, rng, server_round)
            except FloatingPointError:
                continue
            out.private[k], out.loss[k], out.ok[k], out.examples[k] = self.private.as_row(new_private), metrics["loss"], True, len(items)
            if out.late[k]:
                continue
            sent, norm, clipped = encode_update(shared, update, bound)
            weight = 1.0 if equal else float(len(items))
            recovered = {name: sent[name].astype(np.float64) - shared[name].astype(np.float64) for name in shared}
            if not self.per_device:
                for name in shared:
                    acc[name] += weight * recovered[name]
            out.norm[k], out.clipped[k] = norm, clipped
            if self.keep_updates or self.per_device:
                out.kept[k] = recovered
        return acc

    def _declines(self, user: int, server_round: int) -> bool:
        """Whether the device says no this round: the participation cap, simulated availability,
        or a dropout."""
        config = self.config
        if self.capped and not may_train(config, server_round, int(self.joined[user]), int(self.last_joined[user])):
            return True
        return not self._availability.available(config.seed, user, server_round) or drops_out(config, user, server_round)

    # -- evaluation ---------------------------------------------------------------
    def _evaluate(self, group: list[Message]) -> Message:
        config = self.config
        content = group[0].content
        server_round = int(content["config"].get("server-round", 0))
        arrays = content["arrays"]
        shared = {name: arrays[name].numpy() for name in arrays}
        if self.compiled:
            q = np.ascontiguousarray(shared["item_embedding.weight"], dtype=np.float32)
            bq = np.ascontiguousarray(shared["item_bias.weight"], dtype=np.float32).reshape(-1)
        users = np.array([m.metadata.dst_node_id - NODE_ID_BASE for m in group], dtype=np.int64)
        private = self.private.get(users)
        ranks = np.zeros((len(users), 4), dtype=np.int64)
        ok = np.zeros(len(users), dtype=np.bool_)
        new_private = private.copy()
        pop = self.population
        lr = config.train_config().lr
        queue = iter(range(0, len(users), 32))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    start = next(queue, None)
                if start is None:
                    return
                for k in range(start, min(start + 32, len(users))):
                    user = int(users[k])
                    items = pop.train_items(user)
                    rng = stream_rng(config.seed, user, server_round, Stream.EVALUATE)
                    negatives = np.asarray(pop.negatives[user], dtype=np.int64)
                    if self.compiled:
                        p, r, good = device_evaluate(rng, items, q, bq, private[k], config.personalize_epochs, lr, config.batch_size,
                                                     config.num_negatives, config.l2, LOSS_KINDS[config.loss], int(pop.val[user]), int(pop.test[user]), negatives)
                    else:
                        p, r, good = _evaluate_locally(config, shared, self.private, private[k], items, pop, user, rng)
                    new_private[k], ranks[k], ok[k] = p, r, good

        with ThreadPoolExecutor(self.threads) as pool:
            for f in [pool.submit(worker) for _ in range(min(self.threads, max(1, len(users))))]:
                f.result()
        refit = config.personalize_epochs > 0
        if refit:
            self.private.set(users[ok], new_private[ok])
        if not ok.any():
            return self._error(group[0], f"no device could evaluate in round {server_round}")
        partial = {"devices": int(ok.sum()), "dropped": int((~ok).sum()), "weight": float(ok.sum())}
        return self._reply(group[0], evaluation_content(evaluation_metrics(ranks[ok], config.k), partial))

    # -- replies --------------------------------------------------------------------
    def _reply(self, msg: Message, content: RecordDict) -> Message:
        return reply_from(msg, content)

    def _error(self, msg: Message, reason: str) -> Message:
        return reply_from(msg, Error(code=DECLINED, reason=reason))


class _Results:
    """Per device of a cohort: what its training left (filled by the worker threads)."""

    def __init__(self, n: int, dim: int, late: np.ndarray | None = None) -> None:
        self.late = np.zeros(n, dtype=np.bool_) if late is None else late
        self.private = np.zeros((n, dim), dtype=np.float32)
        self.loss = np.full(n, np.nan)
        self.ok = np.zeros(n, dtype=np.bool_)
        self.examples = np.zeros(n, dtype=np.int64)
        self.norm = np.zeros(n)
        self.clipped = np.zeros(n, dtype=np.bool_)
        self.kept: dict[int, dict[str, np.ndarray]] = {}


def _evaluate_locally(config, shared, vectors, private, items, pop, user, rng):
    """Evaluation for a model the compiled evaluation does not cover (NeuMF): the ClientApp's own."""
    import torch

    from fedpref.simulations.engines.device import rank_locally
    from fedpref.client.device import refit_private
    from fedpref.simulations.engines.history import DeviceHistory

    params = vectors.as_params(private)
    if config.personalize_epochs > 0 and len(items):
        params = refit_private(config, shared, params, LocalData.for_device(items, pop.n_items), config.personalize_epochs, rng)
    model = config.model_spec.build(1, pop.n_items, init=False)
    model.set_shared(shared)
    model.set_private(params)
    scores = model.score_all(torch.zeros(1, dtype=torch.long))[0].numpy().astype(np.float64)
    history = DeviceHistory(user, pop.n_items, items, int(pop.val[user]), int(pop.test[user]), np.asarray(pop.negatives[user], dtype=np.int64))
    try:
        r = [*rank_locally(scores, history, "val", rng), *rank_locally(scores, history, "test", rng)]
    except ValueError:  # non-finite scores: the device's evaluation fails
        return vectors.as_row(params), np.zeros(4, dtype=np.int64), False
    return vectors.as_row(params), np.array(r, dtype=np.int64), True


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _scaled(value, base, factors, n_factors):  # pragma: no cover - compiled
    """The coordinate of the clipped update: ``value - base`` (float32), scaled by each of
    ``factors[:n_factors]`` in turn, in float32 (as the guard scales float32 arrays)."""
    u = np.float32(value - base)
    for i in range(n_factors):
        u = np.float32(u * np.float32(factors[i]))
    return u


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _recovered_norm(q, bq, rows, item_rows, bias_rows, factors, n_factors):  # pragma: no cover - compiled
    """The norm of what the server recovers: ``(base + clipped) in float32 - base``."""
    dim = q.shape[1]
    total = 0.0
    for k in range(rows.shape[0]):
        r = rows[k]
        for c in range(dim):
            d = np.float64(np.float32(q[r, c] + _scaled(item_rows[k, c], q[r, c], factors, n_factors))) - np.float64(q[r, c])
            total += d * d
        d = np.float64(np.float32(bq[r] + _scaled(bias_rows[k], bq[r], factors, n_factors))) - np.float64(bq[r])
        total += d * d
    return np.sqrt(total)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _add(q, bq, rows, item_rows, bias_rows, factors, n_factors, weight, acc):  # pragma: no cover - compiled
    """Add ``weight`` times what the server recovers of the update scaled by
    ``factors[:n_factors]`` (``(global + clipped)`` in float32, minus ``global``) to ``acc``."""
    dim = q.shape[1]
    for k in range(rows.shape[0]):
        r = rows[k]
        for c in range(dim):
            acc[r, c] += weight * (np.float64(np.float32(q[r, c] + _scaled(item_rows[k, c], q[r, c], factors, n_factors))) - np.float64(q[r, c]))
        acc[r, dim] += weight * (np.float64(np.float32(bq[r] + _scaled(bias_rows[k], bq[r], factors, n_factors))) - np.float64(bq[r]))


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _add_unclipped(q, bq, rows, item_rows, bias_rows, weight, acc):  # pragma: no cover - compiled
    """``_add`` of the update as it is, and in the same pass the squared norms of the float32
    update (``new - global``) and of the global rows it touches (sums in any order)."""
    dim = q.shape[1]
    total = 0.0
    base = 0.0
    for k in range(rows.shape[0]):
        r = rows[k]
        for c in range(dim):
            u = np.float32(item_rows[k, c] - q[r, c])
            d = np.float64(u)
            total += d * d
            base += np.float64(q[r, c]) * np.float64(q[r, c])
            acc[r, c] += weight * (np.float64(np.float32(q[r, c] + u)) - np.float64(q[r, c]))
        u = np.float32(bias_rows[k] - bq[r])
        d = np.float64(u)
        total += d * d
        base += np.float64(bq[r]) * np.float64(bq[r])
        acc[r, dim] += weight * (np.float64(np.float32(bq[r] + u)) - np.float64(bq[r]))
    return total, base


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _squares(q, bq, rows, item_rows, bias_rows):  # pragma: no cover - compiled
    """The squared norms of the float32 update (``new - global``) and of the global rows it
    touches (sums in any order): ``_add_unclipped``'s measuring alone, for updates that will
    be clipped (kept apart so that neither loop carries a branch that stops it vectorising)."""
    dim = q.shape[1]
    total = 0.0
    base = 0.0
    for k in range(rows.shape[0]):
        r = rows[k]
        for c in range(dim):
            d = np.float64(np.float32(item_rows[k, c] - q[r, c]))
            total += d * d
            base += np.float64(q[r, c]) * np.float64(q[r, c])
        d = np.float64(np.float32(bias_rows[k] - bq[r]))
        total += d * d
        base += np.float64(bq[r]) * np.float64(bq[r])
    return total, base


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _clip_and_add(q, bq, rows, item_rows, bias_rows, bound, weight, acc, optimistic=True):  # pragma: no cover - compiled
    """The device's guard (:func:`fedpref.client.guard.encode_update`) on a sparse update, and
    the server's sum: clip the update to ``bound`` (scale ``bound / norm * (1 - 1e-7)``), form
    the float32 weights ``global + clipped`` the device sends, shave them (``* bound / norm *
    (1 - 1e-6)``) until what the server recovers (weights - global) is within the bound, and add
    ``weight`` times that to ``acc`` (columns: the embedding, then the bias).
    Returns ``(norm before clipping, clipped)``.

    ``optimistic``: add the update in the pass that measures it, and take it out again if it
    needs clipping after all (one pass when clipping is rare, as without DP; the caller turns
    it off while updates come clipped)."""
    if optimistic:
        total, base = _add_unclipped(q, bq, rows, item_rows, bias_rows, weight, acc)
    else:
        total, base = _squares(q, bq, rows, item_rows, bias_rows)
    norm = np.sqrt(total)
    factors = np.zeros(21)
    n_factors = 0
    clipped = False
    if norm > bound:
        factors[0] = bound / norm * (1.0 - 1e-7)
        n_factors = 1
        clipped = True
    # Adding in float32 moves each recovered coordinate by at most 2**-24 (|global| + |update|):
    # when even that cannot take the norm past the bound, the guard's check passes at once.
    eps = 2.0**-24
    if clipped or norm * (1.0 + 2 * eps) + eps * np.sqrt(base) > bound * (1.0 - 1e-9):
        for _ in range(20):
            actual = _recovered_norm(q, bq, rows, item_rows, bias_rows, factors, n_factors)
            if actual <= bound:
                break
            factors[n_factors] = bound / actual * (1.0 - 1e-6)
            n_factors += 1
            clipped = True
    if optimistic and n_factors > 0:
        _add(q, bq, rows, item_rows, bias_rows, factors, 0, -weight, acc)  # take the unclipped update out
    if n_factors > 0 or not optimistic:
        _add(q, bq, rows, item_rows, bias_rows, factors, n_factors, weight, acc)
    return norm, clipped


def run_fast(config: FederatedConfig, *, threads: int | None = None, private_dir: str | None = None, grid: FastGrid | None = None,
             hooks: ServerHooks | None = None) -> dict:
    """Run ``config`` on the fast engine; returns the server's summary (what rounds.json
    holds, plus ``engine_seconds`` and the grid's per-round ``timings``). ``hooks``: the
    server's listeners of this run."""
    from fedpref.server.app import main as server_main

    if not config.results_dir:
        raise ValueError("set results_dir: the server writes its rounds there")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    grid = grid or FastGrid(config, threads=threads, private_dir=private_dir)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    run_config = config.to_run_config()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    start = time.perf_counter()
    result = server_main(grid, context, hooks).summary()
    result["engine_seconds"] = round(time.perf_counter() - start, 3)
    result["timings"] = grid.timings
    return result
