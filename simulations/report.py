"""Results of a federated run: per-round CSV and a plot with the reference lines."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def write_rounds_csv(rounds: list[dict], path: Path) -> Path:
    keys: list[str] = []
    for row in rounds:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rounds:
            writer.writerow(row)
    return path


def plot_rounds(
    rounds: list[dict],
    path: Path,
    *,
    references: dict[str, dict[str, float]] | None = None,
    chosen_round: int | None = None,
    title: str = "",
    k: int = 10,
) -> Path:
    """Validation HR@k and NDCG@k per round; each reference (name -> {"hr", "ndcg"}) a line."""
    return plot_comparison({"federated (validation)": rounds}, path, references=references, chosen_round=chosen_round, title=title, k=k)


def plot_comparison(
    runs: dict[str, list[dict]],
    path: Path,
    *,
    references: dict[str, dict[str, float]] | None = None,
    chosen_round: int | None = None,
    title: str = "",
    k: int = 10,
    x: str = "round",
) -> Path:
    """Validation HR@k and NDCG@k per round of several runs (label -> rounds), one line each,
    with the references as horizontal lines. ``x`` is ``round`` or ``seconds``."""
    private = {name: [r for r in rounds if "epsilon" in r] for name, rounds in runs.items()}
    private = {name: rows for name, rows in private.items() if rows}
    fig, axes = plt.subplots(1, 3 if private else 2, figsize=(16 if private else 11, 4.2))
    styles = {"centralised": ("tab:green", "--"), "local-only": ("tab:red", ":"), "popularity": ("tab:gray", "-.")}
    if private:  # user-level DP: epsilon spent after each round
        ax = axes[2]
        for name, rows in private.items():
            ax.plot([r[x] for r in rows], [r["epsilon"] for r in rows], label=name)
        ax.set_xlabel("round" if x == "round" else "seconds")
        ax.set_ylabel("epsilon spent")
        ax.set_title("user-level DP: epsilon after each round (dp-accounting)", fontsize=9)
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax, metric, label in ((axes[0], "hr", f"HR@{k}"), (axes[1], "ndcg", f"NDCG@{k}")):
        for name, rounds in runs.items():
            evaluated = [r for r in rounds if "val-hr" in r]
            ax.plot([r[x] for r in evaluated], [r[f"val-{metric}"] for r in evaluated], marker="o", ms=3, label=name)
        for name, values in (references or {}).items():
            color, style = styles.get(name, ("tab:purple", "--"))
            ax.axhline(values[metric], color=color, linestyle=style, label=f"{name} (validation)")
        if chosen_round:
            ax.axvline(chosen_round, color="black", alpha=0.25, label=f"chosen round {chosen_round}")
        ax.set_xlabel("round" if x == "round" else "seconds")
        ax.set_ylabel(f"validation {label}")
        ax.set_title(f"{label}, sampled: target + 99 negatives", fontsize=9)
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
