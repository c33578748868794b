"""How fast the synthetic population generator runs, and how much memory it takes.

    python benchmarks/synthetic_rate.py                     # 1,000,000 users x 10,000 items
    python benchmarks/synthetic_rate.py --users 100000 --stream

By default the whole population is collected into one interaction table (what
``load_dataset("synthetic:...")`` does); ``--stream`` only iterates over the chunks, which is
how a simulation that hands users to devices one chunk at a time would use it, and keeps
memory flat.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import psutil

from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic, iter_synthetic


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure(
    n_users: int = 1_000_000,
    n_items: int = 10_000,
    *,
    mean_events: float = 50.0,
    candidates_factor: float = 8.0,
    temperature: float = 1.0,
    chunk_users: int = 20_000,
    seed: int = 0,
    stream: bool = False,
    progress: bool = False,
) -> dict[str, float | int | str]:
    """Generate one population and report its size, the time taken and the memory used."""
    config = SyntheticConfig(
        n_users=n_users,
        n_items=n_items,
        mean_events=mean_events,
        candidates_factor=candidates_factor,
        temperature=temperature,
        seed=seed,
    )
    rss_before = psutil.Process().memory_info().rss / 2**20
    started = time.perf_counter()
    if stream:
        events = short = 0
        for chunk in iter_synthetic(config, chunk_users=chunk_users):
            events += len(chunk)
            counts = np.bincount(chunk.user - chunk.start, minlength=chunk.n_users)
            short += int(np.sum(counts < chunk.requested))
    else:
        population = generate_synthetic(config, chunk_users=chunk_users, progress=progress)
        events = len(population.interactions)
        counts = np.bincount(population.interactions.user, minlength=n_users)
        short = int(np.sum(counts < population.requested_events))
    seconds = time.perf_counter() - started
    return {
        "mode": "stream" if stream else "collect",
        "users": n_users,
        "items": n_items,
        "events": events,
        "events_per_user": events / n_users,
        "users_short_of_requested": short / n_users,
        "seconds": seconds,
        "users_per_second": n_users / seconds,
        "events_per_second": events / seconds,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        "candidates_factor": candidates_factor,
        "temperature": temperature,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--mean-events", type=float, default=50.0)
    parser.add_argument("--factor", type=float, default=8.0, help="SIR candidates per event")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-users", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", action="store_true", help="iterate over chunks, do not collect")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    result = measure(
        args.users,
        args.items,
        mean_events=args.mean_events,
        candidates_factor=args.factor,
        temperature=args.temperature,
        chunk_users=args.chunk_users,
        seed=args.seed,
        stream=args.stream,
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(result))
        return
    width = max(map(len, result))
    for key, value in result.items():
        if isinstance(value, float):
            shown = f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4g}"
        else:
            shown = f"{value:,}" if isinstance(value, int) else value
        print(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
    main()
