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

A hostile device. Flower's workflow reads every reply as it comes; fedpref's checks each one
before it does (:class:`_Workflow`): at *setup*, two public keys that parse as SECP384R1 keys
and that no other device sent; at *share keys*, one ciphertext (bytes) for exactly each live
neighbour; at *collect masked vectors*, the weight and one masked array per shared array, each
int64 of the shape sent (its .npy header read before its data) with every entry in
[0, 2**32); at *unmask*, one share laid out as Shamir's are for exactly each neighbour. A reply
that fails its check counts as a dropout, so SecAgg+'s own dropout handling leaves out what
that device contributed (within ``secagg-dropout-tolerance``; beyond it the round is skipped).
A device that left before its key shares went out is no longer part of the round. Any failure
left (a share that is well formed but wrong) skips the round with a log line, never the run.

Then the unmasked sum is checked (:func:`sum_limit`, :func:`check_average`): every coordinate
of the average within the quantisation range, and its L2 norm at most the clipping bound plus
the quantisation's rounding plus a bound the norm of the devices' distributed noise exceeds
with probability at most 1e-9. A sum beyond that is refused: the round is skipped, logged and
counted (``refused``). What this does not cover: the sum hides who sent what, so a device that
sends well-formed but wrong values (an update above C, a weight that shrinks the round's step)
is not found while the sum stays within the limit; the damage it can do in a round is bounded
by what the whole cohort's bound allows (the average moves at most C, plus the noise
allowance), not by one device's share of it (C/m). A device can also make a round fail (key
shares its neighbours cannot decrypt, a wrong share at unmask): that costs the round.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from fedpref.models.config import SECAGG_ARRAY_NAMES, SECAGG_COHORT, FederatedConfig, RunConfigError
from fedpref.models.wire import aggregate_content
from fedpref.server.grid import GridView

log = logging.getLogger("fedpref.secagg")

QUANTIZATION_LEVELS = 2**22  # Flower's default
MODULUS = 2**32  # Flower's default and maximum
NOISE_TAIL = 1e-9  # the chance that honest devices' distributed noise alone fails a check on the sum
FLOAT_SLACK = 1e-5  # relative: float32 updates shaved to within C, summed in float64


def quantization_levels(cohort: int) -> int:
    """Levels per coordinate: Flower's 2**22, or fewer so that the sum of ``cohort`` quantised
    vectors stays below the modulus (SecAgg+ sums modulo 2**32)."""
    return min(QUANTIZATION_LEVELS, (MODULUS - 1) // (cohort + 1))


def quantization_range(config: FederatedConfig, cohort: int, *, bound: float | None = None, noise_multiplier: float | None = None) -> float:
    """The bound R with every coordinate a device sends in [-R, R]: the clipping bound (a
    coordinate of an update is at most its L2 norm), widened by 8 standard deviations of the
    device's share of the noise when the noise is distributed. Defaults: the training's C and z."""
    bound = config.clip_norm if bound is None else bound
    return bound + 8.0 * device_noise_std(config, cohort, bound=bound, noise_multiplier=noise_multiplier)


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


def device_noise_std(config: FederatedConfig, planned: int, *, bound: float | None = None, noise_multiplier: float | None = None) -> float:
    """The standard deviation of the noise each device adds to every coordinate it sends: its
    share ``z * bound / sqrt(planned)`` of distributed noise, or 0 (no noise, or the server adds it)."""
    bound = config.clip_norm if bound is None else bound
    z = config.dp_noise_multiplier if noise_multiplier is None else noise_multiplier
    if z > 0 and config.dp_noise_placement == "distributed":
        return z * bound / math.sqrt(planned)
    return 0.0


def gaussian_norm_bound(std: float, dims: int, tail: float = NOISE_TAIL) -> float:
    """A bound the L2 norm of ``dims`` independent N(0, std^2) draws exceeds with probability at
    most ``tail``: ``std * (sqrt(dims) + sqrt(2 ln(1/tail)))`` (the norm's mean is at most
    std * sqrt(dims), and as a 1-Lipschitz function of the draws it exceeds its mean by t
    with probability at most exp(-t^2 / (2 std^2)): Gaussian concentration)."""
    return std * (math.sqrt(dims) + math.sqrt(2.0 * math.log(1.0 / tail)))


def gaussian_max_bound(std: float, dims: int, tail: float = NOISE_TAIL) -> float:
    """A bound the largest absolute value of ``dims`` independent N(0, std^2) draws exceeds
    with probability at most ``tail``: ``std * sqrt(2 ln(2 dims / tail))`` (a union bound)."""
    return std * math.sqrt(2.0 * math.log(2.0 * dims / tail))


@dataclass(frozen=True)
class SumLimits:
    """What the average of ``contributors`` honest devices' vectors can be (:func:`sum_limit`)."""

    contributors: int
    dims: int  # coordinates in all
    bound: float  # each device's L2 bound before noise (C)
    coordinate: float  # every coordinate a device sends lies in [-coordinate, coordinate] (R)
    step: float  # the quantisation step 2R / levels: a device's rounding error per coordinate
    device_std: float  # each device's noise per coordinate (0 without distributed noise)
    norm: float  # the largest L2 norm of an honest average


def sum_limit(config: FederatedConfig, *, contributors: int, dims: int, bound: float, coordinate: float,
              levels: int, device_std: float) -> SumLimits:
    """The largest L2 norm the average of ``contributors`` honest devices' vectors can have:

    - the clipping bound ``bound`` (an average of vectors of norm at most C has norm at most
      C), times 1 + 1e-5 for float rounding;
    - plus the quantisation's rounding: every device's coordinate is off by less than one step
      2R / levels, so the average is off by less than ``sqrt(dims) * step`` in norm;
    - plus, with distributed noise, a bound on the norm of the noise in the average (each
      coordinate N(0, std^2 / contributors)) that it exceeds with probability at most 1e-9
      (:func:`gaussian_norm_bound`).
    """
    step = 2.0 * coordinate / levels
    noise = gaussian_norm_bound(device_std / math.sqrt(contributors), dims) if device_std > 0 else 0.0
    norm = bound * (1.0 + FLOAT_SLACK) + math.sqrt(dims) * step + noise
    return SumLimits(contributors, dims, bound, coordinate, step, device_std, norm)


def check_average(average: dict[str, np.ndarray], limits: SumLimits) -> str | None:
    """Why ``average`` cannot be the average of honest devices' vectors (None if it can): a
    coordinate not finite or outside [-R, R], or an L2 norm above ``limits.norm``."""
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in average.values()])
    if not np.all(np.isfinite(flat)):
        return "the average holds NaN or Inf"
    largest = float(np.abs(flat).max()) if flat.size else 0.0
    if largest > limits.coordinate * (1.0 + FLOAT_SLACK):
        return f"a coordinate of the average is {largest:.4g}, beyond the {limits.coordinate:.4g} every device's coordinates lie within"
    norm = float(np.linalg.norm(flat))
    if norm > limits.norm:
        return (f"the average's L2 norm is {norm:.4g}, beyond the {limits.norm:.4g} that {limits.contributors} devices "
                f"with updates of norm at most {limits.bound:.4g} can reach"
                + (" with their noise" if limits.device_std > 0 else ""))
    return None


# -- checks on each SecAgg+ reply ---------------------------------------------------------


class _BadReply(ValueError):
    """What is wrong with one device's reply at one stage of SecAgg+."""


_CURVE = "secp384r1"  # the curve of the keys secaggplus_mod makes (flwr.supercore.primitives.asymmetric)
_MAX_KEY_BYTES = 1024  # a PEM public key on SECP384R1 is 215 bytes
_MAX_SHARE_BYTES = 4 + 16 * 64  # Flower's Shamir shares: 4 + 16k bytes (52 for a mask seed, 324 for a PEM private key)
_REFUSED_CODE = 4001  # the error code of a reply the server refused (Flower's own codes are below 10)


def _stage_record(reply: Message) -> ConfigRecord:
    if not reply.has_content() or RECORD_KEY_CONFIGS not in reply.content.config_records:
        raise _BadReply(f"no config record {RECORD_KEY_CONFIGS!r}")
    return reply.content.config_records[RECORD_KEY_CONFIGS]


def _list_of(record: ConfigRecord, key: str, kind: type) -> list:
    if key not in record:
        raise _BadReply(f"no {key!r}")
    value = record[key]
    if not isinstance(value, list) or any(type(v) is not kind for v in value):  # noqa: E721 - bool is not an int here
        raise _BadReply(f"{key!r} is not a list of {kind.__name__}")
    return value


def _one_each(record: ConfigRecord, ids_key: str, values_key: str, expected: set[int]) -> list[bytes] | None:
    """The byte strings under ``values_key`` if the node ids under ``ids_key`` name each node of
    ``expected`` exactly once, one value each; None otherwise."""
    ids, values = _list_of(record, ids_key, int), _list_of(record, values_key, bytes)
    if len(ids) != len(values) or len(set(ids)) != len(ids) or set(ids) != expected:
        return None
    return values


def _check_public_keys(record: ConfigRecord) -> tuple[bytes, bytes]:
    keys = []
    for key in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2):
        value = record.get(key)
        if type(value) is not bytes or len(value) > _MAX_KEY_BYTES:
            raise _BadReply(f"{key!r} is not a public key")
        try:
            public = bytes_to_public_key(value)
        except Exception as exc:  # noqa: BLE001 - any parse failure means the same
            raise _BadReply(f"{key!r} does not parse as a public key ({type(exc).__name__})") from None
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != _CURVE:
            raise _BadReply(f"{key!r} is not a key on {_CURVE}")
        keys.append(value)
    return keys[0], keys[1]


def _check_masked_vector(data: object, shape: tuple[int, ...], modulus: int) -> None:
    """One masked array: serialised .npy (read without pickle), int64 of ``shape``, every entry
    in [0, modulus). Its header is read before the array, so a claim of a huge shape is refused
    unread."""
    if type(data) is not bytes:
        raise _BadReply("a masked array is not bytes")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            got, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            got, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise _BadReply(f"a masked array in .npy format {version}")
    except _BadReply:
        raise
    except Exception as exc:  # noqa: BLE001 - not an .npy header
        raise _BadReply(f"a masked array is not an .npy array ({type(exc).__name__})") from None
    if tuple(got) != tuple(shape) or dtype != np.dtype(np.int64):
        raise _BadReply(f"a masked array of shape {tuple(got)} and dtype {dtype}, not {tuple(shape)} int64")
    if len(data) - stream.tell() != math.prod(shape) * 8:
        raise _BadReply("a masked array's data does not match its header")
    array = np.frombuffer(data, dtype=dtype, offset=stream.tell())  # a view: no copy of what Flower decodes next
    if array.size and (int(array.min()) < 0 or int(array.max()) >= modulus):
        raise _BadReply(f"a masked array with entries outside [0, {modulus})")


class _StageGrid(GridView):
    """The grid one SecAgg+ stage talks through. Before Flower's stage reads the replies, each
    is checked; one that fails its check becomes an error reply, which the stage counts as a
    dropout. Replies from devices that were not asked, and second replies, are dropped."""

    def __init__(self, grid, stage: str, check: Callable[[list[Message]], dict[int, str]], refused: list) -> None:
        super().__init__(grid)
        self._stage = stage
        self._check = check
        self._refused = refused

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        asked = {m.metadata.dst_node_id for m in messages}
        replies, seen = [], set()
        for reply in self._grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if node in asked and node not in seen:
                seen.add(node)
                replies.append(reply)
        problems = self._check([r for r in replies if not r.has_error()])
        checked = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in problems:
                log.warning("SecAgg+ %s: the reply of node %d is refused and counts as a dropout: %s", self._stage, node, problems[node])
                self._refused.append({"node": node, "stage": self._stage, "reason": problems[node]})
                reply = Message(Error(code=_REFUSED_CODE, reason=f"refused at {self._stage}: {problems[node]}"), metadata=reply.metadata)
            checked.append(reply)
        return checked


def _each(replies: list[Message], check: Callable[[Message], None]) -> dict[int, str]:
    problems = {}
    for reply in replies:
        try:
            check(reply)
        except _BadReply as exc:
            problems[reply.metadata.src_node_id] = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure to read a reply refuses it
            problems[reply.metadata.src_node_id] = f"{type(exc).__name__}: {exc}"
    return problems


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
    """Flower's SecAgg+ workflow with every reply checked (a bad one counts as a dropout, see
    :class:`_StageGrid`), that skips a round, before anything is unmasked, when fewer devices
    sent their masked update than the dropout tolerance allows."""

    def __init__(self, *args, required: int, shapes: list[tuple[int, ...]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.required = required
        self.shapes = [(1,)] + [tuple(s) for s in shapes]  # the weight, then each shared array
        self.skipped_with: int | None = None
        self.collected = 0  # devices whose masked vectors the sum holds
        self.halted_at: str | None = None  # the stage after which SecAgg+ stopped
        self.refused: list[dict] = []  # {"node", "stage", "reason"} for each refused reply

    def _checked(self, grid, stage: str, check: Callable[[list[Message]], dict[int, str]]) -> _StageGrid:
        return _StageGrid(grid, stage, check, self.refused)

    def setup_stage(self, grid, context, state) -> bool:
        def check(replies: list[Message]) -> dict[int, str]:
            keys: dict[int, tuple[bytes, bytes]] = {}

            def one(reply: Message) -> None:
                keys[reply.metadata.src_node_id] = _check_public_keys(_stage_record(reply))

            problems = _each(replies, one)
            # Every key must be unique: a device's neighbours refuse a set of keys with a repeat.
            # Honest devices make fresh keys each round, so a repeat is a hostile device's.
            seen: dict[bytes, list[int]] = {}
            for node, pair in keys.items():
                for key in set(pair):
                    seen.setdefault(key, []).append(node)
                if pair[0] == pair[1]:
                    problems[node] = "its two public keys are the same"
            for nodes in seen.values():
                if len(nodes) > 1:
                    for node in nodes:
                        problems[node] = "a public key another device also sent"
            return problems

        return self._went_on("setup", super().setup_stage(self._checked(grid, "setup", check), context, state))

    def share_keys_stage(self, grid, context, state) -> bool:
        def one(reply: Message) -> None:
            node = reply.metadata.src_node_id
            record = _stage_record(reply)
            expected = (state.nid_to_neighbours[node] & state.active_node_ids) - {node}
            if _one_each(record, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST, expected) is None:
                raise _BadReply("its key shares are not one for each of its live neighbours")

        ok = super().share_keys_stage(self._checked(grid, "share keys", lambda replies: _each(replies, one)), context, state)
        # A device that left before its key shares went out (at setup or here, refused or
        # silent) is in nobody's masks and nobody holds its secrets: it is no longer part of
        # the round. (Flower's unmask stage would ask its neighbours for shares they do not
        # hold, and the round would fail.)
        state.sampled_node_ids = set(state.active_node_ids)
        return self._went_on("share keys", ok)

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        def one(reply: Message) -> None:
            record = _stage_record(reply)
            vectors = _list_of(record, Key.MASKED_PARAMETERS, bytes)
            if len(vectors) != len(self.shapes):
                raise _BadReply(f"{len(vectors)} masked arrays, not {len(self.shapes)}")
            for data, shape in zip(vectors, self.shapes, strict=True):
                _check_masked_vector(data, shape, self.modulus_range)
            recorddict_compat.recorddict_to_fitres(reply.content, keep_input=True)  # what the stage reads next

        ok = super().collect_masked_vectors_stage(self._checked(grid, "collect masked vectors", lambda replies: _each(replies, one)), context, state)
        self.collected = len(state.active_node_ids)
        if ok and len(state.active_node_ids) < self.required:
            ok = False
        if not ok:
            self.skipped_with = len(state.active_node_ids)
        return self._went_on("collect masked vectors", ok)

    def unmask_stage(self, grid, context, state) -> bool:
        def one(reply: Message) -> None:
            node = reply.metadata.src_node_id
            record = _stage_record(reply)
            # A device holds one share of each of its neighbours' secrets (its own included) and
            # is asked for exactly those: the live ones' mask seeds, the dropped ones' keys
            # (neighbours that left before sharing keys are no longer in the round).
            expected = state.nid_to_neighbours[node] & state.sampled_node_ids
            shares = _one_each(record, Key.NODE_ID_LIST, Key.SHARE_LIST, expected)
            if shares is None:
                raise _BadReply("its shares are not one for each of its neighbours")
            if any(len(share) < 20 or len(share) > _MAX_SHARE_BYTES or (len(share) - 4) % 16 for share in shares):
                raise _BadReply("a share that is not laid out as Shamir's shares are (4 + 16k bytes)")

        return self._went_on("unmask", super().unmask_stage(self._checked(grid, "unmask", lambda replies: _each(replies, one)), context, state))

    def _went_on(self, stage: str, ok: bool) -> bool:
        if not ok:
            self.halted_at = stage
        return ok


# An observer of every unmasked average (the only thing about the updates the server learns
# under secure aggregation; the leakage audit attacks exactly that), called with
# (server_round, {name: average update}, contributing node ids).
SumObserver = Callable[[int, dict, list], None]


class SecureAggregationGrid(GridView):
    """A grid that runs each training round through SecAgg+ (see the module's docstring);
    everything else (evaluation, queries) passes through to ``grid``. ``observers`` see each
    unmasked average."""

    def __init__(self, grid, config: FederatedConfig, cohort: int, observers: Iterable[SumObserver] = ()) -> None:
        super().__init__(grid)
        self._observers = tuple(observers)
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
        result = self.secure_sum(messages, bound=self._config.clip_norm, label=f"round {server_round}")
        self.rounds[server_round] = self.last
        if result is None:
            return []
        average, contributors = result
        for observer in self._observers:
            observer(server_round, average, list(contributors))
        # The strategy averages models: give it, for each device whose update the sum holds,
        # the global model plus the average update (one shared copy), so that its average is
        # that model and it counts the devices that contributed.
        current = {name: array.numpy() for name, array in first.content["arrays"].items()}
        model = ArrayRecord({name: Array((c.astype(np.float64) + average[name]).astype(c.dtype)) for name, c in current.items()})
        by_node = {m.metadata.dst_node_id: m for m in messages}
        return [
            Message(aggregate_content(model), reply_to=by_node[node])
            for node in contributors
        ]

    def secure_sum(
        self, messages: list[Message], *, bound: float, label: str, planned: int | None = None,
        noise_multiplier: float | None = None, check: Callable[[dict[str, np.ndarray], SumLimits], str | None] | None = None,
    ) -> tuple[dict[str, np.ndarray], list[int]] | None:
        """Run SecAgg+ over the devices ``messages`` go to (each message: the task's arrays
        and config); each device's vector has L2 norm at most ``bound`` before its share of
        distributed noise (``noise_multiplier``, default the training's). Returns the average of
        what the devices sent and the node ids it holds, or None when the round is skipped:
        too many dropouts (nothing is unmasked), a failure of the protocol, or a sum that
        honest devices cannot produce (:func:`check_average`, then ``check`` if given: a
        reason or None). ``planned`` is the cohort the devices' shares of distributed noise
        are for (default: the training cohort). ``self.last`` records the round."""
        config = self._config
        first = messages[0]
        arrays = first.content["arrays"]
        names = list(arrays.keys())
        current = [arrays[name].numpy() for name in names]
        task_config = dict(first.content["config"])
        server_round = int(task_config.get("server-round", 0))
        cohort = len(messages)
        planned = planned or self._cohort
        task_config[SECAGG_ARRAY_NAMES] = ",".join(names)  # a legacy config holds scalars only
        task_config[SECAGG_COHORT] = planned
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
        coordinate = quantization_range(config, planned, bound=bound, noise_multiplier=noise_multiplier)
        levels = quantization_levels(cohort)
        workflow = _Workflow(
            1.0 if shares >= cohort else shares,
            config.secagg_reconstruction_threshold,
            max_weight=1.0,  # equal weights: each device sends num-examples = 1
            clipping_range=coordinate,
            quantization_range=levels,
            modulus_range=MODULUS,
            timeout=config.secagg_timeout or None,
            required=required,
            shapes=[a.shape for a in current],
        )
        try:
            workflow(self._grid, context)
        except Exception as exc:  # noqa: BLE001 - whatever a device sent, the run goes on
            log.error("%s skipped: secure aggregation failed (%s: %s); nothing was released", label, type(exc).__name__, exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            self.last = {"sampled": cohort, "contributed": workflow.collected, "skipped": True, "failed": f"{type(exc).__name__}: {exc}"}
            self._record_refused(workflow)
            return None
        skipped = holder.average is None
        contributed = (workflow.skipped_with or 0) if skipped else len(holder.contributors)
        self.last = {"sampled": cohort, "contributed": contributed, "skipped": skipped}
        self._record_refused(workflow)
        if skipped:
            got = workflow.skipped_with
            if got is None:
                log.warning("%s skipped: SecAgg+ stopped at its %s stage (too few devices, or key shares, left of %d); nothing was %s",
                            label, workflow.halted_at or "last", cohort, "released" if workflow.halted_at == "unmask" else "unmasked or released")
                return None
            if got >= required:
                log.warning("%s skipped: %d of %d devices sent their masked update, but some device has fewer live neighbours than "
                            "secagg-reconstruction-threshold needs; nothing was unmasked or released", label, got, cohort)
                return None
            log.warning(
                "%s skipped: %s of %d devices sent their masked update, fewer than the %d that "
                "secagg-dropout-tolerance %.2f and secagg-min-cohort %d require; nothing was unmasked or released",
                label,
                got,
                cohort,
                required,
                config.secagg_dropout_tolerance,
                config.secagg_min_cohort,
            )
            return None
        average = dict(zip(names, holder.average, strict=True))
        limits = sum_limit(
            config, contributors=len(holder.contributors), dims=sum(a.size for a in current), bound=bound, coordinate=coordinate,
            levels=levels, device_std=device_noise_std(config, planned, bound=bound, noise_multiplier=noise_multiplier),
        )
        problem = check_average(average, limits) or (check(average, limits) if check is not None else None)
        if problem is not None:
            log.warning("%s skipped: the sum of %d devices' masked vectors is refused: %s. Honest devices cannot send "
                        "vectors that sum to this; nothing of it was used or released", label, len(holder.contributors), problem)
            self.last.update(contributed=len(holder.contributors), skipped=True, refused=problem)
            return None
        return average, list(holder.contributors)

    def _record_refused(self, workflow: _Workflow) -> None:
        if workflow.refused:
            self.last["refused-replies"] = list(workflow.refused)
