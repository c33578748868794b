"""What leaves a device: the message keys, the replies, and the seeded streams behind them.

Every engine (Flower's ClientApp in :mod:`fedpref.client.app`, the fast engine's cohorts in
:mod:`fedpref.simulations.engines.fast`, the crafted replies of :mod:`fedpref.simulations.experiments.poison`)
builds what a device sends with the functions of this module, so that what may leave a device
is said once:

- a training reply carries the shared arrays (``global + clipped update``, or the clipped
  update itself, encoded) and the metrics of :func:`training_metrics`: under DP the equal
  weight 1 and, with adaptive clipping, the norm bit, nothing else; without DP the example
  count, the loss, the norm before clipping and whether it was clipped;
- a reply that stands for several devices (the fast engine's partial aggregate) carries their
  weighted average and :func:`partial_training_metrics`, the same quantities summed or averaged;
- an evaluation reply carries :func:`evaluation_metrics`: hits and NDCG of the device's own
  held-out items, nothing else;
- under secure aggregation a device sends its clipped update through SecAgg+ with equal weight
  and no metrics (:func:`secure_training_content`).

The seeded generators of a device's round are named here too (:class:`Stream`): every engine
draws a device's training, evaluation, coins and subsets from ``stream_rng(seed, device,
round, stream)``, which is what makes the engines agree draw for draw.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_NORM_BIT

if TYPE_CHECKING:
    from .config import FederatedConfig

# Keys of a secure round's training task (server.secure writes them, client.app reads them):
SECAGG_ARRAY_NAMES = "secagg-array-names"  # the order of the shared arrays in the legacy task
SECAGG_COHORT = "secagg-cohort"  # m, for each device's share of distributed noise
TASK = "task"  # a secure round's task: absent for training, POPULARITY_TASK for the histogram
POPULARITY_TASK = "popularity"
# A reply that stands for several devices' replies (the fast engine's, fedpref.simulations.engines.fast):
# its arrays and metrics are their weighted average, its "num-examples" their summed weight, and
# this ConfigRecord says how many devices it covers ("devices"), how many of those asked did
# not reply ("dropped") and, with adaptive clipping, how many sent the norm bit ("norm-bits").
PARTIAL_AGGREGATE = "partial-aggregate"

WEIGHT = "num-examples"  # the metric Flower's strategies weigh each reply by
TRAIN_METRICS = ("train-loss", "update-norm", "clipped")  # what a device reports of its round, without DP
NORM_BIT = KEY_NORM_BIT  # adaptive clipping's bit: 1 when the update fitted within the bound
EVALUATION_SPLITS = ("val", "test")


class Stream(IntEnum):
    """The seeded generators of a device: ``stream_rng(seed, device, round, stream)``.

    The values are part of what makes runs repeat and engines agree: never renumber them."""

    TRAIN = 1  # local training (negatives, shuffles)
    EVALUATE = 2  # federated evaluation (refit, tie-breaking of ranks)
    DROPOUT = 3  # a simulated device's dropout coin
    ROUNDING = 4  # stochastic rounding of an encoded update
    POPULARITY = 5  # the subset of items a device counts in the popularity histogram
    STRAGGLER = 6  # a simulated device's straggler coin
    AVAILABILITY = 6  # simulated availability ``random:P`` (the same coin as the straggler's)
    TIME_ZONE = 7  # simulated availability ``diurnal``: the device's time zone (no round)
    ATTACK = 0xB0057  # a compromised device's crafted update (fedpref.simulations.experiments.poison)


def stream_rng(seed: int, device: int, server_round: int | None, stream: Stream) -> np.random.Generator:
    """The generator of ``device``'s ``stream`` in ``server_round`` (``None``: a stream that
    does not change with the round)."""
    if server_round is None:
        return np.random.default_rng([seed, device, int(stream)])
    return np.random.default_rng([seed, device, server_round, int(stream)])


# -- training replies ---------------------------------------------------------------------------


def training_metrics(config: FederatedConfig, *, examples: int, loss: float, norm: float, clipped: bool) -> dict[str, int | float]:
    """The metrics of one device's training reply. ``norm`` is the update's norm before
    clipping, ``clipped`` whether the bound cut it."""
    if config.dp:
        # Under DP every update carries the same weight and nothing else leaves: the example
        # count, the loss and the norm before clipping are outside the noise's protection.
        # Adaptive clipping adds one bit, whether this update fitted within C; the server
        # noises the count of those bits and the accountant covers it. The bit is Andrew et
        # al.'s (2021): 1 when *not* clipped. Flower's server moves C by
        # exp(-lr * (share of bits - target)), which with that bit makes C follow the target
        # quantile of the norms; Flower's own adaptiveclipping_mod (1.41) sends 1 when the
        # update *was* clipped, which drives C the wrong way (docs/privacy.md).
        metrics: dict[str, int | float] = {WEIGHT: 1}
        if config.dp_clipping == "adaptive":
            metrics[NORM_BIT] = int(not clipped)
        return metrics
    return {WEIGHT: int(examples), "train-loss": float(loss), "update-norm": float(norm), "clipped": float(clipped)}


def partial_training_metrics(config: FederatedConfig, weights: np.ndarray, examples: np.ndarray, loss: np.ndarray,
                             norm: np.ndarray, clipped: np.ndarray, dropped: int) -> tuple[dict[str, int | float], dict[str, int | float]]:
    """The metrics and the :data:`PARTIAL_AGGREGATE` record of a reply that stands for the
    devices whose replies it sums: ``weights`` each device's weight in the average, ``examples``,
    ``loss``, ``norm``, ``clipped`` what each would have reported (:func:`training_metrics`),
    ``dropped`` how many of those asked did not reply."""
    contributing = len(weights)
    total = float(weights.sum())
    metrics: dict[str, int | float]
    if config.dp:
        metrics = {WEIGHT: contributing}
        if config.dp_clipping == "adaptive":
            metrics[NORM_BIT] = float((~clipped).sum()) / contributing
    else:
        share = weights / total
        metrics = {
            WEIGHT: int(total),
            "train-loss": float(share @ loss),
            "update-norm": float(share @ norm),
            "clipped": float(share @ clipped.astype(np.float64)),
        }
    partial: dict[str, int | float] = {"devices": contributing, "dropped": dropped, "weight": total}
    if config.dp and config.dp_clipping == "adaptive":
        partial["norm-bits"] = int((~clipped).sum())
    return metrics, partial


def training_content(arrays: Mapping[str, np.ndarray], metrics: Mapping[str, int | float],
                     partial: Mapping[str, int | float] | None = None) -> RecordDict:
    """The content of a training reply: the arrays a device sends and its metrics (and, for a
    reply that stands for several devices, its :data:`PARTIAL_AGGREGATE` record)."""
    content = RecordDict({"arrays": _arrays(arrays), "metrics": MetricRecord(dict(metrics))})
    if partial is not None:
        content[PARTIAL_AGGREGATE] = ConfigRecord(dict(partial))
    return content


def aggregate_content(arrays: ArrayRecord) -> RecordDict:
    """A reply that carries an aggregate its sender has already summed (the secure grid's sum
    of a cohort's masked updates), with the weight of one reply."""
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({WEIGHT: 1})})


def secure_training_content(names: list[str], sent: Mapping[str, np.ndarray]) -> RecordDict:
    """A secure round's reply, in SecAgg+'s legacy format: the clipped update (or the
    popularity indicator) itself, ordered as the task's ``names``, with equal weight and no
    metrics; ``secaggplus_mod`` masks it before it leaves."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    parameters = ndarrays_to_parameters([np.asarray(sent[name], dtype=np.float64) for name in names])
    return fitres_to_recorddict(FitRes(Status(Code.OK, ""), parameters, num_examples=1, metrics={}), keep_input=True)


# -- evaluation replies -------------------------------------------------------------------------


def evaluation_metrics(ranks: np.ndarray, k: int) -> dict[str, float | int]:
    """The metrics of an evaluation reply for the devices whose ``ranks`` it carries (one row a
    device: sampled and full rank of its validation item, then of its test item): the number of
    devices, and their HR@k and NDCG@k on each split."""
    from .metrics import ndcg

    ranks = np.asarray(ranks).reshape(-1, 4)
    metrics: dict[str, float | int] = {WEIGHT: len(ranks)}
    for col, which in ((0, "val"), (2, "test")):
        metrics[f"{which}-hr"] = float(np.mean(ranks[:, col] < k))
        metrics[f"{which}-ndcg"] = ndcg(ranks[:, col], k)
        metrics[f"{which}-full-hr"] = float(np.mean(ranks[:, col + 1] < k))
        metrics[f"{which}-full-ndcg"] = ndcg(ranks[:, col + 1], k)
    return metrics


def evaluation_content(metrics: Mapping[str, float | int], partial: Mapping[str, int | float] | None = None) -> RecordDict:
    """The content of an evaluation reply (scalars only)."""
    content = RecordDict({"metrics": MetricRecord(dict(metrics))})
    if partial is not None:
        content[PARTIAL_AGGREGATE] = ConfigRecord(dict(partial))
    return content


def _arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})
