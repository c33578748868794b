"""The reliability record: every fault and bad input fedpref was put through, how many trials,
and what happened; written to ``docs/RELIABILITY.md`` by ``fedpref reliability``.

Each part runs its trials and keeps its figures as JSON in the work folder
(``results/reliability/<part>.json``); ``--reuse`` writes the page from the JSON already there,
so that one part can be rerun alone. The parts:

- ``dropout``: a synthetic population on the fast engine, with none, 30% dropout, 30% stragglers
  past the round's timeout, and 30% dropout with a min-replies the dropouts sometimes breach;
- ``secagg``: secure aggregation (in-process engine) with dropouts within and beyond SecAgg+'s
  tolerance: rounds go on or are skipped, the run never crashes;
- ``straggler``: Flower's Simulation Engine with a real clock: a sleeping ClientApp is left out
  when the round's timeout passes;
- ``validation``: every kind of malformed reply (:mod:`fedpref.simulations.experiments.hostile`), many
  trials each: rejected, and the aggregate equal to the honest replies' alone; honest replies
  never rejected;
- ``poison``: the poisoning sweep (:mod:`fedpref.simulations.experiments.poison`);
- ``crashes``: SIGKILL during device-store writes and during server runs
  (:mod:`fedpref.simulations.experiments.crashes`).
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedpref.models.config import FederatedConfig

PARTS = ("dropout", "secagg", "straggler", "validation", "poison", "crashes")


def _population(folder: Path, spec: str, seed: int = 0) -> Path:
    """The device histories of ``spec`` (a data-set source, e.g. synthetic:10000x2000), written once."""
    from fedpref.simulations.data.registry import load_dataset
    from fedpref.simulations.data.population import write_population
    from fedpref.simulations.data.split import leave_one_out

    target = folder / "population"
    if (target / "meta.json").exists():
        return target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = leave_one_out(load_dataset(spec, seed=seed), seed=seed)
    return write_population(split, target)


def _summary(result: dict, cohort: int) -> dict:
    rows = result["rounds"]
    trained = [r for r in rows if "replies" in r]
    chosen = result["chosen"]
    return {
        "test-hr": chosen.get("test-hr"),
        "test-ndcg": chosen.get("test-ndcg"),
        "test-full-hr": chosen.get("test-full-hr"),
        "chosen-round": result["chosen_round"],
        "rounds": len(rows),
        "cohort": cohort,
        "mean-replies": float(np.mean([r["replies"] for r in trained])) if trained else 0.0,
        "dropped": sum(r.get("dropped", 0) for r in rows),
        "late": sum(r.get("late", 0) for r in rows),
        "rejected": sum(r.get("rejected", 0) for r in rows),
        "skipped-rounds": sum(1 for r in rows if r.get("skipped") or r.get("secagg-skipped")),
        "seconds": result.get("engine_seconds", result.get("seconds")),
    }


def dropout_part(work: Path, *, dataset: str = "synthetic:10000x2000", rounds: int = 30, fraction: float = 0.1,
                 threads: int | None = None, seed: int = 0, on_run: Callable[[dict], None] | None = None) -> dict:
    """30% dropout, 30% stragglers and a min-replies breach against no fault, fast engine."""
    from fedpref.simulations.engines.fast import run_fast

    population = _population(work / "dropout", dataset, seed)
    n = json.loads((population / "meta.json").read_text())["n_users"]
    base = {"history-dir": str(population), "num-server-rounds": rounds, "fraction-train": fraction, "seed": seed, "checkpoint-dir": "none"}
    cohort = FederatedConfig.from_run_config(base).cohort_size(n)
    settings = [
        ("no fault", {}),
        ("30% drop out", {"dropout": 0.3}),
        ("30% answer 30 s late, round-timeout 10 s", {"stragglers": 0.3, "straggler-delay": 30.0, "round-timeout": 10.0}),
        (f"30% drop out, min-replies {int(0.7 * cohort)} (70% of the cohort)", {"dropout": 0.3, "min-replies": int(0.7 * cohort)}),
    ]
    rows = []
    for name, extra in settings:
        config = FederatedConfig.from_run_config({**base, **extra, "results-dir": str(work / "dropout" / f"run-{len(rows)}")})
        result = run_fast(config, threads=threads)
        row = {"setting": name, "run-config": extra, **_summary(result, cohort)}
        row["seconds-per-round"] = row["seconds"] / rounds
        rows.append(row)
        if on_run:
            on_run(row)
    return {"dataset": dataset, "devices": n, "rounds": rounds, "cohort": cohort, "engine": "fast", "rows": rows}


def secagg_part(work: Path, *, seed: int = 0, on_run: Callable[[dict], None] | None = None) -> dict:
    """Secure aggregation with dropouts within and beyond SecAgg+'s tolerance (30%)."""
    from fedpref.simulations.engines.inprocess import run_inprocess

    n = 40
    population = _population(work / "secagg", f"synthetic:{n}x400", seed)
    base = {"history-dir": str(population), "num-server-rounds": 4, "fraction-train": 0.5, "evaluate-every": 4, "dim": 16,
            "secagg": True, "secagg-min-cohort": 10, "secagg-dropout-tolerance": 0.3, "seed": seed, "checkpoint-dir": "none"}
    rows = []
    for dropout in (0.0, 0.15, 0.5):
        config = FederatedConfig.from_run_config({**base, "dropout": dropout, "results-dir": str(work / "secagg" / f"dropout-{dropout:g}")})
        try:
            result = run_inprocess(config, n_devices=n)
            row = {"dropout": dropout, "crashed": False, **_summary(result, config.cohort_size(n)),
                   "dropped-per-round": [r.get("dropped", 0) for r in result["rounds"]]}
        except Exception as exc:  # the record says so; the test suite fails on it
            row = {"dropout": dropout, "crashed": True, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        if on_run:
            on_run(row)
    return {"devices": n, "cohort": FederatedConfig.from_run_config(base).cohort_size(n), "tolerance": 0.3, "engine": "inprocess", "rows": rows}


def straggler_part(work: Path, *, seed: int = 0, on_run: Callable[[dict], None] | None = None) -> dict:
    """Flower's Simulation Engine, real clock: stragglers sleep, the server stops at round-timeout."""
    from fedpref.simulations.engines.device import straggles

    from fedpref.simulations.engines.flower import backend_config, run_flower_simulation

    n = 16
    population = _population(work / "straggler", f"synthetic:{n}x300", seed)
    run_config = {"history-dir": str(population), "num-server-rounds": 2, "fraction-train": 0.5, "fraction-evaluate": 0.0, "dim": 8,
                  "local-epochs": 1, "stragglers": 0.25, "straggler-delay": 40.0, "round-timeout": 15.0, "seed": seed,
                  "checkpoint-dir": "none", "results-dir": str(work / "straggler" / "run")}
    config = FederatedConfig.from_run_config(run_config)
    started = time.perf_counter()
    # Eight Ray actors (a quarter CPU each): on the Simulation Engine a sleeping ClientApp holds
    # its actor, and with fewer actors than a round's devices the others would queue behind it
    # (late through no fault of theirs), which real devices do not.
    result = run_flower_simulation(config, n_devices=n, backend=backend_config(cpus_per_device=0.25))
    seconds = time.perf_counter() - started
    # The cohorts the server drew (fedpref.server.grid.StableGrid: a seeded draw over the ids in
    # key order; no evaluation before the last round), and the stragglers among them.
    import random

    draw, cohort = random.Random(seed), config.cohort_size(n)
    sampled = {r: draw.sample(range(n), cohort) for r in (1, 2)}
    rows = [{"round": r["round"], "replies": r.get("replies", 0), "late": r.get("late", 0), "dropped": r.get("dropped", 0),
             "stragglers-sampled": sum(straggles(config, u, r["round"]) for u in sampled[r["round"]])} for r in result["rounds"]]
    row = {"rows": rows, "seconds": seconds, "devices": n, "cohort": config.cohort_size(n),
           "stragglers-in-population-per-round": [sum(straggles(config, u, r) for u in range(n)) for r in (1, 2)],
           "engine": "flower", "ray-actors": 8, "round-timeout": 15.0, "straggler-delay": 40.0}
    if on_run:
        on_run(row)
    return row


def validation_part(*, trials: int = 300, honest_trials: int = 2000, seed: int = 0, on_run: Callable[[dict], None] | None = None) -> dict:
    """Every kind of malformed reply, ``trials`` each: rejected by the server's checks, and the
    round's aggregate equal to the honest replies' alone."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedpref.client.guard import encode_update
    from fedpref.models.wire import training_content, training_metrics
    from fedpref.server.strategy import make_strategy
    from fedpref.server.validation import check_train_reply, default_max_bytes, examples_bound, train_metric_keys

    from fedpref.simulations.experiments.hostile import KINDS, NumpyDraw, malform, reply_message

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    rng = np.random.default_rng(seed)
    bound, shapes = 1.0, {"item_embedding.weight": (200, 16), "item_bias.weight": (200, 1)}
    sent = {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in shapes.items()}
    config = FederatedConfig.from_run_config({"catalogue-size": 200, "devices": 8, "dim": 16, "clip-norm": bound, "strategy": "fedavg"})
    max_examples, _ = examples_bound(config, 200)  # the catalogue: a device trains on distinct items

    def honest(node: int) -> object:
        scale = float(rng.choice([0.01, 0.1, 1.0, 10.0]))
        update = {k: rng.normal(0, scale, a.shape).astype(np.float32) * (rng.random(a.shape[0]) < 0.1)[:, None] for k, a in sent.items()}
        weights, norm, clipped = encode_update(sent, update, bound)
        metrics = training_metrics(config, examples=int(rng.integers(1, max_examples + 1)), loss=float(rng.random()), norm=norm, clipped=bool(clipped))
        return reply_message(node, training_content(weights, metrics))

    def aggregate(replies):
        seen = {}
        strategy = make_strategy(config, 8, lambda report: seen.update(vars(report)), max_examples=max_examples)
        strategy._sent_global, strategy._asked = sent, len(replies)
        arrays, _ = strategy.aggregate_train(1, replies)
        return {k: arrays[k].numpy() for k in arrays}, seen

    check = lambda reply: check_train_reply(reply, sent, bound=bound, max_bytes=default_max_bytes(sent), dp=False,  # noqa: E731
                                            metric_keys=train_metric_keys(config), max_examples=max_examples)
    honest_rejected = sum(check(honest(i)) is not None for i in range(honest_trials))
    rows = []
    draw = NumpyDraw(rng)
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    for kind, what in KINDS.items():
        rejected = unchanged = 0
        reasons: dict[str, int] = {}
        for t in range(trials):
            good = [honest(n) for n in range(3)]
            bad = malform(honest(99), sent, kind, draw, bound=bound, max_examples=max_examples)
            reason = check(bad)
            if reason is not None:
                rejected += 1
                short = _reason_kind(reason)
                reasons[short] = reasons.get(short, 0) + 1
            with_bad, seen = aggregate(good[:1] + [bad] + good[1:])
            alone, _ = aggregate(good)
            unchanged += int(seen["rejected"] == 1 and all(np.array_equal(with_bad[k], alone[k]) for k in alone))
        row = {"kind": kind, "what": what, "trials": trials, "rejected": rejected, "model-unchanged": unchanged, "reasons": reasons}
        rows.append(row)
        if on_run:
            on_run(row)
    return {"honest-trials": honest_trials, "honest-rejected": honest_rejected, "rows": rows}


def _reason_kind(reason: str) -> str:
    """A validation reason without its particulars (array names, sizes, values)."""
    head = re.split(r":|,? got ", reason)[0]
    head = re.sub(r"'[^']*'|(?<![\w-])[-+]?\d[\d.,e+-]*", "", head)
    return re.sub(r"\s+", " ", head).strip(" ,")


POISON_RUN_CONFIG = {"num-server-rounds": 50, "fraction-train": 0.2, "evaluate-every": 10}


def poison_part(work: Path, *, threads: int | None = None, seed: int = 0, on_run: Callable[[dict], None] | None = None) -> dict:
    """The poisoning sweep on movielens-small (fedpref.simulations.experiments.poison): 0, 1, 5 and 10% of
    the devices push one unpopular item, under no defence, the median, the trimmed mean and a
    server-side norm bound; then the same attack kept to an honest update's norm (the median of
    the clean run's), against no defence."""
    from fedpref.simulations.experiments.poison import poison_sweep

    population = _population(work / "poison", "movielens-small", seed)
    sweep = poison_sweep(population, POISON_RUN_CONFIG, work / "poison" / "sweep", seed=seed, threads=threads, on_run=on_run)
    quiet = poison_sweep(population, POISON_RUN_CONFIG, work / "poison" / "honest-norm", seed=seed, threads=threads, on_run=on_run,
                         defences=["none"], attack_options={"norm": sweep["honest-norms"]["q50"]})
    return {"sweep": sweep, "honest-norm": quiet, "run-config": POISON_RUN_CONFIG, "dataset": "movielens-small",
            "plot": str(work / "poison" / "sweep" / "sweep.png")}


def run_parts(parts: list[str], work: Path, *, reuse: bool, on_event: Callable[[str], None] = print, **options) -> dict:
    """Run (or, with ``reuse``, read) each part's figures; returns {part: figures}."""
    work.mkdir(parents=True, exist_ok=True)
    figures = {}
    for part in parts:
        path = work / f"{part}.json"
        if reuse and path.exists():
            figures[part] = json.loads(path.read_text())
            on_event(f"{part}: read {path}")
            continue
        on_event(f"{part}: running")
        started = time.perf_counter()
        figures[part] = _RUNNERS[part](work, on_event=on_event, **options)
        figures[part]["part-seconds"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(figures[part], indent=2, default=float) + "\n")
        on_event(f"{part}: done in {figures[part]['part-seconds']} s, wrote {path}")
    return figures


def _dropout(work, on_event, threads=None, **_):
    return dropout_part(work, threads=threads, on_run=lambda r: on_event(f"  {r['setting']}: test HR@10 {r['test-hr']:.4f}"))


def _secagg(work, on_event, **_):
    return secagg_part(work, on_run=lambda r: on_event(f"  dropout {r['dropout']}: {'crashed' if r['crashed'] else str(r['skipped-rounds']) + ' rounds skipped'}"))


def _straggler(work, on_event, **_):
    return straggler_part(work, on_run=lambda r: on_event(f"  {r['rows']}"))


def _validation(work, on_event, validation_trials=300, **_):
    return validation_part(trials=validation_trials, on_run=lambda r: on_event(f"  {r['kind']}: {r['rejected']}/{r['trials']} rejected"))


def _poison(work, on_event, threads=None, **_):
    return poison_part(work, threads=threads, on_run=lambda r: on_event(
        f"  {r['fraction']:.0%} attackers, {r['defence']}: target HR@10 {r['target-hr']:.4f}, test HR@10 {r['test-hr']:.4f}"))


def _crashes(work, on_event, **_):
    from fedpref.simulations.experiments.crashes import resume_kill_trials, store_kill_trials

    return {"store": store_kill_trials(200, work / "crashes-store"), "resume": resume_kill_trials(20, work / "crashes-resume")}


_RUNNERS = {"dropout": _dropout, "secagg": _secagg, "straggler": _straggler, "validation": _validation, "poison": _poison, "crashes": _crashes}


# -- the page -------------------------------------------------------------------------

def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_page(figures: dict, path: Path, command: str) -> Path:
    """docs/RELIABILITY.md from the parts' figures."""
    lines = [
        "# Reliability: faults and hostile input",
        "",
        f"Written by `{command}` (fedpref.simulations.experiments.reliability) on {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()} with {__import__('os').cpu_count()} cores. Every figure below comes from that command; "
        "each part keeps its figures in `results/reliability/<part>.json`, and `--reuse` rewrites this page from them.",
        "",
        "| fault or bad input | trials | what happened |",
        "| --- | ---: | --- |",
    ]
    lines += _overview(figures)
    for part in PARTS:
        if part in figures:
            lines += ["", *_SECTIONS[part](figures[part])]
    plot = Path(figures.get("poison", {}).get("plot", ""))
    if plot.is_file():
        (path.parent / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, path.parent / "img" / "poisoning.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _overview(figures: dict) -> list[str]:
    rows = []
    if "dropout" in figures:
        d = figures["dropout"]
        base = d["rows"][0]
        for r in d["rows"][1:]:
            rows.append(f"| {r['setting']} ({d['devices']:,} devices, {d['cohort']:,} a round) | {d['rounds']} rounds | "
                        f"test HR@10 {r['test-hr']:.4f} against {base['test-hr']:.4f} without; {r['dropped']:,} dropped, {r['late']:,} late, "
                        f"{r['skipped-rounds']} rounds skipped |")
    if "secagg" in figures:
        for r in figures["secagg"]["rows"]:
            what = "crashed: " + r["error"] if r["crashed"] else f"{r['rounds'] - r['skipped-rounds']} rounds aggregated, {r['skipped-rounds']} skipped, no crash"
            rows.append(f"| SecAgg+, {r['dropout']:.0%} drop out (tolerance 30%) | {r.get('rounds', '–')} rounds | {what} |")
    if "straggler" in figures:
        s = figures["straggler"]
        late = sum(r["late"] for r in s["rows"])
        rows.append(f"| stragglers on Flower's Simulation Engine (real clock, {s['straggler-delay']:.0f} s late, timeout {s['round-timeout']:.0f} s) | "
                    f"{len(s['rows'])} rounds | {late} replies left out as late; rounds went on with {', '.join(str(r['replies']) for r in s['rows'])} replies |")
    if "validation" in figures:
        v = figures["validation"]
        for r in v["rows"]:
            rows.append(f"| malformed reply: {r['what']} | {r['trials']} | {r['rejected']} rejected, model unchanged in {r['model-unchanged']} |")
        rows.append(f"| honest replies (the device's guard) | {v['honest-trials']} | {v['honest-rejected']} rejected |")
    if "poison" in figures:
        p = figures["poison"]["sweep"]
        clean = next(r for r in p["rows"] if r["fraction"] == 0 and r["defence"] == "none")
        for defence in dict.fromkeys(r["defence"] for r in p["rows"]):
            mine = sorted((r for r in p["rows"] if r["defence"] == defence), key=lambda r: r["fraction"])
            attacked = [r for r in mine if r["fraction"] > 0]
            unattacked = next((r for r in mine if r["fraction"] == 0), None)
            shares = " / ".join(f"{r['fraction']:.0%}" for r in attacked)
            reach = " / ".join(f"{r['target-hr']:.3f}" for r in attacked)
            cost = f"; test HR@10 without attack {unattacked['test-hr']:.4f} ({unattacked['test-hr'] - clean['test-hr']:+.4f})" if unattacked else ""
            rejected = sum(r["rejected"] for r in mine)
            rows.append(f"| poisoning: {shares} of devices push one item; defence {defence} | {len(mine)} runs of "
                        f"{p['run-config']['num-server-rounds']} rounds | target in honest users' top 10: {reach} "
                        f"(without attack {clean['target-hr']:.3f}){cost}; {rejected} rejected |")
    if "crashes" in figures:
        c = figures["crashes"]
        st, rs = c["store"], c["resume"]
        rows.append(f"| SIGKILL during device-store writes | {st['trials']} | {st.get('lost_events', '?')} committed events lost, {st.get('corrupt', '?')} stores corrupt |")
        rows.append(f"| SIGKILL of the server at a random moment, then resume | {rs['trials']} | {rs.get('matches', '?')} resumed to the uninterrupted run's model bit for bit, {rs.get('mismatches', '?')} did not |")
    return rows


def _dropout_section(d: dict) -> list[str]:
    lines = [
        "## Dropouts and stragglers",
        "",
        f"{d['dataset']} ({d['devices']:,} devices), {d['cohort']:,} sampled a round, {d['rounds']} rounds, run-config defaults otherwise, "
        f"{d['engine']} engine. A dropout leaves mid-round (an error reply); a straggler trains but answers after the round's timeout "
        "(the fast engine keeps a simulated clock). Test metrics at the round chosen on validation.",
        "",
        "| setting | test HR@10 | test NDCG@10 | full HR@10 | replies a round | dropped | late | rounds skipped | s a round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in d["rows"]:
        lines.append(f"| {r['setting']} | {_fmt(r['test-hr'])} | {_fmt(r['test-ndcg'])} | {_fmt(r['test-full-hr'])} | {r['mean-replies']:.0f} | "
                     f"{r['dropped']:,} | {r['late']:,} | {r['skipped-rounds']} | {r['seconds-per-round']:.2f} |")
    return lines


def _secagg_section(s: dict) -> list[str]:
    lines = [
        "## Secure aggregation with dropouts",
        "",
        f"{s['devices']} devices, {s['cohort']} a round, SecAgg+ dropout tolerance {s['tolerance']:.0%}, {s['engine']} engine. "
        "Beyond the tolerance a round is skipped before anything is unmasked, with a log line.",
        "",
        "| dropout | rounds | aggregated | skipped | dropped per round | crashed |",
        "| ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in s["rows"]:
        if r["crashed"]:
            lines.append(f"| {r['dropout']:.0%} | | | | | yes: {r['error']} |")
        else:
            lines.append(f"| {r['dropout']:.0%} | {r['rounds']} | {r['rounds'] - r['skipped-rounds']} | {r['skipped-rounds']} | {r['dropped-per-round']} | no |")
    return lines


def _straggler_section(s: dict) -> list[str]:
    lines = [
        "## Stragglers on Flower's Simulation Engine",
        "",
        f"{s['devices']} devices, {s['cohort']} a round, {s.get('ray-actors', 2)} Ray actors; a straggler's ClientApp sleeps "
        f"{s['straggler-delay']:.0f} s before it answers, and the server waits {s['round-timeout']:.0f} s (run-config round-timeout). "
        f"The run took {s['seconds']:.1f} s. Stragglers in the population each round: {s['stragglers-in-population-per-round']}.",
        "",
        "| round | replies | late | stragglers among the sampled devices |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['round']} | {r['replies']} | {r['late']} | {r.get('stragglers-sampled', '–')} |" for r in s["rows"]]
    return lines


def _validation_section(v: dict) -> list[str]:
    lines = [
        "## Malformed replies",
        "",
        "Each trial makes one well-formed reply (the device's guard: `global + update`, clipped) malformed in one way "
        "(`fedpref.simulations.experiments.hostile.malform`, choices from a seeded generator), checks it "
        "(`fedpref.server.validation.check_train_reply`), then aggregates it among three honest replies with fedpref's "
        "strategy and compares the result with the honest replies' aggregate alone. The property test "
        "(`tests/server/test_validation.py`) does the same with hypothesis choosing.",
        "",
        "| kind | trials | rejected | model unchanged | reasons given |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in v["rows"]:
        reasons = ", ".join(f"{k} ({n})" for k, n in sorted(r["reasons"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['what']} | {r['trials']} | {r['rejected']} | {r['model-unchanged']} | {reasons} |")
    lines += ["", f"Honest replies: {v['honest-trials']} trials, {v['honest-rejected']} rejected."]
    return lines


def _poison_section(p: dict) -> list[str]:
    from fedpref.simulations.experiments.poison import markdown_table

    sweep, quiet = p["sweep"], p["honest-norm"]
    settings = ", ".join(f"{k}={v}" for k, v in p["run-config"].items())
    return [
        "## Poisoning",
        "",
        f"{p['dataset']}, fast engine, run-config defaults and {settings} (a cohort of {int(sweep['devices'] * p['run-config']['fraction-train'])}), "
        "one seed, one target. A compromised device reads the global model it receives, takes the 100 items of highest bias "
        "as what people like, fits a few fake users to them, and spends its whole clipping budget C on the target's row and "
        "bias in their direction (`fedpref.simulations.experiments.poison.TargetBoost`): a well-formed update within C, which validation "
        "accepts. Target HR@10: the share of honest users who never touched the target with the target in their top 10 of "
        "a full ranking. Test HR@10: the honest users' (sampled, 99 negatives) at the round chosen on validation.",
        "",
        markdown_table(sweep),
        "",
        "![target hit rate and test HR@10 against the share of attackers, per defence](img/poisoning.png)",
        "",
        *_poison_reading(p),
        "",
        f"**The same attack kept to an honest update's norm** ({sweep['honest-norms']['q50']:.3g}, "
        "the median of the clean run's honest norms), no defence: what a norm bound cannot tell from an honest device.",
        "",
        markdown_table(quiet),
    ]


def _poison_reading(p: dict) -> list[str]:
    """What the sweep's figures say, with its numbers."""
    sweep, quiet = p["sweep"], p["honest-norm"]
    cohort = int(sweep["devices"] * p["run-config"]["fraction-train"])
    trim = float(sweep["run-config"].get("trim-fraction", 0.1))
    row = {(r["defence"], r["fraction"]): r for r in sweep["rows"]}
    fractions = sorted(f for f in {r["fraction"] for r in sweep["rows"]} if f > 0)
    reach = lambda defence, rows=row: " / ".join(f"{rows[(defence, f)]['target-hr']:.2f}" for f in fractions if (defence, f) in rows)  # noqa: E731
    test = lambda defence: " / ".join(f"{row[(defence, f)]['test-hr']:.3f}" for f in [0.0, *fractions] if (defence, f) in row)  # noqa: E731
    shares = " / ".join(f"{f:.0%}" for f in fractions)
    quiet_rows = {(r["defence"], r["fraction"]): r for r in quiet["rows"]}
    return [
        f"Reading it (attackers {shares}; one seed, one target):",
        "",
        f"- **No defence.** The attack reaches {reach('none')} of the honest users' top 10, and test HR@10 hardly moves "
        f"({test('none')} at 0 / {shares}): accuracy does not show it.",
        f"- **Median.** A coordinate's median update is 0 unless more than half of the round's {cohort} devices changed it: "
        "an item row that fewer than half of them touched (through their history or their sampled negatives) does not "
        f"move. Test HR@10 {test('median')}: it stops the attack, and the attackers, who change one row only, pull "
        "accuracy down further; the median is itself open to devices that send nothing.",
        f"- **Trimmed mean** (cutting {int(trim * cohort)} of {cohort} values at each end of every coordinate): it holds while "
        f"a round's attackers (about {' / '.join(f'{f * cohort:.1f}' for f in fractions)} expected) are fewer than the cut, "
        f"and fails past it ({reach('trimmed-mean')}); it costs test HR@10 {row[('none', 0.0)]['test-hr'] - row[('trimmed-mean', 0.0)]['test-hr']:.3f} without attack.",
        f"- **Norm bound** ({sweep.get('norm-bound') or 0:.3g}): it scales the attack down like any update, and weighs every "
        f"device the same, which by itself lifts test HR@10 ({test('norm-bound')}); the target still reaches {reach('norm-bound')}.",
        f"- **An attack within an honest norm** ({sweep['honest-norms']['q50']:.3g}) still reaches {reach('none', quiet_rows)} "
        "with no defence: what no norm bound can tell from an honest device.",
        "",
        "No defence here both stops the attack and keeps accuracy.",
    ]


def _crashes_section(c: dict) -> list[str]:
    st, rs = c["store"], c["resume"]
    kills = "; ".join(f"{where}: {n}" for where, n in sorted(rs.get("kill_points", {}).items()))
    return [
        "## Crashes",
        "",
        "**Device store** (`fedpref.simulations.experiments.crashes.store_kill_trials`). Each trial starts a process that writes events "
        "in committed batches of 1 to 20 and reports each commit, and kills it with SIGKILL at a random moment; the store "
        "is then reopened and checked: it opens, SQLite's integrity check passes, every reported event is there, batches are "
        "whole, and nothing is there that was never written.",
        "",
        "| trials | kills mid-write | kills before the first commit | events committed | lost | never written but found | torn batches | stores that would not open or failed the integrity check |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {st['trials']} | {st['kills_mid_write']} | {st['kills_before_first_commit']} | {st['events_committed_total']:,} | "
        f"{st['lost_events']} | {st['unexpected_events']} | {st['partial_batches']} | {st['open_errors'] + st['corrupt']} |",
        "",
        f"({st['committed_not_reported']} batches were committed after the process's last report, before the kill: found, "
        f"as a commit should be. {st['wal_left_by_kill']} kills left a write-ahead log, which the next opening replayed.) "
        "These trials kill the process, not the machine: the store syncs in WAL mode with `synchronous=NORMAL`, so a power "
        "loss could still lose the last commits.",
        "",
        "**Server resume** (`fedpref.simulations.experiments.crashes.resume_kill_trials`). One uninterrupted run (in-process engine, "
        f"{rs['devices']} devices, {rs['rounds']} rounds, DP, FedAdam, half the devices a round), then per trial the same run "
        "killed with SIGKILL at a random moment (and in some trials killed again on its rerun), run again until it ends, "
        "and compared with the uninterrupted run: the final model bit for bit, every round's metrics, epsilon, and the run "
        "store's run completed with every round.",
        "",
        "| trials | kills | second kills | resumed to the same model, rounds and epsilon | did not | runs left running in the store |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {rs['trials']} | {rs['kills']} | {rs['second_kills']} | {rs['matches']} | {rs['mismatches']} | {rs['stale_running_runs']} |",
        "",
        f"Where the kills landed: {kills}.",
    ]


_SECTIONS = {"dropout": _dropout_section, "secagg": _secagg_section, "straggler": _straggler_section,
             "validation": _validation_section, "poison": _poison_section, "crashes": _crashes_section}
