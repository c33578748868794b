"""The run configuration that the ServerApp and every ClientApp share.

One flat namespace of hyphenated keys, as Flower's run config is. Each key is declared once, as a
field of :class:`FederatedConfig` with its type, default and help; :data:`RUN_CONFIG_DEFAULTS`,
:data:`RUN_CONFIG_HELP` and the ``fedpref`` command's run-config options are derived from it, and
``pyproject.toml`` repeats the defaults under ``[tool.flwr.app.config]`` because Flower reads them
there (a test keeps the two equal). Overrides come from ``flwr run . --run-config "clip-norm=0.5"``
or ``fedpref simulate``. A key that is not known is an error that lists the known ones, never
silently ignored.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields, replace

from .encoding import ENCODINGS
from .preference import MODELS, ModelSpec
from .published import DEFAULT_EXPIRY_DAYS, MAX_EXPIRY_DAYS
from .train import LOSSES, TrainConfig, default_config

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi")
AGGREGATIONS = ("mean", "median", "trimmed-mean")
DP_MECHANISMS = ("gaussian", "tree")  # run-config dp-mechanism
DP_ACCOUNTINGS = ("auto", "honest", "sampled")  # run-config dp-accounting
WEIGHTINGS = ("examples", "equal")  # how devices weigh in the average (run-config weighting)

# The wire's keys, re-exported: they are declared in fedpref.models.wire.
from .wire import PARTIAL_AGGREGATE, POPULARITY_TASK, SECAGG_ARRAY_NAMES, SECAGG_COHORT, TASK  # noqa: F401

def cosine_factor(server_round: int, num_rounds: int, end: float) -> float:
    """The step-size factor of ``server_round`` (1-based): 1 at round 1, ``end`` at round
    ``num_rounds``, a half cosine in between; 1 throughout when ``end`` is 1."""
    if end >= 1.0 or num_rounds <= 1:
        return 1.0
    t = min(max(server_round - 1, 0), num_rounds - 1) / (num_rounds - 1)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def key(default: bool | float | str, help: str) -> Field:
    """A run-config key of :class:`FederatedConfig`: its default and its help (one line, lower case,
    as ``--help`` shows it)."""
    return field(default=default, metadata={"help": help})


def availability_spec(spec: str) -> tuple[str, float]:
    """The grammar of run-config ``availability`` (the simulation gives it its meaning:
    :mod:`fedpref.simulations.engines.availability`): ``(kind, probability)`` of ``always``,
    ``diurnal`` or ``random:P`` with P in (0, 1]; a ValueError that says what is allowed otherwise."""
    spec = spec.strip()
    if spec in ("always", "diurnal"):
        return spec, 1.0
    if spec.startswith("random:"):
        try:
            p = float(spec.split(":", 1)[1])
        except ValueError:
            p = -1.0
        if not 0.0 < p <= 1.0:
            raise ValueError(f"availability {spec!r}: the probability after 'random:' must lie in (0, 1], e.g. random:0.7")
        return "random", p
    raise ValueError(f"unknown availability {spec!r}; choose always, diurnal or random:P (e.g. random:0.7)")


class RunConfigError(ValueError):
    """A run-config key is unknown or its value is invalid."""


def run_config_bool(value: object) -> bool:
    """How a run-config value reads as a switch: a bool as itself, anything else on when its text
    is "1", "true" or "yes" (any case)."""
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class FederatedConfig:
    """The run config, typed: the one declaration of every run-config key, with its default and its help.

    Each field is the key with ``_`` for ``-``. Built with :meth:`from_run_config`, which also validates;
    frozen, so a parsed config can be shared (and cached) safely.
    """

    history_dir: str = key("", 'the device histories (written by `fedpref simulate` / `fedpref population`)')
    catalogue_size: int = key(0, "real devices: the number of items in the catalogue (0: from history-dir's meta.json)")
    devices: int = key(0, 'real devices: how many the server waits for and samples from, its population for DP accounting (0: from history-dir)')
    num_server_rounds: int = key(50, 'federated rounds')
    fraction_train: float = key(1.0, 'share of devices that train each round')
    min_train_nodes: int = key(2, 'at least this many devices per round')
    fraction_evaluate: float = key(1.0, 'share of devices that evaluate (rank their own held-out items)')
    evaluate_every: int = key(5, 'federated evaluation every this many rounds (and after the last)')
    strategy: str = key("fedadam", "server optimiser: fedavg, fedavgm, fedadam or fedyogi (fedadam's per-coordinate steps still move rows few devices touched; docs/federated.md)")
    server_lr: float = key(0.06, 'fedavgm: server step on the averaged update; fedadam/fedyogi: eta')
    server_lr_end: float = key(0.05, 'server-lr is cosine-decayed to this fraction of itself by the last round (1: constant)')
    server_momentum: float = key(0.0, 'server momentum (fedavgm only)')
    adaptivity: float = key(1e-6, 'fedadam/fedyogi: tau; a rarely touched row moves ~1e-5 a round, which 1e-3 would swamp')
    model: str = key("mf", f"preference model: {' or '.join(MODELS)}")
    dim: int = key(64, 'embedding size')
    loss: str = key("softmax", 'device ranking loss: bpr, bce or softmax')
    num_negatives: int = key(20, 'sampled negatives per positive (as centrally: 5 ranked lower on validation, full ranking most; docs/federated.md)')
    private_epochs: int = key(2, 'before its local epochs, a device fits its private vector to the global items')
    local_epochs: int = key(3, 'passes over its own history a device makes each round (its private vector learns only there: give it work)')
    lr: float = key(0.3, 'device step size (SGD; Adam needs about 0.01)')
    lr_end: float = key(1.0, 'lr is cosine-decayed across rounds to this fraction of itself by the last round (1: constant)')
    optimizer: str = key("sgd", "device optimiser: sgd (steps that keep the gradient's size; docs/federated.md), adam or lazy-adam")
    l2: float = key(0.01, 'L2 on the embeddings each batch touches')
    batch_size: int = key(64, 'positives per step')
    clip_norm: float = key(10.0, 'C: the L2 norm bound of every update that leaves a device')
    update_encoding: str = key("float32", 'how an update travels: float32 (weights), float16 or int8 (the update, stochastic rounding)')
    dp_noise_multiplier: float = key(0.0, "z > 0 turns on user-level DP: Gaussian noise z*C on the sum of each round's updates")
    dp_delta: float = key(0.0, 'delta of the reported (epsilon, delta); 0: 1/(10 N) for a population of N')
    dp_clipping: str = key("fixed", 'with DP: fixed (C = clip-norm) or adaptive (C starts at clip-norm and follows dp-target-quantile)')
    dp_target_quantile: float = key(0.5, 'adaptive clipping: C tracks this quantile of the update norms (the share left unclipped)')
    dp_clip_lr: float = key(0.2, 'adaptive clipping: geometric step of C each round (Andrew et al. 2021)')
    dp_target_epsilon: float = key(0.0, 'stop before a round would take epsilon past this (0: no target)')
    dp_mechanism: str = key("gaussian", 'with DP: gaussian (fresh noise every round, DP-FedAvg) or tree (DP-FTRL: tree-aggregated noise on the running sum of updates, no sampling assumed)')
    dp_accounting: str = key("auto", 'which epsilon the target and the reports use: honest (no assumption on how cohorts are drawn), sampled (uniform sampling, amplified) or auto (sampled in simulations, honest on real devices); both are always recorded')
    dp_max_participations: int = key(0, 'with DP: a device takes part in at most this many training rounds of a run, and refuses more (0: no cap; the honest epsilon then counts every round)')
    dp_noise_placement: str = key("central", 'central: the server noises the average; distributed: each device adds its share (needs secagg)')
    reproducible_noise: bool = key(False, "simulation only: the server's DP noise (and, under DP, its cohorts) from `seed`, so a run repeats; anyone who knows the seed removes the noise")
    secagg: bool = key(False, "secure aggregation (Flower's SecAgg+): the server learns only each round's sum of updates")
    secagg_min_cohort: int = key(10, 'secagg: refuse a cohort, and skip a round whose sum would cover, fewer devices than this')
    secagg_num_shares: int = key(0, "secagg: neighbours holding shares of each device's keys (0: 2*ceil(log2 m)+1, at most the cohort)")
    secagg_reconstruction_threshold: float = key(0.6, "secagg: share of a device's key shares needed to remove its masks")
    secagg_dropout_tolerance: float = key(0.3, 'secagg: a round survives this share of its cohort dropping out; beyond it, it is skipped')
    secagg_timeout: float = key(0.0, "secagg: seconds to wait for each protocol stage's replies (0: wait for all)")
    popularity_histogram: bool = key(False, 'before training: a DP histogram of item popularity through secure aggregation, published with the model')
    popularity_noise_multiplier: float = key(1.0, "the histogram's z: Gaussian noise z*sqrt(max-items) on each item's count")
    popularity_max_items: int = key(128, 'a device counts at most this many of its items (a random subset; docs/privacy.md)')
    popularity_fraction: float = key(1.0, 'share of devices asked for the histogram')
    dropout: float = key(0.0, "simulation: share of each round's sampled devices that drop out mid-round (after sharing keys)")
    stragglers: float = key(0.0, "simulation: share of each round's sampled devices that answer straggler-delay seconds late")
    straggler_delay: float = key(30.0, 'simulation: how late a straggler answers (seconds)')
    round_timeout: float = key(0.0, "seconds the server waits for a round's replies; later ones are left out (0: Flower's one hour)")
    min_replies: int = key(1, 'a round with fewer valid replies than this (after dropouts, stragglers, rejections) is skipped: the model stays')
    aggregation: str = key("mean", "mean (the strategy's weighted average), median (Flower's FedMedian) or trimmed-mean (FedTrimmedAvg)")
    trim_fraction: float = key(0.1, 'trimmed-mean: share of the highest and of the lowest values cut per coordinate')
    server_norm_bound: float = key(0.0, '> 0: the server clips each update to this L2 norm and weighs every device the same (a poisoning defence)')
    max_reply_bytes: int = key(0, 'a reply larger than this is rejected unread (0: the shared arrays in float32 plus 64 KiB)')
    max_examples: int = key(100000, 'the most num-examples a device may claim (also at most the catalogue, or in a simulation its longest history); more is rejected')
    weighting: str = key("examples", 'how devices weigh in the average: examples (their num-examples, bounded) or equal (every device the same)')
    availability: str = key("always", 'simulation: when virtual devices may train: always, diurnal or random:P (fedpref.client.eligibility)')
    store_dir: str = key("", 'simulation: a folder of device stores (device-<i>.sqlite); each device then keeps consent and a record of what left')
    personalize_epochs: int = key(1, 'before evaluating, a device refits its private vector locally')
    k: int = key(10, 'the cut-off of the ranking metrics (HR@k, NDCG@k)')
    seed: int = key(0, "base seed: the split, the cohorts, initialisation and each device's draws derive from it")
    results_dir: str = key("", 'where the ServerApp writes per-round metrics (empty: do not write)')
    run_store: str = key("", 'SQLAlchemy URL of the run store (empty: sqlite <results-dir>/runs.sqlite; none without results-dir)')
    run_name: str = key("", "the run's name in the run store (empty: the results folder's name)")
    checkpoint_dir: str = key("", 'checkpoint after every round here (empty: <results-dir>/checkpoint, none without results-dir; "none": never)')
    resume: bool = key(True, 'an unfinished checkpoint of the same config is resumed from its last completed round')
    publish_dir: str = key("", "publish every round's global model here, signed (empty: do not publish)")
    publish_key: str = key("", 'the Ed25519 signing key (PEM) for publish-dir (`fedpref signing-key` makes one)')
    publish_expiry_days: float = key(DEFAULT_EXPIRY_DAYS, 'a published model expires this long after it is published: devices then refuse it')

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FederatedConfig:
        """The typed, validated config of a run config (keys as in ``pyproject.toml``; missing ones
        take their defaults). The same run config gives the same (frozen) object: a message's
        handlers each ask for it, and it is parsed once."""
        try:
            # The value's type is part of the key: 1 and 1.0 are equal but read differently as text.
            items = tuple((k, type(v), v) for k, v in sorted(run_config.items(), key=lambda kv: kv[0]))
            hash(items)
        except TypeError:  # an unorderable key or an unhashable value: parse (and refuse) it uncached
            return cls._parse(run_config)
        return _parse_cached(cls, items)

    @classmethod
    def _parse(cls, run_config: Mapping[str, object]) -> FederatedConfig:
        unknown = sorted(map(str, set(run_config) - set(RUN_CONFIG_DEFAULTS)))
        if unknown:
            raise RunConfigError(
                f"unknown run-config key(s) {unknown}; the known keys are: {', '.join(RUN_CONFIG_DEFAULTS)}"
            )
        values = dict(RUN_CONFIG_DEFAULTS)
        values.update(run_config)
        kwargs = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            kind = RUN_CONFIG_TYPES[key]
            value = values[key]
            try:
                if kind is bool:
                    kwargs[f.name] = run_config_bool(value)
                elif kind is int:
                    if isinstance(value, float) and not value.is_integer():
                        raise ValueError
                    kwargs[f.name] = int(value)  # type: ignore[arg-type]
                elif kind is float:
                    kwargs[f.name] = float(value)  # type: ignore[arg-type]
                else:
                    kwargs[f.name] = str(value)
            except (TypeError, ValueError):
                raise RunConfigError(f"run-config key {key!r} must be a {kind.__name__}, got {value!r}") from None
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        def bad(key: str, why: str) -> RunConfigError:
            return RunConfigError(f"run-config {key!r}: {why}")

        if self.catalogue_size < 0 or self.devices < 0:
            raise bad("catalogue-size" if self.catalogue_size < 0 else "devices", "must be 0 (from history-dir) or a positive count")
        if bool(self.catalogue_size) != bool(self.devices):
            raise bad("catalogue-size" if not self.catalogue_size else "devices", "give both catalogue-size and devices (or neither, to read them from history-dir)")
        if self.catalogue_size == 1:
            raise bad("catalogue-size", "a catalogue needs at least 2 items")
        if self.num_server_rounds < 1:
            raise bad("num-server-rounds", "must be at least 1")
        if not 0.0 < self.fraction_train <= 1.0:
            raise bad("fraction-train", f"must lie in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise bad("fraction-evaluate", f"must lie in [0, 1], got {self.fraction_evaluate}")
        if self.min_train_nodes < 1:
            raise bad("min-train-nodes", "must be at least 1")
        if self.evaluate_every < 1:
            raise bad("evaluate-every", "must be at least 1")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"unknown {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.loss not in LOSSES or self.loss == "full-softmax":
            raise bad("loss", f"choose one of bpr, bce, softmax (full-softmax would send every item row), got {self.loss!r}")
        if not self.clip_norm > 0:
            raise bad("clip-norm", f"the clipping bound must be positive, got {self.clip_norm}")
        if not self.server_lr > 0:
            raise bad("server-lr", f"must be positive, got {self.server_lr}")
        for key, value in (("server-lr-end", self.server_lr_end), ("lr-end", self.lr_end)):
            if not 0.0 < value <= 1.0:
                raise bad(key, f"the fraction of the step size left at the last round must lie in (0, 1], got {value}")
        if self.update_encoding not in ENCODINGS:
            raise bad("update-encoding", f"choose one of {', '.join(ENCODINGS)}, got {self.update_encoding!r}")
        if self.update_encoding != "float32" and self.secagg:
            raise bad("update-encoding", "secure aggregation quantises updates itself: use update-encoding=float32 with secagg")
        if self.dp_noise_multiplier < 0:
            raise bad("dp-noise-multiplier", f"must be 0 (no DP) or positive, got {self.dp_noise_multiplier}")
        if not 0.0 <= self.dp_delta < 1.0:
            raise bad("dp-delta", f"must lie in (0, 1), or be 0 for 1/(10 N); got {self.dp_delta}")
        if self.dp_clipping not in ("fixed", "adaptive"):
            raise bad("dp-clipping", f"choose fixed or adaptive, got {self.dp_clipping!r}")
        if not 0.0 <= self.dp_target_quantile <= 1.0:
            raise bad("dp-target-quantile", f"must lie in [0, 1], got {self.dp_target_quantile}")
        if not self.dp_clip_lr > 0:
            raise bad("dp-clip-lr", f"must be positive, got {self.dp_clip_lr}")
        if self.dp_target_epsilon < 0:
            raise bad("dp-target-epsilon", f"must be 0 (no target) or positive, got {self.dp_target_epsilon}")
        if self.dp_target_epsilon > 0 and not self.dp:
            raise bad("dp-target-epsilon", "needs dp-noise-multiplier > 0: without noise there is no epsilon to stop at")
        if self.dp_mechanism not in DP_MECHANISMS:
            raise bad("dp-mechanism", f"choose one of {', '.join(DP_MECHANISMS)}, got {self.dp_mechanism!r}")
        if self.dp_accounting not in DP_ACCOUNTINGS:
            raise bad("dp-accounting", f"choose one of {', '.join(DP_ACCOUNTINGS)}, got {self.dp_accounting!r}")
        if not 0 <= self.dp_max_participations <= 65_535:  # (the fast engine counts participations in a uint16)
            raise bad("dp-max-participations", f"must be 0 (no cap) or a number of rounds from 1 to 65535, got {self.dp_max_participations}")
        if self.dp and self.dp_mechanism == "tree":
            if self.dp_max_participations < 1:
                raise bad("dp-max-participations", "dp-mechanism=tree needs a cap of at least 1: the tree restarts every "
                          "ceil(num-server-rounds / cap) rounds and a device joins at most one round of each tree")
            if self.dp_noise_placement != "central":
                raise bad("dp-noise-placement", "dp-mechanism=tree adds its noise on the server: use dp-noise-placement=central")
            if self.dp_clipping != "fixed":
                raise bad("dp-clipping", "dp-mechanism=tree is accounted for a fixed clipping bound: use dp-clipping=fixed")
        if self.dp_noise_placement not in ("central", "distributed"):
            raise bad("dp-noise-placement", f"choose central or distributed, got {self.dp_noise_placement!r}")
        if self.dp_noise_placement == "distributed" and not self.secagg:
            raise bad(
                "dp-noise-placement",
                "distributed noise needs secagg=true: each device's share of the noise is too small to protect "
                "its update unless the server only sees the sum",
            )
        if self.secagg and self.dp and self.dp_clipping == "adaptive":
            raise bad(
                "dp-clipping",
                "adaptive clipping sends each device's clipped-or-not bit outside the secure sum; use dp-clipping=fixed with secagg",
            )
        if self.secagg_min_cohort < 2:
            raise bad("secagg-min-cohort", f"a sum needs at least 2 devices, got {self.secagg_min_cohort}")
        if self.secagg_num_shares != 0 and self.secagg_num_shares < 3:
            raise bad("secagg-num-shares", f"must be 0 (automatic) or at least 3, got {self.secagg_num_shares}")
        if not 0.5 <= self.secagg_reconstruction_threshold < 1.0:
            raise bad(
                "secagg-reconstruction-threshold",
                f"must lie in [0.5, 1): below half, colluding neighbours could rebuild a device's masks; got {self.secagg_reconstruction_threshold}",
            )
        if not 0.0 <= self.secagg_dropout_tolerance <= 1.0 - self.secagg_reconstruction_threshold + 1e-12:
            raise bad(
                "secagg-dropout-tolerance",
                f"must lie in [0, 1 - secagg-reconstruction-threshold] = [0, {1 - self.secagg_reconstruction_threshold:g}]: "
                f"with more dropouts too few key shares remain to remove their masks; got {self.secagg_dropout_tolerance}",
            )
        if self.secagg_timeout < 0:
            raise bad("secagg-timeout", f"must be 0 (wait for all) or positive seconds, got {self.secagg_timeout}")
        if self.popularity_histogram and not self.secagg:
            raise bad(
                "popularity-histogram",
                "needs secagg=true: without secure aggregation the server would see each device's items",
            )
        if not self.popularity_noise_multiplier > 0:
            raise bad("popularity-noise-multiplier", f"must be positive (the histogram is always noised), got {self.popularity_noise_multiplier}")
        if self.popularity_max_items < 1:
            raise bad("popularity-max-items", f"must be at least 1, got {self.popularity_max_items}")
        if not 0.0 < self.popularity_fraction <= 1.0:
            raise bad("popularity-fraction", f"must lie in (0, 1], got {self.popularity_fraction}")
        try:
            availability_spec(self.availability)
        except ValueError as exc:
            raise bad("availability", str(exc)) from None
        if bool(self.publish_dir) != bool(self.publish_key):
            raise bad(
                "publish-dir" if not self.publish_dir else "publish-key",
                "publishing needs both publish-dir (where) and publish-key (the Ed25519 signing key; `fedpref signing-key --out FILE` makes one)",
            )
        if not (math.isfinite(self.publish_expiry_days) and 0.0 < self.publish_expiry_days <= MAX_EXPIRY_DAYS):
            raise bad(
                "publish-expiry-days",
                f"must lie in (0, {MAX_EXPIRY_DAYS:g}] days, got {self.publish_expiry_days}: devices refuse a published model once it "
                "expires, so choose longer than the time between two runs",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"the share of devices that drop out must lie in [0, 1), got {self.dropout}")
        if not 0.0 <= self.stragglers < 1.0:
            raise bad("stragglers", f"the share of devices that answer late must lie in [0, 1), got {self.stragglers}")
        if self.straggler_delay < 0:
            raise bad("straggler-delay", f"must be 0 or more seconds, got {self.straggler_delay}")
        if self.round_timeout < 0:
            raise bad("round-timeout", f"must be 0 (Flower's one hour) or positive seconds, got {self.round_timeout}")
        if self.min_replies < 1:
            raise bad("min-replies", f"a round needs at least 1 reply, got {self.min_replies}")
        if self.aggregation not in AGGREGATIONS:
            raise bad("aggregation", f"choose one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        if not 0.0 < self.trim_fraction < 0.5:
            raise bad("trim-fraction", f"must lie in (0, 0.5): the share cut from each end per coordinate; got {self.trim_fraction}")
        if self.server_norm_bound < 0:
            raise bad("server-norm-bound", f"must be 0 (off) or a positive L2 norm, got {self.server_norm_bound}")
        if self.max_reply_bytes < 0:
            raise bad("max-reply-bytes", f"must be 0 (automatic) or a positive size, got {self.max_reply_bytes}")
        if self.max_examples < 1:
            raise bad("max-examples", f"the most examples a device may claim must be at least 1, got {self.max_examples}")
        if self.weighting not in WEIGHTINGS:
            raise bad("weighting", f"choose one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.aggregation != "mean" and self.dp:
            raise bad(
                "aggregation",
                f"{self.aggregation} with DP: the central noise is calibrated to the mean's sensitivity (C / m); "
                "use aggregation=mean with dp-noise-multiplier > 0, or server-norm-bound as the poisoning defence",
            )
        if self.secagg and (self.aggregation != "mean" or self.server_norm_bound > 0):
            raise bad(
                "aggregation" if self.aggregation != "mean" else "server-norm-bound",
                "secure aggregation shows the server only the sum of the updates: a median, a trimmed mean or a "
                "per-device norm bound needs each update; turn secagg off to use it",
            )
        if self.personalize_epochs < 0:
            raise bad("personalize-epochs", "must be 0 or more")
        if self.private_epochs < 0:
            raise bad("private-epochs", "must be 0 or more")
        self.train_config()  # validates model, lr, l2, ... with their own messages

    def train_config(self, server_round: int | None = None) -> TrainConfig:
        """The device's local training (same function as the reference trainers); with
        ``server_round``, its step size is the one ``lr-end`` schedules for that round."""
        base = default_config(self.model)
        lr = self.lr if server_round is None else self.lr * cosine_factor(server_round, self.num_server_rounds, self.lr_end)
        try:
            return replace(
                base,
                model=replace(base.model, dim=self.dim),
                loss=self.loss,
                num_negatives=self.num_negatives,
                lr=lr,
                optimizer=self.optimizer,
                l2=self.l2,
                batch_size=self.batch_size,
                epochs=self.local_epochs,
            )
        except ValueError as exc:
            raise RunConfigError(f"run config: {exc}") from None

    @property
    def dp(self) -> bool:
        """User-level differential privacy is on."""
        return self.dp_noise_multiplier > 0

    def cohort_size(self, n_devices: int) -> int:
        """Devices per training round, as Flower's strategies draw them."""
        return min(n_devices, max(int(n_devices * self.fraction_train), self.min_train_nodes))

    @property
    def model_spec(self) -> ModelSpec:
        return self.train_config().model

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


_HINTS = typing.get_type_hints(FederatedConfig)
#: key -> its type (bool, int, float or str), in declaration order.
RUN_CONFIG_TYPES: dict[str, type] = {f.name.replace("_", "-"): _HINTS[f.name] for f in fields(FederatedConfig)}
#: key -> default, in declaration order (the order of ``--help`` and of pyproject's table).
RUN_CONFIG_DEFAULTS: dict[str, bool | int | float | str] = {f.name.replace("_", "-"): f.default for f in fields(FederatedConfig)}
#: key -> its help text.
RUN_CONFIG_HELP: dict[str, str] = {f.name.replace("_", "-"): f.metadata["help"] for f in fields(FederatedConfig)}


@functools.lru_cache(maxsize=64)
def _parse_cached(cls: type[FederatedConfig], items: tuple[tuple[str, type, object], ...]) -> FederatedConfig:
    return cls._parse({k: v for k, _, v in items})
