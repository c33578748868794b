"""Federated analytics for cold start: a differentially private histogram of item popularity.

The server never sees interactions, so it cannot count which items are popular, and a device
with no history has nothing to personalise from. Before training, the server asks a cohort of
devices (``popularity-fraction`` of them) for their items through the same secure aggregation
as training (``secagg`` must be on):

- each device sends an indicator vector over the catalogue with a 1 for each of at most
  ``popularity-max-items`` of its training items (a random subset when it has more), so its
  L2 norm is at most ``sqrt(max-items)``;
- SecAgg+ gives the server only the sum: each item's count over the cohort;
- Gaussian noise of standard deviation ``z * sqrt(max-items)`` goes on every count, added by
  the server after the sum (``dp-noise-placement = central``; drawn from the operating
  system's entropy, :class:`~fedpref.server.privacy.NoiseSource`) or shared among the devices
  before it (``distributed``), with ``z = popularity-noise-multiplier``;
- the sum is refused (the histogram skipped, with a log line) when it holds what the cohort
  cannot have sent (:func:`count_check`): a count below 0 or above the number of devices, or
  more ones in all than each device's ``max-items``, beyond the quantisation's rounding and
  bounds that distributed noise exceeds with probability at most 1e-9. A hostile device can
  still put a 1 on items it does not hold, or leave out items it does: its vector then looks
  like an honest one;
- the release is accounted as one :class:`~fedpref.server.privacy.DpMechanism` round (cohort
  drawn without replacement, replace-one neighbours: sensitivity ``2 sqrt(max-items)``, which
  bounds the ``sqrt(2 max-items)`` two indicator vectors can differ by). With DP training
  it is composed with the training rounds into the run's epsilon.

The noised counts are published with the model (``popularity.json`` in the results folder);
a device with no history can recommend the items with the highest counts.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedpref.models.config import POPULARITY_TASK, TASK, FederatedConfig

from .privacy import DpMechanism, NoiseSource
from .secure import SecureAggregationGrid, SumLimits, gaussian_max_bound

NAME = "popularity"  # the one array of the task


def popularity_cohort(config: FederatedConfig, n_devices: int) -> int:
    return min(n_devices, max(2, int(round(config.popularity_fraction * n_devices))))


def popularity_mechanism(config: FederatedConfig, n_devices: int) -> DpMechanism:
    """The histogram's release, in the units of its clipping bound sqrt(max-items)."""
    return DpMechanism(config.popularity_noise_multiplier, n_devices, popularity_cohort(config, n_devices))


def count_check(max_items: int):
    """The check on a histogram's sum: why the average of the devices' vectors cannot be that
    of honest indicator vectors with at most ``max_items`` ones each (None if it can). Slack:
    each device's quantisation rounding (under one step per coordinate) and, with distributed
    noise, bounds its noise exceeds with probability at most 1e-9 (on every count at once, and
    on the total)."""

    def check(average: dict[str, np.ndarray], limits: SumLimits) -> str | None:
        n = limits.contributors
        counts = np.asarray(average[NAME], dtype=np.float64) * n
        count_std = limits.device_std * math.sqrt(n)  # the noise on each count: n devices' shares
        per_count = n * limits.step + gaussian_max_bound(count_std, counts.size)
        in_all = counts.size * n * limits.step + gaussian_max_bound(count_std * math.sqrt(counts.size), 1)
        low, high, total = float(counts.min()), float(counts.max()), float(counts.sum())
        if low < -per_count:
            return f"an item counted {low:.4g} times: below 0"
        if high > n + per_count:
            return f"an item counted {high:.4g} times by {n} devices"
        if not -in_all <= total <= n * max_items + in_all:
            return f"{total:.4g} items counted in all, where {n} devices with at most {max_items} items each hold at most {n * max_items}"
        return None

    return check


def dp_popularity(secure: SecureAggregationGrid, nodes: list[int], config: FederatedConfig, n_items: int,
                  noise: NoiseSource | None = None) -> tuple[np.ndarray, list[int]] | None:
    """Run the histogram over the devices ``nodes``: the noised count of every item and the
    nodes whose vectors the sum holds, or None if the secure round was skipped or its sum
    refused (:func:`count_check`). Central noise comes from ``noise`` (default: fresh entropy
    from the operating system)."""
    bound = math.sqrt(config.popularity_max_items)
    content = RecordDict(
        {
            "arrays": ArrayRecord({NAME: Array(np.zeros(n_items, dtype=np.float32))}),
            "config": ConfigRecord({TASK: POPULARITY_TASK, "server-round": 0}),
        }
    )
    messages = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
    z = config.popularity_noise_multiplier
    result = secure.secure_sum(
        messages,
        bound=bound,
        label="the popularity histogram",
        planned=len(nodes),
        noise_multiplier=z,
        check=count_check(config.popularity_max_items),
    )
    if result is None:
        return None
    average, contributors = result
    counts = average[NAME] * len(contributors)
    if config.dp_noise_placement == "central":
        counts = counts + (noise or NoiseSource()).normal(0.0, z * bound, size=counts.shape)
    return counts, contributors

