"""The ``fedpref`` command line.

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

from fedpref.models.metrics import NonFiniteScoresError
from fedpref.models.preference import MODELS, ModelSpec
from fedpref.models.train import LOSSES, TrainConfig, default_config

from .data.interactions import DataFormatError, DataWarning
from .data.registry import describe_sources, load_dataset
from .evaluate import evaluate, popularity_scorer, random_scorer
from .reference import ReferenceResult, train_centralised, train_local_only
from .split import LeaveOneOutSplit, SplitError, leave_one_out

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fedpref: on-device federated personalisation.")
console = Console()
err = Console(stderr=True)

Dataset = Annotated[str, typer.Option(help=f"What to train on: {describe_sources()}.")]
Format = Annotated[Optional[str], typer.Option("--format", help="File format, overriding detection: ml-100k, ml-1m, ml-latest or csv.")]
Threshold = Annotated[Optional[float], typer.Option(help="Keep only ratings at or above this value (default: every rating is an interaction).")]
Seed = Annotated[int, typer.Option(help="Base seed: split, negatives, initialisation and sampling derive from it.")]
Out = Annotated[Optional[Path], typer.Option(help="Where to write the JSON result (default: results/<command>-<model>-<dataset>.json).")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


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
    model: Annotated[str, typer.Option(help=f"Preference model: {', '.join(MODELS)}.")] = "mf",
    format: Format = None,
    rating_threshold: Threshold = None,
    dim: Annotated[Optional[int], typer.Option(help="Embedding size (default: the model's tuned value).")] = None,
    loss: Annotated[Optional[str], typer.Option(help=f"Ranking loss: {', '.join(LOSSES)}.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam step size.")] = None,
    l2: Annotated[Optional[float], typer.Option(help="L2 on the embeddings each batch touches.")] = None,
    negatives: Annotated[Optional[int], typer.Option(help="Sampled negatives per positive.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Positives per step.")] = None,
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
    model: Annotated[str, typer.Option(help=f"Preference model: {', '.join(MODELS)}.")] = "mf",
    format: Format = None,
    rating_threshold: Threshold = None,
    dim: Annotated[Optional[int], typer.Option(help="Embedding size.")] = None,
    loss: Annotated[Optional[str], typer.Option(help=f"Ranking loss: {', '.join(LOSSES)}.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam step size.")] = None,
    l2: Annotated[Optional[float], typer.Option(help="L2 on the embeddings each batch touches.")] = None,
    negatives: Annotated[Optional[int], typer.Option(help="Sampled negatives per positive.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Positives per step.")] = None,
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
        result = _train(trainer, split, config, seed, 60 if trainer == "centralised" else 30, 5 if trainer == "centralised" else 3, progress)
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
    model: Annotated[str, typer.Option(help=f"Preference model: {', '.join(MODELS)}.")] = "mf",
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


if __name__ == "__main__":
    app()
