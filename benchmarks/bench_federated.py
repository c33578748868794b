"""Cost of federated rounds on Flower's Simulation Engine (Ray), at 100 and at 671 devices.

    .venv/bin/python benchmarks/bench_federated.py                 # 100 and 671 devices, 2 rounds each
    .venv/bin/python benchmarks/bench_federated.py --devices 100 --rounds 3

Devices are the first N users of movielens-small (same split as everywhere), with the
run-config defaults (``--run-config`` overrides them) and evaluation every round. Each round is
one training exchange and one evaluation exchange with every device. Prints wall time per
round (after the first, which carries Ray's start-up; at least 2 rounds), time per device message (round time /
2N messages), the bytes each device sends per round (the arrays of its training reply, as
serialised), and peak memory of the server process and of the machine's Ray workers.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil

from _results import write_results

from fedpref.models.config import FederatedConfig
from fedpref.server.app import ServerHooks
from fedpref.simulations.data.movielens import load_movielens_small
from fedpref.simulations.engines.flower import run_flower_simulation
from fedpref.simulations.data.population import write_population
from fedpref.simulations.data.split import leave_one_out


def first_users(split, n):
    """The split restricted to its first ``n`` users."""
    end = split.train_indptr[n]
    return replace(
        split,
        n_users=n,
        train_indptr=split.train_indptr[: n + 1],
        train_items=split.train_items[:end],
        val_item=split.val_item[:n],
        test_item=split.test_item[:n],
        negatives=split.negatives[:n],
        user_ids=split.user_ids[:n],
    )


def ray_workers_rss_mb() -> float:
    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "ray::" in cmd or "ClientAppActor" in cmd:
            total += proc.info["memory_info"].rss
    return total / 2**20


def run(split, n: int, rounds: int, dim: int, extra: dict) -> dict:
    sub = first_users(split, n)
    sent_bytes: list[int] = []
    worker_peak = [0.0]

    def observe(messages, replies):
        if messages and messages[0].metadata.message_type == "train":
            for reply in replies:
                if not reply.has_error():
                    sent_bytes.append(sum(len(a.data) for a in reply.content["arrays"].values()))
        worker_peak[0] = max(worker_peak[0], ray_workers_rss_mb())

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_population(sub, Path(tmp) / "population")
        config = FederatedConfig.from_run_config(
            # The run-config defaults (what `fedpref simulate` runs), evaluating every round.
            {"history-dir": str(folder), "num-server-rounds": rounds, "dim": dim, "results-dir": str(Path(tmp) / "out"), "evaluate-every": 1, **extra}
        )
        result = run_flower_simulation(config, n_devices=n, hooks=ServerHooks(on_exchange=[observe]))
    ends = [r["seconds"] for r in result["rounds"]]
    per_round = float(np.mean(np.diff(ends))) if len(ends) > 1 else ends[0]
    return {
        "devices": n,
        "rounds": rounds,
        "first_round_s": ends[0],
        "round_s": per_round,
        "per_message_ms": per_round / (2 * n) * 1000,
        "bytes_per_device_round": int(np.mean(sent_bytes)),
        "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ray_workers_peak_rss_mb": worker_peak[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 671])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--run-config", default="", help='overrides, e.g. "optimizer=adam local-epochs=1"')
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.run_config.split())
    warnings.simplefilter("ignore")
    split = leave_one_out(load_movielens_small(), seed=0)
    rows = [run(split, n, args.rounds, args.dim, extra) for n in args.devices]
    print(f"{'devices':>7} {'round (s)':>9} {'first round (s)':>15} {'per message (ms)':>16} {'sent per device/round':>21} {'server peak':>11} {'Ray workers peak':>16}")
    for r in rows:
        print(f"{r['devices']:>7} {r['round_s']:>9.1f} {r['first_round_s']:>15.1f} {r['per_message_ms']:>16.1f} {r['bytes_per_device_round'] / 2**20:>18.2f} MB {r['server_peak_rss_mb']:>8.0f} MB {r['ray_workers_peak_rss_mb']:>13.0f} MB")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"round time {b['devices']} / {a['devices']} devices: {b['round_s'] / a['round_s']:.2f}x for {b['devices'] / a['devices']:.2f}x the devices")
    write_results("bench_federated", rows)


if __name__ == "__main__":
    main()
