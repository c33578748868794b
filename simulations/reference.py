"""Reference trainers: centralised (the ceiling) and local-only (the floor).

Both go through :func:`fedpref.models.train.local_update`, the function a device runs:
centralised training calls it with every user's history at once; local-only training
calls it once per user, with the shared parameters frozen at their initial values.
The number of epochs is chosen on validation (early stopping on sampled NDCG@10);
the test item is only looked at for the epoch that validation chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fedpref.models.contract import Params
from fedpref.models.train import LocalData, TrainConfig, init_params, local_update

from fedpref.simulations.evaluate import RankingMetrics, evaluate, model_scorer
from fedpref.simulations.progress import progress_bar
from fedpref.simulations.data.split import LeaveOneOutSplit


@dataclass
class ReferenceResult:
    """What a reference trainer returns: the chosen epoch, its metrics and its parameters."""

    trainer: str
    best_epoch: int
    val: RankingMetrics
    test: RankingMetrics
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss and validation metrics
    shared: Params | None = None
    private: Params | None = None


def train_centralised(
    split: LeaveOneOutSplit,
    config: TrainConfig,
    *,
    max_epochs: int = 60,
    patience: int = 5,
    seed: int = 0,
    k: int = 10,
    full_eval: bool = True,
    show_progress: bool = True,
) -> ReferenceResult:
    """All data in one place. Stops when validation NDCG@k has not improved for ``patience`` epochs."""
    if max_epochs < 1 or patience < 1:
        raise ValueError("max_epochs and patience must be positive")
    rng = np.random.default_rng([seed, 1])
    shared, private = init_params(config.model, split.n_users, split.n_items, seed)
    data = LocalData(split.train_users(), split.train_items, split.n_items)
    best: tuple[float, int, Params, Params] | None = None
    history: list[dict[str, float]] = []
    with progress_bar(max_epochs, "centralised epochs", show_progress) as advance:

        def on_epoch_end(epoch: int, shared_now: Params, private_now: Params, loss: float) -> bool:
            nonlocal best
            scorer = model_scorer(config.model, shared_now, private_now, split.n_items)
            val = evaluate(scorer, split, target="val", k=k, full=False, seed=seed)
            history.append({"epoch": epoch, "loss": loss, "val_hr": val.hr, "val_ndcg": val.ndcg})
            advance(f"epoch {epoch}: loss {loss:.4f} val HR@{k} {val.hr:.4f} NDCG@{k} {val.ndcg:.4f}")
            if best is None or val.ndcg > best[0]:
                best = (val.ndcg, epoch, shared_now, private_now)
            return epoch - best[1] >= patience

        # One call, as one long local update: the optimiser's state runs across epochs.
        local_update(shared, private, data, replace(config, epochs=max_epochs, freeze_shared=False), rng, on_epoch_end=on_epoch_end)
    assert best is not None
    _, best_epoch, shared, private = best
    scorer = model_scorer(config.model, shared, private, split.n_items)
    return ReferenceResult(
        trainer="centralised",
        best_epoch=best_epoch,
        val=evaluate(scorer, split, target="val", k=k, full=full_eval, seed=seed),
        test=evaluate(scorer, split, target="test", k=k, full=full_eval, seed=seed),
        history=history,
        shared=shared,
        private=private,
    )


def train_local_only(
    split: LeaveOneOutSplit,
    config: TrainConfig,
    *,
    max_epochs: int = 30,
    patience: int = 3,
    seed: int = 0,
    k: int = 10,
    full_eval: bool = True,
    show_progress: bool = True,
) -> ReferenceResult:
    """Each user learns their private vector from their own history alone.

    The shared parameters stay at their (seeded) initial values: no one learns from
    anyone else. Epochs are chosen on validation as in :func:`train_centralised`.
    """
    rng = np.random.default_rng([seed, 2])
    shared, private_all = init_params(config.model, split.n_users, split.n_items, seed)
    step = replace(config, epochs=1, freeze_shared=True)
    datasets = [LocalData.for_device(split.user_train_items(u), split.n_items) for u in range(split.n_users)]
    privates = [{k_: v[u : u + 1].copy() for k_, v in private_all.items()} for u in range(split.n_users)]
    best: tuple[float, int, list[Params]] | None = None
    history: list[dict[str, float]] = []

    def stacked(ps: list[Params]) -> Params:
        return {name: np.concatenate([p[name] for p in ps]) for name in ps[0]}

    with progress_bar(max_epochs, "local-only epochs", show_progress) as advance:
        for epoch in range(1, max_epochs + 1):
            losses = []
            for u in range(split.n_users):
                _, privates[u], m = local_update(shared, privates[u], datasets[u], step, rng)
                losses.append(m["loss"])
            val = evaluate(model_scorer(config.model, shared, stacked(privates), split.n_items), split, target="val", k=k, full=False, seed=seed)
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_hr": val.hr, "val_ndcg": val.ndcg})
            advance(f"epoch {epoch}: val HR@{k} {val.hr:.4f} NDCG@{k} {val.ndcg:.4f}")
            if best is None or val.ndcg > best[0]:
                best = (val.ndcg, epoch, [dict(p) for p in privates])
            elif epoch - best[1] >= patience:
                break
    assert best is not None
    _, best_epoch, best_privates = best
    private = stacked(best_privates)
    scorer = model_scorer(config.model, shared, private, split.n_items)
    return ReferenceResult(
        trainer="local-only",
        best_epoch=best_epoch,
        val=evaluate(scorer, split, target="val", k=k, full=full_eval, seed=seed),
        test=evaluate(scorer, split, target="test", k=k, full=full_eval, seed=seed),
        history=history,
        shared=shared,
        private=private,
    )
