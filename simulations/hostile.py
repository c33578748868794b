"""Hostile devices' replies: every way a training reply can be malformed.

:func:`malform` turns a well-formed training reply (what a device's guard sends: ``global +
update`` in float32, within the clipping bound) into a malformed one of a given kind. The
choices inside a kind (which array, which value, how far) come from a ``draw`` object, so that
the same code serves hypothesis's property test (``tests/server/test_validation.py``, where
hypothesis draws them) and the reliability record (``fedpref reliability``, a seeded NumPy
generator): every reply it makes must be rejected by the server
(:mod:`fedpref.server.validation`), and the model must be as if it had never come.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from .inprocess import reply_from

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
    "metric": "a NaN or Inf metric",
    "oversized": "a message padded beyond max-reply-bytes",
    "extra-record": "a record the protocol does not have",
}


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


def reply_message(node: int, content: RecordDict) -> Message:
    """``content`` as a reply from ``node`` to a training message."""
    ask = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    ask.metadata.__dict__["_message_id"] = f"ask-{node}"
    return reply_from(ask, content)


def rebuilt(reply: Message, arrays=None, metrics=None, extra: dict | None = None) -> Message:
    """A copy of ``reply`` with other arrays, metrics or added records."""
    content = RecordDict({
        "arrays": ArrayRecord(arrays if arrays is not None else dict(reply.content["arrays"].items())),
        "metrics": MetricRecord(metrics if metrics is not None else dict(reply.content["metrics"].items())),
    })
    for key, record in (extra or {}).items():
        content[key] = record
    return reply_message(reply.metadata.src_node_id, content)


def update_norm(reply: Message, sent: dict[str, np.ndarray]) -> float:
    """The L2 norm of the update a reply carries (what it sent minus what the server sent)."""
    arrays = reply.content["arrays"]
    return float(np.sqrt(sum(np.sum((arrays[k].numpy().astype(np.float64) - sent[k].astype(np.float64)) ** 2) for k in sent)))


def malform(reply: Message, sent: dict[str, np.ndarray], kind: str, draw: Draw, *, bound: float) -> Message:
    """A copy of the well-formed ``reply`` made malformed in the way ``kind`` names (one of
    :data:`KINDS`); ``sent``: the global arrays of the round, ``bound``: its clipping bound."""
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
    elif kind in ("weight", "metric"):
        metrics = dict(reply.content["metrics"].items())
        if kind == "weight":
            metrics["num-examples"] = draw.choice([0, -3, float("nan"), float("inf"), -1.5])
        else:
            metrics[draw.choice(["train-loss", "num-examples"]) if "train-loss" in metrics else "num-examples"] = draw.choice([float("nan"), float("inf"), float("-inf")])
        return rebuilt(reply, metrics=metrics)
    elif kind == "oversized":
        size = sum(4 * int(np.prod(a.shape)) for a in sent.values()) + 64 * 1024
        return rebuilt(reply, extra={"config": ConfigRecord({"padding": b"\0" * (size + draw.integer(1, 4 * size))})})
    elif kind == "extra-record":
        return rebuilt(reply, extra={draw.choice(["more", "config", "private"]): ArrayRecord({"x": Array(np.zeros(3, np.float32))})})
    return rebuilt(reply, arrays={k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})
