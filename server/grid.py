"""The grids the ServerApp runs on, with one interface.

:class:`EngineGrid` is a Flower ``Grid`` with what the server asks of every grid as methods
with defaults: the devices' stable keys, the node ids in key order, the devices' own state
for the checkpoint, and whether replies may be partial aggregates. An engine that plays its
devices in this process (the in-process, fast and poisoning grids) subclasses it and overrides
what it knows; :class:`FlowerGrid` wraps the grid Flower hands a ServerApp (a SuperLink's, or
the Simulation Engine's) with the defaults: keys are asked of the devices by message.

:class:`GridView` is a wrapper that passes the Flower ``Grid`` interface on (the server's
:class:`StableGrid`, and the secure aggregation grids of :mod:`fedpref.server.secure`).
:class:`StableGrid` is the server's view of an :class:`EngineGrid`: node ids in a stable order
(by each device's key) and every exchange shown to the run's observers. The cohorts are drawn
by a :class:`CohortSampler` (a seeded or OS-entropy generator) that the strategy is given, so
that the same seed picks the same devices in every run. (Flower samples with the global
``random``, which other threads of the Simulation Engine's process draw from too.)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpref.models.config import FederatedConfig
from fedpref.models.participation import may_train

DEVICE_KEY_LIMIT = 2**63  # a device's key: a whole number from 0 to 2**63 - 1 (what a ConfigRecord's int holds)

Exchange = Callable[[list[Message], list[Message]], None]  # (messages sent, replies received)


class EngineGrid(Grid):
    """A Flower ``Grid`` with the capabilities the server uses, each with its default.

    The Flower boilerplate of a grid without a SuperLink (``set_run``, ``run``,
    ``create_message``) is here; ``push_messages``/``pull_messages`` default to refusing (an
    engine that answers whole exchanges implements ``send_and_receive`` only)."""

    partial_aggregates = False  # replies may stand for many devices: only a grid that computes them itself says so

    # -- what the server asks of every grid ---------------------------------------------
    def device_keys(self) -> dict[int, int] | None:
        """Each node's stable key, if this grid knows them without asking (None: ask the
        devices by message, :func:`ask_device_keys`)."""
        return None

    def ordered_node_ids(self) -> list[int] | None:
        """The node ids already in the order of the devices' keys, or None (the server sorts)."""
        return None

    def device_states(self) -> dict | None:
        """What the devices this grid plays keep between rounds, for the server's checkpoint
        (None: real devices keep their own state)."""
        return None

    def restore_device_states(self, states: dict) -> None:
        """Give the devices back the state :meth:`device_states` returned (default: nothing to do)."""

    # -- the Flower Grid interface, for a grid without a SuperLink -----------------------
    def set_run(self, run) -> None:  # noqa: D102 - nothing to set in-process
        pass

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError(f"the {type(self).__name__} has no SuperLink run")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError(f"the {type(self).__name__} answers whole exchanges: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError(f"the {type(self).__name__} answers whole exchanges: use send_and_receive")


class GridView(Grid):
    """A Grid that passes the whole Flower ``Grid`` interface to the grid it wraps
    (``self._grid``); a wrapper overrides what it changes (most often ``send_and_receive``)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:  # noqa: D102
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: D102
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class FlowerGrid(GridView, EngineGrid):
    """The grid Flower hands a ServerApp (a SuperLink's, or the Simulation Engine's), with the
    :class:`EngineGrid` defaults: its devices are asked for their keys by message, keep their
    own state, and each reply stands for one device."""


def engine_grid(grid: Grid) -> EngineGrid:
    """``grid`` with the :class:`EngineGrid` interface (a grid Flower made is wrapped)."""
    return grid if isinstance(grid, EngineGrid) else FlowerGrid(grid)


class CohortsExhausted(RuntimeError):
    """Too few devices may still train to draw a round's whole cohort (run-config
    ``dp-max-participations``): the run ends before that round."""


class CohortSampler:
    """Draws each round's cohort from its own generator (seeded, or the OS's under DP: see
    :meth:`fedpref.server.privacy.NoiseSource.sampler`), over the node ids in their stable order.

    With a participation cap (run-config ``dp-max-participations``, the rule of
    :mod:`fedpref.models.participation`) it counts, for each node, the training rounds it was
    asked to join (at least the rounds it joined: a device that dropped out counts too), and
    draws a training cohort only from the nodes the rule still lets train, so that a capped
    device's refusal never makes a round smaller than the cohort the accounting assumes. When
    fewer such nodes remain than a cohort needs, it raises :class:`CohortsExhausted` rather than
    draw a smaller cohort."""

    def __init__(self, rng: random.Random, config: FederatedConfig | None = None) -> None:
        self.rng = rng
        self.config = config
        self._joined: dict[int, list[int]] = {}  # node -> [training rounds asked, the latest of them]

    @property
    def capped(self) -> bool:
        return self.config is not None and self.config.dp_max_participations > 0

    def sample(self, grid: Grid, min_available_nodes: int, sample_size: int, *, training_round: int | None = None) -> tuple[list[int], list[int]]:
        """(the cohort, every node id), waiting until at least ``min_available_nodes`` (and
        ``sample_size``) devices are connected, as Flower's ``sample_nodes`` does.
        ``training_round``: the cohort is that training round's (the participation cap applies
        and the draw is counted); None for any other cohort (evaluation, the popularity
        histogram)."""
        ids = list(grid.get_node_ids())
        while len(ids) < max(min_available_nodes, sample_size):
            time.sleep(1)
            ids = list(grid.get_node_ids())
        if training_round is None or not self.capped:
            return self.rng.sample(ids, sample_size), ids
        config = self.config
        blocked = {node for node, (count, last) in self._joined.items() if not may_train(config, training_round, count, last)}
        eligible = [node for node in ids if node not in blocked] if blocked else ids
        if len(eligible) < sample_size:
            raise CohortsExhausted(
                f"round {training_round} needs a cohort of {sample_size} devices, but only {len(eligible)} of {len(ids)} may still train "
                f"(dp-max-participations = {config.dp_max_participations}{', one round in each window (dp-mechanism = tree)' if config.dp_mechanism == 'tree' else ''}); "
                "the accounting assumes whole cohorts, so the run ends after the rounds before it. Raise dp-max-participations, "
                "take fewer devices a round or fewer rounds, or add devices"
            )
        cohort = self.rng.sample(eligible, sample_size)
        for node in cohort:
            joined = self._joined.setdefault(node, [0, 0])
            if joined[1] != training_round:
                joined[0] += 1
                joined[1] = training_round
        return cohort, ids

    def rounds_joined(self, node: int) -> tuple[int, int]:
        """(training rounds ``node`` was asked to join, the latest of them; 0 for none)."""
        count, last = self._joined.get(node, (0, 0))
        return count, last

    def participation_state(self) -> dict | None:
        """The counts for the server's checkpoint (None without a cap)."""
        if not self.capped:
            return None
        nodes = np.array(sorted(self._joined), dtype=np.int64)
        return {"nodes": nodes, "count": np.array([self._joined[n][0] for n in nodes.tolist()], dtype=np.int64),
                "last": np.array([self._joined[n][1] for n in nodes.tolist()], dtype=np.int64)}

    def restore_participation(self, state: dict) -> None:
        """Take back the counts :meth:`participation_state` gave (a resumed run)."""
        nodes, count, last = (np.asarray(state[k], dtype=np.int64) for k in ("nodes", "count", "last"))
        if not len(nodes) == len(count) == len(last):
            raise ValueError("the participation counts do not line up with their nodes")
        self._joined = {int(n): [int(c), int(r)] for n, c, r in zip(nodes, count, last)}


class StableGrid(GridView):
    """The server's view of an :class:`EngineGrid`: node ids in a stable order (by each
    device's key, :func:`ask_device_keys`; devices without a usable key after those with one,
    by node id), and every exchange shown to ``observers``. ``sampler`` draws the cohorts."""

    def __init__(self, grid: EngineGrid, order: dict[int, int], sampler: CohortSampler,
                 observers: Sequence[Exchange] = ()) -> None:
        super().__init__(grid)
        self._order = order
        self.sampler = sampler
        self._observers = tuple(observers)

    @property
    def engine(self) -> EngineGrid:
        return self._grid

    def sample_cohort(self, min_available_nodes: int, sample_size: int) -> tuple[list[int], list[int]]:
        return self.sampler.sample(self, min_available_nodes, sample_size)

    def get_node_ids(self) -> list[int]:
        ordered = self._grid.ordered_node_ids()  # a grid that keeps its ids in key order (the fast engine's million)
        if ordered is not None:
            return ordered
        ids = list(self._grid.get_node_ids())
        return sorted(ids, key=lambda n: (0, self._order[n]) if n in self._order else (1, n))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for observer in self._observers:
            observer(messages, replies)
        return replies


def device_keys(grid: EngineGrid, expected: int, timeout: float = 600.0) -> dict[int, int]:
    """Each device's stable key: node id -> key, from the grid if it knows them
    (:meth:`EngineGrid.device_keys`), else asked of the devices (:func:`ask_device_keys`)."""
    keys = grid.device_keys()
    return ask_device_keys(grid, expected, timeout) if keys is None else keys


def ask_device_keys(grid: Grid, expected: int, timeout: float = 600.0) -> dict[int, int]:
    """Ask every device once for its stable key (its index in a simulation, a random number a
    real device keeps in its store): node id -> key, for the devices that gave a usable one.

    Each reply is a device's word, read as hostile: a reply that is an error, that carries no
    ConfigRecord ``device`` or whose ``key`` is not a whole number from 0 to 2**63 - 1 (an int;
    not a bool, a float or a string), is logged with the node id and left out; so are the
    devices that gave the same key (each of them). A device left out still takes part: it is
    ordered after the devices with a key, by node id (:class:`StableGrid`)."""
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
