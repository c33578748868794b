"""What one device's training round costs with each device optimiser: dense Adam, lazy
(sparse) Adam and SGD (sparse gradients).

    .venv/bin/python benchmarks/bench_device.py
    .venv/bin/python benchmarks/bench_device.py --devices 100 --dim 64 --epochs 3

Runs ``local_update`` (the function every device calls each round) on the histories of the
first N users of movielens-small, with the federated defaults (MF, 3 local epochs, batch 64,
the run-config negatives), once with each optimiser, in this process. Prints the mean time
per device and the ratios to dense Adam, for MF and for the NeuMF-style model. Dense Adam steps every one of the
9,066 item rows on every batch; lazy Adam (``torch.optim.SparseAdam`` on the embeddings) only
the rows the batch touched, so its cost follows the history rather than the catalogue.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from _results import write_results

from fedpref.models.config import FederatedConfig
from fedpref.models.train import LocalData, init_params, local_update
from fedpref.simulations.data.movielens import load_movielens_small
from fedpref.simulations.data.split import leave_one_out


def time_devices(split, n: int, config, seed: int = 0) -> float:
    """Mean seconds of one device's local update over the first ``n`` users."""
    shared, _ = init_params(config.model, 1, split.n_items, seed)
    _, private = init_params(config.model, 1, split.n_items, seed + 1)
    local_update(shared, private, LocalData.for_device(split.train_items[:10], split.n_items), config, np.random.default_rng(0))  # warm-up
    start = time.perf_counter()
    for u in range(n):
        items = split.train_items[split.train_indptr[u] : split.train_indptr[u + 1]]
        local_update(shared, private, LocalData.for_device(items, split.n_items), config, np.random.default_rng(u))
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each device does (fedpref.client.app)
    split = leave_one_out(load_movielens_small(), seed=0)
    rows = []
    print(f"{args.devices} devices of movielens-small ({split.n_items:,} items), dim {args.dim}, {args.epochs} local epochs")
    print(f"{'model':>6} {'adam (ms/device)':>17} {'lazy-adam (ms/device)':>22} {'sgd (ms/device)':>16} {'lazy / adam':>12} {'sgd / adam':>11}")
    for model in ("mf", "neumf"):
        base = FederatedConfig.from_run_config({"model": model, "dim": args.dim, "local-epochs": args.epochs}).train_config()
        dense = time_devices(split, args.devices, replace(base, optimizer="adam"))
        lazy = time_devices(split, args.devices, replace(base, optimizer="lazy-adam"))
        sgd = time_devices(split, args.devices, replace(base, optimizer="sgd", lr=1.0))
        rows.append({"model": model, "devices": args.devices, "dim": args.dim, "epochs": args.epochs, "adam_ms": dense * 1000, "lazy_adam_ms": lazy * 1000, "sgd_ms": sgd * 1000, "ratio": lazy / dense, "sgd_ratio": sgd / dense})
        print(f"{model:>6} {dense * 1000:>17.1f} {lazy * 1000:>22.1f} {sgd * 1000:>16.1f} {lazy / dense:>11.2f}x {sgd / dense:>10.2f}x")
    write_results("bench_device", rows)


if __name__ == "__main__":
    main()
