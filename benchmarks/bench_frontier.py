"""The wall time of ONE point of the epsilon-accuracy frontier (`fedpref frontier`), as the command runs it.

    .venv/bin/python benchmarks/bench_frontier.py                       # 1,000,000 fitted devices, 10,000 a round, 100 rounds
    nice -n 10 .venv/bin/python benchmarks/bench_frontier.py --population results/populations/synthetic-20000x2000 --cohort 1000 --rounds 20

One DP point (``--method``, default fedavgm; ``--epsilon``, default 1; ``--accounting``,
default sampled) on the population folder ``--population`` (default
results/populations/fitted-movielens-small-1000000, written by ``fedpref population --dataset
fitted:movielens-small:1000000``): its z calibrated as the frontier calibrates it (timed on its
own), then the run on the fast engine with the frontier's run config (the method's keys, C = 1,
evaluation every 10 rounds, a checkpoint every round), in this process, in a temporary folder
unless ``--out``. Prints the calibration's seconds, the seconds of a round (the median of the
differences between consecutive rounds' ends in rounds.json, the first round left out: it loads
the compiled code; evaluation rounds included in the mean), the run's total seconds, the test
HR@10 and the peak RSS; writes results/bench_frontier.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results

DEFAULT_POPULATION = Path("results") / "populations" / "fitted-movielens-small-1000000"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--population", type=Path, default=DEFAULT_POPULATION, help="a population folder (`fedpref population --out DIR`)")
    parser.add_argument("--rounds", type=int, default=100, help="T, the rounds of the point")
    parser.add_argument("--cohort", type=int, default=10_000, help="m, devices a round")
    parser.add_argument("--method", default="fedavgm", help="a frontier method (fedavgm, adaptive, dim16, tree, fedadam)")
    parser.add_argument("--epsilon", type=float, default=1.0, help="the point's target epsilon")
    parser.add_argument("--accounting", default="sampled", choices=("sampled", "honest"))
    parser.add_argument("--threads", type=int, default=None, help="devices trained at once (default: the machine's cores)")
    parser.add_argument("--run-config", default="", help='more run-config overrides: "local-epochs=1 batch-size=32"')
    parser.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()

    from fedpref.simulations.experiments.frontier import Calibrations, FrontierError, _dp_run, check_runs, execute, plan_frontier

    if not (args.population / "meta.json").exists():
        sys.exit(f"no population in {args.population}: write it first, e.g.\n"
                 f"  .venv/bin/fedpref population --dataset fitted:movielens-small:1000000 --out {args.population}")
    overrides = dict(item.split("=", 1) for item in args.run_config.split())
    with tempfile.TemporaryDirectory(prefix="bench-frontier-") as tmp:
        out = args.out or Path(tmp)
        try:
            plan = plan_frontier(args.population, [args.method], [args.epsilon], [args.accounting], rounds=args.rounds, cohort=args.cohort,
                                 out=out, overrides=overrides, personalisation=False)
            plan.calibrations = Calibrations(None)
            method = plan.methods[0]
            start = time.perf_counter()
            run = _dp_run(plan, "point", method, args.accounting, args.epsilon, float(plan.base["clip-norm"]),
                          float(plan.base.get("server-lr", method.defaults["server-lr"])))
            calibration_s = time.perf_counter() - start
            check_runs(plan, [run])
        except FrontierError as exc:
            sys.exit(f"error: {exc}")
        print(f"{plan.name}: {plan.n_devices:,} devices, {args.cohort:,} a round, {args.rounds} rounds; {method.name}, "
              f"{run.accounting} epsilon {args.epsilon} at delta {plan.delta:.3g}: z = {run.z:.4g} (calibrated in {calibration_s:.1f} s)", flush=True)
        start = time.perf_counter()
        result, _ = execute(run, threads=args.threads, rerun=True)
        total_s = time.perf_counter() - start
    ends = [row["seconds"] for row in result["rounds"]]
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    chosen, privacy = result.get("chosen") or {}, result.get("privacy") or {}
    figures = {
        "population": str(args.population), "devices": plan.n_devices, "items": plan.n_items, "cohort": args.cohort, "rounds": args.rounds,
        "method": method.name, "accounting": run.accounting, "target_epsilon": args.epsilon, "z": run.z, "delta": plan.delta,
        "epsilon_sampled": privacy.get("epsilon-sampled"), "epsilon_honest": privacy.get("epsilon-honest"),
        "calibration_s": round(calibration_s, 2), "first_round_s": round(ends[0], 2) if ends else None,
        "median_round_s": round(statistics.median(gaps), 3) if gaps else None, "mean_round_s": round(statistics.mean(gaps), 3) if gaps else None,
        "total_s": round(total_s, 1), "test_hr": chosen.get("test-hr"), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": args.threads, "run_config": args.run_config,
    }
    print(f"seconds a round: median {figures['median_round_s']}, mean {figures['mean_round_s']} (evaluation rounds included; first round "
          f"{figures['first_round_s']} s); total {figures['total_s']} s; test HR@10 {figures['test_hr']}; peak RSS {figures['peak_rss_mb']:,} MB")
    write_results("bench_frontier", figures)


if __name__ == "__main__":
    main()
