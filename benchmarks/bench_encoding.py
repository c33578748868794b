"""Update encodings: the bytes a device sends per round, and what each costs in test HR@10.

    .venv/bin/python benchmarks/bench_encoding.py
    .venv/bin/python benchmarks/bench_encoding.py --rounds 40 --fraction-train 0.1

Runs the same federated training on movielens-small (MF, run-config defaults, seed 0) on the
in-process engine once per ``update-encoding`` (float32: weights; float16 and int8: the
clipped update itself, int8 with stochastic rounding; fedpref.models.encoding), evaluating
every device after the last round. Bytes are those of one device's reply arrays as serialised
in a Flower message; HR@10 is the sampled test protocol. Prints ratios against float32.
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
from fedpref.models.federation import FederatedConfig
from fedpref.models.train import init_params
from fedpref.simulations.data.movielens import load_movielens_small
from fedpref.simulations.inprocess import run_inprocess
from fedpref.simulations.population import write_population
from fedpref.simulations.split import leave_one_out

ENCODINGS = ("float32", "float16", "int8")


def reply_bytes(encoding: str, n_items: int, config: FederatedConfig) -> int:
    """The serialised bytes of one device's reply arrays (they do not depend on the values)."""
    shared, _ = init_params(config.model_spec, 1, n_items, 0)
    if encoding == "float32":
        return sum(len(Array(np.ascontiguousarray(a)).data) for a in shared.values())
    update = {k: v * 1e-3 for k, v in shared.items()}
    sent = encode_within(update, encoding, config.clip_norm, np.random.default_rng(0))
    return sum(len(Array(np.ascontiguousarray(a)).data) for a in sent.values())


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
            rows.append({"encoding": encoding, "bytes_per_device_round": reply_bytes(encoding, split.n_items, config),
                         "test_hr": last["test-hr"], "test_ndcg": last["test-ndcg"], "val_hr": last["val-hr"], "seconds": time.perf_counter() - start})
            print(f"  {encoding}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    base = rows[0]
    print(f"movielens-small ({split.n_users} devices, {split.n_items:,} items), MF dim 64, {args.rounds} rounds, "
          f"{args.fraction_train:g} of the devices a round, in-process engine, seed 0")
    print(f"{'encoding':>9} {'bytes / device / round':>23} {'/ float32':>10} {'test HR@10':>11} {'- float32':>10} {'test NDCG@10':>13}")
    for r in rows:
        print(f"{r['encoding']:>9} {r['bytes_per_device_round']:>23,} {r['bytes_per_device_round'] / base['bytes_per_device_round']:>9.2f}x "
              f"{r['test_hr']:>11.4f} {r['test_hr'] - base['test_hr']:>+10.4f} {r['test_ndcg']:>13.4f}")
    write_results("bench_encoding", {"rounds": args.rounds, "fraction_train": args.fraction_train, "rows": rows})


if __name__ == "__main__":
    main()
