"""The privacy-utility sweep: what a given epsilon costs in accuracy, at each cohort size.

For every cohort size m and noise multiplier z (z = 0: no DP, the reference of that cohort
size), one federated run with the same settings otherwise; each run reports the epsilon it
spent over all its rounds (at delta 1/(10 N) unless set) and the test HR@10 of the round
chosen on validation. Runs use the in-process engine (same apps and messages as Flower's
Simulation Engine, one process) or, for large populations, the fast engine
(:mod:`fedpref.simulations.engines.fast`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from fedpref.models.config import FederatedConfig

from fedpref.simulations.engines.inprocess import run_inprocess

FIELDS = ("cohort", "noise_multiplier", "epsilon", "delta", "rounds", "test_hr", "test_ndcg", "test_full_hr", "val_hr", "chosen_round", "seconds")


def sweep_runs(noise_multipliers: list[float], cohorts: list[int]) -> list[tuple[int, float]]:
    """Every (cohort, z), the non-private run (z = 0) of each cohort first."""
    zs = sorted(set(noise_multipliers) | {0.0})
    return [(m, z) for m in cohorts for z in zs]


def run_sweep(
    base: Mapping[str, object],
    n_devices: int,
    runs: list[tuple[int, float]],
    out: Path,
    on_run: Callable[[dict], None] | None = None,
    rerun: bool = False,
    engine: str = "inprocess",
    threads: int | None = None,
) -> list[dict]:
    """Run each (cohort, z) with ``base``'s settings; writes ``out``/sweep.csv as it goes. A
    run whose folder already holds the results of the same run config is read, not run again
    (so that points can be added to a sweep), unless ``rerun``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cohort, z in runs:
        values = {**base, "fraction-train": cohort / n_devices, "min-train-nodes": cohort, "dp-noise-multiplier": z,
                  "results-dir": str(out / f"m{cohort}-z{z:g}")}
        config = FederatedConfig.from_run_config(values)
        done = Path(config.results_dir) / "rounds.json"
        previous = json.loads(done.read_text()) if done.exists() and not rerun else None
        if previous is not None and previous.get("config") == config.to_run_config():
            result = {**previous, "engine_seconds": previous["seconds"]}
        elif engine == "fast":
            from fedpref.simulations.engines.fast import run_fast

            result = run_fast(config, threads=threads)
        else:
            result = run_inprocess(config, n_devices=n_devices)
        chosen, privacy = result["chosen"], result.get("privacy") or {}
        row = {
            "cohort": cohort,
            "noise_multiplier": z,
            "epsilon": privacy.get("epsilon", float("inf")),
            "delta": privacy.get("delta", ""),
            "rounds": privacy.get("rounds-run", result["rounds"][-1]["round"]),
            "test_hr": chosen.get("test-hr"),
            "test_ndcg": chosen.get("test-ndcg"),
            "test_full_hr": chosen.get("test-full-hr"),
            "val_hr": chosen.get("val-hr"),
            "chosen_round": result["chosen_round"],
            "seconds": result["engine_seconds"],
        }
        rows.append(row)
        write_csv(rows, out / "sweep.csv")
        if on_run:
            on_run(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(rows: list[dict], path: Path, *, title: str, popularity_hr: float | None = None) -> None:
    """Test HR@10 against epsilon (log scale), a line per cohort size, each point labelled
    with its z; the cohort's non-private run as a dotted line of its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, cohort in enumerate(sorted({r["cohort"] for r in rows})):
        colour = colours[i % len(colours)]
        mine = [r for r in rows if r["cohort"] == cohort]
        private = sorted((r for r in mine if r["noise_multiplier"] > 0), key=lambda r: r["epsilon"])
        if private:
            ax.plot([r["epsilon"] for r in private], [r["test_hr"] for r in private], "o-", color=colour, label=f"{cohort} devices a round")
            for r in private:
                ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], r["test_hr"]), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
        for r in mine:
            if r["noise_multiplier"] == 0:
                ax.axhline(r["test_hr"], color=colour, ls=":", lw=1, label=f"{cohort} a round, no DP: {r['test_hr']:.3f}")
    if popularity_hr is not None:
        ax.axhline(popularity_hr, color="grey", ls="--", lw=1, label=f"popularity (no learning): {popularity_hr:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (whole run; delta in the CSV)")
    ax.set_ylabel("test HR@10 (sampled, 99 negatives)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
