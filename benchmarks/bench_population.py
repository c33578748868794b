"""The streamed population writer: people a second, peak memory and disk for a large population.

    nice -n 10 .venv/bin/python benchmarks/bench_population.py                       # 1,000,000 synthetic people
    nice -n 10 .venv/bin/python benchmarks/bench_population.py --mean-events 150     # ... with movielens-small's history length
    nice -n 10 .venv/bin/python benchmarks/bench_population.py --dataset fitted:movielens-small:1000000

Draws ``--dataset`` (a generated source, default ``synthetic:1000000x10000``, seed 0) and writes
it with :func:`~fedpref.simulations.data.population.write_population_stream` into a temporary
folder (deleted afterwards unless ``--keep DIR``), in this process. Reports the wall time and
people a second of the whole write (drawing included, as ``fedpref population`` runs it) and
its CPU seconds (steadier than wall time on a shared machine), the
time drawing alone takes on a first pass (``--no-draw-only`` skips it), the process's peak
resident memory (``ru_maxrss``: the high-water mark of the whole run) and the bytes on disk.
The result goes to results/bench_population.json.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402

from fedpref.simulations.data.population import read_meta, write_population_stream  # noqa: E402
from fedpref.simulations.data.registry import SYNTHETIC, StreamedSource, stream_dataset  # noqa: E402
from fedpref.simulations.data.synthetic import SyntheticConfig, iter_synthetic  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """CPU time of this process (user + system): on a shared machine, steadier than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic:1000000x10000")
    parser.add_argument("--chunk-users", type=int, default=20_000)
    parser.add_argument("--mean-events", type=float, default=None, help="For a synthetic: source, events per person (the name's default is 50; 150 is movielens-small's mean).")
    parser.add_argument("--draw-only", action=argparse.BooleanOptionalAction, default=True, help="First time drawing the population without writing it.")
    parser.add_argument("--keep", type=Path, default=None, help="Write here and keep the folder.")
    args = parser.parse_args()

    result: dict = {"dataset": args.dataset, "chunk_users": args.chunk_users, "mean_events": args.mean_events}

    def source():
        if args.mean_events is None:
            return stream_dataset(args.dataset, seed=0, chunk_users=args.chunk_users)
        match = SYNTHETIC.match(args.dataset)
        if not match:
            parser.error("--mean-events applies to synthetic:USERSxITEMS sources only")
        config = SyntheticConfig(n_users=int(match[1]), n_items=int(match[2]), mean_events=args.mean_events, seed=0)
        return StreamedSource(config.name, config.n_users, config.n_items, config.seed, iter_synthetic(config, chunk_users=args.chunk_users))

    if args.draw_only:
        drawn = source()
        start, cpu, events = time.perf_counter(), cpu_seconds(), 0
        for chunk in drawn.chunks:
            events += len(chunk)
        result["draw_seconds"] = round(time.perf_counter() - start, 1)
        result["draw_cpu_seconds"] = round(cpu_seconds() - cpu, 1)
        result["draw_peak_mb"] = round(peak_mb())
        print(f"drawing alone: {drawn.n_users:,} people, {events:,} events in {result['draw_seconds']} s ({result['draw_cpu_seconds']} s CPU); peak RSS so far {result['draw_peak_mb']} MB", flush=True)

    tmp = None if args.keep else tempfile.mkdtemp(prefix="fedpref-bench-population-")
    folder = args.keep or Path(tmp) / "population"
    try:
        start, cpu = time.perf_counter(), cpu_seconds()
        write_population_stream(source(), folder, describe={"source": args.dataset})
        seconds = time.perf_counter() - start
        meta = read_meta(folder)
        disk = sum(p.stat().st_size for p in Path(folder).iterdir())
        result.update({
            "users": meta["n_users"], "items": meta["n_items"], "train_events": meta["n_train"],
            "write_seconds": round(seconds, 1), "write_cpu_seconds": round(cpu_seconds() - cpu, 1), "users_per_second": round(meta["n_users"] / seconds),
            "peak_rss_mb": round(peak_mb()), "disk_gb": round(disk / 1e9, 2),
        })
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {result['users']:,} people ({result['train_events']:,} training events) in {result['write_seconds']} s ({result['write_cpu_seconds']} s CPU): "
          f"{result['users_per_second']:,} people/s, peak RSS {result['peak_rss_mb']} MB, {result['disk_gb']} GB on disk")
    write_results("bench_population", result)


if __name__ == "__main__":
    main()
