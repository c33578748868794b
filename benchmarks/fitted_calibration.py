"""Calibrate the fitted generator's draw settings against the data it was fitted to.

    nice -n 10 .venv/bin/python benchmarks/fitted_calibration.py
    nice -n 10 .venv/bin/python benchmarks/fitted_calibration.py --temperature 0.8,1 --gamma 0.3,0.4 --no-mf
    nice -n 10 .venv/bin/python benchmarks/fitted_calibration.py --speed 20480

For every combination of the settings given (default: the generator's defaults) it draws
``--draws`` populations of the source's size (seeds 0, 1, ...), splits each by the evaluation
protocol (temporal leave-one-out, 99 sampled negatives, seed 0) and measures on the test item:

- popularity HR@10 (sampled),
- central MF HR@10 (sampled): ``train_centralised`` with the tuned settings of the reference
  (``default_config("mf")``, early stopping on validation), unless ``--no-mf``;
- the oracle HR@10: each person ranked by the very logits they were drawn from (how much taste
  signal the draw carries; no training);
- two-sample Kolmogorov-Smirnov statistics against the source: history lengths, and item
  popularity (each item's events per person);
- the share of events on the top 1% of items, and the median and 95th percentile of history
  lengths.

Each line is one draw; ``mean`` lines give the mean and its standard error over the draws
(a HR@10 over 671 people has a standard error near 0.018 on its own, so single draws scatter).
The source's own figures come first; its central MF HR@10 is the reference's (docs/reference.md,
``fedpref reference``), or recomputed with ``--real-mf``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings

import numpy as np

from fedpref.models.train import default_config
from fedpref.simulations.data.fitted import DrawSettings, FitConfig, fit_generator, generate_fitted
from fedpref.simulations.data.registry import load_dataset
from fedpref.simulations.data.split import leave_one_out
from fedpref.simulations.evaluate import evaluate, popularity_scorer
from fedpref.simulations.experiments.fidelity import ks_statistic
from fedpref.simulations.reference import train_centralised

#: movielens-small's central MF test HR@10 (docs/reference.md, ``fedpref reference``).
REFERENCE_MF_HR = {"movielens-small": 0.7124}


def table_figures(table) -> dict[str, np.ndarray | float]:
    lengths = np.bincount(table.user, minlength=table.n_users)
    item_counts = np.bincount(table.item, minlength=table.n_items)
    top = np.sort(item_counts)[::-1][: max(1, table.n_items // 100)]
    return {
        "lengths": lengths,
        "popularity": item_counts / table.n_users,
        "top1": top.sum() / len(table),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
    }


def measure(table, real, *, mf: bool, oracle=None) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = leave_one_out(table, seed=0)
    out = {"pop": evaluate(popularity_scorer(split), split, target="test", full=False).hr}
    if oracle is not None:
        out["oracle"] = evaluate(oracle(split), split, target="test", full=False).hr
    if mf:
        result = train_centralised(split, default_config("mf"), full_eval=False, show_progress=False)
        out["mf"] = result.test.hr
        out["mf_epoch"] = result.best_epoch
    figures = table_figures(table)
    out["ks_len"] = ks_statistic(figures["lengths"], real["lengths"])
    out["ks_pop"] = ks_statistic(figures["popularity"], real["popularity"])
    for name in ("top1", "median", "p95"):
        out[name] = figures[name]
    return out


COLUMNS = ("pop", "mf", "oracle", "ks_len", "ks_pop", "top1", "median", "p95")


def line(label: str, row: dict[str, float]) -> str:
    cells = [f"{row[c]:>7.3f}" if c in row and not c.startswith(("median", "p95")) else f"{row.get(c, float('nan')):>7.0f}" for c in COLUMNS]
    return f"{label:<44} " + " ".join(cells)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    defaults = DrawSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="movielens-small")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--temperature", type=floats, default=[defaults.temperature])
    parser.add_argument("--beta", type=floats, default=[defaults.beta])
    parser.add_argument("--gamma", type=floats, default=[defaults.gamma])
    parser.add_argument("--rho", type=floats, default=[defaults.popularity_share], help="popularity_share")
    parser.add_argument("--dim", type=int, default=FitConfig().dim, help="the fit's MF dimension")
    parser.add_argument("--no-mf", dest="mf", action="store_false", help="skip central MF on the draws (the slow part)")
    parser.add_argument("--real-mf", action="store_true", help="train central MF on the source too")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the MF trainings")
    parser.add_argument("--seeds", type=int, nargs="*", help="draw these seeds instead of 0 .. draws-1")
    parser.add_argument("--speed", type=int, metavar="N", help="only time a streamed draw of N people at the defaults")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    model = fit_generator(args.source, config=FitConfig(dim=args.dim), progress=True)
    print(f"fit: {model.info}")
    if args.speed:
        start, events = time.perf_counter(), 0
        for chunk in _chunks(model, args.speed, 0):
            events += len(chunk)
        seconds = time.perf_counter() - start
        print(f"{args.speed:,} people, {events / args.speed:.1f} events each, {seconds:.1f} s: "
              f"{args.speed / seconds:,.0f} people a second, {1e7 / args.speed * seconds / 60:.0f} min for 10,000,000")
        return
    real_table = load_dataset(args.source)
    real = table_figures(real_table)
    real_row = measure(real_table, real, mf=args.real_mf)
    if not args.real_mf and args.source in REFERENCE_MF_HR:
        real_row["mf"] = REFERENCE_MF_HR[args.source]
    n_people = int((real["lengths"] >= 3).sum())
    print(f"{'':<44} " + " ".join(f"{c:>7}" for c in COLUMNS))
    print(line(f"{args.source} ({n_people} people)", real_row), flush=True)

    for t, beta, gamma, rho in itertools.product(args.temperature, args.beta, args.gamma, args.rho):
        drawn = model.with_draw(temperature=t, beta=beta, gamma=gamma, popularity_share=rho)
        label = f"T={t:g} beta={beta:g} gamma={gamma:g} rho={rho:g}"
        rows = []
        for seed in args.seeds if args.seeds else range(args.draws):
            start = time.perf_counter()
            table = generate_fitted(drawn, n_people, seed=seed)
            vectors = np.concatenate([c.user_vectors for c in _chunks(drawn, n_people, seed)])

            def oracle(split, vectors=vectors):
                def score(users):
                    logits = vectors[split.user_ids[users]] @ drawn.item_vectors.T / t + beta * drawn.item_bias
                    return logits

                return score

            row = measure(table, real, mf=args.mf, oracle=oracle)
            rows.append(row)
            print(line(f"  {label} draw {seed}", row) + f"   {time.perf_counter() - start:.0f} s", flush=True)
        mean = {c: float(np.mean([r[c] for r in rows])) for c in rows[0]}
        se = {c: float(np.std([r[c] for r in rows], ddof=1) / math.sqrt(len(rows))) if len(rows) > 1 else float("nan") for c in rows[0]}
        print(line(f"{label} mean", mean))
        print(line(f"{'':<{len(label)}} se", se))
        gaps = [f"{name} {mean[name] - real_row[name]:+.3f} ± {se[name]:.3f}" for name in ("pop", "mf") if name in mean and name in real_row]
        print(f"{'':<44} draws - source: " + ", ".join(gaps), flush=True)


def _chunks(model, n, seed):
    from fedpref.simulations.data.fitted import iter_fitted

    return iter_fitted(model, n, seed=seed)


if __name__ == "__main__":
    main()
