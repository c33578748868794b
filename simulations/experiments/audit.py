"""The leakage audit: what an honest-but-curious server can infer about each person's items
from exactly what it receives.

The server follows the protocol and keeps everything it is sent. The audit runs the real
ServerApp and ClientApp (in-process engine) in each privacy mode and attacks what the server
held in that mode:

- ``plain``: FedAvg without DP: each device's clipped update;
- ``dp``: central DP without secure aggregation: still each device's clipped update (the
  server adds the noise to the average *after* it has seen them: central DP protects people
  from whoever sees the model, not from the server);
- ``secagg``: secure aggregation: only the sum of the cohort's updates (also what the server
  holds under secure aggregation with *central* DP, before it adds its noise);
- ``secagg-dp``: secure aggregation with distributed DP: the sum, carrying the devices' noise.

The attack scores every item for every person from what the server holds about that person
(their own update, or the sum their update is part of) and asks how well the score ranks the
items the person trained on above the rest: the AUC, 0.5 for no information, 1 for the whole
history. For MF the score is the update of the item's bias: training raises a positive
item's bias and lowers the sampled negatives' (:func:`item_scores`; for models without item
biases, the norm of the item's rows). The AUC is averaged over every (person, round) the
server saw.

A server also knows, or can guess, which items are popular. The *popularity prior* is the AUC
of ranking each person's items by how many *other* people have them: what could be inferred
with no data from the person at all. An AUC near the prior means the server learnt little
about the person beyond that.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedpref.simulations.engines.history import load_history
from fedpref.models.config import FederatedConfig

from fedpref.simulations.engines.inprocess import NODE_ID_BASE, run_inprocess

MODES: dict[str, str] = {
    "plain": "each clipped update (FedAvg, no DP)",
    "dp": "each clipped update (central DP adds noise later)",
    "secagg": "the cohort's sum (secure aggregation)",
    "secagg-dp": "the cohort's noised sum (secagg + distributed DP)",
}


def mode_overrides(mode: str, noise_multiplier: float) -> dict[str, object]:
    """The run-config keys that turn ``mode`` on."""
    if mode not in MODES:
        raise ValueError(f"unknown audit mode {mode!r}; choose from {', '.join(MODES)}")
    dp = {"dp-noise-multiplier": noise_multiplier}
    return {
        "plain": {},
        "dp": dp,
        "secagg": {"secagg": True},
        "secagg-dp": {"secagg": True, **dp, "dp-noise-placement": "distributed"},
    }[mode]


def auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """The probability that a random positive scores above a random negative (ties count a
    half): the Mann-Whitney statistic, from ranks with ties averaged."""
    positives = np.asarray(positives, dtype=bool)
    p = int(positives.sum())
    n = len(positives) - p
    if p == 0 or n == 0:
        raise ValueError("the AUC needs at least one positive and one negative item")
    _, inverse, counts = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties averaged
    return float((ranks[positives].sum() - p * (p + 1) / 2.0) / (p * n))


def item_scores(update: Mapping[str, np.ndarray], n_items: int) -> np.ndarray:
    """The attack's score of every item from one update (or a sum of updates): the change of
    its bias when the model has item biases, else the norm of the change of its rows."""
    if "item_bias.weight" in update:
        return np.asarray(update["item_bias.weight"], dtype=np.float64).reshape(n_items)
    rows = [np.asarray(a, dtype=np.float64).reshape(n_items, -1) for a in update.values() if a.ndim >= 1 and a.shape[0] == n_items]
    return np.linalg.norm(np.hstack(rows), axis=1)


@dataclass
class ModeAudit:
    mode: str
    description: str
    auc: float  # mean over every (person, round) the server saw
    auc_se: float  # its standard error
    observations: int  # (person, round) pairs attacked
    persons: int  # distinct people attacked
    devices_per_observation: float  # 1 for single updates; the sum's size under secure aggregation
    epsilon: float | None  # the run's epsilon at its delta, with DP
    delta: float | None


class _Collector:
    """Scores what the server holds as it arrives, so that no update is kept."""

    def __init__(self, truth: dict[int, np.ndarray], n_items: int) -> None:
        self.truth, self.n_items = truth, n_items
        self.aucs: list[float] = []
        self.people: set[int] = set()
        self.sizes: list[int] = []

    def observe(self, update: Mapping[str, np.ndarray], nodes: list[int]) -> None:
        scores = item_scores(update, self.n_items)
        for node in nodes:
            device = node - NODE_ID_BASE
            self.aucs.append(auc(scores, self.truth[device]))
            self.people.add(device)
        self.sizes.append(len(nodes))

    def on_exchange(self, sent, replies) -> None:
        """Plain and central-DP modes: each reply's arrays minus the global ones it trained on."""
        if not sent or sent[0].metadata.message_type != "train" or "arrays" not in sent[0].content:
            return
        current = {k: v.numpy().astype(np.float64) for k, v in sent[0].content["arrays"].items()}
        for reply in replies:
            if not reply.has_error() and "arrays" in reply.content:
                arrays = reply.content["arrays"]
                self.observe({k: arrays[k].numpy().astype(np.float64) - current[k] for k in current}, [reply.metadata.src_node_id])

    def on_sum(self, server_round, average, nodes) -> None:
        """Secure aggregation: the unmasked average, the same for every device it holds."""
        self.observe(average, nodes)


def ground_truth(history_dir: str, n_devices: int, n_items: int) -> dict[int, np.ndarray]:
    """Each device's training items, as a boolean row over the catalogue."""
    truth = {}
    for device in range(n_devices):
        row = np.zeros(n_items, dtype=bool)
        row[load_history(history_dir, device).train_items] = True
        truth[device] = row
    return truth


def popularity_prior(truth: dict[int, np.ndarray]) -> float:
    """Mean AUC of ranking each person's items by how many *other* people have them."""
    counts = np.sum(list(truth.values()), axis=0, dtype=np.int64)
    return float(np.mean([auc(counts - row, row) for row in truth.values()]))


def run_audit(
    base: Mapping[str, object],
    n_devices: int,
    *,
    modes: list[str],
    noise_multiplier: float = 1.0,
    out: Path,
    on_mode: Callable[[ModeAudit], None] | None = None,
) -> dict:
    """Run every mode on the population of ``base['history-dir']`` with ``base``'s settings
    and attack what the server held. Writes ``out``/audit.json and returns it."""
    from fedpref.server.app import ServerHooks

    history_dir = str(base["history-dir"])
    meta = json.loads((Path(history_dir) / "meta.json").read_text())
    n_items = int(meta["n_items"])
    truth = ground_truth(history_dir, n_devices, n_items)
    results = []
    for mode in modes:
        values = {**base, "fraction-evaluate": 0.01,  # the last round evaluates; a device or two is enough
                  "results-dir": str(out / mode), **mode_overrides(mode, noise_multiplier)}
        config = FederatedConfig.from_run_config(values)
        collector = _Collector(truth, n_items)
        run = run_inprocess(config, n_devices=n_devices, hooks=ServerHooks(on_exchange=[collector.on_exchange], on_sum=[collector.on_sum]))
        aucs = np.array(collector.aucs)
        privacy = run.get("privacy") or {}
        result = ModeAudit(
            mode=mode,
            description=MODES[mode],
            auc=float(aucs.mean()),
            auc_se=float(aucs.std(ddof=1) / math.sqrt(len(aucs))) if len(aucs) > 1 else 0.0,
            observations=len(aucs),
            persons=len(collector.people),
            devices_per_observation=float(np.mean(collector.sizes)),
            epsilon=privacy.get("epsilon"),
            delta=privacy.get("delta"),
        )
        results.append(result)
        if on_mode:
            on_mode(result)
    report = {
        "population": n_devices,
        "items": n_items,
        "rounds": int(base.get("num-server-rounds", 1)),
        "noise-multiplier": noise_multiplier,
        "popularity-prior-auc": popularity_prior(truth),
        "attack": "per item, the update of its bias (fedpref.simulations.experiments.audit.item_scores); AUC of the person's training items against the rest",
        "run-config": {k: v for k, v in base.items() if k != "history-dir"},
        "modes": [asdict(r) for r in results],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    with (out / "audit.csv").open("w") as f:
        f.write("mode,auc,auc_se,observations,persons,devices_per_observation,epsilon,delta,popularity_prior_auc\n")
        for r in results:
            f.write(f"{r.mode},{r.auc:.4f},{r.auc_se:.4f},{r.observations},{r.persons},{r.devices_per_observation:.1f},"
                    f"{'' if r.epsilon is None else f'{r.epsilon:.4g}'},{'' if r.delta is None else f'{r.delta:.3g}'},{report['popularity-prior-auc']:.4f}\n")
    return report


def plot_audit(report: dict, path: Path, title: str = "") -> None:
    """A bar per mode (AUC with its standard error), the popularity prior and chance as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["modes"]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    labels = []
    for m in modes:
        label = m["mode"]
        if m["epsilon"] is not None:
            label += f"\n(epsilon {m['epsilon']:.3g})"
        labels.append(label)
    ax.bar(labels, [m["auc"] for m in modes], yerr=[m["auc_se"] for m in modes], color=["#c44e52", "#dd8452", "#4c72b0", "#55a868"][: len(modes)], capsize=3)
    ax.axhline(report["popularity-prior-auc"], color="k", ls="--", lw=1, label=f"popularity prior {report['popularity-prior-auc']:.3f}")
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance 0.5")
    for i, m in enumerate(modes):
        ax.text(i, m["auc"] + 0.02, f"{m['auc']:.3f}", ha="center", fontsize=9)
    ax.set_ylim(0.4, 1.08)
    ax.set_ylabel("attack AUC (items a person trained on)")
    ax.set_title(title or f"what a curious server infers: {report['population']} devices, {report['rounds']} rounds", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
