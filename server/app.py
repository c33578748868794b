"""The aggregation server's Flower ServerApp.

It validates the run config (unknown keys are an error that lists the known ones), builds
the chosen strategy (:mod:`fedpref.server.strategy`: FedAvg, FedAvgM with a server learning
rate, FedAdam, FedYogi), initialises the shared arrays of the model, and runs the rounds:
devices train and send clipped updates; every ``evaluate-every`` rounds each device ranks its
own held-out items and sends back scalars, which the strategy averages. The round is chosen on
validation (NDCG@k) and the test metrics are those of that round.

:func:`main` wires one run: the grid (:mod:`fedpref.server.grid`), the DP accounting, the run
store, the publisher and the checkpoint (:mod:`fedpref.server.rounds` listeners), and returns a
:class:`~fedpref.server.rounds.RunResult`; per-round metrics go to ``results-dir``
(``rounds.json``) when it is set. A runner in this process attaches its own listeners with
:class:`ServerHooks` (:func:`make_server_app`, or ``main(grid, context, hooks)``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedpref.models.config import FederatedConfig, RunConfigError
from fedpref.models.files import open_private, private_folder, write_private
from fedpref.server import checkpoint
from fedpref.server.analytics import dp_popularity, popularity_mechanism
from fedpref.server.grid import CohortSampler, CohortsExhausted, EngineGrid, Exchange, StableGrid, device_keys, engine_grid
from fedpref.server.privacy import DpMechanism, NoiseSource, PrivacyLedger, default_delta, resolve_accounting
from fedpref.server.publish import ModelPublisher
from fedpref.server.rounds import PrivacyAccount, Progress, Publisher, RoundTable, RunResult, StoreRecorder, numpy_arrays
from fedpref.server.runstore import RunStore, default_url
from fedpref.server.secure import SecureAggregationGrid, SumObserver, check_secagg, required_contributors, shares_per_device
from fedpref.server.strategy import FedprefStrategy, make_strategy
from fedpref.server.tree import TreeLedger, TreeMechanism, rounds_per_tree
from fedpref.server.validation import examples_bound


@dataclass
class ServerHooks:
    """What a runner in this process attaches to a run: ``on_round`` callbacks get each row
    (``{"event": "train" | "evaluate", **row}``), ``on_exchange`` observers every exchange
    (messages sent, replies received: the privacy tests check what devices actually sent),
    ``on_sum`` observers every unmasked average under secure aggregation, and ``on_result``
    the run's result."""

    on_round: list[Callable[[dict], None]] = field(default_factory=list)
    on_exchange: list[Exchange] = field(default_factory=list)
    on_sum: list[SumObserver] = field(default_factory=list)
    on_result: Callable[[RunResult], None] | None = None


def make_server_app(hooks: ServerHooks | None = None) -> ServerApp:
    """fedpref's ServerApp; ``hooks`` are attached to every run it serves."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, context, hooks)

    return server_app


def population_meta(config: FederatedConfig) -> dict:
    """The catalogue size (public) and the number of devices: run-config ``catalogue-size`` and
    ``devices`` (real devices), or the population folder's ``meta.json`` (a simulation)."""
    if config.catalogue_size:
        return {"n_users": config.devices, "n_items": config.catalogue_size}
    meta = Path(config.history_dir) / "meta.json"
    if not config.history_dir or not meta.exists():
        raise FileNotFoundError(
            "the server needs the item catalogue's size and the number of devices: set run-config "
            "'catalogue-size' and 'devices' (real devices), or 'history-dir' to a folder written by "
            "`fedpref population` or `fedpref simulate`"
        )
    return json.loads(meta.read_text())


def check_adaptive(noise_multiplier: float, cohort: int) -> None:
    """Adaptive clipping spends part of the privacy budget on the clipped count, whose noise is
    cohort / 20: the effective noise multiplier must stay below twice that."""
    if noise_multiplier >= cohort / 10:
        raise RunConfigError(
            f"adaptive clipping with {cohort} devices a round allows dp-noise-multiplier below {cohort / 10:g} "
            f"(the clipped count's noise is cohort / 20), got {noise_multiplier}: take more devices per round, "
            "a smaller noise multiplier, or dp-clipping=fixed"
        )


def accounting_of(config: FederatedConfig) -> str:
    """The account this run reports and stops at (run-config ``dp-accounting``; ``auto``:
    honest on real devices, run-config ``devices`` > 0, sampled in a simulation)."""
    return resolve_accounting(config.dp_accounting, real_devices=config.devices > 0)


def _prior(config: FederatedConfig, n_devices: int) -> tuple[DpMechanism, ...]:
    return (popularity_mechanism(config, n_devices),) if config.popularity_histogram else ()


def privacy_plan(config: FederatedConfig, n_devices: int) -> tuple[DpMechanism, float, int]:
    """The DP mechanism of this run, its delta, and how many rounds run: ``num-server-rounds``,
    or fewer if one more would take the epsilon of the run's account (:func:`accounting_of`)
    past ``dp-target-epsilon``. Refuses settings the run could not honour (a target one round
    passes; too much noise for adaptive clipping)."""
    mechanism = DpMechanism(config.dp_noise_multiplier, n_devices, config.cohort_size(n_devices))
    if config.dp_mechanism == "tree":  # fedpref.server.tree: trees of ceil(T / k) rounds
        mechanism = TreeMechanism(mechanism.noise_multiplier, n_devices, mechanism.cohort,
                                  rounds_per_tree(config.num_server_rounds, config.dp_max_participations))
    if config.dp_clipping == "adaptive":
        check_adaptive(config.dp_noise_multiplier, mechanism.cohort)
    delta = config.dp_delta or default_delta(n_devices)
    rounds = config.num_server_rounds
    prior = _prior(config, n_devices)
    accounting, cap = accounting_of(config), config.dp_max_participations
    if config.dp_target_epsilon > 0:
        rounds = min(rounds, mechanism.rounds_within(config.dp_target_epsilon, delta, limit=rounds, prior=prior, accounting=accounting,
                                                     max_participations=cap))
        if rounds == 0:
            histogram = " after the popularity histogram" if prior else " alone"
            raise RunConfigError(
                f"one round{histogram} spends epsilon {mechanism.epsilon(1, delta, prior, accounting, cap):.3g} ({accounting} accounting) "
                f"at delta {delta:.3g}, past dp-target-epsilon {config.dp_target_epsilon}: raise dp-noise-multiplier (or "
                "popularity-noise-multiplier), lower fraction-train or raise the target"
            )
    return mechanism, delta, rounds


def promised_guarantee(config: FederatedConfig, n_devices: int, mechanism: DpMechanism, delta: float, rounds: int) -> dict:
    """What the run promises anyone, as each training request tells the devices: the honest
    epsilon once ``rounds`` rounds have run with their whole cohorts (a round in which fewer
    devices reply spends more; the published models carry the figure spent), its delta, the
    rounds planned and the participation cap."""
    epsilon = mechanism.epsilon(rounds, delta, _prior(config, n_devices), "honest", config.dp_max_participations)
    return {"dp-epsilon": float(epsilon), "dp-delta": float(delta), "dp-rounds": int(rounds), "dp-max-participations": config.dp_max_participations}


def _popularity_round(config: FederatedConfig, secure: SecureAggregationGrid | None, grid: StableGrid, n_devices: int, n_items: int,
                      noise: NoiseSource | None = None):
    """The DP popularity histogram (fedpref.server.analytics), accounted on its own:
    (its record for rounds.json, the noised counts), or (None, None) if it was skipped."""
    mechanism = popularity_mechanism(config, n_devices)
    nodes, _ = grid.sample_cohort(n_devices, mechanism.cohort)
    noise = noise or NoiseSource()
    released = dp_popularity(secure, nodes, config, n_items, noise)
    if released is None:
        return None, None
    counts, contributors = released
    delta = config.dp_delta or default_delta(n_devices)
    alone = PrivacyLedger(mechanism, delta, config.dp_noise_placement, accounting=accounting_of(config))
    epsilon = alone.record_round(len(contributors), mechanism=mechanism)
    record = {
        "devices": len(contributors),
        "asked": len(nodes),
        "noise-multiplier": config.popularity_noise_multiplier,
        "noise-placement": config.dp_noise_placement,
        "noise-source": noise.mode if config.dp_noise_placement == "central" else "devices",
        "max-items": config.popularity_max_items,
        "epsilon": epsilon,
        **alone.epsilons(),
        "delta": delta,
        "file": "popularity.json",
    }
    return record, counts


def _restore_random(sampler: CohortSampler, noise: NoiseSource, resumed: checkpoint.Checkpoint, folder: str) -> None:
    """Continue a seeded run's cohort sampler and reproducible noise where the checkpoint left
    them; a run whose noise and cohorts come from the OS draws afresh (nothing was stored)."""
    try:
        if not isinstance(sampler.rng, random.SystemRandom):
            if resumed.sampler is None:
                raise ValueError("it holds no state of the cohort sampler")
            sampler.rng.setstate(resumed.sampler)
        noise.restore(resumed.noise)
    except (ValueError, TypeError, KeyError) as exc:
        raise checkpoint.CheckpointError(
            f"{Path(folder) / checkpoint.CHECKPOINT_FILE} cannot resume this run ({exc}): remove it, or set resume=false, to start the run again"
        ) from None


def _close_abandoned(store: RunStore, run_name: str, checkpoint_dir: str) -> None:
    """A run of this name left "running" with this checkpoint folder, which holds no unfinished
    checkpoint of it, was killed before its first checkpoint (a live run keeps one there): mark
    it failed, so that the operator does not see it running for ever."""
    previous = store.latest_run(run_name)
    if previous is None or previous["status"] != "running":
        return
    theirs = store.run_config(previous["id"])
    same_folder = Path(checkpoint_dir).resolve() == Path(
        theirs.get("checkpoint-dir") or str(Path(theirs.get("results-dir") or ".") / "checkpoint")).resolve()
    if same_folder:
        log(WARNING, "run %s (%r) was left running without a checkpoint: marked failed, a new run starts", previous["id"], run_name)
        store.finish_run(previous["id"], "failed", note="abandoned: its server stopped before its first checkpoint; a new run took its place")


def _open_run_store(config: FederatedConfig):
    url = config.run_store or (default_url(config.results_dir) if config.results_dir else "")
    return RunStore(url) if url else None


class Checkpoints:
    """Writes the run's checkpoint (:mod:`fedpref.server.checkpoint`) as each round starts, at
    the run's start and at its end, with everything a resumed run needs: the strategy's and the
    DP accounting's state, the random states, the rows, and the state of the devices the grid
    plays (a real device keeps its own)."""

    def __init__(self, folder: str, config: FederatedConfig, grid: EngineGrid, noise: NoiseSource, sampler: CohortSampler,
                 table: RoundTable, secure: SecureAggregationGrid | None) -> None:
        self.folder = folder
        self.writer = checkpoint.Writer(folder)
        self.config, self.grid, self.noise, self.sampler, self.table, self.secure = config, grid, noise, sampler, table, secure
        self.strategy: FedprefStrategy | None = None
        self.first_round = 1
        self.popularity: tuple | None = None
        self.run_store_id: int | None = None

    def before_round(self, server_round: int, arrays: ArrayRecord) -> None:
        if server_round > self.first_round:
            self.save(server_round - 1, numpy_arrays(arrays), finished=False)

    def save(self, completed: int, arrays: dict, finished: bool, wait: bool = False) -> None:
        table, account = self.table, self.table.account
        self.writer.save(wait=finished or wait, checkpoint=checkpoint.Checkpoint(
            config=checkpoint.comparable(self.config.to_run_config()), completed_round=completed, finished=finished, arrays=arrays,
            strategy=self.strategy.state(), noise=self.noise.state(),
            # A sampler drawing from the OS has no state, and that of a seeded one is its seed's.
            sampler=None if isinstance(self.sampler.rng, random.SystemRandom) else self.sampler.rng.getstate(),
            ledger=account.ledger if account is not None else None, rounds=table.rounds,
            best={"round": table.best_round, "arrays": numpy_arrays(table.best_arrays)},
            popularity=self.popularity, secure_rounds=dict(self.secure.rounds) if self.secure else {},
            run_store_id=self.run_store_id, devices=self.grid.device_states(), participation=self.sampler.participation_state(),
        ))


def main(grid: Grid, context: Context, hooks: ServerHooks | None = None) -> RunResult:
    """Run the rounds of ``context.run_config`` on ``grid``; returns the run's result (also
    written to ``results-dir`` when it is set, and handed to ``hooks.on_result``)."""
    hooks = hooks or ServerHooks()
    config = FederatedConfig.from_run_config(context.run_config)
    meta = population_meta(config)
    n_devices, n_items = int(meta["n_users"]), int(meta["n_items"])
    engine = engine_grid(grid)
    sampler = CohortSampler(random.Random(config.seed), config)
    stable = StableGrid(engine, device_keys(engine, n_devices), sampler, hooks.on_exchange)
    # Randomness that protects people (fedpref.server.privacy.NoiseSource): the DP noise, and
    # under DP the cohorts (amplification by sampling counts only if nobody knows who was
    # sampled), come from the operating system, unless a simulation asks for them from its seed.
    noise = NoiseSource.for_run(config.reproducible_noise, config.seed)
    if config.dp or config.popularity_histogram:
        noise.warn_if_reproducible()
        sampler.rng = noise.sampler(config.seed)

    initial = config.model_spec.build(1, n_items, seed=config.seed).get_shared()
    cohort = config.cohort_size(n_devices)
    secure = None
    if config.secagg:
        check_secagg(config, cohort)
        secure = SecureAggregationGrid(stable, config, cohort, observers=hooks.on_sum)
    account, num_rounds = _privacy_account(config, n_devices, noise)

    # Checkpoint and resume (fedpref.server.checkpoint), and the run store.
    checkpoint_dir = config.checkpoint_dir or (str(Path(config.results_dir) / "checkpoint") if config.results_dir else "")
    if checkpoint_dir == "none":
        checkpoint_dir = ""
    resumed = checkpoint.resumable(checkpoint_dir, config.to_run_config()) if checkpoint_dir and config.resume else None
    store = _open_run_store(config)
    run_name = re.sub(r"[^A-Za-z0-9._-]+", "-", config.run_name or (Path(config.results_dir).name if config.results_dir else "run")).strip("-.") or "run"
    if resumed is not None:
        log(WARNING, "resuming from the checkpoint in %s: rounds 1..%s are done", checkpoint_dir, resumed.completed_round)
    run_id = _run_store_id(store, config, context, resumed, checkpoint_dir, run_name, n_devices, n_items, num_rounds, account)
    publisher = _publisher(config, run_name, resumed)

    popularity = counts = None
    if resumed is not None:
        popularity, counts = resumed.popularity if resumed.popularity is not None else (None, None)
    elif config.popularity_histogram:
        popularity, counts = _popularity_round(config, secure, stable, n_devices, n_items, noise)
        if popularity is not None and config.dp:  # the same people: one account for both releases
            account.ledger.record_round(popularity["devices"], mechanism=popularity_mechanism(config, n_devices))

    # The round's listeners, in the order they hear a row: the publisher sets its model version,
    # which the run store records; a runner's callbacks see the whole row.
    listeners: list = []
    if publisher is not None:
        model_meta = {"kind": config.model_spec.kind, "dim": config.model_spec.dim, "mlp_layers": list(config.model_spec.mlp_layers)}
        privacy_meta = None if account is None else {"delta": account.delta, "rounds-planned": num_rounds,
                                                     "max-participations": config.dp_max_participations}
        listeners.append(Publisher(publisher, run_name, model_meta, store, run_id, privacy_meta))
    if store is not None:
        listeners.append(StoreRecorder(store, run_id))
    listeners.append(Progress(hooks.on_round))
    table = RoundTable(config, account=account, secure=secure, listeners=listeners)
    checkpoints = Checkpoints(checkpoint_dir, config, engine, noise, sampler, table, secure) if checkpoint_dir else None

    claim_bound, claim_source = examples_bound(config, n_items)
    if not config.dp:  # (under DP every device claims 1)
        log(INFO, "a device may claim at most %s examples (%s); a larger claim is rejected", f"{claim_bound:,}", claim_source)
    strategy = make_strategy(config, n_devices, table.report, num_rounds, checkpoints.before_round if checkpoints else None,
                             accept_partial=engine.partial_aggregates, max_examples=claim_bound, noise=noise, sampler=sampler)
    start_arrays, first_round = initial, 1
    if resumed is not None:
        start_arrays, first_round = resumed.arrays, resumed.completed_round + 1
        _resume(resumed, checkpoint_dir, strategy, sampler, noise, table, engine, secure)
    if checkpoints is not None:
        checkpoints.strategy, checkpoints.first_round, checkpoints.run_store_id = strategy, first_round, run_id
        checkpoints.popularity = (popularity, counts) if popularity is not None else None
        if resumed is None:
            # Round 0: the run's start (its run-store id, the popularity histogram, the random
            # states), so that a server killed in round 1 resumes this run instead of leaving it
            # "running" in the run store and starting another.
            checkpoints.save(0, dict(start_arrays), finished=False, wait=True)
    # Every training request tells the device what the run promises anyone (the honest account).
    train_config = ConfigRecord(promised_guarantee(config, n_devices, account.mechanism, account.delta, num_rounds) if account else {})
    stopped = None
    try:
        if first_round <= num_rounds:
            strategy.start(
                grid=secure or stable,
                initial_arrays=ArrayRecord({k: Array(v) for k, v in start_arrays.items()}),
                num_rounds=num_rounds - first_round + 1,
                timeout=config.round_timeout or 3600.0,  # replies later than this are left out of their round
                train_config=train_config,
                evaluate_config=ConfigRecord({}),
            )
    except CohortsExhausted as exc:  # too few devices may still train: the run ends here, and its record says why
        stopped = str(exc)
        log(WARNING, "the run stops early: %s", stopped)
    except BaseException as exc:
        if store is not None:
            store.finish_run(run_id, "failed", note=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    final = numpy_arrays(table.latest_arrays) if table.latest_arrays is not None else dict(start_arrays)
    if checkpoints is not None:
        checkpoints.save(num_rounds, final, finished=True)
    if store is not None:
        if account is not None:
            store.record_round(run_id, max(table.rounds) if table.rounds else 0, metrics={}, epsilon=account.ledger.epsilon)
        store.finish_run(run_id, "completed", note=f"stopped early: {stopped}"[:2000] if stopped else None)
    result = _result(config, n_devices, n_items, table, final, account, popularity, secure, cohort, stopped)
    if config.results_dir:
        _write_results(config.results_dir, result, counts)
    if hooks.on_result is not None:
        hooks.on_result(result)
    return result


def _privacy_account(config: FederatedConfig, n_devices: int, noise: NoiseSource) -> tuple[PrivacyAccount | None, int]:
    """The run's DP accounting (None without DP), and how many rounds run (:func:`privacy_plan`)."""
    if not config.dp:
        return None, config.num_server_rounds
    mechanism, delta, num_rounds = privacy_plan(config, n_devices)
    accounting, cap = accounting_of(config), config.dp_max_participations
    tree = isinstance(mechanism, TreeMechanism)
    ledger = (TreeLedger(mechanism, delta, config.dp_noise_placement, max_participations=cap, accounting=accounting) if tree else
              PrivacyLedger(mechanism, delta, config.dp_noise_placement, max_participations=cap, accounting=accounting))
    return PrivacyAccount(ledger, mechanism, delta, record={
            "accounting": accounting,  # which account "epsilon" is, and dp-target-epsilon stops at
            "accounting-requested": config.dp_accounting,
            "max-participations": cap or None,
            "noise-multiplier": config.dp_noise_multiplier,
            "noise-placement": config.dp_noise_placement,
            "clipping": config.dp_clipping,
            "clip-norm": config.clip_norm,  # adaptive: the first round's; each round's is in its row
            "population": n_devices,
            "cohort": mechanism.cohort,
            "delta": delta,
            "target-epsilon": config.dp_target_epsilon or None,
            "rounds-planned": config.num_server_rounds,
            "rounds-run": num_rounds,
            "stopped-by-target": num_rounds < config.num_server_rounds,
            "accountant": ("dp-accounting RDP, replace-one neighbours. epsilon-sampled: cohorts drawn uniformly without replacement "
                           "(the smaller of that amplified bound and the honest one); epsilon-honest: no assumption on how cohorts are "
                           "drawn, each device in at most max-participations rounds (every round without a cap) (fedpref.server.privacy)"),
            # os-entropy (nobody can compute it) or run-seed (reproducible-noise: whoever knows the seed can)
            "noise-source": noise.mode if config.dp_noise_placement == "central" else "devices",
            "cohort-source": noise.mode,
            **({"mechanism": "tree", "rounds-per-tree": mechanism.rounds_per_tree, "max-participations": config.dp_max_participations,
                "accountant": "dp-accounting RDP; binary-tree noise restarted every rounds-per-tree rounds, a device in at most one "
                              "round of each; no sampling assumed (fedpref.server.tree)"} if tree else {}),
        }), num_rounds


def _run_store_id(store: RunStore | None, config: FederatedConfig, context: Context, resumed: checkpoint.Checkpoint | None,
                  checkpoint_dir: str, run_name: str, n_devices: int, n_items: int, num_rounds: int,
                  account: PrivacyAccount | None) -> int | None:
    """The run's id in the run store: the resumed run's, or a new run's (None without a store)."""
    if resumed is not None:
        if store is not None and resumed.run_store_id is not None:
            store.resume_run(resumed.run_store_id, resumed.completed_round)
        return resumed.run_store_id
    if store is None:
        return None
    if checkpoint_dir:
        _close_abandoned(store, run_name, checkpoint_dir)
    return store.start_run(
        name=run_name, config=config.to_run_config(), devices=n_devices, items=n_items, rounds_planned=num_rounds,
        flower_run_id=int(context.run_id), dp=config.dp, secure_aggregation=config.secagg,
        delta=account.delta if account else None, target_epsilon=config.dp_target_epsilon or None,
    )


def _publisher(config: FederatedConfig, run_name: str, resumed: checkpoint.Checkpoint | None) -> ModelPublisher | None:
    """The model publisher of ``publish-dir`` (None if unset); a new run may not reuse a run name
    published there (a published version never changes)."""
    if not config.publish_dir:
        return None
    publisher = ModelPublisher(config.publish_dir, config.publish_key, expiry_days=config.publish_expiry_days)
    if resumed is None:
        taken = [v for v in publisher.versions() if v.startswith(f"{run_name}-r")]
        if taken:
            raise RunConfigError(
                f"publish-dir {config.publish_dir} already holds versions of a run named {run_name!r} ({taken[0]}, ...): "
                "give this run another run-name, or publish to another folder"
            )
    return publisher


def _resume(resumed: checkpoint.Checkpoint, checkpoint_dir: str, strategy: FedprefStrategy, sampler: CohortSampler, noise: NoiseSource,
            table: RoundTable, engine: EngineGrid, secure: SecureAggregationGrid | None) -> None:
    """Continue a checkpointed run where it stopped: the strategy, the random states, the DP
    ledger, the rows and models, the secure rounds and the devices the grid plays."""
    strategy.restore(resumed.strategy)
    strategy.round_offset = resumed.completed_round
    _restore_random(sampler, noise, resumed, checkpoint_dir)
    account = table.account
    if account is not None:
        ledger = account.ledger
        if resumed.ledger is None or (resumed.ledger.mechanism, resumed.ledger.delta, resumed.ledger.max_participations, resumed.ledger.accounting) != (
                account.mechanism, account.delta, ledger.max_participations, ledger.accounting):
            raise checkpoint.CheckpointError(
                f"{Path(checkpoint_dir) / checkpoint.CHECKPOINT_FILE} holds no privacy ledger of this run's mechanism: "
                "remove it, or set resume=false, to start the run again"
            )
        account.ledger = resumed.ledger
    table.rounds.update(resumed.rounds)
    table.best_round = resumed.best["round"]
    table.best_arrays = None if resumed.best["arrays"] is None else ArrayRecord({k: Array(v) for k, v in resumed.best["arrays"].items()})
    table.latest_round = resumed.completed_round
    table.latest_arrays = ArrayRecord({k: Array(v) for k, v in resumed.arrays.items()})
    if secure is not None:
        secure.rounds.update(resumed.secure_rounds)
    if resumed.devices is not None:
        engine.restore_device_states(resumed.devices)
    if resumed.participation is not None:
        try:
            sampler.restore_participation(resumed.participation)
        except (KeyError, ValueError, TypeError) as exc:
            raise checkpoint.CheckpointError(
                f"{Path(checkpoint_dir) / checkpoint.CHECKPOINT_FILE} cannot resume this run (its participation counts: {exc}): "
                "remove it, or set resume=false, to start the run again"
            ) from None


def _result(config: FederatedConfig, n_devices: int, n_items: int, table: RoundTable, final: dict, account: PrivacyAccount | None,
            popularity: dict | None, secure: SecureAggregationGrid | None, cohort: int, stopped: str | None = None) -> RunResult:
    privacy = None
    if account is not None:
        privacy = {**account.record, "epsilon": account.ledger.epsilon, **account.ledger.epsilons(),
                   "includes-popularity-histogram": popularity is not None}
        if stopped:  # the rounds before the one that could not draw its cohort
            privacy["rounds-run"] = max(table.rounds, default=0)
            privacy["stopped-by-target"] = False
            privacy["stopped-early"] = stopped
    secure_record = None
    if secure is not None:
        secure_record = {
            "protocol": "SecAgg+ (Flower SecAggPlusWorkflow)",
            "shares-per-device": shares_per_device(config, cohort),
            "cohort": cohort,
            "min-cohort": config.secagg_min_cohort,
            "reconstruction-threshold": config.secagg_reconstruction_threshold,
            "dropout-tolerance": config.secagg_dropout_tolerance,
            "required-per-round": required_contributors(config, cohort),
            "rounds-skipped": sum(1 for r in secure.rounds.values() if r["skipped"]),
            "sums-refused": sum(1 for r in secure.rounds.values() if r.get("refused")),  # skipped: no honest cohort sends such a sum
            "replies-refused": sum(len(r.get("refused-replies", ())) for r in secure.rounds.values()),  # counted as dropouts
        }
    return RunResult(
        config=config.to_run_config(), devices=n_devices, items=n_items, chosen_round=table.best_round,
        rounds=[table.rounds[r] for r in sorted(table.rounds)], seconds=table.seconds(), final=final,
        best=numpy_arrays(table.best_arrays), privacy=privacy, popularity=popularity, secure_aggregation=secure_record,
        stopped=stopped,
    )


def _write_results(folder: str, result: RunResult, counts) -> None:
    """The run's record (models, metrics, the histogram): the server's state, its owner's only."""
    out = private_folder(folder)
    with open_private(out / "final_model.npz") as f:
        np.savez_compressed(f, **result.final)
    if result.popularity is not None:
        write_private(out / "popularity.json", json.dumps({**result.popularity, "counts": [round(float(c), 3) for c in counts]}) + "\n")
    write_private(out / "rounds.json", json.dumps(result.summary(), indent=2) + "\n")
    if result.best is not None:
        with open_private(out / "best_model.npz") as f:
            np.savez_compressed(f, **result.best)


app = make_server_app()
