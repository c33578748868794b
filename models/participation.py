"""How often a device may take part in a run's training: the one rule the device, the server's
cohort sampler and the simulation engines all apply (run-config ``dp-max-participations``).

With a cap of k (k > 0) a device joins at most k training rounds of a run and refuses the
rest; the honest privacy account (:mod:`fedpref.server.privacy`) rests on it, since it assumes
nothing about how cohorts are drawn. Under the tree mechanism (``dp-mechanism = tree``) the
rounds ``1..T`` (T = ``num-server-rounds``) are also cut into windows of ``ceil(T / k)``
rounds, and a device joins at most one round of each window: its participations are then at
least a window apart, as the tree's accounting assumes. Without a cap (k = 0) a device may
join every round.

The popularity histogram (round 0) is another release, accounted on its own: it counts
towards no cap. A device asked again for a round it has already joined (the stages of one
secure round) is not refused: the rule counts the *other* rounds it joined.
"""

from __future__ import annotations

import math

from fedpref.models.config import FederatedConfig

MAX_PARTICIPATIONS = 2**16 - 1  # the fast engine counts each device's participations in a uint16


def window(config: FederatedConfig) -> int:
    """The rounds in one window of the tree mechanism's rule: ``ceil(T / k)`` (0 when the rule
    does not apply: no cap, or another mechanism)."""
    k = config.dp_max_participations
    if k <= 0 or config.dp_mechanism != "tree":
        return 0
    return math.ceil(config.num_server_rounds / k)


def refusal(config: FederatedConfig, server_round: int, rounds_joined: int, last_joined: int = 0) -> str | None:
    """Why a device that has joined ``rounds_joined`` training rounds of this run, the latest
    being ``last_joined`` (0: none), may not train in ``server_round``; None if it may.
    Neither count includes ``server_round`` itself (a device that has joined it already is
    asked for a later stage of the same round, and may go on)."""
    k = config.dp_max_participations
    if k <= 0 or server_round < 1 or last_joined == server_round:
        return None
    if rounds_joined >= k:
        return (f"this device has taken part in {rounds_joined} training round{'s' if rounds_joined != 1 else ''} of this run, "
                f"the most a device may join (dp-max-participations = {k})")
    length = window(config)
    if length and last_joined >= 1 and (last_joined - 1) // length == (server_round - 1) // length:
        first = (server_round - 1) // length * length + 1
        return (f"this device took part in round {last_joined}, in the same window of {length} rounds "
                f"({first}..{first + length - 1}) as round {server_round}: a device joins at most one round of each window "
                f"(dp-mechanism = tree, dp-max-participations = {k})")
    return None


def may_train(config: FederatedConfig, server_round: int, rounds_joined: int, last_joined: int = 0) -> bool:
    """Whether a device may take part in training round ``server_round`` (see :func:`refusal`)."""
    return refusal(config, server_round, rounds_joined, last_joined) is None
