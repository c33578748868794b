"""Hostile devices' replies: every way a training or evaluation reply can be malformed.

:func:`malform` turns a well-formed training reply (what a device's guard sends: ``global +
update`` in float32, within the clipping bound) into a malformed one of a given kind
(:data:`KINDS`); :func:`malform_evaluation` does the same to an evaluation reply
(:data:`EVALUATE_KINDS`). The choices inside a kind (which array, which value, how far) come
from a ``draw`` object, so that the same code serves hypothesis's property test
(``tests/server/test_validation.py``, where hypothesis draws them) and the reliability record
(``fedpref reliability``, a seeded NumPy generator): every reply it makes must be rejected by
the server (:mod:`fedpref.server.validation`), and the model must be as if it had never come.
:func:`malform_encoded` does the same to a reply encoded in float16 or int8
(:data:`ENCODED_KINDS`, run-config ``update-encoding``), and :func:`bad_key` to a device's
answer to the server's key query (:data:`KEY_KINDS`): the server must leave such a device
unordered, never stop.

:data:`app` is a ClientApp for Flower's Simulation Engine that plays one hostile device among
honest ones: device :data:`HOSTILE_DEVICE` runs the honest ClientApp
(``fedpref.simulations.engines.device``) and then malforms its replies as :data:`SCRIPT` says for each round.
The hostile behaviour lives here, in the simulations: the device's own code never knows it is
simulated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpref.models.encoding import SCALE_SUFFIX
from fedpref.models.config import PARTIAL_AGGREGATE, RUN_CONFIG_DEFAULTS

from fedpref.simulations.engines.inprocess import reply_from

KINDS = {
    "renamed": "an array under another name",
    "missing": "a shared array left out",
    "extra-array": "an array the model does not share (a private one)",
    "shape": "an array of another shape",
    "dtype": "an array of another dtype",
    "non-finite": "a NaN or an Inf in an array",
    "norm": "an update above the clipping bound",
    "corrupt-data": "array bytes that do not match their declared shape",
    "weight": "num-examples zero, negative, NaN or Inf",
    "heavy": "num-examples above what one device may claim (1e12, 1.7e308, ...)",
    "metric": "a NaN or Inf metric",
    "list-metric": "a metric sent as a list of numbers (Flower's records allow lists)",
    "string-metric": "a metric sent as a string (past Flower's record checks)",
    "extra-metric": "a metric the server does not expect",
    "missing-metric": "a metric the server expects left out",
    "oversized": "a message padded beyond max-reply-bytes",
    "extra-record": "a record the protocol does not have",
    "forged-partial": "a partial-aggregate record, which only the fast engine's grid may send",
}

EVALUATE_KINDS = {
    "extra-metric": "a metric the server does not expect",
    "missing-metric": "a metric the server expects left out",
    "heavy": "num-examples above 1 (1e15 with perfect hit rates, ...)",
    "weight": "num-examples zero, negative, NaN or Inf",
    "out-of-range": "a hit rate or NDCG outside [0, 1]",
    "non-finite": "a NaN or Inf metric",
    "list-metric": "a metric sent as a list of numbers",
    "string-metric": "a metric sent as a string (past Flower's record checks)",
    "extra-record": "a record the protocol does not have",
    "forged-partial": "a partial-aggregate record, which only the fast engine's grid may send",
}

ENCODED_KINDS = {
    "shape": "an encoded array of another shape than the server sent",
    "dtype": "an encoded array in another dtype than the encoding's",
    "not-an-array-record": "'arrays' as a MetricRecord or a ConfigRecord",
    "unreadable": "array bytes that are not an array of the declared shape and dtype",
    "missing": "an encoded array left out",
    "bad-scale": "int8: a scale that is NaN, Inf, zero, negative, two numbers or float64; float16: a scale it does not carry",
}

KEY_KINDS = {
    "no-record": "no ConfigRecord 'device' (nothing, or a MetricRecord of that name)",
    "not-a-number": "a key that is a string or bytes",
    "float": "a key that is a float (3.0, 0.5, inf, nan)",
    "bool": "a key that is a bool",
    "out-of-range": "a key below 0 or beyond int64",
    "list": "a key that is a list",
    "duplicate": "the key another device gave",
}

# Partial-aggregate records a device may forge: empty, without its counts, with counts that are
# not numbers, and with counts that would claim a million dropouts or a thousand devices.
FORGED_PARTIALS = ({}, {"devices": 1}, {"devices": "x", "dropped": 0}, {"devices": 1, "dropped": 10**6},
                   {"devices": 1000, "dropped": 0, "weight": 1000.0}, {"devices": 1.5, "dropped": -1})
# Values a metric may take that are not one finite number.
LIST_VALUES = ([0.1, 0.2], [1.0], [], [5], [1, 2, 3])
STRING_VALUES = ("0.5", "", "nan", "1" * 100)

# Names a hostile device may add to its metrics: a plausible one, one the other kind of reply
# carries, one that differs from a real one only by case or a space, and a long one.
EXTRA_METRIC_NAMES = ("secret", "val-hr", "train-loss ", "Num-examples", "x" * 1000)


class Draw(Protocol):
    def choice(self, options: Sequence): ...
    def integer(self, low: int, high: int) -> int: ...  # low..high inclusive
    def real(self, low: float, high: float) -> float: ...


class NumpyDraw:
    """Choices from a seeded NumPy generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def choice(self, options: Sequence):
        return options[int(self.rng.integers(len(options)))]

    def integer(self, low: int, high: int) -> int:
        return int(self.rng.integers(low, high + 1))

    def real(self, low: float, high: float) -> float:
        return float(np.exp(self.rng.uniform(np.log(low), np.log(high))))  # log-uniform: small and large excesses


class HypothesisDraw:
    """Choices drawn by hypothesis (``st.data()`` in a property test), so that a failing case
    shrinks; hypothesis is a test dependency, imported only here."""

    def __init__(self, data) -> None:
        from hypothesis import strategies

        self.data, self.st = data, strategies

    def choice(self, options: Sequence):
        return self.data.draw(self.st.sampled_from(list(options)))

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(self.st.integers(low, high))

    def real(self, low: float, high: float) -> float:
        return self.data.draw(self.st.floats(low, high))


def reply_message(node: int, content: RecordDict) -> Message:
    """``content`` as a reply from ``node`` to a training message."""
    return reply_from(_ask(node, MessageType.TRAIN), content)


def metric_record(metrics: dict) -> MetricRecord:
    """A MetricRecord of ``metrics``, values that Flower's record would refuse (a string, a bool)
    included: put in past its type check, as by a transport or a grid that does not check them.
    (Flower's own wire format has no string metric; the server does not rely on that.)"""
    record = MetricRecord()
    for key, value in metrics.items():
        try:
            record[key] = value
        except TypeError:
            record.__dict__["_data"][key] = value
    return record


def rebuilt(reply: Message, arrays=None, metrics=None, extra: dict | None = None) -> Message:
    """A copy of ``reply`` with other arrays, metrics or added records."""
    content = RecordDict({
        "arrays": ArrayRecord(arrays if arrays is not None else dict(reply.content["arrays"].items())),
        "metrics": metric_record(metrics if metrics is not None else dict(reply.content["metrics"].items())),
    })
    for key, record in (extra or {}).items():
        content[key] = record
    return reply_message(reply.metadata.src_node_id, content)


def update_norm(reply: Message, sent: dict[str, np.ndarray]) -> float:
    """The L2 norm of the update a reply carries (what it sent minus what the server sent)."""
    arrays = reply.content["arrays"]
    return float(np.sqrt(sum(np.sum((arrays[k].numpy().astype(np.float64) - sent[k].astype(np.float64)) ** 2) for k in sent)))


def heavy_claim(draw: Draw, max_examples: float) -> float | int:
    """A number of examples above ``max_examples``: far above it (a take-over, a total beyond
    float range, the largest int64) or just above it."""
    return draw.choice([1e12, 1.7e308, 2**63 - 1, int(max_examples) + 1, float(max_examples) * draw.real(1.001, 1e6)])


def malform(reply: Message, sent: dict[str, np.ndarray], kind: str, draw: Draw, *, bound: float,
            max_examples: float = RUN_CONFIG_DEFAULTS["max-examples"]) -> Message:
    """A copy of the well-formed ``reply`` made malformed in the way ``kind`` names (one of
    :data:`KINDS`); ``sent``: the global arrays of the round, ``bound``: its clipping bound,
    ``max_examples``: the most examples one device may claim in it."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    weights = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
    name = draw.choice(sorted(weights))
    if kind == "renamed":
        weights[name + draw.choice([".x", "_", "2", " "])] = weights.pop(name)
    elif kind == "missing":
        weights.pop(name)
    elif kind == "extra-array":
        weights["user_embedding.weight"] = np.zeros((1, weights[name].shape[-1]), np.float32)
    elif kind == "shape":
        a = weights[name]
        shape = draw.choice([(a.size,), (a.shape[0] + 1,) + a.shape[1:], (a.shape[0] - 1,) + a.shape[1:], (1,) + a.shape])
        weights[name] = np.resize(a, shape)
    elif kind == "dtype":
        weights[name] = weights[name].astype(draw.choice([np.float64, np.float16, np.int32, np.int8]))
    elif kind == "non-finite":
        a = weights[name]
        a.reshape(-1)[draw.integer(0, a.size - 1)] = draw.choice([np.nan, np.inf, -np.inf])
    elif kind == "norm":
        factor = draw.real(1.001, 1e6) * bound / max(update_norm(reply, sent), 1e-30)
        weights = {k: (sent[k].astype(np.float64) + (w.astype(np.float64) - sent[k]) * factor).astype(w.dtype) for k, w in weights.items()}
        if update_norm(reply, sent) == 0.0:  # a device that sent the global model back: push one coordinate past the bound
            weights[name].reshape(-1)[0] += np.float32(2.0 * bound)
    elif kind == "corrupt-data":
        array = reply.content["arrays"][name]
        arrays = dict(reply.content["arrays"].items())
        arrays[name] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=array.data[: -draw.integer(1, 16)])
        return rebuilt(reply, arrays=arrays)
    elif kind in METRIC_KINDS:
        return rebuilt(reply, metrics=bad_metrics(dict(reply.content["metrics"].items()), kind, draw, max_examples=max_examples))
    elif kind == "oversized":
        size = sum(4 * int(np.prod(a.shape)) for a in sent.values()) + 64 * 1024
        return rebuilt(reply, extra={"config": ConfigRecord({"padding": b"\0" * (size + draw.integer(1, 4 * size))})})
    elif kind == "extra-record":
        return rebuilt(reply, extra={draw.choice(["more", "config", "private"]): ArrayRecord({"x": Array(np.zeros(3, np.float32))})})
    elif kind == "forged-partial":
        return rebuilt(reply, extra={PARTIAL_AGGREGATE: ConfigRecord(draw.choice(FORGED_PARTIALS))})
    return rebuilt(reply, arrays={k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


# the kinds that change only the metrics
METRIC_KINDS = ("weight", "heavy", "metric", "list-metric", "string-metric", "extra-metric", "missing-metric")


def bad_metrics(metrics: dict, kind: str, draw: Draw, *, max_examples: float = RUN_CONFIG_DEFAULTS["max-examples"]) -> dict:
    """A training reply's ``metrics`` made malformed in the way ``kind`` names (one of
    :data:`METRIC_KINDS`)."""
    metrics = dict(metrics)
    if kind == "weight":
        metrics["num-examples"] = draw.choice([0, -3, float("nan"), float("inf"), -1.5])
    elif kind == "heavy":
        metrics["num-examples"] = heavy_claim(draw, max_examples)
    elif kind == "metric":
        metrics[draw.choice(["train-loss", "num-examples"]) if "train-loss" in metrics else "num-examples"] = draw.choice([float("nan"), float("inf"), float("-inf")])
    elif kind in ("list-metric", "string-metric"):
        metrics[draw.choice(sorted(metrics))] = draw.choice(LIST_VALUES if kind == "list-metric" else STRING_VALUES)
    elif kind in ("extra-metric", "missing-metric"):
        _change_names(metrics, kind, draw)
    else:
        raise ValueError(f"{kind!r} is not a kind that changes only the metrics; choose one of {', '.join(METRIC_KINDS)}")
    return metrics


def _change_names(metrics: dict, kind: str, draw: Draw) -> None:
    """Add a metric the server does not expect (``extra-metric``), or leave one out (``missing-metric``)."""
    if kind == "extra-metric":
        name = draw.choice([n for n in EXTRA_METRIC_NAMES if n not in metrics])
        metrics[name] = draw.choice([0.0, 1.0, 7])
    else:
        metrics.pop(draw.choice(sorted(metrics)))


def malform_evaluation(reply: Message, kind: str, draw: Draw) -> Message:
    """A copy of the well-formed evaluation ``reply`` (one MetricRecord ``metrics``) made
    malformed in the way ``kind`` names (one of :data:`EVALUATE_KINDS`)."""
    content = bad_evaluation(reply.content, kind, draw)
    return reply_from(_ask(reply.metadata.src_node_id, MessageType.EVALUATE), content)


def bad_evaluation(content: RecordDict, kind: str, draw: Draw) -> RecordDict:
    """The content of an evaluation reply made malformed in the way ``kind`` names."""
    if kind not in EVALUATE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(EVALUATE_KINDS)}")
    metrics = dict(content["metrics"].items())
    scores = sorted(k for k in metrics if k.endswith(("-hr", "-ndcg")))
    extra = {}
    if kind in ("extra-metric", "missing-metric"):
        _change_names(metrics, kind, draw)
    elif kind == "heavy":  # a device that claims to stand for many, all of them hits: the round's validation HR@k
        metrics.update({k: 1.0 for k in scores})
        metrics["num-examples"] = draw.choice([1e15, 2, 1.7e308, 2**63 - 1, 1.0 + draw.real(1e-9, 1e6)])
    elif kind == "weight":
        metrics["num-examples"] = draw.choice([0, -1, float("nan"), float("inf"), -0.5])
    elif kind == "out-of-range":
        metrics[draw.choice(scores)] = draw.choice([-1e-9, 1.0 + 1e-9, 2.0, -7.0, 1e300])
    elif kind == "non-finite":
        metrics[draw.choice([*scores, "num-examples"])] = draw.choice([float("nan"), float("inf"), float("-inf")])
    elif kind in ("list-metric", "string-metric"):
        metrics[draw.choice(sorted(metrics))] = draw.choice(LIST_VALUES if kind == "list-metric" else STRING_VALUES)
    elif kind == "extra-record":
        extra[draw.choice(["arrays", "config", "private"])] = ArrayRecord({"x": Array(np.zeros(3, np.float32))})
    elif kind == "forged-partial":
        extra[PARTIAL_AGGREGATE] = ConfigRecord(draw.choice(FORGED_PARTIALS))
    return RecordDict({"metrics": metric_record(metrics), **extra})


def malform_encoded(reply: Message, kind: str, draw: Draw, *, encoding: str) -> Message:
    """A copy of the well-formed ``reply`` encoded in ``encoding`` (``float16`` or ``int8``:
    the arrays of :func:`fedpref.models.encoding.encode_within`) made malformed in the way
    ``kind`` names (one of :data:`ENCODED_KINDS`)."""
    if kind not in ENCODED_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(ENCODED_KINDS)}")
    record = reply.content["arrays"]
    arrays = {k: v.numpy().copy() for k, v in record.items()}
    name = draw.choice(sorted(k for k in arrays if not k.endswith(SCALE_SUFFIX)))
    if kind == "shape":
        a = arrays[name]
        arrays[name] = np.resize(a, draw.choice([(a.size,), (a.shape[0] + 1,) + a.shape[1:], (a.shape[0] - 1,) + a.shape[1:], (1,) + a.shape]))
    elif kind == "dtype":
        other = [np.float32, np.float64, np.int8] if encoding == "float16" else [np.int16, np.uint8, np.float16, np.float32]
        arrays[name] = arrays[name].astype(draw.choice(other))
    elif kind == "not-an-array-record":
        content = RecordDict({"arrays": draw.choice([MetricRecord({"x": 1.0}), ConfigRecord({name: b"\0" * 8})]),
                              "metrics": reply.content["metrics"]})
        return reply_message(reply.metadata.src_node_id, content)
    elif kind == "unreadable":
        array = record[name]
        data = draw.choice([array.data[: -draw.integer(1, 16)], b"garbage", b""])
        out = dict(record.items())
        out[name] = Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=data)
        return rebuilt(reply, arrays=out)
    elif kind == "missing":
        arrays.pop(draw.choice(sorted(arrays)))
    elif kind == "bad-scale":
        if encoding == "int8":
            arrays[name + SCALE_SUFFIX] = draw.choice([np.array([np.nan], np.float32), np.array([np.inf], np.float32), np.zeros(1, np.float32),
                                                       -np.ones(1, np.float32), np.ones(2, np.float32), np.ones(1, np.float64)])
        else:
            arrays[name + SCALE_SUFFIX] = np.ones(1, np.float32)
    return rebuilt(reply, arrays={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def bad_key(node: int, kind: str, draw: Draw, *, taken: int = 0) -> Message:
    """A device's answer to the server's key query (``fedpref.server.grid.ask_device_keys``),
    malformed in the way ``kind`` names (one of :data:`KEY_KINDS`); ``taken``: a key another
    device gave (for ``duplicate``)."""
    if kind not in KEY_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KEY_KINDS)}")
    if kind == "no-record":
        content = draw.choice([RecordDict(), RecordDict({"device": MetricRecord({"key": 1})}), RecordDict({"config": ConfigRecord({"key": 1})})])
    else:
        key = {
            "not-a-number": lambda: draw.choice(["x", "7", b"\x07", ""]),
            "float": lambda: draw.choice([3.0, 0.5, float("inf"), float("nan")]),
            "bool": lambda: draw.choice([True, False]),
            "out-of-range": lambda: draw.choice([-1, -(2**63), 2**63, 10**30]),
            "list": lambda: draw.choice([[1], [1, 2], []]),
            "duplicate": lambda: taken,
        }[kind]()
        content = RecordDict({"device": ConfigRecord({"key": key})})
    return reply_from(_ask(node, MessageType.QUERY), content)


def _ask(node: int, message_type: str) -> Message:
    ask = Message(RecordDict(), dst_node_id=node, message_type=message_type)
    ask.metadata.__dict__["_message_id"] = f"ask-{node}"
    return ask


# -- one hostile device on Flower's Simulation Engine --------------------------------------

HOSTILE_DEVICE = 0  # the partition id of the device that :data:`app` makes hostile
# What the hostile device sends, by server round (training, evaluation): in round 1 a training
# reply with a metric the server does not expect and an evaluation reply with one left out (either
# used to make Flower's aggregation raise, and the run fail); in round 2 claims to weigh more than
# everyone (its model with num-examples 1e12; perfect hit rates with num-examples 1e15). In later
# rounds it answers honestly. Asked for its key before round 1 (fedpref.server.grid.ask_device_keys),
# it answers with a string (HOSTILE_KEY), which used to stop the ServerApp before its first round.
HOSTILE_KEY = "device-0"
SCRIPT = {1: ("extra-metric", "missing-metric"), 2: ("heavy", "heavy")}


class FirstDraw:
    """The first of every choice, the low end of every range: a fixed script."""

    def choice(self, options: Sequence):
        return options[0]

    def integer(self, low: int, high: int) -> int:
        return low

    def real(self, low: float, high: float) -> float:
        return low


app = ClientApp()


def _round(msg: Message) -> int:
    return int(msg.content["config"].get("server-round", 0)) if "config" in msg.content.config_records else 0


def _honest(msg: Message, context: Context) -> Message:
    from fedpref.simulations.engines.device import app as honest_app

    return honest_app(msg, context)


def _is_hostile(context: Context) -> bool:
    return int(context.node_config.get("partition-id", -1)) == HOSTILE_DEVICE


@app.train()
def _train(msg: Message, context: Context) -> Message:
    reply = _honest(msg, context)
    kind = SCRIPT.get(_round(msg), (None, None))[0]
    if not _is_hostile(context) or reply.has_error() or kind is None:
        return reply
    metrics = bad_metrics(dict(reply.content["metrics"].items()), kind, FirstDraw())
    return Message(RecordDict({"arrays": reply.content["arrays"], "metrics": metric_record(metrics)}), reply_to=msg)


@app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    reply = _honest(msg, context)
    kind = SCRIPT.get(_round(msg), (None, None))[1]
    if not _is_hostile(context) or reply.has_error() or kind is None:
        return reply
    return Message(bad_evaluation(reply.content, kind, FirstDraw()), reply_to=msg)


@app.query()
def _query(msg: Message, context: Context) -> Message:
    if _is_hostile(context):
        return Message(RecordDict({"device": ConfigRecord({"key": HOSTILE_KEY})}), reply_to=msg)
    return _honest(msg, context)
