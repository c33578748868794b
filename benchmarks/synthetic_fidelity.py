"""How real the generated populations look, and how much taste signal the synthetic sampler keeps.

    nice -n 10 .venv/bin/python benchmarks/synthetic_fidelity.py                 # both generators, 3 draws each, central MF
    nice -n 10 .venv/bin/python benchmarks/synthetic_fidelity.py --no-mf --skip-sir

1. **Fidelity** (:mod:`fedpref.simulations.experiments.fidelity`, as ``fedpref fidelity``): for
   each generator at movielens-small's size (``synthetic:671x9066`` and
   ``fitted:movielens-small:671``), ``--draws`` draws against movielens-small: popularity and
   central-MF test HR/NDCG@10, the KS statistics of history lengths and item popularity, the
   position-popularity correlation, and the 0.03 HR goals. Each writes
   results/fidelity-<source>/fidelity.json and fidelity.png.
2. **The SIR sampler against the exact one**: for each temperature and sampler, 2,000 users x
   2,000 items, split by the evaluation protocol, each test item ranked by the ground-truth
   logits and by popularity. SIR is faithful where its row is close to the exact sampler's.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from fedpref.simulations.data.split import leave_one_out
from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
from fedpref.simulations.evaluate import evaluate, popularity_scorer
from fedpref.simulations.experiments.fidelity import plot_fidelity, run_fidelity, table_rows

GENERATORS = ("synthetic:671x9066", "fitted:movielens-small:671")


def fidelity(source: str, draws: int, mf: bool) -> None:
    import json

    print(f"\n{source}, {draws} draw{'s' if draws > 1 else ''} against movielens-small", flush=True)
    try:
        result = run_fidelity(source, draws=draws, mf=mf, on_step=lambda text: print(f"  {text}", flush=True))
    except NotImplementedError as exc:
        print(f"  not available: {exc}")
        return
    print(f"  {'quantity':<40} {'real':>9} {'generated (mean ± se)':>22}  goal")
    for label, real, generated, goal in table_rows(result.payload):
        print(f"  {label:<40} {real:>9} {generated:>22}  {goal}")
    out = Path("results") / f"fidelity-{source.replace(':', '-')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(result.payload, indent=2, default=str) + "\n")
    plot_fidelity(result, out / "fidelity.png")
    print(f"  wrote {out}/fidelity.json and fidelity.png ({result.payload['seconds']:.0f} s)")


def sir_against_exact() -> None:
    print(f"\n{'temperature':>11} {'sampler':>7} {'truth HR@10':>11} {'truth NDCG@10':>13} {'popularity HR@10':>16} {'popularity NDCG@10':>18}")
    for temperature in (1.0, 0.5):
        for sampler in ("sir", "exact"):
            population = generate_synthetic(
                SyntheticConfig(n_users=2000, n_items=2000, temperature=temperature, sampler=sampler, seed=0)
            )
            split = leave_one_out(population.interactions, seed=0)
            truth = evaluate(lambda users: population.logits(split.user_ids[users]), split, target="test", full=False)
            pop = evaluate(popularity_scorer(split), split, target="test", full=False)
            print(f"{temperature:>11} {sampler:>7} {truth.hr:>11.3f} {truth.ndcg:>13.3f} {pop.hr:>16.3f} {pop.ndcg:>18.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generators", default=",".join(GENERATORS), help="Comma-separated generated sources.")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--mf", action=argparse.BooleanOptionalAction, default=True, help="Train central MF on every draw.")
    parser.add_argument("--skip-sir", action="store_true", help="Leave out the SIR-against-exact table.")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the split's notes on dropped users do not matter here
    for source in args.generators.split(","):
        fidelity(source, args.draws, args.mf)
    if not args.skip_sir:
        sir_against_exact()


if __name__ == "__main__":
    main()
