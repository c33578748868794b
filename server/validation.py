"""Checks on every reply before the server aggregates it.

A device may be broken or hostile: it can send arrays under the wrong names, shapes or dtypes,
NaN or Inf, an update above the clipping bound, metrics the server does not expect, a weight it
has no right to, or a message large enough to exhaust the server. :func:`check_train_reply`
names what is wrong with a training reply (None if nothing is); the strategy
(``fedpref.server.app``) leaves such a reply out of the round, logs the reason with the sender's
node id, and counts it in the round's ``rejected``.

What is checked, in order (the first failure is the reason):

1. **size**: the whole content, arrays and records, at most ``max-reply-bytes`` (default: the
   shared arrays in float32 plus 64 KiB), measured before anything is decoded;
2. **records**: one ArrayRecord ``arrays`` and one MetricRecord ``metrics`` (and, from the fast
   engine's grid, its partial-aggregate record), nothing else;
3. **metric names**: exactly the keys an honest device sends in this run
   (:func:`train_metric_keys`, derived from the run config): Flower averages a round's
   MetricRecords only when they all hold the same keys, and the run store keeps what it
   averages, so one extra or missing key must not reach either;
4. **names, shapes, dtypes**: exactly the arrays the server sent, each in the shape and dtype sent;
5. **finite**: no NaN or Inf in any array; every metric one finite number, an int or a float
   (a list, a string or a bool is not: Flower could not average it, and the run would stop);
6. **norm**: the update (what was sent minus what the server sent) has L2 norm at most the
   round's clipping bound, times 1 + 1e-5 for float rounding (devices shave their updates to
   within C exactly: ``fedpref.client.guard.encode_update``). Under secure aggregation the server
   never sees one update: ``fedpref.server.secure`` checks the norm of the sum, which bounds a round, not a device;
7. **weight**: ``num-examples`` a positive number, at most what one device can hold
   (:func:`examples_bound`: run-config ``max-examples``, the catalogue's size, and in a
   simulation the longest history of the population; a partial aggregate that many times the
   devices it stands for); under DP exactly 1 (every device weighs the same, or the noise
   would not cover a device that claimed more).

Evaluation replies (:func:`check_evaluate_reply`) carry only metrics: at most 64 KiB, exactly the
keys of :func:`evaluate_metric_keys`, each one finite number, the hit rates and NDCGs in [0, 1],
and a weight of 1 (each device ranks one held-out item of each split; a partial aggregate: the
devices it stands for).

A partial aggregate's own counts (:func:`check_partial`: how many devices it stands for, how
many dropped out) are checked before the server counts anything with them, and only from a grid
that computes partial aggregates itself: from a device such a record is refused.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedpref.models.config import PARTIAL_AGGREGATE, FederatedConfig

NORM_TOLERANCE = 1e-5  # relative: float rounding, nothing more
RECORD_OVERHEAD = 64 * 1024  # bytes allowed beyond the arrays by default (metrics, names)
WEIGHT = "num-examples"  # the metric Flower's strategies weigh each reply by
TRAIN_METRICS = ("train-loss", "update-norm", "clipped")  # what a device reports of its round, without DP
EVALUATE_METRICS = tuple(f"{split}-{measure}" for split in ("val", "test") for measure in ("hr", "ndcg", "full-hr", "full-ndcg"))


def train_metric_keys(config: FederatedConfig) -> frozenset[str]:
    """The metric keys of every training reply of a run of ``config``, exactly (the client's
    ``fedpref.client.app.train``, the fast engine's partial aggregates and the secure grid's
    replies send these): ``num-examples``; without DP and secure aggregation also the
    loss, the update's norm before clipping and whether it was clipped; with adaptive clipping
    the clipped-or-not bit. Under DP nothing else leaves the device: the count, the loss and
    the norm would be outside the noise's protection."""
    if config.dp or config.secagg:
        return frozenset({WEIGHT, KEY_NORM_BIT} if config.dp and config.dp_clipping == "adaptive" else {WEIGHT})
    return frozenset({WEIGHT, *TRAIN_METRICS})


def evaluate_metric_keys(config: FederatedConfig) -> frozenset[str]:
    """The metric keys of every evaluation reply, exactly: ``num-examples`` and, for the
    validation and the test item, the hit and NDCG@k among the sampled candidates and in a
    full ranking."""
    return frozenset({WEIGHT, *EVALUATE_METRICS})


def examples_bound(config: FederatedConfig, n_items: int) -> tuple[int, str]:
    """The most ``num-examples`` one device may claim in a run of ``config`` over a catalogue
    of ``n_items``, and what sets it: run-config ``max-examples``, lowered to

    - in a simulation whose devices read their histories from the population folder
      (``history-dir``, no ``store-dir``), the longest history there, which the server reads too;
    - otherwise the catalogue's size: a device with a store trains on the distinct catalogue
      items of its history (``fedpref.client.Device.history_items``), never more.

    In a deployment a device may claim anything up to that bound; ``weighting=equal`` gives every
    device the same weight instead."""
    bound, source = config.max_examples, "run-config max-examples"
    indptr = Path(config.history_dir) / "train_indptr.npy" if config.history_dir else None
    if indptr is not None and not config.catalogue_size and not config.store_dir and indptr.is_file():
        lengths = np.diff(np.load(indptr, mmap_mode="r"))
        longest = int(lengths.max()) if len(lengths) else 0
        if 0 < longest < bound:
            bound, source = longest, f"the longest history in {config.history_dir}"
    elif 0 < n_items < bound:
        bound, source = n_items, "the catalogue's size (a device trains on distinct items)"
    return int(bound), source


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


def check_size(reply: Message, max_bytes: int, key: str = "run-config max-reply-bytes") -> str | None:
    """Why ``reply`` is too large to read, or None. ``key``: what sets the limit (for the reason)."""
    size = content_bytes(reply)
    if size > max_bytes:
        return f"oversized: {size:,} bytes, above the limit of {max_bytes:,} ({key})"
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
    metric_keys: Collection[str],
    max_examples: float,
    partial_allowed: bool = False,
) -> str | None:
    """Why the training ``reply`` must not be aggregated, or None if it may be.
    ``sent_global``: the arrays the server sent this round; ``bound``: the round's clipping bound
    (None: not checked, under secure aggregation); ``max_bytes``: the size limit (None: checked
    before, on the encoded reply); ``dp``: devices must weigh 1 each; ``metric_keys``: the
    metric names a reply must carry, no more and no fewer (:func:`train_metric_keys`);
    ``max_examples``: the most ``num-examples`` one device may claim (:func:`examples_bound`)."""
    if max_bytes is not None and (reason := check_size(reply, max_bytes)):
        return reason
    content = reply.content
    partial = content.config_records.get(PARTIAL_AGGREGATE) if partial_allowed else None
    records = set(content.array_records) | set(content.metric_records) | set(content.config_records)
    expected_records = {"arrays", "metrics"} | ({PARTIAL_AGGREGATE} if partial is not None else set())
    if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"} or records != expected_records:
        return f"records: expected an ArrayRecord 'arrays' and a MetricRecord 'metrics', got {sorted(records)}"
    metrics = content.metric_records["metrics"]
    if reason := _metric_names(metrics, metric_keys):
        return reason
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
    for key, value in metrics.items():
        if not _scalar(value):
            return _not_scalar(key, value)
    weight = metrics.get(WEIGHT)
    if not _number(weight) or not weight > 0:
        return f"num-examples must be a positive number, got {weight!r}"
    devices = _whole(partial.get("devices"), 1) if partial is not None else 1
    if devices is None:
        return f"partial aggregate: 'devices' must be a positive whole number, got {partial.get('devices')!r}"
    if dp:
        if weight != devices:
            return f"num-examples {weight!r} under DP: every device weighs 1 (the noise covers one device's update, not more)"
    elif weight > max_examples * devices:
        each = "" if devices == 1 else f" for each of {devices} devices"
        return f"num-examples {weight!r} above {max_examples:,}, the most one device may claim in this run{each} (logged as the run starts)"
    return None


def check_evaluate_reply(reply: Message, *, metric_keys: Collection[str], partial_allowed: bool = False) -> str | None:
    """Why an evaluation reply must not be averaged, or None if it may be. ``metric_keys``: the
    metric names it must carry, no more and no fewer (:func:`evaluate_metric_keys`)."""
    if reason := check_size(reply, RECORD_OVERHEAD, key="an evaluation reply's scalars"):
        return reason
    content = reply.content
    records = set(content.metric_records) | set(content.array_records) | set(content.config_records)
    allowed = {"metrics", PARTIAL_AGGREGATE} if partial_allowed else {"metrics"}
    if set(content.metric_records) != {"metrics"} or not records <= allowed:
        return f"records: expected one MetricRecord 'metrics', got {sorted(records)}"
    metrics = content.metric_records["metrics"]
    if reason := _metric_names(metrics, metric_keys):
        return reason
    for key, value in metrics.items():
        if not _scalar(value):
            return _not_scalar(key, value)
        if key.endswith(("-hr", "-ndcg")) and not 0.0 <= float(value) <= 1.0:
            return f"metric {key!r} = {value!r} outside [0, 1]"
    partial = content.config_records.get(PARTIAL_AGGREGATE)
    devices = _whole(partial.get("devices"), 1) if partial is not None else 1
    if devices is None:
        return f"partial aggregate: 'devices' must be a positive whole number, got {partial.get('devices')!r}"
    weight = metrics.get(WEIGHT)
    if not _number(weight) or weight != devices:
        return (f"num-examples must be {devices} (each device ranks one held-out item of each split), got {weight!r}")
    return None


def _metric_names(metrics: Mapping, expected: Collection[str]) -> str | None:
    """Why the names of ``metrics`` are not exactly ``expected``, or None. (A hostile device may
    send many long names: the reason shows a few, shortened.)"""
    names = set(metrics.keys())
    if names == set(expected):
        return None
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    shown = [repr(name if len(name) <= 40 else name[:37] + "...") for name in extra[:5]]
    more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
    return f"metric names: missing {missing}, unexpected [{', '.join(shown)}{more}]; a reply carries exactly {sorted(expected)}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(value) -> bool:
    """Whether a metric's value is one finite number, an int or a float. (Not a bool, which
    Flower's records refuse and no device sends; not a list, which Flower's records allow but
    could not average with another reply's number; not an int beyond float range, which the
    average could not multiply by its weight.)"""
    if not _number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _not_scalar(key: str, value) -> str:
    """The reason for a metric whose value is not one finite number (the value shortened)."""
    return f"metric {key!r} must be one finite number (an int or a float), got {type(value).__name__} {_short(value)}"


def check_partial(reply: Message, asked: int | None) -> str | None:
    """Why the partial-aggregate record of ``reply`` (from a grid that computes partial
    aggregates itself: the fast engine's) cannot be counted, or None if it can (or the reply
    has none). ``asked``: how many devices the round asked (None: not known). Its ``devices``
    must be a whole number of at least 1, its ``dropped`` (how many of those asked did not
    reply) a whole number of at least 0, the two together at most ``asked``; with adaptive
    clipping its ``norm-bits`` a whole number from 0 to ``devices``. The server counts these
    in the round's ``replies`` and ``dropped``, and the privacy ledger accounts the round with
    them, so nothing reads them before this check."""
    partial = reply.content.config_records.get(PARTIAL_AGGREGATE)
    if partial is None:
        return None
    devices = _whole(partial.get("devices"), 1)
    if devices is None:
        return f"partial aggregate: 'devices' must be a whole number of at least 1, got {_short(partial.get('devices'))}"
    dropped = _whole(partial.get("dropped"), 0)
    if dropped is None:
        return f"partial aggregate: 'dropped' must be a whole number of at least 0, got {_short(partial.get('dropped'))}"
    if asked is not None and devices + dropped > asked:
        return f"partial aggregate: {devices} devices and {dropped} dropped, more than the {asked} the round asked"
    if "norm-bits" in partial and ((bits := _whole(partial["norm-bits"], 0)) is None or bits > devices):
        return f"partial aggregate: 'norm-bits' must be a whole number from 0 to its {devices} devices, got {_short(partial.get('norm-bits'))}"
    return None


def partial_counts(reply: Message) -> tuple[int, int] | None:
    """(devices, dropped) of a partial aggregate that passed :func:`check_partial`, or None for
    a reply that is not one."""
    partial = reply.content.config_records.get(PARTIAL_AGGREGATE)
    if partial is None:
        return None
    return int(partial["devices"]), int(partial["dropped"])


def _whole(value, low: int) -> int | None:
    """``value`` as a whole number of at least ``low`` (an int, or a float with no fraction,
    within int64), or None."""
    if not _number(value):
        return None
    try:
        whole = int(value)
    except (OverflowError, ValueError):  # inf, nan
        return None
    if whole != value or not low <= whole < 2**63:
        return None
    return whole


def _short(value) -> str:
    """``value`` for a reason: its repr, at most 40 characters (a list: its first item and length)."""
    if isinstance(value, list):
        return f"[{_short(value[0])}, ...] ({len(value)} items)" if len(value) > 1 else repr(value)[:40]
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."
