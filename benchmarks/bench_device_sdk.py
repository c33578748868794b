"""What the device SDK costs a phone-sized device: a typical one (about 70 events) and a heavy
one (2,000 events), a catalogue of 10,000 items, MF with the run-config defaults.

    .venv/bin/python benchmarks/bench_device_sdk.py
    .venv/bin/python benchmarks/bench_device_sdk.py --items 10000 --rounds 20 --calls 500

Each profile runs in a fresh process of its own (so that its peak memory is its own), on an
SQLite store in a temporary folder, and measures:

- **training per round**: ``Device.train_federated`` (read the consented history, refit the
  private vector, the local epochs, keep the private vector) plus the update guard
  (``encode_update``); the median over ``--rounds`` rounds after the first, against the
  50 ms target (the first round, which pays PyTorch's start-up in the process, is printed apart);
- **keeping the global model**: ``Device.join_run``, which writes the model the device
  received into its store (for offline recommendations); reported apart from training;
- **recommend(10)**: the median latency over ``--calls`` calls, against the 5 ms target;
- **peak memory**: the process's peak resident set (``ru_maxrss``) after the rounds, and the
  same for a process that only imported fedpref and opened a store (the baseline), and
  their difference;
- **model download**: the bytes of the shared arrays as serialised in a Flower message.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

from _results import write_results

TRAINING_TARGET_MS = 50.0
RECOMMEND_TARGET_MS = 5.0


def _profile(n_events: int, n_items: int, rounds: int, calls: int, baseline: bool, out) -> None:
    import numpy as np
    import torch
    from flwr.app import Array

    from fedpref.client import ALWAYS, Device
    from fedpref.client.guard import encode_update
    from fedpref.models.config import FederatedConfig
    from fedpref.models.train import init_params

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="bench-sdk-"))
    device = Device.open(folder / "device.sqlite")
    if baseline:
        out.send({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        return
    config = FederatedConfig.from_run_config({})
    rng = np.random.default_rng(n_events)
    device.set_consent("federated")
    device.set_policy(ALWAYS)
    now = time.time()
    items = rng.choice(n_items, size=n_events, replace=False)
    device.record_many((int(item), "view", None, now - (n_events - j)) for j, item in enumerate(items))
    shared, _ = init_params(config.model_spec, 1, n_items, 0)
    download = sum(len(Array(np.ascontiguousarray(a)).data) for a in shared.values())

    train_ms, keep_ms = [], []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        device.join_run(config, shared, version=f"round {r}")
        keep_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        update, _ = device.train_federated(shared, config, r, np.random.default_rng(r))
        encode_update(shared, update, config.clip_norm)
        train_ms.append((time.perf_counter() - start) * 1000)
    device.recommend(10)  # warm
    recommend_ms = []
    for _ in range(calls):
        start = time.perf_counter()
        device.recommend(10)
        recommend_ms.append((time.perf_counter() - start) * 1000)
    out.send(
        {
            "events": n_events,
            "items": n_items,
            "dim": config.dim,
            "local_epochs": config.local_epochs,
            "private_epochs": config.private_epochs,
            "training_ms": statistics.median(train_ms[1:]),
            "training_ms_max": max(train_ms[1:]),
            "first_round_ms": train_ms[0],  # includes PyTorch's one-off start-up in the process
            "keep_global_ms": statistics.median(keep_ms),
            "recommend_ms": statistics.median(recommend_ms),
            "recommend_ms_p95": sorted(recommend_ms)[int(0.95 * len(recommend_ms))],
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "download_bytes": download,
        }
    )


def run(n_events: int, n_items: int, rounds: int, calls: int, baseline: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_profile, args=(n_events, n_items, rounds, calls, baseline, child))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    base = run(0, args.items, 0, 0, baseline=True)
    rows = []
    for name, events in (("typical", 70), ("heavy", 2000)):
        row = {"profile": name, **run(events, args.items, args.rounds, args.calls)}
        row["extra_memory_mb"] = row["maxrss_mb"] - base["maxrss_mb"]
        rows.append(row)
    print(f"catalogue {args.items:,} items, MF dim {rows[0]['dim']}, {rows[0]['private_epochs']} private + {rows[0]['local_epochs']} local epochs a round; "
          f"baseline process (fedpref imported, store open): {base['maxrss_mb']:.0f} MB")
    print(f"{'profile':>8} {'events':>7} {'train ms':>9} {'/ 50 ms':>8} {'1st round ms':>13} {'keep model ms':>14} {'recommend ms':>13} {'/ 5 ms':>7} {'peak MB':>8} {'+ MB':>6} {'download':>10}")
    for r in rows:
        print(f"{r['profile']:>8} {r['events']:>7} {r['training_ms']:>9.1f} {r['training_ms'] / TRAINING_TARGET_MS:>7.2f}x {r['first_round_ms']:>13.0f} {r['keep_global_ms']:>14.1f} "
              f"{r['recommend_ms']:>13.2f} {r['recommend_ms'] / RECOMMEND_TARGET_MS:>6.2f}x {r['maxrss_mb']:>8.0f} {r['extra_memory_mb']:>6.0f} {r['download_bytes'] / 1e6:>8.2f} MB")
    heavy, typical = rows[1], rows[0]
    print(f"heavy / typical: training {heavy['training_ms'] / typical['training_ms']:.1f}x, recommend {heavy['recommend_ms'] / typical['recommend_ms']:.2f}x")
    write_results("bench_device_sdk", {"baseline": base, "rows": rows, "targets": {"training_ms": TRAINING_TARGET_MS, "recommend_ms": RECOMMEND_TARGET_MS}})


if __name__ == "__main__":
    main()
