"""The epsilon-accuracy frontier: how much of what federated training learns survives DP, per method.

On one population folder, for each **method** (a named overlay of run-config keys,
:data:`METHODS`), each target epsilon and each **accounting** (``sampled``: cohorts are uniform
draws and amplification by sampling counts; ``honest``: no assumption on how cohorts are drawn,
each device in at most k rounds; :mod:`fedpref.server.privacy`), one federated run on the fast
engine (:func:`fedpref.simulations.engines.fast.run_fast`, the real ServerApp) whose noise
multiplier z is **calibrated**, not swept: z is solved for (bisection on log z) so that the run's
epsilon after T rounds of m devices from N, at delta, is at most the target and within 1% of it
(:func:`calibrate`), with the accountants the server itself uses (``DpMechanism.epsilon``,
``TreeMechanism.epsilon``). Each method's run without DP (z = 0, the same settings otherwise)
is its reference; popularity (every device is recommended the items most devices trained on)
is the baseline. Every row reports

- the test HR@10 and NDCG@10, sampled (99 negatives) and full, of the round chosen on
  validation, and the validation figures that chose it;
- ``lift`` = test HR@10 - popularity's test HR@10, and ``share`` = lift / the non-DP model's
  lift (the reference with the best validation HR@10, whichever method): the part of what
  training without DP learns that the point keeps;
- both epsilons the run recorded (rounds.json), whichever account it was calibrated for.

Points are cached: a run's folder (``<out>/<method>-C<clip>-lr<server-lr>-<accounting>-eps<target>``,
``...-nodp`` for the reference) is read, not run again, when its rounds.json holds the same run
config, so a frontier can be extended (more epsilons, methods) or resumed point by point. The
calibrated z are kept in ``<out>/calibration.json`` for the same reason.

**The participation cap.** Honest points cap each device at k = ceil(T m / N) training rounds
(at least 1; run-config ``dp-max-participations``), the rounds a uniformly drawn device joins
on average, which the devices themselves enforce; the tree always has that cap (its trees
restart every ceil(T / k) rounds), and its honest and sampled epsilon are the same number, so it
gives one point per target, reported as ``honest``. Sampled Gaussian points have no cap (their
premise is uniform cohorts, which a cap would bend); their honest epsilon then counts every
round, and is reported as such. The references have no DP, hence no cap.

**Tuning** (``tune=True``): for each method, a grid of clip-norm {0.5, 1, 2} x server-lr
{1/3, 1, 10/3} x the method's default (10, 30, 100 for FedAvgM), at one epsilon (the median target, the lower of the two
middle ones) under sampled accounting (honest for the tree); the best validation HR@10 wins and
sets that method's clip-norm and server-lr for all its points and its reference. The grid's runs
stay in the CSV (``role`` = ``tune``) so that the choice can be checked.

**Free personalisation.** Every device refits its private vector on its own history before it
evaluates (run-config ``personalize-epochs``, 1 by default): nothing leaves the device, so it
costs no epsilon. To show what it is worth, the reference of the best method and the best DP
point at the smallest target are run once more with ``personalize-epochs = 0`` (one extra run
each: the fast engine stores the refitted vectors, so the same model cannot be evaluated both
ways afterwards); those rows have ``role`` = ``personalize-0``.

Outputs in ``out``: ``frontier.csv`` (every run, :data:`FIELDS`), ``frontier.png``
(:func:`plot_frontier`) and ``frontier.md`` (:func:`write_table`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedpref.models.config import FederatedConfig

ACCOUNTINGS = ("sampled", "honest")
TOLERANCE = 0.01  # a calibrated point's epsilon lies in [(1 - TOLERANCE) target, target]
CLIP_GRID = (0.5, 1.0, 2.0)  # --tune: clip-norm values
LR_FACTORS = (1 / 3, 1.0, 10 / 3)  # --tune: server-lr as these multiples of the method's default
# Under every method, below --run-config. FedAvgM averages over the cohort, so a row held by 1% of
# it moves by 1% of a device's step: its server step has to be tens (30 here), and C = 1 clips
# few updates. Devices weigh the same in every run, as they must under DP, so that a reference
# differs from its points by the noise alone.
BASE_DEFAULTS: dict[str, object] = {"clip-norm": 1.0, "evaluate-every": 10, "weighting": "equal"}
# Devices that rank their held-out items at each evaluation (all of a smaller population): a
# HR@10 over 20,000 people has a standard error of about 0.0035, and evaluating a million devices
# every tenth round would cost more than the training.
EVAL_DEVICES = 20_000

FIELDS = (
    "role", "method", "accounting", "target_epsilon", "epsilon_sampled", "epsilon_honest", "delta", "z", "cohort", "rounds",
    "max_participations", "clip_norm", "server_lr", "personalize_epochs",
    "val_hr", "val_ndcg", "val_full_hr", "val_full_ndcg", "test_hr", "test_ndcg", "test_full_hr", "test_full_ndcg",
    "pop_test_hr", "pop_test_ndcg", "pop_test_full_hr", "pop_test_full_ndcg", "lift", "share", "chosen_round", "seconds", "folder",
)
ROLES = ("point", "reference", "tune", "personalize-0")


class FrontierError(ValueError):
    """A frontier's arguments cannot describe one (unknown method, bad epsilon, cohort, folder)."""


@dataclass(frozen=True)
class Method:
    """A method of the frontier: ``keys`` define it (over --run-config), ``defaults`` are its
    starting values that --run-config may change (and --tune searches around)."""

    name: str
    description: str
    keys: Mapping[str, object]
    defaults: Mapping[str, object] = field(default_factory=dict)

    @property
    def tree(self) -> bool:
        return self.keys.get("dp-mechanism") == "tree"

    @property
    def reference_name(self) -> str:
        """The name the reference (no DP) runs under: the first method whose reference is the
        same run (FedAvgM's for the tree and adaptive clipping, which differ only under DP)."""
        plain = lambda m: ({k: v for k, v in m.keys.items() if k not in _DP_ONLY}, dict(m.defaults))  # noqa: E731
        return next(m.name for m in METHODS.values() if plain(m) == plain(self))


_FEDAVGM = {"strategy": "fedavgm", "server-momentum": 0.9, "dp-clipping": "fixed", "dp-mechanism": "gaussian"}
#: The methods, by name: the run-config keys each sets.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fedavgm", "DP-FedAvg with server momentum 0.9 (FedAvgM), fixed clipping", _FEDAVGM, {"server-lr": 30.0}),
    Method("adaptive", "FedAvgM with adaptive clipping (C follows the median update norm)",
           {**_FEDAVGM, "dp-clipping": "adaptive", "dp-target-quantile": 0.5}, {"server-lr": 30.0}),
    Method("dim16", "FedAvgM with a shared dimension of 16 (a quarter of the noised coordinates)", {**_FEDAVGM, "dim": 16},
           {"server-lr": 30.0}),
    Method("tree", "DP-FTRL: FedAvgM on tree-aggregated noise, each device in at most k rounds (FTRL-M)",
           {**_FEDAVGM, "dp-mechanism": "tree"}, {"server-lr": 30.0}),
    Method("fedadam", "DP-FedAvg with FedAdam on the server (the run config's default), fixed clipping",
           {"strategy": "fedadam", "dp-clipping": "fixed", "dp-mechanism": "gaussian"}, {"server-lr": 0.06}),
)}
_DP_ONLY = ("dp-clipping", "dp-target-quantile", "dp-mechanism")  # keys that change nothing without DP (dropped from references)


def methods_named(names: Sequence[str]) -> list[Method]:
    """The methods of ``names``, in order (a clear error for an unknown or repeated one)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise FrontierError(f"unknown method(s) {unknown or names}; choose from {', '.join(METHODS)} (comma-separated)")
    if len(set(names)) != len(names):
        raise FrontierError(f"a method is named twice in {list(names)}")
    return [METHODS[n] for n in names]


def default_delta(population: int) -> float:
    """The frontier's delta: 1e-8 from a million devices on, 1 / (10 N) below."""
    return 1e-8 if population >= 1_000_000 else 1.0 / (10.0 * population)


def expected_participations(rounds: int, cohort: int, population: int) -> int:
    """k = ceil(T m / N), at least 1: the training rounds a uniformly drawn device joins on average."""
    return max(1, math.ceil(rounds * cohort / population))


def median_target(epsilons: Sequence[float]) -> float:
    """The median target (the lower of the two middle ones for an even count)."""
    ordered = sorted(epsilons)
    return ordered[(len(ordered) - 1) // 2]


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What an epsilon is computed over: T rounds of m devices from N, at delta, under an
    ``accounting``, with a cap of k rounds a device (0: none), for the Gaussian or the tree."""

    rounds: int
    cohort: int
    population: int
    delta: float
    accounting: str
    cap: int = 0
    tree: bool = False
    prior: tuple = ()  # releases before training (the popularity histogram), as the server composes them

    def mechanism(self, z: float):
        from fedpref.server.privacy import DpMechanism
        from fedpref.server.tree import TreeMechanism, rounds_per_tree

        if self.tree:
            return TreeMechanism(z, self.population, self.cohort, rounds_per_tree(self.rounds, self.cap))
        return DpMechanism(z, self.population, self.cohort)

    def epsilon(self, z: float) -> float:
        return self.mechanism(z).epsilon(self.rounds, self.delta, self.prior, self.accounting, self.cap)

    def epsilons(self, z: float) -> tuple[float, float]:
        """(sampled, honest) epsilon at z: what the run's rounds.json will hold."""
        mechanism = self.mechanism(z)
        return tuple(mechanism.epsilon(self.rounds, self.delta, self.prior, a, self.cap) for a in ACCOUNTINGS)  # type: ignore[return-value]

    def key(self, target: float) -> str:
        prior = ";".join(f"{m.noise_multiplier:.17g},{m.population},{m.cohort}" for m in self.prior)
        return (f"{'tree' if self.tree else 'gaussian'}|{self.accounting}|T{self.rounds}|m{self.cohort}|N{self.population}|"
                f"d{self.delta:.17g}|k{self.cap}|p{prior}|eps{target:.17g}")


def calibrate(target: float, budget: Budget, tolerance: float = TOLERANCE, z_min: float = 1e-3, z_max: float = 1e5) -> float:
    """The noise multiplier z whose epsilon under ``budget`` lies in [(1 - tolerance) target,
    target]: bisection on log z (epsilon falls as z rises), aiming at half the tolerance."""
    if not target > 0 or not math.isfinite(target):
        raise FrontierError(f"a target epsilon must be a positive number, got {target}")
    aim = 1.0 - tolerance / 2
    high = 1.0
    while budget.epsilon(high) > target:
        high *= 2.0
        if high > z_max:
            raise FrontierError(f"no noise multiplier up to {z_max:g} reaches epsilon {target} ({budget.accounting} accounting)")
    low = high / 2.0
    while budget.epsilon(low) <= target:
        if budget.epsilon(low) >= aim * target:
            return low
        high, low = low, low / 2.0
        if low < z_min:
            raise FrontierError(f"epsilon {target} is reached with almost no noise (z below {z_min:g}): choose a smaller target")
    for _ in range(200):  # epsilon(low) > target >= epsilon(high)
        if budget.epsilon(high) >= aim * target:
            return high
        mid = math.sqrt(low * high)
        if budget.epsilon(mid) <= target:
            high = mid
        else:
            low = mid
    return high


class Calibrations:
    """Calibrated z by budget and target, kept in a JSON file so that a resumed frontier asks
    the accountant nothing it already answered (and so runs the very same z)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.values: dict[str, float] = {}
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                self.values = {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}

    def z(self, target: float, budget: Budget) -> float:
        key = budget.key(target)
        if key not in self.values:
            self.values[key] = calibrate(target, budget)
        return self.values[key]

    def save(self) -> None:
        """Write the file (its folder must exist)."""
        if self.path is not None:
            self.path.write_text(json.dumps(self.values, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Popularity
# ---------------------------------------------------------------------------------------------


def popularity_metrics_of_folder(folder: str | Path, *, k: int = 10, seed: int = 0) -> dict[str, float]:
    """The popularity baseline's test HR@k and NDCG@k, sampled (99 negatives) and full (every
    item the device did not train on), from a population folder alone
    (:func:`fedpref.simulations.data.population.popularity_metrics`, ranked as
    :func:`fedpref.simulations.evaluate.evaluate` ranks, ties broken at random)."""
    from fedpref.simulations.data.population import popularity_metrics

    m = popularity_metrics(folder, target="test", k=k, seed=seed)
    return {"test_hr": m.hr, "test_ndcg": m.ndcg, "test_full_hr": m.full_hr, "test_full_ndcg": m.full_ndcg}


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run of the frontier: what it is, and its run config (``values``) once planned."""

    role: str
    method: Method
    accounting: str  # sampled | honest | "" (no DP)
    target: float | None  # None: no DP
    clip: float
    server_lr: float
    z: float = 0.0
    cap: int = 0
    personalize: int | None = None  # personalize-epochs when it differs from the base's
    values: dict = field(default_factory=dict)

    @property
    def folder_name(self) -> str:
        what = "nodp" if self.target is None else f"{self.accounting}-eps{self.target:g}"
        name = f"{self.method.name if self.target is not None else self.method.reference_name}-C{self.clip:g}-lr{self.server_lr:g}-{what}"
        return name if self.personalize is None else f"{name}-personalize{self.personalize}"


@dataclass
class Frontier:
    """A planned frontier (everything checked, every z calibrated); :func:`run_frontier` runs it."""

    population: Path
    n_devices: int
    n_items: int
    name: str
    methods: list[Method]
    epsilons: list[float]
    accountings: list[str]
    rounds: int
    cohort: int
    delta: float
    base: dict  # the run config under every method: history-dir, rounds, cohort, evaluate-every, seed, --run-config
    out: Path
    tune: bool = False
    goal: float | None = None
    personalisation: bool = True
    calibrations: Calibrations | None = None


def plan_frontier(population: str | Path, method_names: Sequence[str], epsilons: Sequence[float], accountings: Sequence[str], *,
                  rounds: int, cohort: int, out: str | Path, overrides: Mapping[str, object] | None = None, delta: float | None = None,
                  tune: bool = False, goal: float | None = None, seed: int = 0, personalisation: bool = True) -> Frontier:
    """Check every argument (a :class:`FrontierError` saying what is wrong and how to fix it)
    and build the frontier's plan; nothing runs."""
    from fedpref.models.config import RunConfigError
    from fedpref.simulations.data.population import read_meta

    folder = Path(population)
    try:
        meta = read_meta(folder)
        n_devices, n_items = int(meta["n_users"]), int(meta["n_items"])
    except FileNotFoundError as exc:
        raise FrontierError(str(exc)) from None
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise FrontierError(f"{folder}/meta.json is not a population's (n_users, n_items): write one with `fedpref population`") from None
    missing = [n for n in ("train_indptr", "train_items", "val_item", "test_item", "negatives") if not (folder / f"{n}.npy").exists()]
    if missing:
        raise FrontierError(f"{folder} is not a whole population folder ({', '.join(f'{m}.npy' for m in missing)} missing): "
                            "write one with `fedpref population --dataset NAME --out DIR`")
    methods = methods_named(list(method_names))
    if not epsilons or any(not (e > 0 and math.isfinite(e)) for e in epsilons):
        raise FrontierError(f"--epsilons takes positive numbers, got {list(epsilons)}")
    if len(set(epsilons)) != len(epsilons):
        raise FrontierError(f"an epsilon is given twice in {list(epsilons)}")
    bad = [a for a in accountings if a not in ACCOUNTINGS]
    if bad or not accountings:
        raise FrontierError(f"unknown accounting(s) {bad or list(accountings)}; choose sampled, honest or both (comma-separated)")
    if rounds < 1:
        raise FrontierError(f"--rounds must be at least 1, got {rounds}")
    if not 2 <= cohort <= n_devices:
        raise FrontierError(f"--cohort must lie in [2, {n_devices:,}] (the population's devices), got {cohort:,}")
    if delta is not None and not 0.0 < delta < 1.0:
        raise FrontierError(f"--delta must lie in (0, 1), got {delta}")
    if goal is not None and not 0.0 < goal <= 1.0:
        raise FrontierError(f"--goal is a share of the non-DP lift in (0, 1], got {goal}")
    overrides = dict(overrides or {})
    reserved = sorted(set(overrides) & {"history-dir", "num-server-rounds", "fraction-train", "min-train-nodes", "dp-noise-multiplier",
                                        "dp-accounting", "dp-delta", "dp-target-epsilon", "dp-max-participations", "results-dir"})
    if reserved:
        raise FrontierError(f"--run-config may not set {', '.join(reserved)}: the frontier sets them for each point (use its options)")
    base = {**BASE_DEFAULTS, "fraction-evaluate": min(1.0, EVAL_DEVICES / n_devices), "seed": seed, **overrides, "history-dir": str(folder.resolve()), "num-server-rounds": rounds,
            "fraction-train": cohort / n_devices, "min-train-nodes": cohort}
    try:
        FederatedConfig.from_run_config(base)
    except RunConfigError as exc:
        raise FrontierError(f"--run-config: {exc}") from None
    out = Path(out)
    return Frontier(folder, n_devices, n_items, str(meta.get("name", folder.name)), methods, list(epsilons), list(accountings), rounds,
                    cohort, delta if delta is not None else default_delta(n_devices), base, out, tune, goal, personalisation,
                    Calibrations(None))


def _values(frontier: Frontier, run: Run) -> dict:
    """The run config of ``run``: the method's defaults < the base (with --run-config) < the
    method's keys < its (tuned) clip-norm and server-lr < the point's DP keys and folder; a
    reference drops the keys that only matter under DP."""
    values = {**run.method.defaults, **frontier.base, **run.method.keys}
    values.update({"clip-norm": run.clip, "server-lr": run.server_lr, "results-dir": str(frontier.out / run.folder_name)})
    if run.personalize is not None:
        values["personalize-epochs"] = run.personalize
    if run.target is None:
        for key in _DP_ONLY:
            values.pop(key, None)
        values["dp-noise-multiplier"] = 0.0
    else:
        values.update({"dp-noise-multiplier": run.z, "dp-accounting": run.accounting, "dp-delta": frontier.delta,
                       "dp-target-epsilon": run.target, "dp-max-participations": run.cap})
    return values


def _starting(frontier: Frontier, method: Method) -> tuple[float, float]:
    """The method's clip-norm and server-lr before tuning (--run-config over its defaults)."""
    return float(frontier.base["clip-norm"]), float(frontier.base.get("server-lr", method.defaults["server-lr"]))


def _prior(frontier: Frontier) -> tuple:
    from fedpref.server.analytics import popularity_mechanism

    config = FederatedConfig.from_run_config(frontier.base)
    return (popularity_mechanism(config, frontier.n_devices),) if config.popularity_histogram else ()


def _dp_run(frontier: Frontier, role: str, method: Method, accounting: str, target: float, clip: float, lr: float) -> Run:
    """A DP run of ``method`` at ``target`` under ``accounting``, its z calibrated."""
    accounting = "honest" if method.tree else accounting
    cap = expected_participations(frontier.rounds, frontier.cohort, frontier.n_devices) if (method.tree or accounting == "honest") else 0
    budget = Budget(frontier.rounds, frontier.cohort, frontier.n_devices, frontier.delta, accounting, cap, method.tree, _prior(frontier))
    assert frontier.calibrations is not None
    z = frontier.calibrations.z(target, budget)
    return Run(role, method, accounting, target, clip, lr, z=z, cap=cap)


def point_runs(frontier: Frontier, method: Method, clip: float, lr: float) -> list[Run]:
    """A method's reference, then its DP points (one per target and accounting; one per target for the tree)."""
    runs = [Run("reference", method, "", None, clip, lr)]
    for target in frontier.epsilons:
        for accounting in (["honest"] if method.tree else frontier.accountings):
            runs.append(_dp_run(frontier, "point", method, accounting, target, clip, lr))
    return runs


def tuning_runs(frontier: Frontier, method: Method) -> list[Run]:
    """The method's grid (clip-norm x server-lr) at the median target under sampled accounting."""
    _, lr = _starting(frontier, method)
    target = median_target(frontier.epsilons)
    return [_dp_run(frontier, "tune", method, "sampled", target, c, lr * f) for c in CLIP_GRID for f in LR_FACTORS]


def check_runs(frontier: Frontier, runs: Sequence[Run]) -> None:
    """Every run's config as the server would check it (run config, DP plan, fast engine), before anything runs."""
    from fedpref.models.config import RunConfigError
    from fedpref.server.app import privacy_plan
    from fedpref.server.privacy import PrivacyConfigError
    from fedpref.simulations.engines.fast import check_fast

    for run in runs:
        run.values = _values(frontier, run)
        try:
            config = FederatedConfig.from_run_config(run.values)
            if config.dp:
                _, _, planned = privacy_plan(config, frontier.n_devices)
                if planned < frontier.rounds:
                    raise FrontierError(f"{run.folder_name}: z = {run.z:.4g} runs only {planned} of {frontier.rounds} rounds within epsilon {run.target}")
            check_fast(config)
        except (RunConfigError, PrivacyConfigError) as exc:
            raise FrontierError(f"{run.folder_name}: {exc}") from None


def execute(run: Run, *, threads: int | None = None, rerun: bool = False) -> tuple[dict, bool]:
    """Run ``run`` on the fast engine, or read its folder's rounds.json when it holds the same
    run config (unless ``rerun``); returns (the run's summary, whether it was reused)."""
    from fedpref.simulations.engines.fast import run_fast

    config = FederatedConfig.from_run_config(run.values)
    done = Path(config.results_dir) / "rounds.json"
    previous = json.loads(done.read_text()) if done.exists() and not rerun else None
    if isinstance(previous, dict) and previous.get("config") == config.to_run_config():
        return previous, True
    return run_fast(config, threads=threads), False


def row_of(run: Run, result: dict, popularity: Mapping[str, float], frontier: Frontier) -> dict:
    """The CSV row of a finished run (lift and share are filled in by :func:`add_shares`)."""
    chosen, privacy = result.get("chosen") or {}, result.get("privacy") or {}
    row = {
        "role": run.role, "method": run.method.name, "accounting": run.accounting,
        "target_epsilon": "" if run.target is None else run.target,
        "epsilon_sampled": privacy.get("epsilon-sampled", "" if run.target is not None else float("inf")),
        "epsilon_honest": privacy.get("epsilon-honest", "" if run.target is not None else float("inf")),
        "delta": privacy.get("delta", ""), "z": run.z, "cohort": frontier.cohort, "rounds": privacy.get("rounds-run", frontier.rounds),
        "max_participations": run.cap, "clip_norm": run.clip, "server_lr": run.server_lr,
        "personalize_epochs": result.get("config", {}).get("personalize-epochs", ""),
        "chosen_round": result.get("chosen_round"), "seconds": result.get("seconds"),  # the server's wall time of the run, as rounds.json holds it
        "folder": run.folder_name,
    }
    for f in ("val_hr", "val_ndcg", "val_full_hr", "val_full_ndcg", "test_hr", "test_ndcg", "test_full_hr", "test_full_ndcg"):
        row[f] = chosen.get(f.replace("_", "-"))
    for f, v in popularity.items():
        row[f"pop_{f}"] = v
    row["lift"] = None if row["test_hr"] is None else row["test_hr"] - popularity["test_hr"]
    row["share"] = None
    return row


def best_reference(rows: Sequence[dict]) -> dict | None:
    """The non-DP model: of the references, the one with the best validation HR@10 (as a
    deployment would choose it, never on test)."""
    references = [r for r in rows if r["role"] == "reference" and r["val_hr"] is not None and r["lift"] is not None]
    return max(references, key=lambda r: r["val_hr"]) if references else None


def add_shares(rows: list[dict]) -> None:
    """``share`` = lift / the lift of the non-DP model (:func:`best_reference`, whose share is
    1): what a point keeps of the best that training without DP reached, whichever method.
    No share for tuning rows, nor when the non-DP model does not beat popularity (a share of a
    negative lift means nothing)."""
    best = best_reference(rows)
    ref = None if best is None else best["lift"]
    for r in rows:
        r["share"] = r["lift"] / ref if r["role"] in ("point", "reference") and ref is not None and ref > 0 and r["lift"] is not None else None


def run_frontier(frontier: Frontier, *, threads: int | None = None, rerun: bool = False, on_point: Callable[[dict, str], None] | None = None,
                 popularity: Mapping[str, float] | None = None) -> list[dict]:
    """Run the frontier (tuning first, if asked), writing ``frontier.csv`` after every run;
    ``on_point(row, eta)`` after each. Returns the rows."""
    from fedpref.models.files import private_folder

    if frontier.calibrations is None or frontier.calibrations.path is None:
        frontier.calibrations = Calibrations(frontier.out / "calibration.json")
    rows: list[dict] = []
    timings: list[float] = []
    # Plan and check every run before the first one runs (with tuning, the points as planned
    # before it: tuning changes their clip-norm and server-lr, not their z).
    grids = {m.name: tuning_runs(frontier, m) for m in frontier.methods} if frontier.tune else {}
    starting = {m.name: _starting(frontier, m) for m in frontier.methods}
    planned = {m.name: point_runs(frontier, m, *starting[m.name]) for m in frontier.methods}
    check_runs(frontier, [r for g in grids.values() for r in g] + [r for p in planned.values() for r in p])
    private_folder(frontier.out)  # only now: a frontier refused leaves nothing behind
    frontier.calibrations.save()
    seed = int(frontier.base.get("seed", 0))
    popularity = dict(popularity or popularity_metrics_of_folder(frontier.population, seed=seed))
    total = [sum(map(len, grids.values())) + sum(map(len, planned.values())) + (2 if frontier.personalisation else 0)]

    def go(run: Run) -> dict:
        result, reused = execute(run, threads=threads, rerun=rerun)
        if not reused:
            timings.append(float(result.get("engine_seconds", 0.0)))
        row = row_of(run, result, popularity, frontier)
        rows.append(row)
        add_shares(rows)
        write_csv(rows, frontier.out / "frontier.csv")
        if on_point:
            left = max(total[0] - len(rows), 0)
            eta = f"{left} left, about {left * (sum(timings) / len(timings)) / 60:.0f} min" if timings and left else (f"{left} left" if left else "done")
            on_point(row, ("reused; " if reused else "") + eta)
        return row

    chosen: dict[str, tuple[float, float]] = {}
    for method in frontier.methods:
        runs = planned[method.name]
        if frontier.tune:
            grid_rows = [go(run) for run in grids[method.name]]
            best = max(grid_rows, key=lambda r: -1.0 if r["val_hr"] is None else r["val_hr"])
            chosen[method.name] = (best["clip_norm"], best["server_lr"])
            runs = point_runs(frontier, method, *chosen[method.name])
            check_runs(frontier, runs)
        for run in runs:
            go(run)
    if frontier.personalisation:
        extra = personalisation_runs(frontier, rows)
        total[0] = len(rows) + len(extra)
        check_runs(frontier, extra)
        for run in extra:
            go(run)
    frontier.calibrations.save()
    return rows


def personalisation_runs(frontier: Frontier, rows: list[dict]) -> list[Run]:
    """With personalize-epochs 0: the reference of the method with the best non-DP validation
    HR@10, and the DP point with the best validation HR@10 at the smallest target (none when the
    runs already evaluate without refitting)."""
    if int(frontier.base.get("personalize-epochs", 1)) == 0:
        return []
    val = lambda r: -1.0 if r["val_hr"] is None else r["val_hr"]  # noqa: E731
    references = [r for r in rows if r["role"] == "reference"]
    smallest = min(frontier.epsilons)
    points = [r for r in rows if r["role"] == "point" and r["target_epsilon"] == smallest]
    runs = []
    for row in ([max(references, key=val)] if references else []) + ([max(points, key=val)] if points else []):
        method = METHODS[row["method"]]
        if row["role"] == "reference":
            runs.append(Run("personalize-0", method, "", None, row["clip_norm"], row["server_lr"], personalize=0))
        else:
            run = _dp_run(frontier, "personalize-0", method, row["accounting"], smallest, row["clip_norm"], row["server_lr"])
            run.personalize = 0
            runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS} for r in rows)


def _epsilon(row: Mapping) -> float:
    """A point's epsilon under the accounting it was calibrated for."""
    return float(row["epsilon_honest"] if row["accounting"] == "honest" else row["epsilon_sampled"])


def plot_frontier(rows: list[dict], path: Path, *, title: str, goal: float | None = None) -> None:
    """Two panels against epsilon (log x): test HR@10, and the share of the non-DP lift kept. A
    line per method and accounting (solid: sampled; dashed: honest), each method's non-DP run
    dotted in its colour, popularity grey dashed, the goal share (if given) a red line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hr_ax, share_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["role"] in ("point", "reference")))
    shared = False  # whether any share line is drawn
    for i, method in enumerate(methods):
        colour = colours[i % len(colours)]
        label = f"{method} (honest = sampled)" if METHODS[method].tree else method
        for accounting, style in (("sampled", "o-"), ("honest", "s--")):
            mine = sorted((r for r in rows if r["role"] == "point" and r["method"] == method and r["accounting"] == accounting), key=_epsilon)
            if not mine:
                continue
            xs = [_epsilon(r) for r in mine]
            hr_ax.plot(xs, [r["test_hr"] for r in mine], style, color=colour, label=f"{label}, {accounting}" if not METHODS[method].tree else label)
            if all(r["share"] is not None for r in mine):
                shared = True
                share_ax.plot(xs, [r["share"] for r in mine], style, color=colour, label=f"{label}, {accounting}" if not METHODS[method].tree else label)
        for r in rows:
            if r["role"] == "reference" and r["method"] == method:
                hr_ax.axhline(r["test_hr"], color=colour, ls=":", lw=1, label=f"{method}, no DP: {r['test_hr']:.3f}")
    pop = next((r["pop_test_hr"] for r in rows), None)
    if pop is not None:
        hr_ax.axhline(pop, color="grey", ls="--", lw=1, label=f"popularity: {pop:.3f}")
    share_ax.axhline(1.0, color="black", ls=":", lw=1, label="no DP (the best reference on validation)")
    share_ax.axhline(0.0, color="grey", ls="--", lw=1, label="popularity")
    if goal is not None:
        share_ax.axhline(goal, color="tab:red", ls="-", lw=0.8, alpha=0.7, label=f"goal: {goal:.0%} of the lift")
    if not shared:
        share_ax.text(0.5, 0.5, "no share: no method's run without DP beats popularity", ha="center", va="center",
                      transform=share_ax.transAxes, fontsize=9, color="grey")
    targets = sorted({float(r["target_epsilon"]) for r in rows if r["role"] == "point"})
    for ax, ylabel in ((hr_ax, "test HR@10 (sampled, 99 negatives)"), (share_ax, "share of the non-DP lift over popularity")):
        ax.set_xscale("log")
        if targets:
            ax.set_xticks(targets, [f"{t:g}" for t in targets])
            ax.minorticks_off()
        ax.set_xlabel("epsilon of the run's accounting (delta in the CSV)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(value, spec: str = ".4f") -> str:
    return "" if value is None or value == "" else format(float(value), spec)


def write_table(rows: list[dict], path: Path, *, title: str, goal: float | None = None) -> str:
    """``frontier.md``: popularity, each method's non-DP run, then per method and accounting the
    point at each target epsilon (the best validation HR@10 among the runs there), and what
    on-device personalisation is worth. Returns the Markdown."""
    pop = next((r for r in rows), None)
    lines = [f"### {title}", ""]
    if pop is not None:
        lines.append(f"Popularity: test HR@10 {_f(pop['pop_test_hr'])}, NDCG@10 {_f(pop['pop_test_ndcg'])}; "
                     f"full HR@10 {_f(pop['pop_test_full_hr'])}, NDCG@10 {_f(pop['pop_test_full_ndcg'])}.")
        lines.append("")
    head = ("| method | accounting | target ε | ε sampled | ε honest | δ | z | k | test HR@10 | NDCG@10 | full HR@10 | full NDCG@10 "
            "| lift | share of lift |")
    lines += [head, "|" + " --- |" * 2 + " ---: |" * 12]
    for method in dict.fromkeys(r["method"] for r in rows if r["role"] in ("point", "reference")):
        ref = [r for r in rows if r["role"] == "reference" and r["method"] == method]
        for r in ref[-1:]:
            lines.append(f"| {method} | no DP | | | | | 0 | | {_f(r['test_hr'])} | {_f(r['test_ndcg'])} | {_f(r['test_full_hr'])} | "
                         f"{_f(r['test_full_ndcg'])} | {_f(r['lift'])} | 1 |")
        points = [r for r in rows if r["role"] == "point" and r["method"] == method]
        for accounting in ACCOUNTINGS:
            for target in sorted({r["target_epsilon"] for r in points if r["accounting"] == accounting}):
                here = [r for r in points if r["accounting"] == accounting and r["target_epsilon"] == target]
                r = max(here, key=lambda r: -1.0 if r["val_hr"] is None else r["val_hr"])
                mark = "" if goal is None or r["share"] is None else (" ✓" if r["share"] >= goal else "")
                lines.append(f"| {method} | {'honest = sampled' if METHODS[method].tree else accounting} | {target:g} | "
                             f"{_f(r['epsilon_sampled'], '.3g')} | {_f(r['epsilon_honest'], '.3g')} | {_f(r['delta'], '.2g')} | "
                             f"{_f(r['z'], '.3g')} | {r['max_participations'] or ''} | {_f(r['test_hr'])} | {_f(r['test_ndcg'])} | "
                             f"{_f(r['test_full_hr'])} | {_f(r['test_full_ndcg'])} | {_f(r['lift'])} | {_f(r['share'], '.2f')}{mark} |")
    extra = [r for r in rows if r["role"] == "personalize-0"]
    if extra:
        lines += ["", "On-device personalisation (the private vector refitted before evaluating; no epsilon): test HR@10 with "
                  "personalize-epochs 0 against the default.", "",
                  "| run | personalize-epochs 0 | default |", "| --- | ---: | ---: |"]
        for r in extra:
            same = [o for o in rows if o["role"] in ("point", "reference") and o["method"] == r["method"] and o["accounting"] == r["accounting"]
                    and o["target_epsilon"] == r["target_epsilon"] and o["clip_norm"] == r["clip_norm"] and o["server_lr"] == r["server_lr"]]
            what = f"{r['method']}, no DP" if r["accounting"] == "" else f"{r['method']}, {r['accounting']} ε {r['target_epsilon']:g}"
            lines.append(f"| {what} | {_f(r['test_hr'])} | {_f(same[-1]['test_hr']) if same else ''} |")
    tuned = [r for r in rows if r["role"] == "tune"]
    if tuned:
        lines += ["", f"Tuned on validation HR@10 at ε {tuned[0]['target_epsilon']:g} ({tuned[0]['accounting']}): "
                  + "; ".join(f"{m}: clip-norm {c:g}, server-lr {lr:g}" for m, c, lr in dict.fromkeys(
                      (r["method"], r["clip_norm"], r["server_lr"]) for r in rows if r["role"] == "reference")) + "."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text
