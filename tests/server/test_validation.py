"""The server rejects malformed and out-of-bounds replies before aggregating, counts them per
round, and its model is as if they had never come (fedpref.server.validation). A hostile device
can neither stop a run (metrics that Flower could not average) nor take over its model (a weight
it has no right to)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_NORM_BIT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpref.client.guard import encode_update
from fedpref.models.config import PARTIAL_AGGREGATE, RUN_CONFIG_DEFAULTS, FederatedConfig
from fedpref.server.strategy import make_strategy
from fedpref.simulations.experiments.hostile import (
    EVALUATE_KINDS,
    FORGED_PARTIALS,
    KEY_KINDS,
    KINDS,
    HypothesisDraw,
    bad_key,
    malform,
    malform_evaluation,
    metric_record,
    rebuilt,
    reply_message,
)
from fedpref.simulations.engines.inprocess import reply_from

C = 1.0
SHAPES = {"item_embedding.weight": (30, 4), "item_bias.weight": (30, 1)}
MAX_EXAMPLES = RUN_CONFIG_DEFAULTS["max-examples"]  # what make_strategy bounds a claim by unless told otherwise
RUN_CONFIG = {"catalogue-size": 30, "devices": 8, "dim": 4, "clip-norm": C}


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
    """What a device's guard sends: global + its update clipped to C (fedpref.client.guard),
    with the metrics of fedpref.client.app's train."""
    rng = np.random.default_rng(seed)
    update = {name: (rng.normal(0, scale / 10, a.shape)).astype(np.float32) for name, a in sent.items()}
    weights, norm, clipped = encode_update(sent, update, C)
    metrics = {"num-examples": 1} if dp else {"num-examples": examples, "train-loss": 0.5, "update-norm": norm, "clipped": float(clipped)}
    return _message(node, RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}), "metrics": MetricRecord(metrics)}))


def _evaluation(node: int, seed: int) -> Message:
    """What fedpref.client.app's evaluate sends: one device's hit and NDCG for each split."""
    rng = np.random.default_rng(seed)
    metrics = {"num-examples": 1}
    for name in ("val-hr", "val-full-hr", "test-hr", "test-full-hr"):
        metrics[name] = float(rng.random() < 0.5)
        metrics[name.replace("hr", "ndcg")] = metrics[name] / float(np.log2(rng.integers(2, 12)))
    return _evaluation_reply(node, metrics)


def _evaluation_reply(node: int, metrics: dict) -> Message:
    ask = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    ask.metadata.__dict__["_message_id"] = f"ask-{node}"
    return reply_from(ask, RecordDict({"metrics": metric_record(metrics)}))


def _check(reply: Message, sent: dict, dp: bool = False) -> str | None:
    from fedpref.server.validation import check_train_reply, default_max_bytes, train_metric_keys

    config = FederatedConfig.from_run_config({**RUN_CONFIG, "dp-noise-multiplier": 0.5 if dp else 0.0})
    return check_train_reply(reply, sent, bound=C, max_bytes=default_max_bytes(sent), dp=dp,
                             metric_keys=train_metric_keys(config), max_examples=MAX_EXAMPLES)


# -- the hostile kit (fedpref.simulations.experiments.hostile), its choices drawn by hypothesis ---------

def _mutate(reply: Message, sent: dict, kind: str, data: st.DataObject) -> Message:
    return malform(reply, sent, kind, HypothesisDraw(data), bound=C, max_examples=MAX_EXAMPLES)


def _aggregate(replies: list[Message], strategy_name: str, dp: bool = False, **run_config) -> tuple[dict | None, dict]:
    """One round of fedpref's strategy over ``replies``: (new global arrays, what on_round saw)."""
    run_config = {**RUN_CONFIG, "strategy": strategy_name, **run_config}
    if dp:
        run_config["dp-noise-multiplier"] = 0.5
    config = FederatedConfig.from_run_config(run_config)
    seen: dict = {}
    strategy = make_strategy(config, 8, lambda report: seen.update(vars(report)))
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
    assert seen["dropped"] == 0 and seen["late"] == 0  # a forged partial aggregate counts no dropouts
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


def _aggregate_evaluate(replies: list[Message], **run_config) -> tuple[dict, dict]:
    """One round of fedpref's strategy's evaluation over ``replies``: (averaged metrics, what on_round saw)."""
    config = FederatedConfig.from_run_config({**RUN_CONFIG, **run_config})
    seen: dict = {}
    strategy = make_strategy(config, 8, lambda report: seen.update(vars(report)))
    metrics = strategy.aggregate_evaluate(1, replies)
    return (dict(metrics) if metrics else {}), seen["evaluate"]


def _with_metrics(reply: Message, **changes) -> Message:
    """A copy of ``reply`` whose metrics are changed (a value of None removes the metric)."""
    metrics = {k: v for k, v in {**dict(reply.content["metrics"].items()), **changes}.items() if v is not None}
    if "arrays" not in reply.content.array_records:  # an evaluation reply
        return _evaluation_reply(reply.metadata.src_node_id, metrics)
    return rebuilt(reply, metrics=metrics)


def test_evaluation_replies_are_checked_too():
    from fedpref.server.validation import check_evaluate_reply, evaluate_metric_keys

    keys = evaluate_metric_keys(FederatedConfig.from_run_config(RUN_CONFIG))
    ok = _evaluation(1, 0)
    assert check_evaluate_reply(ok, metric_keys=keys) is None
    for change in ({"val-hr": 7.0}, {"val-ndcg": float("nan")}, {"num-examples": 0}, {"num-examples": 2}, {"test-full-ndcg": None}, {"other": 0.5}):
        assert check_evaluate_reply(_with_metrics(ok, **change), metric_keys=keys) is not None, change


# -- one device must not stop the run: every reply carries exactly the expected metrics -------

@pytest.mark.parametrize("change", [{"secret": 1.0}, {"train-loss": None}, {"num-examples": None}], ids=["extra", "missing", "missing-weight"])
@pytest.mark.parametrize("strategy_name", ["fedavg", "fedadam"])
def test_a_training_reply_with_a_metric_more_or_less_is_rejected_and_the_round_goes_on(change, strategy_name):
    """Flower averages a round's metrics only when every reply has the same keys: one reply with
    a key more or less made it raise, which stopped the run (and its resume)."""
    # Prepare: the hostile reply first (Flower compares every reply with the first), then three honest ones.
    sent = _global()
    hostile = _with_metrics(_honest(3, sent, 3), **change)
    # Execute
    got, seen = _aggregate([hostile] + [_honest(n, sent, n) for n in range(3)], strategy_name)
    # Assert: rejected and counted; the model and the metrics are the honest replies' alone.
    expected, honest = _aggregate([_honest(n, sent, n) for n in range(3)], strategy_name)
    assert (seen["rejected"], seen["replies"]) == (1, 3)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert seen["train"] == honest["train"] and set(seen["train"]) == {"train-loss", "update-norm", "clipped"}


@pytest.mark.parametrize("change", [{"secret": 1.0}, {"val-full-hr": None}], ids=["extra", "missing"])
def test_an_evaluation_reply_with_a_metric_more_or_less_is_rejected_and_counted(change):
    # Prepare
    hostile = _with_metrics(_evaluation(9, 9), **change)
    honest = [_evaluation(n, n) for n in range(3)]
    # Execute
    metrics, row = _aggregate_evaluate([hostile] + honest)
    # Assert: the honest devices' mean, and the rejected reply counted in the round's row.
    for name in ("val-hr", "test-ndcg"):
        assert metrics[name] == pytest.approx(sum(float(r.content["metrics"][name]) for r in honest) / 3)
    assert row["evaluate-rejected"] == 1 and "secret" not in row


# -- one device must not take over the model: a weight within what a device can hold ----------

def test_one_device_claiming_1e12_examples_does_not_take_over_the_round():
    """Without a bound, a claim of 1e12 against three devices of 5 examples gave the attacker
    1e12 / (1e12 + 15) of the average: the round's model was its own."""
    # Prepare: an attacker that sends another model (within C) and claims 1e12 examples.
    sent = _global()
    attacker = _with_metrics(_honest(7, sent, 7, scale=30.0), **{"num-examples": 1e12})
    attackers_model = {k: v.numpy() for k, v in attacker.content["arrays"].items()}
    # Execute
    got, seen = _aggregate([_honest(n, sent, n, examples=5) for n in range(3)] + [attacker], "fedavg")
    # Assert: rejected; the model is the honest replies' alone, far from the attacker's.
    expected, _ = _aggregate([_honest(n, sent, n, examples=5) for n in range(3)], "fedavg")
    assert (seen["rejected"], seen["replies"]) == (1, 3)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert max(float(np.abs(got[k] - attackers_model[k]).max()) for k in got) > 0.01


def test_two_devices_claiming_1_7e308_examples_do_not_zero_the_model():
    """1.7e308 + 1.7e308 overflows to inf: Flower's average divided every weight by it and the
    global model became zeros."""
    # Prepare
    sent = _global()
    attackers = [_with_metrics(_honest(7 + i, sent, 7 + i), **{"num-examples": 1.7e308}) for i in range(2)]
    # Execute
    got, seen = _aggregate([_honest(n, sent, n) for n in range(3)] + attackers, "fedavg")
    # Assert
    expected, _ = _aggregate([_honest(n, sent, n) for n in range(3)], "fedavg")
    assert (seen["rejected"], seen["replies"]) == (2, 3)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
        assert np.abs(got[name]).max() > 0


def test_a_round_whose_weights_sum_beyond_float_range_is_skipped_and_the_model_kept(caplog):
    """Should an operator set max-examples beyond float range, claims within it can still sum to
    inf: the round is skipped with a log line, never aggregated into zeros."""
    import logging

    # Prepare: two claims each within the (absurd) bound, together beyond float range.
    sent = _global()
    claims = [_with_metrics(_honest(n, sent, n), **{"num-examples": 1.7e308}) for n in range(2)]
    # Execute
    with caplog.at_level(logging.WARNING):
        arrays, seen = _aggregate(claims, "fedadam", **{"max-examples": 10**309})
    # Assert
    assert arrays is None and seen["rejected"] == 0
    assert "not a finite number" in seen["skipped"] and "round 1 skipped" in caplog.text


def test_an_evaluation_claiming_1e15_examples_does_not_set_the_rounds_validation_hit_rate():
    """A device that claimed 1e15 with a perfect hit made the round's validation HR@10 1.0, and so
    chose the round."""
    # Prepare: three honest devices (half of them hit), and an attacker claiming 1e15 perfect hits.
    honest = [_evaluation(n, n) for n in range(3)]
    perfect = {k: 1.0 for k in _evaluation(9, 9).content["metrics"].keys() if k.endswith(("-hr", "-ndcg"))}
    attacker = _with_metrics(_evaluation(9, 9), **perfect, **{"num-examples": 1e15})
    # Execute
    metrics, row = _aggregate_evaluate(honest + [attacker])
    # Assert: the honest devices' mean (each weighs 1), the claim rejected and counted.
    for name in ("val-hr", "val-ndcg", "test-hr", "test-full-ndcg"):
        assert metrics[name] == pytest.approx(sum(float(r.content["metrics"][name]) for r in honest) / 3)
    assert row["evaluate-rejected"] == 1


def test_with_equal_weights_every_device_weighs_the_same_whatever_it_claims():
    # Prepare: three devices claiming 1, 5 and 1,000 examples (all within the bound).
    sent = _global()
    claims = (1, 5, 1000)
    replies = lambda: [_honest(n, sent, n, examples=c) for n, c in enumerate(claims)]  # noqa: E731
    models = [{k: v.numpy().astype(np.float64) for k, v in r.content["arrays"].items()} for r in replies()]
    # Execute
    equal, seen = _aggregate(replies(), "fedavg", weighting="equal")
    weighted, _ = _aggregate(replies(), "fedavg")
    # Assert: the plain mean with weighting=equal, the mean weighted by the claims otherwise.
    for name in equal:
        np.testing.assert_allclose(equal[name], sum(m[name] for m in models) / 3, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(weighted[name], sum(c * m[name] for c, m in zip(claims, models)) / sum(claims), rtol=1e-5, atol=1e-7)
    assert (seen["replies"], seen["rejected"]) == (3, 0)


def test_a_device_may_claim_at_most_its_longest_possible_history(synthetic_population, tmp_path):
    """The bound is what the server can know: in a simulation the population's longest history,
    with device stores or real devices the catalogue (a device trains on distinct items), and
    never more than max-examples."""
    from fedpref.server.validation import examples_bound

    # Prepare
    population = synthetic_population(tmp_path, 12, 200, 12, 3)
    longest = int(np.diff(np.load(population / "train_indptr.npy")).max())
    simulation = FederatedConfig.from_run_config({"history-dir": str(population)})
    # Execute / Assert
    assert examples_bound(simulation, 200)[0] == longest
    assert examples_bound(FederatedConfig.from_run_config({"history-dir": str(population), "max-examples": longest - 1}), 200)[0] == longest - 1
    assert examples_bound(FederatedConfig.from_run_config({"history-dir": str(population), "store-dir": str(tmp_path)}), 200)[0] == 200
    assert examples_bound(FederatedConfig.from_run_config({"catalogue-size": 50_000, "devices": 3}), 50_000)[0] == 50_000
    assert examples_bound(FederatedConfig.from_run_config({"catalogue-size": 500_000, "devices": 3}), 500_000)[0] == MAX_EXAMPLES
    # A claim one above the bound is rejected, one at it passes.
    sent = _global()
    for claim, ok in ((MAX_EXAMPLES, True), (MAX_EXAMPLES + 1, False)):
        assert (_check(_with_metrics(_honest(1, sent, 1), **{"num-examples": claim}), sent) is None) is ok


@pytest.mark.parametrize("kind", list(EVALUATE_KINDS))
def test_each_kind_of_malformed_evaluation_reply_is_rejected_and_leaves_the_metrics_unchanged(kind):
    honest = [_evaluation(n, n) for n in range(3)]
    expected, _ = _aggregate_evaluate([_evaluation(n, n) for n in range(3)])

    @given(data=st.data(), at=st.integers(0, 3))
    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(data, at):
        bad = malform_evaluation(_evaluation(9, 9), kind, HypothesisDraw(data))
        metrics, row = _aggregate_evaluate(honest[:at] + [bad] + honest[at:])
        assert row["evaluate-rejected"] == 1
        assert metrics == pytest.approx(expected)

    check()


def test_in_a_run_a_hostile_devices_replies_count_as_rejected_and_change_nothing(synthetic_population, tmp_path):
    """End to end on the in-process engine: a device that sends NaN every round leaves the same
    final model as a device that drops out every round."""
    from flwr.app import Context, Error
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedpref.simulations.engines.device import app as client_app
    from fedpref.server.app import main as server_main
    from fedpref.simulations.engines.inprocess import InProcessGrid

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


@pytest.mark.parametrize("engine", ["inprocess", "fast"])
@pytest.mark.parametrize("overrides", [{}, {"dp-noise-multiplier": 0.5}, {"dp-noise-multiplier": 0.5, "dp-clipping": "adaptive"}, {"weighting": "equal"}],
                         ids=["plain", "dp", "dp-adaptive", "equal-weights"])
def test_honest_devices_send_exactly_the_metric_names_the_server_expects(synthetic_population, tmp_path, engine, overrides):
    """The names the server requires (fedpref.server.validation, derived from the run config)
    are the names the devices' code sends: the ClientApp's and the fast engine's partial
    aggregates, training and evaluation. No honest reply is rejected."""
    from fedpref.server.app import ServerHooks
    from fedpref.server.validation import evaluate_metric_keys, train_metric_keys
    from fedpref.simulations.engines.fast import run_fast
    from fedpref.simulations.engines.inprocess import run_inprocess

    # Prepare
    population = synthetic_population(tmp_path, 12, 200, 12, 3)
    config = FederatedConfig.from_run_config({
        "history-dir": str(population), "results-dir": str(tmp_path / "run"), "num-server-rounds": 1, "dim": 4, "local-epochs": 1,
        "private-epochs": 1, "checkpoint-dir": "none", **overrides})
    replies: dict[str, list] = {"train": [], "evaluate": []}
    hooks = ServerHooks(on_exchange=[lambda sent, got: replies[sent[0].metadata.message_type].extend(r for r in got if not r.has_error())
                                     if sent and sent[0].metadata.message_type in replies else None])
    # Execute
    result = run_inprocess(config, n_devices=12, hooks=hooks) if engine == "inprocess" else run_fast(config, threads=1, hooks=hooks)
    # Assert
    assert replies["train"] and replies["evaluate"]
    assert {frozenset(r.content["metrics"].keys()) for r in replies["train"]} == {train_metric_keys(config)}
    assert {frozenset(r.content["metrics"].keys()) for r in replies["evaluate"]} == {evaluate_metric_keys(config)}
    (row,) = result["rounds"]
    assert "rejected" not in row and "evaluate-rejected" not in row and row["replies"] == 12


# -- nothing a device sends reaches code that can raise before it is checked ------------------

def _adaptive(node: int, sent: dict, seed: int) -> Message:
    """What a device sends under DP with adaptive clipping: weight 1 and its clipped-or-not bit."""
    return rebuilt(_honest(node, sent, seed, dp=True), metrics={"num-examples": 1, KEY_NORM_BIT: 1})


# (strategy, run config, the honest reply of that run, the metric the hostile device sends as a list)
RUNS = {
    "fedavg": ("fedavg", {}, _honest, "train-loss"),
    "fedadam": ("fedadam", {}, _honest, "update-norm"),
    "median": ("fedavg", {"aggregation": "median"}, _honest, "train-loss"),
    "trimmed-mean": ("fedavg", {"aggregation": "trimmed-mean"}, _honest, "clipped"),
    "dp-adaptive": ("fedavg", {"dp": True, "dp-clipping": "adaptive"}, _adaptive, KEY_NORM_BIT),
}


@pytest.mark.parametrize("value", [[0.1, 0.2], [1.0], []], ids=["two", "one", "empty"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "last"])
@pytest.mark.parametrize("run", list(RUNS))
def test_a_training_metric_sent_as_a_list_is_rejected_and_the_round_goes_on(run, first, value):
    """Flower's records allow a list as a metric's value, and Flower's average could not add it to
    another reply's number: one such reply stopped the run (TypeError), with any strategy, and
    under DP with adaptive clipping with the norm bit sent as a list."""
    # Prepare: three honest replies of this run, and one whose metric is a list, first or last.
    strategy_name, run_config, honest, metric = RUNS[run]
    sent = _global()
    hostile = _with_metrics(honest(3, sent, 3), **{metric: value})
    good = [honest(n, sent, n) for n in range(3)]
    # Execute
    got, seen = _aggregate([hostile] + good if first else good + [hostile], strategy_name, **run_config)
    # Assert: rejected and counted, the round aggregated the three honest replies; without DP's
    # noise, bit for bit their model alone.
    assert (seen["rejected"], seen["replies"]) == (1, 3) and got is not None
    if "dp" not in run_config:
        expected, _ = _aggregate([honest(n, sent, n) for n in range(3)], strategy_name, **run_config)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.parametrize("value", ["0.5", "", True], ids=["string", "empty-string", "bool"])
def test_a_training_metric_that_is_a_string_or_a_bool_is_rejected(value):
    """Flower's own records refuse these, but the server does not rely on the transport: a record
    that carries one anyway (an in-process grid, another transport) is rejected like a list. (A
    bool used to pass as a finite number.)"""
    # Prepare: the value put in past Flower's record check (fedpref.simulations.experiments.hostile.metric_record).
    sent = _global()
    hostile = _with_metrics(_honest(3, sent, 3), **{"train-loss": value})
    assert hostile.content["metrics"]["train-loss"] is value
    # Execute
    got, seen = _aggregate([hostile] + [_honest(n, sent, n) for n in range(3)], "fedavg")
    # Assert: rejected with its reason, the model the honest replies' alone.
    expected, _ = _aggregate([_honest(n, sent, n) for n in range(3)], "fedavg")
    assert "must be one finite number" in _check(hostile, sent)
    assert (seen["rejected"], seen["replies"]) == (1, 3)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.parametrize("value", [[1.0], [0.5, 0.5], "1.0"], ids=["list", "two", "string"])
def test_an_evaluation_metric_sent_as_a_list_or_a_string_is_rejected_and_counted(value):
    """The evaluation check itself used to raise on ``float(list)``: the run stopped."""
    # Prepare: the hostile reply first and last among three honest ones.
    honest = [_evaluation(n, n) for n in range(3)]
    metrics = {**dict(_evaluation(9, 9).content["metrics"].items()), "val-hr": value}
    hostile = _evaluation_reply(9, metrics)
    for order in ([hostile] + honest, honest + [hostile]):
        # Execute
        got, row = _aggregate_evaluate(order)
        # Assert: the honest devices' mean (each weighs 1), the hostile reply counted.
        assert got["val-hr"] == pytest.approx(sum(float(r.content["metrics"]["val-hr"]) for r in honest) / 3)
        assert row["evaluate-rejected"] == 1


@pytest.mark.parametrize("partial", FORGED_PARTIALS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()) or "empty")
def test_a_partial_aggregate_forged_by_a_device_is_rejected_before_anything_counts_it(partial):
    """Only the fast engine's grid may send a partial aggregate. From any other grid the strategy
    counted its 'devices' and 'dropped' before it refused it: {} raised KeyError, 'x' ValueError
    (the run stopped), and dropped=10**6 was recorded as a million dropouts."""
    # Prepare: three honest replies and one with a forged partial-aggregate record.
    sent = _global()
    forged = rebuilt(_honest(3, sent, 3), extra={PARTIAL_AGGREGATE: ConfigRecord(partial)})
    # Execute
    got, seen = _aggregate([forged] + [_honest(n, sent, n) for n in range(3)], "fedavg")
    # Assert: one reply of one device, rejected; no dropout, nobody late; the honest model.
    expected, _ = _aggregate([_honest(n, sent, n) for n in range(3)], "fedavg")
    assert (seen["rejected"], seen["replies"], seen["dropped"], seen["late"]) == (1, 3, 0, 0)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def _aggregate_partials(replies: list[Message], asked: int) -> dict:
    """One round of the strategy of a grid that computes partial aggregates (the fast engine's)."""
    config = FederatedConfig.from_run_config({**RUN_CONFIG, "strategy": "fedavg"})
    seen: dict = {}
    strategy = make_strategy(config, 8, lambda report: seen.update(vars(report)), accept_partial=True)
    strategy._sent_global, strategy._asked = _global(), asked
    strategy.aggregate_train(1, replies)
    return seen


@pytest.mark.parametrize("partial", [
    {"devices": 3, "dropped": 10**6}, {"devices": 5, "dropped": 0}, {"devices": 3, "dropped": 2}, {"devices": 3, "dropped": -1},
    {"devices": 0, "dropped": 1}, {"devices": "x", "dropped": 0}, {"devices": 3}, {"devices": 2.5, "dropped": 0},
    {"devices": 3, "dropped": 1, "norm-bits": 4}, {"devices": 3, "dropped": 1, "norm-bits": "x"},
], ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_even_from_the_fast_engines_grid_a_partial_aggregate_counts_only_what_its_round_could_have(partial):
    """A round that asked 4 devices: a partial aggregate may stand for at most 4, dropouts
    included, in whole numbers; anything else is rejected before it is counted."""
    # Prepare: the well-formed partial aggregate of 3 devices of 5 examples each, one dropped.
    sent = _global()
    weights = {"num-examples": 15, "train-loss": 0.5, "update-norm": 0.3, "clipped": 0.0}
    good = rebuilt(_honest(1, sent, 1), metrics=weights, extra={PARTIAL_AGGREGATE: ConfigRecord({"devices": 3, "dropped": 1, "weight": 15.0})})
    bad = rebuilt(_honest(1, sent, 1), metrics=weights, extra={PARTIAL_AGGREGATE: ConfigRecord(partial)})
    # Execute
    honest, hostile = _aggregate_partials([good], asked=4), _aggregate_partials([bad], asked=4)
    # Assert: the good one counts 3 replies and 1 dropout of the 4 asked; the bad one is one
    # rejected reply, and the 3 others asked count as late (nothing says what became of them).
    assert (honest["replies"], honest["dropped"], honest["late"], honest["rejected"]) == (3, 1, 4 - 3 - 1, 0)
    assert (hostile["replies"], hostile["dropped"], hostile["late"], hostile["rejected"]) == (0, 0, 4 - 1, 1)


def test_a_check_that_raises_on_one_reply_rejects_that_reply_and_the_round_goes_on(monkeypatch):
    """The backstop: should a check meet a content nobody foresaw and raise, the strategy turns
    that into the reply's rejection (logged with its node id), never the round's failure."""
    from fedpref.server import strategy as server_strategy

    # Prepare: a check that raises on node 3's reply, as an unforeseen content would make it.
    real = server_strategy.check_train_reply

    def fragile(reply, *args, **kwargs):
        if reply.metadata.src_node_id == 3:
            raise TypeError("a content no check foresaw")
        return real(reply, *args, **kwargs)

    monkeypatch.setattr(server_strategy, "check_train_reply", fragile)
    sent = _global()
    # Execute
    got, seen = _aggregate([_honest(n, sent, n) for n in (0, 1, 3, 2)], "fedavg")
    # Assert
    expected, _ = _aggregate([_honest(n, sent, n) for n in (0, 1, 2)], "fedavg")
    assert (seen["rejected"], seen["replies"]) == (1, 3)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


class _Deployment:
    """A deployment's grid (no ``device_keys`` of its own): devices 11, 12, 13, 14 answer the key
    query with keys 0, 1, 2, 3, except those in ``bad``, which answer with the given reply."""

    def __init__(self, bad: dict[int, Message]) -> None:
        self.bad = bad

    def get_node_ids(self):
        return [11, 12, 13, 14]

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node in self.bad:
                out.append(self.bad[node])
                continue
            m.metadata.__dict__["_message_id"] = f"q{node}"
            out.append(reply_from(m, RecordDict({"device": ConfigRecord({"key": node - 11})})))
        return out


@pytest.mark.parametrize("kind", list(KEY_KINDS))
def test_a_device_key_that_is_not_a_whole_number_in_range_leaves_that_device_unordered_and_the_server_running(kind):
    """The server asks every device for its key before round 1. It read each answer unchecked: no
    'device' record (KeyError), key 'x' (ValueError) or inf (OverflowError) from one device
    stopped the ServerApp before the run store opened, and on every restart."""
    from fedpref.server.grid import CohortSampler, StableGrid, ask_device_keys, engine_grid

    @given(data=st.data())
    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(data):
        # Prepare: node 13 answers malformed (a duplicate: the key node 11 gave, 0).
        grid = _Deployment({13: bad_key(13, kind, HypothesisDraw(data), taken=0)})
        # Execute
        keys = ask_device_keys(grid, 4, timeout=1)
        order = StableGrid(engine_grid(grid), keys, CohortSampler(random.Random(0))).get_node_ids()
        # Assert: the honest keys kept (a duplicated key: neither holder's); the devices
        # without one after the others, by node id, all still there to be sampled.
        unkeyed = [11, 13] if kind == "duplicate" else [13]
        assert keys == {node: node - 11 for node in (11, 12, 13, 14) if node not in unkeyed}
        assert order == [n for n in (11, 12, 13, 14) if n not in unkeyed] + unkeyed

    check()
