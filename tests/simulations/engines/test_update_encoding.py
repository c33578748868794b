"""Updates encoded in float16 or 8 bits: unbiased stochastic rounding, within the clipping
bound after decoding, a fraction of the bytes, and a run that still learns."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpref.models.encoding import EncodingError, decode, encode, encode_within, norm
from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.simulations.experiments.hostile import ENCODED_KINDS, HypothesisDraw, malform_encoded, reply_message
from fedpref.simulations.engines.inprocess import run_inprocess


def update(seed=0):
    rng = np.random.default_rng(seed)
    return {"item_embedding.weight": rng.normal(0, 0.01, (300, 16)).astype(np.float32), "item_bias.weight": rng.normal(0, 0.01, (300, 1)).astype(np.float32)}


def test_int8_stochastic_rounding_is_unbiased_and_float16_is_close():
    u = update()
    names = list(u)
    mean = np.zeros_like(u["item_embedding.weight"], dtype=np.float64)
    trials = 400
    rng = np.random.default_rng(1)
    for _ in range(trials):
        mean += decode(encode(u, "int8", rng), names, "int8")["item_embedding.weight"]
    scale = np.abs(u["item_embedding.weight"]).max() / 127
    # Each decoded value is within one step of the true one, and their mean tends to it.
    assert np.abs(mean / trials - u["item_embedding.weight"]).max() < 4 * scale / np.sqrt(trials) * 2
    half = decode(encode(u, "float16", rng), names, "float16")
    assert np.allclose(half["item_embedding.weight"], u["item_embedding.weight"], rtol=1e-3, atol=1e-6)


def test_the_decoded_update_stays_within_the_bound_and_costs_fewer_bytes():
    u = update()
    bound = norm(u)  # exactly at the bound: rounding would push it over
    rng = np.random.default_rng(2)
    for encoding in ("float16", "int8"):
        sent = encode_within(u, encoding, bound, rng)
        assert norm(decode(sent, list(u), encoding)) <= bound
    raw = sum(len(Array(v).data) for v in u.values())
    assert sum(len(Array(v).data) for v in encode_within(u, "float16", bound, rng).values()) < 0.55 * raw
    assert sum(len(Array(v).data) for v in encode_within(u, "int8", bound, rng).values()) < 0.30 * raw


def test_malformed_encoded_updates_are_refused():
    u = update()
    sent = encode(u, "int8", np.random.default_rng(0))
    with pytest.raises(EncodingError, match="carries arrays"):
        decode({k: v for k, v in sent.items() if not k.endswith("#scale")}, list(u), "int8")
    sent["item_bias.weight#scale"] = np.array([np.nan], dtype=np.float32)
    with pytest.raises(EncodingError, match="positive finite scale"):
        decode(sent, list(u), "int8")
    with pytest.raises(RunConfigError, match="update-encoding"):
        FederatedConfig.from_run_config({"update-encoding": "int4"})
    with pytest.raises(RunConfigError, match="secure aggregation quantises"):
        FederatedConfig.from_run_config({"update-encoding": "int8", "secagg": True})


@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_a_run_with_encoded_updates_follows_the_float32_run(tmp_path, synthetic_population, encoding):
    population = synthetic_population(tmp_path, 20, n_items=150, mean_events=15, seed=8)
    base = {"history-dir": str(population), "num-server-rounds": 4, "dim": 8, "local-epochs": 1, "private-epochs": 1,
            "evaluate-every": 4, "clip-norm": 0.5}
    plain = run_inprocess(FederatedConfig.from_run_config({**base, "results-dir": str(tmp_path / "f32"), "checkpoint-dir": str(tmp_path / "c1")}), n_devices=20)
    coded = run_inprocess(FederatedConfig.from_run_config({**base, "results-dir": str(tmp_path / encoding), "checkpoint-dir": str(tmp_path / "c2"), "update-encoding": encoding}), n_devices=20)
    assert all(r["replies"] == 20 for r in coded["rounds"])
    a, b = np.load(tmp_path / "f32" / "final_model.npz"), np.load(tmp_path / encoding / "final_model.npz")
    diff = np.abs(a["item_embedding.weight"] - b["item_embedding.weight"]).max()
    assert diff < (0.05 if encoding == "int8" else 0.01)  # the same training, up to rounding
    assert abs(coded["rounds"][-1]["val-hr"] - plain["rounds"][-1]["val-hr"]) <= 0.15


def test_decode_refuses_an_array_of_another_shape_or_dtype_than_the_server_sent():
    """decode added each array to what the server sent without looking at its shape: one of
    another shape raised NumPy's broadcast ValueError (or broadcast silently)."""
    # Prepare
    u = update()
    shapes = {k: v.shape for k, v in u.items()}
    rng = np.random.default_rng(0)
    half, eight = encode(u, "float16", rng), encode(u, "int8", rng)
    # Execute / Assert: the honest encodings decode; another shape or dtype is an EncodingError.
    assert decode(half, list(u), "float16", shapes=shapes)["item_bias.weight"].shape == (300, 1)
    assert decode(eight, list(u), "int8", shapes=shapes)["item_bias.weight"].shape == (300, 1)
    for encoding, sent in (("float16", half), ("int8", eight)):
        with pytest.raises(EncodingError, match="shape"):
            decode({**sent, "item_bias.weight": sent["item_bias.weight"][:7]}, list(u), encoding, shapes=shapes)
    with pytest.raises(EncodingError, match="float16 values"):
        decode({**half, "item_bias.weight": half["item_bias.weight"].astype(np.float64)}, list(u), "float16", shapes=shapes)
    with pytest.raises(EncodingError, match="int8 values"):
        decode({**eight, "item_bias.weight#scale": eight["item_bias.weight#scale"].astype(np.float64)}, list(u), "int8", shapes=shapes)


# -- a hostile device's encoded update (fedpref.simulations.experiments.hostile.malform_encoded) ----------

C = 1.0
SHAPES = {"item_embedding.weight": (30, 4), "item_bias.weight": (30, 1)}


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages take their run and sender from the process's task identity, as in a ServerApp."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _sent() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in SHAPES.items()}


def _encoded(node: int, encoding: str) -> Message:
    """What a device sends with ``encoding``: its update, clipped to C and encoded within C."""
    rng = np.random.default_rng(node)
    u = {name: rng.normal(0, 0.3, shape).astype(np.float32) for name, shape in SHAPES.items()}
    u = {k: v * np.float32(min(1.0, C / norm(u))) for k, v in u.items()}
    arrays = encode_within(u, encoding, C, rng)
    metrics = {"num-examples": 5, "train-loss": 0.5, "update-norm": norm(u), "clipped": 0.0}
    return reply_message(node, RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)}))


def _aggregate(replies: list[Message], encoding: str) -> tuple[dict | None, dict]:
    """One round of fedpref's strategy with ``update-encoding``: (new global arrays, what on_round saw)."""
    from fedpref.server.strategy import make_strategy

    config = FederatedConfig.from_run_config({"catalogue-size": 30, "devices": 8, "dim": 4, "clip-norm": C, "strategy": "fedavg", "update-encoding": encoding})
    seen: dict = {}
    strategy = make_strategy(config, 8, lambda report: seen.update(vars(report)))
    strategy._sent_global, strategy._asked = _sent(), len(replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    return (None if arrays is None else {k: arrays[k].numpy() for k in arrays}), seen


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), encoding=st.sampled_from(["float16", "int8"]), kinds=st.lists(st.sampled_from(list(ENCODED_KINDS)), min_size=1, max_size=3),
       honest=st.integers(1, 3))
def test_every_malformed_encoded_update_is_rejected_and_leaves_the_model_unchanged(data, encoding, kinds, honest):
    """With update-encoding float16 or int8 the server decodes each reply before the other
    checks. A wrong shape (NumPy's broadcast error), 'arrays' as a MetricRecord
    (AttributeError) or bytes that are no array (ValueError) escaped the decoder's own errors
    and stopped the run; each is now one rejected reply."""
    # Prepare: honest encoded replies, and malformed ones, in an order hypothesis draws.
    bad = [malform_encoded(_encoded(100 + i, encoding), kind, HypothesisDraw(data), encoding=encoding) for i, kind in enumerate(kinds)]
    order = data.draw(st.permutations(range(honest + len(bad))), label="order")
    replies = [_encoded(n, encoding) for n in range(honest)] + bad
    # Execute
    got, seen = _aggregate([replies[i] for i in order], encoding)
    # Assert: every malformed reply rejected and counted; the model is the honest replies' alone.
    expected, _ = _aggregate([_encoded(i, encoding) for i in order if i < honest], encoding)
    assert (seen["rejected"], seen["replies"]) == (len(bad), honest)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
