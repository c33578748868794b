"""Flower's Simulation Engine against the fast engine, on the same run; and 100 fast rounds.

    .venv/bin/python benchmarks/bench_engines.py
    .venv/bin/python benchmarks/bench_engines.py --flower-rounds 3 --fast-rounds 100

Every device of movielens-small (671) trains in every round: MF, run-config defaults, seed 0.

The fast engine runs first, then Flower's (which starts Ray in this process; its threads may
outlive the run).

1. **Per round, both engines.** The same config on Flower's Simulation Engine (Ray, one
   virtual SuperNode per device, the real ClientApp) and on the fast engine, without federated
   evaluation (``fraction-evaluate=0``), so that a round is the training round alone. A round's
   seconds are those between the ends of consecutive rounds in the server's ``rounds.json``
   (the first round is left out: it starts Ray's workers, or compiles the fast engine's code).
   The ratio is Flower's median over the fast engine's.
2. **100 rounds on the fast engine**, run-config defaults (federated evaluation of every
   device every 5 rounds and after the last), wall time of the whole run from the server's
   start, and its test HR@10 at the round chosen on validation.
3. **Local training per device:** one device's round with ``local_round`` (torch, what a
   SuperNode runs) against the fast engine's compiled round, medians over every device of
   movielens-small, both on one thread.

Results go to results/bench_engines.json; ``benchmarks/write_performance.py`` puts them in
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _results import write_results

from fedpref.client.device import initial_private, local_round
from fedpref.models.config import FederatedConfig
from fedpref.models.train import init_params
from fedpref.models.wire import Stream, stream_rng
from fedpref.simulations.engines.compiled import LOSS_KINDS, device_round
from fedpref.simulations.data.movielens import load_movielens_small
from fedpref.simulations.engines.fast import Population, run_fast
from fedpref.simulations.engines.flower import run_flower_simulation
from fedpref.simulations.data.population import write_population
from fedpref.simulations.data.split import leave_one_out


def round_seconds(result: dict) -> list[float]:
    """Seconds of each round after the first, from the server's clock."""
    ends = [row["seconds"] for row in result["rounds"]]
    return [b - a for a, b in zip(ends, ends[1:])]


def local_training(folder: str, config: FederatedConfig) -> dict:
    """Median seconds of one device's round: torch's local_round against the compiled round."""
    torch.set_num_threads(1)
    pop = Population(folder)
    shared, _ = init_params(config.model_spec, 1, pop.n_items, seed=0)
    q, bq = shared["item_embedding.weight"], shared["item_bias.weight"][:, 0].copy()
    torch_times, compiled_times, sizes = [], [], []
    for user in range(pop.n_users):
        items = pop.train_items(user)
        private = initial_private(config.model_spec, 0, user)
        start = time.perf_counter()
        local_round(config, shared, private, items, pop.n_items, stream_rng(0, user, 1, Stream.TRAIN), 1)
        torch_times.append(time.perf_counter() - start)
        device_round(stream_rng(0, user, 1, Stream.TRAIN), items, q, bq, private["user_embedding.weight"][0], 1, 0.1, 1, 0.1, 64, 20, 0.01, 0)  # warm
        start = time.perf_counter()
        device_round(stream_rng(0, user, 1, Stream.TRAIN), items, q, bq, private["user_embedding.weight"][0], config.private_epochs,
                     config.train_config().lr, config.local_epochs, config.train_config(1).lr, config.batch_size, config.num_negatives, config.l2, LOSS_KINDS[config.loss])
        compiled_times.append(time.perf_counter() - start)
        sizes.append(len(items))
    t, c = statistics.median(torch_times), statistics.median(compiled_times)
    return {"devices": pop.n_users, "median_history": statistics.median(sizes), "torch_ms": 1e3 * t, "compiled_ms": 1e3 * c, "ratio": t / c,
            "torch_all_devices_s": sum(torch_times), "compiled_all_devices_s": sum(compiled_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flower-rounds", type=int, default=3, help="rounds on Flower's engine (the first is left out)")
    parser.add_argument("--fast-rounds", type=int, default=100)
    args = parser.parse_args()

    split = leave_one_out(load_movielens_small(), seed=0)
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        folder = str(write_population(split, Path(tmp) / "population"))
        base = {"history-dir": folder, "fraction-train": 1.0, "fraction-evaluate": 0.0, "seed": 0, "checkpoint-dir": "none", "resume": False}

        print(f"local training, one device at a time, every device of movielens-small ({split.n_users}) ...")
        local = local_training(folder, FederatedConfig.from_run_config({**base, "results-dir": str(Path(tmp) / "x")}))
        print(f"  one device's round: torch local_round {local['torch_ms']:.1f} ms, compiled {local['compiled_ms']:.2f} ms "
              f"(median; {local['ratio']:.0f}x)")

        print(f"fast engine: the same {args.flower_rounds} rounds ...")
        fast_config = FederatedConfig.from_run_config({**base, "num-server-rounds": args.flower_rounds, "results-dir": str(Path(tmp) / "fast")})
        fast = run_fast(fast_config)
        fast_rounds = round_seconds(fast)

        print(f"fast engine: {args.fast_rounds} rounds, run-config defaults (evaluation every 5 rounds) ...")
        full = FederatedConfig.from_run_config({"history-dir": folder, "num-server-rounds": args.fast_rounds, "seed": 0, "resume": False,
                                                "results-dir": str(Path(tmp) / "fast-100")})
        start = time.perf_counter()
        hundred = run_fast(full)
        hundred_wall = time.perf_counter() - start

        # Flower last: it starts Ray in this process, and its threads may outlive the run.
        print(f"Flower's Simulation Engine: {args.flower_rounds} rounds of all {split.n_users} devices ...")
        flower_config = FederatedConfig.from_run_config({**base, "num-server-rounds": args.flower_rounds, "results-dir": str(Path(tmp) / "flower")})
        start = time.perf_counter()
        flower = run_flower_simulation(flower_config, n_devices=split.n_users)
        flower_wall = time.perf_counter() - start
        flower_rounds = round_seconds(flower)

    flower_round, fast_round = statistics.median(flower_rounds), statistics.median(fast_rounds)
    result = {
        "devices": split.n_users,
        "items": split.n_items,
        "flower": {"rounds": args.flower_rounds, "round_seconds": flower_rounds, "median_round_s": flower_round, "wall_s": flower_wall},
        "fast": {"rounds": args.flower_rounds, "round_seconds": fast_rounds, "median_round_s": fast_round},
        "speedup": flower_round / fast_round,
        "hundred_rounds": {"rounds": args.fast_rounds, "wall_s": hundred_wall, "server_s": hundred["seconds"],
                           "test_hr": hundred["chosen"].get("test-hr"), "chosen_round": hundred["chosen_round"],
                           "median_round_s": statistics.median(round_seconds(hundred))},
        "local_training": local,
    }
    print(f"\nper round, every device of movielens-small training: Flower {flower_round:.2f} s, fast {fast_round:.3f} s: "
          f"{result['speedup']:.0f}x (target: at least 20x)")
    print(f"{args.fast_rounds} fast rounds with evaluation every 5: {hundred_wall:.1f} s in all (target: at most 60 s), "
          f"test HR@10 {result['hundred_rounds']['test_hr']:.4f} at round {hundred['chosen_round']}")
    write_results("bench_engines", result)


if __name__ == "__main__":
    main()
