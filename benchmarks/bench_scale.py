"""The fast engine at scale: seconds per round against population and cohort size, up to a
million devices; aggregation throughput and memory; bytes per device per encoding.

    .venv/bin/python benchmarks/bench_scale.py
    .venv/bin/python benchmarks/bench_scale.py --populations 10000,100000 --cohorts 100,1000

Synthetic populations (``synthetic:Nx10000``, seed 0: 10,000 items, about 48 events a
person; written once by ``fedpref population`` under results/populations/ and reused), MF
over the 10,000 items, run-config defaults otherwise, no federated evaluation.

1. **Seconds per round.** For every population N and cohort m <= N, a run of ``--rounds``
   rounds in its own process, private vectors memory-mapped (``--private-dir``); a round's
   seconds are those between the ends of consecutive rounds in the server's rounds.json (the
   first round is left out: it loads the compiled code), its peak RSS that of the process.
   The million-device round with cohorts of 10,000 has a bound of 10 s.
2. **Aggregation.** Clipped updates of m devices (m = 100, 1,000, 10,000) summed as the fast
   engine sums them (sparse rows into one accumulator) and as Flower's FedAvg does
   (``aggregate_arrayrecords`` over one dense reply per device): updates per second, and the
   memory each holds (what the replies or the accumulator take). Flower's is measured up to
   the cohort whose replies fit in ``--flower-memory-gb``.
3. **Bytes per device per round** of each update encoding for this catalogue (the serialised
   reply arrays; benchmarks/bench_encoding.py measures what each costs in HR@10).

Results go to results/bench_scale.json and the plot to docs/img/fast-engine-scaling.png;
``benchmarks/write_performance.py`` puts them in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import write_results

ITEMS = 10_000
POPULATIONS = Path("results") / "populations"


def population_folder(n: int) -> Path:
    """``synthetic:{n}x10000``, written once with `fedpref population`."""
    folder = POPULATIONS / f"synthetic-{n}x{ITEMS}"
    if not (folder / "meta.json").exists():
        print(f"  writing the population synthetic:{n}x{ITEMS} (once) ...", flush=True)
        fedpref = Path(sys.executable).parent / "fedpref"
        subprocess.run([str(fedpref), "population", "--dataset", f"synthetic:{n}x{ITEMS}", "--out", str(folder), "--no-progress"], check=True)
    return folder


def one_run(folder: str, cohort: int, rounds: int) -> dict:
    """One configuration, in this process (called in a child process by main)."""
    from fedpref.models.config import FederatedConfig
    from fedpref.simulations.engines.fast import FastGrid, run_fast

    n = json.loads((Path(folder) / "meta.json").read_text())["n_users"]
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        config = FederatedConfig.from_run_config({
            "history-dir": folder, "num-server-rounds": rounds, "fraction-train": cohort / n, "min-train-nodes": cohort,
            "fraction-evaluate": 0.0, "checkpoint-dir": "none", "resume": False, "seed": 0, "results-dir": str(Path(tmp) / "run"),
        })
        grid = FastGrid(config, private_dir=str(Path(tmp) / "private"))
        start = time.perf_counter()
        result = run_fast(config, grid=grid)
        wall = time.perf_counter() - start
    ends = [row["seconds"] for row in result["rounds"]]
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    train = [t["train_seconds"] for t in grid.timings[1:]]
    return {"population": n, "cohort": cohort, "rounds": rounds, "round_seconds": seconds, "median_round_s": statistics.median(seconds),
            "median_train_s": statistics.median(train), "device_ms": 1e3 * statistics.median(train) / cohort, "wall_s": wall,
            "threads": grid.threads, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def aggregation(folder: Path, cohorts: list[int], flower_memory_gb: float) -> list[dict]:
    """Sum m devices' clipped updates: the fast engine's sparse sum against Flower's FedAvg."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedpref.client.device import initial_privates
    from fedpref.models.config import FederatedConfig
    from fedpref.models.train import init_params
    from fedpref.models.wire import Stream, stream_rng
    from fedpref.simulations.engines.compiled import LOSS_KINDS, device_round
    from fedpref.simulations.engines.fast import Population, _clip_and_add

    pop = Population(str(folder))
    config = FederatedConfig.from_run_config({"history-dir": str(folder)})
    shared, _ = init_params(config.model_spec, 1, pop.n_items, seed=0)
    q, bq = shared["item_embedding.weight"], shared["item_bias.weight"][:, 0].copy()
    # 1,000 devices' updates, summed again and again up to the largest cohort (holding 10,000
    # devices' updates at once would take gigabytes; the engine adds each as it is trained).
    users = np.random.default_rng(0).choice(pop.n_users, size=min(max(cohorts), 1000), replace=False)
    private = initial_privates(config.model_spec, 0, users)
    updates = []
    for k, user in enumerate(users):
        p, rows, item_rows, bias_rows, loss, ok = device_round(stream_rng(0, int(user), 1, Stream.TRAIN), pop.train_items(int(user)), q, bq, private[k],
                                                               2, 0.3, 3, 0.3, 64, 20, 0.01, LOSS_KINDS["softmax"])
        updates.append((rows, item_rows, bias_rows))
    dense_bytes = q.nbytes + bq.nbytes  # one reply's float32 weights
    _clip_and_add(q, bq, *updates[0], 10.0, 1.0, np.zeros((pop.n_items, q.shape[1] + 1), dtype=np.float32))  # load the compiled code
    out = []
    for m in cohorts:
        acc = np.zeros((pop.n_items, q.shape[1] + 1), dtype=np.float32)  # as the engine's threads sum
        start = time.perf_counter()
        for k in range(m):
            rows, item_rows, bias_rows = updates[k % len(updates)]
            _clip_and_add(q, bq, rows, item_rows, bias_rows, 10.0, 1.0, acc)
        fast_s = time.perf_counter() - start
        one_update = statistics.mean(r.nbytes + ir.nbytes + br.nbytes for r, ir, br in updates)
        row = {"cohort": m, "fast_updates_per_s": m / fast_s, "fast_accumulator_mb": acc.nbytes / 2**20,
               "fast_update_mb": one_update / 2**20, "mean_rows_per_update": statistics.mean(len(u[0]) for u in updates),
               "flower_replies_mb": m * dense_bytes / 2**20}
        if m * dense_bytes <= flower_memory_gb * 2**30:
            replies = []
            for k in range(m):
                rows, item_rows, bias_rows = updates[k % len(updates)]
                emb, bias = q.copy(), bq.copy()
                emb[rows], bias[rows] = item_rows, bias_rows
                replies.append(RecordDict({"arrays": ArrayRecord({"item_embedding.weight": Array(emb), "item_bias.weight": Array(bias.reshape(-1, 1))}),
                                           "metrics": MetricRecord({"num-examples": 1})}))
            start = time.perf_counter()
            aggregate_arrayrecords(replies, "num-examples")
            flower_s = time.perf_counter() - start
            row.update(flower_updates_per_s=m / flower_s, speedup=(m / fast_s) / (m / flower_s))
            del replies
        out.append(row)
        print(f"  cohort {m:>6,}: fast {row['fast_updates_per_s']:>9,.0f} updates/s, {row['fast_accumulator_mb']:,.1f} MB accumulator "
              f"+ {row['fast_update_mb']:.2f} MB a device's update; "
              + (f"Flower FedAvg {row['flower_updates_per_s']:>7,.0f} updates/s, {row['flower_replies_mb']:,.0f} MB of replies ({row['speedup']:.0f}x)"
                 if "flower_updates_per_s" in row else f"Flower FedAvg not run: its replies would take {row['flower_replies_mb'] / 1024:,.1f} GB"), flush=True)
    return out


def encoding_bytes() -> list[dict]:
    from bench_encoding import ENCODINGS, reply_bytes

    from fedpref.models.config import FederatedConfig

    config = FederatedConfig.from_run_config({"catalogue-size": ITEMS, "devices": 2})
    rows = []
    for encoding in ENCODINGS:
        size, _ = reply_bytes(encoding, ITEMS, config, repeats=2)
        rows.append({"encoding": encoding, "bytes_per_device_round": size})
    base = rows[0]["bytes_per_device_round"]
    for r in rows:
        r["ratio"] = r["bytes_per_device_round"] / base
    return rows


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for cohort in sorted({r["cohort"] for r in runs}):
        points = sorted((r["population"], r["median_round_s"]) for r in runs if r["cohort"] == cohort)
        ax.plot([p for p, _ in points], [s for _, s in points], marker="o", label=f"{cohort:,} devices a round")
    ax.axhline(10, color="grey", linestyle="--", linewidth=1)
    ax.text(min(r["population"] for r in runs), 10.6, "10 s bound (1,000,000 devices, 10,000 a round)", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("devices in the population")
    ax.set_ylabel("seconds per round (median)")
    ax.set_title("fast engine: MF over 10,000 items, 2 cores", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--populations", default="10000,100000,1000000")
    parser.add_argument("--cohorts", default="100,1000,10000")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per configuration (the first is left out)")
    parser.add_argument("--flower-memory-gb", type=float, default=4.0, help="run Flower's FedAvg only for cohorts whose replies fit in this")
    parser.add_argument("--one", nargs=2, metavar=("FOLDER", "COHORT"), help=argparse.SUPPRESS)  # a child process's one run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args.rounds)))
        return
    populations = [int(x) for x in args.populations.split(",")]
    cohorts = [int(x) for x in args.cohorts.split(",")]
    folders = {n: population_folder(n) for n in populations}
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in populations:
        for m in cohorts:
            if m > n:
                continue
            print(f"{n:>9,} devices, {m:>6,} a round: ", end="", flush=True)
            child = subprocess.run([sys.executable, __file__, "--one", str(folders[n]), str(m), "--rounds", str(args.rounds)],
                                   capture_output=True, text=True, env=env)
            if child.returncode != 0:
                raise SystemExit(child.stderr[-3000:])
            run = json.loads(child.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"{run['median_round_s']:.2f} s a round ({run['device_ms']:.2f} ms of training per device on {run['threads']} threads), "
                  f"peak RSS {run['peak_rss_mb']:,.0f} MB", flush=True)
    print("aggregation of clipped updates (10,000 items, dim 64):")
    agg = aggregation(folders[max(populations)], cohorts, args.flower_memory_gb)
    enc = encoding_bytes()
    print("bytes per device per round, 10,000 items, dim 64: " + ", ".join(f"{r['encoding']} {r['bytes_per_device_round']:,} ({r['ratio']:.2f}x)" for r in enc))
    million = next((r for r in runs if r["population"] == 1_000_000 and r["cohort"] == 10_000), None)
    if million:
        print(f"one round of 1,000,000 devices, 10,000 a round: {million['median_round_s']:.2f} s (bound: 10 s), peak RSS {million['peak_rss_mb']:,.0f} MB")
    plot(runs, Path("docs/img/fast-engine-scaling.png"))
    write_results("bench_scale", {"items": ITEMS, "runs": runs, "aggregation": agg, "encodings": enc})


if __name__ == "__main__":
    main()
