"""Speed and memory of the foundation: load, split, train, evaluate, generate.

    .venv/bin/python benchmarks/bench_foundation.py              # everything (about 2 minutes)
    .venv/bin/python benchmarks/bench_foundation.py --users 100000   # a smaller generator run

Prints, on movielens-small: load time, split time, one centralised epoch of MF and of NeuMF
(NeuMF as a ratio to MF), validation evaluation with and without full ranking (full as a ratio
to sampled-only), and the process's peak memory; the loading rate of a 1,000,000-row
MovieLens ``ratings.dat`` file written for the purpose; and the synthetic generator's rate at
1,000,000 users (about 50 events each) against 100,000 users in the same command (the ratio
shows whether it scales linearly). The generator runs in child processes so that each peak
memory is its own. Results also go to results/bench_foundation.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from _results import write_results

from fedpref.models.train import LocalData, default_config, init_params, local_update
from fedpref.simulations.data.loaders import load_file
from fedpref.simulations.data.movielens import load_movielens_small
from fedpref.simulations.evaluate import evaluate, model_scorer
from fedpref.simulations.data.split import leave_one_out

HERE = Path(__file__).resolve().parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn, repeat: int = 1):
    """Best of ``repeat`` wall times, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def generator_run(users: int) -> dict:
    cmd = [sys.executable, str(HERE / "synthetic_rate.py"), "--users", str(users), "--json"]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000, help="synthetic users for the generator rate")
    parser.add_argument("--file-rows", type=int, default=1_000_000, help="rows of the ratings.dat load test")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    report: dict = {}

    t_load, table = timed(load_movielens_small, repeat=3)
    t_split, split = timed(lambda: leave_one_out(table, seed=0), repeat=3)
    rows += [("load movielens-small (100,004 ratings)", f"{t_load:.3f} s"), ("leave-one-out split + 99 negatives per user", f"{t_split:.3f} s")]

    data = LocalData(split.train_users(), split.train_items, split.n_items)
    epoch = {}
    for kind in ("mf", "neumf"):
        cfg = replace(default_config(kind), epochs=1)
        shared, private = init_params(cfg.model, split.n_users, split.n_items, 0)
        epoch[kind], _ = timed(lambda: local_update(shared, private, data, cfg, np.random.default_rng(0)))
    rows += [
        (f"one centralised epoch, MF ({split.n_train:,} positives x 20 negatives)", f"{epoch['mf']:.2f} s"),
        ("one centralised epoch, NeuMF", f"{epoch['neumf']:.2f} s ({epoch['neumf'] / epoch['mf']:.1f}x MF)"),
    ]

    cfg = default_config("mf")
    shared, private = init_params(cfg.model, split.n_users, split.n_items, 0)
    scorer = model_scorer(cfg.model, shared, private, split.n_items)
    t_sampled, _ = timed(lambda: evaluate(scorer, split, target="val", full=False), repeat=3)
    t_full, _ = timed(lambda: evaluate(scorer, split, target="val", full=True), repeat=3)
    rows += [
        (f"evaluate {split.n_users} users, sampled only", f"{t_sampled:.3f} s"),
        (f"evaluate {split.n_users} users, sampled + full ranking over {split.n_items:,} items", f"{t_full:.3f} s ({t_full / t_sampled:.1f}x sampled)"),
        ("peak memory of this process so far", f"{peak_rss_mb():.0f} MB"),
    ]
    report["movielens_small"] = {"load_s": t_load, "split_s": t_split, "epoch_mf_s": epoch["mf"], "epoch_neumf_s": epoch["neumf"], "eval_sampled_s": t_sampled, "eval_full_s": t_full, "peak_rss_mb": peak_rss_mb()}

    # A large MovieLens file in the 1M/10M format.
    rng = np.random.default_rng(0)
    n = args.file_rows
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ratings.dat"
        cols = np.stack([rng.integers(1, n // 50 + 2, n), rng.integers(1, 20_000, n), rng.integers(1, 6, n), rng.integers(9e8, 1.6e9, n)], axis=1)
        np.savetxt(path, cols, fmt="%d", delimiter="::")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random rows repeat some (user, item) pairs
            t_file, big = timed(lambda: load_file(path))
    rows.append((f"load a {n:,}-row ratings.dat (ml-1m format)", f"{t_file:.2f} s ({n / t_file / 1e6:.2f} M rows/s)"))
    report["ratings_dat"] = {"rows": n, "seconds": t_file}

    small = generator_run(max(1, args.users // 10))
    large = generator_run(args.users)
    scale = (large["seconds"] / small["seconds"]) / (args.users / max(1, args.users // 10))
    rows += [
        (f"synthetic generator, {small['users']:,} users", f"{small['users_per_second']:,.0f} users/s, {small['peak_rss_mb']:.0f} MB peak"),
        (f"synthetic generator, {large['users']:,} users ({large['events_per_user']:.1f} events each)", f"{large['users_per_second']:,.0f} users/s, {large['seconds']:.1f} s, {large['peak_rss_mb']:.0f} MB peak"),
        ("  time per user at the large size / at the small size", f"{scale:.2f}x (1.0 = linear)"),
    ]
    report["generator"] = {"small": small, "large": large, "per_user_time_ratio": scale}

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  result")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    write_results("bench_foundation", report)


if __name__ == "__main__":
    main()
