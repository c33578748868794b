"""The fast engine's seconds per round in two checkouts of fedpref, alternately, on one machine.

    .venv/bin/python benchmarks/bench_trees.py BASELINE_TREE [THIS_TREE] --repeats 3 --rounds 30

Each tree is a checkout with its own ``.venv`` (``python3 -m venv .venv && .venv/bin/pip install
-e .``; e.g. ``git worktree add ../baseline <revision>`` for an earlier revision). Each run is
``fedpref simulate --dataset movielens-small --engine fast`` with ``--references none``, every
device training every round and no federated evaluation; a round's seconds are those between
the ends of consecutive rounds in the run's ``rounds.json`` (the first round, which compiles,
is left out). The runs alternate between the trees so that a slow spell of the machine falls
on both. Prints each tree's median over all rounds of all runs, and the ratio; and the test
HR@10 of a run with evaluation after the last round, which must be the same in both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path


def run(tree: Path, out: Path, rounds: int, evaluate: bool) -> dict:
    config = "fraction-evaluate=1.0" if evaluate else "fraction-evaluate=0.0"
    command = [str(tree / ".venv" / "bin" / "fedpref"), "simulate", "--dataset", "movielens-small", "--engine", "fast",
               "--rounds", str(rounds), "--references", "none", "--run-config", f"{config} evaluate-every={rounds}", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=tree)
    return json.loads((out / "rounds.json").read_text())


def per_round(summary: dict) -> list[float]:
    ends = [row["seconds"] for row in summary["rounds"] if "seconds" in row]
    return [b - a for a, b in zip(ends[1:], ends[2:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("this", type=Path, nargs="?", default=Path(__file__).resolve().parents[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this": args.this.resolve()}
    seconds: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, tree in trees.items():
                summary = run(tree, Path(tmp) / f"{name}-{repeat}", args.rounds, evaluate=False)
                seconds[name] += per_round(summary)
                print(f"run {repeat + 1} {name}: median {statistics.median(per_round(summary)):.3f} s a round", flush=True)
        hr = {name: run(tree, Path(tmp) / f"{name}-eval", 5, evaluate=True)["chosen"].get("test-hr") for name, tree in trees.items()}
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    for name, tree in trees.items():
        print(f"{name} ({tree}): {medians[name]:.3f} s a round (median of {len(seconds[name])} rounds), test HR@10 after 5 rounds {hr[name]}")
    print(f"this / baseline: {medians['this'] / medians['baseline']:.3f}")


if __name__ == "__main__":
    main()
