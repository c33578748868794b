"""How real a generated population looks: ``fedpref fidelity --dataset SOURCE --against movielens-small``.

A generator (``synthetic:`` or ``fitted:``) is drawn ``draws`` times (seeds 0, 1, ...), each draw
written as a population folder by the streamed writer and read back, and compared with a real
data set under the evaluation protocol. For the real data and every draw:

- the popularity baseline's test HR@10 and NDCG@10, sampled (99 negatives) and full ranking;
- central MF's (the real reference's :class:`~fedpref.models.train.TrainConfig`, epochs chosen on
  validation), unless skipped;
- the history lengths and the per-item popularity (events per item divided by the number of
  people), each compared with the real data's by the two-sample Kolmogorov-Smirnov statistic
  (the largest gap between the two empirical distribution functions: 0 is the same
  distribution, 1 disjoint supports);
- the Spearman correlation between an event's position in its history (0 the first, 1 the last)
  and the log of its item's popularity, over every event: real people meet popular items first,
  which is what makes the latest (test) item hard for the popularity baseline.

The draws are summarised as mean ± standard error (a test HR over 671 people has a standard
error of about 0.018 on its own, so one draw cannot check a 0.03 goal). The goals: popularity
and central-MF test HR@10 each within :data:`TOLERANCE` of the real data's.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedpref.simulations.data.split import LeaveOneOutSplit

#: Largest gap allowed between a generated population's mean test HR@10 and the real data's.
TOLERANCE = 0.03
#: The checked quantities: (key in a summary, label).
GOALS = (("popularity.hr", "popularity test HR@10"), ("mf.hr", "central MF test HR@10"))


class FidelityError(ValueError):
    """The fidelity comparison cannot run as asked."""


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: max over x of |F_a(x) - F_b(x)|, with F the
    empirical distribution functions (the statistic of ``scipy.stats.ks_2samp``)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if not len(a) or not len(b):
        raise ValueError("the KS statistic needs two non-empty samples")
    pooled = np.concatenate([a, b])
    gap = np.searchsorted(a, pooled, side="right") / len(a) - np.searchsorted(b, pooled, side="right") / len(b)
    return float(np.abs(gap).max())


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    first = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    counts = np.diff(np.append(first, len(x)))
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0, counts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN when either is constant."""
    rx, ry = _average_ranks(np.asarray(x)), _average_ranks(np.asarray(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / denominator) if denominator > 0 else float("nan")


def history_lengths(split: LeaveOneOutSplit) -> np.ndarray:
    """Events per person: training events plus the validation and the test item."""
    return np.diff(np.asarray(split.train_indptr, dtype=np.int64)) + 2


def item_counts(split: LeaveOneOutSplit) -> np.ndarray:
    """Events per item over whole histories (training, validation and test)."""
    from fedpref.simulations.data.population import train_counts

    counts = train_counts(split)
    for held_out in (split.val_item, split.test_item):
        counts += np.bincount(np.asarray(held_out, dtype=np.int64), minlength=split.n_items)
    return counts


def position_popularity(split: LeaveOneOutSplit, counts: np.ndarray | None = None) -> float:
    """Spearman correlation, over every event, between its relative position in the person's
    history (0 the first, 1 the last: training events, then validation, then test) and the log
    of its item's number of events. Negative: popular items come early."""
    counts = item_counts(split) if counts is None else counts
    lengths = history_lengths(split)
    ptr = np.asarray(split.train_indptr, dtype=np.int64)
    person = np.repeat(np.arange(split.n_users), lengths - 2)
    step = np.arange(len(person)) - np.repeat(ptr[:-1], lengths - 2)
    scale = 1.0 / (lengths - 1)
    position = np.concatenate([step * scale[person], (lengths - 2) * scale, np.ones(split.n_users)])
    items = np.concatenate([np.asarray(split.train_items, dtype=np.int64), np.asarray(split.val_item), np.asarray(split.test_item)])
    return spearman(position, np.log(counts[items]))


@dataclass
class Profile:
    """What one population (the real one or a draw) looks like; ``lengths`` and ``shares``
    (events per item per person) are kept for the KS statistics and the figure."""

    name: str
    users: int
    items: int
    events: int
    lengths: np.ndarray = field(repr=False)
    shares: np.ndarray = field(repr=False)
    summary: dict = field(default_factory=dict)


def profile(split: LeaveOneOutSplit, *, mf: bool = True, max_epochs: int = 60, patience: int = 5, seed: int = 0, progress: bool = False) -> Profile:
    """The statistics of one population (see the module docstring)."""
    from fedpref.models.train import default_config
    from fedpref.simulations.data.population import popularity_metrics
    from fedpref.simulations.reference import train_centralised

    lengths = history_lengths(split)
    counts = item_counts(split)
    pop = popularity_metrics(split, target="test", full=True, seed=seed)
    top = np.sort(counts)[::-1][: max(1, split.n_items // 100)]
    summary = {
        "users": split.n_users,
        "items": split.n_items,
        "events": int(lengths.sum()),
        "length_mean": float(lengths.mean()),
        "length_median": float(np.median(lengths)),
        "length_p95": float(np.percentile(lengths, 95)),
        "length_max": int(lengths.max()),
        "top1pct_share": float(top.sum() / counts.sum()),
        "items_touched": int((counts > 0).sum()),
        "position_popularity_spearman": position_popularity(split, counts),
        "popularity": {"hr": pop.hr, "ndcg": pop.ndcg, "full_hr": pop.full_hr, "full_ndcg": pop.full_ndcg},
        "mf": None,
    }
    if mf:
        result = train_centralised(split, default_config("mf"), max_epochs=max_epochs, patience=patience, seed=seed, full_eval=True, show_progress=progress)
        t = result.test
        summary["mf"] = {"hr": t.hr, "ndcg": t.ndcg, "full_hr": t.full_hr, "full_ndcg": t.full_ndcg, "epoch": result.best_epoch}
    return Profile(split.name, split.n_users, split.n_items, int(lengths.sum()), lengths, counts / split.n_users, summary)


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def _get(summary: dict, key: str) -> float:
    value: object = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float("nan") if value is None else float(value)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN error for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


#: The quantities averaged over draws (keys of a profile's summary, or of a draw's KS results).
COMPARED = (
    "popularity.hr", "popularity.ndcg", "popularity.full_hr", "popularity.full_ndcg",
    "mf.hr", "mf.ndcg", "mf.full_hr", "mf.full_ndcg",
    "ks_lengths", "ks_item_popularity", "position_popularity_spearman",
    "length_mean", "length_median", "top1pct_share",
)


#: How the table names each compared quantity.
LABELS = {
    "popularity.hr": "popularity HR@10", "popularity.ndcg": "popularity NDCG@10",
    "popularity.full_hr": "popularity full HR@10", "popularity.full_ndcg": "popularity full NDCG@10",
    "mf.hr": "central MF HR@10", "mf.ndcg": "central MF NDCG@10", "mf.full_hr": "central MF full HR@10", "mf.full_ndcg": "central MF full NDCG@10",
    "ks_lengths": "KS, history lengths", "ks_item_popularity": "KS, item popularity",
    "position_popularity_spearman": "Spearman, position vs log popularity",
    "length_mean": "events per person, mean", "length_median": "events per person, median", "top1pct_share": "share of events on the top 1% of items",
}


@dataclass
class FidelityResult:
    payload: dict
    real: Profile
    draws: list[Profile]


def _load_real(against: str, seed: int) -> LeaveOneOutSplit:
    from fedpref.simulations.data.interactions import DataWarning
    from fedpref.simulations.data.registry import load_dataset
    from fedpref.simulations.data.split import leave_one_out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # users too short to split are counted in the split
        return leave_one_out(load_dataset(against, seed=seed), seed=seed)


def run_fidelity(
    source: str,
    *,
    against: str = "movielens-small",
    draws: int = 3,
    mf: bool = True,
    max_epochs: int = 60,
    patience: int = 5,
    progress: bool = False,
    on_step=None,
) -> FidelityResult:
    """Compare ``draws`` draws of the generated ``source`` (seeds 0..draws-1) with ``against``.

    Each draw is streamed to a temporary population folder and read back (the path a large
    population takes). ``on_step(text)`` hears about each finished piece of work.
    """
    from fedpref.models.train import default_config
    from fedpref.simulations.data.population import read_population, write_population_stream
    from fedpref.simulations.data.registry import stream_dataset

    say = on_step or (lambda text: None)
    if isinstance(draws, bool) or not isinstance(draws, int) or not 1 <= draws <= 100:
        raise FidelityError(f"draws must be a whole number from 1 to 100, got {draws!r}")
    if draws > 1 and re.search(r":seed=\d+$", source):
        raise FidelityError(f"{source} fixes its seed, so every draw would be the same; drop ':seed=N' (draws use seeds 0..{draws - 1}) or use --draws 1")
    if stream_dataset(source, seed=0) is None:
        raise FidelityError(f"{source!r} is not a generated population: fidelity measures a generator (synthetic:USERSxITEMS or fitted:SOURCE:USERS) against real data")
    started = time.perf_counter()
    real = profile(_load_real(against, 0), mf=mf, max_epochs=max_epochs, patience=patience, progress=progress)
    say(f"{against}: popularity HR@10 {real.summary['popularity']['hr']:.4f}" + (f", central MF HR@10 {real.summary['mf']['hr']:.4f}" if mf else ""))
    profiles: list[Profile] = []
    per_draw: list[dict] = []
    for seed in range(draws):
        streamed = stream_dataset(source, seed=seed)
        with tempfile.TemporaryDirectory(prefix="fedpref-fidelity-") as tmp:
            folder = write_population_stream(streamed, Path(tmp) / "population", describe={"source": source})
            split = read_population(folder, mmap=False)
            drawn = profile(split, mf=mf, max_epochs=max_epochs, patience=patience, progress=progress)
        drawn.summary["seed"] = seed
        drawn.summary["dropped_users"] = split.dropped_users
        drawn.summary["ks_lengths"] = ks_statistic(drawn.lengths, real.lengths)
        drawn.summary["ks_item_popularity"] = ks_statistic(drawn.shares, real.shares)
        profiles.append(drawn)
        per_draw.append(drawn.summary)
        say(f"draw {seed + 1}/{draws}: popularity HR@10 {drawn.summary['popularity']['hr']:.4f}"
            + (f", central MF HR@10 {drawn.summary['mf']['hr']:.4f}" if mf else "")
            + f", KS lengths {drawn.summary['ks_lengths']:.3f}, items {drawn.summary['ks_item_popularity']:.3f}")
    generated = {}
    for key in COMPARED:
        values = [_get(s, key) for s in per_draw]
        if not all(math.isnan(v) for v in values):
            mean, se = mean_se(values)
            generated[key] = {"mean": mean, "se": se}
    goals = {}
    for key, label in GOALS:
        if key in generated:
            target, mean = _get(real.summary, key), generated[key]["mean"]
            goals[key] = {"label": label, "real": target, "generated": mean, "se": generated[key]["se"],
                          "gap": mean - target, "tolerance": TOLERANCE, "pass": bool(abs(mean - target) <= TOLERANCE)}
    payload = {
        "command": "fidelity",
        "source": source,
        "against": against,
        "draws": draws,
        "seeds": list(range(draws)),
        "mf_config": asdict(default_config("mf")) if mf else None,
        "mf_epochs": {"max": max_epochs, "patience": patience} if mf else None,
        "real": real.summary,
        "per_draw": per_draw,
        "generated": generated,
        "goals": goals,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return FidelityResult(payload, real, profiles)


# ---------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------


def plot_fidelity(result: FidelityResult, path: Path) -> None:
    """Three panels: history-length CCDF (log-log), item rank-frequency (log-log), and test HR /
    NDCG@10 bars, real against the draws' mean ± standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    p = result.payload
    lines = [(result.real, "black", 2.0, f"{p['against']} (real)")]
    lines += [(d, "tab:orange", 0.8, f"{p['source']} draws" if i == 0 else None) for i, d in enumerate(result.draws)]
    for prof, colour, width, label in lines:
        x = np.sort(prof.lengths)
        ax1.loglog(x, 1.0 - np.arange(len(x)) / len(x), color=colour, lw=width, label=label, drawstyle="steps-post")
        shares = np.sort(prof.shares[prof.shares > 0])[::-1]
        ax2.loglog(np.arange(1, len(shares) + 1), shares, color=colour, lw=width, label=label)
    ax1.set_xlabel("events in a history")
    ax1.set_ylabel("share of people with at least that many")
    ax1.set_title("history lengths (CCDF)", fontsize=10)
    ax2.set_xlabel("item rank")
    ax2.set_ylabel("events per item per person")
    ax2.set_title("item popularity (rank-frequency)", fontsize=10)
    keys = [k for k in ("popularity.hr", "popularity.ndcg", "mf.hr", "mf.ndcg") if k in p["generated"]]
    labels = [k.replace("popularity.", "popularity\n").replace("mf.", "central MF\n").replace("hr", "HR@10").replace("ndcg", "NDCG@10") for k in keys]
    x = np.arange(len(keys))
    ax3.bar(x - 0.2, [_get(p["real"], k) for k in keys], 0.4, color="black", label="real")
    se = [p["generated"][k]["se"] for k in keys]
    ax3.bar(x + 0.2, [p["generated"][k]["mean"] for k in keys], 0.4, yerr=[0 if math.isnan(s) else s for s in se], color="tab:orange", capsize=3,
            label=f"generated, mean ± se of {p['draws']}")
    ax3.set_xticks(x, labels, fontsize=8)
    ax3.set_ylim(0, 1)
    ax3.set_title(f"test metrics (sampled, 99 negatives); goal: HR within {TOLERANCE}", fontsize=10)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{p['source']} against {p['against']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_rows(payload: dict) -> list[tuple[str, str, str, str]]:
    """(quantity, real, generated mean ± se, goal) rows for a printed table."""
    def fmt(mean: float, se: float) -> str:
        return f"{mean:.4f}" + ("" if math.isnan(se) else f" ± {se:.4f}")

    rows = []
    for key in COMPARED:
        if key not in payload["generated"]:
            continue
        g = payload["generated"][key]
        real = "" if key.startswith("ks_") else f"{_get(payload['real'], key):.4f}"
        goal = payload["goals"].get(key)
        verdict = "" if goal is None else f"{'pass' if goal['pass'] else 'FAIL'} (gap {goal['gap']:+.4f})"
        rows.append((LABELS[key], real, fmt(g["mean"], g["se"]), verdict))
    return rows
