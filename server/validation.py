"""Checks on every reply before the server aggregates it.

A device may be broken or hostile: it can send arrays under the wrong names, shapes or dtypes,
NaN or Inf, an update above the clipping bound, a weight it has no right to, or a message large
enough to exhaust the server. :func:`check_train_reply` names what is wrong with a training
reply (None if nothing is); the strategy (``fedpref.server.app``) leaves such a reply out of the
round, logs the reason with the sender's node id, and counts it in the round's ``rejected``.

What is checked, in order (the first failure is the reason):

1. **size**: the whole content, arrays and records, at most ``max-reply-bytes`` (default: the
   shared arrays in float32 plus 64 KiB), measured before anything is decoded;
2. **records**: one ArrayRecord ``arrays`` and one MetricRecord ``metrics`` (and, from the fast
   engine's grid, its partial-aggregate record), nothing else;
3. **names, shapes, dtypes**: exactly the arrays the server sent, each in the shape and dtype sent;
4. **finite**: no NaN or Inf in any array or metric;
5. **norm**: the update (what was sent minus what the server sent) has L2 norm at most the
   round's clipping bound, times 1 + 1e-5 for float rounding (devices shave their updates to
   within C exactly: ``fedpref.client.guard.encode_update``). Under secure aggregation the server
   never sees one update, and SecAgg+'s quantisation bounds each coordinate instead;
6. **weight**: ``num-examples`` a positive number; under DP exactly 1 (every device weighs the
   same, or the noise would not cover a device that claimed more).

Evaluation replies carry only metrics: they must be finite, the hit rates and NDCGs in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Message

from fedpref.models.federation import PARTIAL_AGGREGATE

NORM_TOLERANCE = 1e-5  # relative: float rounding, nothing more
RECORD_OVERHEAD = 64 * 1024  # bytes allowed beyond the arrays by default (metrics, names)


def default_max_bytes(sent_global: Mapping[str, np.ndarray]) -> int:
    """The default size limit of a training reply: the shared arrays in float32, plus 64 KiB."""
    return int(sum(4 * int(np.prod(a.shape)) for a in sent_global.values())) + RECORD_OVERHEAD


def content_bytes(message: Message) -> int:
    """The size of a reply's content as it travels: array data, and each record entry's key and
    value (numbers 8 bytes, strings and bytes their length, lists their items)."""
    content = message.content
    total = 0
    for name, record in content.array_records.items():
        total += len(name)
        for key, array in record.items():
            total += len(key) + len(array.data) + 8 * len(array.shape) + len(array.dtype)
    for records in (content.metric_records, content.config_records):
        for name, record in records.items():
            total += len(name)
            for key, value in record.items():
                total += len(key) + _value_bytes(value)
    return total


def check_size(reply: Message, max_bytes: int) -> str | None:
    """Why ``reply`` is too large to read, or None."""
    size = content_bytes(reply)
    if size > max_bytes:
        return f"oversized: {size:,} bytes, above the limit of {max_bytes:,} (run-config max-reply-bytes)"
    return None


def _value_bytes(value) -> int:
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8


def check_train_reply(
    reply: Message,
    sent_global: Mapping[str, np.ndarray],
    *,
    bound: float | None,
    max_bytes: int | None,
    dp: bool,
    partial_allowed: bool = False,
) -> str | None:
    """Why the training ``reply`` must not be aggregated, or None if it may be.
    ``sent_global``: the arrays the server sent this round; ``bound``: the round's clipping bound
    (None: not checked, under secure aggregation); ``max_bytes``: the size limit (None: checked
    before, on the encoded reply); ``dp``: devices must weigh 1 each."""
    if max_bytes is not None and (reason := check_size(reply, max_bytes)):
        return reason
    content = reply.content
    partial = content.config_records.get(PARTIAL_AGGREGATE) if partial_allowed else None
    records = set(content.array_records) | set(content.metric_records) | set(content.config_records)
    expected_records = {"arrays", "metrics"} | ({PARTIAL_AGGREGATE} if partial is not None else set())
    if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"} or records != expected_records:
        return f"records: expected an ArrayRecord 'arrays' and a MetricRecord 'metrics', got {sorted(records)}"
    arrays = content.array_records["arrays"]
    names = list(arrays.keys())
    if set(names) != set(sent_global):
        missing, extra = sorted(set(sent_global) - set(names)), sorted(set(names) - set(sent_global))
        return f"array names: missing {missing}, unexpected {extra}"
    update_sq = 0.0
    for name, expected in sent_global.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(expected.shape):
            return f"shape of {name!r}: {tuple(array.shape)}, expected {tuple(expected.shape)}"
        if array.dtype != str(expected.dtype):
            return f"dtype of {name!r}: {array.dtype}, expected {expected.dtype}"
        try:
            values = array.numpy()
        except Exception as exc:  # data that do not match the declared shape and dtype
            return f"array {name!r} unreadable: {type(exc).__name__}: {exc}"
        if values.shape != tuple(expected.shape):
            return f"array {name!r} unreadable: its data hold shape {values.shape}"
        if not np.isfinite(values).all():
            return f"non-finite values (NaN or Inf) in {name!r}"
        if bound is not None:
            diff = values.astype(np.float64) - expected.astype(np.float64)
            update_sq += float(np.dot(diff.ravel(), diff.ravel()))
    if bound is not None:
        norm = math.sqrt(update_sq)
        if norm > bound * (1.0 + NORM_TOLERANCE):
            return f"update norm {norm:.6g} above the clipping bound {bound:.6g}"
    metrics = content.metric_records["metrics"]
    for key, value in metrics.items():
        if not _finite(value):
            return f"metric {key!r} is not a finite number"
    weight = metrics.get("num-examples")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
        return f"num-examples must be a positive number, got {weight!r}"
    if dp:
        devices = int(partial["devices"]) if partial is not None else 1
        if weight != devices:
            return f"num-examples {weight!r} under DP: every device weighs 1 (the noise covers one device's update, not more)"
    return None


def check_evaluate_reply(reply: Message, *, partial_allowed: bool = False) -> str | None:
    """Why an evaluation reply must not be averaged, or None if it may be."""
    content = reply.content
    records = set(content.metric_records) | set(content.array_records) | set(content.config_records)
    allowed = {"metrics", PARTIAL_AGGREGATE} if partial_allowed else {"metrics"}
    if set(content.metric_records) != {"metrics"} or not records <= allowed:
        return f"records: expected one MetricRecord 'metrics', got {sorted(records)}"
    metrics = content.metric_records["metrics"]
    for key, value in metrics.items():
        if not _finite(value):
            return f"metric {key!r} is not a finite number"
        if key.endswith(("-hr", "-ndcg")) and not 0.0 <= float(value) <= 1.0:
            return f"metric {key!r} = {value!r} outside [0, 1]"
    weight = metrics.get("num-examples")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
        return f"num-examples must be a positive number, got {weight!r}"
    return None


def _finite(value) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return False
