"""Update encodings: the bytes a device sends per round, and what each costs in test HR@10.

    .venv/bin/python benchmarks/bench_encoding.py
    .venv/bin/python benchmarks/bench_encoding.py --rounds 40 --fraction-train 0.1

Runs the same federated training on movielens-small (MF, run-config defaults, seed 0) on the
in-process engine once per ``update-encoding`` (float32: weights; float16 and int8: the
clipped update itself, int8 with stochastic rounding; fedpref.models.encoding), evaluating
every device after the last round. Bytes are those of one device's reply arrays as serialised
in a Flower message; "encode ms" is what a device spends encoding them (within the clipping
bound) and serialising; HR@10 is the sampled test protocol; "run s" is the whole run's wall
time. Prints ratios against float32.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array

from _results import write_results

from fedpref.models.encoding import encode_within
from fedpref.models.config import FederatedConfig
from fedpref.models.train import init_params
from fedpref.simulations.data.movielens import load_movielens_small
from fedpref.simulations.engines.inprocess import run_inprocess
from fedpref.simulations.data.population import write_population
from fedpref.simulations.data.split import leave_one_out

ENCODINGS = ("float32", "float16", "int8")


def reply_bytes(encoding: str, n_items: int, config: FederatedConfig, repeats: int = 20) -> tuple[int, float]:
    """The serialised bytes of one device's reply arrays (they do not depend on the values),
    and the milliseconds a device spends encoding (within the bound) and serialising them."""
    shared, _ = init_params(config.model_spec, 1, n_items, 0)
    update = {k: v * 1e-3 for k, v in shared.items()}
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(repeats):
        sent = shared if encoding == "float32" else encode_within(update, encoding, config.clip_norm, rng)
        size = sum(len(Array(np.ascontiguousarray(a)).data) for a in sent.values())
    return size, (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--fraction-train", type=float, default=0.1)
    args = parser.parse_args()
    split = leave_one_out(load_movielens_small(), seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        population = write_population(split, Path(tmp) / "population")
        for encoding in ENCODINGS:
            config = FederatedConfig.from_run_config({
                "history-dir": str(population), "results-dir": str(Path(tmp) / encoding), "num-server-rounds": args.rounds,
                "fraction-train": args.fraction_train, "evaluate-every": args.rounds, "update-encoding": encoding,
            })
            start = time.perf_counter()
            result = run_inprocess(config, n_devices=split.n_users)
            last = result["rounds"][-1]
            size, encode_ms = reply_bytes(encoding, split.n_items, config)
            rows.append({"encoding": encoding, "bytes_per_device_round": size, "encode_ms": encode_ms,
                         "test_hr": last["test-hr"], "test_ndcg": last["test-ndcg"], "val_hr": last["val-hr"], "seconds": time.perf_counter() - start})
            print(f"  {encoding}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    base = rows[0]
    print(f"movielens-small ({split.n_users} devices, {split.n_items:,} items), MF dim 64, {args.rounds} rounds, "
          f"{args.fraction_train:g} of the devices a round, in-process engine, seed 0")
    print(f"{'encoding':>9} {'bytes / device / round':>23} {'/ float32':>10} {'encode ms':>10} {'test HR@10':>11} {'- float32':>10} {'test NDCG@10':>13} {'run s':>6} {'/ float32':>10}")
    for r in rows:
        print(f"{r['encoding']:>9} {r['bytes_per_device_round']:>23,} {r['bytes_per_device_round'] / base['bytes_per_device_round']:>9.2f}x {r['encode_ms']:>10.1f} "
              f"{r['test_hr']:>11.4f} {r['test_hr'] - base['test_hr']:>+10.4f} {r['test_ndcg']:>13.4f} {r['seconds']:>6.0f} {r['seconds'] / base['seconds']:>9.2f}x")
    write_results("bench_encoding", {"rounds": args.rounds, "fraction_train": args.fraction_train, "rows": rows})


if __name__ == "__main__":
    main()
