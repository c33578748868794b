"""What secure aggregation costs a round: SecAgg+ against plain aggregation, same devices.

    .venv/bin/python benchmarks/bench_secagg.py                      # cohorts of 30, 67 and 150
    .venv/bin/python benchmarks/bench_secagg.py --cohorts 67 --rounds 3

A synthetic population of 150 devices over 300 items (MF, dim 64, run-config defaults
otherwise) on the in-process engine, so that the figure is the protocol's work and not the
transport's. For each cohort size, a run without and a run with ``secagg`` (SecAgg+ in
neighbourhoods of 2 ceil(log2 m) + 1 devices), evaluation off; prints seconds per training
round (the mean over rounds after the first) and their ratio, measured in the same process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from _results import write_results

from fedpref.models.config import FederatedConfig
from fedpref.server.app import ServerHooks
from fedpref.server.secure import shares_per_device
from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
from fedpref.simulations.engines.inprocess import run_inprocess
from fedpref.simulations.data.population import write_population
from fedpref.simulations.data.split import leave_one_out

N_DEVICES, N_ITEMS = 150, 300


def seconds_per_round(folder: Path, out: Path, cohort: int, rounds: int, secagg: bool) -> float:
    stamps: list[float] = []
    hooks = ServerHooks(on_round=[lambda row: stamps.append(time.perf_counter()) if row["event"] == "train" else None])
    config = FederatedConfig.from_run_config({
        "history-dir": str(folder), "num-server-rounds": rounds, "evaluate-every": 10_000, "fraction-evaluate": 0.0,
        "fraction-train": cohort / N_DEVICES, "min-train-nodes": cohort, "secagg": secagg, "secagg-min-cohort": 2,
        "results-dir": str(out),
    })
    run_inprocess(config, n_devices=N_DEVICES, hooks=hooks)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return sum(gaps) / len(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohorts", default="30,67,150", help="comma-separated devices per round (at most 150)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (at least 2)")
    args = parser.parse_args()
    cohorts = [int(c) for c in args.cohorts.split(",")]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = leave_one_out(generate_synthetic(SyntheticConfig(n_users=N_DEVICES, n_items=N_ITEMS, mean_events=20, seed=0)).interactions, seed=0)
        folder = write_population(split, Path(tmp) / "population")
        rows = []
        print(f"{N_DEVICES} devices, {N_ITEMS} items, MF dim 64; seconds per training round, in-process engine")
        print(f"{'cohort':>7} {'shares':>7} {'plain s':>9} {'secagg s':>9} {'ratio':>7}")
        for cohort in cohorts:
            plain = seconds_per_round(folder, Path(tmp) / f"plain{cohort}", cohort, args.rounds, False)
            secure = seconds_per_round(folder, Path(tmp) / f"secure{cohort}", cohort, args.rounds, True)
            shares = shares_per_device(FederatedConfig.from_run_config({}), cohort)
            rows.append({"cohort": cohort, "shares": shares, "plain_s": round(plain, 3), "secagg_s": round(secure, 3), "ratio": round(secure / plain, 2)})
            print(f"{cohort:>7} {shares:>7} {plain:>9.3f} {secure:>9.3f} {secure / plain:>6.1f}x")
    write_results("bench_secagg", rows)


if __name__ == "__main__":
    main()
