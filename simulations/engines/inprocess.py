"""An in-process engine: the same ServerApp and ClientApp, Flower messages, no Ray.

``InProcessGrid`` is a Flower ``Grid`` that delivers each message by calling the
``ClientApp`` directly in this process, with one ``Context`` per virtual device kept across
rounds (as the Simulation Engine keeps them). The server's strategy, sampling and
aggregation, the device's training, clipping and evaluation are exactly the code that runs on
the Simulation Engine and on real SuperNodes; what is left out is the transport (Ray actors,
the in-memory SuperLink and the serialisation between processes). It runs devices one after
another in one process, which on a small machine is several times faster than the Simulation
Engine for sweeps; a test checks that both give the same metrics for the same seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import copy
import logging
import time
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedpref.simulations.engines.device import SIMULATED_CLOCK, answers_late
from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.server.grid import EngineGrid

if TYPE_CHECKING:
    from fedpref.server.app import ServerHooks


NODE_ID_BASE = 1000  # device i (partition i) is node NODE_ID_BASE + i (in every engine that plays its devices)


def reply_from(msg: Message, content: RecordDict | Error) -> Message:
    """A reply to ``msg`` from the device it was sent to, as a SuperLink would deliver it."""
    reply = Message(content, reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
    return reply


class InProcessGrid(EngineGrid):
    """Deliver messages to ``n_devices`` virtual devices by calling ``client_app`` in-process.
    It does not know its devices' keys: the server asks them by message, as of real devices."""

    def __init__(self, client_app, n_devices: int, run_config: dict, *, run_id: int = 1, before_delivery=None) -> None:
        self._client_app = client_app
        self._before_delivery = before_delivery  # called with each message before its device gets it (tests use it to act between rounds)
        self._run_id = run_id
        # Node ids like the SuperLink's (any ints); partition ids 0..n-1 like the Simulation Engine's.
        self._contexts = {
            NODE_ID_BASE + i: Context(
                run_id=run_id,
                node_id=NODE_ID_BASE + i,
                node_config={"partition-id": i, "num-partitions": n_devices, SIMULATED_CLOCK: True},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(n_devices)
        }
        self._replies: dict[str, Message] = {}
        self._config = FederatedConfig.from_run_config(run_config)
        if self._config.secagg and self._config.stragglers > 0:
            raise RunConfigError(
                "stragglers under secure aggregation need a real clock (SecAgg+ waits secagg-timeout at each stage): "
                "run them on the Flower engine (fedpref simulate --engine flower)"
            )

    # -- the devices' own state, for the server's checkpoint (fedpref.server.checkpoint) --
    def device_states(self) -> dict[int, RecordDict]:
        """What each virtual device keeps between rounds (its private vector): a real device
        keeps it on the device; a simulation that plays the devices checkpoints it with the server."""
        return {node: copy.deepcopy(context.state) for node, context in self._contexts.items()}

    def restore_device_states(self, states: dict[int, RecordDict]) -> None:
        for node, state in states.items():
            if node in self._contexts:
                self._contexts[node].state = copy.deepcopy(state)

    # -- the Grid interface (set_run, run, create_message: EngineGrid's) ---------------
    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            message_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = message_id
            msg.metadata.__dict__["_run_id"] = self._run_id
            node = msg.metadata.dst_node_id
            # Each device gets its own copy, as after transport: a ClientApp (or a mod such as
            # SecAgg+'s) may change the content, and a server may send one content to many.
            # (Array data are immutable bytes: the copy does not copy them.)
            msg = copy.deepcopy(msg)
            if self._before_delivery is not None:
                self._before_delivery(msg, node - NODE_ID_BASE)
            try:
                reply = self._client_app(msg, self._contexts[node])
                reply.metadata.__dict__["_src_node_id"] = node
            except Exception as exc:  # a failing device is an error reply, not a crash of the run
                reply = reply_from(msg, Error(code=0, reason=f"{type(exc).__name__}: {exc}"))
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every device answers at once, on a simulated clock: a straggler (run-config
        ``stragglers``) still trains, but its reply comes ``straggler-delay`` seconds late and
        is not returned when that is past ``timeout``, as a SuperLink's grid stops waiting."""
        messages = list(messages)
        replies = list(self.pull_messages(self.push_messages(messages)))
        late = {
            msg.metadata.dst_node_id for msg in messages
            if msg.metadata.message_type == MessageType.TRAIN and "arrays" in msg.content.array_records
            and answers_late(self._config, msg.metadata.dst_node_id - NODE_ID_BASE, int(msg.content["config"].get("server-round", 1)), timeout)
        }
        return [r for r in replies if r.has_error() or r.metadata.src_node_id not in late]  # a dropout's error comes at once


def run_inprocess(config: FederatedConfig, *, n_devices: int, before_delivery=None, grid: Grid | None = None,
                  hooks: ServerHooks | None = None) -> dict:
    """Run ``config`` on ``n_devices`` in-process devices; returns the server's summary (what
    rounds.json holds). ``before_delivery(message, device_index)`` is called before each
    message is delivered. ``grid``: another grid to run the server on (one that wraps an
    ``InProcessGrid``). ``hooks``: the server's listeners of this run."""
    from fedpref.simulations.engines.device import app as client_app
    from fedpref.server.app import main as server_main

    if not config.results_dir:
        raise ValueError("set results_dir: the server writes its rounds there")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_config = config.to_run_config()
    # Messages take their run and sender from the process's task identity, as in run_simulation.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    grid = grid or InProcessGrid(client_app, n_devices, run_config, before_delivery=before_delivery)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    start = time.perf_counter()
    result = server_main(grid, context, hooks).summary()
    result["engine_seconds"] = round(time.perf_counter() - start, 3)
    return result
