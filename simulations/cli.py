"""The research commands of ``fedpref`` (the root command, :mod:`fedpref.cli`, mounts them beside
the operator's and the device's):

    fedpref data       --dataset movielens-small           # what a data set holds, and its split
    fedpref central    --dataset movielens-small --model mf # centralised training (the ceiling)
    fedpref local-only --dataset movielens-small            # each user alone (the floor)
    fedpref reference  --dataset movielens-small            # the whole reference table
    fedpref tune       --dataset movielens-small --lr 0.002,0.005 --l2 1e-3,1e-2
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedpref.models.config import RUN_CONFIG_DEFAULTS as _RC  # simulate's defaults are the run config's
from fedpref.models.metrics import NonFiniteScoresError
from fedpref.models.preference import MODELS
from fedpref.models.train import LOSSES, TrainConfig, default_config

from fedpref.simulations.data.interactions import DataFormatError, DataWarning
from fedpref.simulations.data.registry import describe_sources, load_dataset
from fedpref.simulations.evaluate import evaluate, popularity_scorer, random_scorer
from fedpref.simulations.reference import ReferenceResult, train_centralised, train_local_only
from fedpref.simulations.options import option, run_config_options
from fedpref.simulations.progress import progress_bar
from fedpref.simulations.data.split import LeaveOneOutSplit, SplitError, leave_one_out
from fedpref.simulations.data.population import FORMAT as FORMAT_ID

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="fedpref research: data, reference training, simulations and experiments.")
console = Console()
ENGINES = ("flower", "inprocess", "fast")
err = Console(stderr=True)

Dataset = Annotated[str, typer.Option(help=f"What to train on: {describe_sources()}.")]
Format = Annotated[Optional[str], typer.Option("--format", help="File format, overriding detection: ml-100k, ml-1m, ml-latest or csv.")]
Threshold = Annotated[Optional[float], typer.Option(help="Keep only ratings at or above this value (default: every rating is an interaction).")]
Seed = Annotated[int, typer.Option(help="Base seed: split, negatives, initialisation and sampling derive from it.")]
Out = Annotated[Optional[Path], typer.Option(help="Where to write the JSON result (default: results/<command>-<model>-<dataset>.json).")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
Model = option("model")
# Centralised training's settings (fedpref.models.train.TrainConfig), by default the model's tuned values.
TrainDim = Annotated[Optional[int], typer.Option(help="Embedding size (default: the model's tuned value).")]
TrainLoss = Annotated[Optional[str], typer.Option(help=f"Ranking loss: {', '.join(LOSSES)}.")]
TrainLr = Annotated[Optional[float], typer.Option(help="Adam step size.")]
TrainL2 = Annotated[Optional[float], typer.Option(help="L2 on the embeddings each batch touches.")]
TrainNegatives = Annotated[Optional[int], typer.Option(help="Sampled negatives per positive.")]
TrainBatchSize = Annotated[Optional[int], typer.Option(help="Positives per step.")]


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _read_population(folder: Path) -> tuple[dict, Path, str]:
    """A population folder's meta.json, the folder, and its data set's name (a clear error if it is not one)."""
    from fedpref.simulations.data.population import read_meta

    try:
        meta = read_meta(folder)
    except FileNotFoundError as exc:
        _fail(str(exc))
    return meta, folder, str(meta.get("name", folder.name))


def _load_split(dataset: str, format: str | None, threshold: float | None, seed: int) -> LeaveOneOutSplit:
    """Load and split, showing every :class:`DataWarning` and turning data errors into messages."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            interactions = load_dataset(dataset, format=format, rating_threshold=threshold, seed=seed)
            split = leave_one_out(interactions, seed=seed)
    except (DataFormatError, SplitError, FileNotFoundError) as exc:
        _fail(str(exc))
    for w in caught:
        if issubclass(w.category, DataWarning):
            err.print(f"[yellow]note:[/] {w.message}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    console.print(f"[dim]{interactions.summary()}[/]")
    console.print(f"[dim]{split.summary()}[/]")
    return split


def _config(
    model: str,
    dim: int | None,
    loss: str | None,
    lr: float | None,
    l2: float | None,
    negatives: int | None,
    batch_size: int | None,
) -> TrainConfig:
    if model not in MODELS:
        _fail(f"unknown model {model!r}; choose one of {sorted(MODELS)}")
    base = default_config(model)
    spec = base.model if dim is None else replace(base.model, dim=dim)
    changes = {"loss": loss, "lr": lr, "l2": l2, "num_negatives": negatives, "batch_size": batch_size}
    try:
        return replace(base, model=spec, **{k: v for k, v in changes.items() if v is not None})
    except ValueError as exc:
        _fail(str(exc))
        raise  # unreachable


def _slug(dataset: str) -> str:
    return Path(dataset).stem if Path(dataset).exists() else dataset.replace(":", "-")


def _write(out: Path, payload: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    console.print(f"wrote {out}")


def _split_info(split: LeaveOneOutSplit) -> dict:
    return {
        "name": split.name,
        "users": split.n_users,
        "items": split.n_items,
        "train_interactions": split.n_train,
        "dropped_users": split.dropped_users,
        "negatives_per_user": int(split.negatives.shape[1]),
        "seed": split.seed,
    }


def _result_payload(command: str, dataset: str, split: LeaveOneOutSplit, config: TrainConfig | None, seed: int, result: ReferenceResult, seconds: float) -> dict:
    return {
        "command": command,
        "dataset": dataset,
        "split": _split_info(split),
        "config": asdict(config) if config else None,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "val": result.val.as_dict(),
        "test": result.test.as_dict(),
        "history": result.history,
        "seconds": round(seconds, 2),
    }


def _metrics_table(rows: list[tuple[str, ReferenceResult | None, object, object]], k: int) -> Table:
    table = Table(title=f"HR@{k} / NDCG@{k}: sampled (1 + 99 negatives) and full ranking")
    for col in ("model", "epochs", "val HR", "val NDCG", "test HR", "test NDCG", "test full HR", "test full NDCG"):
        table.add_column(col, justify="right" if col != "model" else "left", no_wrap=col == "model")
    for name, result, val, test in rows:
        epochs = str(result.best_epoch) if result else "-"
        table.add_row(name, epochs, f"{val.hr:.4f}", f"{val.ndcg:.4f}", f"{test.hr:.4f}", f"{test.ndcg:.4f}", f"{test.full_hr:.4f}", f"{test.full_ndcg:.4f}")
    return table


# Upper bound on epochs and early-stopping patience of each reference trainer.
REFERENCE_EPOCHS = {"centralised": (60, 5), "local-only": (30, 3)}


def _train(trainer: str, split: LeaveOneOutSplit, config: TrainConfig, seed: int, max_epochs: int, patience: int, progress: bool) -> ReferenceResult:
    fn = train_centralised if trainer == "centralised" else train_local_only
    try:
        return fn(split, config, max_epochs=max_epochs, patience=patience, seed=seed, show_progress=progress)
    except (NonFiniteScoresError, FloatingPointError) as exc:
        _fail(str(exc))
        raise  # unreachable


@app.command()
def data(dataset: Dataset = "movielens-small", format: Format = None, rating_threshold: Threshold = None, seed: Seed = 0) -> None:
    """Show what a data set holds and how it splits."""
    split = _load_split(dataset, format, rating_threshold, seed)
    lengths = split.train_indptr[1:] - split.train_indptr[:-1] + 2
    console.print(f"interactions per user: min {lengths.min()}, median {int(sorted(lengths)[len(lengths) // 2])}, max {lengths.max()}")


def _train_command(trainer: str, **kw) -> None:
    split = _load_split(kw["dataset"], kw["format"], kw["rating_threshold"], kw["seed"])
    config = _config(kw["model"], kw["dim"], kw["loss"], kw["lr"], kw["l2"], kw["negatives"], kw["batch_size"])
    start = time.perf_counter()
    result = _train(trainer, split, config, kw["seed"], kw["max_epochs"], kw["patience"], kw["progress"])
    seconds = time.perf_counter() - start
    console.print(_metrics_table([(f"{trainer} {kw['model']}", result, result.val, result.test)], 10))
    name = "central" if trainer == "centralised" else "local-only"
    out = kw["out"] or Path("results") / f"{name}-{kw['model']}-{_slug(kw['dataset'])}.json"
    _write(out, _result_payload(name, kw["dataset"], split, config, kw["seed"], result, seconds))


@app.command()
def central(
    dataset: Dataset = "movielens-small",
    model: Model = _RC["model"],
    format: Format = None,
    rating_threshold: Threshold = None,
    dim: TrainDim = None,
    loss: TrainLoss = None,
    lr: TrainLr = None,
    l2: TrainL2 = None,
    negatives: TrainNegatives = None,
    batch_size: TrainBatchSize = None,
    max_epochs: Annotated[int, typer.Option(help="Upper bound; the epoch is chosen on validation.")] = 60,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation NDCG@10.")] = 5,
    seed: Seed = 0,
    out: Out = None,
    progress: Progress = True,
) -> None:
    """Centralised training, all data in one place: the reference ceiling."""
    _train_command("centralised", **locals())


@app.command("local-only")
def local_only(
    dataset: Dataset = "movielens-small",
    model: Model = _RC["model"],
    format: Format = None,
    rating_threshold: Threshold = None,
    dim: TrainDim = None,
    loss: TrainLoss = None,
    lr: TrainLr = None,
    l2: TrainL2 = None,
    negatives: TrainNegatives = None,
    batch_size: TrainBatchSize = None,
    max_epochs: Annotated[int, typer.Option(help="Upper bound; the epoch is chosen on validation.")] = 30,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation NDCG@10.")] = 3,
    seed: Seed = 0,
    out: Out = None,
    progress: Progress = True,
) -> None:
    """Each user trains on their own history alone, shared parameters frozen: the floor."""
    _train_command("local-only", **locals())


@app.command()
def reference(
    dataset: Dataset = "movielens-small",
    format: Format = None,
    rating_threshold: Threshold = None,
    seed: Seed = 0,
    out: Annotated[Optional[Path], typer.Option(help="Where to write the table (JSON and Markdown beside it).")] = None,
    progress: Progress = True,
) -> None:
    """The reference table: random, popularity, local-only MF, centralised MF and NeuMF."""
    split = _load_split(dataset, format, rating_threshold, seed)
    rows: list[tuple[str, ReferenceResult | None, object, object]] = []
    for name, scorer in (("random", random_scorer(split.n_items, seed)), ("popularity", popularity_scorer(split))):
        rows.append((name, None, evaluate(scorer, split, target="val", seed=seed), evaluate(scorer, split, target="test", seed=seed)))
    payload: dict = {"command": "reference", "dataset": dataset, "split": _split_info(split), "seed": seed, "rows": {}}
    for label, trainer, kind in (("local-only mf", "local-only", "mf"), ("centralised mf", "centralised", "mf"), ("centralised neumf", "centralised", "neumf")):
        config = default_config(kind)
        start = time.perf_counter()
        result = _train(trainer, split, config, seed, *REFERENCE_EPOCHS[trainer], progress)
        rows.append((label, result, result.val, result.test))
        payload["rows"][label] = _result_payload(trainer, dataset, split, config, seed, result, time.perf_counter() - start)
    for name, _, val, test in rows[:2]:
        payload["rows"][name] = {"val": val.as_dict(), "test": test.as_dict()}
    console.print(_metrics_table(rows, 10))
    out = out or Path("results") / f"reference-{_slug(dataset)}.json"
    _write(out, payload)
    md = ["| model | epochs | val HR@10 | val NDCG@10 | test HR@10 | test NDCG@10 | test full HR@10 | test full NDCG@10 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result, val, test in rows:
        md.append(f"| {name} | {result.best_epoch if result else '-'} | {val.hr:.4f} | {val.ndcg:.4f} | {test.hr:.4f} | {test.ndcg:.4f} | {test.full_hr:.4f} | {test.full_ndcg:.4f} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    console.print(f"wrote {out.with_suffix('.md')}")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


@app.command()
def tune(
    dataset: Dataset = "movielens-small",
    model: Model = _RC["model"],
    format: Format = None,
    rating_threshold: Threshold = None,
    loss: Annotated[str, typer.Option(help="Comma-separated losses to try.")] = "softmax,bpr",
    lr: Annotated[str, typer.Option(help="Comma-separated step sizes.")] = "0.002,0.005",
    l2: Annotated[str, typer.Option(help="Comma-separated L2 strengths.")] = "1e-3,1e-2",
    dim: Annotated[str, typer.Option(help="Comma-separated embedding sizes.")] = "64",
    negatives: Annotated[str, typer.Option(help="Comma-separated negatives per positive.")] = "20",
    max_epochs: int = 60,
    patience: int = 5,
    seed: Seed = 0,
    out: Out = None,
    progress: Progress = False,
) -> None:
    """Grid search on the validation item only; reports test for the chosen setting alone."""
    split = _load_split(dataset, format, rating_threshold, seed)
    base = default_config(model)
    grid = list(itertools.product(loss.split(","), _floats(lr), _floats(l2), _ints(dim), _ints(negatives)))
    trials = []
    best: tuple[float, TrainConfig, ReferenceResult] | None = None
    for i, (ls, lr_, l2_, dim_, neg) in enumerate(grid, 1):
        config = replace(base, model=replace(base.model, dim=dim_), loss=ls, lr=lr_, l2=l2_, num_negatives=neg)
        try:
            result = train_centralised(split, config, max_epochs=max_epochs, patience=patience, seed=seed, full_eval=False, show_progress=progress)
        except (NonFiniteScoresError, FloatingPointError) as exc:
            console.print(f"[{i}/{len(grid)}] {ls} lr={lr_} l2={l2_} dim={dim_} neg={neg}: diverged ({exc})")
            continue
        console.print(f"[{i}/{len(grid)}] {ls} lr={lr_} l2={l2_} dim={dim_} neg={neg}: epoch {result.best_epoch} val HR@10 {result.val.hr:.4f} NDCG@10 {result.val.ndcg:.4f}")
        trials.append({"loss": ls, "lr": lr_, "l2": l2_, "dim": dim_, "negatives": neg, "best_epoch": result.best_epoch, "val_hr": result.val.hr, "val_ndcg": result.val.ndcg})
        if best is None or result.val.ndcg > best[0]:
            best = (result.val.ndcg, config, result)
    if best is None:
        _fail("every setting diverged")
    assert best is not None
    _, config, _ = best
    # Test is measured once, for the setting validation chose (full ranking included).
    final = train_centralised(split, config, max_epochs=max_epochs, patience=patience, seed=seed, show_progress=progress)
    console.print(f"chosen on validation: {config}")
    console.print(_metrics_table([(f"centralised {model}", final, final.val, final.test)], 10))
    out = out or Path("results") / f"tune-{model}-{_slug(dataset)}.json"
    _write(out, {"command": "tune", "dataset": dataset, "split": _split_info(split), "seed": seed, "trials": trials, "chosen": asdict(config), "val": final.val.as_dict(), "test": final.test.as_dict(), "best_epoch": final.best_epoch})


# ---------------------------------------------------------------------------------------------
# Federated simulation
# ---------------------------------------------------------------------------------------------


def _population_folder(name: str, seed: int) -> str:
    """The default folder name of a generated population: its name, and its seed unless 0."""
    return name if seed == 0 or name.endswith(f"-seed{seed}") else f"{name}-seed{seed}"


@app.command()
def population(
    dataset: Dataset = "movielens-small",
    out: Annotated[Optional[Path], typer.Option(help="Folder to write the device histories to (default: results/populations/NAME[-seedS] for a generated population, results/population-movielens-small otherwise).")] = None,
    format: Format = None,
    rating_threshold: Threshold = None,
    seed: Seed = 0,
    stores: Annotated[Optional[Path], typer.Option(help="Also write one device store per device here (history as view events, consent federated), for run-config store-dir.")] = None,
    rerun: Annotated[bool, typer.Option("--rerun", help="Write a generated population again even when --out already holds it, or replace another population there.")] = False,
    chunk_users: Annotated[int, typer.Option(help="People drawn at a time for a generated population (memory only: the folder is the same for any value).")] = 20_000,
    progress: Progress = True,
) -> None:
    """Write one history per device (for `flwr run .` with --run-config history-dir=OUT).

    A generated population (synthetic: or fitted:) is drawn and written chunk by chunk, so ten
    million people fit in a few hundred MB of memory; a folder that already holds the same
    source and seed is reused at once."""
    from fedpref.simulations.data.population import PopulationError, population_state, write_device_stores, write_population, write_population_stream
    from fedpref.simulations.data.registry import stream_dataset

    if chunk_users < 1:
        _fail(f"--chunk-users must be a positive number of people, got {chunk_users}")
    try:
        streamed = stream_dataset(dataset, seed=seed, chunk_users=chunk_users, progress=progress)
    except (DataFormatError, ValueError, NotImplementedError) as exc:
        _fail(str(exc))
    if streamed is not None:
        if rating_threshold is not None or format is not None:
            _fail("a generated population has no file format and no ratings; drop --format and --rating-threshold")
        out = out or Path("results/populations") / _population_folder(streamed.name, streamed.seed)
        expected = {"name": streamed.name, "seed": streamed.seed, "format": FORMAT_ID, "source": dataset}
        if streamed.fingerprint is not None:  # the generator's identity, when it has one
            expected["fingerprint"] = str(streamed.fingerprint)
        state = population_state(out, expected)
        if state == "same" and not rerun:
            meta = json.loads((out / "meta.json").read_text())
            console.print(f"{out} already holds {dataset} (seed {streamed.seed}, {meta['n_users']:,} devices): cached, nothing written (--rerun writes it again)")
            folder, n_users = out, int(meta["n_users"])
        elif state == "foreign" or (state == "population" and not rerun):
            what = "files that are not a population"
            if state == "population":
                held = json.loads((out / "meta.json").read_text())
                what = f"another population ({held.get('source', held.get('name'))!s}, seed {held.get('seed')}, format {held.get('format', 'unversioned')})"
            _fail(f"{out} holds {what}; nothing was changed. Choose another --out{' or pass --rerun to replace it' if state == 'population' else ''}.")
        else:
            start = time.perf_counter()
            try:
                folder = write_population_stream(streamed, out, progress=progress, describe={"source": dataset})
            except (PopulationError, SplitError, DataFormatError) as exc:
                _fail(str(exc))
            n_users = int(json.loads((folder / "meta.json").read_text())["n_users"])
            console.print(f"wrote {n_users:,} device histories to {folder} in {time.perf_counter() - start:.0f} s")
    else:
        out = out or Path("results/population-movielens-small")
        if population_state(out) == "foreign":
            _fail(f"{out} holds files that are not a population; nothing was changed. Choose another --out.")
        split = _load_split(dataset, format, rating_threshold, seed)
        folder, n_users = write_population(split, out), split.n_users
        console.print(f"wrote {n_users:,} device histories to {folder}")
    run_config = f"history-dir='{folder.resolve()}'"
    if stores is not None:
        write_device_stores(folder, stores, progress=progress)
        console.print(f"wrote {n_users:,} device stores to {stores}")
        run_config += f" store-dir='{stores.resolve()}' fraction-evaluate=0.0"
    console.print(f"run them with: flwr run . --run-config \"{run_config}\"")


@app.command()
def fidelity(
    dataset: Annotated[str, typer.Option(help="The generated population to measure: synthetic:USERSxITEMS or fitted:SOURCE:USERS (draw i uses seed i).")],
    against: Annotated[str, typer.Option(help="The real data set to compare with (a built-in name or a file).")] = "movielens-small",
    draws: Annotated[int, typer.Option(help="Draws of the generator (seeds 0..draws-1), summarised as mean ± standard error.")] = 3,
    mf: Annotated[bool, typer.Option("--mf/--no-mf", help="Train central MF on the real data and every draw (minutes); --no-mf checks the rest in seconds.")] = True,
    max_epochs: Annotated[int, typer.Option(help="Central MF's upper bound on epochs (chosen on validation, as the reference does).")] = 60,
    patience: Annotated[int, typer.Option(help="Central MF stops after this many epochs without a better validation NDCG@10.")] = 5,
    out: Annotated[Optional[Path], typer.Option(help="Folder for fidelity.json and fidelity.png (default: results/fidelity-<dataset>).")] = None,
    progress: Progress = False,
) -> None:
    """How real a generated population looks: popularity and central-MF HR/NDCG@10, history
    lengths and item popularity (KS), and when popular items come, against real data."""
    from fedpref.simulations.data.population import PopulationError
    from fedpref.simulations.experiments.fidelity import FidelityError, plot_fidelity, run_fidelity, table_rows

    if max_epochs < 1 or patience < 1:
        _fail(f"--max-epochs and --patience must be positive, got {max_epochs} and {patience}")
    try:
        result = run_fidelity(dataset, against=against, draws=draws, mf=mf, max_epochs=max_epochs, patience=patience, progress=progress,
                              on_step=lambda text: console.print(f"[dim]{text}[/]"))
    except (FidelityError, PopulationError, DataFormatError, SplitError, FileNotFoundError, NotImplementedError) as exc:
        _fail(str(exc))
    except (NonFiniteScoresError, FloatingPointError) as exc:
        _fail(f"central MF diverged: {exc}")
    payload = result.payload
    table = Table(title=f"{dataset} ({draws} draw{'s' if draws > 1 else ''}) against {against}: test metrics @10, KS statistics")
    for col in ("quantity", "real", "generated (mean ± se)", "goal"):
        table.add_column(col, justify="left" if col == "quantity" else "right", no_wrap=col != "quantity")
    for row in table_rows(payload):
        table.add_row(*row)
    console.print(table)
    out = out or Path("results") / f"fidelity-{_slug(dataset)}"
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "fidelity.json", payload)
    plot_fidelity(result, out / "fidelity.png")
    console.print(f"wrote {out / 'fidelity.png'}")


def _references(split: LeaveOneOutSplit, dataset: str, model: str, seed: int, mode: str, progress: bool) -> dict[str, dict[str, float]]:
    """Validation HR/NDCG of centralised and local-only training and of popularity, same split.

    Cached under results/references/ so that every simulation on a data set reuses them.
    """
    pop = evaluate(popularity_scorer(split), split, target="val", seed=seed, full=False)
    refs: dict[str, dict[str, float]] = {"popularity": {"hr": pop.hr, "ndcg": pop.ndcg}}
    if mode == "none":
        return refs
    cache = Path("results") / "references" / f"{_slug(dataset)}-seed{seed}-{model}.json"
    if cache.exists() and mode == "auto":
        refs.update(json.loads(cache.read_text()))
        return refs
    config = default_config(model)
    computed = {}
    for name, trainer in (("centralised", "centralised"), ("local-only", "local-only")):
        console.print(f"reference: {name} {model} on the same split (cached in {cache})")
        result = _train(trainer, split, config, seed, *REFERENCE_EPOCHS[trainer], progress)
        computed[name] = {"hr": result.val.hr, "ndcg": result.val.ndcg, "test_hr": result.test.hr, "test_ndcg": result.test.ndcg, "test_full_hr": result.test.full_hr}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(computed, indent=2) + "\n")
    refs.update(computed)
    return refs


@app.command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="Results folders of `fedpref simulate`, each optionally labelled: \"label=folder\".")],
    out: Annotated[Path, typer.Option(help="The PNG to write.")] = Path("results/compare.png"),
    x: Annotated[str, typer.Option(help="round or seconds on the x axis.")] = "round",
    title: Annotated[str, typer.Option(help="Title of the plot.")] = "",
) -> None:
    """Several federated runs side by side: their validation curves in one plot, and a table
    of each run's chosen round with its validation and test figures."""
    from fedpref.simulations.report import plot_comparison

    if x not in ("round", "seconds"):
        _fail(f"--x must be round or seconds, got {x!r}")
    loaded: dict[str, dict] = {}
    for item in runs:
        label, _, folder = item.rpartition("=") if "=" in item else ("", "", item)
        path = Path(folder) / "rounds.json"
        if not path.exists():
            _fail(f"{folder}: no rounds.json here; give the results folder of a `fedpref simulate` run")
        result = json.loads(path.read_text())
        loaded[label or Path(folder).name] = result
    references = next((r["references"] for r in loaded.values() if r.get("references")), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_comparison({label: r["rounds"] for label, r in loaded.items()}, out, references=references, title=title, x=x)
    table = Table(title="chosen on validation NDCG@10")
    for col in ("run", "round", "val HR@10", "val NDCG@10", "test HR@10", "test NDCG@10", "test full HR@10", "seconds"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for label, r in loaded.items():
        c = r.get("chosen", {})
        table.add_row(
            label, f"{r.get('chosen_round')} of {len(r['rounds'])}",
            *(f"{c.get(m, float('nan')):.4f}" for m in ("val-hr", "val-ndcg", "test-hr", "test-ndcg", "test-full-hr")),
            f"{r.get('wall_seconds', r.get('seconds', float('nan'))):,.0f}",
        )
    console.print(table)
    console.print(f"wrote {out}")


def _run_config_overrides(text: str) -> dict[str, object]:
    """``--run-config "key=value key=value"``, Flower style."""
    overrides: dict[str, object] = {}
    for item in text.split():
        if "=" not in item:
            _fail(f"--run-config takes key=value pairs separated by spaces, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = value.strip("'\"")
    return overrides


@app.command()
@run_config_options(
    "num-server-rounds", "fraction-train", "local-epochs", "model", "dim", "lr", "l2", "clip-norm", "strategy", "server-lr",
    "server-lr-end", "lr-end", "evaluate-every", "dp-noise-multiplier", "dp-target-epsilon", "secagg", "reproducible-noise",
    names={"num-server-rounds": "rounds"},
    notes={"num-server-rounds": "the reported round is chosen on validation"},
)
def simulate(
    dataset: Dataset = "movielens-small",
    format: Format = None,
    rating_threshold: Threshold = None,
    run_config_values: dict = None,  # type: ignore[assignment]  # the options above, by run-config key
    devices_per_round: Annotated[Optional[int], typer.Option(help="Number of devices per round (instead of --fraction-train).")] = None,
    run_config: Annotated[str, typer.Option(help="More run-config overrides, Flower style: \"server-momentum=0.9 batch-size=32\".")] = "",
    seed: Seed = 0,
    engine: Annotated[str, typer.Option(help="flower: Flower's Simulation Engine (Ray), the apps that run on phones; inprocess: the same apps and messages, devices called one by one in this process; fast: the same server, a cohort's devices computed at once (compiled, 20x and more faster; docs/federated.md).")] = "flower",
    threads: Annotated[Optional[int], typer.Option(help="fast engine: devices trained at once (default: the machine's cores).")] = None,
    private_dir: Annotated[Optional[Path], typer.Option(help="fast engine: keep the devices' private vectors in a memory-mapped file in this folder (for millions of devices).")] = None,
    cpus_per_device: Annotated[float, typer.Option(help="Ray CPUs per virtual device (devices that run at once = CPUs / this).")] = 1.0,
    ray_address: Annotated[Optional[str], typer.Option(help="Address of an existing Ray cluster (e.g. ray://head:10001); default: a local one.")] = None,
    references: Annotated[str, typer.Option(help="Reference lines: auto (cached or computed), compute, none.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default results/sim-<dataset>-<model>-<strategy>-seed<seed>).")] = None,
    progress: Progress = True,
) -> None:
    """Federated training on Flower's Simulation Engine: one virtual device per user."""
    from fedpref.models.config import FederatedConfig, RunConfigError
    from fedpref.server import app as server_app
    from fedpref.server.secure import check_secagg

    from fedpref.simulations.engines.flower import backend_config, run_flower_simulation
    from fedpref.simulations.engines.inprocess import run_inprocess
    from fedpref.simulations.data.population import write_population
    from fedpref.simulations.report import plot_rounds, write_rounds_csv

    if engine not in ENGINES:
        _fail(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    rounds, model, strategy = (run_config_values[k] for k in ("num-server-rounds", "model", "strategy"))
    split = _load_split(dataset, format, rating_threshold, seed)
    out = out or Path("results") / f"sim-{_slug(dataset)}-{model}-{strategy}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    folder = write_population(split, out / "population")
    overrides = _run_config_overrides(run_config)
    if devices_per_round is not None:
        if not 1 <= devices_per_round <= split.n_users:
            _fail(f"--devices-per-round must lie in [1, {split.n_users}], got {devices_per_round}")
        run_config_values["fraction-train"] = devices_per_round / split.n_users
        overrides.setdefault("min-train-nodes", devices_per_round)
    values = {"history-dir": str(folder.resolve()), **run_config_values, "seed": seed, "results-dir": str(out.resolve()), **overrides}
    try:
        config = FederatedConfig.from_run_config(values)
        if config.dp:  # refuse a target that one round passes, or too much noise for adaptive clipping, before any work
            server_app.privacy_plan(config, split.n_users)
        if config.secagg:  # refuse a cohort below secagg-min-cohort before any work
            check_secagg(config, config.cohort_size(split.n_users))
        if engine == "fast":  # refuse what the fast engine does not compute before any work
            from fedpref.simulations.engines.fast import check_fast

            check_fast(config)
    except RunConfigError as exc:
        _fail(str(exc))
    refs = _references(split, dataset, model, seed, references, progress)
    backend = backend_config(cpus_per_device=cpus_per_device, ray_address=ray_address)
    (out / "config.json").write_text(json.dumps({"dataset": dataset, "split": _split_info(split), "run_config": config.to_run_config(), "engine": engine, "backend": {"cpus_per_device": cpus_per_device, "ray_address": ray_address}}, indent=2, default=str) + "\n")

    with progress_bar(rounds, f"federated rounds ({split.n_users} devices)", progress) as advance:
        last_status = {"text": ""}

        def on_round(row: dict) -> None:
            if row["event"] == "train":
                advance(last_status["text"])
            elif "val-hr" in row:
                last_status["text"] = f"round {row['round']}: val HR@10 {row.get('val-hr', float('nan')):.4f} NDCG@10 {row.get('val-ndcg', float('nan')):.4f}"
                if "epsilon" in row:
                    last_status["text"] += f" epsilon {row['epsilon']:.3g}"
                if not progress or not console.is_terminal:  # logs get a line per evaluation
                    console.print(last_status["text"])

        hooks = server_app.ServerHooks(on_round=[on_round])
        start = time.perf_counter()
        if engine == "flower":
            result = run_flower_simulation(config, n_devices=split.n_users, backend=backend, hooks=hooks)
        elif engine == "fast":
            from fedpref.simulations.engines.fast import run_fast

            result = run_fast(config, threads=threads, private_dir=str(private_dir) if private_dir else None, hooks=hooks)
        else:
            result = run_inprocess(config, n_devices=split.n_users, hooks=hooks)
        seconds = time.perf_counter() - start
    result["wall_seconds"] = round(seconds, 2)
    result["references"] = refs
    if "popularity" in result:  # the published histogram as a recommender for everyone, beside the true popularity
        from fedpref.client.cold_start import load_popularity

        from fedpref.simulations.evaluate import counts_scorer

        counts = load_popularity(out / result["popularity"]["file"])
        result["popularity"]["cold-start-test-hr"] = evaluate(counts_scorer(counts), split, target="test", seed=seed).hr
        result["popularity"]["true-popularity-test-hr"] = evaluate(popularity_scorer(split), split, target="test", seed=seed).hr
    (out / "rounds.json").write_text(json.dumps(result, indent=2) + "\n")
    write_rounds_csv(result["rounds"], out / "rounds.csv")
    title = f"{dataset}: federated {model}, {strategy}, {config.fraction_train:.0%} of {split.n_users} devices per round, C={config.clip_norm}"
    if config.dp:
        title += f", DP noise multiplier {config.dp_noise_multiplier}"
    plot_rounds(result["rounds"], out / "curves.png", references={k: v for k, v in refs.items()}, chosen_round=result["chosen_round"], title=title)
    chosen = result["chosen"]
    ran = result.get("privacy", {}).get("rounds-run", rounds)
    table = Table(title=f"round {result['chosen_round']} of {ran}, chosen on validation NDCG@10")
    for col in ("", "HR@10", "NDCG@10", "full HR@10", "full NDCG@10"):
        table.add_column(col, justify="right" if col else "left")
    for which in ("val", "test"):
        table.add_row(which, *(f"{chosen.get(f'{which}-{m}', float('nan')):.4f}" for m in ("hr", "ndcg", "full-hr", "full-ndcg")))
    console.print(table)
    if "privacy" in result:
        p = result["privacy"]
        stop = f", stopped before round {p['rounds-run'] + 1} of {p['rounds-planned']} by the target epsilon {p['target-epsilon']}" if p["stopped-by-target"] else ""
        histogram = " and the popularity histogram" if p.get("includes-popularity-histogram") else ""
        console.print(f"user-level DP: epsilon {p['epsilon']:.3g} at delta {p['delta']:.3g} after {p['rounds-run']} rounds{histogram} (noise multiplier {p['noise-multiplier']}, C {p['clip-norm']}, {p['cohort']} of {p['population']} devices a round){stop}")
        if config.reproducible_noise:
            console.print(f"the DP noise and cohorts came from seed {config.seed} (--reproducible-noise): anyone who knows it can remove the noise; not a private release")
    if "popularity" in result:
        p = result["popularity"]
        console.print(f"DP popularity histogram (epsilon {p['epsilon']:.3g} at delta {p['delta']:.2g}, {p['devices']} devices): "
                      f"recommended to everyone, test HR@10 {p['cold-start-test-hr']:.4f}; true popularity {p['true-popularity-test-hr']:.4f}")
    if "secure-aggregation" in result:
        sa = result["secure-aggregation"]
        dropped = sum(row.get("dropped", 0) for row in result["rounds"])
        console.print(f"secure aggregation: the server held only sums over {sa['cohort']} devices a round ({dropped} dropouts in all, {sa['rounds-skipped']} rounds skipped)")
    else:
        faults = {key: sum(row.get(key, 0) for row in result["rounds"]) for key in ("dropped", "late", "rejected")}
        skipped = sum(1 for row in result["rounds"] if row.get("skipped"))
        if any(faults.values()) or skipped:
            console.print(f"faults: {faults['dropped']} replies dropped, {faults['late']} late (past round-timeout), "
                          f"{faults['rejected']} rejected by validation, {skipped} rounds skipped (fewer than min-replies); per round in rounds.json")
    console.print(f"{seconds:.1f} s in all; wrote {out}/config.json, rounds.json, rounds.csv, curves.png")


@app.command()
@run_config_options(
    "num-server-rounds", "fraction-train", "clip-norm",
    names={"num-server-rounds": "rounds"},
    defaults={"num-server-rounds": 3, "fraction-train": 0.1, "clip-norm": 0.5},
    notes={"num-server-rounds": "per mode; the server's view of every round is attacked", "fraction-train": "the size of each secure sum"},
)
def audit(
    dataset: Dataset = "movielens-small",
    format: Format = None,
    rating_threshold: Threshold = None,
    run_config_values: dict = None,  # type: ignore[assignment]  # the options above, by run-config key
    modes: Annotated[str, typer.Option(help="Comma-separated modes: plain, dp, secagg, secagg-dp.")] = "plain,dp,secagg,secagg-dp",
    noise_multiplier: Annotated[float, typer.Option(help="z of the DP modes.")] = 1.0,
    run_config: Annotated[str, typer.Option(help="More run-config overrides, Flower style: \"dim=32 secagg-min-cohort=50\".")] = "",
    seed: Seed = 0,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default results/audit-<dataset>).")] = None,
    progress: Progress = True,
) -> None:
    """Leakage audit: how well a curious server infers each person's items from what it holds."""
    from fedpref.models.config import FederatedConfig, RunConfigError
    from fedpref.server.secure import check_secagg

    from fedpref.simulations.experiments.audit import MODES, mode_overrides, plot_audit, run_audit
    from fedpref.simulations.data.population import write_population

    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODES]
    if unknown or not chosen:
        _fail(f"unknown audit mode(s) {unknown}; choose from {', '.join(MODES)}")
    split = _load_split(dataset, format, rating_threshold, seed)
    out = out or Path("results") / f"audit-{_slug(dataset)}"
    out.mkdir(parents=True, exist_ok=True)
    folder = write_population(split, out / "population")
    rounds, clip_norm = run_config_values["num-server-rounds"], run_config_values["clip-norm"]
    base = {"history-dir": str(folder.resolve()), **run_config_values, "evaluate-every": rounds, "seed": seed, **_run_config_overrides(run_config)}
    try:
        for mode in chosen:
            config = FederatedConfig.from_run_config({**base, **mode_overrides(mode, noise_multiplier)})
            if config.secagg:
                check_secagg(config, config.cohort_size(split.n_users))
    except RunConfigError as exc:
        _fail(str(exc))
    with progress_bar(len(chosen), f"audit ({split.n_users} devices, {rounds} rounds per mode)", progress) as advance:
        def on_mode(result) -> None:
            line = f"{result.mode}: AUC {result.auc:.3f}"
            advance(line)
            if not progress or not console.is_terminal:
                console.print(line)

        start = time.perf_counter()
        report = run_audit(base, split.n_users, modes=chosen, noise_multiplier=noise_multiplier, out=out, on_mode=on_mode)
        seconds = time.perf_counter() - start
    plot_audit(report, out / "audit.png", title=f"{dataset}: what a curious server infers ({split.n_users} devices, {config.cohort_size(split.n_users)} a round, {rounds} rounds, C={clip_norm})")
    table = Table(title=f"attack AUC over (person, round); popularity prior {report['popularity-prior-auc']:.3f}, chance 0.5")
    for col in ("mode", "what the server holds", "AUC", "± se", "devices per view", "epsilon"):
        table.add_column(col, justify="left" if col in ("mode", "what the server holds") else "right")
    for m in report["modes"]:
        eps = "" if m["epsilon"] is None else f"{m['epsilon']:.3g} (delta {m['delta']:.2g})"
        table.add_row(m["mode"], m["description"], f"{m['auc']:.3f}", f"{m['auc_se']:.3f}", f"{m['devices_per_observation']:.0f}", eps)
    console.print(table)
    console.print(f"{seconds:.1f} s; wrote {out}/audit.json, audit.csv, audit.png")


@app.command()
@run_config_options(
    "num-server-rounds", "fraction-train", "evaluate-every",
    names={"num-server-rounds": "rounds"},
    defaults={"num-server-rounds": 30, "fraction-train": 0.1, "evaluate-every": 10},
    notes={"num-server-rounds": "per run", "fraction-train": "a median or trimmed mean holds every one's update: mind the memory",
           "evaluate-every": "the test figure is the round chosen on validation"},
)
def poison(
    dataset: Dataset = "movielens-small",
    format: Format = None,
    rating_threshold: Threshold = None,
    population: Annotated[Optional[Path], typer.Option(help="An existing population folder (`fedpref population --out DIR`) instead of --dataset.")] = None,
    run_config_values: dict = None,  # type: ignore[assignment]  # the options above, by run-config key
    fractions: Annotated[str, typer.Option(help="Comma-separated shares of compromised devices (0: the clean run).")] = "0,0.01,0.05,0.1",
    defences: Annotated[str, typer.Option(help="Comma-separated defences: none, median, trimmed-mean, norm-bound.")] = "none,median,trimmed-mean,norm-bound",
    norm_bound: Annotated[Optional[float], typer.Option(help="The norm-bound defence's bound (default: --norm-quantile of the clean run's honest update norms).")] = None,
    norm_quantile: Annotated[float, typer.Option(help="Quantile of the clean run's honest update norms that bounds updates under norm-bound: 0.1, 0.25, 0.5, 0.75, 0.9 or 1.")] = 0.5,
    target: Annotated[Optional[int], typer.Option(help="The item pushed (default: drawn by seed from the least popular half of the items with an interaction).")] = None,
    run_config: Annotated[str, typer.Option(help="More run-config overrides, Flower style: \"clip-norm=1 trim-fraction=0.2\".")] = "",
    seed: Seed = 0,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default results/poison-<dataset>).")] = None,
    engine: Annotated[str, typer.Option(help="fast: a cohort's devices computed at once (compiled); inprocess: the real ClientApp, devices one by one.")] = "fast",
    threads: Annotated[Optional[int], typer.Option(help="fast engine: devices trained at once (default: the machine's cores).")] = None,
    rerun: Annotated[bool, typer.Option("--rerun/--reuse", help="Run again the runs whose results the folder already holds (default: reuse them).")] = False,
    progress: Progress = True,
) -> None:
    """Poisoning: compromised devices push one unpopular item into everyone's top 10; its reach
    with and without each defence, and what each defence costs in HR@10."""
    from fedpref.models.config import FederatedConfig, RunConfigError

    from fedpref.simulations.experiments.poison import DEFENCES, NORM_QUANTILES, choose_target, defence_overrides, poison_sweep
    from fedpref.simulations.data.population import write_population

    try:
        shares = _floats(fractions)
    except ValueError:
        _fail(f"--fractions takes numbers separated by commas, got {fractions!r}")
    chosen = [d.strip() for d in defences.split(",") if d.strip()]
    unknown = [d for d in chosen if d not in DEFENCES]
    if unknown or not chosen:
        _fail(f"unknown defence(s) {unknown}; choose from {', '.join(DEFENCES)}")
    if not shares or any(not 0.0 <= f < 1.0 for f in shares):
        _fail(f"attack fractions must lie in [0, 1), got {shares}")
    if engine not in ("fast", "inprocess"):
        _fail(f"unknown engine {engine!r}; choose fast or inprocess")
    if norm_quantile not in NORM_QUANTILES:
        _fail(f"--norm-quantile must be one of {', '.join(f'{q:g}' for q in NORM_QUANTILES)}, got {norm_quantile}")
    if norm_bound is not None and not norm_bound > 0:
        _fail(f"--norm-bound must be positive, got {norm_bound}")
    if population is not None:
        meta, folder, dataset = _read_population(population)
    else:
        split = _load_split(dataset, format, rating_threshold, seed)
        meta = {"n_users": split.n_users, "n_items": split.n_items}
    n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
    out = out or Path("results") / f"poison-{_slug(dataset)}"
    out.mkdir(parents=True, exist_ok=True)
    if population is None:
        folder = write_population(split, out / "population")
    if target is not None and not 0 <= target < n_items:
        _fail(f"--target must be an item index in [0, {n_items}), got {target}")
    rounds = run_config_values["num-server-rounds"]
    base = {**run_config_values, **_run_config_overrides(run_config)}
    try:
        for defence in chosen:
            config = FederatedConfig.from_run_config({**base, "history-dir": str(folder.resolve()), **defence_overrides(defence, 1.0)})
            if engine == "fast":
                from fedpref.simulations.engines.fast import check_fast

                check_fast(config)
            if config.model != "mf" or config.secagg:
                raise RunConfigError("the poisoning simulation crafts plain matrix factorisation updates: use model=mf without secagg")
    except RunConfigError as exc:
        _fail(str(exc))
    target = choose_target(folder, seed) if target is None else target
    total = len(chosen) * len(set(shares)) + (0 if ("none" in chosen and 0.0 in shares) else 1)
    with progress_bar(total, f"poisoning ({n_users:,} devices, {rounds} rounds a run, item {target})", progress) as advance:
        def on_run(row: dict) -> None:
            line = (f"{row['fraction']:.0%} compromised, {row['defence']}: target HR@10 {row['target-hr']:.4f}, "
                    f"test HR@10 {row['test-hr'] if row['test-hr'] is not None else float('nan'):.4f}, {row['rejected']} rejected")
            advance(line)
            if not progress or not console.is_terminal:
                console.print(line)

        report = poison_sweep(folder, base, out, fractions=shares, defences=chosen, target=target, seed=seed, engine=engine, threads=threads,
                              norm_bound=norm_bound, norm_quantile=norm_quantile, on_run=on_run, rerun=rerun)
    bound = f"; norm bound {report['norm-bound']:.3g} ({report['norm-bound-from']})" if report.get("norm-bound") else ""
    table = Table(title=f"poisoning: item {report['target']} ({report['target-interactions']} interactions) pushed by compromised devices{bound}")
    for col in ("attackers", "defence", "target HR@10", "test HR@10", "full HR@10", "rejected", "seconds"):
        table.add_column(col, justify="left" if col == "defence" else "right", no_wrap=col == "defence")
    for r in report["rows"]:
        table.add_row(f"{r['fraction']:.0%} ({r['attackers']})", r["defence"], f"{r['target-hr']:.4f}",
                      *("n/a" if r[m] is None else f"{r[m]:.4f}" for m in ("test-hr", "test-full-hr")), str(r["rejected"]), f"{r['seconds']:.0f}")
    console.print(table)
    console.print(f"{report['seconds']:.0f} s of runs; wrote {out}/sweep.json, sweep.md and sweep.png")


@app.command("privacy-sweep")
@run_config_options(
    "num-server-rounds", "evaluate-every", "clip-norm",
    names={"num-server-rounds": "rounds"},
    defaults={"num-server-rounds": 40, "evaluate-every": 10, "clip-norm": 0.5},
    notes={"num-server-rounds": "per run; epsilon counts them all", "evaluate-every": "the test figure is the round chosen on validation"},
)
def privacy_sweep(
    dataset: Dataset = "movielens-small",
    format: Format = None,
    rating_threshold: Threshold = None,
    noise: Annotated[str, typer.Option(help="Comma-separated DP noise multipliers z (a run without DP is added for each cohort).")] = "0.5,1,2,4",
    cohorts: Annotated[str, typer.Option(help="Comma-separated devices per round.")] = "67,335",
    run_config_values: dict = None,  # type: ignore[assignment]  # the options above, by run-config key
    run_config: Annotated[str, typer.Option(help="More run-config overrides, Flower style: \"strategy=fedavgm server-lr=1\".")] = "",
    seed: Seed = 0,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default results/privacy-sweep-<dataset>).")] = None,
    rerun: Annotated[bool, typer.Option("--rerun/--reuse", help="Run again the points whose results the folder already holds (default: reuse them).")] = False,
    engine: Annotated[str, typer.Option(help="inprocess: the real apps, devices one by one; fast: a cohort's devices computed at once (for populations of millions).")] = "inprocess",
    threads: Annotated[Optional[int], typer.Option(help="fast engine: devices trained at once (default: the machine's cores).")] = None,
    population: Annotated[Optional[Path], typer.Option(help="An existing population folder (`fedpref population --out DIR`) instead of --dataset: a million devices are written once, not per sweep.")] = None,
    progress: Progress = True,
) -> None:
    """Privacy-utility sweep: epsilon against test HR@10 for several noise multipliers and cohort sizes."""
    from fedpref.models.config import FederatedConfig, RunConfigError
    from fedpref.server.app import privacy_plan

    from fedpref.simulations.data.population import write_population
    from fedpref.simulations.experiments.privacy_sweep import plot_sweep, run_sweep, sweep_runs

    try:
        zs, ms = _floats(noise), _ints(cohorts)
    except ValueError:
        _fail(f"--noise takes numbers and --cohorts whole numbers, separated by commas; got {noise!r} and {cohorts!r}")
    if engine not in ("inprocess", "fast"):
        _fail(f"unknown engine {engine!r}; choose inprocess or fast")
    if population is not None:
        meta, folder, dataset = _read_population(population)
        n_users, split = int(meta["n_users"]), None
    else:
        split = _load_split(dataset, format, rating_threshold, seed)
        n_users = split.n_users
    bad = [m for m in ms if not 2 <= m <= n_users]
    if bad or any(z < 0 for z in zs):
        _fail(f"cohorts must lie in [2, {n_users}] and noise multipliers be 0 or more; got cohorts {ms}, noise {zs}")
    out = out or Path("results") / f"privacy-sweep-{_slug(dataset)}"
    out.mkdir(parents=True, exist_ok=True)
    if split is not None:
        folder = write_population(split, out / "population")
    rounds, clip_norm = run_config_values["num-server-rounds"], run_config_values["clip-norm"]
    base = {"history-dir": str(folder.resolve()), **run_config_values, "seed": seed, **_run_config_overrides(run_config)}
    runs = sweep_runs(zs, ms)
    try:
        for m, z in runs:
            config = FederatedConfig.from_run_config({**base, "fraction-train": m / n_users, "min-train-nodes": m, "dp-noise-multiplier": z})
            if config.dp:
                privacy_plan(config, n_users)
            if engine == "fast":
                from fedpref.simulations.engines.fast import check_fast

                check_fast(config)
    except RunConfigError as exc:
        _fail(str(exc))
    with progress_bar(len(runs), f"privacy sweep ({n_users} devices, {rounds} rounds a run)", progress) as advance:
        def on_run(row: dict) -> None:
            line = f"{row['cohort']} a round, z={row['noise_multiplier']:g}: epsilon {row['epsilon']:.3g}, test HR@10 {row['test_hr']:.4f}"
            advance(line)
            if not progress or not console.is_terminal:
                console.print(line)

        rows = run_sweep(base, n_users, runs, out, on_run=on_run, rerun=rerun, engine=engine, threads=threads)
    if split is not None:
        pop_hr = evaluate(popularity_scorer(split), split, target="test", seed=seed).hr
    else:
        from fedpref.simulations.data.population import popularity_hr

        pop_hr = popularity_hr(folder, seed=seed)
    plot_sweep(rows, out / "sweep.png", popularity_hr=pop_hr,
               title=f"{dataset}: {n_users:,} devices, {rounds} rounds, C={clip_norm}: what epsilon costs")
    table = Table(title=f"privacy-utility sweep, {n_users:,} devices (popularity: test HR@10 {pop_hr:.4f})")
    for col in ("devices a round", "z", "epsilon", "delta", "test HR@10", "full HR@10", "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["cohort"]), f"{r['noise_multiplier']:g}", "no DP" if r["noise_multiplier"] == 0 else f"{r['epsilon']:.3g}",
                      "" if r["delta"] == "" else f"{r['delta']:.2g}", f"{r['test_hr']:.4f}", f"{r['test_full_hr']:.4f}", f"{r['seconds']:.0f}")
    console.print(table)
    console.print(f"wrote {out}/sweep.csv and sweep.png")


@app.command()
def frontier(
    population: Annotated[Path, typer.Option(help="A population folder (`fedpref population --dataset NAME --out DIR`).")],
    methods: Annotated[str, typer.Option(help="Comma-separated methods: fedavgm, adaptive, dim16, tree, fedadam (fedpref.simulations.experiments.frontier).")] = "fedavgm,dim16,tree",
    epsilons: Annotated[str, typer.Option(help="Comma-separated target epsilons; each point's z is solved for so that its epsilon lies within 1% below.")] = "1,2,4",
    accounting: Annotated[str, typer.Option(help="Comma-separated accountings: sampled (uniform cohorts), honest (no assumption; each device in at most ceil(T m / N) rounds).")] = "sampled,honest",
    rounds: Annotated[int, typer.Option(help="Rounds of every run (epsilon counts them all).")] = 100,
    cohort: Annotated[int, typer.Option(help="Devices per round.")] = 1000,
    delta: Annotated[Optional[float], typer.Option(help="Delta of every epsilon (default: 1e-8 from a million devices, else 1/(10 N)).")] = None,
    tune: Annotated[bool, typer.Option("--tune/--no-tune", help="First tune each method's clip-norm and server-lr on validation HR@10 at the median epsilon (a 3 x 3 grid).")] = False,
    goal: Annotated[Optional[float], typer.Option(help="The share of the non-DP lift to reach (e.g. 0.9): a line on the plot and a mark in the table.")] = None,
    personalisation: Annotated[bool, typer.Option("--personalisation/--no-personalisation", help="Also run the best reference and the best point at the smallest epsilon with personalize-epochs 0 (two runs).")] = True,
    run_config: Annotated[str, typer.Option(help="More run-config overrides for every method, Flower style: \"local-epochs=1 batch-size=32\".")] = "",
    seed: Seed = 0,
    threads: Annotated[Optional[int], typer.Option(help="Devices trained at once (default: the machine's cores).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default results/frontier-<population name>).")] = None,
    rerun: Annotated[bool, typer.Option("--rerun/--reuse", help="Run again the points whose results the folder already holds (default: reuse them).")] = False,
    progress: Progress = True,
) -> None:
    """The epsilon-accuracy frontier: each method's test HR@10 and share of its non-DP lift over popularity, against epsilon."""
    from fedpref.simulations.experiments.frontier import FrontierError, plan_frontier, plot_frontier, run_frontier, write_table

    try:
        targets, chosen_methods, accountings = _floats(epsilons), [m.strip() for m in methods.split(",") if m.strip()], \
            [a.strip() for a in accounting.split(",") if a.strip()]
    except ValueError:
        _fail(f"--epsilons takes numbers separated by commas, got {epsilons!r}")
    try:
        plan = plan_frontier(population, chosen_methods, targets, accountings, rounds=rounds, cohort=cohort,
                             out=out or Path("results") / f"frontier-{_slug(population.name)}", overrides=_run_config_overrides(run_config),
                             delta=delta, tune=tune, goal=goal, seed=seed, personalisation=personalisation)
    except FrontierError as exc:
        _fail(str(exc))
    console.print(f"[dim]{plan.name}: {plan.n_devices:,} devices, {plan.n_items:,} items; {cohort:,} a round, {rounds} rounds, delta {plan.delta:.3g}[/]")
    started = time.perf_counter()

    def on_point(row: dict, eta: str) -> None:
        what = "no DP" if row["accounting"] == "" else f"{row['accounting']} epsilon {row['target_epsilon']:g} (z={row['z']:.3g})"
        share = "" if row["share"] is None else f", share {row['share']:.2f}"
        console.print(f"{row['role']} {row['method']} C={row['clip_norm']:g} lr={row['server_lr']:g}, {what}: test HR@10 "
                      f"{row['test_hr']:.4f}, lift {row['lift']:+.4f}{share}; {row['seconds']:.0f} s ({eta})")

    try:
        rows = run_frontier(plan, threads=threads, rerun=rerun, on_point=on_point)
    except FrontierError as exc:
        _fail(str(exc))
    title = f"{plan.name}: {plan.n_devices:,} devices, {cohort:,} a round, {rounds} rounds, delta {plan.delta:.3g}"
    plot_frontier(rows, plan.out / "frontier.png", title=title, goal=goal)
    write_table(rows, plan.out / "frontier.md", title=title, goal=goal)
    table = Table(title=f"frontier, {title} (popularity: test HR@10 {rows[0]['pop_test_hr']:.4f})")
    for col in ("role", "method", "accounting", "target", "eps sampled", "eps honest", "z", "k", "test HR@10", "full HR@10", "share", "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["role"], r["method"], r["accounting"] or "no DP", "" if r["target_epsilon"] == "" else f"{r['target_epsilon']:g}",
                      "" if r["accounting"] == "" else f"{r['epsilon_sampled']:.3g}", "" if r["accounting"] == "" else f"{r['epsilon_honest']:.3g}",
                      f"{r['z']:.3g}", str(r["max_participations"] or ""), f"{r['test_hr']:.4f}", f"{r['test_full_hr']:.4f}",
                      "" if r["share"] is None else f"{r['share']:.2f}", f"{r['seconds']:.0f}")
    console.print(table)
    console.print(f"{time.perf_counter() - started:.0f} s; wrote {plan.out}/frontier.csv, frontier.png and frontier.md")


@app.command()
def reliability(
    parts: Annotated[str, typer.Option(help="Comma-separated parts: dropout, secagg, straggler, validation, poison, crashes (default: all).")] = "all",
    work: Annotated[Path, typer.Option(help="Where each part keeps its runs and its figures (<part>.json).")] = Path("results/reliability"),
    out: Annotated[Path, typer.Option(help="The page to write.")] = Path("docs/RELIABILITY.md"),
    reuse: Annotated[bool, typer.Option("--reuse/--rerun", help="Read a part's figures from WORK/<part>.json when there (rewrite the page without rerunning).")] = False,
    threads: Annotated[Optional[int], typer.Option(help="fast engine: devices trained at once (default: the machine's cores).")] = None,
    validation_trials: Annotated[int, typer.Option(help="validation: trials per kind of malformed reply.")] = 300,
) -> None:
    """The reliability record: dropouts, stragglers, malformed and poisoned updates, crashes; writes docs/RELIABILITY.md."""
    from fedpref.simulations.experiments.reliability import PARTS, run_parts, write_page

    chosen = list(PARTS) if parts == "all" else [p.strip() for p in parts.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        _fail(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)} (or all)")
    started = time.perf_counter()
    if validation_trials < 1:
        _fail(f"--validation-trials must be at least 1, got {validation_trials}")
    figures = run_parts(chosen, work, reuse=reuse, on_event=console.print, threads=threads, validation_trials=validation_trials)
    if parts != "all":  # the page shows every part: read the others' figures when there
        figures = {**run_parts([p for p in PARTS if p not in chosen and (work / f"{p}.json").exists()], work, reuse=True, on_event=lambda _: None), **figures}
        figures = {p: figures[p] for p in PARTS if p in figures}
    page = write_page(figures, out, "fedpref reliability")
    console.print(f"{time.perf_counter() - started:.0f} s; wrote {page}")


if __name__ == "__main__":
    app()
