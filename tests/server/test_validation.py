"""The server rejects malformed and out-of-bounds replies before aggregating, counts them per
round, and its model is as if they had never come (fedpref.server.validation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpref.client.guard import encode_update
from fedpref.models.federation import FederatedConfig
from fedpref.server.app import make_strategy
from fedpref.server.validation import check_evaluate_reply, check_train_reply, default_max_bytes
from fedpref.simulations.hostile import KINDS, malform, rebuilt, reply_message

C = 1.0
SHAPES = {"item_embedding.weight": (30, 4), "item_bias.weight": (30, 1)}


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in SHAPES.items()}


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages take their run and sender from the process's task identity, as in a ServerApp."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


_message = reply_message


def _honest(node: int, sent: dict, seed: int, *, scale: float = 3.0, examples: int = 5, dp: bool = False) -> Message:
    """What a device's guard sends: global + its update clipped to C (fedpref.client.guard)."""
    rng = np.random.default_rng(seed)
    update = {name: (rng.normal(0, scale / 10, a.shape)).astype(np.float32) for name, a in sent.items()}
    weights, _, _ = encode_update(sent, update, C)
    metrics = {"num-examples": 1} if dp else {"num-examples": examples, "train-loss": 0.5}
    return _message(node, RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}), "metrics": MetricRecord(metrics)}))


def _check(reply: Message, sent: dict, dp: bool = False) -> str | None:
    return check_train_reply(reply, sent, bound=C, max_bytes=default_max_bytes(sent), dp=dp)


# -- the hostile kit (fedpref.simulations.hostile), its choices drawn by hypothesis ---------

class HypothesisDraw:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def choice(self, options):
        return self.data.draw(st.sampled_from(list(options)))

    def integer(self, low, high):
        return self.data.draw(st.integers(low, high))

    def real(self, low, high):
        return self.data.draw(st.floats(low, high))


def _mutate(reply: Message, sent: dict, kind: str, data: st.DataObject) -> Message:
    return malform(reply, sent, kind, HypothesisDraw(data), bound=C)


def _aggregate(replies: list[Message], strategy_name: str, dp: bool = False) -> tuple[dict | None, dict]:
    """One round of fedpref's strategy over ``replies``: (new global arrays, what on_round saw)."""
    run_config = {"catalogue-size": 30, "devices": 8, "dim": 4, "clip-norm": C, "strategy": strategy_name}
    if dp:
        run_config["dp-noise-multiplier"] = 0.5
    config = FederatedConfig.from_run_config(run_config)
    seen: dict = {}
    strategy = make_strategy(config, 8, lambda r, info: seen.update(info))
    strategy._sent_global = _global()
    strategy._asked = len(replies)
    if hasattr(strategy, "current_arrays"):  # FedAdam keeps what it sent (configure_train would set it)
        strategy.current_arrays = _global()
    if dp:
        np.random.seed(0)
        strategy._round_clip = C
    arrays, _ = strategy.aggregate_train(1, replies)
    return (None if arrays is None else {k: arrays[k].numpy() for k in arrays}), seen


def test_replies_from_the_devices_guard_pass():
    sent = _global()
    for seed in range(20):
        assert _check(_honest(seed, sent, seed, scale=0.1 + seed), sent) is None
        assert _check(_honest(seed, sent, seed, dp=True), sent, dp=True) is None


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_malformed_reply_names_its_fault(kind):
    sent = _global()

    @given(data=st.data())
    @settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(data):
        bad = _mutate(_honest(9, sent, 1), sent, kind, data)
        assert _check(bad, sent) is not None

    check()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kinds=st.lists(st.sampled_from(list(KINDS)), min_size=1, max_size=4), honest=st.integers(1, 4),
       strategy_name=st.sampled_from(["fedavg", "fedadam"]))
def test_every_malformed_update_is_rejected_and_leaves_the_model_unchanged(data, kinds, honest, strategy_name):
    sent = _global()
    good = [_honest(n, sent, n) for n in range(honest)]
    bad = [_mutate(_honest(100 + i, sent, 100 + i), sent, kind, data) for i, kind in enumerate(kinds)]
    for reply in bad:
        assert _check(reply, sent) is not None
    order = list(data.draw(st.permutations(range(len(good) + len(bad))), label="order"))
    got, seen = _aggregate([(good + bad)[i] for i in order], strategy_name)
    # The honest replies alone, in the same order (a sum's rounding depends on its order).
    expected, _ = _aggregate([_honest(i, sent, i) for i in order if i < honest], strategy_name)
    assert seen["rejected"] == len(bad) and seen["replies"] == honest
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_under_dp_a_device_may_not_claim_more_weight():
    sent = _global()
    heavy = rebuilt(_honest(3, sent, 3, dp=True), metrics={"num-examples": 50})
    assert "under DP" in _check(heavy, sent, dp=True)
    _, seen = _aggregate([_honest(n, sent, n, dp=True) for n in range(3)] + [heavy], "fedavg", dp=True)
    assert seen["rejected"] == 1 and seen["replies"] == 3


def test_a_round_with_only_bad_replies_leaves_the_model_and_says_so():
    sent = _global()
    bad = rebuilt(_honest(1, sent, 1), metrics={"num-examples": float("nan")})
    arrays, seen = _aggregate([bad], "fedadam")
    assert arrays is None and seen["rejected"] == 1 and "fewer than min-replies 1" in seen["skipped"]


def test_evaluation_replies_are_checked_too():
    ok = _message(1, RecordDict({"metrics": MetricRecord({"num-examples": 1, "val-hr": 1.0, "val-ndcg": 0.63})}))
    assert check_evaluate_reply(ok) is None
    for metrics in ({"num-examples": 1, "val-hr": 7.0}, {"num-examples": 1, "val-ndcg": float("nan")}, {"num-examples": 0, "val-hr": 1.0}):
        assert check_evaluate_reply(_message(1, RecordDict({"metrics": MetricRecord(metrics)}))) is not None


def test_in_a_run_a_hostile_devices_replies_count_as_rejected_and_change_nothing(synthetic_population, tmp_path):
    """End to end on the in-process engine: a device that sends NaN every round leaves the same
    final model as a device that drops out every round."""
    from flwr.app import Context, Error
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedpref.client.app import app as client_app
    from fedpref.server.app import main as server_main
    from fedpref.simulations.inprocess import InProcessGrid

    population = synthetic_population(tmp_path, 12, 200, 12, 3)

    def run(name, behaviour):
        config = FederatedConfig.from_run_config({
            "history-dir": str(population), "results-dir": str(tmp_path / name), "num-server-rounds": 2, "dim": 8,
            "local-epochs": 1, "private-epochs": 1, "fraction-evaluate": 0.0, "checkpoint-dir": "none",
        })

        def device(msg, context):
            reply = client_app(msg, context)
            if msg.metadata.message_type == MessageType.TRAIN and context.node_config["partition-id"] == 0:
                return behaviour(msg, reply)
            return reply

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        grid = InProcessGrid(device, 12, config.to_run_config())
        server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config.to_run_config()))
        return json.loads((tmp_path / name / "rounds.json").read_text()), np.load(tmp_path / name / "final_model.npz")

    def poisoned(msg, reply):
        arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
        arrays["item_bias.weight"][0] = np.nan
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return reply

    hostile, hostile_model = run("hostile", poisoned)
    absent, absent_model = run("absent", lambda msg, reply: Message(Error(code=0, reason="gone"), reply_to=msg))
    assert [row.get("rejected") for row in hostile["rounds"]] == [1, 1]
    assert [row.get("dropped") for row in absent["rounds"]] == [1, 1]
    for name in absent_model.files:
        np.testing.assert_array_equal(hostile_model[name], absent_model[name])
