"""Secure aggregation: Flower's SecAgg+ protocol under fedpref's strategies.

With ``secagg = true`` the server learns only the sum of each round's clipped updates, never
one device's. Flower 1.41 runs SecAgg+ (Bell et al., CCS 2020) only for its legacy strategy
API (``SecAggPlusWorkflow`` needs a ``LegacyContext``), while fedpref's strategies are the
Message-API ones (FedAdam and the DP wrappers). :class:`SecureAggregationGrid` joins the two:
it sits between fedpref's strategy and the grid and, when the strategy sends a round's
training messages, runs Flower's ``SecAggPlusWorkflow`` over exactly the devices the strategy
sampled, then hands the strategy, for each device whose update was summed, the global model
plus the average of the summed updates. The strategy (server optimiser, central DP noise) works on that
as it works on the plain average.

What each device sends under secure aggregation (``fedpref.client.app``):

- its clipped *update* (not ``global + update``), with equal weight (``num-examples = 1``), so
  every coordinate lies in [-C, C] and SecAgg+'s quantisation range is exactly C: nothing is
  clipped by quantisation. The quantisation has 2**22 levels (fewer for cohorts above 1,024
  devices, so that the masked sum cannot overflow SecAgg+'s 2**32 modulus);
- with distributed noise, the update plus its share of the noise, ``N(0, (z C)^2 / m)`` per
  coordinate; the quantisation range then widens to ``C + 8 z C / sqrt(m)``.

Options (run config): ``secagg-min-cohort`` (a cohort, or a round's surviving devices, below
this is refused or skipped), ``secagg-reconstruction-threshold`` (share of a device's key
shares needed to remove its masks: more protects against colluding neighbours, less tolerates
more dropouts), ``secagg-dropout-tolerance`` (a round survives this share of its cohort
dropping out after the keys are shared; beyond it the round is skipped before anything is
unmasked, with a log line), ``secagg-timeout`` (seconds to wait for each stage).
``secagg-num-shares`` sets how many neighbours hold shares of each device's keys (SecAgg+'s
sparse graph, :func:`shares_per_device`); a round also fails, and is skipped, when the
dropouts leave some device with fewer live neighbours than the reconstruction threshold.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedpref.models.federation import SECAGG_ARRAY_NAMES, SECAGG_COHORT, FederatedConfig, RunConfigError

log = logging.getLogger("fedpref.secagg")

QUANTIZATION_LEVELS = 2**22  # Flower's default
MODULUS = 2**32  # Flower's default and maximum


def quantization_levels(cohort: int) -> int:
    """Levels per coordinate: Flower's 2**22, or fewer so that the sum of ``cohort`` quantised
    vectors stays below the modulus (SecAgg+ sums modulo 2**32)."""
    return min(QUANTIZATION_LEVELS, (MODULUS - 1) // (cohort + 1))


def quantization_range(config: FederatedConfig, cohort: int, *, bound: float | None = None, noise_multiplier: float | None = None) -> float:
    """The bound R with every coordinate a device sends in [-R, R]: the clipping bound (a
    coordinate of an update is at most its L2 norm), widened by 8 standard deviations of the
    device's share of the noise when the noise is distributed. Defaults: the training's C and z."""
    bound = config.clip_norm if bound is None else bound
    z = config.dp_noise_multiplier if noise_multiplier is None else noise_multiplier
    if z > 0 and config.dp_noise_placement == "distributed":
        return bound * (1.0 + 8.0 * z / math.sqrt(cohort))
    return bound


def shares_per_device(config: FederatedConfig, cohort: int) -> int:
    """How many devices (itself included) hold shares of each device's keys: SecAgg+'s sparse
    neighbourhoods, ``2 * ceil(log2 m) + 1`` by default (Bell et al. 2020 take O(log m)), or
    ``secagg-num-shares``; never more than the cohort. Sharing among all m devices would cost
    O(m^3) Shamir work in Flower's pure-Python arithmetic: minutes a round at m = 150."""
    wanted = config.secagg_num_shares or 2 * math.ceil(math.log2(max(cohort, 2))) + 1
    return min(cohort, wanted)


def required_contributors(config: FederatedConfig, cohort: int) -> int:
    """Fewest devices whose updates a round's sum may hold: the dropout tolerance's share of
    the cohort, and never fewer than ``secagg-min-cohort``."""
    return max(config.secagg_min_cohort, math.ceil((1.0 - config.secagg_dropout_tolerance) * cohort - 1e-9))


def check_secagg(config: FederatedConfig, cohort: int) -> None:
    """Refuse a run whose cohort is too small for a sum to hide anyone."""
    if cohort < config.secagg_min_cohort:
        raise RunConfigError(
            f"secure aggregation over {cohort} devices a round is below secagg-min-cohort {config.secagg_min_cohort}: "
            "raise fraction-train (or min-train-nodes), or lower secagg-min-cohort if the population is small"
        )


@dataclass
class _Proxy:
    """What ``SecAggPlusWorkflow`` needs of a legacy client proxy: its node id."""

    node_id: int
    cid: str = ""


class _SumHolder(LegacyStrategy):
    """The legacy strategy that ``SecAggPlusWorkflow`` drives: it hands out the training tasks
    fedpref's strategy already made and keeps the unmasked average the workflow gives back."""

    def __init__(self) -> None:
        self.fit_tasks: list[tuple[_Proxy, FitIns]] = []
        self.average: list[np.ndarray] | None = None
        self.contributors: list[int] = []  # node ids whose updates the sum holds

    def initialize_parameters(self, client_manager):  # noqa: D102
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
        return self.fit_tasks

    def aggregate_fit(self, server_round, results, failures):  # noqa: D102
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
            self.contributors = [proxy.node_id for proxy, _ in results]
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: D102
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow that skips a round, before anything is unmasked, when fewer
    devices sent their masked update than the dropout tolerance allows."""

    def __init__(self, *args, required: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.required = required
        self.skipped_with: int | None = None

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        ok = super().collect_masked_vectors_stage(grid, context, state)
        if ok and len(state.active_node_ids) < self.required:
            self.skipped_with = len(state.active_node_ids)
            return False
        return ok


# Observers of every unmasked average (the only thing about the updates the server learns
# under secure aggregation): the leakage audit attacks exactly that. Called with
# (server_round, {name: average update}, contributing node ids).
_sum_observers: list = []


def add_sum_observer(observer) -> None:
    _sum_observers.append(observer)


def clear_sum_observers() -> None:
    _sum_observers.clear()


class SecureAggregationGrid:
    """A grid that runs each training round through SecAgg+ (see the module's docstring);
    everything else (evaluation, queries) passes through to ``grid``."""

    def __init__(self, grid, config: FederatedConfig, cohort: int) -> None:
        self._grid = grid
        self._config = config
        self._cohort = cohort
        self.rounds: dict[int, dict] = {}  # per round: sampled, contributed, skipped

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        is_training = bool(messages) and messages[0].metadata.message_type == MessageType.TRAIN and "arrays" in messages[0].content
        if not is_training:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        return self._secure_round(messages)

    def _secure_round(self, messages: list[Message]) -> list[Message]:
        first = messages[0]
        server_round = int(first.content["config"].get("server-round", 0))
        result = self.secure_sum(messages, bound=quantization_range(self._config, self._cohort), label=f"round {server_round}")
        self.rounds[server_round] = self.last
        if result is None:
            return []
        average, contributors = result
        for observer in _sum_observers:
            observer(server_round, average, list(contributors))
        # The strategy averages models: give it, for each device whose update the sum holds,
        # the global model plus the average update (one shared copy), so that its average is
        # that model and it counts the devices that contributed.
        current = {name: array.numpy() for name, array in first.content["arrays"].items()}
        model = ArrayRecord({name: Array((c.astype(np.float64) + average[name]).astype(c.dtype)) for name, c in current.items()})
        by_node = {m.metadata.dst_node_id: m for m in messages}
        return [
            Message(RecordDict({"arrays": model, "metrics": MetricRecord({"num-examples": 1})}), reply_to=by_node[node])
            for node in contributors
        ]

    def secure_sum(
        self, messages: list[Message], *, bound: float, label: str, planned: int | None = None
    ) -> tuple[dict[str, np.ndarray], list[int]] | None:
        """Run SecAgg+ over the devices ``messages`` go to (each message: the task's arrays
        and config); every coordinate a device sends lies in [-bound, bound]. Returns the
        average of what the devices sent and the node ids it holds, or None when the round
        is skipped (too many dropouts: nothing is unmasked). ``planned`` is the cohort the
        devices' shares of distributed noise are for (default: the training cohort).
        ``self.last`` records the round."""
        config = self._config
        first = messages[0]
        arrays = first.content["arrays"]
        names = list(arrays.keys())
        current = [arrays[name].numpy() for name in names]
        task_config = dict(first.content["config"])
        server_round = int(task_config.get("server-round", 0))
        cohort = len(messages)
        task_config[SECAGG_ARRAY_NAMES] = ",".join(names)  # a legacy config holds scalars only
        task_config[SECAGG_COHORT] = planned or self._cohort
        parameters = ndarrays_to_parameters(current)
        holder = _SumHolder()
        holder.fit_tasks = [(_Proxy(m.metadata.dst_node_id), FitIns(parameters, dict(task_config))) for m in messages]

        context = LegacyContext(
            Context(run_id=first.metadata.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=holder,
        )
        context.state[MAIN_PARAMS_RECORD] = ArrayRecord({str(i): Array(a) for i, a in enumerate(current)})
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
        required = required_contributors(config, cohort)
        shares = shares_per_device(config, cohort)
        workflow = _Workflow(
            1.0 if shares >= cohort else shares,
            config.secagg_reconstruction_threshold,
            max_weight=1.0,  # equal weights: each device sends num-examples = 1
            clipping_range=bound,
            quantization_range=quantization_levels(cohort),
            modulus_range=MODULUS,
            timeout=config.secagg_timeout or None,
            required=required,
        )
        workflow(self._grid, context)
        skipped = holder.average is None
        contributed = (workflow.skipped_with or 0) if skipped else len(holder.contributors)
        self.last = {"sampled": cohort, "contributed": contributed, "skipped": skipped}
        if skipped:
            got = workflow.skipped_with
            log.warning(
                "%s skipped: %s of %d devices sent their masked update, fewer than the %d that "
                "secagg-dropout-tolerance %.2f and secagg-min-cohort %d require; nothing was unmasked or released",
                label,
                got if got is not None else "too few",
                cohort,
                required,
                config.secagg_dropout_tolerance,
                config.secagg_min_cohort,
            )
            return None
        return dict(zip(names, holder.average, strict=True)), list(holder.contributors)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
