"""The one local-update function that every trainer uses, and its negative sampling.

``local_update(shared, private, data, config, rng) -> (update, private', metrics)``

- centralised training calls it with every user's data and every user's private rows;
- local-only training calls it once per user with the shared part frozen;
- a device calls it on its own history (``data.users`` all 0, one private row).

``update`` is ``shared' - shared`` (the only thing a device may send, after clipping);
``private'`` stays with the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .contract import Params
from .preference import ModelSpec

LOSSES = ("bpr", "bce", "softmax", "full-softmax")
OPTIMIZERS = ("adam", "lazy-adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Local training. Defaults are the values chosen on validation for centralised MF on
    movielens-small (``fedpref tune``; docs/reference.md)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    loss: str = "softmax"  # sampled softmax over 1 positive + n negatives ranked best on validation
    num_negatives: int = 20  # negatives per positive, uniform over items the user did not touch
    lr: float = 0.002  # Adam step size
    l2: float = 0.01  # L2 on the embeddings a batch touches (keeps updates sparse, unlike weight decay)
    batch_size: int = 256  # positives per step
    epochs: int = 1  # passes over the local data per call
    optimizer: str = "adam"  # adam (dense), lazy-adam (moves only the embedding rows a batch touches) or sgd
    freeze_shared: bool = False  # local-only training: shared parameters stay as they are

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        for name in ("num_negatives", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be zero or positive, got {self.l2}")
        if self.optimizer == "lazy-adam" and self.loss == "full-softmax":
            raise ValueError("lazy-adam needs sparse gradients, and full-softmax touches every item row: use adam")


@dataclass(frozen=True)
class LocalData:
    """The positives one call trains on.

    ``users`` index rows of the private arrays (all 0 on a device); ``items`` are the
    positive items. ``n_items`` is the catalogue size. Negatives are sampled from items
    the row's user has no positive for.
    """

    users: np.ndarray
    items: np.ndarray
    n_items: int
    _keys: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        users = np.asarray(self.users, dtype=np.int64)
        items = np.asarray(self.items, dtype=np.int64)
        if users.shape != items.shape:
            raise ValueError(f"users and items differ in shape: {users.shape} vs {items.shape}")
        if len(items) and (items.min() < 0 or items.max() >= self.n_items):
            raise ValueError(f"item indices must lie in [0, {self.n_items}), got [{items.min()}, {items.max()}]")
        object.__setattr__(self, "users", users)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "_keys", np.unique(users * self.n_items + items))

    @classmethod
    def for_device(cls, items: np.ndarray, n_items: int) -> LocalData:
        items = np.asarray(items, dtype=np.int64)
        return cls(np.zeros(len(items), dtype=np.int64), items, n_items)

    def __len__(self) -> int:
        return len(self.items)

    def is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each (user, item) pair is one of the positives."""
        keys = users * self.n_items + items
        pos = np.searchsorted(self._keys, keys)
        pos = np.minimum(pos, len(self._keys) - 1)
        return self._keys[pos] == keys


def sample_negatives(
    data: LocalData, users: np.ndarray, num: int, rng: np.random.Generator, *, max_tries: int = 20
) -> np.ndarray:
    """``num`` uniform negatives per row of ``users``, avoiding that user's positives.

    Rejected draws are redrawn (at most ``max_tries`` times, after which the rare leftover
    collision is kept: with 9,000 items and a few hundred positives it almost never happens).
    """
    neg = rng.integers(0, data.n_items, size=(len(users), num))
    rows = np.repeat(users, num).reshape(len(users), num)
    for _ in range(max_tries):
        bad = data.is_positive(rows, neg)
        if not bad.any():
            break
        neg[bad] = rng.integers(0, data.n_items, size=int(bad.sum()))
    return neg


def _loss(pos: torch.Tensor, neg: torch.Tensor, kind: str) -> torch.Tensor:
    """pos: (B,), neg: (B, n). Mean over the batch."""
    if kind == "bpr":
        return -F.logsigmoid(pos[:, None] - neg).mean()
    if kind == "bce":
        return -(F.logsigmoid(pos) + F.logsigmoid(-neg).sum(dim=1)).mean()
    # Sampled softmax: the positive against its negatives, cross-entropy on index 0.
    logits = torch.cat([pos[:, None], neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long))


class _Optimizers:
    """Several torch optimisers stepped as one (lazy Adam: sparse rows and dense layers)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.opts:
            o.step()


def _optimizer(model: torch.nn.Module, trainable: list[torch.Tensor], config: TrainConfig) -> _Optimizers:
    """``adam``: every trainable array takes a step each batch (rows a batch did not touch
    still drift on their momentum). ``lazy-adam``: embeddings get sparse gradients and
    ``torch.optim.SparseAdam``, so a step moves only the rows the batch touched and costs
    what the batch costs, not what the catalogue costs; dense layers (NeuMF's tower) keep Adam.
    ``sgd``: plain SGD, its step proportional to the gradient; the embeddings' gradients are
    sparse too (the same steps as dense SGD, at the batch's cost) unless every item is scored."""
    if config.optimizer == "adam":
        return _Optimizers(torch.optim.Adam(trainable, lr=config.lr))
    wanted = {id(p) for p in trainable}
    if config.optimizer == "sgd":
        if config.loss != "full-softmax":  # it reads the item table whole: dense gradients
            _make_sparse(model, wanted)
        return _Optimizers(torch.optim.SGD(trainable, lr=config.lr))
    sparse = _make_sparse(model, wanted)
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in trainable if id(p) not in sparse_ids]
    opts: list[torch.optim.Optimizer] = [torch.optim.SparseAdam(sparse, lr=config.lr)]
    if dense:
        opts.append(torch.optim.Adam(dense, lr=config.lr))
    return _Optimizers(*opts)


def _make_sparse(model: torch.nn.Module, wanted: set[int]) -> list[torch.Tensor]:
    """Give the trainable embeddings sparse gradients; returns their weights."""
    sparse = []
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and id(module.weight) in wanted:
            module.sparse = True
            sparse.append(module.weight)
    return sparse


def draw_torch_seed(rng: np.random.Generator) -> int:
    """The first draw of every :func:`local_update` call (it seeds torch)."""
    return int(rng.integers(0, 2**31 - 1))


def epoch_batches(data: LocalData, config: TrainConfig, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """One epoch's batches, drawn from ``rng`` in the order :func:`local_update` draws them:
    the epoch's permutation, then each batch's negatives. Yields ``(positions into data,
    negatives (B, num_negatives))``; the negatives are None for ``full-softmax``. The fast
    engine's compiled round (``fedpref.simulations.engines.compiled.draw_batches``) draws the same
    batches from the same generator; a test compares the two."""
    n = len(data)
    order = rng.permutation(n)
    for start in range(0, n, config.batch_size):
        idx = order[start : start + config.batch_size]
        if config.loss == "full-softmax":
            yield idx, None
        else:
            yield idx, sample_negatives(data, data.users[idx], config.num_negatives, rng)


EpochCallback = Callable[[int, Params, Params, float], bool]


def local_update(
    shared: Params,
    private: Params,
    data: LocalData,
    config: TrainConfig,
    rng: np.random.Generator,
    *,
    on_epoch_end: EpochCallback | None = None,
) -> tuple[Params, Params, dict[str, float]]:
    """Train on ``data`` starting from ``shared`` and ``private``.

    Returns ``(update, private', metrics)`` where ``update = shared' - shared`` (all zeros
    when ``config.freeze_shared``) and ``metrics`` are scalars: ``loss`` (mean over the
    last epoch) and ``num_examples``.

    ``on_epoch_end(epoch, shared', private', loss)``, if given, is called after each epoch
    and stops training by returning True (early stopping of the reference trainers; the
    optimiser's state carries over from epoch to epoch, as it does on a device).
    """
    n_rows = next(iter(private.values())).shape[0]
    n_items = data.n_items
    model = config.model.build(n_rows, n_items, init=False)  # every array is set below
    model.set_shared(shared)
    model.set_private(private)
    if len(data) == 0:
        zero = {k: np.zeros_like(v) for k, v in shared.items()}
        return zero, {k: v.copy() for k, v in private.items()}, {"loss": float("nan"), "num_examples": 0.0}

    own = dict(model.named_parameters())
    trainable = [own[n] for n in model.private_names]
    if config.freeze_shared:
        for n in model.shared_names:
            own[n].requires_grad_(False)
    else:
        trainable += [own[n] for n in model.shared_names]
    opt = _optimizer(model, trainable, config)

    torch.manual_seed(draw_torch_seed(rng))  # dropout-free models; kept for any stochastic layer
    n = len(data)
    last_epoch_loss = 0.0
    for epoch in range(1, config.epochs + 1):
        total, count = 0.0, 0
        for idx, negatives in epoch_batches(data, config, rng):
            users = torch.from_numpy(data.users[idx])
            pos_items = torch.from_numpy(data.items[idx])
            if negatives is None:
                # Every item is a candidate (the multinomial likelihood of Mult-VAE); the update
                # then touches every item row.
                items = pos_items[:, None]
                loss = F.cross_entropy(model.logits_all(users), pos_items)
            else:
                items = torch.cat([pos_items[:, None], torch.from_numpy(negatives)], dim=1)
                scores = model(users, items)
                loss = _loss(scores[:, 0], scores[:, 1:], config.loss)
            if config.l2 > 0:
                reg = sum((f**2).sum() for f in model.user_factors(users).values())
                reg = reg + sum((f**2).sum() for f in model.item_factors(items).values())
                loss_total = loss + config.l2 * reg / len(idx)
            else:
                loss_total = loss
            opt.zero_grad(set_to_none=True)
            loss_total.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last_epoch_loss = total / count
        if not np.isfinite(last_epoch_loss):
            break
        if on_epoch_end is not None and on_epoch_end(epoch, model.get_shared(), model.get_private(), last_epoch_loss):
            break
    if not np.isfinite(last_epoch_loss):
        raise FloatingPointError(
            f"local training diverged (loss {last_epoch_loss}); lower lr ({config.lr}) or raise l2 ({config.l2})"
        )

    new_shared = model.get_shared()
    update = {k: new_shared[k] - shared[k] for k in shared}
    return update, model.get_private(), {"loss": last_epoch_loss, "num_examples": float(n)}


def init_params(spec: ModelSpec, n_users: int, n_items: int, seed: int) -> tuple[Params, Params]:
    """Fresh (shared, private) arrays for ``n_users`` private rows, seeded."""
    model = spec.build(n_users, n_items, seed=seed)
    return model.get_shared(), model.get_private()


def default_config(kind: str) -> TrainConfig:
    """The tuned defaults of each model (chosen on validation of movielens-small, docs/reference.md)."""
    if kind == "mf":
        return TrainConfig(model=ModelSpec(kind="mf"))
    if kind == "neumf":
        # Sampled softmax beat NCF's pointwise BCE with 4 negatives on validation (docs/reference.md).
        return TrainConfig(model=ModelSpec(kind="neumf", dim=64, mlp_layers=(64, 32, 16)))
    raise ValueError(f"unknown model {kind!r}; choose one of 'mf', 'neumf'")
